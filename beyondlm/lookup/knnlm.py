"""kNN-LM: nearest-neighbour retrieval over the datastore, p_kNN, interpolation, evaluation.

Khandelwal et al., "Generalization through Memorization: Nearest Neighbor Language Models"
(ICLR 2020), Eq. (1)–(2):

    p_kNN(y | x) ∝ Σ_{(k_i, v_i) ∈ N(x)} 1[y = v_i] · exp(−d(k_i, f(x)) / τ)
    p(y | x)     = λ · p_kNN(y | x) + (1 − λ) · p_LM(y | x)

with N(x) the k nearest keys to the query f(x) under squared L2 distance d (what faiss returns),
τ = 1 in the paper. The authors' faiss setup: IndexIVFPQ (nlist 4096, M 64, 8 bits, trained on
1M keys), nprobe 32, k = 1024, distances recomputed exactly from the stored keys (approximate PQ
distances cost 0.4–1.7 perplexity). Here exact distances come either from ``refine`` (an
``IndexRefineFlat`` that re-ranks ``k_factor × k`` PQ candidates against fp32 keys) or from
``exact_keys`` in :func:`evaluate_knnlm` (the fp16 datastore keys of the retrieved ids).

Trap (TRAPS.md): IVF-PQ recall on random vectors is ~8%; measure it on real keys (recall_at_k).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from beyondlm.config import ConfigError, check_choice, check_param, check_range
from beyondlm.inputs import read_faiss_index, restore_fix
from beyondlm.io import atomic_path
from beyondlm.lookup.datastore import forward_keys
from beyondlm.lookup.gate import GateConfig, TokenScores, token_scores

INDEX_KINDS = ("flat", "ivfpq")


# ----------------------------------------------------------------------------- index
def _fp32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def build_index(keys: np.ndarray, *, kind: str = "flat", nlist: int = 1024, m: int = 8, nbits: int = 8,
                train_size: int = 100_000, seed: int = 0, refine: bool = False, k_factor: int = 4,
                nprobe: int = 8, add_batch: int = 65536, threads: int | None = None) -> faiss.Index:
    """A faiss index over ``keys`` (N, D) (fp16 memmap is fine: added in fp32 batches).

    ``flat``: exact ``IndexFlatL2``. ``ivfpq``: ``IndexIVFPQ(nlist, m sub-quantizers × nbits)``
    trained on ``train_size`` keys sampled with ``seed``, searched with ``nprobe`` lists.
    ``refine`` wraps either in ``IndexRefineFlat``: the base proposes ``k_factor × k`` candidates,
    re-ranked by exact L2 (costs an fp32 copy of the keys, N·D·4 bytes).
    ``threads``: faiss OpenMP threads while building (None = faiss's default). Trap: after a torch
    forward pass in the same process, torch's OpenMP workers spin and faiss's k-means with as
    many threads as cores ran 17× slower on 2 cores (5.3 s vs 0.32 s); threads=1 or
    OMP_WAIT_POLICY=PASSIVE avoids it.
    """
    with _faiss_threads(threads):
        return _build_index(keys, kind, nlist, m, nbits, train_size, seed, refine, k_factor, nprobe, add_batch)


@contextlib.contextmanager
def _faiss_threads(n: int | None):
    before = faiss.omp_get_max_threads()
    if n is not None:
        faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _build_index(keys, kind, nlist, m, nbits, train_size, seed, refine, k_factor, nprobe, add_batch):
    if kind not in INDEX_KINDS:
        raise ConfigError(f"knnlm index kind {kind!r} is not one of {', '.join(INDEX_KINDS)}")
    n, dim = keys.shape
    if kind == "flat":
        index = faiss.IndexFlatL2(dim)
    else:
        if dim % m:
            raise ConfigError(f"knnlm: m={m} sub-quantizers must divide the key dimension {dim}")
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, nlist, m, nbits)
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(train_size, n), replace=False))  # sorted: memmap-friendly
        index.cp.seed = index.pq.cp.seed = seed
        index.train(_fp32(keys[sample]))
    if refine:
        index = faiss.IndexRefineFlat(index)
    for lo in range(0, n, add_batch):
        index.add(_fp32(keys[lo : lo + add_batch]))
    set_search_params(index, nprobe=nprobe, k_factor=k_factor)
    return index


def set_search_params(index: faiss.Index, *, nprobe: int | None = None, k_factor: int | None = None) -> None:
    """``nprobe`` of an IVF index (also inside a refine wrapper) and ``k_factor`` of a refine one."""
    base = faiss.downcast_index(index.base_index) if isinstance(index, faiss.IndexRefine) else index
    if nprobe is not None and isinstance(faiss.downcast_index(base), faiss.IndexIVF):
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    if k_factor is not None and isinstance(index, faiss.IndexRefine):
        index.k_factor = float(k_factor)


def save_index(index: faiss.Index, path: str | Path) -> None:
    """``faiss.write_index`` to a temporary sibling, renamed into place (atomic)."""
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def load_index(path: str | Path) -> faiss.Index:
    return read_faiss_index(path, restore_fix(path, "knnlm"))


def recall_at_k(index: faiss.Index, exact_index: faiss.Index, queries: np.ndarray, k: int) -> float:
    """Fraction of the exact top-k neighbours that ``index`` returns, averaged over queries (B, D).

    Tie-aware: a returned id counts if its exact distance is ≤ the exact k-th distance, so among
    keys at equal distance (identical contexts give identical keys) any choice is correct; with no
    ties this is |approx ∩ exact| / k. ``exact_index`` must be flat (used to reconstruct keys).
    """
    q = _fp32(queries)
    d_exact, _ = exact_index.search(q, k)  # (B, k) ascending squared L2
    _, ids = index.search(q, k)  # (B, k); -1 = no result
    vecs = exact_index.reconstruct_batch(np.clip(ids, 0, None).ravel()).reshape(*ids.shape, -1)  # (B, k, D)
    d_true = ((vecs - q[:, None, :]) ** 2).sum(-1)  # (B, k)
    kth = d_exact[:, -1:]  # (B, 1)
    hit = (ids >= 0) & (d_true <= kth + 1e-4 * np.abs(kth) + 1e-5)
    return float(np.minimum(hit.sum(1), k).mean() / k)


# ----------------------------------------------------------------------------- p_kNN and mixing
def knn_logprobs(distances: Tensor, values: Tensor, vocab_size: int, temperature: float = 1.0) -> Tensor:
    """log p_kNN (B, V) from neighbour distances (B, k) (squared L2) and their tokens (B, k).

    log p_kNN(y) = log Σ_{i: v_i = y} softmax_i(−d_i / τ), computed as a scatter-logsumexp (per-token
    max, then a sum of exp shifted by it) so far neighbours do not underflow; tokens with no
    neighbour get −inf. A distance of +inf (faiss "no result") gives a neighbour weight 0.
    """
    logw = torch.log_softmax(-distances.double() / temperature, dim=-1)  # (B, k)
    idx = values.long()
    peak = torch.full((logw.shape[0], vocab_size), -math.inf, dtype=logw.dtype, device=logw.device)
    peak = peak.scatter_reduce(1, idx, logw, reduce="amax")  # (B, V) max log-weight per token
    shift = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.zeros_like(peak).scatter_add(1, idx, torch.exp(logw - shift.gather(1, idx)))
    return (shift + torch.log(total)).to(distances.dtype if distances.is_floating_point() else torch.float32)


def interpolate(lm_logp: Tensor, knn_logp: Tensor, lam: float) -> Tensor:
    """log(λ·p_kNN + (1 − λ)·p_LM) (B, V), in log space; λ = 0 returns ``lm_logp`` itself, λ = 1
    ``knn_logp`` (exact limit cases, Eq. 2 of Khandelwal et al. 2020)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"kNN-LM λ={lam} must be in [0, 1]")
    if lam == 0.0:
        return lm_logp
    if lam == 1.0:
        return knn_logp
    return torch.logaddexp(knn_logp + math.log(lam), lm_logp + math.log1p(-lam))


