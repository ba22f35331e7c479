"""Build, save and load causal LMs: a tiny GPT-2 from config by default, any HF model by name.

Weights are always saved and loaded as safetensors; ``trust_remote_code`` only when a param asks. A
broken model directory raises :class:`~beyondlm.inputs.InputError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from beyondlm.config import ConfigError, ModelConfig
from beyondlm.inputs import check_model_dir, reading, require, restore_fix
from beyondlm.io import atomic_path


def build_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """A fresh tiny GPT-2 sized by ``cfg``, or ``cfg.name_or_path`` loaded from hub/local dir
    (its vocabulary checked against ``tokenizer``'s first)."""
    if cfg.name_or_path:
        check_vocabulary(tokenizer, cfg.name_or_path, "sft.model.name_or_path", cfg.trust_remote_code)
        model = from_pretrained(AutoModelForCausalLM, cfg.name_or_path, trust_remote_code=cfg.trust_remote_code,
                                fix="set sft.model.name_or_path to a model directory or hub id")
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        return model
    config = tiny_gpt2_config(cfg, tokenizer)
    return GPT2LMHeadModel(config)


def check_vocabulary(tokenizer: PreTrainedTokenizerBase, name_or_path: str, key: str,
                     trust_remote_code: bool = False) -> None:
    """ConfigError unless every token of the pretrained model's own tokenizer has the same id in
    ``tokenizer`` (the prepared data's), which may only add tokens after them (a pad, an EOS).

    A pretrained model trained on prepared ids of another tokenizer (a BPE trained by ``prepare``)
    reads every id as a different token: it runs, and learns nothing it was pretrained for. Checked
    before the weights are loaded; a model without a tokenizer cannot be checked and is refused."""
    from transformers import AutoTokenizer

    fix = (f"prepare with the model's own tokenizer (prepare.tokenizer.name_or_path: {name_or_path!r}) "
           f"and rerun prepare, or set {key}: null to train the tiny GPT-2 from scratch")
    own: dict = {}
    # without tokenizer_config.json transformers builds a GPT-2 tokenizer of one token from config.json
    if not Path(name_or_path).is_dir() or (Path(name_or_path) / "tokenizer_config.json").is_file():
        with reading(name_or_path, "tokenizer", f"set {key} to a model directory or hub id with its tokenizer"):
            own = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code).get_vocab()
    if not own:
        raise ConfigError(f"params.yaml: '{key}'={name_or_path!r} has no tokenizer to check the prepared "
                          f"token ids against; save the model's tokenizer with it, or {fix}")
    data = tokenizer.get_vocab()
    moved = {t: i for t, i in own.items() if data.get(t) != i}
    if moved:
        token, i = next(iter(sorted(moved.items(), key=lambda kv: kv[1])))
        raise ConfigError(
            f"params.yaml: '{key}'={name_or_path!r} was pretrained with another vocabulary than the prepared "
            f"data's tokenizer: {len(moved)} of its {len(own)} tokens have other ids (e.g. {token!r} is {i} in the "
            f"model, {data.get(token, 'absent')} in the data); {fix}")


def tiny_gpt2_config(cfg, tokenizer: PreTrainedTokenizerBase, **overrides) -> GPT2Config:
    """A GPT-2 config sized by ``cfg`` (any config with n_layer, n_head, n_embd, n_positions,
    dropout) over ``tokenizer``'s vocabulary; ``overrides`` win (e.g. a reward head's num_labels)."""
    kwargs = dict(
        vocab_size=len(tokenizer),
        n_positions=cfg.n_positions,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        activation_function="gelu_pytorch_tanh",  # fused; GPT-2's Python gelu_new is ~15% slower on CPU
    )
    return GPT2Config(**{**kwargs, **overrides})


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> None:
    """``save_pretrained`` (safetensors) + tokenizer into ``out_dir``, atomically."""
    with atomic_path(out_dir, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def load_model(path: str | Path, *, kind: str = "causal", trust_remote_code: bool = False) -> PreTrainedModel:
    """A saved model in eval mode, safetensors only: ``kind`` causal (an LM) or reward (a scalar head)."""
    from transformers import AutoModelForSequenceClassification

    auto = {"causal": AutoModelForCausalLM, "reward": AutoModelForSequenceClassification}[kind]
    fix = restore_fix(path)
    require(path, "model directory", fix)  # a local path: never looked up on the hub
    return from_pretrained(auto, path, fix=fix, trust_remote_code=trust_remote_code, dtype=torch.float32).eval()


def from_pretrained(auto, name_or_path: str | Path, *, fix: str, **kwargs) -> PreTrainedModel:
    """``auto.from_pretrained`` (safetensors only); a local directory's weights are checked first, so
    a missing, truncated or corrupt ``model.safetensors`` is one InputError line naming it."""
    if Path(name_or_path).is_dir():
        check_model_dir(name_or_path, fix)
    with reading(name_or_path, "model", fix):
        return auto.from_pretrained(name_or_path, use_safetensors=True, **kwargs)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
