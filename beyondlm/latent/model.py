"""The latent-plan LM: posterior encoder → discrete codes → up-sampled plan added to a causal LM.

Latent plans with discrete codes (EMNLP'21; METHODS.md "Latent plan with discrete codes"):
- posterior q(z|x): token + position embeddings, ``encoder_layers`` bidirectional transformer
  layers, then ``n_down`` × [Conv1d(k=4, s=2, p=1) + GELU], a linear map to ``code_dim`` and a
  discretizer (``quantizers.DISCRETIZERS``);
- decoder p(x|z): ``n_down`` × ConvTranspose1d(k=4, s=2, p=1) back to token resolution, plus a
  learned marker of the positions left in the plan (ours: variable-length texts must end inside
  their plan), added to the input token embeddings of a tiny GPT-2 (``inputs_embeds``);
- prior p(z): a tiny GPT-2 over the K codes plus one BOS/EOS id (= K), trained by MLE on the
  posterior's argmax codes (``build_prior``).

Lengths. A text ``[BOS] x_1 … x_n`` (x_n = EOS) has n targets; decoder input position t (token
x_t, x_0 = BOS) predicts x_{t+1} and receives plan vector t. The targets are zero-padded to a
multiple of f = 2^n_down; each stride-2 layer exactly halves (down) or doubles (up) an even
length, so the text gets L = ceil(n / f) code slots and its plan covers L·f ≥ n positions.
Activations past a text's own length are zeroed at every resolution, so a text's codes and
logits do not depend on what it is batched with. Plans are variable-length (the prior ends them
with EOS); the longest has ceil(max_len / f) codes.
"""

from __future__ import annotations

import json
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoTokenizer, GPT2LMHeadModel

from beyondlm.config import ModelConfig, TrainConfig, check_param
from beyondlm.io import atomic_path
from beyondlm.latent.quantizers import DISCRETIZERS, GumbelConfig, NearestConfig, Quantized
from beyondlm.models import tiny_gpt2_config


@dataclass(frozen=True)
class PlanModelConfig:
    """``vq.model``: codes, posterior encoder and decoder (a tiny GPT-2 like ``sft.model``)."""

    discretizer: str = "gumbel"  # gumbel | nearest (quantizers.DISCRETIZERS)
    n_codes: int = 64  # K
    n_down: int = 2  # stride-2 conv layers: one code per 2^n_down tokens
    code_dim: int = 64
    encoder_layers: int = 1  # bidirectional transformer layers before the CNN (0 = CNN only)
    n_layer: int = 2  # decoder GPT-2
    n_head: int = 2
    n_embd: int = 64
    dropout: float = 0.0
    gumbel: GumbelConfig = field(default_factory=GumbelConfig)
    nearest: NearestConfig = field(default_factory=NearestConfig)

    def __post_init__(self) -> None:
        check_param("vq.model.discretizer", self.discretizer in DISCRETIZERS, self.discretizer,
               f"one of {', '.join(DISCRETIZERS)}")
        check_param("vq.model.n_codes", 2 <= self.n_codes <= 2**20, self.n_codes, "between 2 and 2**20")
        check_param("vq.model.n_down", 1 <= self.n_down <= 8, self.n_down, "between 1 and 8")
        check_param("vq.model.code_dim", self.code_dim >= 1, self.code_dim, "must be >= 1")
        check_param("vq.model.encoder_layers", self.encoder_layers >= 0, self.encoder_layers, "must be >= 0")
        check_param("vq.model.n_embd", self.n_embd % self.n_head == 0, self.n_embd,
               f"must be a multiple of vq.model.n_head={self.n_head}")
        check_param("vq.model.dropout", 0.0 <= self.dropout < 1.0, self.dropout, "must lie in [0, 1)")
        g, q = self.gumbel, self.nearest
        check_param("vq.model.gumbel.tau_min", 0 < g.tau_min <= g.tau0, g.tau_min, "must lie in (0, tau0]")
        check_param("vq.model.gumbel.rate", g.rate >= 0, g.rate, "must be >= 0")
        check_param("vq.model.gumbel.entropy_weight", g.entropy_weight >= 0, g.entropy_weight, "must be >= 0")
        check_param("vq.model.nearest.beta", q.beta >= 0, q.beta, "must be >= 0")
        check_param("vq.model.nearest.decay", 0 <= q.decay < 1, q.decay, "must lie in [0, 1)")
        check_param("vq.model.nearest.eps", q.eps > 0, q.eps, "must be > 0")

    @property
    def factor(self) -> int:
        return 2**self.n_down


