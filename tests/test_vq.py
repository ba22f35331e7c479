"""Latent plans with discrete codes: discretizers by hand, lengths, decoder limit case, a tiny run."""

import json
import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from beyondlm import cli
from beyondlm.config import ConfigError, load_section
from beyondlm.data.config import PrepareConfig
from beyondlm.data.prepare import prepare, write_prepared
from beyondlm.latent import (
    DISCRETIZERS,
    GumbelConfig,
    GumbelQuantizer,
    LatentPlanLM,
    NearestConfig,
    NearestQuantizer,
    PlanModelConfig,
    VQConfig,
    codebook_usage,
    commitment_loss,
    decoder_logits,
    ema_update,
    gumbel_tau,
    load_latent,
    mean_code_entropy,
    mean_slot_entropy,
    nll_bound,
    plan_lengths,
    plan_loss,
    sample_texts,
    text_metrics,
)
from beyondlm.latent.experiment import plan_loss_fn, posterior_scores
from beyondlm.latent.model import build_decoder
from beyondlm.logprobs import pad_batch
from beyondlm.models import save_model
from stages import vq as vq_stage
from tests.helpers import tiny_setup

QUANTIZER_CFGS = {"gumbel": GumbelConfig(), "nearest": NearestConfig()}
MAX_LEN = 24
MICRO = {"n_train": 96, "n_valid": 8, "n_test": 24, "max_len": MAX_LEN, "prompt_len": 3,
         "n_prompts": 4, "synthetic": {"n_topics": 2, "words_per_class": 4, "mean_sentences": 1.5,
                                       "max_len": MAX_LEN}}
TINY_VQ = {"model": {"n_codes": 8, "n_down": 2, "code_dim": 8, "encoder_layers": 1, "n_layer": 1,
                     "n_head": 2, "n_embd": 16},
           "prior": {"model": {"n_layer": 1, "n_head": 2, "n_embd": 16},
                     "train": {"max_steps": 3, "batch_size": 16, "warmup_steps": 1, "log_every": 2}},
           "train": {"max_steps": 4, "batch_size": 16, "warmup_steps": 1, "log_every": 2}, "n_samples": 8,
           "eval_batch_size": 16, "baseline": "baseline"}


def _plan_model(discretizer="gumbel", seed=0, live_plan=True):
    """A tiny LatentPlanLM over the tiny language; ``live_plan`` un-zeroes the last up layer."""
    _, tok, _ = tiny_setup()
    torch.manual_seed(seed)
    cfg = PlanModelConfig(discretizer=discretizer, n_codes=6, n_down=2, code_dim=4, n_layer=1,
                          n_head=2, n_embd=16)
    model = LatentPlanLM(cfg, build_decoder(cfg, tok, MAX_LEN), MAX_LEN)
    if live_plan:
        nn.init.normal_(model.upsampler.up[-1].weight, std=0.3)
    return model, tok


def _texts(tok, n=6, seed=0):
    language, _, _ = tiny_setup()
    return [[tok.bos_token_id, *s] for s in language.sample(n, np.random.default_rng(seed))]


# ----------------------------------------------------------------------------- discretizers
@pytest.mark.parametrize("name", list(DISCRETIZERS))
def test_codebook_vectors_come_back_as_themselves(name):
    torch.manual_seed(0)
    q = DISCRETIZERS[name](5, 3, QUANTIZER_CFGS[name]).eval()  # gumbel in eval: argmax, no noise
    book = q.codebook.detach().clone()
    z = book[[4, 0, 2, 1]].unsqueeze(0)  # (1, 4, 3)
    mask = torch.tensor([[True, True, True, False]])
    out = q(z, mask)
    assert out.codes[0, :3].tolist() == [4, 0, 2]
    assert torch.equal(out.vectors[0, :3], book[[4, 0, 2]])
    assert torch.equal(out.vectors[0, 3], torch.zeros(3))  # padded slot


