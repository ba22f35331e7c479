"""Several processes inside one stage (``train.processes: N``): the stage relaunches itself once
under ``torch.distributed.run`` (torchrun) and every process runs the stage; the loop shares
each step's batch (DDP, :func:`beyondlm.training.train_loop`) and only rank 0 writes files.

Why torchrun and not ``accelerate launch``: torchrun ships with torch and takes everything from
its command line, while ``accelerate launch`` also reads the user's
``~/.cache/huggingface/accelerate/default_config.yaml``, an input DVC does not see. ``Accelerator``
picks up torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...) by itself: gloo
on CPU, nccl on GPU. torchrun also sets ``OMP_NUM_THREADS=1`` per process unless it is set.

Everything here is a no-op with one process: a stage run without torchrun behaves as before.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from beyondlm.config import ConfigError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0 (or no torchrun at all): the process that writes the stage's files."""
    return rank() == 0


def relaunch(processes: int, key: str = "train.processes") -> int | None:
    """With ``processes`` > 1 outside torchrun: run this very command (same interpreter, module
    or script, arguments) under ``torchrun --standalone --nproc_per_node processes`` and return its
    exit status, for the caller to exit with. ``None``: carry on in this process (one process, or
    already a torchrun worker)."""
    if "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ:
        if world_size() != processes and processes > 1:
            raise ConfigError(f"params.yaml: '{key}'={processes} but this process runs among "
                              f"WORLD_SIZE={world_size()}: launch the stage plainly, it starts its own workers")
        return None
    if processes <= 1:
        return None
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    target = ["-m", spec.name] if spec is not None and spec.name else [sys.argv[0]]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           *target, *sys.argv[1:]]
    return subprocess.run(cmd).returncode


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled); ``obj`` itself with one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
