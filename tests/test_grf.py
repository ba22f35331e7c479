"""GRF (beyondlm/lookup/grf.py): propagation by hand, the LM limit case, the mixture, the loss, config errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from beyondlm.config import ConfigError, load_section
from beyondlm.graph import build_graph
from beyondlm.lookup.grf import (
    GRF, Grounder, concept_logprobs, concept_support, graph_batch, grf_loss, mixture_logprobs, position_scores, propagate,
    first_of_runs, pair_index, triple_scores, generate,
)
from beyondlm.lookup.grf_experiment import GRFConfig
from tests.helpers import tiny_setup

# A hand-built 5-node graph: node 0 grounded (hop 0), 1 and 2 at hop 1, 3 and 4 at hop 2.
EDGES = [(0, 1), (0, 2), (1, 3), (2, 3), (2, 4), (1, 4)]
R = [0.5, 0.2, 0.4, 0.9, 0.1, 0.3]  # R_t(u, r, v) of each edge, one position


def _slots(edges, values, n, k, rels=None):
    """Edge list over n nodes → in-edge slots (1, K, N + 1) (source, relation: −1 when empty)
    and the values (1, 1, K, N + 1), slots filled in edge order; empty slots point at the sink
    node N (s0 = 0, no in-edges) with R = 0, as graph_batch and triple_scores make them."""
    src, rel = torch.full((1, k, n + 1), n, dtype=torch.long), torch.full((1, k, n + 1), -1, dtype=torch.long)
    val = torch.zeros((1, 1, k, n + 1), dtype=torch.float64)
    fill = [0] * n
    for j, ((u, v), x) in enumerate(zip(edges, values)):
        src[0, fill[v], v], rel[0, fill[v], v], val[0, 0, fill[v], v] = u, rels[j] if rels else 0, x
        fill[v] += 1
    return src, rel, val


def test_propagation_on_a_five_node_graph_by_hand():
    # γ = 0.5, s0 = (1, 0, 0, 0, 0); s^{h+1}(v) = max(0, max_{u→v} γ s^h(u) + R(u, v)):
    # s1 = (0, 0.5+0.5, 0.5+0.2, max(0+0.4, 0+0.9), max(0+0.1, 0+0.3)) = (0, 1.0, 0.7, 0.9, 0.3)
    # s2 = (0, 0+0.5, 0+0.2, max(0.5·1.0+0.4, 0.5·0.7+0.9), max(0.5·0.7+0.1, 0.5·1.0+0.3))
    #    = (0, 0.5, 0.2, 1.25, 0.8);  score = s1 + s2
    want = torch.tensor([0.0, 1.5, 0.9, 2.15, 1.1, 0.0], dtype=torch.float64)  # the sink stays 0
    src, _, r = _slots(EDGES, R, n=5, k=3)  # 3 slots: one more than the largest in-degree
    s0 = torch.tensor([[1.0, 0, 0, 0, 0, 0]], dtype=torch.float64)
    got = propagate(r, src, s0, gamma=0.5, hops=2)[0, 0]
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    # one hop: s1 only
    assert torch.allclose(propagate(r, src, s0, gamma=0.5, hops=1)[0, 0],
                          torch.tensor([0.0, 1.0, 0.7, 0.9, 0.3, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)


def test_decomposed_triple_scores_and_their_gradients_match_the_direct_forms():
    torch.manual_seed(0)
    b, t, n, g, d, n_rel = 2, 3, 5, 7, 4, 2
    query = torch.randn(b, t, 3 * d, dtype=torch.float64, requires_grad=True)
    graph_h, rel_h = torch.randn(g, d, dtype=torch.float64), torch.randn(n_rel, d, dtype=torch.float64)
    node_ids = torch.stack([torch.randperm(g)[: n + 1] for _ in range(b)])  # subgraphs + sink, graph ids
    rels = [0, 1, 0, 1, 0, 1]
    src, in_rel, _ = _slots(EDGES, [0.0] * len(EDGES), n, 2, rels)
    src, in_rel = src.expand(b, -1, -1), in_rel.expand(b, -1, -1)
    got = triple_scores(query, graph_h, rel_h, node_ids, pair_index(node_ids, src, in_rel, n_rel))  # (B, T, K, N+1)
    assert bool((got[:, :, in_rel[0] < 0] == 0).all())  # empty slots: σ(−∞) = 0
    s0 = torch.zeros(b, n + 1, dtype=torch.float64)
    s0[:, 0] = 1
    fast = propagate(got, src, s0, gamma=0.5, hops=2)[..., :n]
    # the direct form, edge by edge: R = σ([h_u; h_r; h_v]ᵀ (W s_t)), s^{h+1}(v) = max over in-edges
    ref_rows = []
    for i in range(b):
        node_h = graph_h[node_ids[i]]  # (N, d)
        trip = torch.cat([node_h[[u for u, _ in EDGES]], rel_h[rels], node_h[[v for _, v in EDGES]]], -1)
        direct = torch.sigmoid(query[i] @ trip.T)  # (T, E)
        for j, (u, v) in enumerate(EDGES):
            slot = [e for e in EDGES if e[1] == v].index((u, v))
            assert torch.allclose(got[i, :, slot, v], direct[:, j], atol=1e-12)
        s, total = s0[i, :n].expand(t, n), 0
        for _ in range(2):
            s = torch.stack([torch.stack([0.5 * s[:, u] + direct[:, j] for j, (u, w) in enumerate(EDGES) if w == v]
                                         ).amax(0).clamp_min(0) if any(w == v for _, w in EDGES)
                             else torch.zeros(t, dtype=torch.float64) for v in range(n)], -1)
            total = total + s
        ref_rows.append(total)
    ref = torch.stack(ref_rows)
    assert torch.allclose(fast, ref, atol=1e-12)
    g_ref, = torch.autograd.grad(ref.sum(), query, retain_graph=True)
    g_fast, = torch.autograd.grad(fast.sum(), query)
    assert torch.allclose(g_fast, g_ref, atol=1e-10)  # random scores: no ties


def test_grounder_keeps_the_strongest_in_edges_and_caps_the_total():
    # node 0 grounded; 1, 2, 3 at hop 1; 4 at hop 2 with in-edges from 1 (w 1), 2 (w 5), 3 (w 3)
    edges = {(0, 1, "precedes"): 9, (0, 2, "precedes"): 8, (0, 3, "precedes"): 7,
             (1, 4, "precedes"): 1, (2, 4, "precedes"): 5, (3, 4, "co_occurs"): 3}
    _, graph, v = _tiny_grf(edges)
    name, n = dict(enumerate(graph.names)), _names()  # n: the names the edge keys index
    prompt = [int(graph.tokens[graph.node_ids([n[0]])[0]])]

    def kept(**caps):
        sub = Grounder(graph, v, hops=2, max_per_hop=10, **caps)(prompt)
        return [(name[int(sub.nodes[a])], name[int(sub.nodes[b])]) for a, b in zip(sub.src, sub.dst)]

    into4 = [(n[2], n[4]), (n[3], n[4]), (n[1], n[4])]  # heaviest first
    hop1 = {(n[0], n[1]), (n[0], n[2]), (n[0], n[3])}
    assert set(kept()[:3]) == hop1 and kept()[3:] == into4  # hop 1's nodes first (local order)
    assert kept(max_in_edges=2)[3:] == into4[:2]
    assert set(kept(max_in_edges=1, max_triples=3)) == hop1  # the cap takes the earlier hop's edges first


def test_first_of_runs_marks_the_head_of_each_run():
    assert first_of_runs(np.array([3, 3, 3, 1, 1, 2]), 2).tolist() == [True, True, False, True, True, True]


def _names() -> list[str]:
    """The six node names of :func:`_tiny_grf`'s graph (its edge keys index this list)."""
    return [tiny_setup()[0].vocab[i] for i in range(2, 8)]


