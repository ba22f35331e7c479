"""GRF experiment: fine-tune the SFT model with the graph look-up (beyondlm.lookup.grf), then
compare it with the LM it started from on the test split.

Config: params section ``grf`` (:class:`GRFConfig`); the prompt is the first
``prepare.prompt_len`` tokens of each text (the project's prompt convention, ``make_prompts``),
so only texts with at least one token after it are used, and only continuation tokens scored.

Estimators (test split, both models on the same texts and tokens):
- perplexity over continuation tokens of the start LM, of the fine-tuned LM alone (gate forced
  to 0: what fine-tuning did without the graph) and of GRF;
- forward KL(p_d‖p) per token = Σ_x (log p_d(x) − log p(x)) / Σ_x |x| over whole texts (every
  token after BOS, EOS included; ``evaluation.exact_metrics``' ratio estimator): the prompt's
  tokens are scored by each model's own LM (GRF only looks up after the prompt);
- samples: one completion per test prompt from each model (ancestral, T = 1, the same loop),
  prompt + completion scored by the exact log p_d: impossible rate, and standardised to the
  data's lengths (``metrics.impossible_at_data_lengths``);
- the gate: its mean over scored test positions, per target word class (content vs function
  words, ``gate.target_groups``), and how often y_t is a concept P_c can produce;
- decoding wall time per generated token of both (in ``wall_s``: timings stay out of the
  tracked JSON; ``make bench`` measures the ratio properly).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from beyondlm.config import ConfigError, TrainConfig, check_choice, check_param, check_range
from beyondlm.graph import ConceptGraph
from beyondlm.logprobs import pad_batch, token_logps
from beyondlm.lookup.gate import target_groups
from beyondlm.lookup.grf import GROUNDED, GRF, Grounder, generate, graph_batch, grf_loss, position_scores
from beyondlm.metrics import impossible_at_data_lengths, ratio_estimate
from beyondlm.training import heldout_loss, train_loop


@dataclass(frozen=True)
class GRFConfig:
    """``grf``: the graph look-up model, its fine-tuning from an SFT model, and its evaluation."""

    graph: str = "data/graph"  # the graph stage's output
    model: str = "models/sft/mle-s0"  # the LM to start from (and compare with)
    gamma: float = 0.5  # γ: decay of a node's score along a path (paper: 0.5)
    hops: int = 2  # H: hops of expansion and of propagation (paper: 2)
    max_per_hop: int = 100  # new nodes per hop (paper: 100)
    max_in_edges: int = 5  # in-edges kept per node, the strongest (multigen: 5; 0 = all)
    max_triples: int = 800  # edges kept per subgraph (multigen: 800; 0 = all)
    gnn_layers: int = 2  # CompGCN layers
    grounded: str = "exclude"  # hop-0 nodes in P_c: exclude (multigen) | keep
    alpha: float = 0.1  # weight of the gate BCE (multigen: 1)
    learn_scale: bool = False  # P_c = softmax(κ·score) with a learned κ (paper: κ = 1)
    train_lm: bool = False  # fine-tune the LM too (multigen: yes); False: only the graph modules and gate learn
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=3e-3, batch_size=32, max_steps=120,
                                                                    warmup_steps=10, ckpt_every=40))
    max_train: int = 0  # training texts (0 = all)
    max_valid: int = 128  # held-out texts for the convergence curve
    max_test: int = 1000  # test texts (0 = all)
    n_samples: int = 128  # test prompts sampled from (one completion each, per model)
    batch_size: int = 64  # evaluation and sampling

    def __post_init__(self) -> None:
        check_param("grf.gamma", 0.0 <= self.gamma <= 1.0, self.gamma, "must be in [0, 1] (paper: 0.5)")
        check_range("grf.hops", self.hops, 1, 8)
        check_range("grf.max_per_hop", self.max_per_hop, 1, 10**6)
        check_range("grf.max_in_edges", self.max_in_edges, 0, 10**6)
        check_range("grf.max_triples", self.max_triples, 0, 10**9)
        check_range("grf.gnn_layers", self.gnn_layers, 0, 8)
        check_choice("grf.grounded", self.grounded, GROUNDED)
        check_param("grf.alpha", self.alpha >= 0, self.alpha, "must be >= 0 (0 = no gate loss)")
        check_param("grf.seeds", bool(self.seeds) and all(isinstance(s, int) and s >= 0 for s in self.seeds),
                    self.seeds, "a non-empty list of integers >= 0")
        for key, lo in (("max_train", 0), ("max_valid", 1), ("max_test", 0), ("n_samples", 1), ("batch_size", 1)):
            check_range(f"grf.{key}", getattr(self, key), lo, 10**9)

    def check_seed(self, seed: int) -> None:
        check_param("--seed", seed in self.seeds, seed, f"one of grf.seeds={self.seeds}")


# ----------------------------------------------------------------------------- data
def with_continuation(seqs: Sequence[Sequence[int]], prompt_len: int) -> list[list[int]]:
    """``[BOS] x`` texts with at least one token after the prompt (BOS + prompt_len tokens)."""
    return [list(s) for s in seqs if len(s) > prompt_len + 1]


def collate_fn(grounder: Grounder, node_tokens: np.ndarray, prompt_len: int, pad_id: int):
    def collate(rows):
        ids, mask = pad_batch(rows, pad_id)
        gb = graph_batch([grounder(r[1 : prompt_len + 1]) for r in rows], node_tokens)
        return {"input_ids": ids, "attention_mask": mask, **{f"g_{k}": getattr(gb, k) for k in gb.__dataclass_fields__}}

    return collate


def _np(t: torch.Tensor) -> np.ndarray:
    """A tensor on whichever device the model is, as NumPy."""
    return t.detach().cpu().numpy()


def _graph_batch(batch):
    from beyondlm.lookup.grf import GraphBatch

    return GraphBatch(**{k[2:]: v for k, v in batch.items() if k.startswith("g_")})


def loss_fn(alpha: float, prompt_len: int):
    """``train_loop`` loss: Σ [−log P(y_t) + α·BCE] over continuation tokens, and their count."""
    def fn(model, batch):
        sc = position_scores(model, batch["input_ids"], batch["attention_mask"], _graph_batch(batch), prompt_len)
        loss, _, _ = grf_loss(sc["mix"], sc["gate"], sc["in_graph"], sc["mask"], alpha=alpha)
        return loss, sc["mask"].sum()

    return fn


# ----------------------------------------------------------------------------- scoring
@torch.no_grad()
def score_texts(model: GRF, seqs: list[list[int]], collate, prompt_len: int, batch_size: int) -> dict[str, np.ndarray]:
    """Per text: Σ log P_LM over prompt tokens (``prompt``), and over continuation tokens Σ log P_LM
    (``lm``), Σ log P (``mix``), token count (``n``); per scored position (flat, text order):
    gate g, target, c_t."""
    model.eval()
    device = next(model.parameters()).device
    out = {k: np.zeros(len(seqs)) for k in ("prompt", "lm", "mix", "n")}
    flat: dict[str, list] = {"gate": [], "label": [], "in_graph": []}
    for lo in range(0, len(seqs), batch_size):
        batch = {k: v.to(device) for k, v in collate(seqs[lo : lo + batch_size]).items()}
        ids, attn = batch["input_ids"], batch["attention_mask"]
        sc = position_scores(model, ids, attn, _graph_batch(batch), prompt_len)
        logits = model.lm(input_ids=ids[:, : prompt_len + 1]).logits[:, :-1].float()  # prompt positions
        pl = logits.log_softmax(-1).gather(2, ids[:, 1 : prompt_len + 1, None])[..., 0]  # (B, P)
        m = sc["mask"]
        idx = slice(lo, lo + len(ids))
        out["prompt"][idx] = _np(pl.double().sum(1))
        out["lm"][idx] = _np(torch.where(m, sc["lm"], 0.0).double().sum(1))
        out["mix"][idx] = _np(torch.where(m, sc["mix"], 0.0).double().sum(1))
        out["n"][idx] = _np(m.sum(1))
        flat["gate"].append(_np(torch.sigmoid(sc["gate"])[m]))
        flat["label"].append(_np(ids[:, prompt_len + 1 :][m]))
        flat["in_graph"].append(_np(sc["in_graph"][m]))
    return {**out, **{k: np.concatenate(v) for k, v in flat.items()}}


@torch.no_grad()
def score_lm(lm, seqs: list[list[int]], prompt_len: int, pad_id: int, batch_size: int) -> dict[str, np.ndarray]:
    """:func:`score_texts`' ``prompt``, ``lm`` (= ``mix``) and ``n`` for a plain LM (no graph)."""
    lm.eval()
    device = next(lm.parameters()).device
    out = {k: np.zeros(len(seqs)) for k in ("prompt", "lm", "n")}
    for lo in range(0, len(seqs), batch_size):
        ids, attn = (t.to(device) for t in pad_batch(seqs[lo : lo + batch_size], pad_id))
        lp = token_logps(lm(input_ids=ids, attention_mask=attn).logits[:, :-1], ids[:, 1:])  # (B, L−1)
        m = attn[:, 1:].bool()
        idx = slice(lo, lo + len(ids))
        out["prompt"][idx] = _np(lp[:, :prompt_len].double().sum(1))
        out["lm"][idx] = _np(torch.where(m[:, prompt_len:], lp[:, prompt_len:], 0.0).double().sum(1))
        out["n"][idx] = _np(m[:, prompt_len:].sum(1))
    return {**out, "mix": out["lm"]}


