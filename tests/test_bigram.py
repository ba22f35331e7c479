"""MixCE's synthetic bigram setting: exact gold rows, exact log-probs, sampler, JS, row probe, smoke run."""

import itertools
import json
import math
import runpy
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from beyondlm.bigram_experiment import BigramConfig, bigram_config, run_bigram
from beyondlm.config import ModelConfig, TrainConfig
from beyondlm.sft import variant_objective
from beyondlm.config import ConfigError
from beyondlm.objectives.sft import OBJECTIVES
from beyondlm.data.bigram import (
    EOS_ID,
    FIRST_WORD,
    UNK_ID,
    BigramLM,
    BigramSpec,
    jensen_shannon,
    model_rows,
    transition_metrics,
)

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models gain nothing from intra-op threads; on shared cores spinning threads double wall time.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# V = 3 words, texts of at most 4 tokens: 3 + 9 + 27 = 39 possible texts, enumerable by hand.
# eos_prob = 0.3 makes the length conditioning bite: P(length > 4) = 0.7^3 = 0.343 is rejected.
TINY = BigramSpec(vocab_size=3, alpha=0.5, zero_fraction=0.34, eos_prob=0.3, max_len=4, seed=1)


def _all_texts(spec: BigramSpec) -> list[list[int]]:
    words = range(FIRST_WORD, FIRST_WORD + spec.vocab_size)
    return [[*w, EOS_ID] for n in range(1, spec.max_len) for w in itertools.product(words, repeat=n)]


