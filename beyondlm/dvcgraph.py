"""Read the DVC stage graph: stage order and each stage's declared params and outputs.

The Prefect flows run stages in this order and mirror exactly what each stage declares into
MLflow; nothing here re-declares dependencies (dvc.yaml stays the one source of truth).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence


from beyondlm.config import ConfigError, load_yaml


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


# --- code deps: what a stage's module imports from the library ---------------------------------

def _module_file(root: Path, dotted: str) -> Path | None:
    path = root.joinpath(*dotted.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported(file: Path, root: Path, package: str) -> set[str]:
    """Dotted names of ``package`` modules that ``file`` imports anywhere (lazy imports too);
    ``from a.b import c`` yields ``a.b.c`` as well, which counts when ``c`` is a submodule."""
    import ast

    rel = file.relative_to(root).with_suffix("")
    here = list(rel.parts[:-1])  # the package a relative import starts from (a/b/c.py and a/b/__init__.py: a.b)
    names: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package, one level up per extra dot
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {n for n in names if n == package or n.startswith(package + ".")}


def import_closure(module: str, root: str | Path = ".", package: str = "beyondlm") -> set[Path]:
    """Source files of ``package`` (relative to ``root``) that importing ``module`` executes:
    every module it imports, directly or through others, with the packages' ``__init__.py``."""
    root = Path(root).resolve()
    seen: set[Path] = set()
    todo = [module]
    while todo:
        dotted = todo.pop()
        parts = dotted.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ too
            file = _module_file(root, ".".join(parts[:i]))
            if file is None or file in seen:
                continue
            seen.add(file)
            todo += _imported(file, root, package)
    return {f.relative_to(root) for f in seen if f.relative_to(root).parts[0] == package}


