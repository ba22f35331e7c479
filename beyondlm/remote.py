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
import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
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
        raise _failed(verb, proc.returncode, root, remote, proc.stderr + proc.stdout)
    return proc.stdout


def _failed(verb: str, code: int, root: Path, remote: str | None, output: str) -> RemoteError:
    errors = [ln for ln in output.splitlines() if ln.strip()]
    return RemoteError(f"dvc {verb} failed (exit {code}) in {root}, remote "
                       f"{remote or 'default'}:\n" + "\n".join(errors[-15:]))


@contextlib.contextmanager
def _captured_output() -> Iterator[list[str]]:
    """What this process and its children write meanwhile: to file descriptors 1 and 2 (a child
    such as a stage's command), to ``sys.stdout``/``sys.stderr`` and through DVC's log handlers,
    which keep the streams they found at import (pytest's, say). DVC's loggers stop passing their
    records on to the root logger meanwhile (the host's, e.g. Prefect's, would print each error a
    second time, traceback and all) and log at DVC's own levels even if the host changed them
    (``dictConfig`` disables the loggers that exist unless told not to; a library may quieten
    ``dvc`` to warnings): the text reads as DVC's command line prints it. The yielded list holds it
    once the block ends."""
    import logging

    text: list[str] = []
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = os.dup(1), os.dup(2)
    roots = ("dvc", "dvc_objects", "dvc_data")
    loggers = [logging.getLogger(name) for name in roots]
    family = {lg: (lg.disabled, lg.level) for name, lg in list(logging.root.manager.loggerDict.items())
              if isinstance(lg, logging.Logger) and name.split(".")[0] in roots}
    for lg in family:  # as `dvc.logger.setup` leaves them (DVC's -q/-v still apply inside the call)
        lg.disabled = False
        lg.setLevel(logging.INFO if lg.name in roots else logging.NOTSET)
    with tempfile.TemporaryFile() as tmp, open(tmp.fileno(), "w", closefd=False, buffering=1) as here:
        handlers = {h for lg in loggers for h in lg.handlers if isinstance(h, logging.StreamHandler)}
        streams = {h: h.setStream(here) for h in handlers}
        propagate = [lg.propagate for lg in loggers]
        for lg in loggers:
            lg.propagate = False
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            with contextlib.redirect_stdout(here), contextlib.redirect_stderr(here):
                yield text
        finally:
            here.flush()
            for handler, stream in streams.items():
                handler.setStream(stream)
            for lg, flag in zip(loggers, propagate):
                lg.propagate = flag
            for lg, (disabled, level) in family.items():
                lg.disabled = disabled
                lg.setLevel(level)
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            tmp.seek(0)
            text.append(tmp.read().decode(errors="replace"))


def dvc_here(*args: str) -> tuple[int, str]:
    """``dvc <args>`` run by DVC's own CLI inside this process, in its working directory: its exit
    code and its output, with that of the commands it runs (a stage's). A dispatched stage runs
    three DVC commands (pull, repro, push); a fresh ``python -m dvc`` for each costs a start and
    DVC's imports, ~0.5 s of a core, which a small machine running stages side by side feels.
    Unbounded in time: for a remote that may not answer, ``push``/``pull`` with ``timeout_s``."""
    from dvc.cli import main

    added = {key: value for key, value in S3_FAIL_FAST.items() if key not in os.environ}
    os.environ.update(added)
    try:
        with _captured_output() as out:
            code = main(list(args))
    finally:
        for key in added:
            os.environ.pop(key, None)
    return code, out[0]


def pull_here(targets: tuple[str, ...]) -> str:
    """:func:`pull` of the working directory (outputs only, no run-cache) by :func:`dvc_here`."""
    code, output = dvc_here("pull", *targets)
    if code != 0:
        raise _failed("pull", code, Path.cwd(), None, output)
    return output


def push_here(targets: tuple[str, ...]) -> str:
    """:func:`push` of the working directory (outputs and run-cache) by :func:`dvc_here`."""
    code, output = dvc_here("push", "--run-cache", *targets)
    if code != 0:
        raise _failed("push", code, Path.cwd(), None, output)
    return output


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
