"""Local files and hub data sets through `datasets`, with clear errors on bad input."""

import gzip
import json
import os
import socket
import time
from pathlib import Path

import pytest

from beyondlm import hub
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


def test_carving_shuffles_train_so_a_cap_keeps_both_labels(tmp_path):
    """The IMDB file is sorted by label; the IMDB profile caps train (prepare.n_train) after carving."""
    by_label = sorted(TEXTS, key=lambda t: t.endswith("good"))  # every 'bad' review first
    path = _write(tmp_path / "sorted.jsonl", "jsonl", by_label)
    train = sources.load_local(LocalSourceConfig(train=str(path), valid_fraction=0.1, test_fraction=0.1), seed=0)["train"]
    head = train[:10]  # what prepare keeps at n_train=10
    assert any(t.endswith("good") for t in head) and any(t.endswith("bad") for t in head)


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


def test_a_data_set_the_hub_does_not_have_is_one_line(monkeypatch):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    from beyondlm.inputs import InputError

    def missing(name, *args, **kwargs):
        raise DatasetNotFoundError(f"Dataset '{name}' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(InputError, match=r"^org/nope: not a readable hub data set \(Dataset 'org/nope' doesn't exist "
                                         r"on the Hub .*\); check prepare.hub.name, .config and .revision, or set "
                                         r"prepare.source: local"):
        sources.load_hub(HubSourceConfig(name="org/nope"), seed=0)


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


# ----------------------------------------------------------------------------- hub ids, before any download
def test_offline_hub_id_not_in_the_cache_is_one_line_at_once(offline_hub):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        hub.check_hub_id("prepare.hub.name", "org/reviews", "dataset", "or set prepare.source: local")
    assert time.perf_counter() - t0 < 0.5  # decided from local facts: no request, no retries
    msg = str(err.value)
    assert "\n" not in msg, msg
    assert "'prepare.hub.name'='org/reviews' is not a local directory and not in the Hugging Face cache" in msg
    assert "HF_HUB_OFFLINE is set" in msg and "or set prepare.source: local" in msg


def test_offline_hub_id_in_the_cache_passes(offline_hub):
    import datasets.config

    (offline_hub / "models--org--tiny" / "snapshots" / "abc").mkdir(parents=True)
    hub.check_hub_id("sft.model.name_or_path", "org/tiny")
    (offline_hub / "datasets--org--reviews" / "snapshots" / "abc").mkdir(parents=True)
    hub.check_hub_id("prepare.hub.name", "org/reviews", "dataset")
    (Path(datasets.config.HF_DATASETS_CACHE) / "imdb" / "plain_text").mkdir(parents=True)  # load_dataset's own cache
    hub.check_hub_id("prepare.hub.name", "imdb", "dataset")
    with pytest.raises(ConfigError, match="'prepare.hub.name'='org/tiny' is not a local directory"):
        hub.check_hub_id("prepare.hub.name", "org/tiny", "dataset")  # a model repo is no data set


def test_a_missing_path_is_not_taken_for_a_hub_id(offline_hub, tmp_path):
    with pytest.raises(ConfigError, match=r"'sft.model.name_or_path'='\./models/x' does not exist \(not a local "
                                          r"path\) and is not a hub id; set it to an existing model directory"):
        hub.check_hub_id("sft.model.name_or_path", "./models/x")
    with pytest.raises(ConfigError, match="is not a hub id"):
        hub.check_hub_id("sft.model.name_or_path", "inputs/sft/a/b")
    hub.check_hub_id("sft.model.name_or_path", str(tmp_path))  # an existing directory: local, never the hub
    hub.check_hub_id("sft.model.name_or_path", None)


def _online(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_an_unreachable_hub_is_found_by_a_bounded_probe(monkeypatch, offline_hub):
    """No HF_HUB_OFFLINE, and a connection (name lookup included) that hangs: the probe gives up."""
    from huggingface_hub import constants

    _online(monkeypatch)

    def hang(*args, **kwargs):
        time.sleep(3)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hang)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="'sft.model.name_or_path'='gpt2-nonexistent' .* the hub is unreachable"):
        hub.check_hub_id("sft.model.name_or_path", "gpt2-nonexistent")
    assert time.perf_counter() - t0 < hub.PROBE_TIMEOUT_S + 0.5
    assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"  # later loads: the cache, no retries


def test_a_reachable_hub_leaves_the_id_to_the_download(monkeypatch, offline_hub):
    from huggingface_hub import constants

    _online(monkeypatch)
    monkeypatch.setattr(hub, "probe", lambda url, timeout=hub.PROBE_TIMEOUT_S: True)
    hub.check_hub_id("sft.model.name_or_path", "gpt2-nonexistent")  # the hub answers 404 itself, at once
    assert not constants.HF_HUB_OFFLINE


def test_a_cached_model_loads_at_once_when_the_hub_is_unreachable(monkeypatch, offline_hub):
    """The check switches the process offline: transformers reads the cache without retrying the hub."""
    from transformers import AutoModelForCausalLM

    from beyondlm.config import ModelConfig
    from beyondlm.data.tokenization import train_bpe
    from beyondlm.models import build_model, check_vocabulary, save_model

    tok = train_bpe([f"some words {i}" for i in range(30)], 300)
    repo = offline_hub / "models--org--tiny"
    save_model(build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, n_positions=32), tok), tok,
               repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    _online(monkeypatch)
    monkeypatch.setattr(hub, "probe", lambda url, timeout=hub.PROBE_TIMEOUT_S: False)
    t0 = time.perf_counter()
    hub.check_hub_id("sft.model.name_or_path", "org/tiny")
    check_vocabulary(tok, "org/tiny", "sft.model.name_or_path")
    model = AutoModelForCausalLM.from_pretrained("org/tiny", use_safetensors=True)
    assert time.perf_counter() - t0 < 5 and model.config.vocab_size == len(tok)  # retries took ~27 s here
