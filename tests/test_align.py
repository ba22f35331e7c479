"""Alignment: stored reference log-probs, pairs, unpaired (KTO) examples, RLOO by hand, real preference files,
the runs."""

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from beyondlm.align.data import (
    Group,
    PrefPair,
    draw_groups,
    pairs_from_groups,
    read_preference_file,
    split_hh,
    tokenize_pairs,
    unpair,
    unpaired_examples,
)
from beyondlm.align.evaluate import PolicySamples, best_of_n_kl, win_rate
from beyondlm.align.config import (
    METHODS,
    AlignConfig,
    BestOfNConfig,
    EvalConfig,
    PreferencesConfig,
    RewardConfig,
    SampleConfig,
)
from beyondlm.align.experiment import (
    IMPLICIT_REWARD,
    online_objective,
    run_align,
    run_best_of_n,
    run_preferences,
    run_reward,
    run_sample,
)
from beyondlm.align.store import load_pairs
from beyondlm.align.train import completion_tokens, group_collate, offline_loss_fn, pair_collate, unpaired_collate
from beyondlm.align.train import online_loss_fn, prompt_collate
from beyondlm.objectives.preference import rloo_advantages, rloo_loss, simpo_loss
from beyondlm.objectives.preference import grpo_loss, resolve_preference_loss
from beyondlm.config import ConfigError, ModelConfig, TrainConfig, load_section
from beyondlm.convergence import HeldOutValue
from beyondlm.data import tokenization
from beyondlm.logprobs import sequence_logps
from beyondlm.models import build_model, save_model
from beyondlm.oracle import LanguageOracle
from beyondlm.reward import build_reward_model, score
from beyondlm.sampling import SamplingConfig, sample_scored
from tests.helpers import tiny_setup

HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "preferences" / "hh_harmless_base_test.jsonl.gz"


def test_stored_reference_logps_equal_on_the_fly():
    """The log-probs stored while sampling = a fresh scoring pass of the same model (the bar:
    reference log-probs are computed once, never recomputed during training)."""
    language, tok, model = tiny_setup()
    prompts = [[tok.bos_token_id, *s[:3]] for s in language.sample(6, np.random.default_rng(0))]
    groups, ref = draw_groups(model, prompts, 3, SamplingConfig(max_new_tokens=12, temperature=0.7),
                              eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=0)
    seqs = [p + c for p, g in zip(prompts, groups) for c in g]
    fresh, _ = sequence_logps(model, seqs, pad_id=tok.pad_token_id, starts=[len(p) for p in prompts for _ in range(3)])
    np.testing.assert_allclose(ref.reshape(-1), fresh.numpy(), rtol=1e-5, atol=1e-5)


def test_pairs_from_groups_by_hand():
    prompts = [[0, 1], [0, 2]]
    comps = [[[3], [4], [5]], [[6], [7], [8]]]
    ref = np.array([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    labels = np.array([[0.5, 2.0, 0.5], [1.0, 1.0, 1.0]])  # prompt 1: all ties → no pair
    pairs = pairs_from_groups(comps, ref, labels, prompts)
    got = {(tuple(p.chosen), tuple(p.rejected), p.ref_chosen, p.ref_rejected) for p in pairs}
    assert got == {((4,), (3,), -2.0, -1.0), ((4,), (5,), -2.0, -3.0)}  # (0, 2) tie dropped
    assert len(pairs_from_groups(comps, ref, labels, prompts, max_pairs=1)) == 1


def test_rloo_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0]])
    # baselines: (2+3)/2, (1+3)/2, (1+2)/2 → advantages -1.5, 0, 1.5
    np.testing.assert_allclose(rloo_advantages(r).numpy(), [[-1.5, 0.0, 1.5]])
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0, -1.0]])
    loss = rloo_loss(logp, ref, r, beta=0.5)  # R = r − 0.5 (logp − ref) = [1, 2.5, 4]
    adv = torch.tensor([1 - 3.25, 2.5 - 2.5, 4 - 1.75])
    assert loss.item() == pytest.approx(-(adv * logp.detach()).mean().item())
    loss.sum().backward()
    np.testing.assert_allclose(logp.grad.numpy(), -adv.numpy()[None] / 3, rtol=1e-6)
    with pytest.raises(ValueError, match="K >= 2"):
        rloo_advantages(torch.zeros(2, 1))


