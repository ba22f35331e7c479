"""kNN-LM datastore and retrieval costs (issue targets: build ≥ 1M keys/min, recall@k ≥ 0.9).

On the real keys of a trained model: ``models/sft/mle-s0`` over the ``data/prepared`` train
split when the pipeline has produced them, else the default tiny model trained briefly in this
process (``source`` records which). Datastore, index and evaluation settings are the defaults of
the ``datastore`` / ``knnlm`` params sections (a section in params.yaml overrides them, as in the
stages). Timings are medians of ``rounds`` interleaved repetitions; ``load_average`` says how
busy the shared cores were.

- ``datastore``: keys/s of ``build_datastore`` over the whole split (forward pass to the key
  module, fp16 memmap writes), and in ``profile`` its floor (the same forward passes, nothing
  written) and the previous path (full LM forward with logits, batches in input order);
- ``index``: exact ``IndexFlatL2``, the stage's IVF-PQ, and IVF-PQ + exact refine: build time,
  bytes per key (``serialize_index`` size / ntotal), queries/s and recall@k against exact search
  at the stage's largest k, on held-out queries (valid keys);
- ``perplexity``: valid kNN-LM perplexity per λ with each index (``evaluate_knnlm`` with the
  stage's exact-distance setting) and the approximate − exact difference.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from statistics import median

import faiss
import numpy as np
import torch

from beyondlm.config import load_section, read_params, section
from beyondlm.sft import sft_config
from beyondlm.data.config import PrepareConfig, prepared_data
from beyondlm.data.prepare import load_split, prepare
from beyondlm.lookup import build_datastore, build_index, datastore_keys, evaluate_knnlm, forward_keys
from beyondlm.lookup import load_datastore, recall_at_k
from beyondlm.lookup.datastore import DatastoreConfig
from beyondlm.lookup.knnlm import KnnlmConfig
from beyondlm.models import build_model, load_model

TARGET_KEYS_PER_MIN = 1_000_000
TARGET_RECALL = 0.9
FALLBACK_STEPS = 100  # MLE steps for the stand-in model when models/sft/mle-s0 is absent
PREVIOUS_BATCH = 64  # the datastore batch size before sorted batches made larger ones pay


def load_source(root: Path, params: dict, model_dir: str) -> tuple:
    """(model, train seqs, valid seqs, source description). Prepared ``input_ids`` already start
    with BOS (``beyondlm.data.prepare``), so they are used as they are."""
    data_dir = root / prepared_data(params).data_dir
    if all((data_dir / f"{s}.parquet").exists() for s in ("train", "valid")):
        from transformers import AutoTokenizer

        train, valid = (list(load_split(data_dir, s)["input_ids"]) for s in ("train", "valid"))
        tok, data = AutoTokenizer.from_pretrained(data_dir / "tokenizer"), str(prepared_data(params).data_dir)
    else:
        prepared = prepare(load_section(PrepareConfig, section(params, "prepare"), "prepare"))
        train, valid = (list(prepared.splits[s]["input_ids"]) for s in ("train", "valid"))
        tok, data = prepared.tokenizer, "prepare(params.yaml) in memory: data/prepared absent"
    if (root / model_dir / "config.json").exists():
        return load_model(root / model_dir), train, valid, {"model": model_dir, "data": data}
    model = _stand_in_model(params, tok, train)
    return model, train, valid, {"model": f"{model_dir} absent: sft.model config, {FALLBACK_STEPS} MLE steps "
                                 "here (sft@mle-s0 settings otherwise)", "data": data}


def _stand_in_model(params: dict, tok, train: list) -> torch.nn.Module:
    from beyondlm.logprobs import pad_batch
    from beyondlm.sft import make_loss_fn
    from beyondlm.training import train_loop

    cfg = sft_config(section(params, "sft"), "mle", 0)
    cfg = replace(cfg, train=replace(cfg.train, max_steps=FALLBACK_STEPS, ckpt_every=0,
                                     warmup_steps=min(cfg.train.warmup_steps, FALLBACK_STEPS)))
    torch.manual_seed(cfg.train.seed)

    def collate(rows):
        ids, mask = pad_batch(rows, tok.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask}

    model, _ = train_loop(build_model(cfg.model, tok), train, make_loss_fn(cfg), cfg.train, collate=collate)
    return model.eval()


# ----------------------------------------------------------------------------- datastore build
def build_rates(model, train: list, cfg: DatastoreConfig, out: Path, rounds: int, previous_seqs: int) -> dict:
    """keys/s of ``build_datastore`` on the whole split (the headline); of the same length-sorted
    forward passes with nothing written (the floor: ``write_share`` = the rest of the build); and,
    on the first ``previous_seqs`` texts (it is slow), of the full LM forward with logits in input
    order at batch size 64 (``previous_path``: the build before it stopped at the key module and
    sorted by length; its memmap writes not counted, so ``build_over_previous`` is a lower bound)."""
    floor_seqs = sorted(train, key=len, reverse=True)
    previous_seqs = train[:previous_seqs]
    bs = cfg.batch_size

    def build():
        build_datastore(model, train, out, batch_size=bs, chunk_tokens=cfg.chunk_tokens, resume=False)

    def floor():
        for lo in range(0, len(floor_seqs), bs):
            datastore_keys(model, floor_seqs[lo : lo + bs])

    def previous():
        for lo in range(0, len(previous_seqs), PREVIOUS_BATCH):
            forward_keys(model, previous_seqs[lo : lo + PREVIOUS_BATCH])[1].numpy().astype(np.float16)

    runs = {"build": (build, train), "forward_only": (floor, floor_seqs), "previous_path": (previous, previous_seqs)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):  # interleaved, so drifting machine load hits all alike
        for name, (fn, _) in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    n_keys = {name: sum(max(len(s) - 1, 0) for s in seqs) for name, (_, seqs) in runs.items()}
    rate = {name: n_keys[name] / median(t) for name, t in times.items()}
    return {
        "n_keys": n_keys["build"], "n_seqs": len(train), "batch_size": bs, "chunk_tokens": cfg.chunk_tokens,
        "keys_per_s": rate["build"], "keys_per_min": 60 * rate["build"],
        "profile": {
            "forward_only_keys_per_s": rate["forward_only"],
            "write_share": 1 - rate["build"] / rate["forward_only"],  # build time outside the forward passes
            "previous_path_keys_per_s": rate["previous_path"], "previous_path_n_keys": n_keys["previous_path"],
            "previous_path_batch_size": PREVIOUS_BATCH,
            "build_over_previous": rate["build"] / rate["previous_path"],
        },
        "seconds": times,
    }


# ----------------------------------------------------------------------------- indexes
def index_variants(cfg: KnnlmConfig) -> dict[str, dict]:
    """Exact search and the stage's IVF-PQ, without and with exact re-ranking."""
    ivf = {k: v for k, v in vars(cfg.index).items() if k not in ("kind", "refine")}
    return {"flat": {"kind": "flat", "threads": cfg.index.threads},
            "ivfpq": {**ivf, "kind": "ivfpq", "refine": False},
            "ivfpq_refine": {**ivf, "kind": "ivfpq", "refine": True}}