def _tiny_grf(edges: dict, *, grounded="exclude", seed=0):
    _, tok, lm = tiny_setup()
    v = len(tok)
    names = _names()
    graph = build_graph(names, [10] * 6, list(range(2, 8)), edges)
    return GRF(lm.eval(), graph, gamma=0.5, hops=2, grounded=grounded, seed=seed), graph, v


def _batch(graph, v, rows, prompt_len=2):
    grounder = Grounder(graph, v, hops=2, max_per_hop=10)
    gb = graph_batch([grounder(r[1 : prompt_len + 1]) for r in rows], graph.tokens)
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask, gb


def test_no_edges_and_gate_forced_to_zero_is_exactly_the_lm():
    model, graph, v = _tiny_grf({})
    with torch.no_grad():
        model.gate.bias.fill_(-math.inf)
    rows = [[0, 2, 3, 4, 5, 6, 0], [0, 3, 1, 7, 0]]
    ids, mask, gb = _batch(graph, v, rows)
    with torch.no_grad():
        out = model(ids, mask, gb, start=2)
        logits = model.lm(input_ids=ids, attention_mask=mask).logits[:, 2:-1]
    assert torch.equal(out["mix"], logits.float().log_softmax(-1))
    # and without forcing the gate: no node can take mass (no edges, grounded ones excluded) → the LM too
    model2, _, _ = _tiny_grf({})
    with torch.no_grad():
        assert torch.equal(model2(ids, mask, gb, start=2)["mix"], logits.float().log_softmax(-1))


