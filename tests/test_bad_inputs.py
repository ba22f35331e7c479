"""Every broken input ends in one line naming the file and the fix, and leaves no half-written output.

Each case breaks one input of a small complete project (prepared synthetic data, a tiny model,
previous outputs) and runs a real stage entry point, in-process through ``cli.run`` or as
``python -m stages.<x>``: exit 2, exactly one ``error:`` line on stderr naming the file and the
fix, no traceback, and every file of the project byte-for-byte as before (no output written or
half-written, no ``.<name>.*.tmp`` left). A bad resume checkpoint is no error: training falls back.
"""

from __future__ import annotations

import gzip
import importlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from beyondlm import cli
from beyondlm.inputs import InputError, load_tokenizer
from beyondlm.lookup.knnlm import load_index
from beyondlm.training import Checkpoints
from tests.test_training import _data, _params, _run

ROOT = Path(__file__).resolve().parents[1]
MICRO = {"n_train": 60, "n_valid": 20, "n_test": 20, "max_len": 24, "prompt_len": 3, "n_prompts": 6,
         "synthetic": {"n_topics": 2, "words_per_class": 4, "mean_sentences": 1.5, "max_len": 24}}
PARAMS = {"prepare": {**MICRO, "out_dir": "data/prepared"},
          "sft": {"variants": ["mle"], "seeds": [0], "objectives": {"mle": {}}, "train": {"max_steps": 2, "warmup_steps": 0}},
          "evaluate": {"n_samples": 4, "batch_size": 4}}
