"""Graph look-up: GRF (Ji et al., "Language Generation with Multi-Hop Reasoning on Commonsense
Knowledge Graph", EMNLP 2020; code github.com/haozheji/multigen, ``MultiHopGen``).

A causal LM mixed, at every decoding step t, with a distribution over the concepts of a small
graph grounded in the prompt x (shared/METHODS.md, "Look-up models"):

1. Grounding (:class:`Grounder`): the prompt's tokens that are graph nodes are hop 0; expand
   ``hops`` hops with ≤ ``max_per_hop`` new nodes a hop (``beyondlm.graph.neighbours``). The
   subgraph's edges are the *forward* ones, (u, r, v) with hop(u) < hop(v): the edges the
   expansion walked, as multigen's ``find_neighbours_frequency`` keeps them (triples from a hop's
   frontier to nodes not seen before), then, as multigen's ``filter_directed_triple`` and data
   loader prune them, ≤ ``max_in_edges`` per node (multigen: 5; here the strongest by the edge's
   weight, multigen's are the first found) and ≤ ``max_triples`` in all (multigen: 800).
2. Encoding (:class:`CompGCN`, multigen's ``comp_gcn``): node embeddings start from the LM's token
   embeddings (a trainable copy; random for nodes without a token), relations from a table; each
   layer h_v ← ReLU(W_s h_v + W_n mean_{(u,r,v) or (v,r,u)} (h_u − h_r)), h_r ← W_r h_r
   (subtraction composition, both edge directions). Run once per batch over the whole graph
   (not per subgraph as multigen does: the graph is small, and one pass serves every row).
3. Triple scores R_t(u,r,v) = σ([h_u; h_r; h_v]ᵀ W s_t), s_t the decoder's final hidden state
   (after ln_f, the LM head's input), computed decomposed (:func:`triple_scores`).
4. Propagation (:func:`propagate`), multigen's ``multi_hop(method="max")``:
       s^0(v) = 1 if v is grounded (hop 0) else 0,
       s^{h+1}(v) = max(0, max_{(u,r,v)} [γ·s^h(u) + R_t(u,r,v)])   (0 without in-edges),
   and the node score is Σ_{h=1..H} s^h(v). A node not reached yet has s = 0, not −∞: an edge
   from it still passes its own R_t (multigen scatters into zeros, and R_t ≥ 0 so the 0 floor
   only matters for nodes without in-edges).
5. P_c = softmax of the node scores (optionally times a learned κ, ``learn_scale``) over the nodes that can take mass: nodes with a token of the
   LM's vocabulary, and, with ``grounded="exclude"`` (multigen adds −1e5 to hop-0 nodes), not the
   grounded ones. P_c is mapped to the vocabulary through node tokens (a token of no such node
   gets 0; multigen instead loses the mass of nodes without a token: here P_c sums to 1).
6. Gate g_t = σ(w_gᵀ s_t + b); P = (1 − g)·P_LM + g·P_c, in log space
   log P = logaddexp(log σ(−z) + log P_LM, log σ(z) + log P_c). A row whose subgraph has no node
   that can take mass gets z = −∞: exactly the LM.
7. Loss (:func:`grf_loss`) per scored position: −log P(y_t) + α·BCE(g_t, c_t), c_t = 1[y_t is a
   token of a node P_c can put mass on] (multigen: "is y_t a concept of the subgraph"; with
   grounded nodes excluded from P_c we do not ask the gate to trust P_c for tokens it cannot
   produce). multigen adds a triple-classification loss (β) from path supervision: not used.

Scored positions: only the continuation after the prompt (the grounding needs the whole prompt).
Layout: each node's in-edges are K slots (B, K, N), K = the batch's largest in-degree (≤
``max_in_edges``), so a hop is one gather and a max over K rows of N, autograd included.
Shapes: B rows, T scored positions, N subgraph nodes, K in-edge slots, V vocabulary, d hidden size.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from beyondlm.graph import ConceptGraph, neighbours
from beyondlm.graph.core import csr_rows

GROUNDED = ("exclude", "keep")  # hop-0 nodes in P_c: multigen's choice (exclude) or kept
# The gate's initial bias: g ≈ σ(−2) = 0.12 at the start, so fine-tuning starts near the LM it
# comes from (multigen starts at PyTorch's default, g ≈ 0.5 ± noise, from pretrained GPT-2).
GATE_BIAS0 = -2.0


# ----------------------------------------------------------------------------- pure functions
def _slots(values: Tensor, idx: Tensor) -> Tensor:
    """values (B, T, M) gathered at idx (B, K, N) → (B, T, K, N)."""
    b, t, _ = values.shape
    k, n = idx.shape[1], idx.shape[2]
    return values.gather(2, idx.reshape(b, 1, k * n).expand(b, t, k * n)).view(b, t, k, n)


def propagate(triple_score: Tensor, in_src: Tensor, s0: Tensor, *, gamma: float, hops: int,
              start: Tensor | None = None) -> Tensor:
    """Node scores Σ_{h=1..H} s^h (B, T, N) of the max-propagation (module docstring, 4.), over
    each node's in-edge slots: triple_score (B, T, K, N) R_t of slot k of node v, in_src (B, K, N)
    its source node; s0 (B, N) initial scores; ``start`` (B, 1, K, N) γ·s^0 at the slots when
    the caller keeps it (constant over a batch's steps; computed here when None). An empty slot
    must carry R = 0 and point at a node whose score stays 0 (no in-edges, s0 = 0:
    :func:`graph_batch`'s sink column): every real update γ·s(u) + R is ≥ 0, so it never beats
    the floor 0, and a node without in-edges scores 0. Autograd goes through the max (to the
    winning slot)."""
    if start is None:
        start = gamma * _slots(s0[:, None, :].to(triple_score.dtype), in_src)
    s = (triple_score + start).amax(2)  # (B, T, N): max over K rows of N
    total = s
    for _ in range(hops - 1):
        s = torch.add(triple_score, _slots(s, in_src), alpha=gamma).amax(2)
        total = total + s
    return total


def node_logits(query: Tensor, graph_h: Tensor, rel_h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The three parts of the triple logit [h_u; h_r; h_v]ᵀ W s_t: from query = W s_t (B, T, 3d)
    split in (q_u, q_r, q_v), q_u·h_n and q_v·h_n for every graph node (B, T, G) and q_r·h_r per
    relation (B, T, R); graph_h (G, d) the encoded graph, rel_h (R, d). One product against the
    whole (small) graph instead of one per row against its subgraph's copies: the graph's states
    stay in cache, and each dot is taken once per node or relation."""
    q_u, q_r, q_v = query.chunk(3, dim=-1)  # (B, T, d) each
    t = query.shape[1]
    a_uv = torch.cat([q_u, q_v], 1) @ graph_h.T  # (B, 2T, G)
    return a_uv[:, :t], q_r @ rel_h.T, a_uv[:, t:]


def pair_index(node_ids: Tensor, in_src: Tensor, in_rel: Tensor, n_rel: int) -> Tensor:
    """(B, K, N) each slot's (graph node of u, relation r) as one index u·(R+1) + r into the
    (G·(R+1)) table of :func:`triple_scores`; an empty slot (in_rel −1) gets the padding relation
    R, whose logit is −∞. node_ids (B, N) the subgraph's graph ids, in_src/in_rel (B, K, N)."""
    b, k, n = in_src.shape
    rel = torch.where(in_rel < 0, n_rel, in_rel)
    return node_ids.gather(1, in_src.reshape(b, k * n)).view(b, k, n) * (n_rel + 1) + rel


def triple_scores(query: Tensor, graph_h: Tensor, rel_h: Tensor, node_ids: Tensor, pairs: Tensor) -> Tensor:
    """R_t(u,r,v) = σ([h_u; h_r; h_v]ᵀ W s_t) (B, T, K, N) of every in-edge slot (u, r) of every
    subgraph node v (``pairs``: :func:`pair_index`, 0 in empty slots; node_ids (B, N) the nodes'
    graph ids), decomposed (:func:`node_logits`): the per-node and per-relation dots, summed per
    (u, r) pair (B, T, G·(R+1)) and gathered once per slot, O(B·T·((G+R)·d + G·R + K·N)), no
    per-edge concatenation."""
    a_u, a_r, a_v = node_logits(query, graph_h, rel_h)
    b, t, _ = a_u.shape
    a_r = torch.cat([a_r, a_r.new_full((b, t, 1), -math.inf)], -1)  # the padding relation: σ = 0
    pair = (a_u[..., None] + a_r[:, :, None, :]).reshape(b, t, -1)  # (B, T, G·(R+1)): u·(R+1) + r
    a_v = a_v.gather(2, node_ids[:, None, :].expand(b, t, -1))  # (B, T, N)
    return torch.sigmoid(_slots(pair, pairs) + a_v[:, :, None, :])


def concept_support(can_take: Tensor, node_tok: Tensor, vocab_size: int) -> tuple[Tensor, Tensor]:
    """What :func:`concept_logprobs` needs of a batch, computed once: an additive mask (B, N)
    (0 on nodes that ``can_take`` mass, −inf elsewhere; all 0 in a row where none can, so its
    softmax stays finite) and each node's vocabulary column (B, N) (``node_tok``; the sink
    column V for nodes that cannot take mass, dropped)."""
    has = can_take.any(1, keepdim=True)  # (B, 1)
    bias = torch.where(can_take | ~has, 0.0, -math.inf)
    return bias, torch.where(can_take, node_tok, vocab_size)


def concept_logprobs(scores: Tensor, support: tuple[Tensor, Tensor], vocab_size: int) -> Tensor:
    """log P_c over the vocabulary (B, T, V): log-softmax of node scores (B, T, N) over the nodes
    that can take mass, scattered to their tokens; −inf elsewhere and in rows where no node can
    (all their nodes go to the sink column). ``support``: :func:`concept_support` of the batch."""
    bias, col = support
    b, t, n = scores.shape
    logp = (scores + bias[:, None, :]).log_softmax(-1)  # (B, T, N)
    out = logp.new_full((b, t, vocab_size + 1), -math.inf).scatter(2, col[:, None, :].expand(b, t, n), logp)
    return out[..., :vocab_size]


def mixture_logprobs(lm_logp: Tensor, concept_logp: Tensor, gate_logit: Tensor) -> Tensor:
    """log((1 − g)·P_LM + g·P_c) (B, T, V), g = σ(z), z (B, T); z = −∞ gives log P_LM exactly."""
    z = gate_logit[..., None]
    return torch.logaddexp(F.logsigmoid(-z) + lm_logp, F.logsigmoid(z) + concept_logp)


def grf_loss(mix_logp_y: Tensor, gate_logit: Tensor, in_graph: Tensor, mask: Tensor, *, alpha: float
             ) -> tuple[Tensor, Tensor, Tensor]:
    """(Σ_t [−log P(y_t) + α·BCE(σ(z_t), c_t)], Σ NLL, Σ BCE) over ``mask`` (B, T); mix_logp_y
    (B, T) log P(y_t), gate_logit z (B, T), in_graph c (B, T) bool. BCE = −c log σ(z) − (1−c)
    log σ(−z), 0 at z = −∞ with c = 0 (rows without concepts)."""
    c = in_graph.to(gate_logit.dtype)
    bce = -(c * F.logsigmoid(gate_logit) + (1 - c) * F.logsigmoid(-gate_logit))
    bce = torch.where(mask & ((c > 0) | torch.isfinite(gate_logit)), bce, 0.0)
    nll = torch.where(mask, -mix_logp_y, 0.0)
    return nll.sum() + alpha * bce.sum(), nll.sum(), bce.sum()


# ----------------------------------------------------------------------------- grounding
@dataclass(frozen=True)
class Subgraph:
    """One prompt's subgraph: ``nodes`` (n,) global ids with ``hop`` (n,); forward edges as local
    indices ``src``, ``dst`` (e,) and relation ids ``rel`` (e,), grouped by ``dst`` (ascending),
    the strongest (largest weight) first within a group."""

    nodes: np.ndarray
    hop: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    rel: np.ndarray


def run_ranks(keys: np.ndarray) -> np.ndarray:
    """Each entry's rank (0, 1, …) within its run of equal consecutive ``keys``."""
    if not len(keys):
        return np.zeros(0, dtype=np.int64)
    first = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])  # where each run starts
    return np.arange(len(keys)) - np.repeat(first, np.diff(np.r_[first, len(keys)]))