def test_unpair_labels_by_net_wins_and_drops_ties():
    """Three samples ranked a > b > c give pairs (a,b), (a,c), (b,c): a desirable (2 wins), c
    undesirable (2 losses), b dropped (1–1). A lone file pair: chosen good, rejected bad."""
    P = [0, 5]
    a, b, c = [1], [2], [3]
    pairs = [PrefPair(P, a, b, -1.0, -2.0), PrefPair(P, a, c, -1.0, -3.0), PrefPair(P, b, c, -2.0, -3.0),
             PrefPair([0, 6], [4], [7], -4.0, -7.0)]
    got = {(tuple(pr), tuple(comp), ref, good) for pr, comp, ref, good in unpair(pairs)}
    assert got == {((0, 5), (1,), -1.0, True), ((0, 5), (3,), -3.0, False),
                   ((0, 6), (4,), -4.0, True), ((0, 6), (7,), -7.0, False)}


def test_kto_through_the_model_at_the_reference_is_half_the_weights():
    """Policy = reference and mismatched log-ratios 0 (z_0 = 0): ℓ = λ_y/2 per example; the
    mismatched rows are scored without gradient."""
    language, tok, model = tiny_setup()
    prompts = [[tok.bos_token_id, *s[:3]] for s in language.sample(4, np.random.default_rng(3))]
    groups, ref = draw_groups(model, prompts, 2, SamplingConfig(max_new_tokens=10), eos_id=tok.eos_token_id,
                              pad_id=tok.pad_token_id, seed=2)
    pairs = [PrefPair(p, g[0], g[1], float(r[0]), float(r[1])) for p, g, r in zip(prompts, groups, ref)]
    examples = unpaired_examples(pairs, model, tok.pad_token_id, seed=0)
    assert len(examples) == 8 and sum(e.desirable for e in examples) == 4
    assert all(e.kl_prompt_ids != e.prompt_ids for e in examples)
    loss, n = offline_loss_fn("kto", {"beta": 0.1, "lambda_d": 1.0, "lambda_u": 3.0})(
        model, unpaired_collate(tok.pad_token_id)(examples))
    assert n == 8 and loss.item() == pytest.approx(4 * 0.5 + 4 * 1.5, rel=1e-5)


def test_online_objective_weighs_the_kl_as_each_loss_does():
    """Held-out objective of the online rows: RLOO's β·KL per sequence, GRPO's per token of the
    sample (KL/|o|), Dr. GRPO's per token of the budget (KL/max_tokens)."""
    e = {"rm_reward": 2.0, "kl": 8.0, "length": 16.0}
    assert online_objective("rloo", {"beta": 0.05}, e, 64) == pytest.approx(-(2.0 - 0.05 * 8.0))
    assert online_objective("grpo", {"beta": 0.04, "unbiased": 0.0}, e, 64) == pytest.approx(-(2.0 - 0.04 * 0.5))
    assert online_objective("dr_grpo", {"beta": 0.04, "unbiased": 1.0}, e, 64) == pytest.approx(-(2.0 - 0.04 * 0.125))


def test_online_objective_with_samples_has_per_prompt_parts_and_the_same_mean():
    """Given the evaluation's scored samples, the objective comes with one chunk per prompt
    (−(r_i − β·kl_i/per)), whose mean is the scalar objective, so the verdict's noise clause applies."""
    samples = PolicySamples(conts=[[5] * 8, [5] * 24], scores={"rm": np.array([1.0, 3.0])}, kl=np.array([4.0, 12.0]))
    e = {"rm_reward": 2.0, "kl": 8.0, "length": 16.0}
    v = online_objective("grpo", {"beta": 0.04, "unbiased": 0.0}, e, 64, samples)
    assert isinstance(v, HeldOutValue) and v.units == (1.0, 1.0)
    assert v.sums == pytest.approx((-(1.0 - 0.04 * 4 / 16), -(3.0 - 0.04 * 12 / 16)))
    assert v.value == pytest.approx(online_objective("grpo", {"beta": 0.04, "unbiased": 0.0}, e, 64))
    rloo = online_objective("rloo", {"beta": 0.05}, e, 64, samples)
    assert rloo.sums == pytest.approx((-(1.0 - 0.05 * 4), -(3.0 - 0.05 * 12)))
    no_kl = PolicySamples(samples.conts, samples.scores, None)  # no log-probs: the scalar
    assert online_objective("rloo", {"beta": 0.05}, e, 64, no_kl) == pytest.approx(-(2.0 - 0.05 * 8.0))


