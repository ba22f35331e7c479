"""The HH preferences profile (profiles/hh.yaml): intervals, the weak-judge warning, implicit-reward
accuracy, held-out dialogue prompts for evaluation, and a report without an oracle."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from beyondlm.align.config import AlignConfig, EvalConfig, PreferencesConfig, PrefFileConfig, RewardConfig, SampleConfig
from beyondlm.align.data import read_preference_file
from beyondlm.align.evaluate import implicit_reward_accuracy
from beyondlm.config import ConfigError, ModelConfig, TrainConfig, load_section, load_yaml
from beyondlm.data.config import PrepareConfig
from beyondlm.intervals import proportion, weak_judge_warning, wilson
from beyondlm.oracle import OracleConfig, load_oracle, write_none_marker
from beyondlm.profiles import merge

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "preferences" / "hh_harmless_base_test.jsonl.gz"


def test_wilson_interval_by_hand():
    # p̂ = 0.5, n = 100: centre 0.5, half-width z/(1 + z²/n)·sqrt(p̂(1−p̂)/n + z²/(4n²))
    z = 1.959963984540054
    half = z / (1 + z * z / 100) * np.sqrt(0.25 / 100 + z * z / 40000)
    assert wilson(0.5, 100) == pytest.approx((0.5 - half, 0.5 + half)) and half == pytest.approx(0.09617, abs=1e-5)
    # 0 of 10: [0, z²/(n + z²)] = [0, 0.2775], where the Wald interval collapses to a point
    assert wilson(0.0, 10) == pytest.approx((0.0, z * z / (10 + z * z))) and wilson(0.0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    # the reward model: 0.567 on 60 pairs
    low, high = wilson(34 / 60, 60)
    assert (round(low, 3), round(high, 3)) == (0.441, 0.684)
    assert proportion(0.5, 100)["n"] == 100 and np.isnan(wilson(0.5, 0)[0])
    with pytest.raises(ValueError):
        wilson(1.2, 10)


def test_weak_judge_warning_below_0_6():
    line = weak_judge_warning(0.567, 0.441, 0.684, 60)
    assert line.startswith("**Warning") and "below 0.6" in line and "includes chance" in line and "60 pairs" in line
    assert "above chance" in weak_judge_warning(0.58, 0.55, 0.61, 2000)
    assert weak_judge_warning(0.6, 0.5, 0.7, 60) is None and weak_judge_warning(0.9, 0.8, 0.95, 60) is None
    assert weak_judge_warning(None, 0, 1, 0) is None


def test_implicit_reward_accuracy_hand_case_and_ties():
    ref_c, ref_r = np.array([-1.5, -2.0, -3.0, -4.0]), np.array([-1.5, -2.0, -2.0, -4.0])
    pol_c, pol_r = np.array([-1.0, -2.0, -3.0, -3.0]), np.array([-2.0, -2.0, -1.0, -5.0])
    # margins β·[(pc − rc) − (pr − rr)]: 0.1·(0.5 + 0.5) > 0, 0 (tie: ½), 0.1·(0 − 1) < 0, 0.1·(1 + 1) > 0
    assert implicit_reward_accuracy(pol_c, pol_r, ref_c, ref_r, beta=0.1) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    # the policy equal to the reference ties on every pair: 0.5, whatever β
    assert implicit_reward_accuracy(ref_c, ref_r, ref_c, ref_r, beta=2.0) == 0.5
    with pytest.raises(ValueError):
        implicit_reward_accuracy(pol_c, pol_r, ref_c, ref_r, beta=0.0)


def test_hh_profile_fits_params_yaml_and_loads():
    params = load_yaml(ROOT / "params.yaml")
    merge(params, load_yaml(ROOT / "profiles" / "hh.yaml")["params"])  # every key exists
    prep = load_section(PrepareConfig, params["prepare"], "prepare")
    assert prep.source == "local" and prep.local.text_column == "chosen" and prep.tokenizer.kind == "bpe"
    assert load_section(OracleConfig, params["oracle"], "oracle").kind == "none"
    align = load_section(AlignConfig, params["align"], "align")
    assert align.eval.prompts == "pairs" and set(align.methods) == {"dpo_pref", "exo_pref"}
    assert params["sft"]["model"]["n_positions"] >= prep.max_len + 1
    assert params["preferences"]["file"]["path"].startswith("inputs/preferences/")
    with pytest.raises(ConfigError, match=r"'align.eval.prompts'='dialogue' is not one of test, pairs") as err:
        EvalConfig(prompts="dialogue")
    assert "\n" not in str(err.value)


def test_oracle_kind_none_gives_no_r_star(tmp_path):
    write_none_marker(tmp_path / "oracle")
    assert json.loads((tmp_path / "oracle" / "oracle.json").read_text())["kind"] == "none"
    assert load_oracle(tmp_path / "oracle", prep=None) is None  # prep is not consulted


@pytest.mark.skipif(not HH.exists(), reason=f"{HH} absent (../shared/data, data/README.md)")
def test_hh_eval_prompts_are_held_out_dialogue_prompts(tmp_path):
    """The preferences stage on 80 HH pairs, then align.eval.prompts=pairs: every evaluation prompt
    is a held-out pair's prompt and ends at "Assistant:"; a policy equal to π_sft scores 0.5."""
    from beyondlm.align.experiment import evaluation_prompts, heldout_implicit_accuracy, run_preferences
    from beyondlm.align.store import load_pairs
    from beyondlm.data.tokenization import train_bpe
    from beyondlm.models import build_model

    triples = read_preference_file(HH, prompt_column=None, limit=80)
    tok = train_bpe([t for tr in triples for t in tr], vocab_size=400)
    torch.manual_seed(0)
    sft = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, n_positions=72), tok).eval()
    cfg = PreferencesConfig(source="file", valid_fraction=0.25, file=PrefFileConfig(path=str(HH), limit=80))
    metrics = run_preferences(cfg, tmp_path / "none.parquet", tmp_path / "pairs.parquet", sft=sft, tokenizer=tok,
                              max_len=64)
    assert metrics["n_valid"] == 20 and metrics["n_train"] + metrics["n_valid"] <= 80
    prompts, max_new = evaluation_prompts(EvalConfig(prompts="pairs"), [], tmp_path / "pairs.parquet",
                                          max_len=64, prompt_len=8)
    valid = load_pairs(tmp_path / "pairs.parquet", "valid")
    assert max_new == 32 and len(prompts) == len({tuple(p.prompt_ids) for p in valid}) > 0
    for p in prompts:
        assert p[0] == tok.bos_token_id and len(p) <= 33
        assert tok.decode(p[1:]).rstrip().endswith("Assistant:")
    acc = heldout_implicit_accuracy(sft, sft, valid, beta=0.1, pad_id=tok.pad_token_id, batch_size=8)
    assert acc["value"] == 0.5 and acc["n"] == 20 and acc["low"] < 0.5 < acc["high"]
    with pytest.raises(ConfigError, match="align.eval.prompts"):
        evaluation_prompts(EvalConfig(prompts="pairs"), [], _only_train(tmp_path), max_len=64, prompt_len=8)