def perplexities(start: dict, tuned: dict) -> dict:
    """Continuation perplexity of the start LM, the fine-tuned LM (gate 0) and GRF."""
    n = start["n"].sum()
    ppl = lambda s: float(np.exp(-s.sum() / n))  # noqa: E731
    return {"lm": ppl(start["lm"]), "lm_finetuned": ppl(tuned["lm"]), "grf": ppl(tuned["mix"]), "n_tokens": int(n)}


def forward_kls(logp_data: np.ndarray, lengths: np.ndarray, start: dict, tuned: dict) -> dict:
    """Forward KL per token (± SE) of the start LM and GRF against p_d, over whole texts."""
    out = {}
    for name, lp in (("lm", start["prompt"] + start["lm"]), ("grf", tuned["prompt"] + tuned["mix"])):
        out.update(ratio_estimate(logp_data - lp, lengths).to_dict(f"{name}/forward_kl_per_token"))
    return out


def gate_stats(scores: dict, groups: dict[str, np.ndarray]) -> dict:
    """Mean gate over scored positions, per target group, and the share of targets P_c can produce."""
    g, y = scores["gate"], scores["label"]
    out = {"mean": float(g.mean()), "in_graph_frac": float(scores["in_graph"].mean()),
           "mean_in_graph": float(g[scores["in_graph"]].mean()) if scores["in_graph"].any() else None,
           "quantiles": {str(q): float(np.quantile(g, q)) for q in (0.1, 0.5, 0.9)}}
    for name, mask in groups.items():
        sel = mask[y]
        out[f"n_{name}"] = int(sel.sum())
        out[name] = float(g[sel].mean()) if sel.any() else None
    return out


