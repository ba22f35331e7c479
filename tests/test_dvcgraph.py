from pathlib import Path

import pytest

from beyondlm.dvcgraph import pipeline_stages

ROOT = Path(__file__).resolve().parents[1]


def test_stage_order_params_and_outputs_come_from_dvc_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # names must not depend on the caller's directory
    stages = pipeline_stages(ROOT)
    names = [s.name for s in stages]
    assert names[0] == "prepare" and names[-1] == "report"
    assert names.index("sft@mle-0") < names.index("evaluate@mle-0")
    sft = stages[names.index("sft@mle-0")]
    assert "sft.lr" in sft.params and "sft.seeds" not in sft.params  # only declared keys
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
