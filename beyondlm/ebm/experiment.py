"""Energy-based decoding experiment: fit μ on held-out data, compare decoders on test prompts.

"Energy-based decoding by evaluation functions" (ICLR 2024): p*(y|x) ∝ p_θ(y|x)·exp(−μᵀf(x,y)),
μ solved so that E_{p*}[f] = F̂, the mean of f over held-out reference continuations.

Estimators (Monte Carlo, each with a standard error):
- F̂_k: mean of f_k over reference (prompt, continuation) pairs; SE std/√n.
- μ: ``solve_dual`` on S proposal samples per prompt drawn from p_θ itself (pure ancestral, T = 1:
  the importance weights exp(−μᵀf) assume it). ``solve_dual`` normalises over all N·S samples at
  once (the joint tilt); SIR and the perplexity normalise per prompt, so we also report the
  per-prompt ("conditional") residual F̂ − mean_x E_{p*(·|x)}[f], which is what SIR matches.
- Ẑ(x) = (1/S) Σ_j exp(−μᵀf(x, y_j)), y_j ~ p_θ(·|x): unbiased for Z(x); log Ẑ(x) has delta-method
  SE sd(u)/(√S·mean(u)) and is biased low by ≈ SE²/2 (Jensen), which flatters p*; reported.
- log p*(y|x) = log p_θ(y|x) − μᵀf(x,y) − log Ẑ(x) on test continuations (EOS included);
  perplexity exp(−Σ log p / Σ tokens).
- Cross-entropy difference H(p_d,p*) − H(p_d,p_θ) = E_{p_d}[log p_θ(y|x) − log p*(y|x)]
  = E[μᵀf + log Ẑ(x)] over test continuations: exact in expectation when the test texts are
  p_d samples (the synthetic language) since log p_d cancels; SE from the test sample, plus the
  Ẑ Monte Carlo SE separately. Theory (METHODS.md) says it is −KL(p*‖p_θ) ≤ 0 at the optimum.
- MAUVE (Pillutla et al. 2021, ``mauve-text``) between reference and decoded continuations, on
  features = the SFT LM's mean final hidden state over the continuation positions (in context of
  the prompt): no download, so a comparison between decoders, not with published MAUVE values.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch
from scipy.special import logsumexp

from beyondlm.config import check_param
from beyondlm.ebm.features import EMBEDDERS, FEATURES, compute_features, continuation_logps
from beyondlm.ebm.sir import sample_with_features, sir_select, sir_weights
from beyondlm.ebm.solver import EBMSolution, log_p_star, solve_dual
from beyondlm.logprobs import pad_batch
from beyondlm.metrics import sample_metrics
from beyondlm.sampling import SamplingConfig, sample

# sr4 is available but not a default: short reviews never repeat a 4-gram, so its target is 0, on
# the edge of what any reweighting of samples can reach (solve_dual rejects it by name).
DEFAULT_FEATURES = ("tr32", "div", "length", "nll", "coherence")


@dataclass(frozen=True)
class EBMConfig:
    """``ebm``: which SFT run to reweight, the evaluation functions, the fitting sample sizes."""

    base: str = "mle-s0"  # models/sft/<base>
    features: list[str] = field(default_factory=lambda: list(DEFAULT_FEATURES))
    embedder: str = "lm"  # coherence embeddings: lm (the SFT LM itself) | minilm
    n_prompts: int = 256  # reference texts from the valid split
    samples_per_prompt: int = 16  # proposal samples from p_θ per reference prompt
    tol: float = 1e-6  # Newton stops at max |residual / std| < tol
    batch_size: int = 1024  # sampling and scoring; larger batches amortise generate() per step
    seed: int = 0

    def __post_init__(self) -> None:
        feats = self.features
        check_param("ebm.features", bool(feats) and all(f in FEATURES for f in feats)
               and len(set(feats)) == len(feats), feats,
               f"a non-empty list without repeats of {', '.join(FEATURES)}")
        check_param("ebm.embedder", self.embedder in EMBEDDERS, self.embedder, f"one of {EMBEDDERS}")
        check_param("ebm.n_prompts", self.n_prompts >= 2, self.n_prompts, "need at least 2")
        check_param("ebm.samples_per_prompt", self.samples_per_prompt >= 1, self.samples_per_prompt,
               "need at least 1")
        check_param("ebm.tol", self.tol > 0, self.tol, "must be positive")
        check_param("ebm.batch_size", self.batch_size >= 1, self.batch_size, "must be positive")


@dataclass(frozen=True)
class EBMEvalConfig:
    """``ebm_eval``: decoders compared on test prompts and the p* perplexity's sample sizes."""

    Ms: list[int] = field(default_factory=lambda: [2, 4, 8])  # SIR candidates per prompt
    top_k: int = 20
    top_p: float = 0.9
    n_prompts: int = 256  # test texts (prompt + reference continuation)
    ppl_samples: int = 32  # proposal samples per test prompt for Ẑ(x)
    batch_size: int = 1024  # sampling and scoring; larger batches amortise generate() per step
    seed: int = 0

    def __post_init__(self) -> None:
        Ms = self.Ms
        check_param("ebm_eval.Ms", bool(Ms) and all(isinstance(m, int) and m >= 1 for m in Ms)
               and len(set(Ms)) == len(Ms), Ms, "a non-empty list of distinct integers >= 1")
        check_param("ebm_eval.top_k", self.top_k >= 1, self.top_k, "must be >= 1")
        check_param("ebm_eval.top_p", 0 < self.top_p <= 1, self.top_p, "must lie in (0, 1]")
        check_param("ebm_eval.n_prompts", self.n_prompts >= 2, self.n_prompts, "need at least 2")
        check_param("ebm_eval.ppl_samples", self.ppl_samples >= 2, self.ppl_samples, "need >= 2")
        check_param("ebm_eval.batch_size", self.batch_size >= 1, self.batch_size, "must be positive")


