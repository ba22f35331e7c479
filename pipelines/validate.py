"""Check the params of every stage a flow will run before it runs any of them.

Each stage module exposes ``parser()`` (the command line dvc.yaml gives it) and
``configure(args, params)`` (every params check of the stage, no input read); this runs both
for the selected stages, so a bad key in the last section stops the flow in seconds instead
of after the first hour of training.
"""

from __future__ import annotations

import contextlib
import importlib
import shlex
from pathlib import Path
from typing import Sequence

from beyondlm.config import ConfigError, read_params
from beyondlm.dvcgraph import StageInfo, stage_module


@contextlib.contextmanager
def _no_device_checks():
    """Skip the checks that ask this machine's device (``mixed_precision``): the driver of a
    dispatched run may lack the GPU its workers have. Each stage checks again where it runs."""
    from beyondlm import config

    check = config.check_mixed_precision
    config.check_mixed_precision = lambda value, device=None: None
    try:
        yield
    finally:
        config.check_mixed_precision = check


def validate_stages(stages: Sequence[StageInfo], root: str | Path = ".", device_checks: bool = True) -> None:
    """Raise ConfigError listing every stage whose params do not load (one line per problem,
    each with the stages it stops). ``device_checks=False``: stages run on other machines."""
    root = Path(root).resolve()
    params = read_params(root / "params.yaml")
    problems: dict[str, list[str]] = {}
    with contextlib.chdir(root), (contextlib.nullcontext() if device_checks else _no_device_checks()):
        for info in stages:
            module = stage_module(info.cmd)
            if module is None:
                continue
            stage = importlib.import_module(module)
            argv = shlex.split(info.cmd)
            args = stage.parser().parse_args(argv[argv.index(module) + 1:])
            try:
                stage.configure(args, params)
            except ConfigError as err:
                problems.setdefault(str(err), []).append(info.name)
    if problems:
        lines = [f"{msg} [stops: {', '.join(names)}]" for msg, names in problems.items()]
        raise ConfigError("nothing was run; fix params.yaml first:\n" + "\n".join(lines))
