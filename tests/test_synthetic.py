"""Tests for the synthetic review language: exactness of p_d, the sampler, the oracle, I/O."""

import itertools
import json
import math
import warnings

import numpy as np
import pytest

from beyondlm.data import wordlists
from beyondlm.data.synthetic import EOS_SLOT, SLOTS, LanguageSpec, SyntheticLanguage

# Tiny instance: 2 components, 18 tokens, reviews of 1-2 sentences (Z ~ 0.55, so the length
# normalizer matters in every check that uses it).
TINY = LanguageSpec(n_topics=1, words_per_class=1, max_len=9, mean_sentences=1.5, seed=3)


@pytest.fixture(scope="module")
def tiny():
    return SyntheticLanguage.build(TINY)


@pytest.fixture(scope="module")
def default():
    return SyntheticLanguage.build(LanguageSpec())


def _lse(a, axis):
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.exp(a - m).sum(axis=axis)) + np.squeeze(m, axis)


def _brute_force_length_probs(lang):
    """P(length <= max_len | c) (C,) by depth-first enumeration of slot paths (pruned on zero
    transitions), independent of the matrix powers the library uses."""
    def finish_prob(c, g, p, depth):  # P(first EOS within max_len | at slot g at step depth)
        if g == EOS_SLOT:
            return p
        if depth == lang.spec.max_len:
            return 0.0
        return sum(finish_prob(c, h, p * lang.trans[c, g, h], depth + 1)
                   for h in np.flatnonzero(lang.trans[c, g] > 0))
    return np.array([sum(finish_prob(c, g, lang.init[c, g], 1) for g in np.flatnonzero(lang.init[c] > 0))
                     for c in range(len(lang.log_prior))])


def _brute_force_z(lang):
    return float(np.exp(lang.log_prior) @ _brute_force_length_probs(lang))


def _brute_force_prob(lang, x, z):
    """p_d(x) as an explicit sum over slot paths. Per position only slots that can emit x_t in
    some component are enumerated: every omitted path has an exactly-zero emission factor."""
    cands = [[g for g in range(len(SLOTS)) if lang.emit[:, g, tok].max() > 0] for tok in x]
    total = 0.0
    for c in range(len(lang.log_prior)):
        for path in itertools.product(*cands):
            if path[-1] != EOS_SLOT:
                continue
            p = lang.init[c, path[0]] * lang.emit[c, path[0], x[0]]
            for t in range(1, len(x)):
                p *= lang.trans[c, path[t - 1], path[t]] * lang.emit[c, path[t], x[t]]
            total += math.exp(lang.log_prior[c]) * p
    return total / z


def test_forward_equals_brute_force():
    lang = SyntheticLanguage.build(LanguageSpec(n_topics=1, words_per_class=2, max_len=12,
                                                mean_sentences=1.5, seed=5))
    z = _brute_force_z(lang)
    assert math.isclose(math.log(z), lang.log_length_normalizer(), rel_tol=1e-12)
    seqs = lang.sample(8, np.random.default_rng(0))
    assert max(map(len, seqs)) > 6  # some multi-clause or two-sentence reviews
    got = np.exp(lang.log_prob(seqs))
    want = [_brute_force_prob(lang, x, z) for x in seqs]
    np.testing.assert_allclose(got, want, rtol=1e-10)


def _enumerate_reviews(lang):
    """All token sequences with p_d > 0, breadth-first, pruning zero-probability prefixes."""
    frontier, complete = [[]], []
    for _ in range(lang.spec.max_len):
        cand = [p + [v] for p in frontier for v in range(lang.vocab_size)]
        ll = lang.component_log_likelihood(cand, require_eos=False)  # (N, C) prefix log-probs
        alive = np.isfinite(_lse(lang.log_prior + ll, 1))
        keep = [c for c, ok in zip(cand, alive) if ok]
        complete += [c for c in keep if c[-1] == lang.EOS_ID]
        frontier = [c for c in keep if c[-1] != lang.EOS_ID]
    return complete