def test_ema_update_by_hand():
    # K = 2 codes e_0 = (0, 0), e_1 = (1, 1); counts 1; three vectors, the last two on code 1
    z = torch.tensor([[0.2, 0.0], [0.8, 1.0], [1.0, 0.6]])
    size, total, book = ema_update(torch.ones(2), torch.tensor([[0.0, 0.0], [1.0, 1.0]]), z,
                                   torch.tensor([0, 1, 1]), decay=0.5, eps=0.1)
    # N = .5·(1, 1) + .5·(1, 2) = (1, 1.5); m_0 = .5·0 + .5·(.2, 0); m_1 = .5·(1, 1) + .5·(1.8, 1.6)
    torch.testing.assert_close(size, torch.tensor([1.0, 1.5]))
    torch.testing.assert_close(total, torch.tensor([[0.1, 0.0], [1.4, 1.3]]))
    # Laplace: Ñ = (N + ε) / (n + Kε)·n = (1.1, 1.6) / 2.7·2.5
    smoothed = torch.tensor([1.1, 1.6]) / 2.7 * 2.5
    torch.testing.assert_close(book, torch.tensor([[0.1, 0.0], [1.4, 1.3]]) / smoothed[:, None])
    torch.testing.assert_close(book, torch.tensor([[0.0981818, 0.0], [0.945, 0.8775]]))


def test_nearest_quantizer_commitment_ema_and_straight_through_by_hand():
    q = NearestQuantizer(2, 2, NearestConfig(beta=0.25, decay=0.5, eps=0.1)).train()
    q.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    q.embed_sum.copy_(q.codebook)
    q.initialized.fill_(True)
    z = torch.tensor([[[0.2, 0.0], [0.8, 1.0], [1.0, 0.6], [9.0, 9.0]]], requires_grad=True)
    mask = torch.tensor([[True, True, True, False]])  # the far padded slot must change nothing
    out = q(z, mask)
    assert out.codes[0, :3].tolist() == [0, 1, 1]
    # per slot mean_d (z − e)²: (.04 + 0)/2, (.04 + 0)/2, (0 + .16)/2 → mean .04; β = .25
    assert out.aux_loss.item() == pytest.approx(0.25 * 0.04)
    before = torch.tensor([[0.0, 0.0], [1.0, 1.0]])  # the codebook this step assigned with
    assert commitment_loss(z, before[out.codes], mask).item() == pytest.approx(0.04)
    torch.testing.assert_close(q.codebook, torch.tensor([[0.0981818, 0.0], [0.945, 0.8775]]))
    out.vectors.sum().backward()  # straight-through: identity on valid slots, 0 on padding
    torch.testing.assert_close(z.grad, mask[..., None].float().expand(1, 4, 2))


def test_mean_code_entropy_and_gumbel_bonus_by_hand():
    probs = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    mask = torch.tensor([[True, True, False]])
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # q̄ = (.75, .25, 0)
    assert mean_code_entropy(probs, mask).item() == pytest.approx(h)
    uniform = torch.full((2, 3, 4), 0.25)
    assert mean_code_entropy(uniform, torch.ones(2, 3)).item() == pytest.approx(math.log(4))
    q = GumbelQuantizer(3, 2, GumbelConfig(entropy_weight=0.1))
    z = torch.randn(1, 3, 2)
    posterior = (-torch.cdist(z, q.codebook.detach()[None]) ** 2).softmax(-1)
    out = q(z, mask)
    assert out.aux_loss.item() == pytest.approx(-0.1 * mean_code_entropy(posterior, mask).item(), rel=1e-5)
    # mutual information H(q̄) − E H(q): slot entropies (log 2, 0) over the valid slots → mean log 2 / 2
    assert mean_slot_entropy(probs, mask).item() == pytest.approx(math.log(2) / 2)
    assert mean_slot_entropy(uniform, torch.ones(2, 3)).item() == pytest.approx(math.log(4))  # I = 0: says nothing
    q_mi = GumbelQuantizer(3, 2, GumbelConfig(entropy_weight=0.1, bonus="mutual_info"))
    q_mi.load_state_dict(q.state_dict())
    want = mean_code_entropy(posterior, mask) - mean_slot_entropy(posterior, mask)
    assert q_mi(z, mask).aux_loss.item() == pytest.approx(-0.1 * want.item(), rel=1e-5)
    with pytest.raises(ConfigError, match="vq.model.gumbel.bonus"):
        GumbelConfig(bonus="mi")


