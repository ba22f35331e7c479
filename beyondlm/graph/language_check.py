"""Which word pairs can the synthetic language produce? Exact, from the supports of its tables.

``producible(language, gap)`` (V, V) bool: P[u, v] is True iff p_d gives positive probability to
a text with u at some position i and v at a position j, 1 ≤ j − i ≤ gap (gap 0: any j > i).
Exact because a text's component c is fixed for the whole text, its slot path is a walk of
trans[c]'s support, and each slot emits independently from emit[c, slot]:

    P[u, v] = OR_c OR_{a, b} emit[c, a, u] > 0 ∧ emit[c, b, v] > 0 ∧ F_c[a, b],
    F_c[a, b] = d_c(a, b) ≤ gap ∧ first_c(a) + d_c(a, b) + end_c(b) ≤ max_len,

d_c(a, b) the fewest steps (≥ 1) from slot a to slot b, first_c(a) the earliest position
(1-based) of slot a, end_c(b) = d_c(b, EOS): the shortest text holding a then b, b at most gap
later, has first_c(a) + d_c(a, b) + end_c(b) tokens (EOS included), and p_d keeps exactly the
texts of at most max_len tokens. Any slot counts (content or not), so the check is about
the tokens a miner sees. Every pair mined from samples of p_d is producible (the text is a
witness): a fraction below 1 on mined edges means a bug; the all-pairs fraction shows how much
the topic / sentiment / slot structure constrains a random pair.
"""

from __future__ import annotations

import numpy as np

from beyondlm.graph.core import SYMMETRIC, ConceptGraph


def _steps(support: np.ndarray, max_steps: int) -> np.ndarray:
    """(G, G) fewest steps ≥ 1 from a to b along ``support`` (G, G) bool; inf beyond max_steps."""
    dist = np.full(support.shape, np.inf)
    reach = support.copy()
    for k in range(1, max_steps + 1):
        dist[reach & np.isinf(dist)] = k
        reach = (reach.astype(np.int64) @ support.astype(np.int64)) > 0
    return dist


def slot_pair_feasible(init: np.ndarray, trans: np.ndarray, max_len: int, gap: int, eos: int) -> np.ndarray:
    """F (G, G) for one component: init (G,), trans (G, G) probabilities."""
    support = trans > 0
    dist = _steps(support, max_len)
    start = np.where(init > 0, 1.0, np.inf)  # (G,) earliest position of each slot
    start = np.minimum(start, (start[:, None] + dist).min(axis=0))
    total = start[:, None] + dist + dist[:, eos][None, :]  # (G, G) shortest text with a then b
    limit = gap if gap > 0 else max_len
    return (dist <= limit) & (total <= max_len)


def producible_by_component(language, gap: int) -> np.ndarray:
    """(C, V, V) bool: P restricted to texts of component c (see the module docstring)."""
    from beyondlm.data.synthetic import EOS_SLOT

    out = []
    for c in range(len(language.log_prior)):
        f = slot_pair_feasible(language.init[c], language.trans[c], language.spec.max_len, gap, EOS_SLOT)
        e = (language.emit[c] > 0).astype(np.int64)  # (G, V)
        out.append((e.T @ f.astype(np.int64) @ e) > 0)  # (V, V)
    return np.stack(out)


def producible(language, gap: int) -> np.ndarray:
    """(V, V) bool, see the module docstring."""
    return producible_by_component(language, gap).any(axis=0)


def relation_gaps(window: int, cooccur_window: int) -> dict[str, int]:
    """The gap each mined relation allows (see beyondlm.graph.mine)."""
    return {"co_occurs": cooccur_window, "precedes": window}


def language_check(graph: ConceptGraph, language, gaps: dict[str, int]) -> dict:
    """Per relation: the fraction of edges the language can produce (plain and weighted by count),
    the same fraction over all ordered pairs of distinct nodes (= a uniformly random pair), and
    recall (producible node pairs that are edges). Symmetric relations accept either order.
    Nodes are matched to the language by ``graph.tokens`` (the word tokenizer's ids)."""
    if (graph.tokens < 0).any() or (graph.tokens >= language.vocab_size).any():
        raise ValueError("language_check: every node needs a token id of the language's vocabulary")
    tok, n = graph.tokens, graph.n_nodes
    out = {}
    for r, name in enumerate(graph.relations):
        if name not in gaps:
            continue
        p = producible(language, gaps[name])
        if name in SYMMETRIC:
            p = p | p.T
        sub = p[np.ix_(tok, tok)]  # (N, N) over nodes
        np.fill_diagonal(sub, False)
        rows = graph.rel == r
        ok, w = sub[graph.src[rows], graph.dst[rows]], graph.weight[rows]
        out[name] = {"edges": int(rows.sum()),
                     "producible": float(ok.mean()) if ok.size else None,
                     "producible_weighted": float((w * ok).sum() / w.sum()) if w.size else None,
                     "random_pairs_producible": float(sub.sum() / (n * (n - 1))) if n > 1 else None,
                     "recall": float(ok.sum() / sub.sum()) if sub.sum() else None}
    return out