@pytest.mark.skipif(not HH.exists(), reason=f"{HH} absent (../shared/data, data/README.md)")
def test_hh_held_out_pairs_are_the_prepared_held_out_dialogues(tmp_path):
    """valid_split=prepared: a pair is held out iff its chosen dialogue (cleaned as prepare cleans)
    is a prepared valid/test text, so SFT on the prepared train split never saw a held-out reply."""
    from beyondlm.align.experiment import run_preferences
    from beyondlm.align.store import load_pairs
    from beyondlm.data.sources import clean_text, load_local
    from beyondlm.data.config import LocalSourceConfig
    from beyondlm.data.tokenization import train_bpe
    from beyondlm.models import build_model

    texts = load_local(LocalSourceConfig(train=str(HH), text_column="chosen", valid_fraction=0.1, test_fraction=0.1), 0)
    triples = read_preference_file(HH, prompt_column=None, limit=60)
    tok = train_bpe([t for tr in triples for t in tr], vocab_size=400)
    torch.manual_seed(0)
    sft = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, n_positions=72), tok).eval()
    cfg = PreferencesConfig(source="file", valid_split="prepared", file=PrefFileConfig(path=str(HH), limit=60))
    heldout = set(texts["valid"]) | set(texts["test"])
    metrics = run_preferences(cfg, tmp_path / "none.parquet", tmp_path / "pairs.parquet", sft=sft, tokenizer=tok,
                              max_len=64, heldout_texts=heldout)
    expected = sum(clean_text(p + c) in heldout for p, c, r in triples)
    assert metrics["valid_split"] == "prepared" and 0 < metrics["n_valid"] == expected < 60
    train_texts = set(texts["train"])
    for split, inside in (("valid", heldout), ("train", train_texts)):
        for pair in load_pairs(tmp_path / "pairs.parquet", split):
            prompt = tok.decode(pair.prompt_ids[1:])
            assert any(prompt.strip()[-40:] in t for t in inside)  # the prompt keeps its last tokens
    with pytest.raises(ConfigError, match="no pair's chosen text is a prepared valid/test text"):
        run_preferences(cfg, tmp_path / "none.parquet", tmp_path / "p2.parquet", sft=sft, tokenizer=tok, max_len=64,
                        heldout_texts={"nothing like a dialogue"})
    with pytest.raises(ConfigError, match="valid_split=prepared needs preferences.source=file"):
        PreferencesConfig(source="samples", valid_split="prepared")