def test_win_rate_and_best_of_n_kl():
    assert win_rate([1, 2, 3, 0], [0, 2, 4, 0]) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert best_of_n_kl(1) == 0.0 and best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)


def test_losses_through_the_model_at_the_reference():
    """Policy = reference (stored log-probs from the same model): DPO gives log 2 per pair and
    DPO-rw gives the cross-entropy of p_r against the uniform p_θ, i.e. log K."""
    language, tok, model = tiny_setup()
    prompts = [[tok.bos_token_id, *s[:3]] for s in language.sample(4, np.random.default_rng(1))]
    groups, ref = draw_groups(model, prompts, 3, SamplingConfig(max_new_tokens=10), eos_id=tok.eos_token_id,
                              pad_id=tok.pad_token_id, seed=0)
    pairs = [PrefPair(p, g[0], g[1], float(r[0]), float(r[1])) for p, g, r in zip(prompts, groups, ref)]
    loss, n = offline_loss_fn("dpo_pref", {"beta": 0.1})(model, pair_collate(tok.pad_token_id)(pairs))
    assert n == 4 and loss.item() / n == pytest.approx(math.log(2), abs=1e-5)
    grp = [Group(p, g, list(r), [0.0, 1.0, 2.0]) for p, g, r in zip(prompts, groups, ref)]
    loss, n = offline_loss_fn("dpo_rw", {"beta_pi": 0.1, "beta_r": 1.0})(model, group_collate(tok.pad_token_id)(grp))
    assert n == 4 and loss.item() / n == pytest.approx(math.log(3), abs=1e-5)
    # IPO at the reference: (0 − 1/(2τ))² = 1/(4τ²) = 4 at τ = 0.25, summed or per token.
    batch = pair_collate(tok.pad_token_id)(pairs)
    for per_token in (0.0, 1.0):
        loss, n = offline_loss_fn("ipo", {"tau": 0.25, "length_normalize": per_token})(model, batch)
        assert n == 4 and loss.item() / n == pytest.approx(4.0, rel=1e-5)


def test_simpo_through_the_model_uses_completion_lengths():
    """SimPO's |y| are the tokens the log-probs sum (the completion, EOS included): the loss
    through the model equals simpo_loss of a fresh scoring pass and the completions' lengths."""
    language, tok, model = tiny_setup()
    prompts = [[tok.bos_token_id, *s[:3]] for s in language.sample(4, np.random.default_rng(2))]
    groups, ref = draw_groups(model, prompts, 2, SamplingConfig(max_new_tokens=10), eos_id=tok.eos_token_id,
                              pad_id=tok.pad_token_id, seed=1)
    pairs = [PrefPair(p, g[0], g[1], float(r[0]), float(r[1])) for p, g, r in zip(prompts, groups, ref)]
    batch = pair_collate(tok.pad_token_id)(pairs)
    n_tokens = completion_tokens(batch)  # (2B,) = [chosen; rejected]
    assert n_tokens.tolist() == [len(p.chosen) for p in pairs] + [len(p.rejected) for p in pairs]
    assert len(set(n_tokens.tolist())) > 1  # lengths differ, so normalising matters
    seqs = [p.prompt_ids + p.chosen for p in pairs] + [p.prompt_ids + p.rejected for p in pairs]
    fresh, counted = sequence_logps(model, seqs, pad_id=tok.pad_token_id, starts=[len(p.prompt_ids) for p in pairs] * 2)
    assert counted.tolist() == n_tokens.tolist()
    hyper = {"beta": 2.0, "gamma": 1.0, "length_normalize": 1.0}
    loss, n = offline_loss_fn("simpo", hyper)(model, batch)
    want = simpo_loss(*fresh.chunk(2), chosen_tokens=counted[:4], rejected_tokens=counted[4:], **hyper)
    assert n == 4 and loss.item() == pytest.approx(want.sum().item(), rel=1e-5)


