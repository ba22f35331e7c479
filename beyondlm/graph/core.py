"""The concept graph: nodes (id, name, count, token) and typed, counted edges (src, dst, relation, count).

One type for every source (mined from documents, ConceptNet triples), built for a later graph
look-up model (GRF, see METHODS.md): dense node ids ``0..N-1`` ordered by count (descending,
then name), ``token`` the node's id in the prepared tokenizer (−1 when the concept is not one
token), relations sorted by name, edges sorted by (src, relation, dst) so each node's out-edges
are one slice (``out_slice``). A symmetric relation (``SYMMETRIC``: ``co_occurs``) is stored in
both directions with the same count, so out-edges alone give every neighbour.

On disk: a directory with ``nodes.parquet`` (id int64, name string, count int64, token int64) and
``edges.parquet`` (src int64, dst int64, relation dictionary<string>, count int64), written
atomically (``beyondlm.io.atomic_path``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from beyondlm.inputs import InputError, read_parquet, require_columns, restore_fix
from beyondlm.io import atomic_path

SYMMETRIC = frozenset({"co_occurs"})  # stored both ways; pruned so both directions stay or go
NODE_COLUMNS = ("id", "name", "count", "token")
EDGE_COLUMNS = ("src", "dst", "relation", "count")


@dataclass(frozen=True, eq=False)
class ConceptGraph:
    names: tuple[str, ...]  # (N,) node id -> name
    counts: np.ndarray  # (N,) int64: occurrences (mined: tokens; ConceptNet: triples naming it)
    tokens: np.ndarray  # (N,) int64: token id in the prepared tokenizer, -1 when none
    relations: tuple[str, ...]  # sorted relation names
    src: np.ndarray  # (E,) int64 node ids
    dst: np.ndarray  # (E,) int64 node ids
    rel: np.ndarray  # (E,) int64 index into relations
    weight: np.ndarray  # (E,) int64 edge counts (texts or triples)

    def __post_init__(self) -> None:
        n, e = len(self.names), len(self.src)
        if not (len(self.counts) == len(self.tokens) == n and len(self.dst) == len(self.rel) == len(self.weight) == e):
            raise ValueError(f"ConceptGraph: {n} names/counts/tokens and {e} src/dst/rel/weight must agree")
        if e and (min(self.src.min(), self.dst.min()) < 0 or max(self.src.max(), self.dst.max()) >= n):
            raise ValueError(f"ConceptGraph: edge endpoints must be node ids in [0, {n})")
        if e and (self.rel.min() < 0 or self.rel.max() >= len(self.relations)):
            raise ValueError(f"ConceptGraph: relation index outside {self.relations}")
        if list(self.relations) != sorted(set(self.relations)):
            raise ValueError(f"ConceptGraph: relations {self.relations} must be sorted and distinct")

    @property
    def n_nodes(self) -> int:
        return len(self.names)

    @property
    def n_edges(self) -> int:
        return len(self.src)

    def node_ids(self, names: Iterable[str]) -> np.ndarray:
        """Node ids of ``names`` (KeyError for an unknown name)."""
        index = {name: i for i, name in enumerate(self.names)}
        return np.array([index[n] for n in names], dtype=np.int64)

    def edge_set(self, relation: str | None = None) -> set[tuple[str, str, str]]:
        """{(src name, relation, dst name)}: for tests and small graphs."""
        return {(self.names[s], self.relations[r], self.names[d]) for s, d, r in zip(self.src, self.dst, self.rel)
                if relation is None or self.relations[r] == relation}

    def out_slice(self) -> np.ndarray:
        """CSR row pointer (N+1,): node u's out-edges are rows indptr[u]:indptr[u+1]."""
        return np.searchsorted(self.src, np.arange(self.n_nodes + 1), side="left")