def _only_train(tmp_path: Path) -> Path:
    from beyondlm.align.store import load_pairs, save_pairs

    pairs = load_pairs(tmp_path / "pairs.parquet", "train")
    save_pairs(tmp_path / "train_only.parquet", pairs, ["train"] * len(pairs))
    return tmp_path / "train_only.parquet"


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _rm_run(scale: float, implicit: float) -> dict:
    evals = [{"step": s, "kl": 0.1 * s, "rm_reward": scale * s / 10, "win_vs_sft/rm": 0.5 + 0.01 * s,
              "win_vs_chosen/rm": 0.4, "length": 30.0} for s in (0, 10, 20)]
    conv = {"converged": True, "rel_improvement": 0.0, "best_step": 20, "best_loss": 1.0, "final_loss": 1.0,
            "eval_steps": [0, 10, 20], "eval_losses": [1.0, 1.0, 1.0]}
    return {"evals": evals, "convergence": conv, "implicit_accuracy": proportion(implicit, 200)}


def test_report_without_an_oracle(tmp_path):
    """No r* columns, claims or equal-KL tables; the frontier is the RM's; the RM warning, intervals
    on win rates and the implicit-accuracy column are there."""
    from beyondlm.report.align import align_section, claims
    from beyondlm.report.build import _data_section
    from beyondlm.report.convergence import Verdicts, collect

    m = tmp_path / "metrics"
    for method, scale, implicit in (("dpo_pref", 1.0, 0.55), ("exo_pref", 2.0, 0.6)):
        run = _rm_run(scale, implicit)
        _write(m / "align" / "method" / f"{method}.json", {"method": method, "sft": run["evals"][0], "runs": {"s0": run},
                                                          "n_eval_prompts": 64, "eval_prompts": "pairs"})
    _write(m / "align" / "best_of_n.json", {"n_prompts": 64, "rows": [
        {"N": n, "kl": kl, "rm_reward": kl, "win_vs_sft/rm": 0.6} for n, kl in ((1, 0.0), (4, 0.636))]})
    _write(m / "align" / "reward.json", {"valid_accuracy": 0.567, "n_valid_pairs": 60, "train_accuracy": 0.7,
                                         "valid_accuracy_interval": proportion(0.567, 60)})
    text = "\n".join(align_section(m, tmp_path))
    assert "oracle r*" not in text.split("| method |")[1] and "(oracle)" not in text.split("| method |")[1]
    assert "No oracle (oracle.kind: none)" in text and "RM reward; no oracle vs KL" in text
    assert "held-out pair accuracy 0.567 [0.441, 0.685] (Wilson score, 95%; 60 pairs" in text
    assert "**Warning: the reward model's held-out pair accuracy is 0.567" in text
    assert "'chosen' = the better of two SFT samples by the RM" in text and "on 64 held-out preference pairs' prompts" in text
    lo, hi = wilson(0.7, 64)
    assert f"| dpo_pref | 1 | 2.00 | 2.00 | 0.700 [{lo:.2f}, {hi:.2f}] | 0.400 [" in text
    assert "| 0.550 [" in text and "| SFT (step 0) |" in text and "0.500 (ties)" in text
    assert "at equal KL" not in text and (tmp_path / "plots" / "report" / "align_frontier.png").exists()
    assert claims(m, Verdicts(collect(m))) == []
    assert "No oracle reward r*" in "\n".join(_data_section({"train": {}}, {"kind": "none"}))


@pytest.mark.skipif(not HH.exists(), reason=f"{HH} absent (../shared/data, data/README.md)")
def test_hh_profile_applies_and_every_stage_validates(tmp_path):
    """`make profile PROFILE=hh` on a copy of the project: the links resolve and every stage's
    params load (what the flow checks before it runs anything)."""
    from beyondlm.dvcgraph import pipeline_stages
    from beyondlm.profiles import apply_profile
    from pipelines.validate import validate_stages

    root = tmp_path / "repo"
    (root / "profiles").mkdir(parents=True)
    for name in ("params.yaml", "dvc.yaml", "profiles/hh.yaml"):
        (root / name).write_text((ROOT / name).read_text())
    (root / ".dvc").mkdir()  # a DVC repo without git: pipeline_stages reads dvc.yaml through DVC
    (root / ".dvc" / "config").write_text("[core]\n    no_scm = true\n")
    (tmp_path / "shared").symlink_to(HH.parents[2])
    links, changed = apply_profile("hh", root)
    assert all((root / link).resolve() == HH.resolve() for link in links) and "oracle.kind" in changed
    validate_stages(pipeline_stages(root), root)