# ----------------------------------------------------------------------------- data
def reference_pairs(split_ids: Sequence[Sequence[int]], prompt_len: int, n: int):
    """(prompts, continuations) of the first ``n`` texts ``[BOS] x_1 … EOS`` long enough.

    prompt = [BOS] + the first ``prompt_len`` tokens, continuation = the rest (EOS included).
    Same rule as ``make_prompts``: a text needs at least one token after its prompt, so the
    prompts are those of ``prompts_{train,test}.parquet``.
    """
    prompts, conts = [], []
    for ids in split_ids:
        if len(prompts) >= n:
            break
        ids = [int(t) for t in ids]
        if len(ids) > prompt_len + 1:
            prompts.append(ids[: prompt_len + 1])
            conts.append(ids[prompt_len + 1 :])
    return prompts, conts


def _features(names, prompts, conts, model, tokenizer, *, embedder, batch_size) -> np.ndarray:
    return compute_features(names, prompts, conts, model=model, tokenizer=tokenizer,
                            eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                            batch_size=batch_size, embedder=embedder)  # (N, K)


def _check_proposal(cfg: SamplingConfig) -> None:
    if cfg.temperature != 1.0 or cfg.top_k != 0 or cfg.top_p != 1.0:
        raise ValueError(f"the proposal must be p_θ itself (T = 1, no top-k/top-p), got {cfg}: "
                         "the importance weights exp(−μᵀf) assume draws from p_θ")


def draw_pool(model, tokenizer, prompts, names, S: int, cfg: SamplingConfig, *, seed: int,
              embedder: str = "lm"):
    """S samples from p_θ per prompt and their features: (conts (N·S,), F (N, S, K)).

    Candidates of prompt i are rows i·S .. i·S+S−1 (one batched sampling call that also
    yields the model-based features).
    """
    _check_proposal(cfg)
    repeated = [list(p) for p in prompts for _ in range(S)]  # (N·S,) prompt-major
    conts, F = sample_with_features(model, repeated, names, cfg, eos_id=tokenizer.eos_token_id,
                                    pad_id=tokenizer.pad_token_id, seed=seed, tokenizer=tokenizer,
                                    embedder=embedder, batch_size=cfg.batch_size)
    return conts, F.reshape(len(prompts), S, len(names))


