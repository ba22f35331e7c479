"""EBM experiment glue: reference pairs, fitting μ, decoders and p* perplexity on a tiny GPT-2."""

import sys

import datasets
import numpy as np
import pytest
import torch

from beyondlm.config import ConfigError, load_section
from beyondlm.ebm import EBMSolution, compute_features, log_p_star
from beyondlm.ebm.experiment import (
    EBMConfig,
    EBMEvalConfig,
    draw_pool,
    evaluate_decoders,
    fit_ebm,
    log_z_per_prompt,
    p_star_logps,
    perplexity_report,
    quality_vs_m,
    reference_pairs,
)
from beyondlm.io import read_json
from beyondlm.models import save_model
from beyondlm.sampling import SamplingConfig, sample
from stages import ebm as ebm_stage
from stages import ebm_eval as ebm_eval_stage
from tests.helpers import tiny_setup

PROMPT_LEN, MAX_NEW = 3, 12
NAMES = ["length", "tr32"]  # surface features: no extra forward passes


@pytest.fixture(scope="module")
def setup():
    language, tok, model = tiny_setup()
    texts = [[tok.bos_token_id, *s] for s in language.sample(64, np.random.default_rng(0))]
    prompts, _ = reference_pairs(texts, PROMPT_LEN, 16)
    return language, tok, model, texts, prompts


@pytest.fixture(scope="module")
def fitted(setup):
    """Targets from the model's own samples, shifted: the shorter half (feasible by design)."""
    _, tok, model, _, prompts = setup
    cfg = SamplingConfig(max_new_tokens=MAX_NEW, batch_size=256)
    repeated = [p for p in prompts for _ in range(4)]
    own = sample(model, repeated, cfg, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=1)
    short = [i for i, c in enumerate(own) if len(c) <= np.median([len(c) for c in own])]
    ref_p, ref_c = [repeated[i] for i in short], [own[i] for i in short]
    sol, diag = fit_ebm(model, tok, ref_p, ref_c, NAMES, samples_per_prompt=16,
                        sampling_cfg=cfg, seed=2)
    return sol, diag


def _solution(mu, log_z=0.0):
    k = len(mu)
    z = np.zeros(k)
    return EBMSolution(mu=np.asarray(mu, float), names=tuple(NAMES[:k]), targets=z,
                       residual_before=z, residual_after=z, ess=1.0, ess_frac=1.0, log_z=log_z,
                       log_z_se=0.0, kl_in_sample=0.0, iterations=0, converged=True)


def test_reference_pairs_by_hand():
    texts = [[0, 5, 6, 7, 8, 0], [0, 5, 6, 0], [0, 1, 2, 3, 0], [0, 9, 9, 9, 9, 9, 0]]
    prompts, conts = reference_pairs(texts, 2, 10)
    # a continuation may be EOS alone ([0,5,6,0] at prompt_len 2): the text ends after the prompt
    assert prompts == [[0, 5, 6], [0, 5, 6], [0, 1, 2], [0, 9, 9]]
    assert conts == [[7, 8, 0], [0], [3, 0], [9, 9, 9, 0]]
    # prompt_len 3: [0,5,6,0] has no token after its prompt → skipped
    assert reference_pairs(texts, 3, 10)[1] == [[8, 0], [0], [9, 9, 0]]
    assert reference_pairs(texts, 2, 2) == (prompts[:2], conts[:2])


def test_configs_are_strict():
    with pytest.raises(ConfigError, match=r"ebm\.features.*sr4"):
        load_section(EBMConfig, {"features": ["sr4", "bleu"]}, "ebm")
    with pytest.raises(ConfigError, match=r"ebm_eval\.Ms"):
        load_section(EBMEvalConfig, {"Ms": [2, 0]}, "ebm_eval")
    with pytest.raises(ConfigError, match=r"ebm\.tl"):
        load_section(EBMConfig, {"tl": 1e-6}, "ebm")
    cfg = load_section(EBMConfig, {"features": ["nll"], "tol": "1e-8"}, "ebm")
    assert cfg.features == ["nll"] and cfg.tol == 1e-8 and cfg.base == "mle-s0"


