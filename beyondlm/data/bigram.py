"""MixCE's synthetic setting: a random bigram gold LM whose transition rows a model is compared to.

Zhang et al., "MixCE: Training Autoregressive Language Models by Mixing Forward and Reverse
Cross-Entropies", ACL 2023, §5 (synthetic experiments). Their gold LM is a random bigram model over
V word tokens; a learned model is judged by how close its transition rows are to the gold rows
(Jensen–Shannon) and how much mass it puts where the gold row is exactly 0.

Construction (`BigramLM.build`), token ids: 0 = EOS (also BOS) "<|endoftext|>", 1 = "<unk>" (never
emitted, never a context), 2.. = words "w0", "w1", ...; N = V + 2 ids in all.
- first token: uniform over the V words (never EOS: a text has at least one word);
- each word row: Dirichlet(alpha) over the V words, then round(zero_fraction · V) of its word entries
  set to exactly 0 (seeded, at most V − 1 of them, so one word is always kept), renormalized to
  (1 − eos_prob), plus eos_prob on EOS. Zeroing entries of a Dirichlet draw and renormalizing is
  exactly a Dirichlet(alpha) over the kept entries (the gamma-normalization construction).
- `trans[0]` (the BOS context) is the first-token distribution, so p(x) is the product of
  trans[prev, next] along [BOS] + x; `trans[1]` (UNK) is all zeros.

Length: a text x = (x_1 .. x_n) with x_n = EOS has n >= 2 tokens (EOS counted), and every word row
puts exactly eos_prob on EOS, so under the unconditioned chain P(n) = (1 − e)^(n−2) · e, e = eos_prob.
Like our synthetic language (beyondlm/data/synthetic.py), the gold LM is this chain *conditioned on
n <= max_len*:
    log p_d(x) = Σ_t log trans[x_{t−1}, x_t] − log Z,  Z = P(n <= L) = Σ_{n=2..L} (1 − e)^(n−2) e
                                                          = 1 − (1 − e)^(L−1).
`sample` draws from exactly this distribution: whole texts longer than max_len are rejected and
redrawn. `log_prob` is exact up to float64 rounding, and exactly −inf for texts the gold LM cannot
produce (an id out of range, <unk>, EOS missing or not last, a gold-zero transition, too long).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from beyondlm.data.tokenization import EOS, UNK

EOS_ID, UNK_ID, FIRST_WORD = 0, 1, 2
_DRAW_CHUNK = 4096  # rows per inverse-CDF draw: keeps the (rows, N) comparison matrix small


@dataclass(frozen=True)
class BigramSpec:
    """The gold bigram LM (params section ``bigram.language``).

    vocab_size: word tokens V. The paper uses 20..1000; down to 2 is allowed so that tests can
    enumerate every text exactly.
    """

    vocab_size: int = 50
    alpha: float = 0.5  # Dirichlet concentration of each word row
    zero_fraction: float = 0.5  # fraction of each row's word entries set to exactly 0 (never EOS)
    eos_prob: float = 0.05  # mass on EOS in every word row: mean length ~ 1 + 1/eos_prob
    max_len: int = 64  # tokens incl. EOS; p_d is conditioned on length <= max_len
    seed: int = 0

    def __post_init__(self) -> None:
        _check_int("vocab_size", self.vocab_size, 2, 1000)
        _check_int("max_len", self.max_len, 2, 100_000)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        _check_float("alpha", self.alpha, 0.0 < self.alpha < math.inf, "in (0, inf)")
        _check_float("zero_fraction", self.zero_fraction, 0.0 <= self.zero_fraction < 1.0, "in [0, 1)")
        _check_float("eos_prob", self.eos_prob, 0.0 < self.eos_prob < 1.0, "in (0, 1)")


def _check_int(name: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise ValueError(f"bigram.language.{name}={value!r}: must be an integer in [{lo}, {hi}]")


def _check_float(name: str, value, ok: bool, allowed: str) -> None:
    number = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and ok):
        raise ValueError(f"bigram.language.{name}={value!r}: must be {allowed}")


class BigramLM:
    """The gold distribution: ``first`` (N,), ``trans`` (N, N) rows, ``vocab`` (N names)."""

    EOS_ID, UNK_ID = EOS_ID, UNK_ID

    def __init__(self, spec: BigramSpec, trans: np.ndarray):
        self.spec = spec
        self.trans = trans  # (N, N); row 0 = first-token distribution, row 1 (UNK) = 0
        self.vocab = [EOS, UNK, *(f"w{i}" for i in range(spec.vocab_size))]
        self._cum = np.cumsum(trans, axis=1)  # (N, N) for inverse-CDF sampling
        e, L = spec.eos_prob, spec.max_len
        # log Z = log(1 − (1 − e)^(L−1)), computed without cancellation for tiny (1 − e)^(L−1) or e.
        self.log_z = float(np.log(-np.expm1((L - 1) * np.log1p(-e))))

    @classmethod
    def build(cls, spec: BigramSpec) -> "BigramLM":
        V, N = spec.vocab_size, spec.vocab_size + 2
        rng = np.random.default_rng(spec.seed)
        rows = rng.dirichlet(np.full(V, spec.alpha), size=V)  # (V, V) word -> word
        n_zero = min(int(round(spec.zero_fraction * V)), V - 1)
        zeroed = np.argsort(rng.random((V, V)), axis=1)[:, :n_zero]  # (V, n_zero) distinct per row
        np.put_along_axis(rows, zeroed, 0.0, axis=1)
        # Only float64 underflow of every kept gamma draw could empty a row; guard anyway.
        if (rows.sum(axis=1) <= 0).any():
            raise ValueError("bigram.language: a row lost all its mass; change seed or alpha")
        rows *= (1.0 - spec.eos_prob) / rows.sum(axis=1, keepdims=True)
        trans = np.zeros((N, N))
        trans[FIRST_WORD:, FIRST_WORD:] = rows
        trans[FIRST_WORD:, EOS_ID] = spec.eos_prob
        trans[EOS_ID, FIRST_WORD:] = 1.0 / V  # BOS context: first token uniform over words
        return cls(spec, trans)

    @property
    def first(self) -> np.ndarray:
        """(N,) the first-token distribution: uniform over words, 0 on EOS and UNK."""
        return self.trans[EOS_ID]

    @property
    def word_rows(self) -> np.ndarray:
        """(V, N) the gold next-token distribution after each word, EOS entry included."""
        return self.trans[FIRST_WORD:]

    @property
    def n_tokens(self) -> int:
        return len(self.vocab)

    # ---- sampling ------------------------------------------------------------------------
    def sample(self, n: int, rng: np.random.Generator) -> list[list[int]]:
        """n exact samples of p_d (conditioned on length <= max_len), each ending with EOS, no BOS.

        Vectorized ancestral sampling; a text still running after max_len tokens is rejected and
        the whole text redrawn, which is exactly the length conditioning (acceptance rate Z).
        """
        L = self.spec.max_len
        out = np.zeros((n, L), dtype=np.int32)  # ids < 1002 (V <= 1000)
        lengths = np.zeros(n, dtype=np.int64)
        todo = np.arange(n)
        while todo.size:
            paths, lens = self._sample_paths(todo.size, rng)
            ok = lens <= L
            out[todo[ok]], lengths[todo[ok]] = paths[ok], lens[ok]
            todo = todo[~ok]
        return [out[i, : lengths[i]].tolist() for i in range(n)]

    def _sample_paths(self, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Unconditioned texts (m, L) and lengths (m,) = first EOS index + 1 (L + 1 if none)."""
        L = self.spec.max_len
        paths = np.zeros((m, L), dtype=np.int32)
        prev = np.full(m, EOS_ID, dtype=np.int64)  # every text starts after BOS
        live = np.arange(m)
        for t in range(L):
            tok = self._draw(prev[live], rng)
            paths[live, t], prev[live] = tok, tok
            live = live[tok != EOS_ID]
            if not live.size:
                break
        ended = np.ones(m, dtype=bool)
        ended[live] = False  # still running after L tokens: too long, rejected by `sample`
        lengths = np.where(ended, (paths == EOS_ID).argmax(axis=1) + 1, L + 1)
        return paths, lengths

    def _draw(self, prev: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One next token per context in ``prev`` (k,) by inverse CDF over trans[prev]."""
        u = 1.0 - rng.random(prev.size)  # (0, 1]: u = 0 could pick a zero-probability id 0
        out = np.empty(prev.size, dtype=np.int64)
        for lo in range(0, prev.size, _DRAW_CHUNK):
            cum = self._cum[prev[lo : lo + _DRAW_CHUNK]]  # (k, N)
            target = u[lo : lo + _DRAW_CHUNK, None] * cum[:, -1:]  # (k, 1)
            # Count of cumulative values strictly below the target: skips zero-probability ids.
            out[lo : lo + _DRAW_CHUNK] = (cum < target).sum(axis=1)
        return np.minimum(out, self.n_tokens - 1)

    # ---- exact probabilities -------------------------------------------------------------
    def log_prob(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        """Exact log p_d(x) (n,) float64 for texts without BOS; −inf where p_d(x) = 0."""
        n = len(seqs)
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        width = int(lengths.max(initial=1))
        ids = np.full((n, width), EOS_ID, dtype=np.int64)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s
        pos = np.arange(width)
        inside = pos < lengths[:, None]  # (n, width)
        in_range = (((ids >= 0) & (ids < self.n_tokens)) | ~inside).all(axis=1)
        last = ids[np.arange(n), np.maximum(lengths - 1, 0)]
        early_eos = ((ids == EOS_ID) & (pos < lengths[:, None] - 1)).any(axis=1)
        ok = in_range & (lengths >= 1) & (lengths <= self.spec.max_len) & (last == EOS_ID) & ~early_eos
        ids = np.where(in_range[:, None], ids, EOS_ID)  # rows with bad ids are −inf anyway
        prev = np.concatenate([np.full((n, 1), EOS_ID), ids[:, :-1]], axis=1)  # (n, width), BOS first
        with np.errstate(divide="ignore"):
            step = np.where(inside, np.log(self.trans[prev, ids]), 0.0)  # (n, width)
        return np.where(ok, step.sum(axis=1) - self.log_z, -np.inf)

    def entropy_rate(self, seqs: Sequence[Sequence[int]]) -> tuple[float, float]:
        """(H, se): −Σ log p_d(x_i) / Σ |x_i| in nats per token (EOS counted) on samples of p_d,
        with the delta-method standard error of this ratio estimator."""
        a = -self.log_prob(seqs)
        lens = np.array([len(s) for s in seqs], dtype=np.float64)
        h = a.sum() / lens.sum()
        se = np.sqrt(np.var(a - h * lens, ddof=1) / len(seqs)) / lens.mean()
        return float(h), float(se)


# ---- comparing rows ------------------------------------------------------------------------
def jensen_shannon(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """JS(p, q) = ½ KL(p‖m) + ½ KL(q‖m), m = (p + q) / 2, in nats over the last axis (0·log 0 = 0).

    Inputs are probability vectors (..., K); the result has shape (...) and lies in [0, log 2].
    """
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    m = 0.5 * (p + q)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log(p / m), 0.0).sum(axis=-1)
        kl_q = np.where(q > 0, q * np.log(q / m), 0.0).sum(axis=-1)
    return np.maximum(0.5 * (kl_p + kl_q), 0.0)  # clamp: rounding can dip just below 0


@torch.no_grad()
def model_rows(model: torch.nn.Module, lm: BigramLM, *, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The model's first-token distribution (N,) after [BOS] and its word rows (V, N) after
    [BOS, w], softmax over the gold LM's N ids only (logits of any extra ids are dropped)."""
    device = next(model.parameters()).device
    words = torch.arange(FIRST_WORD, lm.n_tokens, device=device)  # (V,)
    ids = torch.stack([torch.full_like(words, EOS_ID), words], dim=1)  # (V, 2): [BOS, w]
    first, rows = None, []
    for lo in range(0, len(words), batch_size):
        batch = ids[lo : lo + batch_size]
        logits = model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits  # (b, 2, ≥N)
        probs = torch.softmax(logits[..., : lm.n_tokens].double(), dim=-1)  # (b, 2, N)
        first = probs[0, 0] if first is None else first
        rows.append(probs[:, 1])
    return first.cpu().numpy(), torch.cat(rows).cpu().numpy()


def transition_metrics(model: torch.nn.Module, lm: BigramLM, *, batch_size: int = 256) -> dict[str, float]:
    """How close a causal LM's learned transition rows are to the gold rows (MixCE §5 metrics).

    The row of word w is the model's next-token distribution after the 2-token context [BOS, w]
    (all V words in batched forward passes), over all N real ids (EOS and UNK included). A
    transformer's next-token distribution may depend on the whole context, not only on the last
    token; this probe is the bigram-consistent estimate the paper's setting implies (a perfect
    model of a bigram LM gives the gold row after every context), measured at position 1 only.
    - js_mean: mean over word rows of JS(model row, gold row), nats;
    - mass_on_gold_zeros: mean over word rows of the model's mass on ids whose gold probability is
      exactly 0 (zeroed words and UNK);
    - first_token_js: JS between the model's distribution after [BOS] and the gold first token;
    - eos_mass_mean: mean model probability of EOS after a word (gold: eos_prob).
    """
    first, rows = model_rows(model, lm, batch_size=batch_size)
    gold = lm.word_rows  # (V, N)
    return {
        "js_mean": float(jensen_shannon(rows, gold).mean()),
        "mass_on_gold_zeros": float(np.where(gold == 0, rows, 0.0).sum(axis=1).mean()),
        "first_token_js": float(jensen_shannon(first, lm.first)),
        "eos_mass_mean": float(rows[:, EOS_ID].mean()),
    }


def empirical_rows(lm: BigramLM, seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, int]:
    """Count-based bigram rows (V, N) from texts (with or without BOS), and the number of words never seen as a
    context (their rows are left uniform over N). The finite-data floor a model is compared to."""
    counts = np.zeros((lm.n_tokens, lm.n_tokens))
    prev = np.concatenate([np.asarray(s[:-1], dtype=np.int64) for s in seqs])  # all bigrams
    nxt = np.concatenate([np.asarray(s[1:], dtype=np.int64) for s in seqs])
    np.add.at(counts, (prev, nxt), 1.0)
    rows = counts[FIRST_WORD:]  # (V, N)
    total = rows.sum(axis=1, keepdims=True)
    unseen = int((total[:, 0] == 0).sum())
    return np.where(total > 0, rows / np.maximum(total, 1.0), 1.0 / lm.n_tokens), unseen