def _token_logps_one_by_one(model, prompts, completions) -> torch.Tensor:
    """log π(y_t | x, y_<t) of each completion token, one unpadded forward pass per sequence:
    (N, longest completion), 0 after each completion's end."""
    out = torch.zeros(len(completions), max(len(c) for c in completions))
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids = torch.tensor([p + c])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)  # (len − 1, V)
        out[i, : len(c)] = logp[len(p) - 1 :].gather(-1, ids[0, len(p) :, None])[:, 0]
    return out


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_online_losses_through_the_model_equal_the_losses_of_fresh_logps(name):
    """online_loss_fn = the row's loss of the same draws (same seed) scored afresh, one sequence at
    a time: for GRPO token log-probs of the policy and the reference, the completions' own lengths
    as masks, the policy's detached values as π_old, max_tokens = max_new_tokens; for RLOO their
    sums. Value, gradients and the rollout stats."""
    language, tok, ref_model = tiny_setup()
    policy = copy.deepcopy(ref_model)
    torch.manual_seed(1)
    with torch.no_grad():  # π_θ ≠ π_ref, so the k3 term counts
        for w in policy.parameters():
            w.add_(0.05 * torch.randn_like(w))
    rm = build_reward_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, n_positions=32), tok)
    pad, eos, K = tok.pad_token_id, tok.eos_token_id, 3
    prompts = [[tok.bos_token_id, *s[:3]] for s in language.sample(3, np.random.default_rng(4))]
    sampling = SamplingConfig(max_new_tokens=10)
    hyper = resolve_preference_loss(name, {"K": K, "beta": 0.5})[1]
    stats: dict = {}
    loss_fn = online_loss_fn(name, hyper, ref_model, rm, sampling=sampling, eos_id=eos, pad_id=pad, seed=7,
                             stats=stats)
    loss, n = loss_fn(policy, prompt_collate(pad)(prompts))
    got = torch.autograd.grad(loss, list(policy.parameters()))
    repeated = [p for p in prompts for _ in range(K)]
    conts, _ = sample_scored(policy, repeated, sampling, eos_id=eos, pad_id=pad, seed=7 * 1_000_003)  # call 0
    assert len({len(c) for c in conts}) > 1  # unequal lengths: the normalisers differ
    logps = _token_logps_one_by_one(policy, repeated, conts).view(3, K, -1)
    with torch.no_grad():
        ref = _token_logps_one_by_one(ref_model, repeated, conts).view(3, K, -1)
    mask = (torch.arange(logps.shape[-1]) < torch.tensor([len(c) for c in conts])[:, None]).view(3, K, -1)
    r = torch.as_tensor(score(rm, [p + c for p, c in zip(repeated, conts)], pad_id=pad)).view(3, K)
    if name == "rloo":
        want = rloo_loss(logps.sum(-1), ref.sum(-1), r, **hyper).sum()
    else:
        want = grpo_loss(logps, logps.detach(), ref, mask, r, max_tokens=10, **hyper).sum()
    assert n == 3 and loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    for g, w in zip(got, torch.autograd.grad(want, list(policy.parameters()))):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-5)  # padded batch vs one by one: float32 noise
    assert stats["reward"] == [pytest.approx(r.mean().item())]
    assert stats["kl"] == [pytest.approx((logps - ref).sum(-1).mean().item(), rel=1e-5)]
    assert stats["length"] == [pytest.approx(np.mean([len(c) for c in conts]))]


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="align.methods"):
        load_section(AlignConfig, {"methods": ["dpo_pref", "ppo2"]}, "align")
    with pytest.raises(ConfigError, match="align.hyperparams.exo_pref"):
        load_section(AlignConfig, {"hyperparams": {"exo_pref": {"epsilon": 0.7}}}, "align").loss("exo_pref")
    with pytest.raises(ConfigError, match="preferences.file.path"):
        load_section(PreferencesConfig, {"source": "file"}, "preferences")
    with pytest.raises(ConfigError, match="unknown key 'align_sample.k'"):
        load_section(SampleConfig, {"k": 4}, "align_sample")