def test_fit_ebm_matches_shifted_targets(fitted):
    sol, diag = fitted
    assert sol.converged and sol.names == tuple(NAMES)
    before, after = np.abs(sol.residual_before), np.abs(sol.residual_after)
    assert np.all(before > 1e-3) and np.all(after < 1e-6 * np.maximum(before, 1.0))
    assert sol.mu[0] > 0  # shorter targets → longer texts penalised
    assert 0 < sol.ess_frac < 1 and sol.kl_in_sample > 0
    assert diag["n_samples"] == 16 * diag["n_reference"]
    assert set(diag["residual_after_conditional"]) == set(NAMES)


def test_fit_ebm_refuses_a_truncated_proposal(setup):
    _, tok, model, _, prompts = setup
    with pytest.raises(ValueError, match="proposal must be p_θ"):
        fit_ebm(model, tok, prompts, [[tok.eos_token_id]] * len(prompts), NAMES,
                samples_per_prompt=2, sampling_cfg=SamplingConfig(top_k=5), seed=0)


def test_p_star_logps_and_perplexity_by_hand():
    rng = np.random.default_rng(0)
    mu = np.array([0.3, -1.2])
    pool = rng.normal(size=(3, 5, 2))  # (N, S, K)
    F, logp, n_tok = rng.normal(size=(3, 2)), -rng.uniform(5, 9, size=3), np.array([4, 2, 6])
    log_z, se = log_z_per_prompt(pool, mu)
    u = np.exp(-pool @ mu)  # (N, S)
    np.testing.assert_allclose(log_z, np.log(u.mean(1)))
    np.testing.assert_allclose(se, u.std(1, ddof=1) / np.sqrt(5) / u.mean(1))
    sol = _solution(mu, log_z=0.7)  # the solver's pooled normaliser is replaced per prompt
    got = p_star_logps(logp, F, sol, log_z)
    np.testing.assert_allclose(got, log_p_star(logp, F, sol) + 0.7 - log_z)
    np.testing.assert_allclose(got, logp - F @ mu - np.log(u.mean(1)))
    rep = perplexity_report(logp, got, n_tok, se)
    assert rep["ppl"]["ebm"] == pytest.approx(np.exp(-got.sum() / 12))
    assert rep["ppl"]["base"] == pytest.approx(np.exp(-logp.sum() / 12))
    assert rep["xent"]["diff"] == pytest.approx(np.mean(F @ mu + log_z))
    assert rep["xent"]["diff_per_token"] == pytest.approx(np.sum(F @ mu + log_z) / 12)


def test_mu_zero_keeps_the_base_perplexity():
    logp = np.array([-3.0, -7.5])
    F = np.random.default_rng(1).normal(size=(2, 4, 2))
    log_z, se = log_z_per_prompt(F, np.zeros(2))
    assert np.all(log_z == 0) and np.all(se == 0)
    rep = perplexity_report(logp, p_star_logps(logp, F[:, 0], _solution([0, 0]), log_z), [2, 3],
                            se)
    assert rep["ppl"]["ebm"] == rep["ppl"]["base"] and rep["xent"]["diff"] == 0.0


@pytest.fixture(scope="module")
def evaluated(setup, fitted):
    language, tok, model, texts, _ = setup
    prompts, conts = reference_pairs(texts[16:], PROMPT_LEN, 24)
    cfg = EBMEvalConfig(Ms=[2, 3], n_prompts=24, ppl_samples=4, seed=5)
    res = evaluate_decoders(model, tok, prompts, conts, fitted[0], cfg, max_new_tokens=MAX_NEW,
                            language=language)
    return res, prompts, conts, cfg


def test_evaluate_decoders_keys_and_ranges(evaluated, fitted):
    res, prompts, _, cfg = evaluated
    assert set(res["decoders"]) == {"sample", "sample_b", "top_k", "top_p", "sir_m2", "sir_m3"}
    for name, d in res["decoders"].items():
        assert 0.0 <= d["mauve"] <= 1.0, name
        assert set(d["gap"]) == set(NAMES) and np.all(np.isfinite(list(d["gap"].values())))
        assert 0.0 <= d["impossible_frac"] <= 1.0
    assert 1 <= res["decoders"]["sir_m3"]["sir"]["ess_mean"] <= 3
    for key in ("base", "ebm", "ebm_se"):
        assert np.isfinite(res["ppl"][key]) and res["ppl"][key] >= 0
    assert np.isfinite(res["xent"]["diff"]) and res["xent"]["diff_se"] > 0
    rows = quality_vs_m(res, cfg.Ms)
    assert [r["M"] for r in rows] == [1, 2, 3]
    assert rows[0]["mauve"] == res["decoders"]["sample"]["mauve"]  # M = 1: plain sampling


