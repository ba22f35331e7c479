"""Stage ``knnlm``: faiss index over the datastore, then kNN-LM perplexity per split × k × λ,
and (``knnlm.gate``) a learned λ(x) and adaptive retrieval, fitted on valid and scored on test
at the k chosen on valid, from the same retrievals (beyondlm.lookup.gate).

params: prepare.out_dir, datastore.model, knnlm.* (knnlm.gate.*: enabled, hidden, steps, lr, seed,
        thresholds, ppl_tolerance)
deps:   the model dir (datastore.model), --datastore, ${prepare.out_dir}; code: the import closure of this module (dvc.yaml, `python -m beyondlm.dvcgraph --write`)
outs:   --index (faiss file)
metrics: --metrics ({split: {lm_ppl, k: {λ: ppl}, best}, index: {recall@k, ...},
         gate: {test_ppl: {lm, fixed, learned, adaptive}, adaptive: {τ: {queries_saved, ppl, ...}},
         best_saving, mean_lambda: {gate: {all, <group>...}}, groups_by}})
plots:  --plot (TSV: split, k, lambda, ppl)
"""

import argparse
import time
from pathlib import Path

import numpy as np

from beyondlm import cli
from beyondlm.config import load_section, read_params, section
from beyondlm.data.config import prepared_data
from beyondlm.data.prepare import load_split
from beyondlm.io import write_metrics, write_text
from beyondlm.lookup.datastore import DatastoreConfig, forward_keys, load_datastore
from beyondlm.lookup.gate import TokenScores, evaluate_gates, target_groups
from beyondlm.lookup.knnlm import KnnlmConfig, build_index, evaluate_knnlm, recall_at_k, save_index
from beyondlm.models import load_model


def index_metrics(cfg: KnnlmConfig, index, keys, model, seqs) -> dict:
    """recall@k (max k) of the index vs exact search on held-out queries (TRAPS: measure it)."""
    out = {"n_keys": int(keys.shape[0]), **{f"cfg/{k}": v for k, v in vars(cfg.index).items()}}
    if not cfg.recall_queries or cfg.index.kind == "flat":
        return out
    queries = np.concatenate([forward_keys(model, seqs[i : i + 64])[1].numpy() for i in range(0, len(seqs), 64)])
    queries = queries[: cfg.recall_queries]
    exact = build_index(keys, kind="flat", threads=cfg.index.threads)
    out[f"recall@{max(cfg.k)}"] = recall_at_k(index, exact, queries, max(cfg.k))
    return out


def parser() -> argparse.ArgumentParser:
    """The command line dvc.yaml gives this stage."""
    p = argparse.ArgumentParser(description=__doc__)
    for arg in ("--datastore", "--index", "--metrics", "--plot"):
        p.add_argument(arg, type=Path, required=True)
    return p


def configure(args: argparse.Namespace, params: dict) -> tuple[KnnlmConfig, DatastoreConfig]:
    """Every params check of this stage, before any input is read (also run up front by the flow)."""
    return (load_section(KnnlmConfig, section(params, "knnlm"), "knnlm"),
            load_section(DatastoreConfig, section(params, "datastore"), "datastore"))