def test_gold_rows_sum_to_one_with_exact_zeros_never_on_eos():
    spec = BigramSpec(vocab_size=20, zero_fraction=0.5, eos_prob=0.05, seed=3)
    lm = BigramLM.build(spec)
    rows = lm.word_rows  # (V, N)
    np.testing.assert_allclose(rows.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(rows[:, EOS_ID], 0.05)
    assert (rows[:, UNK_ID] == 0).all()
    assert ((rows[:, FIRST_WORD:] == 0).sum(axis=1) == 10).all()  # round(0.5 · 20) exact zeros a row
    np.testing.assert_allclose(rows[:, FIRST_WORD:].sum(axis=1), 0.95)
    np.testing.assert_allclose(lm.first[FIRST_WORD:], 1 / 20)
    assert lm.first[EOS_ID] == 0 and lm.first[UNK_ID] == 0
    # Seeded: the same spec gives the same rows, another seed other rows.
    np.testing.assert_array_equal(BigramLM.build(spec).trans, lm.trans)
    assert not np.array_equal(BigramLM.build(BigramSpec(vocab_size=20, seed=4)).trans, lm.trans)


def test_zero_fraction_keeps_one_word_per_row():
    lm = BigramLM.build(BigramSpec(vocab_size=4, zero_fraction=0.99))
    assert ((lm.word_rows[:, FIRST_WORD:] > 0).sum(axis=1) == 1).all()


def test_log_normalizer_matches_the_geometric_length():
    # Z = Σ_{n=2..L} (1 − e)^(n−2) e = 1 − (1 − e)^(L−1): the text has one word, then EOS w.p. e each step.
    lm = BigramLM.build(TINY)
    assert math.isclose(math.exp(lm.log_z), 1 - 0.7**3, rel_tol=1e-12)
    assert math.isclose(math.exp(lm.log_z), 0.3 + 0.7 * 0.3 + 0.49 * 0.3, rel_tol=1e-12)


def test_log_prob_sums_to_one_over_every_text():
    lm = BigramLM.build(TINY)
    texts = _all_texts(TINY)
    assert len(texts) == 39
    logp = lm.log_prob(texts)
    assert math.isclose(np.exp(logp).sum(), 1.0, abs_tol=1e-9)
    # By hand for one text: first uniform 1/3, then the row entries, then EOS, over Z.
    a, b = FIRST_WORD, FIRST_WORD + 1
    hand = (1 / 3) * lm.trans[a, b] * 0.3 / (1 - 0.7**3)
    assert math.isclose(lm.log_prob([[a, b, EOS_ID]])[0], math.log(hand), rel_tol=1e-12)


def test_log_prob_is_minus_inf_where_the_gold_lm_cannot_go():
    lm = BigramLM.build(TINY)
    w = FIRST_WORD
    zero_next = int(np.flatnonzero(lm.trans[w, FIRST_WORD:] == 0)[0]) + FIRST_WORD
    bad = [[], [EOS_ID], [w], [w, w, w, w, EOS_ID], [w, EOS_ID, w, EOS_ID], [UNK_ID, EOS_ID],
           [w, zero_next, EOS_ID], [99, EOS_ID], [-1, EOS_ID]]
    assert np.isneginf(lm.log_prob(bad)).all()


def test_sampler_frequencies_match_exact_probabilities():
    lm = BigramLM.build(TINY)
    texts = _all_texts(TINY)
    p = np.exp(lm.log_prob(texts))
    samples = lm.sample(100_000, np.random.default_rng(0))
    index = {tuple(t): i for i, t in enumerate(texts)}
    counts = np.bincount([index[tuple(s)] for s in samples], minlength=len(texts))  # KeyError = impossible text
    freq = counts / len(samples)
    z = np.abs(freq - p) / np.sqrt(p * (1 - p) / len(samples) + 1e-12)
    assert z.max() < 4.5, z.max()  # fixed seed: deterministic; 4.5σ over 39 cells
    assert counts[p == 0].sum() == 0


def test_jensen_shannon_by_hand():
    p = np.array([0.2, 0.3, 0.5])
    assert jensen_shannon(p, p) == pytest.approx(0.0, abs=1e-15)
    assert jensen_shannon([1.0, 0.0], [0.0, 1.0]) == pytest.approx(math.log(2), abs=1e-15)
    # p = [1, 0], q = [½, ½]: m = [¾, ¼]; KL(p‖m) = log 4/3, KL(q‖m) = ½ log(⅔) + ½ log 2 = ½ log 4/3
    # → JS = ½ log 4/3 + ¼ log 4/3 = ¾ log 4/3 = 0.21576...
    assert jensen_shannon([1.0, 0.0], [0.5, 0.5]) == pytest.approx(0.75 * math.log(4 / 3), abs=1e-15)
    batch = jensen_shannon(np.array([[1.0, 0.0], [0.5, 0.5]]), np.array([[0.5, 0.5], [0.5, 0.5]]))
    np.testing.assert_allclose(batch, [0.75 * math.log(4 / 3), 0.0], atol=1e-15)


class _LookupLM(torch.nn.Module):
    """A 'causal LM' whose logits at each position are a fixed row keyed by that position's token."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(logits)  # (N, N)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])  # (B, T, N)


def _gold_model(lm: BigramLM) -> _LookupLM:
    # log 0 → −1e4: exp underflows to exactly 0 in float32, and the unused UNK row stays finite.
    return _LookupLM(torch.log(torch.tensor(lm.trans, dtype=torch.float32)).clamp_min(-1e4))


def test_transition_metrics_of_the_gold_rows_are_zero():
    lm = BigramLM.build(BigramSpec(vocab_size=30, seed=2))
    m = transition_metrics(_gold_model(lm), lm, batch_size=7)  # 7: several batches, a ragged last one
    assert m["js_mean"] == pytest.approx(0.0, abs=1e-9)
    assert m["mass_on_gold_zeros"] == pytest.approx(0.0, abs=1e-9)
    assert m["first_token_js"] == pytest.approx(0.0, abs=1e-9)
    assert m["eos_mass_mean"] == pytest.approx(0.05, abs=1e-6)


def test_transition_metrics_of_a_uniform_model_by_hand():
    lm = BigramLM.build(BigramSpec(vocab_size=20, zero_fraction=0.5, seed=2))
    first, rows = model_rows(_LookupLM(torch.zeros(22, 22)), lm)
    np.testing.assert_allclose(rows, 1 / 22)
    m = transition_metrics(_LookupLM(torch.zeros(22, 22)), lm)
    # Gold zeros per row: 10 words + UNK = 11 of 22 ids → uniform mass 1/2 on them.
    assert m["mass_on_gold_zeros"] == pytest.approx(0.5, abs=1e-12)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"bigram.language.zero_fraction=1.5: must be in \[0, 1\)"):
        BigramSpec(zero_fraction=1.5)
    with pytest.raises(ConfigError, match="bigram.language.alpha"):
        bigram_config({"language": {"alpha": 0}})
    with pytest.raises(ConfigError, match="bigram.model.n_positions"):
        bigram_config({"model": {"n_positions": 64}})
    with pytest.raises(ConfigError, match="unknown key 'bigram.steps'"):
        bigram_config({"steps": 3})
    with pytest.raises(ConfigError, match="sft.objectives.mixce"):
        variant_objective({"objectives": {"mixce": {"eta": 2.0}}}, "mixce")
    assert variant_objective({"objectives": {"m1": {"objective": "mixce", "eta": 0.3}}}, "m1") == ("mixce", {"eta": 0.3})


SMOKE = BigramConfig(
    language=BigramSpec(vocab_size=20, max_len=16, eos_prob=0.2), model=ModelConfig(n_layer=1, n_head=2, n_embd=16, n_positions=17),
    n_train=200, n_test=50, train=TrainConfig(max_steps=20, batch_size=16, warmup_steps=2, log_every=5, ckpt_every=0),
)


@pytest.mark.parametrize("objective, hyperparams",
                         [("mixce", {"eta": 0.1}), *((name, {}) for name in OBJECTIVES)])
def test_run_bigram_smoke(objective, hyperparams):
    m = run_bigram(SMOKE, objective, objective, hyperparams, seed=0)
    assert m["train"]["steps"] == 20
    flat = [*m["transition"].values(), *m["test"].values(), m["train_counts"]["js_mean"]]
    assert all(math.isfinite(v) for v in flat)
    assert 0 <= m["transition"]["js_mean"] <= math.log(2)
    assert m["test"]["forward_kl_per_seq"] > 0  # an untrained-ish model is far from the gold LM


def test_stage_writes_exactly_its_metrics(tmp_path, monkeypatch):
    params = {"bigram": {"language": {"vocab_size": 20, "max_len": 8, "eos_prob": 0.3}, "n_train": 64, "n_test": 8,
                         "train": {"max_steps": 2, "batch_size": 8, "warmup_steps": 0, "log_every": 1},
                         "model": {"n_layer": 1, "n_head": 2, "n_embd": 8, "n_positions": 9}},
              "sft": {"variants": ["mixce"], "seeds": [0], "objectives": {"mixce": {"eta": 0.1}}}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["bigram", "--variant", "mixce", "--seed", "0", "--metrics", "m.json"])
    runpy.run_module("stages.bigram", run_name="__main__")  # in-process: a subprocess re-imports torch (~10 s)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.timing.json", "params.yaml"]  # + wall time
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["objective"] == "mixce" and metrics["hyperparams"] == {"eta": 0.1}