def sample_stats(model: GRF, prompts: list[list[int]], collate, *, graph: bool, max_new: int, eos: int,
                 batch_size: int, seed: int, language, data_lengths: np.ndarray) -> dict:
    """One completion per prompt (GRF's mixture, or the LM alone); impossible rates; s/token."""
    gen = torch.Generator().manual_seed(seed)
    texts, t0 = [], time.perf_counter()
    for lo in range(0, len(prompts), batch_size):
        rows = prompts[lo : lo + batch_size]
        gb = None
        if graph:
            batch = collate(rows)
            gb = _graph_batch(batch)
        texts += [p[1:] + c for p, c in zip(rows, generate(model, torch.tensor(rows), gb, max_new_tokens=max_new,
                                                           eos_id=eos, generator=gen))]
    wall = time.perf_counter() - t0
    n_new = sum(len(t) for t in texts) - sum(len(p) - 1 for p in prompts)
    out: dict = {"n": len(texts), "mean_length": float(np.mean([len(t) for t in texts])),
                 "wall_s": {"per_token": wall / max(n_new, 1)}}
    if language is not None:
        bad = ~np.isfinite(language.log_prob(texts))
        out["impossible_frac"] = float(bad.mean())
        out.update(impossible_at_data_lengths([len(t) for t in texts], bad, data_lengths))
    return out


# ----------------------------------------------------------------------------- the run
def grounder_for(cfg: GRFConfig, graph: ConceptGraph, vocab_size: int) -> Grounder:
    """The section's grounding: ``hops`` hops of ≤ ``max_per_hop`` nodes, pruned edges."""
    return Grounder(graph, vocab_size, hops=cfg.hops, max_per_hop=cfg.max_per_hop,
                    max_in_edges=cfg.max_in_edges, max_triples=cfg.max_triples)


def build(cfg: GRFConfig, lm, graph: ConceptGraph, seed: int) -> GRF:
    return GRF(lm, graph, gamma=cfg.gamma, hops=cfg.hops, gnn_layers=cfg.gnn_layers, grounded=cfg.grounded,
               learn_scale=cfg.learn_scale, seed=seed)