def first_of_runs(keys: np.ndarray, k: int) -> np.ndarray:
    """Mask (len(keys),) of the first ``k`` entries of every run of equal consecutive ``keys``."""
    return run_ranks(keys) < k


class Grounder:
    """Prompt tokens → :class:`Subgraph` (cached per set of grounded nodes): ``hops`` hops of ≤
    ``max_per_hop`` new nodes, then the forward edges, ≤ ``max_in_edges`` per node (the strongest:
    the largest edge weight) and ≤ ``max_triples`` in all (multigen keeps ≤ 5 and ≤ 800; 0 = all)."""

    def __init__(self, graph: ConceptGraph, vocab_size: int, *, hops: int, max_per_hop: int,
                 max_in_edges: int = 0, max_triples: int = 0):
        self.graph, self.hops, self.cap = graph, hops, max_per_hop
        self.max_in_edges, self.max_triples = max_in_edges, max_triples
        self.token_node = np.full(max(vocab_size, int(graph.tokens.max(initial=-1)) + 1), -1, dtype=np.int64)
        has = np.flatnonzero(graph.tokens >= 0)
        self.token_node[graph.tokens[has][::-1]] = has[::-1]  # a token shared by nodes: the first node
        # every node's in-edges, the strongest first (weight descending, then source id): CSR by dst
        order = np.lexsort((graph.src, -graph.weight, graph.dst))
        self.in_src, self.in_dst, self.in_rel = graph.src[order], graph.dst[order], graph.rel[order]
        self.in_indptr = np.searchsorted(self.in_dst, np.arange(graph.n_nodes + 1), side="left")
        self._cached = functools.lru_cache(maxsize=65536)(self._subgraph)

    def __call__(self, prompt: Sequence[int]) -> Subgraph:
        ids = np.asarray(prompt, dtype=np.int64)
        ids = ids[(ids >= 0) & (ids < len(self.token_node))]
        grounded = np.unique(self.token_node[ids])
        return self._cached(tuple(grounded[grounded >= 0].tolist()))

    def _subgraph(self, grounded: tuple[int, ...]) -> Subgraph:
        g = self.graph
        per_hop = neighbours(g, list(grounded), self.hops, self.cap) if grounded else [np.zeros(0, np.int64)]
        nodes = np.concatenate(per_hop)
        hop = np.concatenate([np.full(len(h), i, dtype=np.int64) for i, h in enumerate(per_hop)])
        local, hop_of = np.full(g.n_nodes, -1, dtype=np.int64), np.full(g.n_nodes, -1, dtype=np.int64)
        local[nodes], hop_of[nodes] = np.arange(len(nodes)), hop
        # in-edges of the subgraph's nodes in local order, the strongest first; keep forward ones
        reached = hop > 0  # hop-0 nodes take no forward edge
        rows = csr_rows(self.in_indptr, nodes[reached])
        dst_hop = np.repeat(hop[reached], np.diff(self.in_indptr)[nodes[reached]])  # rows come node by node
        src_hop = hop_of[self.in_src[rows]]
        rows = rows[(src_hop >= 0) & (src_hop < dst_hop)]
        if self.max_in_edges:
            rows = rows[first_of_runs(self.in_dst[rows], self.max_in_edges)]
        if self.max_triples:
            rows = rows[: self.max_triples]  # the first nodes' (the earlier hops') edges first
        return Subgraph(nodes, hop, local[self.in_src[rows]], local[self.in_dst[rows]], self.in_rel[rows])