@pytest.mark.skipif(not HH.exists(), reason=f"{HH} absent (../shared/data, data/README.md)")
def test_hh_chain_without_an_oracle_feeds_the_report(tmp_path):
    """preferences → samples → reward → align@dpo_pref on 80 HH pairs with no oracle, in process and
    tiny: the metrics have intervals and no r*, and the report's align table is built from them."""
    from beyondlm.align.experiment import evaluation_prompts, run_align, run_preferences, run_reward, run_sample
    from beyondlm.data.tokenization import train_bpe
    from beyondlm.models import build_model, save_model
    from beyondlm.report.align import align_section

    triples = read_preference_file(HH, prompt_column=None, limit=80)
    tok = train_bpe([t for tr in triples for t in tr], vocab_size=400)
    torch.manual_seed(0)
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=16, n_positions=72)
    sft = build_model(tiny, tok).eval()
    save_model(sft, tok, tmp_path / "sft")
    pairs, samples = tmp_path / "pairs.parquet", tmp_path / "samples.parquet"
    run_preferences(PreferencesConfig(source="file", valid_fraction=0.25, file=PrefFileConfig(path=str(HH), limit=80)),
                    samples, pairs, sft=sft, tokenizer=tok, max_len=64)
    prompts, max_new = evaluation_prompts(EvalConfig(prompts="pairs"), [], pairs, max_len=64, prompt_len=8)
    run_sample(SampleConfig(K=2, n_prompts=4), sft, tok, prompts, max_new_tokens=8, oracle=None, out=samples)
    small = dict(warmup_steps=1, ckpt_every=2, group_by_length=False)
    rm, rm_metrics = run_reward(RewardConfig(model=tiny, train=TrainConfig(lr=3e-3, batch_size=8, max_steps=3, **small)),
                                pairs, samples, tok, out_dir=tmp_path / "rm")
    iv = rm_metrics["valid_accuracy_interval"]
    assert iv["n"] == 20 and iv["low"] <= rm_metrics["valid_accuracy"] <= iv["high"] and "oracle_pearson" not in rm_metrics
    cfg = AlignConfig(methods=["dpo_pref"], seeds=[0], eval_every=2, eval=EvalConfig(n_prompts=6, batch_size=16, prompts="pairs"),
                      train=TrainConfig(lr=1e-3, batch_size=4, max_steps=2, **small))
    result = run_align("dpo_pref", cfg, sft_dir=tmp_path / "sft", reward_model=rm, tokenizer=tok, oracle=None,
                       samples=samples, pairs=pairs, test_prompts=prompts, max_new_tokens=max_new,
                       out_dir=tmp_path / "align", ckpt_dir=tmp_path / "ckpt")
    run = result["runs"]["s0"]
    assert result["eval_prompts"] == "pairs" and result["n_eval_prompts"] == 6
    assert all("oracle_reward" not in e and 0 <= e["win_vs_sft/rm"] <= 1 for e in run["evals"])
    assert run["implicit_accuracy"]["n"] == 20 and 0 <= run["implicit_accuracy"]["value"] <= 1
    m = tmp_path / "reports" / "metrics"
    _write(m / "align" / "method" / "dpo_pref.json", result)
    _write(m / "align" / "reward.json", rm_metrics)
    text = "\n".join(align_section(m, tmp_path / "reports"))
    header = next(line for line in text.splitlines() if line.startswith("| method |"))
    assert "oracle" not in header and "win vs SFT (RM)" in header and "implicit acc." in header
    assert "No oracle (oracle.kind: none)" in text and "on 6 held-out preference pairs' prompts" in text


def test_implicit_reward_methods_are_pair_rows_of_the_loss_table_with_that_hyperparameter():
    """IMPLICIT_REWARD is a hand list beside PREFERENCE_LOSSES: each entry must be a pair row whose
    defaults hold the named scale, and every reference-based pair row except SimPO must be listed."""
    from beyondlm.align.experiment import IMPLICIT_REWARD
    from beyondlm.objectives.preference import PREFERENCE_LOSSES

    for method, key in IMPLICIT_REWARD.items():
        row = PREFERENCE_LOSSES[method]
        assert row.kind == "pair" and key in row.defaults, (method, key)
    pair_rows = {name for name, row in PREFERENCE_LOSSES.items() if row.kind == "pair"}
    assert pair_rows - set(IMPLICIT_REWARD) == {"simpo"}  # reference-free: no log π/π_ref margin
