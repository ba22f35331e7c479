"""Read the DVC stage graph: stage order and each stage's declared params and outputs.

The Prefect flows run stages in this order and mirror exactly what each stage declares into
MLflow; nothing here re-declares dependencies (dvc.yaml stays the one source of truth).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence


from beyondlm.config import load_yaml


@dataclass(frozen=True)
class StageInfo:
    name: str  # DVC address, e.g. "sft@mle-0"
    params: dict[str, Any] = field(default_factory=dict)  # declared keys → current values
    metrics: tuple[Path, ...] = ()
    plots: tuple[Path, ...] = ()
    outs: tuple[Path, ...] = ()  # other outputs (models, data, samples)
    cmd: str = ""  # the stage's command, matrix/foreach values substituted
    upstream: tuple[str, ...] = ()  # stages whose outputs it reads (among those selected)


def _lookup(params: dict, dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _stage_info(stage, root: Path, params_cache: dict[str, dict]) -> StageInfo:
    values: dict[str, Any] = {}
    for dep in stage.deps:
        if dep.__class__.__name__ != "ParamsDependency":
            continue
        path = root / dep.def_path
        params = params_cache.setdefault(str(path), load_yaml(path))
        keys = dep.params or list(params)  # no keys listed = the whole file
        values.update({k: _lookup(params, k) for k in keys})
    by_kind: dict[str, list[Path]] = {"metrics": [], "plots": [], "outs": []}
    for out in stage.outs:
        kind = "metrics" if out.metric else "plots" if out.plot else "outs"
        by_kind[kind].append(root / out.def_path)
    return StageInfo(stage.name, values, *(tuple(by_kind[k]) for k in ("metrics", "plots", "outs")),
                     cmd=stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd or []))


def pipeline_stages(root: str | Path = ".", targets: Sequence[str] | None = None) -> list[StageInfo]:
    """Stages in dependency order; with ``targets`` only those and everything upstream of them
    (a target may name a matrix group, e.g. ``sft``)."""
    import networkx as nx
    from dvc.repo import Repo

    root = Path(root).resolve()
    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        order = list(reversed(list(nx.topological_sort(graph))))
        if targets:
            chosen = {s for s in order if any(s.name == t or s.name.startswith(f"{t}@") for t in targets)}
            if not chosen:
                names = ", ".join(s.name for s in order)
                raise ValueError(f"no stage matches {list(targets)}; stages: {names}")
            upstream = set().union(*(nx.descendants(graph, s) for s in chosen))
            order = [s for s in order if s in chosen | upstream]
        cache: dict[str, dict] = {}
        chosen_names = {s.name for s in order}
        return [dataclasses.replace(_stage_info(s, root, cache),
                                    upstream=tuple(sorted(u.name for u in graph.successors(s) if u.name in chosen_names)))
                for s in order]
