"""Typed params: one frozen dataclass per ``params.yaml`` section, loaded strictly.

The base layer of the library: it imports no other ``beyondlm`` module at load time. Sections
live next to what they configure (``prepare`` in ``beyondlm/data/config.py``, ``align`` in
``beyondlm/align/experiment.py``, ...); the shared ones (``ModelConfig``, ``TrainConfig``) and
the small evaluate and report sections are here.

``load_section(Cls, raw, "sft")`` builds ``Cls`` from a plain dict: unknown keys, wrong types and
out-of-range values raise :class:`ConfigError` naming the full key (``sft.model.n_head``), the value
and what is allowed. Only these dataclasses enter library code; stages never pass raw dicts on.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping



class ConfigError(ValueError):
    """A params or input problem the user can fix; the message names the key and the fix."""


# ----------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class ModelConfig:
    """``<section>.model`` of every section that trains an LM (sft, bigram, reward, vq.prior): a
    tiny GPT-2 from this config, or any model by ``name_or_path``."""

    name_or_path: str | None = None
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 128
    dropout: float = 0.0
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:  # load_section appends the section's name
            raise ConfigError(f"params.yaml: 'n_embd'={self.n_embd} is not divisible by n_head={self.n_head}: "
                              f"choose n_embd a multiple of n_head")
        check_range("dropout", self.dropout, 0.0, 1.0)


@dataclass(frozen=True)
class TrainConfig:
    """``<section>.train``: the shared training loop's knobs, in every section that trains (sft,
    bigram, reward, align, vq, vq.prior); defaults differ per section, keys do not."""

    lr: float = 3e-3
    batch_size: int = 32  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 600  # optimizer steps
    warmup_steps: int = 30
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    ckpt_every: int = 200  # steps between resumable checkpoints (0 = only at the end)
    log_every: int = 10
    mixed_precision: str = "no"  # no | fp16 | bf16 (accelerate)
    group_by_length: bool = True  # batches of similar lengths: far less padding (see BatchOrder)
    eval_every: int = 0  # steps between held-out evaluations (0 = max_steps // 10)
    converge_tol: float = 0.01  # converged: the last quarter brought < this share of the run's held-out improvement
    # Causal HF LMs on right-padded rows: train without the padding attention mask (a real token
    # attends only to earlier, real tokens anyway, so the loss is unchanged; the kernel skips the
    # 4-D mask). Checked on the first batch against the masked forward; off for anything else.
    skip_pad_mask: bool = True
    # Processes sharing each optimizer step's batch (DDP; beyondlm/distributed.py): the stage
    # relaunches itself under torchrun. The global batch stays batch_size · grad_accum sequences.
    processes: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("lr", self.lr, 0.0, 10.0)
        for key in ("batch_size", "grad_accum", "max_steps", "log_every"):
            check_range(key, getattr(self, key), 1, 10**9)
        check_range("eval_every", self.eval_every, 0, self.max_steps)
        check_range("converge_tol", self.converge_tol, 0.0, 1.0)
        check_range("warmup_steps", self.warmup_steps, 0, self.max_steps)
        check_choice("mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        check_mixed_precision(self.mixed_precision)
        check_param("processes", isinstance(self.processes, int) and 1 <= self.processes <= self.batch_size,
                    self.processes, f"an integer from 1 to batch_size={self.batch_size} (each process takes "
                    f"its share of every micro-batch: at least one sequence)")

    @property
    def eval_interval(self) -> int:
        """Steps between held-out evaluations: ``eval_every``, or a tenth of the run."""
        return self.eval_every or max(1, self.max_steps // 10)


@dataclass(frozen=True)
class EvaluateConfig:
    """``evaluate``: test perplexity, exact distributional metrics, sample metrics."""

    n_samples: int = 2000  # unconditional samples from the model (pure ancestral, T = 1)
    batch_size: int = 256
    max_test: int = 0  # 0 = the whole test split
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("evaluate.n_samples", self.n_samples, 2, 10**7)
        check_range("evaluate.batch_size", self.batch_size, 1, 10**6)


@dataclass(frozen=True)
class ReportConfig:
    n_examples: int = 5  # sample texts shown per variant


def record(obj: Any) -> dict:
    """``dataclasses.asdict`` for what outs record (checkpoint fingerprints, metrics): a
    ``processes`` of 1 (TrainConfig) is left out, so a one-process run writes the same bytes as
    before the key existed; with more processes it is recorded (a checkpoint of N processes
    resumes only under N: it holds one RNG state per process)."""
    return dataclasses.asdict(obj, dict_factory=lambda kv: {k: v for k, v in kv if not (k == "processes" and v == 1)})


# ----------------------------------------------------------------------------- loading
def load_yaml(path: str | Path) -> Any:
    """Parse YAML 1.2 with ruamel, exactly as DVC does: `dvc exp run -S` rewrites params.yaml and
    leaves e.g. `mixed_precision: no` unquoted, which a YAML 1.1 parser would read as False."""
    from ruamel.yaml import YAML

    with Path(path).open() as f:
        return YAML(typ="safe", pure=True).load(f) or {}


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found: run from the project root (where dvc.yaml is)")
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def section(params: Mapping[str, Any], name: str) -> dict[str, Any]:
    """``params[name]`` or ``{}``; a non-mapping section is an error."""
    value = params.get(name) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"params.yaml: section '{name}' must be a mapping, got {value!r}")
    return dict(value)


def load_section(cls: type, raw: Mapping[str, Any] | None, prefix: str):
    """Build dataclass ``cls`` from ``raw`` strictly (unknown key, wrong type → ConfigError)."""
    raw = dict(raw or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(
            f"params.yaml: unknown key '{key}'. Allowed keys in '{prefix}': {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: _coerce(hints[name], _over_default(fields[name], value), f"{prefix}.{name}" if prefix else name)
        for name, value in raw.items()
    }
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # __post_init__ validation (ours or LanguageSpec's)
        raise ConfigError(f"{err} (in params section '{prefix}')") from err


def _over_default(f: dataclasses.Field, value: Any) -> Any:
    """A mapping given for a field whose default is a dataclass (``train: TrainConfig(lr=2e-3, ...)``)
    sets only its own keys; the rest keep the section's default, not the class's."""
    if isinstance(value, Mapping) and f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
        if dataclasses.is_dataclass(default):
            return {**dataclasses.asdict(default), **value}
    return value


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"params.yaml: '{key}' must be a mapping, got {value!r}")
        return load_section(tp, value, key)
    if origin in (dict, Mapping, typing.Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"params.yaml: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"params.yaml: '{key}' must be a list, got {value!r}")
        return tuple(value) if (origin or tp) is tuple else list(value)
    return _coerce_scalar(tp, value, key)


def _coerce_scalar(tp: Any, value: Any, key: str) -> Any:
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '3e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(
        f"params.yaml: '{key}' must be {tp.__name__}, got {value!r} ({type(value).__name__})"
    )


def training_device() -> str:
    """The device type ``accelerate.Accelerator()`` trains on here: cuda, mps or cpu."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def check_mixed_precision(value: str, device: str | None = None) -> None:
    """Refuse a ``mixed_precision`` the training device cannot run (ConfigError, one line).

    Refuse rather than fall back: accelerate accepts ``fp16`` on a CPU and silently trains in
    float32, so the run would differ from what params.yaml (and DVC's record of it) says, and an
    "fp16" result would be an fp32 one under another name. A refusal costs one edit of params;
    a silent fallback costs a wrong comparison later. ``bf16`` on a CPU is real (torch's CPU
    autocast), only slow where the CPU lacks bf16 instructions, so it is allowed; on a GPU
    without bf16 (before Ampere) accelerate raises deep in the loop, so it is refused here.
    The precision that ran is recorded in every training stage's metrics (``train.mixed_precision``).
    """
    if value == "no":
        return
    device = device or training_device()
    if value == "fp16" and device == "cpu":
        raise ConfigError("params.yaml: 'mixed_precision'='fp16' cannot run on this machine's device (cpu: "
                          "accelerate would silently train in float32); set mixed_precision: \"no\" (or bf16)")
    if value == "bf16" and device == "cuda":
        import torch

        if not torch.cuda.is_bf16_supported():
            raise ConfigError(f"params.yaml: 'mixed_precision'='bf16' cannot run on this GPU "
                              f"({torch.cuda.get_device_name()} has no bf16); set mixed_precision: fp16 or \"no\"")


def check_param(key: str, ok: bool, value: Any, allowed: str) -> None:
    """ConfigError naming ``key``, its ``value`` and what is ``allowed`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"params.yaml: '{key}'={value!r}: {allowed}")


def check_choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"params.yaml: '{key}'={value!r} is not one of {', '.join(allowed)}")


def check_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ConfigError(f"params.yaml: '{key}'={value!r} must be between {low} and {high}")


# ----------------------------------------------------------------------------- training keys
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "seed")


def train_config(base: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None, prefix: str,
                 **fixed: Any) -> TrainConfig:
    """``TrainConfig`` from a section's ``train`` mapping with an entry's own ``train`` mapping on
    top (``sft.objectives.<variant>.train``); ``fixed`` keys (the seed) are the stage's, not params'."""
    for name, raw in ((prefix, base), (f"{prefix} override", overrides)):
        if raw is not None and not isinstance(raw, Mapping):
            raise ConfigError(f"params.yaml: '{name}' must be a mapping of training keys, got {raw!r}")
    return load_section(TrainConfig, {**(base or {}), **(overrides or {}), **fixed}, prefix)
