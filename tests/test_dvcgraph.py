from pathlib import Path

import pytest

from beyondlm.config import ConfigError
from beyondlm.dvcgraph import check_declared_inputs, code_dep_mismatches, import_cycles, code_deps, import_closure, pipeline_stages, write_code_deps

ROOT = Path(__file__).resolve().parents[1]


def test_stage_order_params_and_outputs_come_from_dvc_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # names must not depend on the caller's directory
    stages = pipeline_stages(ROOT)
    names = [s.name for s in stages]
    assert names[0] == "prepare" and names[-1] == "report"
    upstream = {s.name: s.upstream for s in stages}  # the report reads every stage's results
    above, todo = set(), ["report"]
    while todo:
        fresh = set(upstream[todo.pop()]) - above
        above |= fresh
        todo += fresh
    assert set(names) - above == {"report"}
    assert names.index("sft@mle-0") < names.index("evaluate@mle-0")
    sft = stages[names.index("sft@mle-0")]
    assert "sft.train" in sft.params and "sft.seeds" not in sft.params  # only declared keys
    assert ROOT / "reports/metrics/sft/mle-s0.json" in sft.metrics
    assert ROOT / "models/sft/mle-s0" in sft.outs


def test_targets_select_upstream_only():
    names = [s.name for s in pipeline_stages(ROOT, ["sft"])]
    assert names[0] == "prepare" and all(n == "prepare" or n.startswith("sft@") for n in names)
    with pytest.raises(ValueError, match="no stage matches"):
        pipeline_stages(ROOT, ["nope"])


def test_every_declared_param_exists_in_params_yaml():
    """DVC refuses to run a stage whose declared key is missing; keys are dotted paths, so a
    variant name with a dot (`tailr-g0.1`) silently becomes a deeper, missing path."""
    missing = {s.name: k for s in pipeline_stages(ROOT) for k, v in s.params.items() if v is None}
    assert not missing, f"declared params missing from params.yaml: {missing}"


def test_every_stage_declares_exactly_the_library_code_it_imports():
    """Editing a library file must rerun every stage that runs it, and only those."""
    assert not code_dep_mismatches(ROOT), "fix: python -m beyondlm.dvcgraph --write"


def _package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_import_closure_follows_relative_lazy_and_submodule_imports(tmp_path):
    _package(tmp_path, {
        "lib/__init__.py": "",
        "lib/a.py": "from lib.sub import b\n",                       # a submodule by from-import
        "lib/sub/__init__.py": "from .c import f\n",                  # relative, in a package init
        "lib/sub/b.py": "def g():\n    from ..d import h\n",          # lazy and two levels up
        "lib/sub/c.py": "import os\nf = 1\n",
        "lib/d.py": "h = 2\n",
        "lib/unused.py": "",
        "stages/s.py": "import json\nfrom lib.a import x\n",
    })
    got = {p.as_posix() for p in import_closure("stages.s", tmp_path, package="lib")}
    assert got == {"lib/__init__.py", "lib/a.py", "lib/sub/__init__.py", "lib/sub/b.py", "lib/sub/c.py", "lib/d.py"}
    assert code_deps({Path(p) for p in got}, tmp_path) == ["lib/__init__.py", "lib/a.py", "lib/d.py", "lib/sub"]


def test_the_check_names_a_missing_and_a_stale_dep_and_the_writer_fixes_both(tmp_path):
    _package(tmp_path, {
        "beyondlm/__init__.py": "", "beyondlm/a.py": "", "beyondlm/b.py": "",
        "stages/s.py": "from beyondlm import a\n",
        "dvc.yaml": "stages:\n  s:\n    cmd: python -m stages.s\n    deps:\n      - stages/s.py\n"
                    "      - beyondlm/b.py   # stale\n      - data/in\n    outs:\n      - out\n",
    })
    bad = code_dep_mismatches(tmp_path)["s"]
    assert bad["undeclared"] == ["beyondlm/__init__.py", "beyondlm/a.py"] and bad["not imported"] == ["beyondlm/b.py"]
    assert write_code_deps(tmp_path) == ["s"]
    assert not code_dep_mismatches(tmp_path)
    text = (tmp_path / "dvc.yaml").read_text()
    assert "      - beyondlm/a.py\n      - data/in\n" in text and "b.py" not in text


def _stage_project(tmp_path: Path, **local) -> Path:
    """A project dir with this repo's dvc.yaml and params.yaml, prepare reading local files."""
    import shutil

    import yaml

    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"].update(source="local", n_train=40, n_valid=5, n_test=5, n_prompts=4)
    params["prepare"]["local"].update(local)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "inputs/prepare").mkdir(parents=True)
    return tmp_path


def _run_prepare(project: Path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_param_naming_a_file_outside_the_stage_deps_stops_the_stage(tmp_path):
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text("".join(f'{{"text": "text number {i} is here"}}\n' for i in range(60)))
    project = _stage_project(tmp_path / "p", train=str(outside))
    proc = _run_prepare(project)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"prepare.local.train = '{outside}' is read by stage 'prepare' but is not one of its deps" in proc.stderr
    assert "inputs/prepare/" in proc.stderr
    assert not (project / "data").exists()  # stopped before writing anything

    (project / "inputs/prepare/texts.jsonl").symlink_to(outside)  # a link under the declared dir
    edit = project / "params.yaml"
    edit.write_text(edit.read_text().replace(str(outside), "inputs/prepare/texts.jsonl"))
    proc = _run_prepare(project)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (project / "data/prepared").is_dir()


def test_unset_paths_and_hub_ids_need_no_declaration(tmp_path):
    project = _stage_project(tmp_path)
    check_declared_inputs("prepare", {"prepare.local.train": None, "prepare.tokenizer.name_or_path": "gpt2"}, project)
    check_declared_inputs("sft@mle-0", {"sft.model.name_or_path": None}, project)


def test_a_local_reward_model_must_lie_under_inputs_reward(tmp_path):
    project = _stage_project(tmp_path / "p")
    outside = tmp_path / "rm"
    outside.mkdir()
    with pytest.raises(ConfigError, match=r"reward.model.name_or_path = .* is not one of its deps .* inputs/reward/"):
        check_declared_inputs("reward", {"reward.model.name_or_path": str(outside)}, project)
    (project / "inputs/reward").mkdir()
    (project / "inputs/reward/rm").symlink_to(outside)
    check_declared_inputs("reward", {"reward.model.name_or_path": "inputs/reward/rm"}, project)


def test_the_library_imports_only_downward():
    """No two library modules import each other, directly or through others (config is the base
    layer; data/config.py holds prepare's section, so config no longer imports data)."""
    assert import_cycles(ROOT) == []


def test_import_cycles_finds_a_lazy_cycle(tmp_path):
    _package(tmp_path, {"lib/__init__.py": "", "lib/a.py": "from lib import b\n",
                        "lib/b.py": "def f():\n    from lib.a import g\n"})
    assert import_cycles(tmp_path, package="lib") == [["lib.a", "lib.b"]]
