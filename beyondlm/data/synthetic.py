"""A synthetic English-like review language p_d whose exact sequence probability is known.

Generative story (a seeded mixture of hidden Markov models):
1. A latent component c = (sentiment s, topic z), c = s * n_topics + z (s = 0 negative, 1
   positive), is drawn uniformly once and persists through the whole review: the long-range
   dependency a small language model cannot fully capture.
2. Given c, a chain of grammar slots (`SLOTS`: DET, PRON, ADJ, NOUN, COPULA, ..., END, EOS) runs
   with init[c] and trans[c]; each slot emits one token from emit[c, slot]. trans[c] is a
   Dirichlet perturbation of the hand-made `_BASE_TRANS` on its support (structural zeros such as
   DET -> VERB stay zero), except END -> EOS = 1 / mean_sentences in every component, so the number
   of sentences is geometric with that mean. EOS is absorbing and emits only the EOS token; a text
   is the tokens up to and including the first EOS.
3. NOUN slots emit topic nouns (weight 0.85) or generic nouns; adjective and verb slots emit words
   of the component's sentiment (weight sentiment_strength) or neutral ones, never words of the
   other sentiment (mixed reviews are gold zeros); other slots emit their own class. Within a class,
   Zipf weights rank^-zipf_exponent over a seeded permutation give a long tail of rare words.
4. p_d is the HMM conditioned on length <= max_len tokens (EOS included): log p_d(x) =
   log p_hmm(x) - log Z, Z = sum_c pi_c P(EOS slot reached within max_len steps | c).

Exactness: `log_prob` is exact up to float64 rounding (scaled forward recursion per component,
batched over sequences and components, O(length * C * edges); logsumexp over components), with
exactly -inf for texts the language cannot produce (no final EOS, EOS before the end, longer than
max_len, <unk> or any unemittable token). Z is exact from powers of the slot chains (emissions do
not affect length). `sample` is exact: ancestral sampling with rejection of (component, slot path)
pairs longer than max_len, which is exactly the length conditioning, then emissions.

Oracle reward: r*(x) = log P(s=pos | x) - log P(s=neg | x) under the uniform prior and emissions
smoothed to (1 - eps) * emit + eps / V, so it is finite for any token sequence.

Entropy rate (the floor no model can beat): H = -sum_i log p_d(x_i) / sum_i |x_i| over n samples
x_i ~ p_d, in nats per token with EOS counted; a ratio estimator with delta-method standard error
se = sqrt(Var(a_i - H * L_i) / n) / mean(L_i), a_i = -log p_d(x_i), L_i = |x_i|.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from beyondlm.data import wordlists as W

SLOTS = ("DET", "PRON", "ADJ", "NOUN", "COPULA", "ADV", "PRED_ADJ", "VERB", "ODET", "ONOUN",
         "PREP", "CONJ", "COMMA", "END", "EOS")
_S = {name: i for i, name in enumerate(SLOTS)}
G = len(SLOTS)
EOS_SLOT = _S["EOS"]
TOPIC_NOUN_WEIGHT = 0.85  # rest of a NOUN slot's mass goes to generic nouns
MAX_WORDS_PER_CLASS = max(len(v) for k, v in vars(W).items()
                          if k.isupper() and isinstance(v, tuple))
_CHUNK = 4096  # sequences per forward pass: (C, G, chunk) float64 arrays stay in cache
MIN_LEN = 5  # shortest review: PRON COPULA PRED_ADJ END EOS ("i was great . <eos>")

_BASE_INIT = {"DET": 0.6, "PRON": 0.4}
# Hand-made review grammar; absent entries are structural zeros. The END row is scaled by
# 1 - 1/mean_sentences and END -> EOS set to 1/mean_sentences in `_build_grammar`.
_BASE_TRANS = {
    "DET": {"ADJ": 0.3, "NOUN": 0.7},
    "PRON": {"VERB": 0.65, "COPULA": 0.35},
    "ADJ": {"NOUN": 0.85, "ADJ": 0.15},
    "NOUN": {"COPULA": 0.75, "VERB": 0.25},
    "COPULA": {"ADV": 0.45, "PRED_ADJ": 0.55},
    "ADV": {"PRED_ADJ": 0.9, "ADV": 0.1},
    "PRED_ADJ": {"END": 0.75, "COMMA": 0.1, "CONJ": 0.1, "PREP": 0.05},
    "VERB": {"ODET": 1.0},
    "ODET": {"ONOUN": 1.0},
    "ONOUN": {"END": 0.75, "COMMA": 0.08, "CONJ": 0.07, "PREP": 0.1},
    "PREP": {"ODET": 1.0},
    "CONJ": {"DET": 0.55, "PRON": 0.45},
    "COMMA": {"CONJ": 0.8, "DET": 0.1, "PRON": 0.1},
    "END": {"DET": 0.6, "PRON": 0.4},
    "EOS": {"EOS": 1.0},
}


@dataclass(frozen=True)
class LanguageSpec:
    """Parameters of the synthetic language (params section `synthetic`)."""
    n_topics: int = 5
    words_per_class: int = 40
    zipf_exponent: float = 1.1
    sentiment_strength: float = 0.7      # in [0,1]
    mean_sentences: float = 3.0          # >= 1 (a review has at least one sentence)
    max_len: int = 64                    # tokens incl. EOS
    transition_concentration: float = 20.0  # > 0; higher = components' grammars closer to the base
    reward_smoothing: float = 0.01       # eps for the oracle's emission smoothing, in (0,1)
    seed: int = 0

    def __post_init__(self):
        n_max = len(W.TOPIC_NOUNS)
        _check_int("n_topics", self.n_topics, 1, n_max, "topics defined in wordlists")
        _check_int("words_per_class", self.words_per_class, 1, MAX_WORDS_PER_CLASS,
                   "longest word list")
        _check_int("max_len", self.max_len, MIN_LEN, 100_000, "the shortest review has 5 tokens")
        _check_int("seed", self.seed, 0, 2**63 - 1, "numpy seeds are non-negative")
        _check_float("zipf_exponent", self.zipf_exponent, 0.0, 20.0)
        _check_float("sentiment_strength", self.sentiment_strength, 0.0, 1.0)
        _check_float("mean_sentences", self.mean_sentences, 1.0, 1e6)
        _check_float("transition_concentration", self.transition_concentration, 0.0, math.inf,
                     lo_open=True, hi_open=True)
        _check_float("reward_smoothing", self.reward_smoothing, 0.0, 1.0,
                     lo_open=True, hi_open=True)


def _check_int(name, value, lo, hi, why):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(
            f"synthetic.{name}={value!r}: must be an integer between {lo} and {hi} ({why})")


def _check_float(name, value, lo, hi, lo_open=False, hi_open=False):
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (value > lo if lo_open else value >= lo)
    ok = ok and (value < hi if hi_open else value <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"synthetic.{name}={value!r}: must be a finite number in {rng}")


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    """log(sum(exp(a))) along `axis`; -inf where all entries are -inf, without warnings."""
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.log(np.sum(np.exp(a - m), axis=axis)) + np.squeeze(m, axis=axis)


def _dirichlet_rows(rng, base: np.ndarray, concentration: float) -> np.ndarray:
    """Rows (..., G) ~ Dirichlet(concentration * base_row) on each row's support; zeros stay 0."""
    support = base > 0
    shape = np.where(support, concentration * base, 1.0)
    g = np.where(support, rng.gamma(shape), 0.0)
    # Tiny Gamma shapes can underflow to 0; keep the support exactly the base grammar's.
    g = np.where(support, np.maximum(g, np.finfo(float).tiny), 0.0)
    return g / g.sum(axis=-1, keepdims=True)


