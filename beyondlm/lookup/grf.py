"""Graph look-up: GRF (Ji et al., "Language Generation with Multi-Hop Reasoning on Commonsense
Knowledge Graph", EMNLP 2020; code github.com/haozheji/multigen, ``MultiHopGen``).

A causal LM mixed, at every decoding step t, with a distribution over the concepts of a small
graph grounded in the prompt x (shared/METHODS.md, "Look-up models"):

1. Grounding (:class:`Grounder`): the prompt's tokens that are graph nodes are hop 0; expand
   ``hops`` hops with ≤ ``max_per_hop`` new nodes a hop (``beyondlm.graph.neighbours``). The
   subgraph's edges are the *forward* ones, (u, r, v) with hop(u) < hop(v): the edges the
   expansion walked, as multigen's ``find_neighbours_frequency`` keeps them (triples from a hop's
   frontier to nodes not seen before).
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
Shapes: B rows, T scored positions, N subgraph nodes (+1 sink for padding), E subgraph edges,
V vocabulary, d hidden size.
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
def propagate(triple_score: Tensor, src: Tensor, dst: Tensor, s0: Tensor, *, gamma: float, hops: int) -> Tensor:
    """Node scores Σ_{h=1..H} s^h (B, T, N) of the max-propagation (module docstring, 4.).

    triple_score (B, T, E) R_t per edge; src, dst (B, E) local node ids, dst = N for padding
    edges (a sink column dropped at the end); s0 (B, N) initial scores (1 grounded, 0 else)."""
    b, t, _ = triple_score.shape
    n = s0.shape[1]
    src_i = src[:, None, :].expand(b, t, -1)  # (B, T, E)
    dst_i = dst[:, None, :].expand(b, t, -1)
    s = s0[:, None, :].expand(b, t, n).to(triple_score.dtype)  # (B, T, N)
    total = torch.zeros_like(s)
    for _ in range(hops):
        update = gamma * s.gather(2, src_i) + triple_score  # (B, T, E)
        floor = triple_score.new_zeros(b, t, n + 1)  # s = 0 for nodes without in-edges; column N: sink
        s = floor.scatter_reduce(2, dst_i, update, reduce="amax", include_self=True)[..., :n]
        total = total + s
    return total


def node_logits(query: Tensor, node_h: Tensor, rel_h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The three parts of the triple logit [h_u; h_r; h_v]ᵀ W s_t: from query = W s_t (B, T, 3d)
    split in (q_u, q_r, q_v), q_u·h_n and q_v·h_n per node (B, T, N) and q_r·h_r per relation
    (B, T, R); node_h (B, N, d), rel_h (R, d). Each dot is taken once per node or relation."""
    q_u, q_r, q_v = query.chunk(3, dim=-1)  # (B, T, d) each
    return (torch.einsum("btd,bnd->btn", q_u, node_h), q_r @ rel_h.T, torch.einsum("btd,bnd->btn", q_v, node_h))


def _edges(idx: Tensor, t: int) -> Tensor:
    """(B, E) edge indices → (B, T, E), for gathers along the last dim."""
    return idx[:, None, :].expand(idx.shape[0], t, idx.shape[1])


def triple_scores(query: Tensor, node_h: Tensor, rel_h: Tensor, src: Tensor, rel: Tensor, dst: Tensor) -> Tensor:
    """R_t(u,r,v) = σ([h_u; h_r; h_v]ᵀ W s_t) (B, T, E), decomposed (:func:`node_logits`): the
    per-node and per-relation dots gathered per edge, O(B·T·(N+R)·d + B·T·E), no per-edge
    concatenation. src/rel/dst (B, E); dst may be N (padding: scored against node N−1, dropped
    by :func:`propagate`)."""
    a_u, a_r, a_v = node_logits(query, node_h, rel_h)
    t, n = query.shape[1], node_h.shape[1]
    return torch.sigmoid(a_u.gather(2, _edges(src, t)) + a_r.gather(2, _edges(rel, t))
                         + a_v.gather(2, _edges(dst.clamp(max=n - 1), t)))


