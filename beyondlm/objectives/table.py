"""What the objective tables (SFT and preference losses) share: strict hyperparameter resolution."""

from __future__ import annotations

import math
from typing import Callable, Mapping, TypeVar

Row = TypeVar("Row")  # a table row with a ``defaults`` mapping
Ranges = Mapping[str, tuple[Callable[[float], bool], str]]


def check_value(key: str, value: object, ranges: Ranges) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"hyperparameter {key!r} must be a finite number, got {value!r}")
    check = ranges.get(key)
    if check is not None and not check[0](float(value)):
        raise ValueError(f"hyperparameter {key!r}={value!r} is outside its allowed range {check[1]}")
    return float(value)


def resolve(table: Mapping[str, Row], name: str, hyperparams: Mapping[str, float], ranges: Ranges,
            what: str) -> tuple[Row, dict[str, float]]:
    """``table[name]`` with its defaults updated by ``hyperparams``; unknown names, unknown or
    non-numeric hyperparameters and out-of-range values raise ValueError naming the key."""
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; allowed: {sorted(table)}")
    row = table[name]
    unknown = sorted(set(hyperparams) - set(row.defaults))
    if unknown:
        raise ValueError(f"{what} {name!r} got unknown hyperparameter(s) {unknown}; allowed: {sorted(row.defaults)}")
    merged = {**row.defaults, **hyperparams}
    return row, {k: check_value(k, v, ranges) for k, v in merged.items()}