@dataclass
class GraphBatch:
    """Padded subgraphs of B rows: node_ids/node_tok/node_hop/node_mask (B, N) (padding: id 0,
    token −1, hop −1, False; the last column is always padding, the sink of empty slots); each
    node's in-edges as K slots in_src/in_rel (B, K, N) (source node, relation; an empty slot: the
    sink and relation −1; K = the batch's largest in-degree)."""

    node_ids: Tensor
    node_tok: Tensor
    node_hop: Tensor
    node_mask: Tensor
    in_src: Tensor
    in_rel: Tensor

    def to(self, device) -> "GraphBatch":
        return GraphBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def graph_batch(subgraphs: Sequence[Subgraph], node_tokens: np.ndarray) -> GraphBatch:
    """Pad ``subgraphs`` into one :class:`GraphBatch`; ``node_tokens`` (graph nodes,) token ids."""
    n = max(len(s.nodes) for s in subgraphs) + 1  # + the sink
    k = max([1, *(int(np.bincount(s.dst).max()) for s in subgraphs if len(s.dst))])
    b = len(subgraphs)
    ids, tok, hop = np.zeros((b, n), np.int64), np.full((b, n), -1, np.int64), np.full((b, n), -1, np.int64)
    src, rel = np.full((b, k, n), n - 1, np.int64), np.full((b, k, n), -1, np.int64)
    for i, s in enumerate(subgraphs):
        ids[i, : len(s.nodes)], tok[i, : len(s.nodes)], hop[i, : len(s.nodes)] = s.nodes, node_tokens[s.nodes], s.hop
        order = np.argsort(s.dst, kind="stable")
        d = s.dst[order]
        slot = run_ranks(d)  # rank among the node's in-edges
        src[i, slot, d], rel[i, slot, d] = s.src[order], s.rel[order]
    t = torch.from_numpy
    return GraphBatch(t(ids), t(tok), t(hop), t(hop >= 0), t(src), t(rel))


