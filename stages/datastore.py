"""Stage ``datastore``: the kNN-LM datastore (keys = last pre-FFN layer norm, values = next token).

params: prepare.out_dir, datastore.*
deps:   the model dir (datastore.model), ${prepare.out_dir}; code: the import closure of this module (dvc.yaml, `python -m beyondlm.dvcgraph --write`)
outs:   --out (keys.npy fp16 (N, D), values.npy int32 (N,), meta.json; persist: a killed build
        resumes from progress.json, and is rebuilt when the data or the weights changed)
metrics: --metrics (N, D, keys/s)
"""

import argparse
import time
from pathlib import Path

from beyondlm import cli
from beyondlm.config import load_section, read_params, section
from beyondlm.data.config import prepared_data
from beyondlm.data.prepare import load_split
from beyondlm.io import write_metrics
from beyondlm.lookup.datastore import DatastoreConfig, build_datastore
from beyondlm.models import load_model


def parser() -> argparse.ArgumentParser:
    """The command line dvc.yaml gives this stage."""
    p = argparse.ArgumentParser(description=__doc__)
    for arg in ("--out", "--metrics"):
        p.add_argument(arg, type=Path, required=True)
    return p


def configure(args: argparse.Namespace, params: dict) -> DatastoreConfig:
    """Every params check of this stage, before any input is read (also run up front by the flow)."""
    return load_section(DatastoreConfig, section(params, "datastore"), "datastore")


def main() -> None:
    args = parser().parse_args()
    params = read_params()
    cfg = configure(args, params)
    data_dir = prepared_data(params).data_dir
    ids = load_split(data_dir, cfg.split)["input_ids"]
    if cfg.max_seqs:
        ids = ids[: cfg.max_seqs]
    model = load_model(cfg.model)
    seqs = [list(s) for s in ids]  # prepared texts are [BOS] x_1 .. EOS, as the LM was trained
    start = time.perf_counter()
    info = build_datastore(model, seqs, args.out, batch_size=cfg.batch_size,
                           chunk_tokens=cfg.chunk_tokens, model_name=cfg.model)
    seconds = time.perf_counter() - start
    write_metrics(args.metrics, {"n_keys": info.n_keys, "dim": info.dim, "n_seqs": info.n_seqs,
                              "seconds": seconds, "keys_per_s": info.n_keys / max(seconds, 1e-9),
                              "bytes": info.n_keys * (2 * info.dim + 4)})


if __name__ == "__main__":
    cli.run(main)
