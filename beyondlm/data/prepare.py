"""Turn a source (synthetic language, local files, hub data set) into tokenized Parquet splits.

Outputs (one directory, written atomically by :func:`write_prepared`):
``{train,valid,test}.parquet`` with ``text``, ``input_ids`` (``[BOS] … [EOS]``), ``n_tokens``;
synthetic rows also ``logp_data`` (exact log p_d of the token sequence after BOS), ``sentiment``,
``topic`` (the latent component that generated them) and ``oracle_reward`` (r*, see
``SyntheticLanguage.oracle_reward``). ``prompts_{train,test}.parquet`` hold ``prompt_id``,
``prompt_text``, ``prompt_ids`` (``[BOS]`` + the first ``prompt_len`` tokens) of valid/test texts.
``tokenizer/`` is a HF tokenizer dir; ``language.json`` the synthetic generator's parameters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from beyondlm.config import ConfigError
from beyondlm.data.config import PrepareConfig
from beyondlm.data import sources, tokenization
from beyondlm.data.synthetic import SyntheticLanguage
from beyondlm import inputs
from beyondlm.inputs import load_parquet_split, restore_fix
from beyondlm.io import atomic_path, write_json

SPLITS = ("train", "valid", "test")
TRUNCATION_WARN = 0.05  # above this share of train texts cut at max_len, prepare warns
log = logging.getLogger(__name__)


@dataclass
class Prepared:
    splits: dict[str, datasets.Dataset]
    tokenizer: PreTrainedTokenizerBase
    language: SyntheticLanguage | None = None
    prompts: dict[str, datasets.Dataset] = field(default_factory=dict)
    truncated: dict[str, float] = field(default_factory=dict)  # text sources: share of texts cut at max_len


def prepare(cfg: PrepareConfig) -> Prepared:
    prepared = _prepare_synthetic(cfg) if cfg.source == "synthetic" else _prepare_text(cfg)
    for name, ds in prepared.splits.items():
        if len(ds) == 0:
            raise ConfigError(f"split '{name}' is empty: raise prepare.n_{name} or add data")
    prepared.prompts = {
        "train": make_prompts(prepared.splits["valid"], cfg.prompt_len, cfg.n_prompts, prepared.tokenizer),
        "test": make_prompts(prepared.splits["test"], cfg.prompt_len, cfg.n_prompts, prepared.tokenizer),
    }
    return prepared


def _prepare_synthetic(cfg: PrepareConfig) -> Prepared:
    language = SyntheticLanguage.build(cfg.synthetic)
    tok = tokenization.word_tokenizer(language.vocab)
    sizes = {"train": cfg.n_train, "valid": cfg.n_valid, "test": cfg.n_test}
    splits = {}
    for i, name in enumerate(SPLITS):
        rng = np.random.default_rng([cfg.seed, i])  # independent stream per split
        seqs, comps = language.sample_with_components(sizes[name], rng)
        splits[name] = datasets.Dataset.from_dict(
            {
                "text": [language.decode(s) for s in seqs],
                "input_ids": [[tok.bos_token_id, *s] for s in seqs],
                "n_tokens": [len(s) for s in seqs],
                "logp_data": language.log_prob(seqs).tolist(),
                "sentiment": (comps // cfg.synthetic.n_topics).tolist(),
                "topic": (comps % cfg.synthetic.n_topics).tolist(),
                "oracle_reward": language.oracle_reward(seqs).tolist(),
            }
        )
    return Prepared(splits=splits, tokenizer=tok, language=language)


def _prepare_text(cfg: PrepareConfig) -> Prepared:
    if cfg.source == "local":
        texts = sources.load_local(cfg.local, cfg.seed)
    else:
        texts = sources.load_hub(cfg.hub, cfg.seed)
    caps = {"train": cfg.n_train, "valid": cfg.n_valid, "test": cfg.n_test}
    texts = {k: v[: caps[k]] if caps[k] else v for k, v in texts.items()}
    tok = build_tokenizer(cfg, texts["train"])
    splits, truncated = {}, {}
    for name in SPLITS:
        ids = tokenization.encode_texts(tok, texts[name], cfg.max_len)
        splits[name] = datasets.Dataset.from_dict(
            {"text": texts[name], "input_ids": ids, "n_tokens": [len(x) - 1 for x in ids]}
        )
        truncated[name] = float(np.mean([x[-1] != tok.eos_token_id for x in ids]))  # no EOS: cut at max_len
    if truncated["train"] > TRUNCATION_WARN:
        log.warning("prepare: %.0f%% of the train texts are cut at prepare.max_len=%d tokens (EOS included); "
                    "models learn their openings only: raise prepare.max_len to keep whole texts",
                    100 * truncated["train"], cfg.max_len)
    return Prepared(splits=splits, tokenizer=tok, truncated=truncated)


def build_tokenizer(cfg: PrepareConfig, train_texts: list[str]) -> PreTrainedTokenizerBase:
    kind = cfg.tokenizer.kind
    if kind == "auto":
        kind = "pretrained" if cfg.tokenizer.name_or_path else "bpe"
    if kind == "word":
        raise ConfigError(
            "prepare.tokenizer.kind=word is the synthetic language's vocabulary; "
            f"with prepare.source={cfg.source} use bpe or pretrained"
        )
    if kind == "pretrained":
        if not cfg.tokenizer.name_or_path:
            raise ConfigError("prepare.tokenizer.kind=pretrained needs prepare.tokenizer.name_or_path")
        return tokenization.pretrained_tokenizer(
            cfg.tokenizer.name_or_path, cfg.tokenizer.trust_remote_code
        )
    return tokenization.train_bpe(train_texts, cfg.tokenizer.vocab_size)


def make_prompts(ds: datasets.Dataset, prompt_len: int, n: int, tok) -> datasets.Dataset:
    """The first ``prompt_len`` tokens (after BOS) of the first ``n`` texts long enough to have
    at least one token after the prompt."""
    rows = {"prompt_id": [], "prompt_text": [], "prompt_ids": []}
    for ids in ds["input_ids"]:
        if len(rows["prompt_id"]) >= n:
            break
        if len(ids) > prompt_len + 1:
            prompt = ids[: prompt_len + 1]
            rows["prompt_id"].append(len(rows["prompt_id"]))
            rows["prompt_text"].append(tok.decode(prompt[1:]))
            rows["prompt_ids"].append(prompt)
    return datasets.Dataset.from_dict(rows)


def write_prepared(prepared: Prepared, out_dir: str | Path) -> dict:
    """Write every artifact into ``out_dir`` atomically; returns summary stats for the metrics."""
    with atomic_path(out_dir, is_dir=True) as tmp:
        for name, ds in prepared.splits.items():
            ds.to_parquet(str(tmp / f"{name}.parquet"))
        for name, ds in prepared.prompts.items():
            ds.to_parquet(str(tmp / f"prompts_{name}.parquet"))
        prepared.tokenizer.save_pretrained(tmp / "tokenizer")
        if prepared.language is not None:
            prepared.language.save(tmp / "language.json")
    return summarize(prepared)


def summarize(prepared: Prepared) -> dict:
    stats: dict = {"vocab_size": len(prepared.tokenizer)}
    for name, ds in prepared.splits.items():
        n_tok = np.asarray(ds["n_tokens"])
        stats[name] = {"n_texts": len(ds), "n_tokens": int(n_tok.sum()), "mean_length": float(n_tok.mean())}
        if "logp_data" in ds.column_names:
            logp = np.asarray(ds["logp_data"])
            # Exact entropy rate of p_d estimated on this split: the floor no model can beat.
            stats[name]["entropy_rate"] = float(-logp.sum() / n_tok.sum())
            stats[name]["oracle_reward_mean"] = float(np.mean(ds["oracle_reward"]))
        if name in prepared.truncated:
            stats[name]["truncated_frac"] = prepared.truncated[name]
    stats["prompts"] = {k: len(v) for k, v in prepared.prompts.items()}
    return stats


def load_split(data_dir: str | Path, name: str) -> datasets.Dataset:
    path = Path(data_dir) / f"{name}.parquet"
    if not path.exists():
        raise ConfigError(f"{path} is missing: run the prepare stage first (dvc repro prepare)")
    return load_parquet_split(path, restore_fix(data_dir, "prepare"))


def load_tokenizer(data_dir: str | Path):
    """The prepared tokenizer (``<data_dir>/tokenizer``), checked (see beyondlm.inputs.load_tokenizer)."""
    return inputs.load_tokenizer(Path(data_dir) / "tokenizer", restore_fix(data_dir, "prepare"))