def test_exact_normalization(tiny):
    reviews = _enumerate_reviews(tiny)
    assert len(reviews) > 100 and max(map(len, reviews)) == TINY.max_len
    assert abs(np.exp(tiny.log_prob(reviews)).sum() - 1.0) < 1e-9
    assert tiny.log_length_normalizer() < math.log(0.7)  # the normalizer is doing real work


def test_sampler_matches_log_prob(tiny):
    n = 20_000
    seqs, comps = tiny.sample_with_components(n, np.random.default_rng(123))
    assert all(s[-1] == tiny.EOS_ID and len(s) <= TINY.max_len for s in seqs)
    assert all(tiny.EOS_ID not in s[:-1] for s in seqs)
    assert np.isfinite(tiny.log_prob(seqs)).all()
    counts = {}
    for s in seqs:
        counts[tuple(s)] = counts.get(tuple(s), 0) + 1
    top = sorted(counts, key=counts.get, reverse=True)[:20]
    p = np.exp(tiny.log_prob([list(s) for s in top]))
    k = np.array([counts[s] for s in top])
    z = (k - n * p) / np.sqrt(n * p * (1 - p))
    assert np.abs(z).max() < 4.5, z  # 20 binomial z-scores; a 10% error in p gives |z| > 10
    p, k = np.append(p, 1 - p.sum()), np.append(k, n - k.sum())  # + one bin for the rest
    chi2 = ((k - n * p) ** 2 / (n * p)).sum()
    assert chi2 < 55.0, chi2  # df = 20: P(chi2 > 55) ~ 5e-5
    # Components of accepted samples follow pi_c P(len <= max_len | c) / Z, not the prior pi_c
    # (a sampler that keeps c when it rejects a too-long path fails this with |z| ~ 10).
    pc = np.exp(tiny.log_prior) * _brute_force_length_probs(tiny)
    pc /= pc.sum()
    zc = (np.bincount(comps, minlength=len(pc)) - n * pc) / np.sqrt(n * pc * (1 - pc))
    assert np.abs(zc).max() < 4.5, zc


def test_impossible_sequences_and_finite_oracle(default):
    lang, rng = default, np.random.default_rng(0)
    good = lang.sample(3, rng)[0]
    eos, unk = lang.EOS_ID, lang.UNK_ID
    too_long = lang.encode("i was great .") * 20 + [eos]
    bad = [good[:-1], good[:2] + [eos] + good[2:], too_long, [unk] + good, good[:-1] + [unk, eos],
           [], [eos], [lang.vocab_size] + good]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(lang.log_prob([good]))[0]
        assert np.all(lang.log_prob(bad) == -np.inf)
        random = [list(rng.integers(0, lang.vocab_size, size=k)) for k in (1, 5, 64, 300)]
        r = lang.oracle_reward(bad[:-1] + random + [good])
    assert np.isfinite(r).all()
    assert lang.oracle_reward([[]])[0] == 0.0
    assert lang.oracle_reward([good])[0] == lang.oracle_reward([good[:-1]])[0]  # trailing EOS ignored
    np.testing.assert_allclose(lang.posterior_sentiment(random), 1 / (1 + np.exp(-lang.oracle_reward(random))))
    with pytest.raises(ValueError, match="token ids"):
        lang.component_log_likelihood([[lang.vocab_size]])


def test_hand_written_review(default):
    lang = default
    text = "the plot was really great , but i loved the ending ."
    ok = lang.encode(text) + [lang.EOS_ID]
    assert lang.UNK_ID not in ok and np.isfinite(lang.log_prob([ok]))[0]
    assert lang.decode(ok) == text
    nonsense = lang.encode("the was plot .") + [lang.EOS_ID]  # DET -> COPULA is a structural zero
    # No component emits both positive and negative words: mixed reviews are gold zeros.
    mixed = lang.encode("the plot was really great , but i hated the ending .") + [lang.EOS_ID]
    assert np.all(lang.log_prob([nonsense, mixed]) == -np.inf)
    assert np.isfinite(lang.oracle_reward([nonsense, mixed])).all()
    assert lang.encode("the zzyzx") == [lang.encode("the")[0], lang.UNK_ID]