def test_ipo_and_simpo_are_align_methods():
    cfg = load_section(AlignConfig, {"methods": ["ipo", "simpo"], "hyperparams": {
        "ipo": {"tau": 0.5}, "simpo": {"gamma": 0.5, "length_normalize": 0.0}}}, "align")
    assert cfg.kind("ipo") == cfg.kind("simpo") == "pair"
    assert cfg.loss("ipo") == {"tau": 0.5, "length_normalize": 0.0}
    assert cfg.loss("simpo") == {"beta": 2.0, "gamma": 0.5, "length_normalize": 0.0}
    with pytest.raises(ConfigError, match="align.hyperparams.simpo.length_normalize"):
        load_section(AlignConfig, {"hyperparams": {"simpo": {"length_normalize": True}}}, "align")


@pytest.mark.skipif(not HH.exists(), reason="shared HH-RLHF sample not present")
def test_real_hh_preference_file_to_dpo(tmp_path):
    """HH-RLHF rows (whole dialogues, no prompt column) → prompt/chosen/rejected → tokenized pairs
    with reference log-probs → reward model and DPO steps, all finite."""
    triples = read_preference_file(HH, limit=40)
    assert len(triples) >= 30
    prompt, chosen, rejected = triples[0]
    assert prompt.endswith("\n\nAssistant:") and "Human:" in prompt and chosen != rejected
    tok = tokenization.train_bpe([t for tr in triples for t in tr], vocab_size=400)
    torch.manual_seed(0)
    sft = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=130), tok)
    cfg = load_section(PreferencesConfig, {"source": "file", "file": {"path": str(HH), "limit": 40},
                                           "valid_fraction": 0.2}, "preferences")
    out = tmp_path / "pairs.parquet"
    metrics = run_preferences(cfg, tmp_path / "none", out, sft=sft, tokenizer=tok, max_len=96)
    assert metrics["n_train"] + metrics["n_valid"] == len(tokenize_pairs(tok, triples, max_len=96))
    pairs = load_pairs(out, "train")
    assert all(len(p.prompt_ids) + len(p.chosen) <= 97 for p in pairs)
    loss, n = offline_loss_fn("exo_pref", {"beta": 0.1, "epsilon": 1e-3})(sft, pair_collate(tok.pad_token_id)(pairs[:8]))
    assert torch.isfinite(loss) and n == 8


def test_split_hh_rejects_a_pair_without_a_shared_turn():
    with pytest.raises(ValueError, match="prompt column"):
        split_hh("Hello there", "Goodbye")