def from_arrays(names: Sequence[str], counts, tokens, relations: Sequence[str], src, dst, rel, weight) -> ConceptGraph:
    """The canonical graph: nodes renumbered by (count descending, name), relations sorted by
    name, edges sorted by (src, relation, dst). Inputs: nodes (N,) in any order; edges (E,) with
    ``src``/``dst`` indexing those nodes and ``rel`` indexing ``relations``."""
    counts, tokens = np.asarray(counts, dtype=np.int64), np.asarray(tokens, dtype=np.int64)
    order = np.array(sorted(range(len(names)), key=lambda i: (-counts[i], names[i])), dtype=np.int64)
    new = np.empty(len(names), dtype=np.int64)
    new[order] = np.arange(len(names))
    used = sorted({relations[i] for i in np.unique(np.asarray(rel, dtype=np.int64))})
    remap = np.array([used.index(r) if r in used else -1 for r in relations], dtype=np.int64)
    src, dst = new[np.asarray(src, dtype=np.int64)], new[np.asarray(dst, dtype=np.int64)]
    rel = remap[np.asarray(rel, dtype=np.int64)]
    k = np.lexsort((dst, rel, src))
    return ConceptGraph(tuple(names[i] for i in order), counts[order], tokens[order], tuple(used),
                        src[k], dst[k], rel[k], np.asarray(weight, dtype=np.int64)[k])


def build_graph(names: Sequence[str], counts, tokens, edges: dict[tuple[int, int, str], int]) -> ConceptGraph:
    """from_arrays for edges given as {(src, dst, relation name): count}."""
    relations = sorted({r for _, _, r in edges})
    rows = np.array([(s, d, relations.index(r), c) for (s, d, r), c in edges.items()], dtype=np.int64).reshape(-1, 4)
    return from_arrays(names, counts, tokens, relations, rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3])


