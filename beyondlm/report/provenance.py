"""Where each report section's numbers come from, and which metrics files are current.

A workspace can hold metrics files no stage of the current pipeline wrote: a method dropped from
``align.methods``, a section of another experiment (e.g. HH alignment metrics left next to an IMDB
run). The report reads a file only when it is an output of a stage that ``dvc.yaml`` defines now
and, for a file output, its bytes still have the md5 ``dvc.lock`` recorded (a directory output
is trusted as a whole: DVC keeps no per-file hashes of uncached directories). Everything else is
left out and listed.

Each section names its data source (``prepare.source`` and the file or hub id), a params hash
(the first 8 hex digits of the SHA-256 of the params its stages ran with, as ``dvc.lock``
recorded them) and the commit of its code (the last commit that touched the code deps its stages
ran with, "+ uncommitted changes" when the working tree differs from it there). The stage that
runs the report sees the lock entries of every upstream stage: DVC writes a stage's entry as soon
as it finishes.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CODE_PREFIXES = ("beyondlm/", "stages/")


def md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Provenance:
    """The current pipeline's view of the workspace ``root``.

    ``lock``: stage name → its ``dvc.lock`` entry, for the stages ``dvc.yaml`` defines now."""

    root: Path
    lock: dict[str, dict]
    files: set[str] = field(default_factory=set)  # current file outputs (relative paths)
    dirs: tuple[str, ...] = ()  # current directory outputs ("path/")
    left_out: set[str] = field(default_factory=set)  # files read and refused: relative paths

    @classmethod
    def from_workspace(cls, root: Path, stage_names: set[str]) -> Provenance:
        """``stage_names``: the stages ``dvc.yaml`` defines now (beyondlm.dvcgraph.pipeline_stages)."""
        lock_path = root / "dvc.lock"
        entries = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {}) if lock_path.exists() else {}
        lock = {name: e for name, e in entries.items() if name in stage_names}
        files, dirs = set(), []
        for entry in lock.values():
            for out in entry.get("outs", []):
                path, digest = out["path"], str(out.get("md5", ""))
                if digest.endswith(".dir"):
                    dirs.append(path.rstrip("/") + "/")
                elif (root / path).is_file() and md5(root / path) == digest:
                    files.add(path)
        return cls(root, lock, files, tuple(sorted(dirs)))

    def is_current(self, path: Path) -> bool:
        """Whether ``path`` is an output of the current pipeline with the bytes dvc.lock recorded
        (recorded as left out when it is not)."""
        rel = Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        ok = rel in self.files or rel.startswith(self.dirs)
        if not ok:
            self.left_out.add(rel)
        return ok

    # ------------------------------------------------------------------ per section
    def _entries(self, stages: tuple[str, ...]) -> dict[str, dict]:
        """Lock entries of the stages named (a name without '@' also matches its matrix, "sft" → "sft@*")."""
        return {n: e for n, e in sorted(self.lock.items()) if n.split("@")[0] in stages or n in stages}

    def params_hash(self, stages: tuple[str, ...]) -> str | None:
        entries = self._entries(stages)
        if not entries:
            return None
        params = {n: e.get("params", {}) for n, e in entries.items()}
        return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:8]

    def commit(self, stages: tuple[str, ...]) -> str | None:
        """The last commit touching the stages' code deps (+ "+ uncommitted changes"); None outside git."""
        code = sorted({d["path"] for e in self._entries(stages).values() for d in e.get("deps", [])
                       if d["path"].startswith(CODE_PREFIXES)})
        if not code:
            return None
        try:
            sha = _git(self.root, "log", "-1", "--format=%h", "--", *code)
            dirty = _git(self.root, "status", "--porcelain", "--untracked-files=no", "--", *code)
        except (OSError, subprocess.CalledProcessError):
            return None
        if not sha:
            return "uncommitted code"
        return sha + (" + uncommitted changes" if dirty else "")

    def data_source(self) -> str | None:
        """"synthetic (embedded language)", "local: <train file>", "hub: <id>" from prepare's params."""
        params = self.lock.get("prepare", {}).get("params", {}).get("params.yaml", {})
        prep = params.get("prepare", {})
        source = prep.get("source") or params.get("prepare.source")
        if source is None:
            return None
        if source == "synthetic":
            return "synthetic (embedded language)"
        if source == "local":
            return f"local: {(prep.get('local') or {}).get('train')}"
        return f"hub: {(prep.get('hub') or {}).get('name')}"

    def line(self, stages: tuple[str, ...]) -> list[str]:
        """The section's provenance line (empty when none of its stages is in dvc.lock)."""
        h = self.params_hash(stages)
        if h is None:
            return []
        parts = [f"data {self.data_source() or 'unknown'}", f"params `{h}`"]
        if (c := self.commit(stages)) is not None:
            parts.append(f"code at commit `{c}`")
        return [f"_Provenance: {' · '.join(parts)} (stages: {', '.join(stages)})._", ""]

    def left_out_section(self) -> list[str]:
        if not self.left_out:
            return []
        return ["## Left out", "", f"{len(self.left_out)} metrics file(s) in the workspace are not outputs of the "
                "current pipeline as dvc.lock records it (another experiment, a stage since removed, or edited by "
                "hand) and were not read:", "", *(f"- `{p}`" for p in sorted(self.left_out)), ""]


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
