"""Stage ``oracle``: r*, the reward alignment is judged by (``beyondlm/oracle.py``).

``oracle.kind: language`` (default): r* is the synthetic language's exact posterior log-odds of
positive sentiment; the stage writes a marker and the downstream stages compute r* from prepare's
``language.json``. ``classifier``: trains a sentiment classifier (TF-IDF + logistic regression) on
``oracle.classifier.train`` and reports its accuracy on ``oracle.classifier.test``; r* is its log-odds.
``none``: no r* (HH preferences); a marker, and the downstream stages report reward-model judgements only.

params: oracle
deps:   inputs/oracle/ (the labelled files named by oracle.classifier.*); code: the import closure of this module (dvc.yaml, `python -m beyondlm.dvcgraph --write`)
outs:   --out (oracle.json; classifier: + weights.npz)
metrics: --metrics
"""

import argparse
import time
from pathlib import Path

from beyondlm import cli
from beyondlm.config import load_section, read_params, section
from beyondlm.dvcgraph import check_declared_inputs
from beyondlm.io import write_metrics
from beyondlm.oracle import (
    OracleConfig,
    accuracy,
    read_labelled,
    train_classifier,
    write_language_marker,
    write_none_marker,
)


def parser() -> argparse.ArgumentParser:
    """The command line dvc.yaml gives this stage."""
    p = argparse.ArgumentParser(description=__doc__)
    for arg in ("--out", "--metrics"):
        p.add_argument(arg, type=Path, required=True)
    return p


def configure(args: argparse.Namespace, params: dict) -> OracleConfig:
    """Every params check of this stage, before any input is read (also run up front by the flow)."""
    cfg = load_section(OracleConfig, section(params, "oracle"), "oracle")
    if cfg.kind == "classifier":
        check_declared_inputs("oracle", {f"oracle.classifier.{k}": getattr(cfg.classifier, k) for k in ("train", "test")})
    return cfg


def main() -> None:
    args = parser().parse_args()
    cfg = configure(args, read_params())
    if cfg.kind == "language":
        write_language_marker(args.out)
        write_metrics(args.metrics, {"kind": "language", "exact": True})
        return
    if cfg.kind == "none":
        write_none_marker(args.out)
        write_metrics(args.metrics, {"kind": "none", "exact": False})
        return
    c = cfg.classifier
    start = time.perf_counter()
    train = read_labelled(c.train, c.text_column, c.label_column, "oracle.classifier.train")
    test = read_labelled(c.test, c.text_column, c.label_column, "oracle.classifier.test")
    clf = train_classifier(*train, c)
    metrics = {"kind": "classifier", "exact": False, "n_train": len(train[0]), "n_test": len(test[0]),
               "n_features": len(clf.vocabulary), "train_accuracy": accuracy(clf, *train),
               "test_accuracy": accuracy(clf, *test)}
    clf.save(args.out, {"train": c.train, "test_accuracy": metrics["test_accuracy"]})
    write_metrics(args.metrics, {**metrics, "wall_s": time.perf_counter() - start})  # wall_s: to reports/timing/


if __name__ == "__main__":
    cli.run(main)