MODEL = "models/sft/m"
PREVIOUS = {"reports/metrics/prepare.json": '{"previous": true}\n',
            "reports/metrics/evaluate/m.json": '{"previous": true}\n',
            "reports/samples/m.jsonl": '{"text": "previous"}\n'}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A complete small project: params.yaml, dvc.yaml, data/prepared, a tiny model, old outputs."""
    from beyondlm.config import ModelConfig, load_section
    from beyondlm.data.config import PrepareConfig
    from beyondlm.data.prepare import prepare, write_prepared
    from beyondlm.models import build_model, save_model
    from beyondlm.oracle import write_language_marker

    root = tmp_path_factory.mktemp("project")
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(json.dumps(PARAMS))  # JSON is YAML
    prepared = prepare(load_section(PrepareConfig, MICRO, "prepare"))
    write_prepared(prepared, root / "data/prepared")
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, n_positions=32), prepared.tokenizer)
    save_model(model, prepared.tokenizer, root / MODEL)
    write_language_marker(root / "models/oracle")  # r*: the synthetic language's (the oracle stage's output)
    for rel, text in PREVIOUS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


# ----------------------------------------------------------------------------- ways to break a file
def _set(root: Path, dotted: str, value) -> None:
    params = json.loads((root / "params.yaml").read_text())
    *parents, last = dotted.split(".")
    node = params
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    (root / "params.yaml").write_text(json.dumps(params))


def _write(root: Path, rel: str, data: bytes | str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def _truncate(root: Path, rel: str) -> None:
    data = (root / rel).read_bytes()
    (root / rel).write_bytes(data[: len(data) // 2])


def _huge_header(root: Path, rel: str) -> None:
    """A safetensors header length of 10^12 bytes (SafetensorError: header too large)."""
    data = (root / rel).read_bytes()
    (root / rel).write_bytes(struct.pack("<Q", 10**12) + data[8:])


def _rows(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


TEXTS = [{"text": f"text number {i}"} for i in range(20)]


def _local(name: str, data: bytes | str) -> Callable[[Path], None]:
    """prepare.source=local reading inputs/prepare/<name> (where the stage's declared dep lies)."""
    def breaks(root: Path) -> None:
        _set(root, "prepare.source", "local")
        _set(root, "prepare.local", {"train": f"inputs/prepare/{name}"})
        _write(root, f"inputs/prepare/{name}", data)
    return breaks


def _gz_truncated() -> bytes:
    data = gzip.compress(_rows(TEXTS * 20).encode())
    return data[: len(data) // 2]


def _datastore_meta(root: Path) -> None:
    meta = {"n_keys": 4, "dim": 16, "n_seqs": 1, "model": MODEL, "dtype": "float16", "fingerprint": "x",
            "model_sha": "y"}
    _write(root, "data/datastore/meta.json", json.dumps(meta))
    _write(root, "data/datastore/values.npy", b"\x93NUMPY garbage")
    _write(root, "data/datastore/keys.npy", b"\x93NUMPY garbage")


# ----------------------------------------------------------------------------- the cases
@dataclass(frozen=True)
class Case:
    id: str
    stage: str
    args: tuple[str, ...]
    breaks: Callable[[Path], None]
    names: str  # the file (or params key) the error line must name
    fix: str  # a piece of the fix it must give
    subprocess: bool = False  # run as `python -m stages.<stage>` (slow: a fresh interpreter)


PREPARE = ("prepare", ())
EVALUATE = ("evaluate", ("--model", MODEL, "--oracle", "models/oracle", "--metrics", "reports/metrics/evaluate/m.json",
                         "--samples", "reports/samples/m.jsonl", "--plot", "reports/plots/evaluate/m.tsv"))
SFT = ("sft", ("--variant", "mle", "--seed", "0", "--out", "models/sft/mle-s0", "--ckpt", "models/ckpt/sft/mle-s0",
               "--live", "reports/live/sft/mle-s0", "--metrics", "reports/metrics/sft/mle-s0.json"))
KNNLM = ("knnlm", ("--datastore", "data/datastore", "--index", "data/knnlm/index.faiss",
                   "--metrics", "reports/metrics/knnlm.json", "--plot", "reports/plots/knnlm.tsv"))
PREFERENCES = ("preferences", ("--samples", "data/align/samples.parquet", "--model", MODEL,
                               "--out", "data/align/preferences.parquet", "--metrics", "reports/metrics/pref.json"))
ALIGN = ("align", ("--method", "dpo_pref", *(x for a in ("sft", "reward", "oracle", "samples", "pairs", "out", "ckpt",
                                                          "metrics", "plot") for x in (f"--{a}", f"out/{a}"))))
EBM_EVAL = ("ebm_eval", ("--model", MODEL, "--weights", "models/ebm/weights.json",
                         "--metrics", "reports/metrics/ebm_eval.json", "--plot-dir", "reports/plots/ebm"))
LOCAL_FIX = "set prepare.local.train"
REPRO_PREPARE = "dvc repro prepare"
RESTORE_MODEL = f"dvc checkout --force {MODEL}"


def _other_vocab_model(root: Path) -> None:
    """sft.model.name_or_path: a pretrained model under inputs/sft/ whose own tokenizer is a BPE of other texts."""
    from beyondlm.config import ModelConfig
    from beyondlm.data.tokenization import train_bpe
    from beyondlm.models import build_model, save_model

    tok = train_bpe([f"other words, number {i}" for i in range(40)], 300)
    save_model(build_model(ModelConfig(n_layer=1, n_head=2, n_embd=16, n_positions=32), tok), tok,
               root / "inputs/sft/other")
    _set(root, "sft.model", {"name_or_path": "inputs/sft/other"})


def _pref_file(rows: str) -> Callable[[Path], None]:
    def breaks(root: Path) -> None:
        _set(root, "preferences", {"source": "file", "file": {"path": "inputs/preferences/pairs.jsonl"}})
        _write(root, "inputs/preferences/pairs.jsonl", rows)
    return breaks


CASES = [
    Case("empty-jsonl", *PREPARE, _local("train.jsonl", b""), "train.jsonl: jsonl file is empty", LOCAL_FIX),
    Case("truncated-gz", *PREPARE, _local("train.jsonl.gz", _gz_truncated()), "train.jsonl.gz", LOCAL_FIX,
         subprocess=True),
    Case("not-gzip", *PREPARE, _local("train.jsonl.gz", b"plain text"), "Not a gzipped file", LOCAL_FIX),
    Case("bad-json-line", *PREPARE, _local("train.jsonl", _rows(TEXTS[:2]) + '{"text": "x"\n' + _rows(TEXTS)),
         "train.jsonl: line 3 is not valid JSON", LOCAL_FIX),
    Case("missing-column", *PREPARE, _local("train.jsonl", _rows([{"body": "x"}] * 5)),
         "text_column='text' is not a column of 'inputs/prepare/train.jsonl'", "set prepare.local.text_column"),
    Case("empty-csv", *PREPARE, _local("train.csv", b""), "train.csv: csv file is empty", LOCAL_FIX),
    Case("corrupt-local-parquet", *PREPARE, _local("train.parquet", b"PAR1 not really"),
         "Parquet magic bytes not found", LOCAL_FIX),
    Case("corrupt-split", *EVALUATE, lambda r: _write(r, "data/prepared/test.parquet", b"garbage"),
         "data/prepared/test.parquet: not a readable Parquet split", REPRO_PREPARE),
    Case("missing-prepared-dir", *EVALUATE, lambda r: shutil.rmtree(r / "data/prepared"),
         "data/prepared/test.parquet is missing", REPRO_PREPARE),
    Case("corrupt-language", *EVALUATE, lambda r: _write(r, "data/prepared/language.json", '{"spec": '),
         "data/prepared/language.json: not a readable synthetic language file", REPRO_PREPARE),
    Case("truncated-safetensors", *EVALUATE, lambda r: _truncate(r, f"{MODEL}/model.safetensors"),
         f"{MODEL}/model.safetensors: not a readable safetensors file", RESTORE_MODEL),
    Case("safetensors-header-too-large", *EVALUATE, lambda r: _huge_header(r, f"{MODEL}/model.safetensors"),
         "header too large", RESTORE_MODEL, subprocess=True),
    Case("missing-safetensors", *EVALUATE, lambda r: (r / MODEL / "model.safetensors").unlink(),
         f"{MODEL}: no model.safetensors", RESTORE_MODEL),
    Case("missing-tokenizer-file", *EVALUATE, lambda r: (r / MODEL / "tokenizer.json").unlink(),
         f"{MODEL}/tokenizer.json: tokenizer file does not exist", RESTORE_MODEL),
    Case("corrupt-tokenizer-file", *EVALUATE, lambda r: _write(r, f"{MODEL}/tokenizer.json", '{"version": '),
         f"{MODEL}/tokenizer.json: not a readable tokenizer", RESTORE_MODEL),
    Case("corrupt-datastore-meta", *KNNLM, lambda r: _write(r, "data/datastore/meta.json", "{oops"),
         "data/datastore/meta.json: not a readable JSON file", "dvc repro datastore"),
    Case("corrupt-datastore-keys", *KNNLM, _datastore_meta, "data/datastore/keys.npy: not a readable numpy",
         "dvc repro datastore"),
    Case("corrupt-metrics-json", "report", (), lambda r: _write(r, "reports/metrics/sft/mle-s0.json", '{"steps": 3'),
         "reports/metrics/sft/mle-s0.json: not a readable JSON file", "dvc repro"),
    Case("corrupt-weights-json", *EBM_EVAL, lambda r: _write(r, "models/ebm/weights.json", "[1, 2"),
         "models/ebm/weights.json: not a readable JSON file", "dvc repro"),
    Case("preference-file-lacks-columns", *PREFERENCES, _pref_file(_rows([{"prompt": "p", "good": "a", "bad": "b"}])),
         "pairs.jsonl: missing column(s) chosen, rejected", "chosen_column / rejected_column"),
    Case("preference-file-bad-line", *PREFERENCES, _pref_file('{"chosen": "a", "rejected": "b"}\n{\n'),
         "pairs.jsonl: line 2 is not valid JSON", "set preferences.file.path"),
    Case("bad-align-hyperparameter", *ALIGN, lambda r: _set(r, "align.hyperparams", {"dpo_pref": {"beta": -1}}),
         "'align.hyperparams.dpo_pref.beta'=-1", "allowed range (0, inf)"),
    Case("unknown-align-hyperparameter", *ALIGN, lambda r: _set(r, "align.hyperparams", {"exo_pref": {"eps": 0.1}}),
         "'align.hyperparams.exo_pref.eps'", "allowed: ['beta', 'epsilon']"),
    Case("dotted-variant", *SFT, lambda r: _set(r, "sft.variants", ["mle", "tailr-g0.1"]),
         "variant name 'tailr-g0.1' contains '.'", "e.g. 'tailr-g0_1'", subprocess=True),
    Case("unknown-objective", *SFT, lambda r: _set(r, "sft.objectives", {"mle": {"objective": "mle2"}}),
         "sft.objectives.mle: unknown objective 'mle2'", "allowed: ["),
    # fail fast (issue 13): hub ids offline, missing models, vocabulary mismatch, precision the device cannot run
    Case("hub-dataset-offline", *PREPARE, lambda r: (_set(r, "prepare.source", "hub"),
                                                     _set(r, "prepare.hub", {"name": "org/reviews"})),
         "'prepare.hub.name'='org/reviews' is not a local directory and not in the Hugging Face cache",
         "or set prepare.source: local"),
    Case("hub-tokenizer-offline", *PREPARE, lambda r: _set(r, "prepare.tokenizer", {"name_or_path": "gpt2-nonexistent"}),
         "'prepare.tokenizer.name_or_path'='gpt2-nonexistent' is not a local directory",
         "or set prepare.tokenizer.kind: bpe"),
    Case("missing-model-name", *SFT, lambda r: _set(r, "sft.model", {"name_or_path": "gpt2-nonexistent"}),
         "'sft.model.name_or_path'='gpt2-nonexistent' is not a local directory and not in the Hugging Face cache",
         "or null to train the tiny GPT-2"),
    Case("missing-model-path", *SFT, lambda r: _set(r, "sft.model", {"name_or_path": "inputs/sft/gone/model"}),
         "'sft.model.name_or_path'='inputs/sft/gone/model' does not exist (not a local path)",
         "set it to an existing model directory"),
    Case("pretrained-model-other-vocabulary", *SFT, _other_vocab_model,
         "'sft.model.name_or_path'='inputs/sft/other' was pretrained with another vocabulary",
         "prepare.tokenizer.name_or_path: 'inputs/sft/other'"),
    Case("fp16-on-cpu", *SFT, lambda r: _set(r, "sft.train.mixed_precision", "fp16"),
         "'mixed_precision'='fp16' cannot run on this machine's device (cpu", "in params section 'sft.train'"),
]


@pytest.fixture(autouse=True)
def _no_hub_and_a_cpu(offline_hub, monkeypatch):
    """Hub ids are decided offline against an empty cache; precision is judged for a CPU."""
    monkeypatch.setattr("beyondlm.config.training_device", lambda: "cpu")


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run_stage(case: Case, root: Path, capsys, monkeypatch) -> tuple[int, str]:
    """(exit code, stderr) of the stage's entry point, the way DVC runs it."""
    if case.subprocess:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", f"stages.{case.stage}", *case.args], cwd=root, env=env,
                              capture_output=True, text=True, timeout=300)
        return proc.returncode, proc.stderr
    module = importlib.import_module(f"stages.{case.stage}")
    monkeypatch.setattr(sys, "argv", [case.stage, *case.args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.run(module.main)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(case: Case, base, tmp_path, capsys, monkeypatch):
    root = tmp_path / "project"
    shutil.copytree(base, root)
    monkeypatch.chdir(root)
    case.breaks(root)
    before = _tree(root)
    code, stderr = _run_stage(case, root, capsys, monkeypatch)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in stderr, stderr[-3000:]
    assert len(errors) == 1, stderr[-3000:]
    assert case.names in errors[0] and case.fix in errors[0], errors[0]
    assert _tree(root) == before  # previous outputs intact, nothing new, no temp files


def test_a_missing_model_name_fails_in_well_under_a_second(base, tmp_path, capsys, monkeypatch):
    """Not 30 s of hub retries: the id is judged before any download (the stage's imports aside)."""
    case = next(c for c in CASES if c.id == "missing-model-name")
    root = tmp_path / "project"
    shutil.copytree(base, root)
    monkeypatch.chdir(root)
    case.breaks(root)
    importlib.import_module(f"stages.{case.stage}")
    t0 = time.perf_counter()
    code, stderr = _run_stage(case, root, capsys, monkeypatch)
    assert code == 2 and time.perf_counter() - t0 < 0.5, stderr


# ----------------------------------------------------------------------------- library readers
@pytest.mark.parametrize("data", [b"garbage", b"IxF2" + b"\0" * 10], ids=["garbage", "truncated"])
def test_corrupt_faiss_index(tmp_path, data):
    path = tmp_path / "index.faiss"
    path.write_bytes(data)
    with pytest.raises(InputError) as err:
        load_index(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{path}: not a readable faiss index (") and "dvc repro knnlm" in msg


def test_tokenizer_without_its_config_is_refused(base, tmp_path):
    """transformers would silently build an empty GPT-2 tokenizer from config.json alone."""
    model = tmp_path / "m"
    shutil.copytree(base / MODEL, model)
    (model / "tokenizer_config.json").unlink()
    with pytest.raises(InputError, match=r"tokenizer_config.json: tokenizer file does not exist; rerun"):
        load_tokenizer(model)


def test_a_pretrained_model_needs_the_prepared_vocabulary(base, tmp_path):
    """Its own tokenizer's ids must mean the same tokens in the prepared data (extra tokens after
    them are fine); a model without a tokenizer cannot be checked and is refused."""
    from beyondlm.config import ConfigError
    from beyondlm.models import check_vocabulary

    data_tok = load_tokenizer(base / "data/prepared/tokenizer")
    check_vocabulary(data_tok, str(base / MODEL), "sft.model.name_or_path")  # saved with the prepared tokenizer
    data_tok.add_special_tokens({"pad_token": "<extra-pad>"})
    check_vocabulary(data_tok, str(base / MODEL), "sft.model.name_or_path")
    model = tmp_path / "m"
    shutil.copytree(base / MODEL, model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    with pytest.raises(ConfigError, match=r"'reward.model.name_or_path'=.* has no tokenizer to check the prepared "
                                          r"token ids against; save the model's tokenizer with it"):
        check_vocabulary(data_tok, str(model), "reward.model.name_or_path")


def test_a_model_id_the_hub_does_not_have_is_one_line(base, monkeypatch):
    """Online (the hub check let the id through): the hub's own answer, as one line with the fix."""
    import transformers

    from beyondlm.models import check_vocabulary

    def missing(name, **kwargs):
        raise OSError(f"{name} is not a local folder and is not a valid model identifier listed on "
                      f"'https://huggingface.co/models'")

    data_tok = load_tokenizer(base / MODEL)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", missing)
    with pytest.raises(InputError, match=r"^gpt2-nonexistent: not a readable tokenizer \(gpt2-nonexistent is not a "
                                         r"local folder and is not a valid model identifier .*\); set "
                                         r"sft.model.name_or_path to a model directory or hub id with its tokenizer$"):
        check_vocabulary(data_tok, "gpt2-nonexistent", "sft.model.name_or_path")


# ----------------------------------------------------------------------------- bad resume checkpoints
def _crashed_run(ckpt: Path, cfg, keep_step3: bool) -> None:
    """Train until a crash at step 7 (states at steps 3 and 6; ``keep_step3``: both kept)."""
    class Crash(RuntimeError):
        pass

    def on_step(step):
        if step == 4 and keep_step3:  # save() drops older states: keep a copy of step 3's
            shutil.copytree(ckpt / "step-00000003", ckpt.parent / "kept-3")
        if step == 7:
            raise Crash

    examples, tok, model = _data()
    with pytest.raises(Crash):
        _run(model, examples, tok, cfg, ckpt_dir=ckpt, fingerprint={"run": 1}, on_step=on_step)
    if keep_step3:
        shutil.move(ckpt.parent / "kept-3", ckpt / "step-00000003")


@pytest.mark.parametrize("broken, keep_step3, resumed_from", [
    ("model.safetensors", False, None),  # truncated weights, no earlier state: starts over
    ("optimizer.bin", True, 3),  # truncated optimizer state: back to the step-3 state
    ("loop.json", True, 3),  # corrupt loop record
])
def test_bad_resume_state_falls_back_to_an_exact_run(tmp_path, caplog, broken, keep_step3, resumed_from):
    from beyondlm.config import TrainConfig

    cfg = TrainConfig(lr=1e-2, batch_size=8, max_steps=8, warmup_steps=2, ckpt_every=3, log_every=1)
    examples, tok, model = _data()
    straight, _ = _run(model, examples, tok, cfg)
    ckpt = tmp_path / "ckpt"
    _crashed_run(ckpt, cfg, keep_step3)
    state = ckpt / "step-00000006"
    if broken == "loop.json":
        (state / broken).write_text('{"step": 6, "tok')
    else:
        _truncate(state, broken)
    examples, tok, model = _data()  # a fresh process rebuilds the model
    with caplog.at_level(logging.WARNING, logger="beyondlm.training"):
        resumed, result = _run(model, examples, tok, cfg, ckpt_dir=ckpt, fingerprint={"run": 1})
    assert result.resumed_from == resumed_from and result.steps == 8
    for k, v in _params(resumed).items():
        torch.testing.assert_close(v, _params(straight)[k], rtol=0, atol=0, msg=k)
    warning = next(r.getMessage() for r in caplog.records if "unreadable checkpoint" in r.getMessage())
    assert f"{state / broken}" in warning and "moved aside to step-00000006.bad" in warning


def test_bad_state_is_moved_aside_and_never_picked_again(tmp_path):
    state = tmp_path / "step-00000004"
    state.mkdir()
    (state / "loop.json").write_text("")
    ckpts = Checkpoints(tmp_path, {})
    assert ckpts.latest() is None and ckpts.latest() is None
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000004.bad"]