def test_codebook_usage_by_hand():
    codes = torch.tensor([[0, 0, 1, 2], [3, 3, 3, 3]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])
    usage = codebook_usage(codes, mask, 5)  # p̂ = (.5, .25, .25, 0, 0): H = 1.5 ln 2
    assert usage["perplexity"] == pytest.approx(2**1.5)
    # code 3 appears only on masked slots, code 4 nowhere: both dead
    assert usage["dead_codes"] == 2 and usage["used_codes"] == 3 and usage["n_slots"] == 4
    assert codebook_usage(torch.arange(4), torch.ones(4), 4)["perplexity"] == pytest.approx(4.0)


def test_tau_schedule():
    assert gumbel_tau(0, tau0=0.9, tau_min=0.1, rate=0.02) == pytest.approx(0.9)
    assert gumbel_tau(10, tau0=0.9, tau_min=0.1, rate=0.02) == pytest.approx(0.9 * math.exp(-0.2))
    assert gumbel_tau(10**4, tau0=0.9, tau_min=0.1, rate=0.02) == 0.1
    assert gumbel_tau(10**4, tau0=0.9, tau_min=0.1, rate=0.0) == 0.9
    model, _ = _plan_model("gumbel")
    model.set_step(10)
    assert model.quantizer.tau == pytest.approx(0.9 * math.exp(-0.2))


# ----------------------------------------------------------------------------- lengths, decoder
def test_plan_lengths_and_shapes_through_down_and_up_sampling():
    # L = ceil(n / 2^n_down): the targets are padded to a multiple of 2^n_down
    assert plan_lengths(torch.tensor([1, 4, 5, 8, 9]), 2).tolist() == [1, 1, 2, 2, 3]
    assert plan_lengths(torch.tensor([1, 8, 9, 24]), 3).tolist() == [1, 1, 2, 3]
    model, tok = _plan_model()
    ids, mask = pad_batch([[0, 5, 6, 7, 8, 9, 10, 11, 12, 0], [0, 5, 0]], tok.pad_token_id)  # (2, 10)
    quantized, code_mask = model.encode(ids, mask)  # 9 targets → padded to 12 → 3 slots
    assert quantized.codes.shape == (2, 3) and quantized.vectors.shape == (2, 3, 4)
    assert code_mask.tolist() == [[True, True, True], [True, False, False]]
    assert model.plan(quantized.vectors, code_mask).shape == (2, 12, 16)
    assert model(ids, mask).logits.shape == (2, 9, len(tok))


@pytest.mark.parametrize("name", list(DISCRETIZERS))
def test_codes_and_logits_do_not_depend_on_the_batch(name):
    model, tok = _plan_model(name)
    model.eval()
    short, long = [0, 5, 6, 7, 8, 0], [0, *range(5, 20), 0]
    alone = model(*pad_batch([short], tok.pad_token_id))
    batched = model(*pad_batch([short, long], tok.pad_token_id))
    assert torch.equal(alone.quantized.codes[0], batched.quantized.codes[0, : alone.code_mask.shape[1]])
    torch.testing.assert_close(alone.logits[0], batched.logits[0, : len(short) - 1], atol=1e-5, rtol=1e-5)


