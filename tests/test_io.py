"""beyondlm.io: atomic writes, and metrics that hash the same for the same work."""

import json

import pytest

from beyondlm.io import atomic_path, split_timing, timing_path, write_metrics


def test_timings_leave_the_tracked_metrics_for_an_untracked_sibling_tree(tmp_path):
    metrics = tmp_path / "reports/metrics/sft/mle-s0.json"
    write_metrics(metrics, {"valid": {"loss": 2.5}, "train": {"steps": 10, "wall_s": 3.2, "tokens_per_s": 9e3,
                                                             "resumed_from": None}, "seconds": 1.0})
    assert json.loads(metrics.read_text()) == {"valid": {"loss": 2.5}, "train": {"steps": 10}}
    timing = tmp_path / "reports/timing/sft/mle-s0.json"
    assert timing_path(metrics) == timing
    assert json.loads(timing.read_text()) == {"train": {"wall_s": 3.2, "tokens_per_s": 9e3, "resumed_from": None},
                                              "seconds": 1.0}
    write_metrics(tmp_path / "m.json", {"a": 1})  # nothing to split off: no timing file
    assert not (tmp_path / "m.timing.json").exists() and timing_path(tmp_path / "m.json").name == "m.timing.json"


def test_split_timing_keeps_non_dict_values_and_lists():
    assert split_timing([1, 2]) == ([1, 2], {})
    assert split_timing({"curve": [[1, 2.0]], "x": {"wall_s": 1}}) == ({"curve": [[1, 2.0]], "x": {}}, {"x": {"wall_s": 1}})


def test_a_failed_write_leaves_the_previous_file_and_no_temp(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]
