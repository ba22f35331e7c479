"""Learned kNN-LM gate and adaptive retrieval: bounds, limit cases, hand-computed values, a fit
that must find when to trust the neighbours, config errors."""

import math

import numpy as np
import pytest
import torch

from beyondlm.config import ConfigError, load_section
from beyondlm.lookup.gate import (
    GATES,
    LM_FEATURES,
    Gate,
    TokenScores,
    adaptive_logps,
    best_constant_lambda,
    best_saving,
    constant_logit,
    content_tokens,
    evaluate_gates,
    fit_gate,
    frequent_tokens,
    lm_features,
    mixture_logps,
    retrieval_features,
    target_groups,
    GateConfig,
)
from beyondlm.lookup.knnlm import KnnlmConfig
from tests.helpers import tiny_language


def _logps(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random per-position (log p_LM(y), log p_kNN(y)) (n,), a fifth of the kNN ones −inf."""
    g = torch.Generator().manual_seed(seed)
    lm = torch.log(torch.rand(n, generator=g, dtype=torch.float64) * 0.9 + 0.05)
    knn = torch.log(torch.rand(n, generator=g, dtype=torch.float64))
    knn[torch.rand(n, generator=g) < 0.2] = -math.inf  # target not among the neighbours
    return lm, knn


def _trust_problem(n: int = 4000, seed: int = 0) -> TokenScores:
    """The kNN is right (p_kNN(y) = 0.9) exactly where feature ``a`` > 0.5, else wrong (0.01 or
    absent); the LM gives 0.2 everywhere; ``b`` is noise."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.normal(size=n)
    knn = np.where(a > 0.5, math.log(0.9), math.log(0.01))
    knn[(a <= 0.5) & (rng.random(n) < 0.3)] = -math.inf
    return TokenScores(labels=np.zeros(n, dtype=np.int64), lm_logp=np.full(n, math.log(0.2)),
                       knn_logp=knn, features={"a": a, "b": b})


# ----------------------------------------------------------------------------- mixing, limits
def test_mixture_hand_computed():
    # λ = 0.25, p_kNN(y) = 0.5, p_LM(y) = 0.1: 0.25·0.5 + 0.75·0.1 = 0.2
    got = mixture_logps(torch.tensor([math.log(0.1)], dtype=torch.float64), torch.tensor([math.log(0.5)], dtype=torch.float64),
                        constant_logit(0.25, 1))
    assert got.item() == pytest.approx(math.log(0.2), abs=1e-12)


def test_gate_forced_to_zero_is_the_lm_and_to_one_the_knn():
    lm, knn = _logps(500)
    assert torch.equal(mixture_logps(lm, knn, constant_logit(0.0, 500)), lm)
    assert torch.equal(mixture_logps(lm, knn, constant_logit(1.0, 500)), knn)
    gate = Gate(("x",), torch.zeros(1), torch.ones(1), hidden=0, lam0=0.5)
    with torch.no_grad():
        gate.net[-1].bias.fill_(-math.inf)  # a gate whose λ is 0 everywhere
        s = gate.logits(torch.randn(500, 1, dtype=torch.float64))
    assert torch.equal(torch.sigmoid(s), torch.zeros(500, dtype=torch.float64))
    assert torch.equal(mixture_logps(lm, knn, s), lm)


def test_adaptive_retrieval_at_threshold_zero_is_full_retrieval():
    lm, knn = _logps(1000, seed=1)
    s = torch.randn(1000, dtype=torch.float64) * 3
    logps, skipped = adaptive_logps(lm, knn, s, 0.0)
    assert not skipped.any()
    assert torch.equal(logps, mixture_logps(lm, knn, s))  # same log-probs, bit for bit
    # above every λ: every query skipped, the LM alone
    logps, skipped = adaptive_logps(lm, knn, s, torch.sigmoid(s).max().item() + 1e-9)
    assert skipped.all() and torch.equal(logps, lm)
    # in between: the skipped positions are exactly those with λ < τ, and they take p_LM
    logps, skipped = adaptive_logps(lm, knn, s, 0.5, mix_logit=torch.zeros(1000, dtype=torch.float64))
    assert torch.equal(skipped, s < 0)
    assert torch.equal(logps[skipped], lm[skipped])
    assert torch.equal(logps[~skipped], mixture_logps(lm, knn, torch.zeros(1000, dtype=torch.float64))[~skipped])


# ----------------------------------------------------------------------------- bounds
@pytest.mark.parametrize("hidden", [0, 8])
def test_gate_never_leaves_the_unit_interval(hidden):
    torch.manual_seed(0)
    n_in = 5
    gate = Gate(tuple("abcde"), torch.randn(n_in), torch.rand(n_in) + 0.1, hidden=hidden, lam0=0.3, seed=1)
    with torch.no_grad():
        for p in gate.parameters():
            p.copy_(torch.randn_like(p) * 100)  # far from any fitted gate
    x = torch.randn(2000, n_in, dtype=torch.float64) * torch.tensor([1, 10, 1e3, 1e6, 1e-6], dtype=torch.float64)
    x[:50] = 1e6
    x[50:100] = -1e6
    x[100:110, 0], x[110:120, 1], x[120:130, 2] = math.inf, -math.inf, math.nan
    x[130:140] = 0.0
    lam = gate(x)
    assert not torch.isnan(lam).any()
    assert ((lam >= 0) & (lam <= 1)).all()
    assert lam.min() < 0.01 and lam.max() > 0.99  # the extremes were reached, and still in range


def test_features_hand_computed():
    lm = torch.log(torch.tensor([[0.5, 0.25, 0.25, 0.0]]))  # one token impossible: −inf
    f = lm_features(lm)
    assert f["lm_entropy"].item() == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert f["lm_max_logp"].item() == pytest.approx(math.log(0.5))
    assert f["lm_margin"].item() == pytest.approx(math.log(2))
    # neighbours at d = 0, 3, (none); tokens 2, 2, 3: p_kNN(2) = 1
    dist, toks = torch.tensor([[0.0, 3.0, math.inf]]), torch.tensor([[2, 2, 3]])
    knn = torch.log(torch.tensor([[0.0, 0.0, 1.0, 0.0]]))
    r = retrieval_features(dist, toks, knn, lm)
    assert r["knn_log_d1"].item() == 0.0
    assert r["knn_log_dmean"].item() == pytest.approx(math.log1p(1.5))
    assert r["knn_max_p"].item() == pytest.approx(1.0)
    assert r["knn_top_frac"].item() == pytest.approx(2 / 3)
    assert r["knn_lm_agree"].item() == 0.0  # kNN says 2, the LM 0
    nothing = retrieval_features(torch.full((1, 3), math.inf), toks, knn, lm)
    assert all(torch.isfinite(v).all() for v in nothing.values())


def test_adaptive_gate_reads_no_retrieval_feature():
    assert set(GATES["adaptive"]) <= set(LM_FEATURES)
    assert set(GATES["learned"]) > set(GATES["adaptive"])


# ----------------------------------------------------------------------------- fitting
def test_fit_learns_when_to_trust_the_neighbours():
    fit, test = _trust_problem(seed=0), _trust_problem(seed=1)
    lm, knn = fit.logps()
    gate = fit_gate(fit.matrix(("a", "b")), lm, knn, ("a", "b"), hidden=8, steps=300, lr=0.05, seed=0)
    lam = gate(test.matrix(("a", "b"))).detach()
    high = torch.from_numpy(test.features["a"] > 0.5)
    assert lam[high].mean() > 0.8 and lam[~high].mean() < 0.1
    tlm, tknn = test.logps()
    lam0 = best_constant_lambda(tlm, tknn)  # the best fixed λ, even chosen on test itself
    fixed_nll = -mixture_logps(tlm, tknn, constant_logit(lam0, len(tlm))).mean().item()
    gate_nll = -mixture_logps(tlm, tknn, gate.logits(test.matrix(("a", "b")))).mean().item()
    assert gate_nll < fixed_nll - 0.1
    again = fit_gate(fit.matrix(("a", "b")), lm, knn, ("a", "b"), hidden=8, steps=300, lr=0.05, seed=0)
    assert torch.equal(again(test.matrix(("a", "b"))), gate(test.matrix(("a", "b"))))  # deterministic


def test_holdout_keeps_the_step_best_on_held_out_positions():
    lm, knn = _logps(3000, seed=4)  # which of p_kNN, p_LM is right has nothing to do with x
    x = torch.randn(3000, 3, dtype=torch.float64)
    nll = lambda g, sl: -mixture_logps(lm[sl], knn[sl], g.logits(x[sl])).mean().item()  # noqa: E731
    held = slice(2400, None)  # holdout 0.2: the last 600 positions
    start = fit_gate(x, lm, knn, ("a", "b", "c"), hidden=16, steps=0, lr=0.1, seed=0, holdout=0.2)
    free = fit_gate(x, lm, knn, ("a", "b", "c"), hidden=16, steps=200, lr=0.1, seed=0, holdout=0.0)
    kept = fit_gate(x, lm, knn, ("a", "b", "c"), hidden=16, steps=200, lr=0.1, seed=0, holdout=0.2)
    assert free.best_step == 200 and 0 <= kept.best_step <= 200
    with torch.no_grad():
        assert nll(kept, held) <= nll(start, held)  # never worse than the constant λ it started from
    fit = _trust_problem(seed=5)
    flm, fknn = fit.logps()
    learns = fit_gate(fit.matrix(("a", "b")), flm, fknn, ("a", "b"), hidden=8, steps=100, lr=0.05, seed=0, holdout=0.2)
    assert learns.best_step > 50  # real signal: held-out NLL keeps falling


def test_best_constant_lambda_matches_the_analytic_optimum():
    # p_LM(y) = 1/2 everywhere; p_kNN(y) = 1 on 3 positions, 0 on 1: the likelihood is
    # ((1+λ)/2)³ · (1−λ)/2, maximal where 3/(1+λ) = 1/(1−λ), i.e. λ = 1/2 (on the grid)
    lm = torch.full((4,), math.log(0.5), dtype=torch.float64)
    knn = torch.tensor([0.0, 0.0, 0.0, -math.inf], dtype=torch.float64)
    assert best_constant_lambda(lm, knn) == pytest.approx(0.5)


def test_evaluate_gates_rows():
    fit, test = _trust_problem(seed=2), _trust_problem(seed=3)
    feats = lambda s: {n: s.features["a"] if i == 0 else s.features["b"] for i, n in enumerate(GATES["learned"])}  # noqa: E731
    fit.features, test.features = feats(fit), feats(test)  # every named feature is a or b
    cfg = GateConfig(hidden=4, steps=100, lr=0.05, thresholds=[0.0, 0.5, 1.0])
    groups = {"g0": np.array([True]), "g1": np.array([False])}
    out = evaluate_gates(cfg, fit, test, fixed_lambda=0.25, groups=groups)
    rows = out["adaptive"]
    assert rows["0.0"]["queries_saved"] == 0.0 and rows["0.0"]["ppl"] == out["test_ppl"]["adaptive"]
    assert rows["0.0"]["vs_full"] == 1.0 and rows["0.0"]["gain_kept"] == 1.0 and rows["1.0"]["gain_kept"] == 0.0
    assert rows["1.0"]["queries_saved"] == 1.0 and rows["1.0"]["ppl"] == pytest.approx(out["test_ppl"]["lm"])
    assert out["test_ppl"]["learned"] < out["test_ppl"]["fixed"] < out["test_ppl"]["lm"]
    assert out["mean_lambda"]["learned"]["g0"] == pytest.approx(out["mean_lambda"]["learned"]["all"])
    assert out["mean_lambda"]["learned"]["g1"] is None and out["mean_lambda"]["learned"]["n_g0"] == len(test.labels)
    assert out["best_saving"]["full"] == best_saving(rows, "full", cfg.ppl_tolerance)
    assert out["valid_ppl"]["learned"] <= out["valid_ppl"]["fixed"]  # fitted there


def test_best_saving_picks_the_largest_saving_within_tolerance():
    rows = {"0.0": {"queries_saved": 0.0, "vs_full": 1.0}, "0.1": {"queries_saved": 0.4, "vs_full": 1.009},
            "0.2": {"queries_saved": 0.7, "vs_full": 1.02}}
    assert best_saving(rows, "full", 0.01)["tau"] == 0.1
    assert best_saving(rows, "full", 0.05)["tau"] == 0.2
    assert best_saving({"0.1": {"queries_saved": 0.5, "vs_full": 1.5}}, "full", 0.01) is None


# ----------------------------------------------------------------------------- token groups
def test_content_and_frequency_groups():
    language = tiny_language()
    content = content_tokens(language)
    index = {w: i for i, w in enumerate(language.vocab)}
    from beyondlm.data import wordlists as W
    assert not content[index[W.DETERMINERS[0]]] and not content[0]  # "the"-like, EOS
    assert content[[index[w] for w in language.vocab if w in W.GENERIC_NOUNS]].all()
    by, groups = target_groups(language, np.zeros(3, dtype=np.int64), len(language.vocab) + 2)
    assert by == "word_class" and len(groups["content"]) == len(language.vocab) + 2
    assert np.array_equal(groups["function"], ~groups["content"])
    # counts 3, 2, 1, 0: token 0 alone covers half the targets
    assert frequent_tokens(np.array([0, 0, 0, 1, 1, 2]), 4).tolist() == [True, False, False, False]
    by, groups = target_groups(None, np.array([0, 0, 0, 1, 1, 2]), 4)
    assert by == "train_frequency" and groups["rare"].tolist() == [False, True, True, True]


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("raw, key", [
    ({"gate": {"hidden": -1}}, "knnlm.gate.hidden"),
    ({"gate": {"steps": -5}}, "knnlm.gate.steps"),
    ({"gate": {"lr": 0.0}}, "knnlm.gate.lr"),
    ({"gate": {"seed": -1}}, "knnlm.gate.seed"),
    ({"gate": {"thresholds": [0.1, 1.5]}}, "knnlm.gate.thresholds"),
    ({"gate": {"thresholds": []}}, "knnlm.gate.thresholds"),
    ({"gate": {"ppl_tolerance": 2.0}}, "knnlm.gate.ppl_tolerance"),
    ({"gate": {"holdout": 0.95}}, "knnlm.gate.holdout"),
    ({"gate": {"hiden": 4}}, "knnlm.gate.hiden"),
    ({"gate": {"enabled": "yes"}}, "knnlm.gate.enabled"),
    ({"splits": ["valid"]}, "knnlm.gate.enabled"),
])
def test_gate_config_errors_name_the_key(raw, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_section(KnnlmConfig, raw, "knnlm")


def test_gate_off_needs_no_test_split():
    cfg = load_section(KnnlmConfig, {"splits": ["valid"], "gate": {"enabled": False}}, "knnlm")
    assert not cfg.gate.enabled and cfg.gate.hidden == GateConfig().hidden