def import_cycles(root: str | Path = ".", package: str = "beyondlm") -> list[list[str]]:
    """Cycles in the import graph of ``package``'s modules (lazy imports count): a library whose
    layers import only downward has none."""
    import networkx as nx

    root = Path(root).resolve()
    graph = nx.DiGraph()
    for file in (root / package).rglob("*.py"):
        name = ".".join(file.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        graph.add_edges_from((name, dep) for dep in _imported(file, root, package)
                             if dep != name and _module_file(root, dep) is not None)
    return [sorted(c) for c in nx.simple_cycles(graph)]


def declared_code(deps: Sequence[str], root: str | Path = ".", package: str = "beyondlm") -> set[Path]:
    """The ``package`` source files a stage's declared deps cover (a directory covers its .py files)."""
    root = Path(root).resolve()
    files: set[Path] = set()
    for dep in map(Path, deps):
        if dep.parts[:1] != (package,):
            continue
        path = root / dep
        files |= {p.relative_to(root) for p in path.rglob("*.py")} if path.is_dir() else {dep}
    return files


def stage_module(cmd: str) -> str | None:
    """``python -m stages.sft --x ...`` -> ``stages.sft``."""
    words = cmd.split()
    return words[words.index("-m") + 1] if "-m" in words[:-1] else None


def code_deps(closure: set[Path], root: str | Path = ".") -> list[str]:
    """The shortest dep list covering exactly ``closure``: a directory where all its .py files
    are needed, the files otherwise."""
    root = Path(root).resolve()
    deps: list[str] = []

    def cover(d: Path) -> None:
        for child in sorted((root / d).iterdir()):
            rel = child.relative_to(root)
            if child.is_dir() and child.name != "__pycache__":
                inside = {p.relative_to(root) for p in child.rglob("*.py")}
                if inside and inside <= closure:
                    deps.append(rel.as_posix())
                elif inside & closure:
                    cover(rel)
            elif rel in closure:
                deps.append(rel.as_posix())

    cover(Path(next(iter(closure)).parts[0])) if closure else None
    return deps


def code_dep_mismatches(root: str | Path = ".") -> dict[str, dict[str, list[str]]]:
    """Per stage (definition name): library files imported but not declared, and declared but
    not imported. Empty when every stage's code deps equal its import closure."""
    root = Path(root).resolve()
    raw = load_yaml(root / "dvc.yaml")["stages"]
    out: dict[str, dict[str, list[str]]] = {}
    for name, stage in raw.items():
        stage = stage.get("do", stage)  # foreach stages nest the definition under `do`
        module = stage_module(stage["cmd"])
        if module is None:
            continue
        deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
        need = import_closure(module, root)
        have = declared_code(deps, root)
        missing, extra = sorted(map(str, need - have)), sorted(map(str, have - need))
        own = f"{module.replace('.', '/')}.py"
        if own not in deps:
            missing.insert(0, own)
        if missing or extra:
            out[name] = {"undeclared": missing, "not imported": extra, "want": code_deps(need, root)}
    return out


def write_code_deps(root: str | Path = ".") -> list[str]:
    """Rewrite each stage's code deps in dvc.yaml to its import closure (comments, data deps and
    order of the rest kept); the names of the stages changed."""
    from ruamel.yaml import YAML

    root = Path(root).resolve()
    yml = YAML()
    yml.width = 4096
    yml.indent(mapping=2, sequence=4, offset=2)  # the file's own layout
    doc = yml.load((root / "dvc.yaml").read_text())
    changed = []
    for name, stage in doc["stages"].items():
        stage = stage.get("do", stage)
        module = stage_module(stage["cmd"])
        if module is None:
            continue
        own = f"{module.replace('.', '/')}.py"
        code = [own, *code_deps(import_closure(module, root), root)]
        deps = stage.get("deps", [])
        data = [d for d in deps if not (isinstance(d, str) and d.split("/")[0] in ("beyondlm", "stages"))]
        if [*code, *data] != list(deps):
            deps.clear()
            deps.extend([*code, *data])
            changed.append(name)
    if changed:
        from beyondlm.io import atomic_path

        with atomic_path(root / "dvc.yaml") as tmp, tmp.open("w") as f:
            yml.dump(doc, f)
    return changed


# --- data deps: files a stage reads because a param names them ------------------------------

def _interpolate(text: str, params: dict) -> str | None:
    """``${a.b}`` from params.yaml; None when a value is missing (``${item.x}``, a null)."""
    import re

    def value(m: "re.Match") -> str:
        v = _lookup(params, m.group(1))
        if v is None:
            raise KeyError(m.group(1))
        return str(v)

    try:
        return re.sub(r"\$\{\s*([\w.-]+)\s*\}", value, text)
    except KeyError:
        return None


def check_declared_inputs(stage: str, paths: Mapping[str, str | None], root: str | Path = ".") -> None:
    """Raise ConfigError unless every local file or directory named by a param in ``paths``
    (``{"prepare.local.train": "x.jsonl"}``; None and hub ids are skipped) lies inside one of
    ``stage``'s declared deps: DVC reruns a stage only when a declared dep changes."""
    import os

    root = Path(root).resolve()
    definition = load_yaml(root / "dvc.yaml")["stages"][stage.split("@")[0]]
    params = load_yaml(root / "params.yaml")
    deps = [_interpolate(d if isinstance(d, str) else next(iter(d)), params)
            for d in definition.get("do", definition).get("deps", [])]
    declared = [os.path.abspath(root / d) for d in deps if d]
    for key, value in paths.items():
        if not value or not (root / value).exists():
            continue  # unset, or not a local path (a hub id): nothing for DVC to hash
        path = os.path.abspath(root / value)  # links are kept: a link under a declared dir is fine
        if not any(path == d or path.startswith(d + os.sep) for d in declared):
            raise ConfigError(
                f"params.yaml: {key} = {value!r} is read by stage {stage!r} but is not one of its deps in "
                f"dvc.yaml, so DVC would not rerun the stage when it changes. Fix: put the file (or a "
                f"link to it) under inputs/{stage.split('@')[0]}/, which the stage declares")


def main() -> None:
    """``python -m beyondlm.dvcgraph [--write]``: check (or rewrite) the stages' code deps."""
    import argparse
    import sys

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps to the import closures")
    if p.parse_args().write:
        print("rewrote the code deps of:", ", ".join(write_code_deps()) or "nothing (all match)")
        return
    bad = code_dep_mismatches()
    for name, diff in bad.items():
        print(f"{name}: undeclared {diff['undeclared']}, not imported {diff['not imported']}")
    if bad:
        sys.exit("code deps differ from the imports; fix: python -m beyondlm.dvcgraph --write")


if __name__ == "__main__":
    main()