def test_oracle_reward_is_informative(default):
    seqs, comps = default.sample_with_components(2000, np.random.default_rng(7))
    pos = comps >= default.spec.n_topics
    r = default.oracle_reward(seqs)
    assert r[pos].mean() > r[~pos].mean()
    assert np.mean((r > 0) == pos) > 0.8


def test_round_trips_and_determinism(tiny, tmp_path):
    seqs = tiny.sample(50, np.random.default_rng(1)) + [[tiny.UNK_ID, tiny.EOS_ID]]
    want = tiny.log_prob(seqs)
    copy = SyntheticLanguage.from_dict(json.loads(json.dumps(tiny.to_dict())))
    np.testing.assert_array_equal(copy.log_prob(seqs), want)
    tiny.save(tmp_path / "lang.json")
    loaded = SyntheticLanguage.load(tmp_path / "lang.json")
    np.testing.assert_array_equal(loaded.log_prob(seqs), want)
    np.testing.assert_array_equal(loaded.oracle_reward(seqs), tiny.oracle_reward(seqs))
    assert [p.name for p in tmp_path.iterdir()] == ["lang.json"]  # no temp file left behind
    again = SyntheticLanguage.build(TINY)
    np.testing.assert_array_equal(again.log_prob(seqs), want)
    assert again.to_dict() == tiny.to_dict()
    other = SyntheticLanguage.build(LanguageSpec(**{**TINY.__dict__, "seed": 4}))
    assert not np.array_equal(other.trans, tiny.trans)
    with pytest.raises(ValueError, match="keys"):
        SyntheticLanguage.from_dict({**tiny.to_dict(), "extra": 1})


@pytest.mark.parametrize("field,value", [
    ("n_topics", 0), ("n_topics", 9), ("n_topics", True), ("words_per_class", 0),
    ("zipf_exponent", -1.0), ("sentiment_strength", 1.5), ("mean_sentences", 0.5),
    ("max_len", 4), ("max_len", 10.0), ("transition_concentration", 0.0),
    ("reward_smoothing", 0.0), ("reward_smoothing", 1.0), ("seed", -1),
    ("zipf_exponent", float("nan")),
])
def test_spec_validation_names_field(field, value):
    with pytest.raises(ValueError, match=rf"^synthetic\.{field}={value!r}: must"):
        LanguageSpec(**{field: value})


def test_default_spec_sanity(default):
    lang = default
    assert 200 <= lang.vocab_size <= 2000
    assert lang.vocab[:2] == ["<|endoftext|>", "<unk>"] and len(set(lang.vocab)) == lang.vocab_size
    rng = np.random.default_rng(11)
    lengths = np.array([len(s) for s in lang.sample(2000, rng)])
    assert 15 <= lengths.mean() <= 50
    z = math.exp(lang.log_length_normalizer())
    assert z >= 0.95
    comps = rng.integers(0, len(lang.log_prior), size=20_000)
    _, raw_lengths = lang._sample_slot_paths(comps, rng)  # unconditioned slot chains
    assert abs(np.mean(raw_lengths <= lang.spec.max_len) - z) < 4 * math.sqrt(z * (1 - z) / 20_000)
    np.testing.assert_allclose(lang.emit.sum(-1), 1.0)
    np.testing.assert_allclose(lang.trans.sum(-1), 1.0)
    assert (lang.trans[0] == 0).sum() > 150  # sparse grammar: structural zeros
    h, se = lang.entropy_rate_estimate(500, rng)
    assert 0 < se < 0.1 * h


def test_word_lists_unique_lowercase():
    lists = [v for k, v in vars(wordlists).items() if k.isupper() and isinstance(v, tuple)]
    lists += list(wordlists.TOPIC_NOUNS.values())
    words = [w for ws in lists for w in ws]
    assert len(words) == len(set(words))
    assert all(w == w.lower() and w.strip() and " " not in w for w in words)
    assert len(wordlists.TOPIC_NOUNS) >= 8
    assert all(len(v) >= 40 for v in wordlists.TOPIC_NOUNS.values())