def _build_grammar(spec: LanguageSpec, rng) -> tuple[np.ndarray, np.ndarray]:
    """Per-component init (C, G) and transitions (C, G, G) around the hand-made base grammar."""
    init0, trans0 = np.zeros(G), np.zeros((G, G))
    for name, p in _BASE_INIT.items():
        init0[_S[name]] = p
    for src, row in _BASE_TRANS.items():
        for dst, p in row.items():
            trans0[_S[src], _S[dst]] = p
    n_comp, conc = 2 * spec.n_topics, spec.transition_concentration
    init = _dirichlet_rows(rng, np.broadcast_to(init0, (n_comp, G)), conc)
    trans = _dirichlet_rows(rng, np.broadcast_to(trans0, (n_comp, G, G)), conc)
    q = 1.0 / spec.mean_sentences  # END -> EOS: sentences ~ Geometric(q), mean 1/q
    trans[:, _S["END"], :] *= 1.0 - q  # END's base row has no EOS entry: it now sums to 1 - q
    trans[:, _S["END"], EOS_SLOT] = q
    return init, trans


def _class_lists(spec: LanguageSpec) -> dict[str, tuple[str, ...]]:
    """Word classes in vocabulary order, each truncated to words_per_class."""
    k = spec.words_per_class
    lists = {"comma": W.COMMAS, "end": W.SENTENCE_ENDS, "det": W.DETERMINERS, "pron": W.PRONOUNS,
             "cop": W.COPULAS, "adv": W.ADVERBS, "prep": W.PREPOSITIONS, "conj": W.CONJUNCTIONS,
             "noun": W.GENERIC_NOUNS}
    for z, words in enumerate(list(W.TOPIC_NOUNS.values())[: spec.n_topics]):
        lists[f"topic{z}"] = words
    lists.update({"adj+": W.POSITIVE_ADJECTIVES, "adj-": W.NEGATIVE_ADJECTIVES,
                  "adj0": W.NEUTRAL_ADJECTIVES, "verb+": W.POSITIVE_VERBS,
                  "verb-": W.NEGATIVE_VERBS, "verb0": W.NEUTRAL_VERBS})
    return {name: words[:k] for name, words in lists.items()}