def main() -> None:
    args = parser().parse_args()
    params = read_params()
    cfg, store_cfg = configure(args, params)
    model_dir = store_cfg.model
    data = prepared_data(params)
    data_dir = data.data_dir
    store, model = load_datastore(args.datastore), load_model(model_dir)
    start = time.perf_counter()
    icfg = cfg.index
    index = build_index(store.keys, kind=icfg.kind, nlist=icfg.nlist, m=icfg.m, nbits=icfg.nbits,
                        train_size=icfg.train_size, seed=icfg.seed, refine=icfg.refine,
                        k_factor=icfg.k_factor, nprobe=icfg.nprobe, threads=icfg.threads)
    save_index(index, args.index)
    metrics = {"index": {"build_seconds": time.perf_counter() - start}}
    rows = ["split\tk\tlambda\tppl"]
    scores: dict[str, dict[int, TokenScores]] = {}  # split → k → per-position scores (gate only)
    for split in cfg.splits:
        ds = load_split(data_dir, split)
        n = cfg.max_eval or len(ds)
        seqs = [list(s) for s in ds["input_ids"][:n]]  # [BOS] x .. EOS
        logp_data = ds["logp_data"][:n] if "logp_data" in ds.column_names else None  # synthetic: exact
        if split == cfg.splits[0]:
            metrics["index"].update(index_metrics(cfg, index, store.keys, model, seqs))
        metrics[split], scores[split] = split_metrics(cfg, model, index, store, seqs, rows, split, logp_data)
    if cfg.gate.enabled:
        groups = target_groups(data.language(), store.values, model.config.vocab_size)
        metrics["gate"] = gate_metrics(cfg, metrics["valid"]["best"], scores, groups)
    write_metrics(args.metrics, metrics)
    write_text(args.plot, "\n".join(rows) + "\n")


def split_metrics(cfg: KnnlmConfig, model, index, store, seqs, rows: list[str], split: str,
                  logp_data=None) -> tuple[dict, dict[int, TokenScores]]:
    """Perplexity per k and λ on one split; ``best`` is the lowest (tune λ, k on valid only).
    Also the per-position scores per k when the gate is on (else {}).

    With the exact log p_d of the texts (synthetic language; they are draws from p_d), also the
    forward KL(p_d‖p) = mean_x [log p_d(x) − log p(x)] in nats per sequence, every token after
    BOS scored (EOS included), as in ``evaluate``."""
    out: dict = {"k": {}}
    scores: dict[int, TokenScores] = {}
    for k in cfg.k:
        res = evaluate_knnlm(model, index, store.values, seqs, lambdas=cfg.lambdas, k=k,
                             temperature=cfg.temperature, batch_size=cfg.batch_size,
                             exact_keys=store.keys if cfg.exact_distances else None, scores=cfg.gate.enabled)
        if cfg.gate.enabled:
            scores[k] = res["scores"]
        out["k"][str(k)] = {"ppl": {str(lam): v for lam, v in res["perplexity"].items()},
                            "knn_hit_rate": res["knn_hit_rate"]}
        if logp_data is not None:
            out["k"][str(k)]["forward_kl"] = {str(lam): float(np.mean(logp_data) - lp.sum() / len(seqs))
                                              for lam, lp in res["token_logps"].items()}
        out["n_tokens"] = res["n_tokens"]
        rows += [f"{split}\t{k}\t{lam}\t{v:.4f}" for lam, v in res["perplexity"].items()]
    grid = [(v, int(k), float(lam)) for k, r in out["k"].items() for lam, v in r["ppl"].items()]
    ppl, k, lam = min(grid)
    out["best"] = {"ppl": ppl, "k": k, "lambda": lam}
    if logp_data is not None:
        out["best"]["forward_kl"] = out["k"][str(k)]["forward_kl"][str(lam)]
    if 0.0 in [float(x) for x in cfg.lambdas]:
        out["lm_ppl"] = out["k"][str(cfg.k[0])]["ppl"]["0.0"]
        if logp_data is not None:
            out["lm_forward_kl"] = out["k"][str(cfg.k[0])]["forward_kl"]["0.0"]
    return out, scores


def gate_metrics(cfg: KnnlmConfig, best: dict, scores: dict, groups: tuple[str, dict]) -> dict:
    """Learned λ and adaptive retrieval at valid's best (k, λ): fitted on valid, scored on test."""
    k, (by, masks) = best["k"], groups
    out = evaluate_gates(cfg.gate, scores["valid"][k], scores["test"][k], fixed_lambda=best["lambda"], groups=masks)
    return {"k": k, "groups_by": by, **out}


if __name__ == "__main__":
    cli.run(main)