def run_grf(cfg: GRFConfig, seed: int, *, graph: ConceptGraph, lm, start_lm, splits: dict, prompts: list[list[int]],
            prompt_len: int, max_len: int, eos: int, pad: int, language=None, ckpt_dir: Path | None = None,
            live_dir: Path | None = None) -> tuple[GRF, dict]:
    """Train GRF from ``lm`` (a copy of the start model), evaluate both; (model, metrics).
    ``splits``: {train, valid, test: [BOS] x id lists}, ``splits["logp_data"]``: test log p_d or None."""
    t0 = time.perf_counter()
    vocab = lm.get_input_embeddings().num_embeddings
    grounder = grounder_for(cfg, graph, vocab)
    collate = collate_fn(grounder, graph.tokens, prompt_len, pad)
    train = with_continuation(splits["train"], prompt_len)[: cfg.max_train or None]
    valid = with_continuation(splits["valid"], prompt_len)[: cfg.max_valid]
    keep = [len(s) > prompt_len + 1 for s in splits["test"]]
    test = [list(s) for s, k in zip(splits["test"], keep) if k][: cfg.max_test or None]
    torch.manual_seed(seed)
    model = build(cfg, lm, graph, seed)
    model.lm.requires_grad_(cfg.train_lm)  # the optimizer takes only parameters that require grad
    tcfg = replace(cfg.train, seed=seed)
    fn = loss_fn(cfg.alpha, prompt_len)
    model, loop = train_loop(model, train, fn, tcfg, collate=collate, units=[len(s) - 1 - prompt_len for s in train],
                             validate=heldout_loss(fn, valid, collate, batch_size=cfg.batch_size),
                             ckpt_dir=ckpt_dir, live_dir=live_dir, desc=f"grf s{seed}",
                             fingerprint={"grf": asdict(cfg), "seed": seed, "n_train": len(train)})
    model.eval()
    t_train = time.perf_counter()
    start = build(cfg, start_lm, graph, seed).eval()  # the start LM (its graph parts unused: it samples with gb=None)
    s_start = score_lm(start_lm, test, prompt_len, pad, cfg.batch_size)
    s_tuned = score_texts(model, test, collate, prompt_len, cfg.batch_size)
    lengths = np.array([len(s) - 1 for s in test], dtype=np.float64)
    metrics: dict = {"seed": seed, "converged": bool(loop.convergence["converged"]), "convergence": loop.convergence,
                     "train": asdict(loop), "n_train": len(train), "n_test": len(test), "prompt_len": prompt_len,
                     "test": perplexities(s_start, s_tuned),
                     "subgraph": subgraph_sizes(grounder, test, prompt_len)}
    if splits.get("logp_data") is not None:
        logp_d = np.asarray([lp for lp, k in zip(splits["logp_data"], keep) if k][: len(test)], dtype=np.float64)
        metrics["test"].update(forward_kls(logp_d, lengths, s_start, s_tuned))
    groups = target_groups(language, np.concatenate([np.asarray(s) for s in train]), vocab)
    metrics["gate"] = {"groups_by": groups[0], **gate_stats(s_tuned, groups[1])}
    prompts = prompts[: cfg.n_samples]
    common = dict(max_new=max_len - prompt_len, eos=eos, batch_size=cfg.batch_size, seed=seed, language=language,
                  data_lengths=lengths)
    metrics["samples"] = {"lm": sample_stats(start, prompts, collate, graph=False, **common),
                          "grf": sample_stats(model, prompts, collate, graph=True, **common)}
    metrics["wall_s"] = {"train": t_train - t0, "evaluate": time.perf_counter() - t_train}
    return model, metrics


def subgraph_sizes(grounder: Grounder, seqs: list[list[int]], prompt_len: int) -> dict:
    """Mean grounded nodes, nodes and edges of the test prompts' subgraphs."""
    subs = [grounder(s[1 : prompt_len + 1]) for s in seqs]
    return {"grounded": float(np.mean([(s.hop == 0).sum() for s in subs])),
            "nodes": float(np.mean([len(s.nodes) for s in subs])),
            "edges": float(np.mean([len(s.src) for s in subs])),
            "empty_frac": float(np.mean([len(s.nodes) == 0 for s in subs]))}


def check_model(path: str, vocab_size: int) -> None:
    if not (Path(path) / "config.json").exists():
        raise ConfigError(f"params.yaml: 'grf.model'={path!r} is not a model directory: run its sft stage "
                          "first (dvc repro sft@mle-0) or point grf.model at one")
