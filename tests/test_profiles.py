"""Profiles (beyondlm/profiles.py): params written over params.yaml loudly, data linked under inputs/."""

from pathlib import Path

import pytest

from beyondlm.config import ConfigError, load_section, load_yaml
from beyondlm.data.config import PrepareConfig
from beyondlm.oracle import OracleConfig
from beyondlm.profiles import apply_profile, merge

ROOT = Path(__file__).resolve().parents[1]


def _project(tmp_path: Path, profile: str) -> Path:
    root = tmp_path / "repo"
    (root / "profiles").mkdir(parents=True)
    (root / "params.yaml").write_text("a:\n  b: 1            # the b knob\n  c: null\n  d: \"no\"\n")
    (root / "profiles" / "p.yaml").write_text(profile)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "x.jsonl").write_text("{}\n")
    return root


def test_apply_writes_params_keeps_comments_and_links_relative(tmp_path):
    root = _project(tmp_path, "links:\n  inputs/s/x.jsonl: ../shared/x.jsonl\nparams:\n  a: {b: 2}\n")
    links, changed = apply_profile("p", root)
    assert links == ["inputs/s/x.jsonl"] and changed == ["a.b"]
    text = (root / "params.yaml").read_text()
    assert "b: 2" in text and "# the b knob" in text and "c: null" in text and 'd: "no"' in text
    link = root / "inputs" / "s" / "x.jsonl"
    assert link.is_symlink() and not Path(link.readlink()).is_absolute() and link.read_text() == "{}\n"
    assert apply_profile("p", root) == (links, [])  # idempotent


@pytest.mark.parametrize("profile, match", [
    ("params:\n  a: {typo: 2}\n", "'a.typo' is not in params.yaml"),
    ("links:\n  inputs/s/y: ../shared/missing.jsonl\n", "missing.jsonl does not exist"),
    ("extra: 1\n", "unknown top-level keys"),
])
def test_profile_errors_are_one_line(tmp_path, profile, match):
    root = _project(tmp_path, profile)
    with pytest.raises(ConfigError, match=match) as err:
        apply_profile("p", root)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="use one of p"):
        apply_profile("nope", root)


def test_imdb_profile_fits_params_yaml_and_loads():
    params = load_yaml(ROOT / "params.yaml")
    merge(params, load_yaml(ROOT / "profiles" / "imdb.yaml")["params"])  # every key exists
    prep = load_section(PrepareConfig, params["prepare"], "prepare")
    oracle = load_section(OracleConfig, params["oracle"], "oracle")
    assert prep.source == "local" and prep.prompt_len == 10 and prep.tokenizer.kind == "bpe"
    assert prep.n_train == 3000 and prep.local.valid is None and prep.local.test is None  # carved: a random cap
    assert oracle.kind == "classifier" and oracle.classifier.train.startswith("inputs/oracle/")