def index_bench(keys: np.ndarray, queries: np.ndarray, cfg: KnnlmConfig, rounds: int) -> tuple[dict, dict]:
    """Per index: build seconds, bytes/key, and at the stage's largest k (the k of the stage's
    recall metric): queries/s (median of ``rounds`` interleaved searches of all queries at once)
    and recall@k vs flat (each recall costs one more exact search, so one k only)."""
    indexes, out = {}, {}
    for name, kw in index_variants(cfg).items():
        t0 = time.perf_counter()
        indexes[name] = index = build_index(keys, **kw)
        out[name] = {"params": kw, "build_s": time.perf_counter() - t0,
                     "bytes_per_key": faiss.serialize_index(index).size / index.ntotal}
    k = max(cfg.k)
    times: dict[str, list[float]] = {name: [] for name in indexes}
    for _ in range(rounds):
        for name, index in indexes.items():
            t0 = time.perf_counter()
            index.search(queries, k)
            times[name].append(time.perf_counter() - t0)
    for name, index in indexes.items():
        out[name][f"queries_per_s@{k}"] = len(queries) / median(times[name])
        if name != "flat":
            out[name][f"recall@{k}"] = recall_at_k(index, indexes["flat"], queries, k)
    return out, indexes


def held_out_queries(model, valid: list, n: int) -> np.ndarray:
    """Keys of the first valid texts, (n, D) fp32: what the knnlm stage queries with."""
    parts, have = [], 0
    for lo in range(0, len(valid), 64):
        parts.append(forward_keys(model, valid[lo : lo + 64])[1].numpy())
        have += len(parts[-1])
        if have >= n:
            break
    return np.ascontiguousarray(np.concatenate(parts)[:n], dtype=np.float32)