def propagate_by_winners(parts: tuple[Tensor, Tensor, Tensor], src: Tensor, rel: Tensor, dst: Tensor, s0: Tensor,
                         *, gamma: float, hops: int) -> Tensor:
    """:func:`propagate` of the triple scores of ``parts`` (:func:`node_logits`), the same values,
    with gradients that cost O(B·T·N) instead of O(B·T·E): the max over in-edges is found
    without autograd (scatter_reduce amax), then each node's score is recomputed along its
    winning edge, s^{h+1}(v) = γ·s^h(u*) + σ(a_u(u*) + a_r(r*) + a_v(v)). The gradient is amax's
    subgradient through one winner (ties: the highest edge index) instead of split evenly."""
    a_u, a_r, a_v = parts
    b, t, n = a_u.shape
    e_src, e_rel, e_dst = _edges(src, t), _edges(rel, t), _edges(dst, t)
    wins = []
    with torch.no_grad():
        r = torch.sigmoid(a_u.gather(2, e_src) + a_r.gather(2, e_rel) + a_v.gather(2, _edges(dst.clamp(max=n - 1), t)))
        s = s0[:, None, :].expand(b, t, n).to(r.dtype)
        edge_id = torch.arange(src.shape[1], device=src.device).expand(b, t, -1)  # (B, T, E)
        for _ in range(hops):
            update = gamma * s.gather(2, e_src) + r  # (B, T, E), > 0
            best = r.new_zeros(b, t, n + 1).scatter_reduce(2, e_dst, update, reduce="amax", include_self=True)
            mine = torch.where(update == best.gather(2, e_dst), edge_id, -1)
            wins.append(edge_id.new_full((b, t, n + 1), -1).scatter_reduce(2, e_dst, mine, reduce="amax",
                                                                           include_self=True)[..., :n])
            s = best[..., :n]
    s = s0[:, None, :].expand(b, t, n).to(a_u.dtype)
    total = torch.zeros_like(s)
    for win in wins:  # (B, T, N) winning edge per node, −1: no in-edge
        w = win.clamp(min=0)
        u, r_id = e_src.gather(2, w), e_rel.gather(2, w)  # (B, T, N)
        value = gamma * s.gather(2, u) + torch.sigmoid(a_u.gather(2, u) + a_r.gather(2, r_id) + a_v)
        s = torch.where(win >= 0, value, 0.0)
        total = total + s
    return total


