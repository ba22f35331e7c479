"""Training under several processes (``train.processes``, DDP on CPU with gloo): the same run as
one process at the same global batch, and a SIGKILLed run resumes to the uninterrupted weights.

Tolerances (measured on the run of ``tests/ddp_worker.py``: 6 steps, lr 1e-2, 16 sequences a step
in 2 micro-batches): the per-step training loss agrees to 1.0e-7 relative, held-out loss to
1.1e-8, grad norms exactly, final weights to 8.6e-6 absolute. Two processes sum their 8 sequences
apart and DDP averages the two sums, one process sums all 16: float32 reduction order, ~1e-7 of a
gradient, which Adam's m/√v can enlarge for coordinates with tiny second moments (an update is
~lr = 1e-2). Asserted with margin: rtol 1e-5 on losses, atol 1e-4 on weights (1% of one step).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from beyondlm.config import ConfigError, TrainConfig, load_section
from tests import ddp_worker

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(out: Path, ckpt: Path, *extra: str, wait: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests.ddp_worker", "--out", str(out), "--ckpt", str(ckpt), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # own process group: a SIGKILL reaches the workers
    if wait:
        log, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, log.decode()[-3000:]
    return proc


def _curve(out: Path, name: str) -> list[float]:
    rows = (out / "live" / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()
    col = rows[0].split("\t").index(name.split("/")[-1])
    return [float(r.split("\t")[col]) for r in rows[1:]]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """An uninterrupted 2-process run (the reference of both tests below)."""
    out = tmp_path_factory.mktemp("ddp") / "two"
    _torchrun(out, out.parent / "ckpt_two")
    return out


def test_two_processes_match_one_process(two_processes, tmp_path):
    one = tmp_path / "one"
    ddp_worker.train(one, tmp_path / "ckpt_one", processes=1)
    for name in ("train/loss", "valid/loss", "train/grad_norm"):
        assert len(_curve(one, name)) == len(_curve(two_processes, name)) > 1, name
        torch.testing.assert_close(_curve(two_processes, name), _curve(one, name), rtol=1e-5, atol=0, msg=name)
    a, b = load_file(str(one / "weights.safetensors")), load_file(str(two_processes / "weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=k)
    r1, r2 = (json.loads((d / "result.json").read_text()) for d in (one, two_processes))
    assert r1["tokens"] == r2["tokens"] and r1["normaliser"] == r2["normaliser"] and r2["steps"] == ddp_worker.STEPS


def test_two_processes_resume_after_sigkill(two_processes, tmp_path):
    out, ckpt = tmp_path / "killed", tmp_path / "ckpt"
    stall = ddp_worker.CKPT_EVERY * 2 + 1  # one step after the step-4 checkpoint
    proc = _torchrun(out, ckpt, "--stall-after", str(stall), wait=False)
    try:
        deadline = time.monotonic() + 120
        while not (out / "stalled").exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the stall"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    states = sorted(p.name for p in ckpt.glob("step-*"))
    assert states == ["step-00000004"] and not (out / "weights.safetensors").exists()
    assert {p.name for p in (ckpt / states[0]).glob("random_states_*.pkl")} == {"random_states_0.pkl",
                                                                                "random_states_1.pkl"}
    _torchrun(out, ckpt)
    result = json.loads((out / "result.json").read_text())
    assert result["resumed_from"] == 4 and result["steps"] == ddp_worker.STEPS
    a, b = load_file(str(two_processes / "weights.safetensors")), load_file(str(out / "weights.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert _curve(out, "train/loss") == _curve(two_processes, "train/loss")  # each step once, same values
    assert not list(ckpt.glob("step-*")) and (ckpt / "complete.json").exists()


@pytest.mark.parametrize("value", [0, 9, 1.5])
def test_bad_processes_names_the_key(value):
    with pytest.raises(ConfigError, match=r"'sft\.train\.processes'|'processes'") as err:
        load_section(TrainConfig, {"batch_size": 8, "processes": value}, "sft.train")
    assert "sft.train" in str(err.value)