# ----------------------------------------------------------------------------- lengths
def plan_lengths(n_tokens: Tensor, n_down: int) -> Tensor:
    """L = ceil(n / 2^n_down) code slots for n target tokens (EOS included): (B,) → (B,)."""
    f = 2**n_down
    return (n_tokens + f - 1) // f


def length_mask(lengths: Tensor, width: int) -> Tensor:
    """(B,) lengths → (B, width) bool, True on the first ``lengths[b]`` positions."""
    return torch.arange(width, device=lengths.device)[None] < lengths[:, None]


def max_plan_length(max_len: int, n_down: int) -> int:
    """Code slots of the longest text (``max_len`` targets incl. EOS)."""
    return int(plan_lengths(torch.tensor(max_len), n_down))


# ----------------------------------------------------------------------------- modules
class PlanEncoder(nn.Module):
    """Posterior encoder: targets (B, W) + lengths (B,) → z_e (B, ceil(W / f), code_dim)."""

    def __init__(self, vocab_size: int, width: int, cfg: PlanModelConfig):
        super().__init__()
        d = cfg.n_embd
        self.n_down = cfg.n_down
        self.tok, self.pos = nn.Embedding(vocab_size, d), nn.Embedding(width, d)
        layer = nn.TransformerEncoderLayer(d, cfg.n_head, 4 * d, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.body = (nn.TransformerEncoder(layer, cfg.encoder_layers, enable_nested_tensor=False)
                     if cfg.encoder_layers else None)
        self.down = nn.ModuleList(nn.Conv1d(d, d, 4, stride=2, padding=1) for _ in range(cfg.n_down))
        self.out = nn.Linear(d, cfg.code_dim)

    def forward(self, targets: Tensor, lengths: Tensor) -> Tensor:
        f = 2**self.n_down
        width = -(-targets.shape[1] // f) * f  # pad to a multiple of 2^n_down
        targets = F.pad(targets, (0, width - targets.shape[1]))  # (B, W)
        mask = length_mask(lengths, width)
        h = self.tok(targets) + self.pos(torch.arange(width, device=targets.device))  # (B, W, d)
        if self.body is not None:
            h = self.body(h, src_key_padding_mask=~mask)
        h = (h * mask.unsqueeze(-1)).transpose(1, 2)  # (B, d, W)
        for j, conv in enumerate(self.down, start=1):
            h = F.gelu(conv(h))  # (B, d, W / 2^j)
            h = h * length_mask(-(-lengths // 2**j), h.shape[-1]).unsqueeze(1)
        return self.out(h.transpose(1, 2))  # (B, L, code_dim)


class PlanUpsampler(nn.Module):
    """Code vectors (B, L, code_dim) + plan lengths (B,) → plan (B, L·2^n_down, n_embd)."""

    def __init__(self, cfg: PlanModelConfig):
        super().__init__()
        dims = [cfg.code_dim] + [cfg.n_embd] * cfg.n_down
        self.up = nn.ModuleList(nn.ConvTranspose1d(a, b, 4, stride=2, padding=1)
                                for a, b in zip(dims, dims[1:]))
        # Zero-init the last layer: the decoder starts as exactly the plain LM and the plan grows
        # from 0. A default-initialised plan (std ~0.3) swamps GPT-2's token embeddings (std
        # 0.02) and left the decoder worse than a plain LM after 150 steps.
        nn.init.zeros_(self.up[-1].weight), nn.init.zeros_(self.up[-1].bias)

    def forward(self, vectors: Tensor, lengths: Tensor) -> Tensor:
        h = vectors.transpose(1, 2)  # (B, code_dim, L)
        for j, conv in enumerate(self.up, start=1):
            h = conv(h)  # (B, n_embd, L·2^j)
            if j < len(self.up):
                h = F.gelu(h)
            h = h * length_mask(lengths * 2**j, h.shape[-1]).unsqueeze(1)
        return h.transpose(1, 2)  # (B, L·2^n, n_embd)


def decoder_logits(lm: GPT2LMHeadModel, input_ids: Tensor, attention_mask: Tensor,
                   plan: Tensor) -> Tensor:
    """The causal LM with ``plan`` (B, T, H) added to its input token embeddings → (B, T, V).

    A zero plan gives exactly the plain LM's logits (GPT-2 adds its position embeddings to
    ``inputs_embeds`` itself).
    """
    embeds = lm.get_input_embeddings()(input_ids) + plan  # (B, T, H)
    return lm(inputs_embeds=embeds, attention_mask=attention_mask).logits


@dataclass
class PlanOutput:
    logits: Tensor  # (B, T, V): position t predicts input_ids[:, t + 1]
    quantized: Quantized
    code_mask: Tensor  # (B, L) bool


class LatentPlanLM(nn.Module):
    """Posterior encoder + discretizer + up-sampler + GPT-2 decoder, trained jointly."""

    def __init__(self, cfg: PlanModelConfig, decoder: GPT2LMHeadModel, max_len: int):
        super().__init__()
        self.cfg, self.max_len = cfg, max_len
        width = max_plan_length(max_len, cfg.n_down) * cfg.factor
        vocab = decoder.get_input_embeddings().num_embeddings
        self.encoder = PlanEncoder(vocab, width, cfg)
        quantizer_cfg = cfg.gumbel if cfg.discretizer == "gumbel" else cfg.nearest
        self.quantizer = DISCRETIZERS[cfg.discretizer](cfg.n_codes, cfg.code_dim, quantizer_cfg)
        self.upsampler = PlanUpsampler(cfg)
        # Where the plan ends: embedding of min(positions left in the plan after t, f), f = "not
        # in the last window". Texts here vary in length and must end inside their plan's last
        # window (the paper plans fixed 512-token chunks and never meets this); without it a
        # decoder fed a test text's own plan ran past it without EOS in 31% of samples.
        # Zero-init, like the up-sampler's last layer: the decoder starts as the plain LM.
        self.plan_end = nn.Embedding(cfg.factor + 1, cfg.n_embd)
        nn.init.zeros_(self.plan_end.weight)
        self.decoder = decoder

    def set_step(self, step: int) -> None:
        """Called after each optimizer step (``train_loop(on_step=...)``): drives τ."""
        self.quantizer.step.fill_(step)

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Quantized, Tensor]:
        """Codes of ``[BOS] x`` rows (B, T): (Quantized over (B, L), code mask (B, L))."""
        n = attention_mask[:, 1:].sum(1)  # (B,) targets per text
        z_e = self.encoder(input_ids[:, 1:], n)  # (B, L, code_dim)
        code_mask = length_mask(plan_lengths(n, self.cfg.n_down), z_e.shape[1])
        return self.quantizer(z_e, code_mask), code_mask

    def plan(self, vectors: Tensor, code_mask: Tensor) -> Tensor:
        """(B, L, code_dim) vectors → (B, L·2^n_down, n_embd) plan: up-sampled codes + end marker."""
        lengths, f = code_mask.sum(1), self.cfg.factor  # (B,) codes per plan
        plan = self.upsampler(vectors, lengths)  # (B, W, n_embd)
        positions = torch.arange(plan.shape[1], device=plan.device)
        left = lengths[:, None] * f - 1 - positions[None]  # (B, W) plan positions after t
        marker = self.plan_end(left.clamp(0, f)) * (left >= 0).unsqueeze(-1)  # (B, W, n_embd)
        return plan + marker

    def plan_from_codes(self, codes: Tensor, code_mask: Tensor) -> Tensor:
        vectors = self.quantizer.lookup(codes) * code_mask.unsqueeze(-1)  # (B, L, code_dim)
        return self.plan(vectors, code_mask)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> PlanOutput:
        quantized, code_mask = self.encode(input_ids, attention_mask)
        width = input_ids.shape[1] - 1  # decoder input: all but the last position
        plan = self.plan(quantized.vectors, code_mask)[:, :width]  # (B, T-1, n_embd)
        logits = decoder_logits(self.decoder, input_ids[:, :-1], attention_mask[:, :-1], plan)
        return PlanOutput(logits, quantized, code_mask)


def plan_loss(token_logps: Tensor, mask: Tensor, aux_loss: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_t −log p(x_t | x_<t, z) + n·aux, n) over the n target tokens of a batch.

    token_logps, mask (B, T); aux_loss: the quantizer's weighted auxiliary loss (−α·H(q̄) or
    β·commitment), counted once per target token so the loop's per-token mean is
    NLL/token + aux. The NLL part is exact whatever the accumulation split; the aux terms are
    means over each micro-batch's slots (H(q̄) of a micro-batch is not additive), so they depend
    on the micro-batch size, as in the authors' batch-level bonus.
    """
    n = mask.sum()
    return -(token_logps * mask).sum() + n * aux_loss, n


# ----------------------------------------------------------------------------- prior
@dataclass(frozen=True)
class PriorConfig:
    """``vq.prior``: the autoregressive prior over code sequences (its n_positions follows the
    codes) and its training loop."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(n_layer=2, n_head=2, n_embd=64))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-3, batch_size=64, max_steps=100,
                                                                    warmup_steps=10, ckpt_every=0))

    def __post_init__(self) -> None:
        check_param("vq.prior.model.name_or_path", self.model.name_or_path is None, self.model.name_or_path,
                    "must be null: the prior's vocabulary is the codebook")