def test_evaluate_ppl_equals_direct_log_p_star(setup, fitted, evaluated):
    """ppl/ebm from evaluate_decoders = exp(−Σ log p* / Σ tokens), log p* rebuilt by hand."""
    _, tok, model, _, _ = setup
    res, prompts, conts, cfg = evaluated
    sol = fitted[0]
    pure = SamplingConfig(max_new_tokens=MAX_NEW, batch_size=cfg.batch_size)
    S = max(max(cfg.Ms), cfg.ppl_samples)
    _, pool = draw_pool(model, tok, prompts, NAMES, S, pure, seed=cfg.seed)  # same seed: same pool
    log_z = np.log(np.mean(np.exp(-pool[:, : cfg.ppl_samples] @ sol.mu), axis=1))
    F = compute_features(NAMES, prompts, conts, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    logp = []
    for p, c in zip(prompts, conts):  # one unpadded row at a time
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([p + c])).logits[0].double(), -1)
        logp.append(sum(float(lp[len(p) - 1 + j, t]) for j, t in enumerate(c)))
    lps = log_p_star(np.array(logp), F, sol) + sol.log_z - log_z
    n_tok = sum(len(c) for c in conts)
    assert res["ppl"]["ebm"] == pytest.approx(np.exp(-lps.sum() / n_tok), rel=1e-5)
    assert res["ppl"]["base"] == pytest.approx(np.exp(-sum(logp) / n_tok), rel=1e-5)


def test_stages_write_exactly_their_declared_outputs(tmp_path, monkeypatch, setup):
    """ebm then ebm_eval in a temp project: declared outs only, and a base mismatch is refused."""
    language, tok, model, texts, _ = setup
    data = tmp_path / "data"
    for split, rows in (("valid", texts[:32]), ("test", texts[32:])):
        datasets.Dataset.from_dict({"input_ids": rows}).to_parquet(str(data / f"{split}.parquet"))
    language.save(data / "language.json")
    save_model(model, tok, tmp_path / "models/sft/mle-s0")
    (tmp_path / "params.yaml").write_text(
        "prepare: {out_dir: data, max_len: 15, prompt_len: 3}\n"
        f"ebm: {{features: {NAMES}, n_prompts: 16, samples_per_prompt: 8}}\n"
        "ebm_eval: {Ms: [2], n_prompts: 16, ppl_samples: 2}\n")
    monkeypatch.chdir(tmp_path)
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    fit_args = ["--out", "models/ebm/weights.json", "--metrics", "m/ebm.json"]
    eval_args = ["--weights", "models/ebm/weights.json", "--metrics", "m/ebm_eval.json",
                 "--plot-dir", "plots"]
    for stage, args in ((ebm_stage, fit_args), (ebm_eval_stage, eval_args)):
        monkeypatch.setattr(sys, "argv", ["x", "--model", "models/sft/mle-s0", *args])
        stage.main()
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()} - {
        str(p.relative_to(tmp_path)) for p in before}  # nothing else, no leftover temp files
    assert written == {"models/ebm/weights.json", "m/ebm.json", "m/ebm_eval.json",
                       "plots/quality_vs_m.tsv", "plots/quality_vs_m.png",
                       "m/ebm.timing.json", "m/ebm_eval.timing.json"}  # wall times, untracked
    weights = read_json("models/ebm/weights.json")
    assert weights["base"] == "mle-s0" and weights["features"] == NAMES
    header = (tmp_path / "plots/quality_vs_m.tsv").read_text().splitlines()[0].split("\t")
    assert header == ["M", "mauve", *[f"gap_{n}" for n in NAMES]]
    (tmp_path / "models/sft/mle-s1").symlink_to(tmp_path / "models/sft/mle-s0")
    monkeypatch.setattr(sys, "argv", ["x", "--model", "models/sft/mle-s1", *eval_args])
    with pytest.raises(ConfigError, match="fitted for models/sft/mle-s0"):
        ebm_eval_stage.main()