def test_mixture_sums_to_one_and_gate_stays_in_the_unit_interval():
    edges = {(0, 1, "precedes"): 3, (0, 2, "co_occurs"): 2, (1, 3, "precedes"): 1, (2, 4, "precedes"): 1,
             (4, 5, "co_occurs"): 1}
    model, graph, v = _tiny_grf(edges, grounded="keep")
    with torch.no_grad():
        model.gate.weight.normal_(0, 10)  # extreme gates
    rows = [[0, 2, 3, 4, 5, 6, 0], [0, 9, 1, 7, 0], [0, 5, 6, 2, 0]]
    ids, mask, gb = _batch(graph, v, rows)
    with torch.no_grad():
        out = model(ids, mask, gb, start=2)
    total = out["mix"].exp().sum(-1)[out["mask"]]
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    g = torch.sigmoid(out["gate"])
    assert bool(((g >= 0) & (g <= 1)).all())
    pc = out["concept"].exp().sum(-1)  # P_c sums to 1 where the row has concepts
    has = model.can_take(gb).any(1)
    assert torch.allclose(pc[has], torch.ones_like(pc[has]), atol=1e-5)
    assert bool((pc[~has] == 0).all())


def test_mixture_and_loss_hand_values():
    lm = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    concept = torch.log(torch.tensor([[[0.0, 0.25, 0.75]]]))
    z = torch.tensor([[math.log(1 / 3)]])  # g = 0.25
    mix = mixture_logprobs(lm, concept, z).exp()[0, 0]
    assert torch.allclose(mix, torch.tensor([0.375, 0.75 * 0.25 + 0.0625, 0.75 * 0.25 + 0.1875]))
    # loss = −log P(y) + α·BCE: P(y) = 0.25, g = 0.5 with c = 1, α = 2 → log 4 + 2 log 2 = 4 log 2;
    # a masked position and a row without concepts (z = −∞, c = 0) add nothing
    logp_y = torch.log(torch.tensor([[0.25, 0.9], [0.5, 0.5]]))
    gate = torch.tensor([[0.0, 3.0], [-math.inf, -math.inf]])
    c = torch.tensor([[True, False], [False, False]])
    mask = torch.tensor([[True, False], [False, False]])
    total, nll, bce = grf_loss(logp_y, gate, c, mask, alpha=2.0)
    assert math.isclose(total.item(), 4 * math.log(2), rel_tol=1e-6)
    assert math.isclose(nll.item(), 2 * math.log(2), rel_tol=1e-6) and math.isclose(bce.item(), math.log(2), rel_tol=1e-6)