def build_decoder(cfg: PlanModelConfig, tokenizer, max_len: int) -> GPT2LMHeadModel:
    width = max_plan_length(max_len, cfg.n_down) * cfg.factor
    size = ModelConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                       n_positions=width, dropout=cfg.dropout)
    return GPT2LMHeadModel(tiny_gpt2_config(size, tokenizer))


def build_prior(cfg: PriorConfig, n_codes: int, max_codes: int, tokenizer) -> GPT2LMHeadModel:
    """Tiny GPT-2 over ids 0..K−1 (codes) and K (BOS = EOS = pad): ``[K, z_1 … z_L, K]``."""
    size = dataclasses.replace(cfg.model, n_positions=max_codes + 2)
    config = tiny_gpt2_config(size, tokenizer, vocab_size=n_codes + 1, bos_token_id=n_codes,
                              eos_token_id=n_codes, pad_token_id=n_codes)
    return GPT2LMHeadModel(config)


# ----------------------------------------------------------------------------- save / load
WEIGHTS = "plan_model.safetensors"


def save_latent(model: LatentPlanLM, prior: GPT2LMHeadModel, tokenizer, out_dir: str | Path) -> None:
    """``out_dir``: plan_model.safetensors, prior/ (HF, safetensors), tokenizer/, config.json."""
    from safetensors.torch import save_model

    with atomic_path(out_dir, is_dir=True) as tmp:
        save_model(model, str(tmp / WEIGHTS))  # drops the tied lm_head copy
        prior.save_pretrained(tmp / "prior", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "tokenizer")
        config = {"model": asdict(model.cfg), "max_len": model.max_len}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_latent(path: str | Path) -> tuple[LatentPlanLM, GPT2LMHeadModel, object]:
    """(plan model, prior, tokenizer) from a directory written by ``save_latent``; eval mode."""
    from safetensors.torch import load_model

    from beyondlm.config import load_section

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    cfg = load_section(PlanModelConfig, config["model"], "vq.model")
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    model = LatentPlanLM(cfg, build_decoder(cfg, tokenizer, config["max_len"]), config["max_len"])
    load_model(model, str(path / WEIGHTS))
    prior = GPT2LMHeadModel.from_pretrained(path / "prior", use_safetensors=True)
    return model.eval(), prior.eval(), tokenizer