def perplexities(model, indexes: dict, store, valid: list, cfg: KnnlmConfig) -> dict:
    """Valid kNN-LM perplexity per index and λ at the stage's largest k (the flat search over
    every valid token is the costly part); ``delta_vs_exact``: approximate − exact."""
    k = max(cfg.k)
    out: dict = {"n_texts": len(valid), "k": k, "lambdas": cfg.lambdas, "exact_distances": cfg.exact_distances}
    for name, index in indexes.items():
        t0 = time.perf_counter()
        res = evaluate_knnlm(model, index, store.values, valid, lambdas=cfg.lambdas, k=k,
                             temperature=cfg.temperature, batch_size=cfg.batch_size,
                             exact_keys=store.keys if cfg.exact_distances else None)
        out["n_tokens"] = res["n_tokens"]
        out[name] = {"ppl": {str(lam): v for lam, v in res["perplexity"].items()},
                     "knn_hit_rate": res["knn_hit_rate"],
                     "tokens_per_s": res["n_tokens"] / (time.perf_counter() - t0)}
        if name != "flat":
            exact = out["flat"]["ppl"]
            out[name]["delta_vs_exact"] = {lam: v - exact[lam] for lam, v in out[name]["ppl"].items()}
    return out


# ----------------------------------------------------------------------------- all together
def knnlm_bench(root: Path, *, rounds: int = 3, n_queries: int | None = None, n_eval: int = 300,
                previous_seqs: int = 1000) -> dict:
    start, load_start = time.perf_counter(), os.getloadavg()
    params = read_params(root / "params.yaml")
    ds_cfg = load_section(DatastoreConfig, section(params, "datastore"), "datastore")
    cfg = load_section(KnnlmConfig, section(params, "knnlm"), "knnlm")
    model, train, valid, source = load_source(root, params, ds_cfg.model)
    if ds_cfg.max_seqs:
        train = train[: ds_cfg.max_seqs]
    with tempfile.TemporaryDirectory() as tmp:
        build = build_rates(model, train, ds_cfg, Path(tmp) / "ds", rounds, previous_seqs)
        store = load_datastore(Path(tmp) / "ds")
        queries = held_out_queries(model, valid, n_queries or cfg.recall_queries)
        index, indexes = index_bench(store.keys, queries, cfg, rounds)
        ppl = perplexities(model, indexes, store, valid[:n_eval], cfg)
        dim = store.info.dim
        del store, indexes  # the memmaps close before the directory goes
    k_max = str(max(cfg.k))
    recall = index["ivfpq_refine"][f"recall@{k_max}"]
    return {
        "source": source, "n_queries": len(queries), "rounds": rounds,
        "datastore": {**build, "bytes_per_key": {"key_fp16": 2 * dim, "value_int32": 4, "total": 2 * dim + 4}},
        "index": index, "perplexity": ppl,
        "targets": {
            "build_keys_per_min": {"target": TARGET_KEYS_PER_MIN, "value": build["keys_per_min"],
                                   "met": build["keys_per_min"] >= TARGET_KEYS_PER_MIN},
            f"recall@{k_max}/ivfpq_refine": {"target": TARGET_RECALL, "value": recall, "met": recall >= TARGET_RECALL},
        },
        "load_average": {"start": load_start, "end": os.getloadavg()},  # 1/5/15-min: other jobs' share
        "bench_seconds": time.perf_counter() - start,
    }
