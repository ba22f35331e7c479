"""Entry-point wrapper for stages: a user error (bad params or a bad input file) prints one clear
line and exits 2."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from beyondlm.config import ConfigError
from beyondlm.inputs import InputError


def run(main: Callable[[], None]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import datasets

    datasets.disable_progress_bars()  # one bar per Parquet write is noise in stage logs
    try:
        main()
    except (ConfigError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
