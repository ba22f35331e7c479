"""Move a workspace's results through the DVC remote: push after stages ran, pull before or instead.

Every output in dvc.yaml is in the DVC cache (no ``cache: false``), so the remote carries all of
them: models, data, metrics, plots, samples and the report. ``push`` also sends the run-cache
(``--run-cache``: the stage-hash → outputs records that let ``dvc repro`` restore a stage with the
same command, deps and params instead of running it); ``pull`` fetches it back. A fresh clone at a
commit whose dvc.lock was pushed gets every result with ``pull`` and ``dvc status`` is clean.

The remote is DVC's default (``core.remote``): the committed ``.dvc/config`` names a local directory
beside the project (``../beyondlm-dvc-remote``); ``.dvc/config.local`` (never committed) may name
another, e.g. S3/MinIO (README "DVC remote"). ``remote=`` picks one by name.

    python -m beyondlm.remote push [stage ...] [-r NAME]   # = make push
    python -m beyondlm.remote pull [stage ...] [-r NAME]   # = make pull

A stage name as target moves only that stage's outputs (a dispatched worker pulls its deps'
stages, runs ``dvc repro --single-item``, pushes its own). ``pull`` brings the run-cache records,
not the objects they name: ``dvc repro --pull`` then restores a stage another checkout ran with the
same command, deps and params ("Stage ... is cached - skipping run") instead of running it; a
stage with a ``persist`` out (sft, align, datastore, grf) has no run-cache and comes back through
its dvc.lock entry only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

# An unreachable S3 endpoint fails in seconds instead of botocore's default retries with backoff
# (5 legacy attempts, 60 s connect timeout each); a user's own AWS_* settings win.
S3_FAIL_FAST = {"AWS_MAX_ATTEMPTS": "2", "AWS_RETRY_MODE": "standard"}


class RemoteError(RuntimeError):
    """A ``dvc push``/``dvc pull`` that failed; the message names the command and DVC's error."""


def _dvc(root: Path, verb: str, targets: tuple[str, ...], remote: str | None,
         timeout_s: float | None, run_cache: bool = True) -> str:
    cmd = [sys.executable, "-m", "dvc", verb, *(["--run-cache"] if run_cache else []),
           *(["-r", remote] if remote else []), *targets]
    env = {**S3_FAIL_FAST, **os.environ}
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise RemoteError(f"dvc {verb} did not finish in {timeout_s:.0f} s in {root} "
                          f"(remote {remote or 'default'} unreachable or too slow)") from exc
    if proc.returncode != 0:
        errors = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise RemoteError(f"dvc {verb} failed (exit {proc.returncode}) in {root}, remote "
                          f"{remote or 'default'}:\n" + "\n".join(errors[-15:]))
    return proc.stdout


def push(root: str | Path = ".", targets: tuple[str, ...] = (), *, remote: str | None = None,
         timeout_s: float | None = None) -> str:
    """``dvc push --run-cache`` of ``targets`` (stages or paths; all when empty); DVC's output."""
    return _dvc(Path(root), "push", tuple(targets), remote, timeout_s)


def pull(root: str | Path = ".", targets: tuple[str, ...] = (), *, remote: str | None = None,
         timeout_s: float | None = None, run_cache: bool = True) -> str:
    """``dvc pull --run-cache`` of ``targets`` (all when empty): fetch, then check out.
    ``run_cache=False``: the outputs only (a dispatched stage's checkout and the driver take what
    dvc.lock names; the remote's every run-cache record would be read each time for nothing)."""
    return _dvc(Path(root), "pull", tuple(targets), remote, timeout_s, run_cache)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m beyondlm.remote", description=__doc__.split("\n")[0])
    parser.add_argument("verb", choices=["push", "pull"])
    parser.add_argument("targets", nargs="*", help="stages or paths (default: all)")
    parser.add_argument("-r", "--remote", help="remote name (default: core.remote)")
    parser.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    args = parser.parse_args(argv)
    try:
        out = (push if args.verb == "push" else pull)(".", tuple(args.targets), remote=args.remote,
                                                      timeout_s=args.timeout)
    except RemoteError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(out, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
