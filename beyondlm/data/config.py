"""Params section ``prepare``: where the corpus comes from, how it is cut and tokenized; and
``PreparedData``, the few ``prepare`` keys downstream stages read (and declare)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from beyondlm.config import ConfigError, check_choice, check_range, load_section, section
from beyondlm.data.synthetic import LanguageSpec
from beyondlm.inputs import reading, restore_fix


@dataclass(frozen=True)
class LocalSourceConfig:
    """``prepare.local``: text files on disk (jsonl, json, csv, tsv, parquet, txt)."""

    train: str | None = None
    valid: str | None = None  # if null, carved out of train by valid_fraction
    test: str | None = None  # if null, carved out of train by test_fraction
    text_column: str = "text"
    valid_fraction: float = 0.05
    test_fraction: float = 0.05


@dataclass(frozen=True)
class HubSourceConfig:
    """``prepare.hub``: ``datasets.load_dataset(name, config, revision=...)``."""

    name: str | None = None
    config: str | None = None
    revision: str | None = None
    text_column: str = "text"
    train_split: str = "train"
    valid_split: str | None = "validation"
    test_split: str | None = "test"
    valid_fraction: float = 0.05
    test_fraction: float = 0.05
    trust_remote_code: bool = False


@dataclass(frozen=True)
class TokenizerConfig:
    """``prepare.tokenizer``. ``auto``: the exact word vocabulary for synthetic data, a byte-level
    BPE trained on the train split otherwise, or the model's own tokenizer when ``name_or_path``
    is set."""

    kind: str = "auto"  # auto | word | bpe | pretrained
    vocab_size: int = 4000
    name_or_path: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        check_choice("prepare.tokenizer.kind", self.kind, ("auto", "word", "bpe", "pretrained"))
        check_range("prepare.tokenizer.vocab_size", self.vocab_size, 64, 1_000_000)


@dataclass(frozen=True)
class PrepareConfig:
    source: str = "synthetic"  # synthetic | local | hub
    out_dir: str = "data/prepared"
    seed: int = 0
    n_train: int = 20000  # synthetic sizes; local/hub: caps (0 = all)
    n_valid: int = 1000
    n_test: int = 2000
    max_len: int = 64  # tokens per text incl. EOS (synthetic: the language's max length)
    prompt_len: int = 8
    n_prompts: int = 256
    synthetic: LanguageSpec = field(default_factory=LanguageSpec)
    local: LocalSourceConfig = field(default_factory=LocalSourceConfig)
    hub: HubSourceConfig = field(default_factory=HubSourceConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def __post_init__(self) -> None:
        check_choice("prepare.source", self.source, ("synthetic", "local", "hub"))
        check_range("prepare.max_len", self.max_len, 4, 1_000_000)
        check_range("prepare.prompt_len", self.prompt_len, 1, self.max_len - 1)
        for key in ("n_train", "n_valid", "n_test", "n_prompts"):
            check_range(f"prepare.{key}", getattr(self, key), 0, 10**9)
        if self.source == "synthetic" and self.synthetic.max_len != self.max_len:
            raise ConfigError(
                f"prepare.synthetic.max_len={self.synthetic.max_len} differs from "
                f"prepare.max_len={self.max_len}: set them equal (the language is defined "
                "conditioned on length <= max_len)"
            )


@dataclass(frozen=True)
class PreparedData:
    """What downstream stages read of the ``prepare`` section: where its outputs are and the
    lengths they were cut to. Stages using it declare these keys in dvc.yaml."""

    out_dir: str = PrepareConfig.out_dir
    max_len: int = PrepareConfig.max_len
    prompt_len: int = PrepareConfig.prompt_len

    @property
    def data_dir(self) -> Path:
        return Path(self.out_dir)

    def language(self):
        """The synthetic language (exact p_d) if prepare used it, else None."""
        from beyondlm.data.synthetic import SyntheticLanguage

        path = self.data_dir / "language.json"
        if not path.exists():
            return None
        with reading(path, "synthetic language file", restore_fix(self.data_dir, "prepare")):
            return SyntheticLanguage.load(path)


def prepared_data(params: Mapping[str, Any]) -> PreparedData:
    """The declared ``prepare`` keys, typed (the rest of the section is prepare's own)."""
    prep = section(params, "prepare")
    keys = [f.name for f in dataclasses.fields(PreparedData)]
    return load_section(PreparedData, {k: prep[k] for k in keys if k in prep}, "prepare")