# ----------------------------------------------------------------------------- the model
class CompGCN(torch.nn.Module):
    """One CompGCN layer with subtraction composition (multigen's ``comp_gcn``)."""

    def __init__(self, d: int):
        super().__init__()
        self.w_self, self.w_nb, self.w_rel = (torch.nn.Linear(d, d, bias=False) for _ in range(3))

    def forward(self, h: Tensor, r: Tensor, src: Tensor, dst: Tensor, rel: Tensor) -> tuple[Tensor, Tensor]:
        """h (N, d), r (R, d), edges (E,) → (h' (N, d), r' (R, d))."""
        agg = torch.zeros_like(h)
        agg.index_add_(0, dst, h[src] - r[rel]).index_add_(0, src, h[dst] - r[rel])  # both directions
        count = torch.bincount(torch.cat([src, dst]), minlength=h.shape[0]).clamp_min(1)  # (N,)
        return torch.relu(self.w_self(h) + self.w_nb(agg / count[:, None])), self.w_rel(r)


class GRF(torch.nn.Module):
    """The LM plus the graph modules. ``lm``: a GPT-2-style HF causal LM (``transformer`` +
    ``lm_head``); the graph's edges are buffers, node embeddings a copy of the LM's."""

    def __init__(self, lm, graph: ConceptGraph, *, gamma: float = 0.5, hops: int = 2, gnn_layers: int = 2,
                 grounded: str = "exclude", learn_scale: bool = False, seed: int = 0):
        super().__init__()
        if grounded not in GROUNDED:
            raise ValueError(f"GRF: grounded={grounded!r} is not one of {GROUNDED}")
        self.lm, self.gamma, self.hops, self.grounded = lm, gamma, hops, grounded
        self.config = lm.config
        wte = lm.get_input_embeddings().weight
        d, v = wte.shape[1], wte.shape[0]
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global stream
            torch.manual_seed(seed)
            node = torch.randn(graph.n_nodes, d) * 0.02
            ok = torch.from_numpy((graph.tokens >= 0) & (graph.tokens < v))
            node[ok] = wte.detach()[torch.from_numpy(graph.tokens)[ok]].float()
            self.node_emb = torch.nn.Parameter(node)
            self.rel_emb = torch.nn.Parameter(torch.randn(max(1, len(graph.relations)), d) * 0.02)
            self.gnn = torch.nn.ModuleList(CompGCN(d) for _ in range(gnn_layers))
            self.triple = torch.nn.Linear(d, 3 * d, bias=False)  # s_t ↦ W s_t, split (q_u, q_r, q_v)
            self.gate = torch.nn.Linear(d, 1)
            # P_c = softmax(κ·score), κ = exp(log_scale) learned (off: κ = 1, the paper's). The
            # scores are sums of H sigmoids (each ≤ 1 + γ·…, about 3 at H = 2), so with κ = 1 no node
            # of ~200 can get more than ~e³/200 ≈ 10% of P_c: κ lets P_c be as sharp as it needs.
            self.log_scale = torch.nn.Parameter(torch.zeros(())) if learn_scale else None
            torch.nn.init.constant_(self.gate.bias, GATE_BIAS0)
        for name, arr in (("g_src", graph.src), ("g_dst", graph.dst), ("g_rel", graph.rel)):
            self.register_buffer(name, torch.from_numpy(np.asarray(arr, dtype=np.int64)), persistent=False)

    def encode(self) -> tuple[Tensor, Tensor]:
        """(node states (N_graph, d), relation states (R, d)) after the CompGCN layers."""
        h, r = self.node_emb, self.rel_emb
        for layer in self.gnn:
            h, r = layer(h, r, self.g_src, self.g_dst, self.g_rel)
        return h, r

    def can_take(self, gb: GraphBatch) -> Tensor:
        """(B, N) nodes P_c may put mass on."""
        ok = gb.node_mask & (gb.node_tok >= 0)
        return ok & (gb.node_hop > 0) if self.grounded == "exclude" else ok

    def train(self, mode: bool = True) -> "GRF":
        if mode:
            self._encoded = None  # the cached encoding is for fixed weights only
        return super().train(mode)

    def load_state_dict(self, *args, **kwargs):
        self._encoded = None
        return super().load_state_dict(*args, **kwargs)

    def context(self, gb: GraphBatch) -> dict:
        """What every step of a batch shares (computed once per batch, not per step): the
        encoded graph (G, d), relation states, each slot's (u, r) index (:func:`pair_index`), s^0
        (B, N) and γ·s^0 at the slots, the nodes P_c may put mass on (B, N), whether a row has any
        (B,) and P_c's support. In eval mode without gradients the graph's encoding is computed
        once and kept until ``train()``."""
        if self.training or torch.is_grad_enabled():
            node_all, rel_h = self.encode()
        else:
            if getattr(self, "_encoded", None) is None:
                self._encoded = self.encode()
            node_all, rel_h = self._encoded
        can = self.can_take(gb)
        s0 = (gb.node_hop == 0).float()
        return {"gb": gb, "graph_h": node_all, "rel_h": rel_h, "s0": s0,
                "start": self.gamma * _slots(s0[:, None, :], gb.in_src),
                "pairs": pair_index(gb.node_ids, gb.in_src, gb.in_rel, rel_h.shape[0]),
                "can": can, "has": can.any(1), "support": concept_support(can, gb.node_tok, self.config.vocab_size)}

    def head(self, hidden: Tensor, logits: Tensor, ctx: dict) -> dict[str, Tensor]:
        """Per position: ``lm`` log P_LM (B, T, V), ``concept`` log P_c (B, T, V), ``gate`` logit z
        (B, T) (−∞ where the row has no concept), ``mix`` log P (B, T, V). hidden (B, T, d);
        ``ctx``: :meth:`context` of the batch."""
        gb, query = ctx["gb"], self.triple(hidden)  # (B, T, 3d)
        r = triple_scores(query, ctx["graph_h"], ctx["rel_h"], gb.node_ids, ctx["pairs"])  # (B, T, K, N)
        scores = propagate(r, gb.in_src, ctx["s0"], gamma=self.gamma, hops=self.hops, start=ctx["start"])
        if self.log_scale is not None:
            scores = scores * self.log_scale.exp()
        lm = logits.float().log_softmax(-1)
        concept = concept_logprobs(scores, ctx["support"], lm.shape[-1])
        z = self.gate(hidden).squeeze(-1).float()
        z = torch.where(ctx["has"][:, None], z, -math.inf)
        return {"lm": lm, "concept": concept, "gate": z, "mix": mixture_logprobs(lm, concept, z)}

    def forward(self, input_ids: Tensor, attention_mask: Tensor, gb: GraphBatch, start: int) -> dict[str, Tensor]:
        """:meth:`head` at the positions that predict tokens ``start+1 ..`` of ``input_ids``
        (B, L) (``start`` = the prompt's length after BOS), plus ``labels`` and ``mask`` (B, T)."""
        hidden = self.lm.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = hidden[:, start:-1]  # (B, T = L − 1 − start, d): states that predict continuation tokens
        out = self.head(hidden, self.lm.lm_head(hidden), self.context(gb))
        out["labels"] = input_ids[:, start + 1 :]
        out["mask"] = attention_mask[:, start + 1 :].bool()
        return out


