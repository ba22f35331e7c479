"""pipelines.validate: every selected stage's params are checked before anything runs."""

import shutil
from pathlib import Path

import pytest
import yaml

from beyondlm.config import ConfigError
from beyondlm.dvcgraph import pipeline_stages
from pipelines.validate import validate_stages

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "inputs", tmp_path / "inputs")
    (tmp_path / ".dvc").mkdir()  # a DVC root (without git) for pipeline_stages
    (tmp_path / ".dvc/config").write_text("[core]\n    no_scm = True\n")
    return tmp_path


def _edit(project: Path, **sections) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    for name, update in sections.items():
        params[name].update(update)
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def test_the_repo_params_pass_for_every_stage():
    validate_stages(pipeline_stages(ROOT), ROOT)


def test_bad_keys_in_any_section_stop_the_flow_naming_each_and_its_stages(project):
    _edit(project, vq={"train": {"max_stepz": 3}}, align={"hyperparams": {"dpo_pref": {"beta": -1.0}}})
    stages = pipeline_stages(project)
    with pytest.raises(ConfigError) as err:
        validate_stages(stages, project)
    text = str(err.value)
    assert text.startswith("nothing was run; fix params.yaml first:")
    assert "vq.train.max_stepz" in text and "[stops: vq]" in text
    align = next(line for line in text.splitlines() if "align.hyperparams.dpo_pref.beta" in line)
    assert "align@dpo_pref" in align and "best_of_n" in align  # the section stops every stage reading it


def test_a_bad_sft_key_is_reported_once_for_all_its_stages(project):
    _edit(project, sft={"train": {"lr": -1.0}})
    with pytest.raises(ConfigError) as err:
        validate_stages(pipeline_stages(project, ["sft"]), project)
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 1 and "'lr'=-1.0" in lines[0] and "sft@mle-0" in lines[0] and "sft@mixce-e0_1-2" in lines[0]
    # emo and tailr-g1 set their own lr (sft.objectives.<variant>.train): their stages are fine
    assert "sft@emo" not in lines[0] and "sft@tailr" not in lines[0]


def test_reproduce_stops_before_running_anything_on_bad_params(project):
    """`python -m pipelines.reproduce` reports every params problem in one message and exits,
    before Prefect starts and before any stage runs (no data/, models/ or dvc.lock appear)."""
    import os
    import subprocess
    import sys

    _edit(project, evaluate={"n_samples": 1}, knnlm={"k": "many"})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "pipelines.reproduce"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "error: nothing was run; fix params.yaml first:" in proc.stderr
    assert "'evaluate.n_samples'=1" in proc.stderr and "knnlm.k" in proc.stderr
    assert not any((project / d).exists() for d in ("data", "models", "dvc.lock"))


def test_a_dispatching_driver_leaves_device_checks_to_the_workers(project):
    """fp16 is refused on this CPU-only machine, unless the stages run elsewhere (a GPU worker):
    then the driver checks every other key and the stage checks its device where it runs."""
    _edit(project, sft={"train": {**yaml.safe_load((project / "params.yaml").read_text())["sft"]["train"],
                                  "mixed_precision": "fp16"}})
    stages = [s for s in pipeline_stages(project) if s.name.startswith("sft@")]
    with pytest.raises(ConfigError, match="'mixed_precision'='fp16' cannot run on this machine's device"):
        validate_stages(stages, project)
    validate_stages(stages, project, device_checks=False)
    with pytest.raises(ConfigError, match="'mixed_precision'='fp16' cannot run"):  # restored after
        validate_stages(stages, project)