def _build_emissions(spec: LanguageSpec, rng) -> tuple[list[str], np.ndarray]:
    """Vocabulary (V,) and emissions (C, G, V)."""
    lists = _class_lists(spec)
    words = dict.fromkeys(w for ws in lists.values() for w in ws)  # dedupe, keep first occurrence
    vocab = ["<|endoftext|>", "<unk>", *words]
    index = {w: i for i, w in enumerate(vocab)}
    dist = {}  # class -> (V,) Zipf distribution over a seeded permutation of its words
    for name, ws in lists.items():
        ranks = rng.permutation(len(ws)) + 1
        p = np.zeros(len(vocab))
        np.add.at(p, [index[w] for w in ws], ranks ** -spec.zipf_exponent)
        dist[name] = p / p.sum()
    eos = np.zeros(len(vocab))
    eos[SyntheticLanguage.EOS_ID] = 1.0
    a, tw = spec.sentiment_strength, TOPIC_NOUN_WEIGHT
    emit = np.zeros((2 * spec.n_topics, G, len(vocab)))
    for c in range(2 * spec.n_topics):
        sgn, z = ("+" if c >= spec.n_topics else "-"), c % spec.n_topics
        rows = {"DET": dist["det"], "ODET": dist["det"], "PRON": dist["pron"],
                "COPULA": dist["cop"], "ADV": dist["adv"], "PREP": dist["prep"],
                "CONJ": dist["conj"], "COMMA": dist["comma"], "END": dist["end"], "EOS": eos,
                "ADJ": a * dist["adj" + sgn] + (1 - a) * dist["adj0"],
                "VERB": a * dist["verb" + sgn] + (1 - a) * dist["verb0"],
                "NOUN": tw * dist[f"topic{z}"] + (1 - tw) * dist["noun"]}
        rows["PRED_ADJ"], rows["ONOUN"] = rows["ADJ"], rows["NOUN"]
        for slot, row in rows.items():
            emit[c, _S[slot]] = row
    return vocab, emit