def test_concept_distribution_maps_nodes_to_their_tokens():
    scores = torch.tensor([[[0.0, math.log(3.0), 5.0]]])  # node 2 cannot take mass
    can = torch.tensor([[True, True, False]])
    tok = torch.tensor([[4, 1, 2]])
    p = concept_logprobs(scores, concept_support(can, tok, 6), 6).exp()[0, 0]
    assert torch.allclose(p, torch.tensor([0.0, 0.75, 0.0, 0.0, 0.25, 0.0]))
    none = concept_logprobs(scores, concept_support(can & False, tok, 6), 6)  # no node can: −inf everywhere
    assert bool(torch.isneginf(none).all())


def test_training_step_moves_every_graph_parameter_and_sampling_runs():
    edges = {(0, 1, "precedes"): 3, (0, 2, "co_occurs"): 2, (1, 3, "precedes"): 1, (2, 4, "precedes"): 1}
    model, graph, v = _tiny_grf(edges, grounded="keep")
    rows = [[0, 2, 3, 4, 5, 6, 0], [0, 2, 1, 7, 0]]
    ids, mask, gb = _batch(graph, v, rows)
    before = {k: p.detach().clone() for k, p in model.named_parameters() if not k.startswith("lm.")}
    sc = position_scores(model.train(), ids, mask, gb, 2)
    loss, _, _ = grf_loss(sc["mix"], sc["gate"], sc["in_graph"], sc["mask"], alpha=1.0)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    moved = {k for k, p in model.named_parameters() if k in before and not torch.equal(p, before[k])}
    assert moved == set(before), set(before) - moved
    out = generate(model, ids[:, :3], gb, max_new_tokens=5, eos_id=0, generator=torch.Generator().manual_seed(0))
    assert len(out) == 2 and all(1 <= len(r) <= 5 for r in out)


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
def test_scoring_and_sampling_run_where_the_model_is(device):
    """After training the model sits on accelerate's device (a GPU where there is one) while the
    texts, prompts, graph batches and the seeded generator are made on the CPU: scores and samples
    equal those of the model on the CPU (sampling draws on the CPU whatever the device)."""
    import copy

    from beyondlm.lookup.grf_experiment import collate_fn, score_lm, score_texts

    edges = {(0, 1, "precedes"): 3, (0, 2, "co_occurs"): 2, (1, 3, "precedes"): 1, (2, 4, "precedes"): 1}
    model, graph, v = _tiny_grf(edges, grounded="keep")
    rows = [[0, 2, 3, 4, 5, 6, 0], [0, 2, 1, 7, 0]]
    ids, _, gb = _batch(graph, v, rows)
    collate = collate_fn(Grounder(graph, v, hops=2, max_per_hop=10), graph.tokens, 2, 0)
    moved = copy.deepcopy(model).to(device)
    for name, on_cpu in score_texts(model, rows, collate, 2, 8).items():
        np.testing.assert_allclose(score_texts(moved, rows, collate, 2, 8)[name], on_cpu, rtol=1e-5, atol=1e-6, err_msg=name)
    for name, on_cpu in score_lm(model.lm, rows, 2, 0, 8).items():
        np.testing.assert_allclose(score_lm(moved.lm, rows, 2, 0, 8)[name], on_cpu, rtol=1e-5, atol=1e-6, err_msg=name)
    for graph_batch_or_none in (gb, None):
        samples = [generate(m, ids[:, :3], graph_batch_or_none, max_new_tokens=5, eos_id=0,
                            generator=torch.Generator().manual_seed(0)) for m in (model, moved)]
        assert samples[0] == samples[1]