def in_support(labels: Tensor, gb: GraphBatch, can: Tensor) -> Tensor:
    """(B, T) bool: y_t is the token of a node P_c can put mass on."""
    tok = torch.where(can, gb.node_tok, -2)  # (B, N)
    return (labels[..., None] == tok[:, None, :]).any(-1)


def position_scores(model: GRF, input_ids: Tensor, attention_mask: Tensor, gb: GraphBatch, start: int
                    ) -> dict[str, Tensor]:
    """Per scored position (B, T): log P_LM(y), log P(y), gate logit, c_t (y in P_c's support), mask."""
    out = model(input_ids, attention_mask, gb, start)
    y = out["labels"][..., None]
    return {"lm": out["lm"].gather(2, y)[..., 0], "mix": out["mix"].gather(2, y)[..., 0], "gate": out["gate"],
            "in_graph": in_support(out["labels"], gb, model.can_take(gb)), "mask": out["mask"]}


# ----------------------------------------------------------------------------- decoding
@torch.no_grad()
def generate(model: GRF, prompts: Tensor, gb: GraphBatch | None, *, max_new_tokens: int, eos_id: int,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Ancestral sampling with a KV cache: each step draws y_t from the same mixture P as
    training (``gb`` None: from the LM alone, the baseline of the same loop). ``prompts`` (B, P):
    equal-length rows, BOS first. Returns each row's new tokens up to and including EOS. Runs on
    the model's device; draws on the CPU (``generator`` a CPU one), so a seed gives the same
    samples wherever the model is, up to the device's arithmetic."""
    model.eval()
    device = next(model.parameters()).device
    prompts = prompts.to(device)
    ctx = model.context(gb.to(device)) if gb is not None else None  # once per batch
    b = prompts.shape[0]
    out = model.lm.transformer(input_ids=prompts, use_cache=True)
    hidden, past = out.last_hidden_state[:, -1:], out.past_key_values  # (B, 1, d)
    rows = torch.zeros(b, 0, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits = model.lm.lm_head(hidden)  # (B, 1, V)
        logp = model.head(hidden, logits, ctx)["mix"] if ctx is not None else logits.float().log_softmax(-1)
        y = torch.multinomial(logp[:, 0].exp().cpu(), 1, generator=generator)[:, 0].to(device)  # (B,)
        y = torch.where(done, eos_id, y)
        rows = torch.cat([rows, y[:, None]], 1)
        done |= y == eos_id
        if bool(done.all()):
            break
        out = model.lm.transformer(input_ids=y[:, None], past_key_values=past, use_cache=True)
        hidden, past = out.last_hidden_state, out.past_key_values
    result = []
    for row in rows.tolist():
        result.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return result
