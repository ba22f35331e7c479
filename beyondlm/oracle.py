"""r*, the oracle reward alignment is judged by: one protocol, two implementations.

- ``LanguageOracle``: the synthetic language's exact posterior log-odds of positive sentiment,
  ``SyntheticLanguage.oracle_reward`` (the default pipeline; unchanged numbers).
- ``ClassifierOracle``: a sentiment classifier over decoded text, r*(x) = its log-odds of positive
  sentiment, as the EXO paper's IMDB oracle (Ji et al., ICML 2024: a classifier trained on the
  labelled reviews). TF-IDF over word 1..n-grams + L2 logistic regression (scikit-learn); 0.90 test
  accuracy on IMDB (README).

- ``none``: no oracle (HH preferences: human labels, no r* to score new text with). The stage
  writes a marker; ``load_oracle`` returns None and every downstream stage drops its r* metrics.

Both score token-id sequences without BOS (``reward(seqs) -> (N,) float64``), the call every stage
that needs r* makes. The ``oracle`` stage writes ``models/oracle/``: ``oracle.json`` (the kind and,
for a classifier, its vocabulary and settings) and ``weights.npz`` (idf, coefficients, intercept);
loading rebuilds the scorer from these arrays (``allow_pickle=False``): no pickled code is ever loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from beyondlm.config import ConfigError, check_choice, check_range
from beyondlm.data.sources import builder, clean_text
from beyondlm.inputs import read_json, reading, require, restore_fix
from beyondlm.io import atomic_path, write_json

KINDS = ("language", "classifier", "none")


class Oracle(Protocol):
    kind: str

    def reward(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        """r* (N,) float64 of token-id sequences without BOS (a trailing EOS is ignored)."""


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class ClassifierConfig:
    """``oracle.classifier``: labelled files and the TF-IDF + logistic-regression settings."""

    train: str | None = None  # labelled texts under inputs/oracle/
    test: str | None = None  # held-out labelled texts: the accuracy in the metrics
    text_column: str = "text"
    label_column: str = "label"  # 1 = positive, 0 = negative
    ngram_max: int = 2
    min_df: int = 2
    max_features: int = 200000
    C: float = 4.0
    max_iter: int = 1000

    def __post_init__(self) -> None:
        check_range("oracle.classifier.ngram_max", self.ngram_max, 1, 5)
        check_range("oracle.classifier.min_df", self.min_df, 1, 10**6)
        check_range("oracle.classifier.max_features", self.max_features, 1, 10**8)
        check_range("oracle.classifier.C", self.C, 1e-6, 1e6)
        check_range("oracle.classifier.max_iter", self.max_iter, 1, 10**6)


@dataclass(frozen=True)
class OracleConfig:
    """Params section ``oracle``."""

    kind: str = "language"  # language | classifier | none
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)

    def __post_init__(self) -> None:
        check_choice("oracle.kind", self.kind, KINDS)
        if self.kind == "classifier" and not (self.classifier.train and self.classifier.test):
            missing = "train" if not self.classifier.train else "test"
            raise ConfigError(f"params.yaml: 'oracle.classifier.{missing}'=None: oracle.kind=classifier needs "
                              f"a labelled file; set oracle.classifier.{missing} to one under inputs/oracle/")


# ----------------------------------------------------------------------------- implementations
class LanguageOracle:
    """The synthetic language's exact posterior log-odds (``SyntheticLanguage.oracle_reward``)."""

    kind = "language"

    def __init__(self, language) -> None:
        self.language = language

    def reward(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        return self.language.oracle_reward(seqs)


@dataclass
class TextClassifier:
    """TF-IDF (raw counts × idf, L2-normalised rows, sklearn's default) + a linear logit."""

    vocabulary: list[str]  # feature i is vocabulary[i]
    idf: np.ndarray  # (F,)
    coef: np.ndarray  # (F,)
    intercept: float
    ngram_max: int

    def _vectorizer(self):
        from sklearn.feature_extraction.text import CountVectorizer

        return CountVectorizer(vocabulary={w: i for i, w in enumerate(self.vocabulary)},
                               ngram_range=(1, self.ngram_max), dtype=np.float64)

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """log P(pos | text) − log P(neg | text) (N,) float64."""
        from sklearn.preprocessing import normalize

        x = self._vectorizer().transform([clean_text(t) for t in texts])  # (N, F) counts
        x = normalize(x.multiply(self.idf).tocsr())  # (N, F) tf-idf, unit rows
        return np.asarray(x @ self.coef, dtype=np.float64) + self.intercept

    def save(self, out_dir: Path, meta: dict) -> None:
        with atomic_path(out_dir, is_dir=True) as tmp:
            np.savez(tmp / "weights.npz", idf=self.idf, coef=self.coef, intercept=np.array([self.intercept]))
            write_json(tmp / "oracle.json", {**meta, "kind": "classifier", "ngram_max": self.ngram_max,
                                             "vocabulary": self.vocabulary})

    @classmethod
    def load(cls, out_dir: Path) -> "TextClassifier":
        fix = restore_fix(out_dir, "oracle")
        meta = read_json(Path(out_dir) / "oracle.json", fix)
        path = require(Path(out_dir) / "weights.npz", "oracle weights", fix)
        with reading(path, "oracle weights file", fix), np.load(path, allow_pickle=False) as w:
            idf, coef, intercept = w["idf"], w["coef"], float(w["intercept"][0])
        return cls(meta["vocabulary"], idf, coef, intercept, int(meta["ngram_max"]))


class ClassifierOracle:
    """r* of token ids: decode with the data's tokenizer, then the classifier's log-odds."""

    kind = "classifier"

    def __init__(self, classifier: TextClassifier, tokenizer) -> None:
        self.classifier, self.tokenizer = classifier, tokenizer

    def reward(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        texts = self.tokenizer.batch_decode([list(s) for s in seqs], skip_special_tokens=True)
        return self.classifier.logits(texts)


# ----------------------------------------------------------------------------- training
def read_labelled(path: str, text_column: str, label_column: str, key: str) -> tuple[list[str], np.ndarray]:
    """(texts, labels in {0, 1}) of one labelled file (jsonl, csv, tsv, parquet; optionally .gz)."""
    import datasets

    fix = f"fix the file, or set {key} to another one"
    require(path, "labelled file", fix)
    name, kwargs = builder(Path(path), key)
    with reading(path, "labelled file", fix):
        ds = datasets.load_dataset(name, data_files=str(path), split="train", **kwargs)
    for column, which in ((text_column, "text_column"), (label_column, "label_column")):
        if column not in ds.column_names:
            raise ConfigError(f"params.yaml: 'oracle.classifier.{which}'={column!r} is not a column of {path} "
                              f"(columns: {', '.join(ds.column_names)}); set oracle.classifier.{which}")
    labels = np.asarray(ds[label_column])
    if not np.isin(labels, (0, 1)).all() or len(np.unique(labels)) < 2:
        raise ConfigError(f"params.yaml: '{key}'={path!r}: labels in '{label_column}' must be 0 (negative) and "
                          f"1 (positive), both present; fix the file or set oracle.classifier.label_column")
    return [clean_text(t) for t in ds[text_column]], labels.astype(np.int64)


def train_classifier(texts: Sequence[str], labels: np.ndarray, cfg: ClassifierConfig) -> TextClassifier:
    """Fit TF-IDF + logistic regression; the fitted scorer as plain arrays."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(ngram_range=(1, cfg.ngram_max), min_df=cfg.min_df, max_features=cfg.max_features,
                          dtype=np.float64)
    x = vec.fit_transform([clean_text(t) for t in texts])  # (N, F)
    model = LogisticRegression(C=cfg.C, max_iter=cfg.max_iter).fit(x, labels)
    vocabulary = [""] * len(vec.vocabulary_)
    for word, i in vec.vocabulary_.items():
        vocabulary[i] = word
    return TextClassifier(vocabulary, vec.idf_.astype(np.float64), model.coef_[0].astype(np.float64),
                          float(model.intercept_[0]), cfg.ngram_max)


def accuracy(classifier: TextClassifier, texts: Sequence[str], labels: np.ndarray) -> float:
    return float(((classifier.logits(texts) > 0).astype(np.int64) == labels).mean())


# ----------------------------------------------------------------------------- stage outputs
def write_language_marker(out_dir: Path) -> None:
    with atomic_path(out_dir, is_dir=True) as tmp:
        write_json(tmp / "oracle.json", {"kind": "language",
                                         "r_star": "exact posterior log-odds of positive sentiment "
                                                   "under the synthetic language (prepare's language.json)"})


def write_none_marker(out_dir: Path) -> None:
    with atomic_path(out_dir, is_dir=True) as tmp:
        write_json(tmp / "oracle.json", {"kind": "none", "r_star": None})


def load_oracle(oracle_dir: str | Path, prep) -> Oracle | None:
    """The oracle the ``oracle`` stage wrote, for data prepared as ``prep`` (a ``PreparedData``);
    None for kind none, and for kind language on data without a known language (no r* there)."""
    oracle_dir = Path(oracle_dir)
    kind = read_json(oracle_dir / "oracle.json", restore_fix(oracle_dir, "oracle")).get("kind")
    if kind == "language":
        language = prep.language()
        return LanguageOracle(language) if language is not None else None
    if kind == "none":
        return None
    if kind == "classifier":
        from beyondlm.data.prepare import load_tokenizer

        return ClassifierOracle(TextClassifier.load(oracle_dir), load_tokenizer(prep.data_dir))
    raise ConfigError(f"{oracle_dir}/oracle.json: kind={kind!r} is not one of {', '.join(KINDS)}; "
                      f"{restore_fix(oracle_dir, 'oracle')}")