def test_zero_plan_is_the_plain_lm():
    model, tok = _plan_model(live_plan=False)
    model.eval()
    ids, mask = pad_batch([[0, 5, 6, 7, 0], [0, 8, 0]], tok.pad_token_id)
    plain = model.decoder(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(decoder_logits(model.decoder, ids, mask, torch.zeros(2, 5, 16)), plain,
                               rtol=0, atol=1e-6)
    # the last up-sampling layer starts at 0: a fresh model is the plain LM whatever its codes
    torch.testing.assert_close(model(ids, mask).logits, plain[:, :-1], rtol=0, atol=1e-6)


def test_plan_end_marker_counts_the_positions_left():
    model, _ = _plan_model(live_plan=False)  # up-sampled codes are 0: the plan is the marker
    with torch.no_grad():
        model.plan_end.weight[:, 0] = torch.arange(5.0) + 10  # bucket b → 10 + b in dim 0
    code_mask = torch.tensor([[True, True, True], [True, True, False]])
    plan = model.plan(torch.zeros(2, 3, 4), code_mask)[..., 0]  # (2, 12)
    # min(positions left after t, f = 4); 0 past the plan
    assert plan[0].tolist() == [14] * 8 + [13, 12, 11, 10]
    assert plan[1].tolist() == [14] * 4 + [13, 12, 11, 10] + [0] * 4


def test_plan_loss_by_hand():
    logps = torch.tensor([[-1.0, -2.0], [-3.0, -7.0]])
    mask = torch.tensor([[True, True], [True, False]])
    loss, n = plan_loss(logps, mask, torch.tensor(0.5))
    assert loss.item() == pytest.approx(6.0 + 3 * 0.5) and n.item() == 3


@pytest.mark.parametrize("name", list(DISCRETIZERS))
def test_every_parameter_gets_a_gradient(name):
    model, tok = _plan_model(name)
    model.train()
    ids, mask = pad_batch(_texts(tok, 8), tok.pad_token_id)
    before = {k: v.clone() for k, v in model.quantizer.named_buffers()}
    loss, _ = plan_loss_fn(model, {"input_ids": ids, "attention_mask": mask})
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    if name == "nearest":  # the codebook is a buffer: moved by the EMA, not by gradients
        assert not torch.equal(before["codebook"], model.quantizer.codebook)


# ----------------------------------------------------------------------------- metrics, sampling
def test_nll_bound_by_hand():
    out = nll_bound(np.array([-10.0, -20.0]), np.array([-3.0, -1.0]), np.array([5, 10]))
    assert out["recon_nll_per_token"] == pytest.approx(2.0)
    assert out["prior_nll_per_token"] == pytest.approx(4 / 15)
    assert out["nll_bound_per_token"] == pytest.approx(2 + 4 / 15)


def test_text_metrics_with_exact_log_p_d():
    language, tok, _ = tiny_setup()
    samples = language.sample(5, np.random.default_rng(3))
    bad = [7, 7, 7]  # no EOS: p_d = 0
    out = text_metrics([*samples, bad], eos=tok.eos_token_id, language=language)
    expected = language.log_prob(samples).sum() / sum(len(s) for s in samples)
    assert out["logp_data_per_token"] == pytest.approx(expected)
    assert out["impossible_frac"] == pytest.approx(1 / 6) and out["unfinished_frac"] == pytest.approx(1 / 6)


def test_sample_texts_respects_plan_length_and_seed():
    model, tok = _plan_model()
    plans = [[1, 2], [3], [], [0, 1, 2, 3, 4, 5]]
    a = sample_texts(model, plans, bos=tok.bos_token_id, eos=tok.eos_token_id, seed=3)
    b = sample_texts(model, plans, bos=tok.bos_token_id, eos=tok.eos_token_id, seed=3)
    assert a == b and a[2] == []  # seeded; an empty plan writes nothing
    for plan, text in zip(plans, a):
        assert len(text) <= 4 * len(plan)
        assert tok.eos_token_id not in text[:-1]  # cut after the first EOS


# ----------------------------------------------------------------------------- config, stage
def test_config_is_strict():
    with pytest.raises(ConfigError, match=r"vq\.model\.discretizer.*gumbel, nearest"):
        load_section(VQConfig, {"model": {"discretizer": "kmeans"}}, "vq")
    with pytest.raises(ConfigError, match=r"unknown key 'vq\.model\.gumbel\.temp'"):
        load_section(VQConfig, {"model": {"gumbel": {"temp": 1.0}}}, "vq")
    with pytest.raises(ConfigError, match=r"vq\.model\.gumbel\.tau_min"):
        load_section(VQConfig, {"model": {"gumbel": {"tau0": 0.5, "tau_min": 0.9}}}, "vq")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Tiny prepared data (the tiny language of tests.helpers) and an untrained SFT baseline."""
    root = tmp_path_factory.mktemp("vq")
    write_prepared(prepare(load_section(PrepareConfig, MICRO, "prepare")), root / "prepared")
    _, tok, model = tiny_setup()
    save_model(model, tok, root / "baseline")
    return root


def _write_params(root, vq: dict) -> None:
    params = {"prepare": {"out_dir": "prepared", "max_len": MAX_LEN}, "vq": vq}
    (root / "params.yaml").write_text(json.dumps(params))  # JSON is YAML


def _leaves(d, prefix=""):
    for k, v in d.items():
        yield from _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(prefix + k, v)]


@pytest.mark.parametrize("name", list(DISCRETIZERS))
def test_stage_writes_the_model_dir_and_finite_metrics(workdir, monkeypatch, name):
    monkeypatch.chdir(workdir)
    _write_params(workdir, {**TINY_VQ, "model": {**TINY_VQ["model"], "discretizer": name}})
    monkeypatch.setattr(sys, "argv", ["x", "--out", f"out-{name}", "--metrics", f"m-{name}.json"])
    vq_stage.main()
    out = workdir / f"out-{name}"
    written = {p.name for p in workdir.iterdir()} - {"prepared", "baseline", "params.yaml"}
    assert written <= {f"out-{d}" for d in DISCRETIZERS} | {f"m-{d}{s}.json" for d in DISCRETIZERS for s in ("", ".timing")}
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "plan_model.safetensors", "prior",
                                                     "tokenizer"]
    assert (out / "prior" / "model.safetensors").exists()
    metrics = json.loads((workdir / f"m-{name}.json").read_text())
    leaves = dict(_leaves(metrics))
    for key, v in leaves.items():
        if key.endswith("resumed_from") or isinstance(v, (str, list)):
            continue  # no checkpoints in this stage: always null; held-out curves are lists
        if key.endswith("logp_data_per_token") and v is None:  # NaN: no sample is possible
            assert leaves[key.replace("logp_data_per_token", "impossible_frac")] == 1.0
            continue
        assert v is not None and math.isfinite(v), key
    assert metrics["test"]["nll_bound_per_token"] >= metrics["test"]["recon_nll_per_token"]
    assert metrics["codebook"]["dead_codes"] + metrics["codebook"]["used_codes"] == 8
    assert set(metrics["baseline"]) == {"dir", "test", "samples"}
    assert "logp_data_per_token" in metrics["samples"] | metrics["baseline"]["samples"]
    # the saved model reproduces the reported reconstruction NLL
    model, _, tok = load_latent(out)
    from beyondlm.data.prepare import load_split

    test = load_split(workdir / "prepared", "test")["input_ids"]
    _, logp, n_tok = posterior_scores(model, test, pad_id=tok.pad_token_id)
    assert float(-logp.sum() / n_tok.sum()) == pytest.approx(metrics["test"]["recon_nll_per_token"], rel=1e-5)


def test_stage_unknown_key_is_one_line_and_exit_2(workdir, tmp_path, monkeypatch, capsys):
    (tmp_path / "prepared").symlink_to(workdir / "prepared")
    monkeypatch.chdir(tmp_path)
    _write_params(tmp_path, {**TINY_VQ, "bogus": 1})
    monkeypatch.setattr(sys, "argv", ["x", "--out", "out", "--metrics", "m.json"])
    with pytest.raises(SystemExit) as exc:
        cli.run(vq_stage.main)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: params.yaml: unknown key 'vq.bogus'")
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()
