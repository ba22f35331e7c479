"""r* (beyondlm/oracle.py): the language oracle is the synthetic posterior, the classifier oracle
learns sentiment from labelled text, saves and loads without pickle, and the stage's config errors
are one line naming the key, the value and the fix."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from beyondlm.align.config import SampleConfig
from beyondlm.align.experiment import run_sample
from beyondlm.align.store import load_table
from beyondlm.config import ConfigError, load_section
from beyondlm.data import tokenization
from beyondlm.data.config import PreparedData
from beyondlm.oracle import (
    ClassifierConfig,
    ClassifierOracle,
    LanguageOracle,
    OracleConfig,
    TextClassifier,
    accuracy,
    load_oracle,
    read_labelled,
    train_classifier,
    write_language_marker,
)
from tests.helpers import tiny_setup

IMDB = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "imdb"

POSITIVE = ["A wonderful, moving film. The acting is superb and I loved every minute of it.",
            "Brilliant and beautiful.<br /><br />One of the best movies I have seen this year, a must see."]
NEGATIVE = ["A terrible, boring film. The acting is awful and I hated every minute of it.",
            "Dull and stupid.<br /><br />One of the worst movies I have seen, a complete waste of time."]


def _slice(path: Path, n: int) -> tuple[list[str], np.ndarray]:
    """``n`` reviews, half positive and half negative (the files are sorted by label)."""
    rows = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
    pos = [r for r in rows if r["label"] == 1][: n // 2]
    neg = [r for r in rows if r["label"] == 0][: n // 2]
    return [r["text"] for r in pos + neg], np.array([1] * len(pos) + [0] * len(neg))


@pytest.fixture(scope="module")
def imdb_classifier():
    if not (IMDB / "train.jsonl.gz").exists():
        pytest.skip(f"IMDB is absent ({IMDB}); the shared data folder holds it (../shared/data/README.md)")
    texts, labels = _slice(IMDB / "train.jsonl.gz", 3000)
    return train_classifier(texts, labels, ClassifierConfig(train="t", test="t", min_df=2))


def test_classifier_on_an_imdb_slice_is_accurate(imdb_classifier):
    texts, labels = _slice(IMDB / "test.jsonl.gz", 1000)
    assert accuracy(imdb_classifier, texts, labels) > 0.8  # 3k training reviews; 0.90 with all 25k (README)


def test_reward_sign_follows_sentiment(imdb_classifier):
    assert (imdb_classifier.logits(POSITIVE) > 0).all() and (imdb_classifier.logits(NEGATIVE) < 0).all()


def _toy_classifier() -> TextClassifier:
    texts = POSITIVE * 3 + NEGATIVE * 3 + ["great fun", "loved it", "awful mess", "hated it"]
    labels = np.array([1, 1] * 3 + [0, 0] * 3 + [1, 1, 0, 0])
    return train_classifier(texts, labels, ClassifierConfig(train="t", test="t", min_df=1))


def test_classifier_sign_and_br_cleaning_without_data():
    clf = _toy_classifier()
    assert (clf.logits(["I loved it, wonderful"]) > 0).all() and (clf.logits(["awful, I hated it"]) < 0).all()
    assert "br" not in clf.vocabulary  # <br /> became a newline before tokenizing


def test_save_load_round_trip_gives_identical_rewards(tmp_path):
    clf = _toy_classifier()
    clf.save(tmp_path / "oracle", {"train": "t"})
    loaded = TextClassifier.load(tmp_path / "oracle")
    texts = POSITIVE + NEGATIVE + ["nothing to say", ""]
    np.testing.assert_array_equal(loaded.logits(texts), clf.logits(texts))
    with np.load(tmp_path / "oracle" / "weights.npz", allow_pickle=False) as w:  # plain arrays, no pickle
        assert sorted(w.files) == ["coef", "idf", "intercept"]


def test_classifier_oracle_scores_token_ids(tmp_path):
    """r* of ids = the classifier on the decoded text (BOS/EOS skipped)."""
    tok = tokenization.train_bpe(POSITIVE + NEGATIVE, 300)
    clf = _toy_classifier()
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in ("I loved it", "I hated it")]
    r = ClassifierOracle(clf, tok).reward(ids)
    np.testing.assert_allclose(r, clf.logits(["I loved it", "I hated it"]))
    assert r[0] > 0 > r[1]


def test_language_oracle_is_the_synthetic_posterior(tmp_path):
    language, _, _ = tiny_setup()
    seqs = language.sample(64, np.random.default_rng(0))
    np.testing.assert_array_equal(LanguageOracle(language).reward(seqs), language.oracle_reward(seqs))
    language.save(tmp_path / "language.json")
    write_language_marker(tmp_path / "oracle")
    loaded = load_oracle(tmp_path / "oracle", PreparedData(out_dir=str(tmp_path)))
    np.testing.assert_array_equal(loaded.reward(seqs), language.oracle_reward(seqs))
    assert load_oracle(tmp_path / "oracle", PreparedData(out_dir=str(tmp_path / "none"))) is None  # no language


def test_align_sample_gets_the_same_r_star_through_the_oracle(tmp_path):
    """The default pipeline's path: align_sample's oracle column = language.oracle_reward exactly."""
    language, tok, model = tiny_setup()
    prompts = [[tok.bos_token_id, *s[:3]] for s in language.sample(8, np.random.default_rng(0))]
    language.save(tmp_path / "language.json")
    write_language_marker(tmp_path / "oracle")
    oracle = load_oracle(tmp_path / "oracle", PreparedData(out_dir=str(tmp_path)))
    run_sample(SampleConfig(K=2), model, tok, prompts, max_new_tokens=8, oracle=oracle, out=tmp_path / "s.parquet")
    t = load_table(tmp_path / "s.parquet")
    flat = [list(p[1:]) + c for p, g in zip(t["prompt_ids"], t["completions"]) for c in g]
    np.testing.assert_array_equal(np.asarray(t["oracle"]).reshape(-1), language.oracle_reward(flat))


@pytest.mark.parametrize("raw, key", [
    ({"kind": "bayes"}, "'oracle.kind'='bayes'"),
    ({"kind": "classifier", "classifier": {"test": "x.jsonl"}}, "'oracle.classifier.train'=None"),
    ({"kind": "classifier", "classifier": {"train": "a", "test": "b", "C": 0}}, "'oracle.classifier.C'=0"),
])
def test_config_errors_name_key_value_and_fix(raw, key):
    with pytest.raises(ConfigError) as err:
        load_section(OracleConfig, raw, "oracle")
    msg = str(err.value)
    assert key in msg and "\n" not in msg


def test_labelled_file_errors(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text("".join(json.dumps({"text": t, "stars": 1}) + "\n" for t in POSITIVE))
    with pytest.raises(ConfigError, match="oracle.classifier.label_column.*'label'.*columns: text, stars"):
        read_labelled(str(path), "text", "label", "oracle.classifier.train")
    with pytest.raises(ConfigError, match="both present"):
        read_labelled(str(path), "text", "stars", "oracle.classifier.train")


def test_stage_refuses_files_outside_inputs_oracle(tmp_path, monkeypatch):
    import stages.oracle as stage

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    outside = tmp_path / "train.jsonl"
    outside.write_text("{}\n")
    params = {"oracle": {"kind": "classifier", "classifier": {"train": str(outside), "test": str(outside)}}}
    with pytest.raises(ConfigError, match="oracle.classifier.train.*inputs/oracle/"):
        stage.configure(stage.parser().parse_args(["--out", "o", "--metrics", "m"]), params)