# ----------------------------------------------------------------------------- evaluation
def exact_distances(queries: np.ndarray, keys: np.ndarray, ids: np.ndarray, *,
                    max_floats: int = 2**26) -> np.ndarray:
    """Squared L2 (n, k) between queries (n, D) and ``keys[ids]`` (stored fp16 keys, in fp32);
    +inf where ids = −1. Rows go in blocks of ≤ ``max_floats`` gathered floats (256 MB: k = 1024
    neighbours of 1024-d keys would otherwise need n·4 MB); unique sorted ids are read once a block."""
    n, k = ids.shape
    out = np.empty((n, k), dtype=np.float32)
    step = max(1, max_floats // (k * keys.shape[1]))
    for lo in range(0, n, step):
        block = np.clip(ids[lo : lo + step], 0, None)
        uniq, inverse = np.unique(block, return_inverse=True)
        vecs = _fp32(keys[uniq])[inverse.reshape(block.shape)]  # (b, k, D)
        out[lo : lo + step] = ((vecs - queries[lo : lo + step, None, :]) ** 2).sum(-1)
    return np.where(ids >= 0, out, np.inf).astype(np.float32)


def retrieve(index: faiss.Index, values: np.ndarray, queries: Tensor, k: int,
             exact_keys: np.ndarray | None = None) -> tuple[Tensor, Tensor]:
    """Search ``k`` neighbours of queries (n, D) → (distances (n, k) fp32, tokens (n, k) long)."""
    q = _fp32(queries.cpu().numpy())
    dist, ids = index.search(q, k)  # (n, k) each
    if exact_keys is not None:
        dist = exact_distances(q, exact_keys, ids)
    dist = np.where(ids >= 0, dist, np.inf)
    toks = np.asarray(values[np.clip(ids, 0, None).ravel()], dtype=np.int64).reshape(ids.shape)
    return torch.from_numpy(np.ascontiguousarray(dist, dtype=np.float32)), torch.from_numpy(toks)


def evaluate_knnlm(model, index: faiss.Index, values: np.ndarray, seqs: Sequence[Sequence[int]], *,
                   lambdas: Sequence[float], k: int, temperature: float = 1.0, batch_size: int = 32,
                   exact_keys: np.ndarray | None = None, scores: bool = False) -> dict:
    """Per-token log-probs and perplexity of the LM and of kNN-LM for each λ on ``seqs``.

    ``seqs`` are ``[BOS] x_1..x_n``; targets are x_1..x_n. Memory: a batch holds n·V log-probs
    (n = scored tokens in the batch). Returns ``{"n_tokens", "k", "temperature",
    "perplexity": {λ: ppl}, "nll": {λ: mean −log p}, "token_logps": {λ: (n_tokens,) float64},
    "knn_token_logps": (n_tokens,), "knn_hit_rate": fraction of targets among the neighbours}``;
    λ = 0 is the LM itself. ``scores``: also ``"scores"``, the per-position
    :class:`~beyondlm.lookup.gate.TokenScores` (targets, log p_LM(y), log p_kNN(y), gate features)
    from the same retrieval, for fitting a learned λ without querying again.
    """
    lams = [float(x) for x in lambdas]
    parts: dict[float, list[Tensor]] = {lam: [] for lam in lams}
    knn_parts: list[Tensor] = []
    score_parts: list[TokenScores] = []
    hits = 0
    for lo in range(0, len(seqs), batch_size):
        logits, queries, labels, _ = forward_keys(model, seqs[lo : lo + batch_size])
        lm_logp = F.log_softmax(logits, dim=-1)  # (n, V)
        dist, toks = retrieve(index, values, queries, k, exact_keys)  # (n, k) each
        knn_logp = knn_logprobs(dist, toks, lm_logp.shape[-1], temperature)  # (n, V)
        labels, lm_logp = labels.cpu().unsqueeze(1), lm_logp.cpu()  # (n, 1), (n, V)
        if scores:
            score_parts.append(token_scores(lm_logp, knn_logp, dist, toks, labels[:, 0]))
        hits += int((toks == labels).any(1).sum())
        knn_parts.append(knn_logp.gather(1, labels).squeeze(1).double())
        for lam in lams:
            parts[lam].append(interpolate(lm_logp, knn_logp, lam).gather(1, labels).squeeze(1).double())
    token_logps = {lam: torch.cat(p).numpy() for lam, p in parts.items()}
    n_tokens = len(next(iter(token_logps.values()))) if lams else 0
    nll = {lam: float(-lp.mean()) for lam, lp in token_logps.items()}
    out = {
        "n_tokens": n_tokens, "k": k, "temperature": temperature,
        "perplexity": {lam: math.exp(v) for lam, v in nll.items()}, "nll": nll,
        "token_logps": token_logps, "knn_token_logps": torch.cat(knn_parts).numpy(),
        "knn_hit_rate": hits / max(n_tokens, 1),
    }
    if scores:
        out["scores"] = TokenScores.concat(score_parts)
    return out


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class IndexConfig:
    """``knnlm.index``: the faiss index (see :func:`build_index`)."""

    kind: str = "ivfpq"  # flat | ivfpq
    nlist: int = 1024
    m: int = 16  # PQ sub-quantizers; must divide the key dimension
    nbits: int = 8
    train_size: int = 200_000
    seed: int = 0
    refine: bool = True  # exact re-ranking of k_factor × k PQ candidates
    k_factor: int = 4
    nprobe: int = 32
    threads: int | None = None

    def __post_init__(self) -> None:
        check_choice("knnlm.index.kind", self.kind, INDEX_KINDS)
        for key in ("nlist", "m", "train_size", "k_factor", "nprobe"):
            check_range(f"knnlm.index.{key}", getattr(self, key), 1, 10**9)
        check_range("knnlm.index.nbits", self.nbits, 1, 16)


@dataclass(frozen=True)
class KnnlmConfig:
    """``knnlm`` params section: index, and the evaluation grid over k × λ per split."""

    index: IndexConfig = field(default_factory=IndexConfig)
    splits: list[str] = field(default_factory=lambda: ["valid", "test"])
    k: list[int] = field(default_factory=lambda: [8, 64, 256])
    lambdas: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.25, 0.5])
    temperature: float = 1.0
    exact_distances: bool = True  # recompute distances from the stored fp16 keys (paper)
    batch_size: int = 32
    max_eval: int = 0  # sequences per split, 0 = all
    recall_queries: int = 1000  # held-out queries for recall@k vs a flat index (0 = skip)
    gate: GateConfig = field(default_factory=GateConfig)  # learned λ, adaptive retrieval

    def __post_init__(self) -> None:
        for name in self.splits:
            check_choice("knnlm.splits", name, ("train", "valid", "test"))
        for k in self.k:
            check_range("knnlm.k", k, 1, 65536)
        for lam in self.lambdas:
            check_range("knnlm.lambdas", lam, 0.0, 1.0)
        check_range("knnlm.temperature", self.temperature, 1e-6, 1e6)
        check_range("knnlm.batch_size", self.batch_size, 1, 10**6)
        check_param("knnlm.gate.enabled", not self.gate.enabled or {"valid", "test"} <= set(self.splits),
                     self.gate.enabled, f"the gate is fitted on valid and scored on test: knnlm.splits={self.splits} "
                     "must hold both (or set knnlm.gate.enabled: false)")