def _pad(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> ids (N, T) int64 padded with 0, lengths (N,)."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    ids = np.zeros((len(seqs), int(lengths.max(initial=0))), dtype=np.int64)
    if lengths.sum():
        flat = np.fromiter(itertools.chain.from_iterable(seqs), np.int64, count=lengths.sum())
        ids[np.arange(ids.shape[1]) < lengths[:, None]] = flat  # row-major fill = sequence order
    return ids, lengths


def _inverse_cdf(probs: np.ndarray, u: np.ndarray) -> np.ndarray:
    """One categorical draw (N,) per row of probs (N, K) from uniforms u (N,); never a zero."""
    cum = np.cumsum(probs, axis=-1)
    cum /= cum[:, -1:]  # last entry exactly 1, so u < 1 always lands inside the row
    return (u[:, None] >= cum).sum(axis=-1)


class SyntheticLanguage:
    """The language p_d: a mixture over C components of HMMs over G slots and V tokens."""
    EOS_ID = 0
    UNK_ID = 1

    def __init__(self, spec: LanguageSpec, vocab: list[str], log_prior: np.ndarray,
                 init: np.ndarray, trans: np.ndarray, emit: np.ndarray):
        n_comp, v = 2 * spec.n_topics, len(vocab)
        shapes = {"log_prior": (log_prior.shape, (n_comp,)), "init": (init.shape, (n_comp, G)),
                  "trans": (trans.shape, (n_comp, G, G)), "emit": (emit.shape, (n_comp, G, v))}
        for name, (got, want) in shapes.items():
            if got != want:
                raise ValueError(f"SyntheticLanguage.{name} has shape {got}, expected {want}")
        self.spec, self.vocab = spec, list(vocab)
        self.log_prior, self.init, self.trans, self.emit = (
            np.asarray(x, dtype=np.float64) for x in (log_prior, init, trans, emit))
        self._index = {w: i for i, w in enumerate(self.vocab)}
        used = (trans > 0).any(axis=0)  # (G, G) edges of any component
        self._sources = [[(g, trans[:, g, h][:, None]) for g in np.flatnonzero(used[:, h])]
                         for h in range(G)]  # per destination slot: (source, coef (C, 1))
        self._log_z = self._compute_log_z()
        if not np.isfinite(self._log_z):
            raise ValueError(f"synthetic.max_len={spec.max_len}: no review fits (Z = 0)")

    @classmethod
    def build(cls, spec: LanguageSpec) -> "SyntheticLanguage":
        """Deterministic given spec: all randomness from np.random.default_rng(spec.seed)."""
        rng = np.random.default_rng(spec.seed)
        init, trans = _build_grammar(spec, rng)
        vocab, emit = _build_emissions(spec, rng)
        n_comp = 2 * spec.n_topics
        return cls(spec, vocab, np.full(n_comp, -np.log(n_comp)), init, trans, emit)

    # ---- serialization -------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-serializable dict; float64 values round-trip exactly through json (repr)."""
        return {"spec": asdict(self.spec), "vocab": list(self.vocab),
                "log_prior": self.log_prior.tolist(), "init": self.init.tolist(),
                "trans": self.trans.tolist(), "emit": self.emit.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "SyntheticLanguage":
        """Inverse of to_dict; unknown or missing keys raise ValueError."""
        keys = {"spec", "vocab", "log_prior", "init", "trans", "emit"}
        if set(d) != keys:
            raise ValueError(f"SyntheticLanguage.from_dict: keys {sorted(d)}, "
                             f"expected {sorted(keys)}")
        arrays = {k: np.asarray(d[k], dtype=np.float64)
                  for k in ("log_prior", "init", "trans", "emit")}
        return cls(LanguageSpec(**d["spec"]), list(d["vocab"]), **arrays)

    def save(self, path) -> None:
        """Write JSON atomically: temp file in the same directory, then os.replace."""
        path = os.fspath(path)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path) -> "SyntheticLanguage":
        """Read a file written by save."""
        with open(path) as f:
            return cls.from_dict(json.load(f))

    @property
    def vocab_size(self) -> int:
        """V, the number of token ids (EOS and UNK included)."""
        return len(self.vocab)

    # ---- sampling ------------------------------------------------------------------------
    def sample(self, n: int, rng: np.random.Generator) -> list[list[int]]:
        """n exact samples of p_d, each a list of token ids ending with EOS_ID."""
        return self.sample_with_components(n, rng)[0]

    def sample_with_components(self, n: int, rng: np.random.Generator
                               ) -> tuple[list[list[int]], np.ndarray]:
        """n exact samples of p_d and their components (n,) (c = s * n_topics + z)."""
        prior = np.exp(self.log_prior - _logsumexp(self.log_prior, 0))
        comps = np.zeros(n, dtype=np.int64)
        slots = np.zeros((n, self.spec.max_len), dtype=np.int64)
        lengths = np.zeros(n, dtype=np.int64)
        todo = np.arange(n)
        while todo.size:
            # Rejection redraws the component too: conditioning on length <= max_len changes the
            # component distribution to pi_c P(len <= max_len | c) / Z.
            c = rng.choice(len(prior), size=todo.size, p=prior)
            paths, lens = self._sample_slot_paths(c, rng)
            ok = lens <= self.spec.max_len
            comps[todo[ok]], slots[todo[ok]], lengths[todo[ok]] = c[ok], paths[ok], lens[ok]
            todo = todo[~ok]
        return self._emit_tokens(comps, slots, lengths, rng), comps

    def _sample_slot_paths(self, comps: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
        """Unconditioned slot paths (m, max_len) for components (m,), and lengths (m,) = first
        EOS position + 1 (max_len + 1 when the path has not ended)."""
        m, L = len(comps), self.spec.max_len
        paths = np.full((m, L), EOS_SLOT, dtype=np.int64)
        g = _inverse_cdf(self.init[comps], rng.random(m))
        paths[:, 0] = g
        for t in range(1, L):
            live = np.flatnonzero(g != EOS_SLOT)  # EOS is absorbing: finished rows stay EOS
            if not live.size:
                break
            g[live] = _inverse_cdf(self.trans[comps[live], g[live]], rng.random(live.size))
            paths[live, t] = g[live]
        is_eos = paths == EOS_SLOT
        lengths = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, L + 1)
        return paths, lengths

    def _emit_tokens(self, comps, slots, lengths, rng) -> list[list[int]]:
        """Token lists for slot paths (n, max_len) and lengths (n,), grouped by (c, slot) row."""
        mask = np.arange(slots.shape[1]) < lengths[:, None]  # (n, max_len)
        keys = (comps[:, None] * G + slots)[mask]  # (total,) row-major = (sequence, position) order
        u = rng.random(keys.size)
        tokens = np.empty(keys.size, dtype=np.int64)
        order = np.argsort(keys, kind="stable")
        for chunk in np.split(order, np.flatnonzero(np.diff(keys[order])) + 1):
            if chunk.size:
                c, g = divmod(int(keys[chunk[0]]), G)
                cum = np.cumsum(self.emit[c, g])
                tokens[chunk] = np.searchsorted(cum / cum[-1], u[chunk], side="right")
        if not len(lengths):
            return []
        return [t.tolist() for t in np.split(tokens, np.cumsum(lengths)[:-1])]

    # ---- exact probabilities -------------------------------------------------------------
    def _compute_log_z(self) -> float:
        """log Z, Z = sum_c pi_c P(first EOS slot at step <= max_len | c) (EOS is absorbing)."""
        v = self.init  # (C, G) slot distribution at step 1
        for _ in range(self.spec.max_len - 1):
            v = np.einsum("cg,cgh->ch", v, self.trans)
        with np.errstate(divide="ignore"):
            return float(_logsumexp(self.log_prior + np.log(v[:, EOS_SLOT]), 0))

    def log_length_normalizer(self) -> float:
        """log Z = log P_hmm(length <= max_len), exact."""
        return self._log_z

    def _forward(self, ids: np.ndarray, lengths: np.ndarray, emit: np.ndarray,
                 require_eos: bool) -> np.ndarray:
        """log p_hmm(x | c) (N, C) for ids (N, T), lengths (N,), emissions (C, G, V).

        The EOS slot may only be occupied at a sequence's last position (the text ends at the
        first EOS). require_eos: the last slot must be EOS; otherwise prefix probabilities.
        Sequences are sorted by length and processed in cache-sized chunks.
        """
        order = np.argsort(-lengths, kind="stable")  # longest first: live rows are a prefix
        out = np.empty((len(lengths), len(self.log_prior)))
        for start in range(0, len(order), _CHUNK):
            idx = order[start:start + _CHUNK]
            n_cols = int(lengths[idx].max(initial=0))
            out[idx] = self._forward_sorted(ids[idx, :n_cols], lengths[idx], emit, require_eos).T
        return out

    def _forward_sorted(self, ids, lens, emit, require_eos) -> np.ndarray:
        """Scaled forward recursion; ids (n, T) sorted by decreasing length -> (C, n) log-liks."""
        n_live = (lens[None, :] > np.arange(ids.shape[1] + 1)[:, None]).sum(axis=1)  # (T+1,)
        ll = np.zeros((len(self.log_prior), len(lens)))  # (C, n)
        if require_eos:
            ll[:, lens == 0] = -np.inf
        alpha = None
        with np.errstate(divide="ignore", invalid="ignore"):
            for t in range(ids.shape[1]):
                n_t, n_next = n_live[t], n_live[t + 1]
                e = np.take(emit, ids[:n_t, t], axis=2)  # (C, G, n_t)
                if t == 0:
                    a = self.init[:, :, None] * e  # (C, G, n_t)
                else:
                    a = self._step(alpha[:, :, :n_t])
                    a *= e
                a[:, EOS_SLOT, :n_next] = 0.0  # rows that continue cannot be at EOS yet
                s = a.sum(axis=1)  # (C, n_t)
                ll[:, :n_t] += np.log(s)
                a /= np.where(s > 0, s, 1.0)[:, None, :]
                if require_eos:
                    ll[:, n_next:n_t] += np.log(a[:, EOS_SLOT, n_next:n_t])
                alpha = a
        return ll

    def _step(self, alpha: np.ndarray) -> np.ndarray:
        """alpha (C, G, n) -> (C, G, n): sum_g alpha[:, g] * trans[:, g, h], nonzero edges only.

        Sparse on purpose: the grammar has few edges, and small batched matmuls go through
        multithreaded BLAS calls that are slower than these elementwise updates.
        """
        out = np.empty_like(alpha)
        tmp = np.empty_like(alpha[:, 0])  # (C, n) scratch, avoids a temporary per edge
        for h, sources in enumerate(self._sources):
            if not sources:
                out[:, h] = 0.0
                continue
            np.multiply(alpha[:, sources[0][0]], sources[0][1], out=out[:, h])
            for g, coef in sources[1:]:
                out[:, h] += np.multiply(alpha[:, g], coef, out=tmp)
        return out

    def component_log_likelihood(self, seqs: Sequence[Sequence[int]], *, smoothed: bool = False,
                                 require_eos: bool = True) -> np.ndarray:
        """log p_hmm(x | c) (N, C), not length-normalized; ids must lie in [0, V).

        smoothed: emissions (1 - eps) * emit + eps / V over all V ids (so every sequence has
        positive likelihood when require_eos=False). require_eos=False gives prefix probabilities.
        """
        ids, lengths = _pad(seqs)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        emit = self.emit
        if smoothed:
            eps = self.spec.reward_smoothing
            emit = (1.0 - eps) * emit + eps / self.vocab_size
        return self._forward(ids, lengths, emit, require_eos)

    def log_prob(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        """Exact log p_d(x) (N,) float64; -inf for sequences the language cannot produce."""
        ids, lengths = _pad(seqs)
        bad = ((ids < 0) | (ids >= self.vocab_size)).any(axis=1)  # (N,) unemittable id
        fits = np.flatnonzero(~bad & (lengths > 0) & (lengths <= self.spec.max_len))
        out = np.full(len(seqs), -np.inf)
        if fits.size:
            sub = ids[fits, : lengths[fits].max()]
            ll = self._forward(sub, lengths[fits], self.emit, require_eos=True)  # (M, C)
            out[fits] = _logsumexp(self.log_prior + ll, 1) - self._log_z
        return out

    # ---- oracle --------------------------------------------------------------------------
    def oracle_reward(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        """r*(x) = log P(pos | x) - log P(neg | x) (N,), smoothed model, uniform prior.

        A trailing EOS is dropped (END -> EOS has the same probability in every component, so
        it carries no evidence); finite for any ids in [0, V), 0 for the empty sequence.
        """
        stripped = [s[:-1] if len(s) and s[-1] == self.EOS_ID else s for s in seqs]
        ll = self.component_log_likelihood(stripped, smoothed=True, require_eos=False)  # (N, C)
        k = self.spec.n_topics
        return _logsumexp(ll[:, k:], 1) - _logsumexp(ll[:, :k], 1)

    def posterior_sentiment(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        """P(s = pos | x) (N,) under the smoothed model: sigmoid(oracle_reward)."""
        return np.exp(-np.logaddexp(0.0, -self.oracle_reward(seqs)))

    def entropy_rate_estimate(self, n: int, rng: np.random.Generator) -> tuple[float, float]:
        """(H, se): Monte Carlo entropy rate of p_d in nats per token (EOS counted), n >= 2."""
        if n < 2:
            raise ValueError(f"entropy_rate_estimate: n={n}, need n >= 2 for a standard error")
        seqs = self.sample(n, rng)
        a = -self.log_prob(seqs)  # (n,)
        lens = np.array([len(s) for s in seqs], dtype=np.float64)
        h = a.sum() / lens.sum()
        se = np.sqrt(np.var(a - h * lens, ddof=1) / n) / lens.mean()  # delta method for a ratio
        return float(h), float(se)

    # ---- text ----------------------------------------------------------------------------
    def decode(self, ids: Sequence[int]) -> str:
        """Tokens joined by single spaces, EOS dropped."""
        return " ".join(self.vocab[i] for i in ids if i != self.EOS_ID)

    def encode(self, text: str) -> list[int]:
        """Whitespace split; unknown words -> UNK_ID; no EOS appended."""
        return [self._index.get(w, self.UNK_ID) for w in text.split()]
