"""Local files and hub data sets through `datasets`, with clear errors on bad input."""

import gzip
import json
from pathlib import Path

import pytest

from beyondlm.config import ConfigError, load_section
from beyondlm.data.config import HubSourceConfig, LocalSourceConfig, PrepareConfig
from beyondlm.data import sources
from beyondlm.data.prepare import prepare

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _write(path: Path, fmt: str, texts: list[str], column: str = "text") -> Path:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({column: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    elif fmt == "jsonl.gz":
        with gzip.open(path, "wt") as f:
            f.write("".join(json.dumps({column: t}) + "\n" for t in texts))
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        path.write_text(f"id{sep}{column}\n" + "".join(f"{i}{sep}{t}\n" for i, t in enumerate(texts)))
    elif fmt == "txt":
        path.write_text("\n".join(texts) + "\n")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({column: texts}), path)
    return path


TEXTS = [f"review number {i} was {'good' if i % 2 else 'bad'}" for i in range(40)]


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "csv", "tsv", "txt", "parquet"])
def test_every_local_format_reads(tmp_path, fmt):
    path = _write(tmp_path / f"train.{fmt}", fmt, TEXTS, column="review")
    assert sources.read_text_file(path, "review", "train") == TEXTS


def test_local_splits_carved_and_disjoint(tmp_path):
    path = _write(tmp_path / "all.jsonl", "jsonl", TEXTS)
    splits = sources.load_local(LocalSourceConfig(train=str(path), valid_fraction=0.1, test_fraction=0.2), seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"test": 8, "valid": 3, "train": 29}
    assert sorted(sum(splits.values(), [])) == sorted(TEXTS)


def test_local_errors_name_the_file_and_fix(tmp_path):
    path = _write(tmp_path / "train.jsonl", "jsonl", TEXTS, column="body")
    with pytest.raises(ConfigError, match=r"text_column='text' is not a column .*columns: body, id"):
        sources.read_text_file(path, "text", "train")
    with pytest.raises(ConfigError, match="does not exist"):
        sources.read_text_file(tmp_path / "nope.jsonl", "text", "train")
    with pytest.raises(ConfigError, match="unknown format"):
        sources.read_text_file(_write(tmp_path / "x.xml", "txt", TEXTS), "text", "train")
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(ConfigError, match="no non-empty texts"):
        sources.read_text_file(empty, "text", "train")
    with pytest.raises(ConfigError, match="prepare.local.train"):
        sources.load_local(LocalSourceConfig(), seed=0)


def test_hub_loader_reads_splits_through_load_dataset(tmp_path, monkeypatch):
    """The hub path is real code; only `datasets.load_dataset`'s download is swapped for local files."""
    import datasets

    files = {name: str(_write(tmp_path / f"{name}.jsonl", "jsonl", TEXTS[:10])) for name in ("train", "validation")}
    real = datasets.load_dataset
    calls = []

    def fake(name, config=None, revision=None, **kw):
        calls.append((name, config, revision, kw))
        return real("json", data_files=files)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    cfg = HubSourceConfig(name="org/reviews", config="v1", revision="abc", test_split=None, test_fraction=0.2)
    splits = sources.load_hub(cfg, seed=0)
    assert calls == [("org/reviews", "v1", "abc", {})]  # no trust_remote_code unless asked
    assert len(splits["valid"]) == 10 and len(splits["test"]) == 2 and len(splits["train"]) == 8
    with pytest.raises(ConfigError, match="'nope' is not a split"):
        sources.load_hub(HubSourceConfig(name="org/reviews", train_split="nope"), seed=0)


@pytest.mark.skipif(not (SHARED / "sentiment").exists(), reason="../shared/data not present")
def test_prepare_on_real_sst2_with_trained_bpe(tmp_path):
    cfg = load_section(PrepareConfig, {
        "source": "local", "n_train": 1500, "max_len": 48, "prompt_len": 4, "n_prompts": 16,
        "synthetic": {"max_len": 48},
        # sst2_train.tsv names its column 'sentence', dev/test 'content': one column per source
        "local": {"train": str(SHARED / "sentiment" / "sst2_test.tsv"),
                  "test": str(SHARED / "sentiment" / "sst2_dev.tsv"), "text_column": "content"},
        "tokenizer": {"kind": "bpe", "vocab_size": 500},
    }, "prepare")
    prepared = prepare(cfg)
    assert len(prepared.splits["train"]) == 1500 and len(prepared.splits["test"]) == 872
    assert len(prepared.tokenizer) <= 500
    ids = prepared.splits["test"]["input_ids"][0]
    text = prepared.splits["test"]["text"][0]
    assert ids[0] == prepared.tokenizer.bos_token_id and len(ids) <= 48 + 1
    if ids[-1] == prepared.tokenizer.eos_token_id:  # complete texts round-trip through the BPE
        assert prepared.tokenizer.decode(ids[1:-1]) == text
    assert len(prepared.prompts["test"]) == 16