def test_the_chain_on_the_tiny_language(tmp_path):
    """align_sample → preferences → reward → every method of the loss table (2 seeds, evaluated on
    the way) → best-of-N."""
    language, tok, model = tiny_setup()
    save_model(model, tok, tmp_path / "sft")
    rng = np.random.default_rng(0)
    prompts = [[tok.bos_token_id, *s[:3]] for s in language.sample(48, rng)]
    test_prompts = [[tok.bos_token_id, *s[:3]] for s in language.sample(16, rng)]
    s = run_sample(SampleConfig(K=3), model, tok, prompts, max_new_tokens=16, oracle=LanguageOracle(language),
                   out=tmp_path / "samples.parquet")
    assert s["n_prompts"] == 48 and np.isfinite(s["oracle_mean"])
    run_preferences(PreferencesConfig(), tmp_path / "samples.parquet", tmp_path / "pairs.parquet")
    rm, m = run_reward(RewardConfig(model=ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=32),
                                    train=TrainConfig(lr=3e-3, batch_size=16, max_steps=6, warmup_steps=1, ckpt_every=0)),
                       tmp_path / "pairs.parquet", tmp_path / "samples.parquet", tok, out_dir=tmp_path / "rm")
    assert 0 <= m["valid_accuracy"] <= 1 and -1 <= m["oracle_pearson"] <= 1
    cfg = AlignConfig(seeds=[0, 1], eval_every=2, eval=EvalConfig(n_prompts=8),
                      train=TrainConfig(lr=1e-3, batch_size=4, max_steps=4, warmup_steps=1, ckpt_every=2,
                                        group_by_length=False),
                      hyperparams={m: {"K": 2, "train": {"batch_size": 4, "max_steps": 4}}
                                   for m in ("rloo", "grpo", "dr_grpo")})  # the online rows: small groups
    kw = dict(sft_dir=tmp_path / "sft", reward_model=rm, tokenizer=tok, oracle=LanguageOracle(language),
              samples=tmp_path / "samples.parquet", pairs=tmp_path / "pairs.parquet", test_prompts=test_prompts,
              max_new_tokens=16)
    for method in METHODS:  # every row of the loss table
        r = run_align(method, cfg, out_dir=tmp_path / "align" / method, ckpt_dir=tmp_path / "ckpt" / method, **kw)
        run = r["runs"]["s0"]
        assert [e["step"] for e in run["evals"]] == [0, 2, 4]
        assert run["evals"][0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the SFT model itself
        assert all(np.isfinite(e["oracle_reward"]) and 0 <= e["win_vs_sft/oracle"] <= 1 for e in run["evals"])
        assert (tmp_path / "align" / method / "s1" / "model.safetensors").exists()
        # the implicit-reward pair accuracy on held-out pairs: exactly the methods with a log π/π_ref reward
        assert ("implicit_accuracy" in run) == (method in IMPLICIT_REWARD)
        if method in IMPLICIT_REWARD:
            acc = run["implicit_accuracy"]
            assert 0 <= acc["low"] <= acc["value"] <= acc["high"] <= 1 and acc["n"] == len(load_pairs(kw["pairs"], "valid"))
    bon = run_best_of_n(BestOfNConfig(Ns=[1, 4]), model, rm, tok, LanguageOracle(language), test_prompts,
                        eval_cfg=EvalConfig(n_prompts=8), max_new_tokens=16)
    assert [r["N"] for r in bon["rows"]] == [1, 4] and bon["rows"][0]["kl"] == 0.0
    assert bon["rows"][1]["rm_reward"] >= bon["rows"][0]["rm_reward"]  # the RM's pick of 4 ⊇ the first


def _result(curves):
    """An align result whose seed i has evaluations at the (kl, reward) points curves[i]."""
    return {"runs": {f"s{i}": {"evals": [{"step": 10 * j, "kl": k, "oracle_reward": r}
                                         for j, (k, r) in enumerate(c)]} for i, c in enumerate(curves)}}


def test_equal_kl_comparison_by_hand():
    from beyondlm.align.analysis import compare_at_equal_kl, frontier

    a = _result([[(0, 0), (4, 8)], [(0, 0), (4, 4)]])  # rewards 2k and 1k → mean 1.5k
    b = _result([[(0, 0), (2, 1), (6, 3)], [(0, 0), (6, 3)]])  # both 0.5k
    rows = compare_at_equal_kl(a, b, n_grid=3)  # common range [0, 4] → interior KL 1, 2, 3
    np.testing.assert_allclose([r["kl"] for r in rows], [1, 2, 3])
    np.testing.assert_allclose([r["diff"] for r in rows], [1.0, 2.0, 3.0])
    # se: a's seeds differ by k (var k²/2), b's agree → sqrt(k²/2 / 2) = k/2
    np.testing.assert_allclose([r["diff_se"] for r in rows], [0.5, 1.0, 1.5])
    f = frontier(a)
    assert [r["step"] for r in f] == [0, 10] and f[1]["oracle_reward"] == 6.0 and f[1]["kl_std"] == 0.0
    assert compare_at_equal_kl(a, _result([[(5, 0), (6, 1)]])) == []  # no overlap


def test_evaluations_resume_only_with_their_config(tmp_path):
    from beyondlm.align.experiment import EVALS, _resumed_evals
    from beyondlm.io import write_json

    fp = {"method": "dpo_pref", "train": {"lr": 1e-3, "seeds": (0, 1)}}
    write_json(tmp_path / EVALS, {"fingerprint": fp, "evals": [{"step": 10, "kl": 1.0}]})
    assert _resumed_evals(tmp_path, fp) == [{"step": 10, "kl": 1.0}]  # same config: kept
    assert _resumed_evals(tmp_path, {**fp, "method": "exo_pref"}) == []  # another config: dropped
    assert not (tmp_path / EVALS).exists() and _resumed_evals(tmp_path, fp) == []