def test_grounder_expands_hops_and_keeps_forward_edges():
    edges = {(0, 1, "precedes"): 3, (1, 0, "precedes"): 3, (1, 2, "precedes"): 1, (2, 3, "precedes"): 1}
    _, graph, v = _tiny_grf(edges)
    tok_of = dict(zip(graph.names, graph.tokens))
    sub = Grounder(graph, v, hops=2, max_per_hop=10)([graph.tokens[graph.node_ids([graph.names[0]])[0]]])
    assert len(sub.nodes) >= 1 and (sub.hop[sub.src] < sub.hop[sub.dst]).all()  # no backward edge
    gb = graph_batch([sub], graph.tokens)  # the slots hold exactly the subgraph's edges
    held = {(int(gb.in_src[0, k, v]), int(gb.in_rel[0, k, v]), v) for k, v in zip(*np.nonzero(gb.in_rel[0].numpy() >= 0))}
    assert held == set(zip(sub.src.tolist(), sub.rel.tolist(), sub.dst.tolist())) and len(held) == len(sub.src)
    assert tok_of  # graph tokens are the language's ids


@pytest.mark.parametrize("raw, key", [({"gamma": 1.5}, "grf.gamma"), ({"grounded": "drop"}, "grf.grounded"),
                                      ({"hops": 0}, "grf.hops"), ({"seeds": []}, "grf.seeds"),
                                      ({"gama": 0.5}, "grf.gama")])
def test_config_errors_name_the_key_the_value_and_the_fix(raw, key):
    with pytest.raises(ConfigError) as err:
        load_section(GRFConfig, raw, "grf")
    msg = str(err.value)
    assert key in msg and (str(next(iter(raw.values()))) in msg or "Allowed keys" in msg)
    cfg = load_section(GRFConfig, {}, "grf")
    with pytest.raises(ConfigError, match="grf.seeds"):
        cfg.check_seed(7)


def test_report_lookup_section_and_claim(tmp_path):
    from beyondlm.io import write_json
    from beyondlm.report import convergence, lookup

    metrics = tmp_path / "metrics"
    conv = {"converged": True, "rel_improvement": 0.0, "tol": 0.01, "window": 0.25, "best_step": 10,
            "best_valid_loss": 1.0, "final_valid_loss": 1.0, "n_evals": 3, "gain": 0.0, "noise": 0.0}
    for seed, grf in ((0, 15.0), (1, 15.2), (2, 14.9)):
        write_json(metrics / "grf" / f"s{seed}.json", {
            "converged": True, "convergence": conv if seed else {**conv, "converged": False}, "prompt_len": 8,
            "n_test": 10, "subgraph": {"grounded": 3, "nodes": 100, "edges": 900},
            "test": {"lm": 16.0, "lm_finetuned": 16.0, "grf": grf, "n_tokens": 100},
            "gate": {"mean": 0.1, "content": 0.2, "function": 0.05, "in_graph_frac": 0.3, "groups_by": "word_class"},
            "samples": {"lm": {"impossible_frac_at_data_length": 0.5}, "grf": {"impossible_frac_at_data_length": 0.6}}})
    text = "\n".join(lookup.lookup_section(metrics, tmp_path))
    assert "| GRF | after the prompt | 15.033 ± 0.088 |" in text  # mean ± std/√3 of (15, 15.2, 14.9)
    assert "GRF's fine-tuned LM" not in text  # the LM was frozen: no separate row
    verdicts = convergence.Verdicts(convergence.collect(metrics))
    (claim,) = lookup.claims(metrics, verdicts, None)
    assert math.isclose(claim.effect.value, 15.0333 - 16.0, abs_tol=1e-3)
    assert claim.verdict == "inconclusive: not converged" and claim.failing == ("grf/s0",)
