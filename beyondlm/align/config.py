"""Params sections of the alignment experiment: ``align_sample``, ``preferences``, ``reward``,
``align`` and ``best_of_n`` (one frozen dataclass each, loaded strictly by ``load_section``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping

from beyondlm.config import ConfigError, ModelConfig, check_choice, TrainConfig, check_param, train_config
from beyondlm.objectives.preference import PREFERENCE_LOSSES, resolve_preference_loss

EVAL_PROMPTS = ("test", "pairs")
VALID_SPLITS = ("random", "prepared")
METHODS = tuple(PREFERENCE_LOSSES)  # every row of the loss table, RLOO (online) included


@dataclass(frozen=True)
class SampleConfig:
    """``align_sample``: K completions per training prompt from the SFT model ``base``."""

    base: str = "mle-s0"  # models/sft/<base>: the policy's init and the reference π_sft
    K: int = 4
    temperature: float = 1.0
    n_prompts: int = 0  # 0 = every prompt of prompts_train
    batch_size: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        check_param("align_sample.K", self.K >= 2, self.K, "need at least 2 samples per prompt")
        check_param("align_sample.temperature", self.temperature > 0, self.temperature, "must be > 0")
        check_param("align_sample.n_prompts", self.n_prompts >= 0, self.n_prompts, "must be >= 0")


@dataclass(frozen=True)
class PrefFileConfig:
    path: str | None = None  # .jsonl/.json/.parquet (optionally .gz) with chosen/rejected columns
    prompt_column: str = "prompt"  # absent in the file: HH-RLHF dialogues, split at the last turn
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    limit: int = 0  # 0 = every row


@dataclass(frozen=True)
class PreferencesConfig:
    """``preferences``: pairs labelled by the oracle from the samples, or read from a file."""

    source: str = "samples"  # samples | file
    max_pairs_per_prompt: int = 0  # 0 = every pair of distinct oracle scores (K(K−1)/2 at most)
    valid_fraction: float = 0.1  # held-out prompts for the reward model's pair accuracy
    valid_split: str = "random"  # random (valid_fraction of the pairs) | prepared (source=file: the pairs
    # whose chosen dialogue is a prepared valid/test text, so an SFT corpus made of the same file never saw them)
    file: PrefFileConfig = field(default_factory=PrefFileConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        check_param("preferences.source", self.source in ("samples", "file"), self.source, "samples | file")
        check_choice("preferences.valid_split", self.valid_split, VALID_SPLITS)
        if self.valid_split == "prepared" and self.source != "file":
            raise ConfigError("params.yaml: preferences.valid_split=prepared needs preferences.source=file "
                              "(oracle-labelled samples have no prepared text to match); fix: valid_split: random")
        check_param("preferences.valid_fraction", 0 < self.valid_fraction < 1, self.valid_fraction,
               "must lie in (0, 1)")
        if self.source == "file" and not self.file.path:
            raise ConfigError("params.yaml: preferences.source=file needs preferences.file.path")


@dataclass(frozen=True)
class RewardConfig:
    """``reward``: the Bradley–Terry reward model and its training loop."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(n_head=2, n_embd=64))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=2e-3, batch_size=64, max_steps=150,
                                                                    warmup_steps=10, ckpt_every=0))


@dataclass(frozen=True)
class EvalConfig:
    n_prompts: int = 128  # held-out prompts
    batch_size: int = 512
    seed: int = 0
    # test: prepare's prompts_test (the first prompt_len tokens of test texts); pairs: the distinct
    # prompts of the held-out preference pairs (HH: dialogues ending at the last "Assistant:")
    prompts: str = "test"

    def __post_init__(self) -> None:
        check_choice("align.eval.prompts", self.prompts, EVAL_PROMPTS)


@dataclass(frozen=True)
class AlignConfig:
    """``align``: one policy per method and seed, evaluated at every ``eval_every`` steps.

    ``hyperparams.<method>`` sets the method's row of the loss table (``PREFERENCE_LOSSES``) and
    may hold a ``train`` mapping over ``align.train`` for that method only (as
    ``sft.objectives.<variant>.train``), e.g. RLOO's own step budget."""

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    hyperparams: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, batch_size=32, max_steps=60,
                                                                    warmup_steps=5, ckpt_every=20,
                                                                    group_by_length=False))
    eval_every: int = 20
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        check_param("align.methods", self.methods and not bad, self.methods, f"choose from {list(METHODS)}")
        unknown = sorted(set(self.hyperparams) - set(METHODS))
        check_param("align.hyperparams", not unknown, unknown, f"keys must be among {list(METHODS)}")
        for method, entry in self.hyperparams.items():  # now, not after the models are loaded
            check_param(f"align.hyperparams.{method}", isinstance(entry or {}, Mapping), entry,
                        "a mapping of hyperparameter: value (and an optional train mapping)")
            for key, value in (entry or {}).items():
                if key == "train":
                    continue
                try:
                    resolve_preference_loss(method, {key: value})
                except ValueError as err:
                    raise ConfigError(f"params.yaml: 'align.hyperparams.{method}.{key}'={value!r}: {err}; "
                                      f"fix it, or drop it for the default") from err
        check_param("align.eval_every", self.eval_every >= 1, self.eval_every, "must be >= 1")
        for method in self.methods:
            self.train_config(method, seed=0)  # ranges of align.train and each method's train, now

    def kind(self, method: str) -> str:
        """pair | group | online: what the method trains on (its row of the loss table)."""
        return PREFERENCE_LOSSES[method].kind

    def loss(self, method: str) -> dict[str, float]:
        """The method's hyperparameters: the table's defaults with ``align.hyperparams.<method>``."""
        entry = {k: v for k, v in (self.hyperparams.get(method) or {}).items() if k != "train"}
        try:
            return resolve_preference_loss(method, entry)[1]
        except ValueError as err:
            raise ConfigError(f"params.yaml: align.hyperparams.{method}: {err}") from err

    def train_config(self, method: str, seed: int) -> TrainConfig:
        """``align.train`` with ``align.hyperparams.<method>.train`` on top; held-out checks every
        ``eval_every`` steps. On-policy methods batch prompts: nothing to group by length."""
        overrides = (self.hyperparams.get(method) or {}).get("train")
        fixed = {"group_by_length": False} if self.kind(method) == "online" else {}
        train = train_config(asdict(self.train), overrides, f"align.hyperparams.{method}.train", seed=seed, **fixed)
        return replace(train, eval_every=min(self.eval_every, train.max_steps))


@dataclass(frozen=True)
class BestOfNConfig:
    Ns: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])

    def __post_init__(self) -> None:
        check_param("best_of_n.Ns", bool(self.Ns) and all(n >= 1 for n in self.Ns), self.Ns,
               "a non-empty list of integers >= 1")
