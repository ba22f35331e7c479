"""Mine a concept graph from token sequences ("build a graph from documents to increase connectivity").

Nodes are content tokens: on the synthetic language the words its open-class slots emit
(``CONTENT_SLOTS``); on other text a frequency rule (alphabetic, at least ``min_chars``
characters, not among the ``stop_top`` most frequent tokens of the split, not special).
Edges, each counted as the number of TEXTS in which it occurs (a text repeating a pair counts once):

- ``co_occurs`` u–v: u and v (u ≠ v) both occur in the text, within ``cooccur_window`` tokens of
  each other (0: anywhere in the text). Undirected, stored in both directions with one count.
- ``precedes`` u→v: an occurrence of u is followed by one of v (u ≠ v) at most ``window`` tokens
  later (0: anywhere later in the text). Directed.

Distances are in tokens of the text (function words count). Counting is vectorised per chunk of
texts: every (text, pair) code is made unique within its chunk, then pairs are counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from beyondlm.config import check_choice, check_param
from beyondlm.graph.core import RANKINGS, SYMMETRIC, ConceptGraph, from_arrays

# The synthetic grammar's open classes: the same tuple as beyondlm.lookup.gate.CONTENT_SLOTS
# (a test keeps them equal); not imported from there, so this stage does not load torch.
CONTENT_SLOTS = ("ADJ", "PRED_ADJ", "NOUN", "ONOUN", "VERB", "ADV")
SOURCES = ("mined", "conceptnet")
CONTENT_RULES = ("auto", "language", "frequency")
_CHUNK = 2048  # texts per counting chunk: bounds the (text, pair) code arrays


@dataclass(frozen=True)
class GraphConfig:
    """``graph``: what the graph stage builds (see the module docstring and beyondlm/graph/)."""

    source: str = "mined"  # mined (from the prepared split) | conceptnet (triples under inputs/graph/)
    split: str = "train"
    max_texts: int = 0  # 0 = the whole split
    content: str = "auto"  # auto (language if prepare wrote language.json, else frequency) | language | frequency
    stop_top: int = 100  # frequency rule: the most frequent tokens are stop words
    min_chars: int = 3  # frequency rule: shorter tokens are not concepts
    window: int = 4  # precedes: v at most this many tokens after u (0 = anywhere later in the text)
    cooccur_window: int = 0  # co_occurs: within this many tokens (0 = anywhere in the text)
    min_node_count: int = 5  # occurrences a content token needs to be a node
    min_edge_count: int = 2  # texts an edge needs
    max_degree: int = 0  # out-edges kept per node and relation, strongest first (0 = no cap)
    rank_by: str = "count"  # strongest by: count (edge count) | lift (count / the neighbour's count: PMI's order)
    conceptnet: tuple[str, ...] = ()  # source=conceptnet: relation<TAB>head<TAB>tail<TAB>label files
    keep_corrupted: bool = False  # ConceptNet label-0 rows (corrupted triples) as '<relation>:corrupted'

    def __post_init__(self) -> None:
        check_choice("graph.source", self.source, SOURCES)
        check_choice("graph.split", self.split, ("train", "valid", "test"))
        check_choice("graph.content", self.content, CONTENT_RULES)
        check_choice("graph.rank_by", self.rank_by, RANKINGS)
        for key in ("max_texts", "stop_top", "window", "cooccur_window", "max_degree"):
            value = getattr(self, key)
            check_param(f"graph.{key}", value >= 0, value, "must be >= 0 (0 = no limit)")
        for key in ("min_chars", "min_node_count", "min_edge_count"):
            value = getattr(self, key)
            check_param(f"graph.{key}", value >= 1, value, "must be an integer >= 1")
        check_param("graph.conceptnet", self.source != "conceptnet" or len(self.conceptnet) > 0, list(self.conceptnet),
                    "graph.source=conceptnet needs at least one file (under inputs/graph/)")
        check_param("graph.conceptnet", all(isinstance(p, str) for p in self.conceptnet), list(self.conceptnet),
                    "must be a list of file paths")


# ----------------------------------------------------------------------------- content words
def language_content(language) -> np.ndarray:
    """(V,) bool: tokens some component emits from a content slot (the open word classes)."""
    from beyondlm.data.synthetic import SLOTS

    slots = [SLOTS.index(s) for s in CONTENT_SLOTS]
    return (language.emit[:, slots] > 0).any(axis=(0, 1))


def frequency_content(seqs: Sequence[Sequence[int]], names: Sequence[str], special: Sequence[int], *,
                      stop_top: int, min_chars: int) -> np.ndarray:
    """(V,) bool: alphabetic names of >= min_chars characters, not special, not among the
    ``stop_top`` most frequent tokens of ``seqs`` (ties by lower id)."""
    counts = np.bincount(np.concatenate([np.asarray(s, np.int64) for s in seqs] or [np.zeros(0, np.int64)]),
                         minlength=len(names))[: len(names)]
    ok = np.array([n.isalpha() and len(n) >= min_chars for n in names], dtype=bool)
    ok[np.asarray(special, dtype=np.int64)] = False
    ok[np.lexsort((np.arange(len(names)), -counts))[:stop_top]] = False
    return ok


# ----------------------------------------------------------------------------- counting
def _pair_codes(text: np.ndarray, pos: np.ndarray, tok: np.ndarray, window: int, v: int, ordered: bool) -> np.ndarray:
    """Distinct (text, u, v) codes text·v² + u·v + v_ of content entries (sorted by text, pos)
    at most ``window`` positions apart (0 = any), u ≠ v; unordered pairs as (min, max)."""
    codes = []
    for m in range(1, len(tok)):  # pair entry e with entry e + m
        same = (text[m:] == text[:-m]) & ((pos[m:] - pos[:-m] <= window) if window else True)
        if not same.any():
            break  # entries are sorted: a larger offset is further apart or in another text
        a, b, t = tok[:-m][same], tok[m:][same], text[m:][same]
        keep = a != b
        a, b, t = a[keep], b[keep], t[keep]
        if not ordered:
            a, b = np.minimum(a, b), np.maximum(a, b)
        codes.append((t * v + a) * v + b)
    return np.unique(np.concatenate(codes)) if codes else np.zeros(0, np.int64)


def _merge(keys: list[np.ndarray], counts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    uniq, inv = np.unique(np.concatenate(keys), return_inverse=True)
    return uniq, np.bincount(inv, weights=np.concatenate(counts)).astype(np.int64)


def mine_graph(seqs: Sequence[Sequence[int]], content: np.ndarray, names: Sequence[str], *,
               window: int, cooccur_window: int, min_node_count: int = 1) -> ConceptGraph:
    """The unpruned-edges graph of ``seqs`` (token id lists): nodes = content tokens occurring
    at least ``min_node_count`` times (count = occurrences, token = the id), edges as in the
    module docstring (count = texts). ``content`` (V,) bool over ids, ``names`` (V,)."""
    v = len(names)
    lengths = np.fromiter((len(s) for s in seqs), np.int64, count=len(seqs))
    flat = np.fromiter((t for s in seqs for t in s), np.int64, count=int(lengths.sum()))
    if flat.size and (flat.min() < 0 or flat.max() >= v):
        raise ValueError(f"mine_graph: token ids must lie in [0, {v})")
    occ = np.bincount(flat[content[flat]], minlength=v)
    node = content & (occ >= min_node_count)  # (V,)
    text = np.repeat(np.arange(len(seqs)), lengths)
    pos = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    keep = node[flat]
    text, pos, tok = text[keep], pos[keep], flat[keep]
    found = {"co_occurs": ([], []), "precedes": ([], [])}
    bounds = np.searchsorted(text, np.arange(0, len(seqs) + _CHUNK, _CHUNK))
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        t, p, k = text[lo:hi] - text[lo:hi].min(initial=0), pos[lo:hi], tok[lo:hi]
        for rel, w, ordered in (("co_occurs", cooccur_window, False), ("precedes", window, True)):
            uniq, cnt = np.unique(_pair_codes(t, p, k, w, v, ordered) % (v * v), return_counts=True)
            found[rel][0].append(uniq)
            found[rel][1].append(cnt)
    ids = np.flatnonzero(node)  # node i of the arrays below is token ids[i]
    local = np.full(v, -1, np.int64)
    local[ids] = np.arange(len(ids))
    relations = ("co_occurs", "precedes")
    src, dst, rel, weight = [], [], [], []
    for r, name in enumerate(relations):
        keys, cnt = _merge(*found[name])
        a, b = local[keys // v], local[keys % v]
        if name in SYMMETRIC:  # both directions, one count
            a, b, cnt = np.r_[a, b], np.r_[b, a], np.r_[cnt, cnt]
        src.append(a)
        dst.append(b)
        rel.append(np.full(len(a), r))
        weight.append(cnt)
    return from_arrays([names[i] for i in ids], occ[ids], ids, relations,
                       *(np.concatenate(x) for x in (src, dst, rel, weight)))