def concept_logprobs(scores: Tensor, can_take: Tensor, node_tok: Tensor, vocab_size: int) -> Tensor:
    """log P_c over the vocabulary (B, T, V): log-softmax of node scores (B, T, N) over the nodes
    ``can_take`` (B, N), scattered to their tokens ``node_tok`` (B, N); −inf elsewhere and in
    rows where no node can take mass."""
    b, t, n = scores.shape
    has = can_take.any(1)  # (B,)
    masked = torch.where(can_take[:, None, :], scores, -math.inf)
    masked = torch.where(has[:, None, None], masked, 0.0)  # an empty row: finite, discarded below
    logp = torch.where(can_take[:, None, :], masked.log_softmax(-1), -math.inf)  # (B, T, N)
    col = torch.where(can_take, node_tok, vocab_size)[:, None, :].expand(b, t, n)  # sink column V
    out = logp.new_full((b, t, vocab_size + 1), -math.inf).scatter(2, col, logp)
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
    indices ``src``, ``dst`` (e,) and relation ids ``rel`` (e,)."""

    nodes: np.ndarray
    hop: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    rel: np.ndarray


class Grounder:
    """Prompt tokens → :class:`Subgraph` (cached per set of grounded nodes)."""

    def __init__(self, graph: ConceptGraph, vocab_size: int, *, hops: int, max_per_hop: int):
        self.graph, self.hops, self.cap = graph, hops, max_per_hop
        self.token_node = np.full(max(vocab_size, int(graph.tokens.max(initial=-1)) + 1), -1, dtype=np.int64)
        has = np.flatnonzero(graph.tokens >= 0)
        self.token_node[graph.tokens[has][::-1]] = has[::-1]  # a token shared by nodes: the first node
        self.indptr = graph.out_slice()
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
        local = np.full(g.n_nodes, -1, dtype=np.int64)
        local[nodes] = np.arange(len(nodes))
        rows = csr_rows(self.indptr, nodes)
        rows = rows[local[g.dst[rows]] >= 0]
        s, d = local[g.src[rows]], local[g.dst[rows]]
        fwd = hop[s] < hop[d]
        return Subgraph(nodes, hop, s[fwd], d[fwd], g.rel[rows][fwd])


@dataclass
class GraphBatch:
    """Padded subgraphs of B rows: node_ids/node_tok/node_hop/node_mask (B, N) (padding: id 0,
    token −1, hop −1, False); src/dst/rel (B, E) (padding: dst = N, the sink)."""

    node_ids: Tensor
    node_tok: Tensor
    node_hop: Tensor
    node_mask: Tensor
    src: Tensor
    dst: Tensor
    rel: Tensor

    def to(self, device) -> "GraphBatch":
        return GraphBatch(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def graph_batch(subgraphs: Sequence[Subgraph], node_tokens: np.ndarray) -> GraphBatch:
    """Pad ``subgraphs`` into one :class:`GraphBatch`; ``node_tokens`` (graph nodes,) token ids."""
    n = max(1, max(len(s.nodes) for s in subgraphs))
    e = max(1, max(len(s.src) for s in subgraphs))
    b = len(subgraphs)
    ids, tok, hop = np.zeros((b, n), np.int64), np.full((b, n), -1, np.int64), np.full((b, n), -1, np.int64)
    src, dst, rel = np.zeros((b, e), np.int64), np.full((b, e), n, np.int64), np.zeros((b, e), np.int64)
    for i, s in enumerate(subgraphs):
        k, m = len(s.nodes), len(s.src)
        ids[i, :k], tok[i, :k], hop[i, :k] = s.nodes, node_tokens[s.nodes], s.hop
        src[i, :m], dst[i, :m], rel[i, :m] = s.src, s.dst, s.rel
    t = torch.from_numpy
    return GraphBatch(t(ids), t(tok), t(hop), t(hop >= 0), t(src), t(dst), t(rel))


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
        encoded graph gathered to each row's nodes (B, N, d), relation states, s^0 (B, N), the
        nodes P_c may put mass on (B, N) and whether a row has any (B,). In eval mode without
        gradients the graph's encoding is computed once and kept until ``train()``."""
        if self.training or torch.is_grad_enabled():
            node_all, rel_h = self.encode()
        else:
            if getattr(self, "_encoded", None) is None:
                self._encoded = self.encode()
            node_all, rel_h = self._encoded
        can = self.can_take(gb)
        return {"gb": gb, "node_h": node_all[gb.node_ids], "rel_h": rel_h, "s0": (gb.node_hop == 0).float(),
                "can": can, "has": can.any(1)}

    def head(self, hidden: Tensor, logits: Tensor, ctx: dict) -> dict[str, Tensor]:
        """Per position: ``lm`` log P_LM (B, T, V), ``concept`` log P_c (B, T, V), ``gate`` logit z
        (B, T) (−∞ where the row has no concept), ``mix`` log P (B, T, V). hidden (B, T, d);
        ``ctx``: :meth:`context` of the batch."""
        gb, query = ctx["gb"], self.triple(hidden)  # (B, T, 3d)
        if torch.is_grad_enabled():  # training: gradients through the winning edges only
            parts = node_logits(query, ctx["node_h"], ctx["rel_h"])
            scores = propagate_by_winners(parts, gb.src, gb.rel, gb.dst, ctx["s0"], gamma=self.gamma, hops=self.hops)
        else:
            r = triple_scores(query, ctx["node_h"], ctx["rel_h"], gb.src, gb.rel, gb.dst)  # (B, T, E)
            scores = propagate(r, gb.src, gb.dst, ctx["s0"], gamma=self.gamma, hops=self.hops)
        if self.log_scale is not None:
            scores = scores * self.log_scale.exp()
        lm = logits.float().log_softmax(-1)
        concept = concept_logprobs(scores, ctx["can"], gb.node_tok, lm.shape[-1])
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
    equal-length rows, BOS first. Returns each row's new tokens up to and including EOS."""
    model.eval()
    ctx = model.context(gb) if gb is not None else None  # once per batch
    b = prompts.shape[0]
    out = model.lm.transformer(input_ids=prompts, use_cache=True)
    hidden, past = out.last_hidden_state[:, -1:], out.past_key_values  # (B, 1, d)
    rows = torch.zeros(b, 0, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model.lm.lm_head(hidden)  # (B, 1, V)
        logp = model.head(hidden, logits, ctx)["mix"] if ctx is not None else logits.float().log_softmax(-1)
        y = torch.multinomial(logp[:, 0].exp(), 1, generator=generator)[:, 0]  # (B,)
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