# ----------------------------------------------------------------------------- disk
def save_graph(graph: ConceptGraph, out_dir: str | Path) -> None:
    """``out_dir/{nodes,edges}.parquet``, the directory replaced atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    nodes = pa.table({"id": pa.array(np.arange(graph.n_nodes), pa.int64()), "name": pa.array(graph.names, pa.string()),
                      "count": pa.array(graph.counts, pa.int64()), "token": pa.array(graph.tokens, pa.int64())})
    relation = pa.DictionaryArray.from_arrays(pa.array(graph.rel.astype(np.int32), pa.int32()),
                                              pa.array(graph.relations, pa.string()))
    edges = pa.table({"src": pa.array(graph.src, pa.int64()), "dst": pa.array(graph.dst, pa.int64()),
                      "relation": relation, "count": pa.array(graph.weight, pa.int64())})
    with atomic_path(out_dir, is_dir=True) as tmp:
        pq.write_table(nodes, tmp / "nodes.parquet")
        pq.write_table(edges, tmp / "edges.parquet")


def _ints(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int64).reshape(-1)


def load_graph(graph_dir: str | Path, fix: str | None = None) -> ConceptGraph:
    """Inverse of save_graph; a missing or malformed file raises InputError naming it."""
    graph_dir = Path(graph_dir)
    fix = fix or restore_fix(graph_dir, "graph")
    nodes, edges = read_parquet(graph_dir / "nodes.parquet", fix), read_parquet(graph_dir / "edges.parquet", fix)
    require_columns(graph_dir / "nodes.parquet", list(nodes), NODE_COLUMNS, fix)
    require_columns(graph_dir / "edges.parquet", list(edges), EDGE_COLUMNS, fix)
    if nodes["id"] != list(range(len(nodes["id"]))):
        raise InputError(graph_dir / "nodes.parquet", "node ids are not 0..N-1 in order", fix)
    relations = tuple(sorted(set(edges["relation"])))
    rel = np.searchsorted(np.asarray(relations, dtype=object), np.asarray(edges["relation"], dtype=object))
    try:
        return ConceptGraph(tuple(nodes["name"]), _ints(nodes["count"]), _ints(nodes["token"]), relations,
                            _ints(edges["src"]), _ints(edges["dst"]), _ints(rel), _ints(edges["count"]))
    except ValueError as err:
        raise InputError(graph_dir, f"not a concept graph ({err})", fix) from err


# ----------------------------------------------------------------------------- pruning
def _rank_within(keys: np.ndarray, strength: np.ndarray, tie: np.ndarray) -> np.ndarray:
    """Rank (0 = strongest) of each row within its group ``keys``: by strength desc, then tie asc."""
    order = np.lexsort((tie, -strength, keys))
    ranks = np.empty(len(keys), dtype=np.int64)
    sorted_keys = keys[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_keys)) + 1] if len(keys) else np.zeros(0, np.int64)
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(keys)]))
    ranks[order] = np.arange(len(keys)) - group_start
    return ranks


RANKINGS = ("count", "lift")


def prune(graph: ConceptGraph, *, min_node_count: int = 1, min_edge_count: int = 1, max_degree: int = 0,
          rank_by: str = "count") -> ConceptGraph:
    """Drop nodes with count < min_node_count (and their edges), edges with count < min_edge_count,
    then keep at most ``max_degree`` out-edges per (node, relation), the strongest first (ties to
    the lower dst id); 0 = no cap. Strength ``rank_by``: ``count`` = the edge count c(u, v);
    ``lift`` = c(u, v) / count(v), which orders u's out-edges as PMI log(c(u, v)·T / (count(u)
    count(v))) does (count(u) and T are the same along u's list), so frequent hubs stop filling
    every list. A symmetric relation keeps u–v only when it is in the top ``max_degree`` of both
    u and v (mutual), so it stays symmetric with degree ≤ max_degree. Nodes are renumbered;
    nodes left without edges stay (they can still be grounded)."""
    if rank_by not in RANKINGS:
        raise ValueError(f"prune: rank_by={rank_by!r} is not one of {RANKINGS}")
    keep_node = graph.counts >= min_node_count
    keep = keep_node[graph.src] & keep_node[graph.dst] & (graph.weight >= min_edge_count)
    src, dst, rel, w = graph.src[keep], graph.dst[keep], graph.rel[keep], graph.weight[keep]
    if max_degree > 0 and len(src):
        n, r = graph.n_nodes, len(graph.relations)
        strength = w / graph.counts[dst] if rank_by == "lift" else w.astype(np.float64)
        top = _rank_within(src * r + rel, strength, dst) < max_degree  # (E,) within u's top for this relation
        code = (rel * n + src) * n + dst
        back = (rel * n + dst) * n + src  # the reverse edge's code
        order = np.argsort(code)
        pos = np.clip(np.searchsorted(code[order], back), 0, len(code) - 1)
        has_back = code[order][pos] == back
        back_top = np.where(has_back, top[order][pos], False)
        symmetric = np.isin(rel, [i for i, name in enumerate(graph.relations) if name in SYMMETRIC])
        keep = np.where(symmetric, top & back_top, top)
        src, dst, rel, w = src[keep], dst[keep], rel[keep], w[keep]
    ids = np.flatnonzero(keep_node)
    new = np.full(graph.n_nodes, -1, dtype=np.int64)
    new[ids] = np.arange(len(ids))
    names = [graph.names[i] for i in ids]
    return from_arrays(names, graph.counts[ids], graph.tokens[ids], graph.relations, new[src], new[dst], rel, w)


# ----------------------------------------------------------------------------- expansion
def csr_rows(indptr: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """Edge rows of ``nodes``' out-edges, node by node: the concatenation of
    ``arange(indptr[u], indptr[u+1])`` without a Python loop."""
    nodes = np.asarray(nodes, dtype=np.int64)
    starts, lens = indptr[nodes], indptr[nodes + 1] - indptr[nodes]
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return (offsets + np.arange(int(lens.sum()))).astype(np.int64)


def neighbours(graph: ConceptGraph, nodes: Sequence[int], hops: int, cap: int,
               relations: Sequence[str] | None = None) -> list[np.ndarray]:
    """Multi-hop expansion (GRF's: 2 hops, ≤ 100 new nodes a hop): hop 0 = the distinct input
    ``nodes``; hop h = at most ``cap`` nodes not seen before, reached by an out-edge from hop
    h−1, the strongest first (sum of the counts of the edges reaching them, then lower id).
    ``relations`` limits the edges followed (default: all). Returns one id array per hop."""
    allowed = np.ones(len(graph.relations), dtype=bool)
    if relations is not None:
        unknown = sorted(set(relations) - set(graph.relations))
        if unknown:
            raise ValueError(f"neighbours: unknown relations {unknown}; the graph has {list(graph.relations)}")
        allowed = np.isin(np.asarray(graph.relations, dtype=object), list(relations))
    indptr = graph.out_slice()
    frontier = np.unique(np.asarray(nodes, dtype=np.int64))
    seen = np.zeros(graph.n_nodes, dtype=bool)
    seen[frontier] = True
    out = [frontier]
    for _ in range(hops):
        rows = csr_rows(indptr, frontier)
        keep = ~seen[graph.dst[rows]]
        rows = rows[keep & allowed[graph.rel[rows]] if relations is not None else keep]
        dst = graph.dst[rows]
        score = np.bincount(dst, weights=graph.weight[rows], minlength=graph.n_nodes)
        cand = np.flatnonzero(np.bincount(dst, minlength=graph.n_nodes))  # the distinct ones, ascending
        cand = cand[np.lexsort((cand, -score[cand]))][:cap]
        frontier = np.sort(cand)
        seen[frontier] = True
        out.append(frontier)
    return out


# ----------------------------------------------------------------------------- statistics
DEGREE_QUANTILES = (0.5, 0.9, 0.99)


def _distribution(values: np.ndarray) -> dict:
    if not len(values):
        return {"mean": 0.0, "max": 0, **{f"p{round(q * 100)}": 0.0 for q in DEGREE_QUANTILES}}
    return {"mean": float(values.mean()), "max": int(values.max()),
            **{f"p{round(q * 100)}": float(np.quantile(values, q)) for q in DEGREE_QUANTILES}}


def statistics(graph: ConceptGraph) -> dict:
    """Sizes, out-degree per relation (mean, quantiles, max), the histogram of each node's number
    of distinct neighbours over all relations and both directions (bins 0, 1, 2–3, 4–7, ...),
    isolated nodes, and weak connectivity (components, largest one's share of the nodes)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = graph.n_nodes
    per_rel = {name: int((graph.rel == i).sum()) for i, name in enumerate(graph.relations)}
    out_degree = {name: _distribution(np.bincount(graph.src[graph.rel == i], minlength=n))
                  for i, name in enumerate(graph.relations)}
    loop = graph.src == graph.dst  # a self-loop is no neighbour
    adj = coo_matrix((np.ones(int((~loop).sum())), (graph.src[~loop], graph.dst[~loop])), shape=(n, n)).tocsr()
    degree = np.diff(((adj + adj.T) > 0).tocsr().indptr)  # (N,) distinct neighbours, either direction
    bins = np.where(degree == 0, 0, np.floor(np.log2(np.maximum(degree, 1))).astype(np.int64) + 1)
    hist = np.bincount(bins, minlength=1) if n else np.zeros(1, np.int64)
    labels = [("0" if b == 0 else f"{2 ** (b - 1)}-{2 ** b - 1}") for b in range(len(hist))]
    n_comp, comp = connected_components(adj, directed=True, connection="weak") if n else (0, np.zeros(0, np.int64))
    largest = int(np.bincount(comp).max()) if n else 0
    return {"n_nodes": n, "n_edges": graph.n_edges, "n_edges_per_relation": per_rel,
            "out_degree": out_degree, "degree": _distribution(degree),
            "degree_histogram": dict(zip(labels, hist.tolist())), "isolated_nodes": int((degree == 0).sum()),
            "components": int(n_comp), "largest_component_fraction": largest / n if n else 0.0}
