"""A learned, context-dependent kNN-LM weight λ(x), and adaptive retrieval that skips queries.

Khandelwal et al. (ICLR 2020) mix with one constant λ. Here λ depends on the position:

    p(y | x) = λ(x) · p_kNN(y | x) + (1 − λ(x)) · p_LM(y | x),   λ(x) = σ(g_θ(φ(x)))

with φ(x) a few per-position features and g_θ a linear map or a one-hidden-layer tanh MLP on
standardised features. θ minimises the mixture NLL on held-out tokens (the valid split; the
datastore is the train split, so valid retrievals look like test ones):

    L(θ) = −1/n Σ_t log( σ(s_t) p_kNN(y_t) + σ(−s_t) p_LM(y_t) ),   s_t = g_θ(φ(x_t)),

computed as logaddexp(logσ(s) + log p_kNN, logσ(−s) + log p_LM) (stable; log p_kNN = −∞ when
y_t is not among the neighbours is fine). Full-batch Adam from the best constant λ; the step
kept is the one with the lowest NLL on a held-out block of the valid positions (``holdout``),
so a gate that learns nothing general falls back to the constant λ instead of overfitting.

Following He, Neubig & Berg-Kirkpatrick, "Efficient Nearest Neighbor Language Models" (EMNLP
2021, adaptive retrieval; code github.com/jxhe/efficient-knnlm): their gate is an MLP trained
on held-out data with exactly this mixture likelihood, from retrieval-FREE features (contextual
embedding, n-gram counts and fertility of the context, LM entropy and max probability), so it
can decide before querying; retrieval is skipped where the predicted λ is small. Our
``adaptive`` gate is that idea with LM features only (entropy, max log-prob, top-2 margin).
Our ``learned`` gate adds retrieval-quality features (nearest distance, mean distance,
neighbour agreement), in the spirit of Drozdov et al., "You can't pick your neighbors, or can
you? When and how to rely on retrieval in the kNN-LM" (Findings of EMNLP 2022), who set λ from
the retrieval quality (bucketed semantic similarity of the neighbours, one tuned λ per bucket);
ours is a smooth learned function instead of buckets, and needs the query, so it saves nothing.

Adaptive retrieval at threshold τ: positions with σ(s_t) < τ skip the datastore and use p_LM
alone (λ = 0); the others query and mix with σ(s_t). τ = 0 skips nothing and is full retrieval
(bit for bit). The "queries saved" are counted, not timed: the LM forward pass runs either way.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from beyondlm.config import check_param, check_range

LM_FEATURES = ("lm_entropy", "lm_max_logp", "lm_margin")
RETRIEVAL_FEATURES = ("knn_log_d1", "knn_log_dmean", "knn_max_p", "knn_top_frac", "knn_lm_agree")
# The gates: name → the features they read. ``adaptive`` must stay retrieval-free.
GATES: dict[str, tuple[str, ...]] = {"learned": LM_FEATURES + RETRIEVAL_FEATURES, "adaptive": LM_FEATURES}
CONTENT_SLOTS = ("ADJ", "PRED_ADJ", "NOUN", "ONOUN", "VERB", "ADV")  # open classes of the synthetic grammar
CLIP = 10.0  # standardised features are clipped to ±CLIP σ: λ stays finite for any input


# ----------------------------------------------------------------------------- features
def lm_features(lm_logp: Tensor) -> dict[str, Tensor]:
    """Retrieval-free features (n,) of log p_LM (n, V): entropy H = −Σ p log p, max_v log p,
    and the margin log p_(1) − log p_(2) between the two most likely tokens."""
    top2 = lm_logp.topk(min(2, lm_logp.shape[-1]), dim=-1).values  # (n, 2)
    entropy = -(lm_logp.exp() * lm_logp.clamp_min(-1e30)).sum(-1)  # clamp: 0·(−inf) would be nan
    margin = top2[:, 0] - top2[:, -1]
    return {"lm_entropy": entropy, "lm_max_logp": top2[:, 0], "lm_margin": margin}


def retrieval_features(dist: Tensor, toks: Tensor, knn_logp: Tensor, lm_logp: Tensor) -> dict[str, Tensor]:
    """Retrieval features (n,) from neighbour distances (n, k) (squared L2, +inf = no result),
    their tokens (n, k), log p_kNN (n, V) and log p_LM (n, V): log(1 + d_1), log(1 + mean_i d_i)
    over found neighbours, max_v p_kNN(v), the fraction of the k neighbours holding the most
    common token, and 1[argmax p_kNN = argmax p_LM]. log1p: identical contexts give d = 0."""
    found = torch.isfinite(dist)  # (n, k)
    d = torch.where(found, dist, torch.zeros_like(dist)).double()
    big = torch.full_like(d[:, 0], 1e30)  # no neighbour at all: "very far", still finite
    d1 = torch.where(found[:, 0], d[:, 0], big)
    dmean = torch.where(found.any(1), d.sum(1) / found.sum(1).clamp_min(1), big)
    counts = torch.zeros_like(knn_logp, dtype=torch.float64).scatter_add_(
        1, toks.long(), found.double())  # (n, V) neighbours per token
    return {"knn_log_d1": torch.log1p(d1), "knn_log_dmean": torch.log1p(dmean),
            "knn_max_p": knn_logp.max(-1).values.double().exp(),
            "knn_top_frac": counts.max(-1).values / dist.shape[1],
            "knn_lm_agree": (knn_logp.argmax(-1) == lm_logp.argmax(-1)).double()}


@dataclass
class TokenScores:
    """Per scored position of one split at one k: targets (n,), log p_LM(y) (n,), log p_kNN(y)
    (n,) and the features of :data:`GATES` ({name: (n,)}), float64 numpy."""

    labels: np.ndarray
    lm_logp: np.ndarray
    knn_logp: np.ndarray
    features: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def concat(cls, parts: list["TokenScores"]) -> "TokenScores":
        cat = np.concatenate
        return cls(cat([p.labels for p in parts]), cat([p.lm_logp for p in parts]),
                   cat([p.knn_logp for p in parts]),
                   {name: cat([p.features[name] for p in parts]) for name in parts[0].features})

    def matrix(self, names: tuple[str, ...]) -> Tensor:
        """Features (n, F) float64 in the order of ``names``."""
        return torch.from_numpy(np.stack([self.features[n] for n in names], 1).astype(np.float64))

    def logps(self) -> tuple[Tensor, Tensor]:
        """(log p_LM(y), log p_kNN(y)), (n,) float64 tensors."""
        return torch.from_numpy(self.lm_logp.astype(np.float64)), torch.from_numpy(self.knn_logp.astype(np.float64))


def token_scores(lm_logp: Tensor, knn_logp: Tensor, dist: Tensor, toks: Tensor, labels: Tensor) -> TokenScores:
    """:class:`TokenScores` of one batch: log-probs (n, V), neighbours (n, k), targets (n,)."""
    y = labels.long().view(-1, 1)  # (n, 1)
    feats = {**lm_features(lm_logp), **retrieval_features(dist, toks, knn_logp, lm_logp)}
    as_np = lambda t: t.detach().double().cpu().numpy()  # noqa: E731
    return TokenScores(y[:, 0].cpu().numpy(), as_np(lm_logp.gather(1, y)[:, 0]), as_np(knn_logp.gather(1, y)[:, 0]),
                       {name: as_np(v) for name, v in feats.items()})


# ----------------------------------------------------------------------------- the gate
def mixture_logps(lm_logp: Tensor, knn_logp: Tensor, gate_logit: Tensor) -> Tensor:
    """log(σ(s) p_kNN(y) + σ(−s) p_LM(y)) (n,) from per-position log-probs (n,) and gate logits
    s (n,), in log space. s = −∞ gives log p_LM exactly, s = +∞ log p_kNN."""
    return torch.logaddexp(F.logsigmoid(gate_logit) + knn_logp, F.logsigmoid(-gate_logit) + lm_logp)


def constant_logit(lam: float, n: int) -> Tensor:
    """Gate logits (n,) of a fixed λ ∈ [0, 1]: logit(λ), ±∞ at the ends (exact limit cases)."""
    s = -math.inf if lam <= 0 else math.inf if lam >= 1 else math.log(lam) - math.log1p(-lam)
    return torch.full((n,), s, dtype=torch.float64)


def best_constant_lambda(lm_logp: Tensor, knn_logp: Tensor, grid: int = 99) -> float:
    """The λ of {1/(grid+1), ..., grid/(grid+1)} with the lowest mixture NLL (the gate's start)."""
    lams = [(i + 1) / (grid + 1) for i in range(grid)]
    nll = [-mixture_logps(lm_logp, knn_logp, constant_logit(lam, len(lm_logp))).mean().item() for lam in lams]
    return lams[int(np.argmin(nll))]


class Gate(torch.nn.Module):
    """λ = σ(g(z)), z = clip((x − mean) / std, ±CLIP) (nan → the mean), g linear (``hidden`` = 0)
    or Linear → tanh → Linear. The output layer starts at weight 0 and bias logit(λ0): the gate
    starts as the constant λ0. float64. ``names``: the features, in column order."""

    def __init__(self, names: tuple[str, ...], mean: Tensor, std: Tensor, *, hidden: int,
                 lam0: float = 0.5, seed: int = 0):
        super().__init__()
        self.names = tuple(names)
        self.register_buffer("mean", mean.double())
        self.register_buffer("std", std.double().clamp_min(1e-6))  # constant feature: no blow-up
        n_in = len(self.names)
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global stream
            torch.manual_seed(seed)
            layers = [torch.nn.Linear(n_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)] if hidden \
                else [torch.nn.Linear(n_in, 1)]
        self.net = torch.nn.Sequential(*layers).double()
        with torch.no_grad():
            self.net[-1].weight.zero_()
            self.net[-1].bias.fill_(math.log(lam0) - math.log1p(-lam0))

    def logits(self, x: Tensor) -> Tensor:
        """Gate logits s (n,) of features x (n, F)."""
        x = torch.where(torch.isnan(x), self.mean, x.double())
        z = ((x - self.mean) / self.std).clamp(-CLIP, CLIP)  # (n, F); ±inf clip too
        return self.net(z).squeeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        """λ (n,) in [0, 1]."""
        return torch.sigmoid(self.logits(x))


@contextlib.contextmanager
def one_thread():
    """torch on one intra-op thread inside: the gate's tensors are (n, F) with F ≤ 8, too small
    to split, and with the cores busy the idle threads' hand-offs dominated (300 Adam steps on
    4000 × 2 features: 19.9 s with 2 threads while another job held both cores, 0.46 s with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@one_thread()
def fit_gate(x: Tensor, lm_logp: Tensor, knn_logp: Tensor, names: tuple[str, ...], *, hidden: int,
             steps: int, lr: float, seed: int, holdout: float = 0.0) -> Gate:
    """A :class:`Gate` on features x (n, F) minimising the mixture NLL L(θ) (module docstring)
    by full-batch Adam for ``steps`` steps, from the best constant λ. Deterministic.

    ``holdout`` > 0: the last ⌈holdout·n⌉ positions (a contiguous block: rows are text by text)
    are not fitted but pick the step with the lowest NLL on them, step 0 (the constant λ)
    included: early stopping, as He et al.'s code keeps the checkpoint best on held-out data.
    Without it a 16-unit gate fitted on the default's valid split was worse on test than the
    LM alone (17.98 vs 17.94). ``gate.best_step`` records the step kept."""
    n_hold = min(math.ceil(holdout * len(x)), len(x) - 1) if holdout > 0 else 0
    cut = len(x) - n_hold
    x = torch.where(torch.isfinite(x), x.double(), torch.nan)  # stats over finite values only
    mean = torch.nanmean(x[:cut], 0)
    std = torch.sqrt(torch.nanmean((x[:cut] - mean) ** 2, 0))
    gate = Gate(names, mean, std, hidden=hidden, lam0=best_constant_lambda(lm_logp[:cut], knn_logp[:cut]), seed=seed)
    opt = torch.optim.Adam(gate.parameters(), lr=lr)

    def held_out_nll() -> float:
        with torch.no_grad():
            return -mixture_logps(lm_logp[cut:], knn_logp[cut:], gate.logits(x[cut:])).mean().item()

    best = (held_out_nll() if n_hold else 0.0, {k: v.clone() for k, v in gate.state_dict().items()}, 0)
    for step in range(1, steps + 1):
        loss = -mixture_logps(lm_logp[:cut], knn_logp[:cut], gate.logits(x[:cut])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if n_hold and (nll := held_out_nll()) < best[0]:
            best = (nll, {k: v.clone() for k, v in gate.state_dict().items()}, step)
    if n_hold:
        gate.load_state_dict(best[1])
    gate.best_step = best[2] if n_hold else steps
    return gate.eval()


def adaptive_logps(lm_logp: Tensor, knn_logp: Tensor, decide_logit: Tensor, tau: float,
                   mix_logit: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Adaptive retrieval: (log p(y) (n,), skipped (n,) bool). Where σ(decide) < τ the query is
    skipped and log p_LM(y) used; elsewhere the mixture with ``mix_logit`` (default: decide)."""
    skip = torch.sigmoid(decide_logit) < tau
    full = mixture_logps(lm_logp, knn_logp, decide_logit if mix_logit is None else mix_logit)
    return torch.where(skip, lm_logp, full), skip


def perplexity(logps: Tensor) -> float:
    return math.exp(-logps.mean().item())


# ----------------------------------------------------------------------------- evaluation
def fit_gates(cfg: "GateConfig", fit: TokenScores) -> dict[str, Gate]:
    """Every gate of :data:`GATES`, fitted on ``fit`` (the valid split's positions)."""
    lm, knn = fit.logps()
    return {name: fit_gate(fit.matrix(names), lm, knn, names, hidden=cfg.hidden, steps=cfg.steps,
                           lr=cfg.lr, seed=cfg.seed, holdout=cfg.holdout) for name, names in GATES.items()}


@one_thread()
def evaluate_gates(cfg: "GateConfig", fit: TokenScores, test: TokenScores, *, fixed_lambda: float,
                   groups: dict[str, np.ndarray] | None = None) -> dict:
    """Gates fitted on ``fit``, scored on ``test``: perplexity of the LM, the fixed λ, each gate
    with full retrieval, and adaptive retrieval per τ (:func:`adaptive_rows`); the mean λ of each
    gate over all test positions and per target group (``groups``: {name: (V,) bool})."""
    gates = fit_gates(cfg, fit)
    out: dict = {"fixed_lambda": fixed_lambda, "n_fit": len(fit.labels), "n_test": len(test.labels),
                 "ppl_tolerance": cfg.ppl_tolerance,
                 "features": {name: list(g.names) for name, g in gates.items()},
                 "best_step": {name: g.best_step for name, g in gates.items()}}
    out["valid_ppl"] = gate_perplexities(gates, fit, fixed_lambda)[0]
    out["test_ppl"], logits = gate_perplexities(gates, test, fixed_lambda)
    lm, knn = test.logps()
    out["mean_lambda"] = {name: lambda_means(torch.sigmoid(s), test.labels, groups or {}) for name, s in logits.items()}
    out["adaptive"] = adaptive_rows(cfg, lm, knn, logits["adaptive"], logits["learned"], out["test_ppl"])
    out["best_saving"] = {ref: best_saving(out["adaptive"], ref, cfg.ppl_tolerance) for ref in ("full", "fixed")}
    return out


def gate_perplexities(gates: dict[str, Gate], scores: TokenScores, fixed_lambda: float
                      ) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Perplexity on ``scores`` of the LM, the fixed λ and each gate (full retrieval), and each
    gate's logits (n,)."""
    lm, knn = scores.logps()
    with torch.no_grad():
        logits = {name: g.logits(scores.matrix(g.names)) for name, g in gates.items()}
    ppl = {"lm": perplexity(lm), "fixed": perplexity(mixture_logps(lm, knn, constant_logit(fixed_lambda, len(lm)))),
           **{name: perplexity(mixture_logps(lm, knn, s)) for name, s in logits.items()}}
    return ppl, logits


def lambda_means(lam: Tensor, labels: np.ndarray, groups: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean λ (n,) over all positions and over those whose target is in each group's tokens."""
    out = {"all": lam.mean().item()}
    for name, mask in groups.items():
        out[f"n_{name}"] = int(mask[labels].sum())
        sel = torch.from_numpy(mask[labels])
        out[name] = lam[sel].mean().item() if sel.any() else None
    return out


def adaptive_rows(cfg: "GateConfig", lm: Tensor, knn: Tensor, decide: Tensor, learned: Tensor,
                  test_ppl: dict[str, float]) -> dict[str, dict]:
    """Per τ: the fraction of queries skipped, the perplexity mixing the queried positions with
    the adaptive λ (``ppl``) or with the learned λ (``ppl_learned_mix``: the adaptive gate decides
    whether to query, the learned one how much to trust the answer), and ``ppl`` relative to full
    retrieval with the adaptive gate (``vs_full``) and to the fixed λ (``vs_fixed``), and the share
    of full retrieval's gain over the LM kept (``gain_kept``, :func:`gain_kept`)."""
    rows = {}
    for tau in cfg.thresholds:
        logps, skipped = adaptive_logps(lm, knn, decide, tau)
        ppl = perplexity(logps)
        rows[str(float(tau))] = {
            "queries_saved": skipped.double().mean().item(), "ppl": ppl,
            "ppl_learned_mix": perplexity(adaptive_logps(lm, knn, decide, tau, mix_logit=learned)[0]),
            "vs_full": ppl / test_ppl["adaptive"], "vs_fixed": ppl / test_ppl["fixed"],
            "gain_kept": gain_kept(test_ppl["lm"], test_ppl["adaptive"], ppl)}
    return rows


def gain_kept(lm_ppl: float, full_ppl: float, ppl: float) -> float | None:
    """(ppl_LM − ppl) / (ppl_LM − ppl_full): the share of full retrieval's perplexity gain over the
    LM still there after skipping; None when full retrieval does not beat the LM."""
    return (lm_ppl - ppl) / (lm_ppl - full_ppl) if full_ppl < lm_ppl else None


def best_saving(rows: dict[str, dict], ref: str, tolerance: float) -> dict | None:
    """The row (with its τ) saving the most queries at ``vs_<ref>`` ≤ 1 + tolerance; None if none."""
    ok = [(r["queries_saved"], float(tau), r) for tau, r in rows.items() if r[f"vs_{ref}"] <= 1 + tolerance]
    if not ok:
        return None
    saved, tau, row = max(ok, key=lambda t: (t[0], -t[1]))
    return {"tau": tau, **row}


# ----------------------------------------------------------------------------- token groups
def content_tokens(language) -> np.ndarray:
    """(V,) bool: tokens a content slot (:data:`CONTENT_SLOTS`: nouns, adjectives, verbs,
    adverbs) of the synthetic language can emit in any component; the rest (determiners,
    pronouns, copulas, prepositions, conjunctions, punctuation, EOS) are function words."""
    from beyondlm.data.synthetic import SLOTS

    slots = [SLOTS.index(s) for s in CONTENT_SLOTS]
    return (language.emit[:, slots, :] > 0).any(axis=(0, 1))


def frequent_tokens(values: np.ndarray, vocab_size: int, share: float = 0.5) -> np.ndarray:
    """(V,) bool: the most frequent tokens of ``values`` (the datastore's training targets) that
    together cover ``share`` of them: a frequency proxy for function words."""
    counts = np.bincount(np.asarray(values, dtype=np.int64), minlength=vocab_size)
    order = np.argsort(-counts, kind="stable")
    n_top = int(np.searchsorted(np.cumsum(counts[order]), share * counts.sum())) + 1
    mask = np.zeros(vocab_size, dtype=bool)
    mask[order[:n_top]] = True
    return mask


def target_groups(language, values: np.ndarray, vocab_size: int) -> tuple[str, dict[str, np.ndarray]]:
    """(how, {group: (vocab_size,) bool}) for per-group mean λ by target token: content vs
    function words of the synthetic ``language``, or, without one, frequent vs rare tokens of the
    datastore's training targets ``values`` (:func:`frequent_tokens`, a proxy)."""
    if language is not None:
        content = np.zeros(vocab_size, dtype=bool)
        mask = content_tokens(language)[:vocab_size]
        content[: len(mask)] = mask
        return "word_class", {"content": content, "function": ~content}
    frequent = frequent_tokens(values, vocab_size)
    return "train_frequency", {"frequent": frequent, "rare": ~frequent}


# ----------------------------------------------------------------------------- config
@dataclass(frozen=True)
class GateConfig:
    """``knnlm.gate``: learned λ and adaptive retrieval, fitted on valid, evaluated on test,
    at the k chosen on valid."""

    enabled: bool = True
    hidden: int = 16  # tanh units; 0 = linear (logistic) gate
    steps: int = 300  # full-batch Adam steps
    lr: float = 1e-2
    seed: int = 0
    thresholds: list[float] = field(default_factory=lambda: [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3])  # τ on λ
    holdout: float = 0.2  # last share of the valid positions: picks the Adam step (early stopping)
    ppl_tolerance: float = 0.01  # "largest saving within +1% perplexity"

    def __post_init__(self) -> None:
        check_range("knnlm.gate.hidden", self.hidden, 0, 4096)
        check_range("knnlm.gate.steps", self.steps, 0, 10**6)
        check_param("knnlm.gate.lr", 0 < self.lr <= 10, self.lr, "must be in (0, 10]")
        check_range("knnlm.gate.seed", self.seed, 0, 2**32 - 1)
        check_param("knnlm.gate.thresholds", bool(self.thresholds), self.thresholds, "a non-empty list")
        for tau in self.thresholds:
            check_range("knnlm.gate.thresholds", tau, 0.0, 1.0)
        check_range("knnlm.gate.holdout", self.holdout, 0.0, 0.9)
        check_range("knnlm.gate.ppl_tolerance", self.ppl_tolerance, 0.0, 1.0)