def _mean_se(F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return F.mean(0), F.std(0, ddof=1) / np.sqrt(len(F))


def conditional_moments(F: np.ndarray, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """mean_x E_{p*(·|x)}[f] with weights normalised per prompt, and the per-prompt ESS.

    F (N, S, K) → ((K,), (N,)); what SIR with S candidates targets as S → ∞.
    """
    w = sir_weights(F, mu)  # (N, S)
    return np.einsum("ns,nsk->k", w, F) / len(F), 1.0 / np.sum(w**2, axis=1)


def fit_ebm(model, tokenizer, ref_prompts, ref_conts, names, *, samples_per_prompt: int,
            sampling_cfg: SamplingConfig, seed: int, embedder: str = "lm", tol: float = 1e-6):
    """Targets F̂ = mean f over the reference pairs; μ from p_θ samples for the same prompts.

    Returns (EBMSolution, diagnostics). ValueError when a target cannot be matched (outside the
    sampled range or hull, constant feature): drop the feature or draw more samples.
    """
    names = list(names)
    F_ref = _features(names, ref_prompts, ref_conts, model, tokenizer, embedder=embedder,
                      batch_size=sampling_cfg.batch_size)
    targets, targets_se = _mean_se(F_ref)
    conts, F = draw_pool(model, tokenizer, ref_prompts, names, samples_per_prompt, sampling_cfg,
                         seed=seed, embedder=embedder)
    sol = solve_dual(F.reshape(-1, len(names)), targets, names, tol=tol)
    cond_mean, ess = conditional_moments(F, sol.mu)
    eos = tokenizer.eos_token_id
    per = lambda a: _per(names, a)  # noqa: E731
    diagnostics = {
        "n_reference": len(ref_prompts), "n_samples": len(conts),
        "samples_per_prompt": samples_per_prompt,
        "unfinished_frac": float(np.mean([not c or c[-1] != eos for c in conts])),
        "targets_se": per(targets_se), "proposal_mean": per(F.reshape(-1, len(names)).mean(0)),
        "residual_after_conditional": per(targets - cond_mean),
        # (F̂ − E_{p_θ}[f]) / SE(F̂): how far p_θ misses each target in units of the targets'
        # own noise (|z| < 2: indistinguishable from the reference with this many texts)
        "residual_before_z": per((targets - F.reshape(-1, len(names)).mean(0))
                                 / np.where(targets_se > 0, targets_se, np.nan)),
        "ess_per_prompt_mean": float(ess.mean()),
    }
    return sol, diagnostics


# ----------------------------------------------------------------------------- p* perplexity
def log_z_per_prompt(F: np.ndarray, mu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log Ẑ(x) = log (1/S) Σ_j exp(−μᵀf_j) per prompt and its delta-method SE.

    F (N, S, K) features of S samples from p_θ(·|x) → ((N,), (N,)).
    """
    a = -np.asarray(F, dtype=np.float64) @ mu  # (N, S)
    log_z = logsumexp(a, axis=1) - np.log(a.shape[1])
    u = np.exp(a - log_z[:, None])  # u_j / Ẑ: mean 1 per row
    return log_z, u.std(axis=1, ddof=1) / np.sqrt(a.shape[1])


def p_star_logps(logp_model, F, sol: EBMSolution, log_z_x) -> np.ndarray:
    """log p*(y|x) = log p_θ(y|x) − μᵀf(x,y) − log Ẑ(x), (N,): ``log_p_star`` with the per-prompt
    normaliser Ẑ(x) in place of the solver's pooled one."""
    return log_p_star(logp_model, F, replace(sol, log_z=0.0)) - np.asarray(log_z_x)


def perplexity_report(logp_model, logp_star, n_tokens, log_z_se) -> dict:
    """Perplexities of p_θ and p* on the same texts; cross-entropy difference per text and token.

    ``ebm_se``: SE of ppl/ebm from the Ẑ(x) Monte Carlo alone (test texts fixed, delta method);
    ``xent/diff_se``: SE of the paired difference over the test texts (Ẑ fixed).
    """
    lp, ls = np.asarray(logp_model, np.float64), np.asarray(logp_star, np.float64)
    n = np.asarray(n_tokens, np.float64)
    T, N = n.sum(), len(n)
    z_var = np.sum(np.asarray(log_z_se) ** 2)  # Σ_x Var(log Ẑ(x)), prompts independent
    ppl_ebm = float(np.exp(-ls.sum() / T))
    d = lp - ls  # (N,) log p_θ − log p* = −(gain of p*) per text, nats
    r = d.sum() / T  # ratio estimator per token; its SE linearised
    return {
        "ppl": {"base": float(np.exp(-lp.sum() / T)), "ebm": ppl_ebm,
                "ebm_se": ppl_ebm * float(np.sqrt(z_var)) / T,
                "log_z_bias": float(z_var / (2 * N)),  # ≈ E[log Z − log Ẑ] per text
                "n_texts": N, "n_tokens": int(T)},
        "xent": {"diff": float(d.mean()), "diff_se": float(d.std(ddof=1) / np.sqrt(N)),
                 "diff_se_z": float(np.sqrt(z_var) / N),
                 "diff_per_token": float(r),
                 "diff_per_token_se": float((d - r * n).std(ddof=1) / (np.sqrt(N) * n.mean()))},
    }


# ----------------------------------------------------------------------------- MAUVE
@torch.no_grad()
def continuation_embeddings(model, prompts, conts, *, pad_id: int, batch_size: int = 256):
    """Mean final hidden state over the continuation's positions, prompt as context: (N, H).

    An empty continuation falls back to the last prompt position.
    """
    device = next(model.parameters()).device
    out = []
    for lo in range(0, len(prompts), batch_size):
        ps, cs = prompts[lo : lo + batch_size], conts[lo : lo + batch_size]
        ids, mask = pad_batch([list(p) + list(c) for p, c in zip(ps, cs)], pad_id, device)
        hidden = model(input_ids=ids, attention_mask=mask,
                       output_hidden_states=True).hidden_states[-1]  # (B, T, H)
        pos = torch.arange(ids.shape[1], device=device)[None]  # (1, T)
        start = torch.tensor([len(p) - (not c) for p, c in zip(ps, cs)], device=device)[:, None]
        keep = (pos >= start) & mask.bool()  # (B, T) continuation positions
        m = keep.unsqueeze(-1).to(hidden.dtype)
        out.append(((hidden * m).sum(1) / m.sum(1)).double().cpu())  # (B, H)
    return torch.cat(out).numpy()


def mauve_score(p_emb: np.ndarray, q_emb: np.ndarray, *, seed: int) -> float:
    """MAUVE of two embedded corpora, all offline (features given), n/10 histogram buckets."""
    import mauve

    n = min(len(p_emb), len(q_emb))
    out = mauve.compute_mauve(p_features=p_emb, q_features=q_emb, device_id=-1, verbose=False,
                              num_buckets=max(2, n // 10), seed=seed)
    return float(out.mauve)


# ----------------------------------------------------------------------------- decoders
def _per(names, values) -> dict:
    return {n: float(v) for n, v in zip(names, values)}


def _summary(names, prompts, conts, F, ref, *, model, tokenizer, seed, language) -> dict:
    """Features, their gaps to the reference means (with SE), MAUVE, surface metrics."""
    eos = tokenizer.eos_token_id
    F_ref, ref_emb = ref
    n, n_ref = len(F), len(F_ref)
    gap_se = np.sqrt(F.var(0, ddof=1) / n + F_ref.var(0, ddof=1) / n_ref)
    emb = continuation_embeddings(model, prompts, conts, pad_id=tokenizer.pad_token_id)
    out = {
        "features": _per(names, F.mean(0)), "gap": _per(names, F.mean(0) - F_ref.mean(0)),
        "gap_se": _per(names, gap_se), "mauve": mauve_score(ref_emb, emb, seed=seed),
        "metrics": sample_metrics([[t for t in c if t != eos] for c in conts]),
        "unfinished_frac": float(np.mean([not c or c[-1] != eos for c in conts])),
    }
    if language is not None:  # full texts without BOS; p_d(x) = 0: ungrammatical or unfinished
        logp_d = language.log_prob([list(p[1:]) + list(c) for p, c in zip(prompts, conts)])
        out["impossible_frac"] = float(np.mean(~np.isfinite(logp_d)))
    return out


def _sir_outputs(pool, Fp, mu, Ms, seed) -> dict:
    """SIR with the first M pool candidates per prompt, M ∈ Ms: name → (conts, F, diagnostics)."""
    N, S, _ = Fp.shape
    rng = np.random.default_rng(seed)
    out = {}
    for M in sorted(Ms):
        w = sir_weights(Fp[:, :M], mu)  # (N, M)
        idx = sir_select(Fp[:, :M], mu, rng)  # (N,)
        ess = 1.0 / np.sum(w**2, axis=1)
        diag = {"M": M, "ess_mean": float(ess.mean()), "ess_min": float(ess.min()),
                "max_weight_mean": float(w.max(1).mean())}
        out[f"sir_m{M}"] = ([pool[i * S + j] for i, j in enumerate(idx)],
                            Fp[np.arange(N), idx], diag)
    return out


def evaluate_decoders(model, tokenizer, prompts, ref_conts, sol: EBMSolution, cfg: EBMEvalConfig,
                      *, max_new_tokens: int, embedder: str = "lm", language=None) -> dict:
    """Plain sampling, top-k, top-p and SIR at each M on the test prompts, plus p* perplexity.

    One pool of S = max(max Ms, ppl_samples) samples from p_θ per prompt serves plain sampling
    (candidate 0; candidate 1 as ``sample_b``, a chance-level reference), SIR at M (candidates
    0..M−1: common random numbers across M) and Ẑ(x) (candidates 0..ppl_samples−1).
    ``language``: the synthetic p_d, for impossible_frac.
    """
    names, mu = list(sol.names), sol.mu
    feats = lambda p, c: _features(names, p, c, model, tokenizer, embedder=embedder,  # noqa: E731
                                   batch_size=cfg.batch_size)
    pure = SamplingConfig(max_new_tokens=max_new_tokens, batch_size=cfg.batch_size)
    S = max(max(cfg.Ms), cfg.ppl_samples)
    pool, Fp = draw_pool(model, tokenizer, prompts, names, S, pure, seed=cfg.seed,
                         embedder=embedder)  # Fp (N, S, K)
    F_ref = feats(prompts, ref_conts)
    ref = (F_ref, continuation_embeddings(model, prompts, ref_conts,
                                          pad_id=tokenizer.pad_token_id))
    # sample_b: a second, independent draw from p_θ (candidate 1): its distance from "sample"
    # shows how much MAUVE and the gaps move by chance alone
    outputs = {name: ([pool[i * S + j] for i in range(len(prompts))], Fp[:, j], None)
               for j, name in enumerate(("sample", "sample_b"))}
    for offset, (name, knob) in enumerate((("top_k", {"top_k": cfg.top_k}),
                                           ("top_p", {"top_p": cfg.top_p})), start=1):
        conts = sample(model, prompts, replace(pure, **knob), eos_id=tokenizer.eos_token_id,
                       pad_id=tokenizer.pad_token_id, seed=cfg.seed + offset)
        outputs[name] = (conts, feats(prompts, conts), None)
    outputs.update(_sir_outputs(pool, Fp, mu, cfg.Ms, cfg.seed))
    decoders = {}
    for name, (conts, F, diag) in outputs.items():
        decoders[name] = _summary(names, prompts, conts, F, ref, model=model,
                                  tokenizer=tokenizer, seed=cfg.seed, language=language)
        if diag is not None:
            decoders[name]["sir"] = diag
    logp = continuation_logps(model, prompts, ref_conts, pad_id=tokenizer.pad_token_id,
                              batch_size=cfg.batch_size)
    log_z, log_z_se = log_z_per_prompt(Fp[:, : cfg.ppl_samples], mu)
    lps = p_star_logps(logp, F_ref, sol, log_z)
    cond_mean, _ = conditional_moments(Fp, mu)
    return {
        "names": names, "n_prompts": len(prompts), "pool_per_prompt": S,
        "reference": {"features": _per(names, F_ref.mean(0)),
                      "metrics": sample_metrics([c[:-1] if c and c[-1] == tokenizer.eos_token_id
                                                 else c for c in ref_conts])},
        "decoders": decoders,
        # M → ∞ limit of SIR, estimated on the pool: the gap p* itself leaves on test prompts
        "pstar": {"gap": _per(names, cond_mean - F_ref.mean(0))},
        **perplexity_report(logp, lps, [len(c) for c in ref_conts], log_z_se),
    }


def quality_vs_m(result: dict, Ms: Sequence[int]) -> list[dict]:
    """Rows M, mauve, gap_<feature> for M = 1 (plain sampling) and each SIR M."""
    rows = []
    for M in sorted({1, *Ms}):
        d = result["decoders"]["sample" if M == 1 else f"sir_m{M}"]
        rows.append({"M": M, "mauve": d["mauve"],
                     **{f"gap_{n}": d["gap"][n] for n in result["names"]}})
    return rows
