import pytest

from beyondlm.config import ConfigError, EvaluateConfig, load_section, read_params, section
from beyondlm.sft import sft_config
from beyondlm.data.config import PrepareConfig


def test_repo_params_load():
    params = read_params("params.yaml")
    cfg = load_section(PrepareConfig, section(params, "prepare"), "prepare")
    assert cfg.source == "synthetic" and cfg.synthetic.max_len == cfg.max_len
    sft = section(params, "sft")
    for variant in sft["variants"]:
        for seed in sft["seeds"]:
            c = sft_config(sft, variant, seed)
            assert c.train.seed == seed and c.objective in ("mle", "tailr", "mixce", "emo")


@pytest.mark.parametrize(
    "raw, needle",
    [
        ({"n_samplez": 3}, "evaluate.n_samplez"),  # unknown key named with its section
        ({"n_samples": "many"}, "'evaluate.n_samples' must be int"),  # wrong type
        ({"n_samples": 1}, "'evaluate.n_samples'=1 must be between"),  # out of range
        ({"batch_size": True}, "'evaluate.batch_size' must be int"),  # bool is not an int
    ],
)
def test_strict_errors_name_the_key(raw, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_section(EvaluateConfig, raw, "evaluate")


def test_nested_and_language_errors():
    with pytest.raises(ConfigError, match="prepare.synthetic.n_topicz"):
        load_section(PrepareConfig, {"synthetic": {"n_topicz": 2}}, "prepare")
    with pytest.raises(ConfigError, match="n_topics"):
        load_section(PrepareConfig, {"synthetic": {"n_topics": 0}}, "prepare")
    with pytest.raises(ConfigError, match="prepare.source"):
        load_section(PrepareConfig, {"source": "s3"}, "prepare")
    with pytest.raises(ConfigError, match="prepare.synthetic.max_len=64 differs"):
        load_section(PrepareConfig, {"max_len": 32}, "prepare")


def test_floats_accept_yaml_exponent_strings():
    # YAML 1.1 parses '3e-4' (no dot) as a string: accept it as the float the user meant.
    cfg = sft_config({"objectives": {"mle": {}}, "train": {"lr": "3e-4"}}, "mle", 0)
    assert cfg.train.lr == pytest.approx(3e-4)


def test_sft_config_errors():
    base = {"objectives": {"mle": {"objective": "mle"}, "t": {"objective": "tailr", "gama": 0.1}}}
    with pytest.raises(ConfigError, match="no entry 'x'"):
        sft_config(base, "x", 0)
    with pytest.raises(ConfigError, match=r"'t-g0.1' contains '\.'.*'t-g0_1'"):
        sft_config({"objectives": {"t-g0.1": {"objective": "tailr"}}}, "t-g0.1", 0)
    with pytest.raises(ConfigError, match="sft.objectives.t.*gama"):
        sft_config(base, "t", 0)
    with pytest.raises(ConfigError, match="sft.lrr"):
        sft_config({**base, "lrr": 1.0}, "mle", 0)
    with pytest.raises(ConfigError, match=r"sft.train.lrr"):
        sft_config({**base, "train": {"lrr": 1.0}}, "mle", 0)
    with pytest.raises(ConfigError, match=r"unknown key 'sft.lr' \(training keys moved under 'sft.train'"):
        sft_config({**base, "lr": 1.0}, "mle", 0)  # the old layout says where the key went
    with pytest.raises(ConfigError, match="'n_embd'=30 is not divisible.*section 'sft.model'"):
        sft_config({**base, "model": {"n_embd": 30, "n_head": 4}}, "mle", 0)


def test_variant_train_overrides_apply_to_that_variant_only():
    sft = {"objectives": {"mle": {}, "t": {"objective": "tailr", "gamma": 1.0, "train": {"max_steps": 900}}},
           "train": {"max_steps": 300, "lr": 1e-3}}
    slow, mle = sft_config(sft, "t", 1), sft_config(sft, "mle", 1)
    assert (slow.train.max_steps, slow.train.lr, slow.hyperparams["gamma"]) == (900, 1e-3, 1.0)
    assert mle.train.max_steps == 300
    with pytest.raises(ConfigError, match=r"sft.objectives.t.train.max_step\b.*Allowed"):
        sft_config({"objectives": {"t": {"objective": "tailr", "train": {"max_step": 9}}}}, "t", 0)
    with pytest.raises(ConfigError, match="sft.objectives.t.train must be a mapping"):
        sft_config({"objectives": {"t": {"objective": "tailr", "train": 9}}}, "t", 0)


def test_params_parse_as_yaml_1_2_like_dvc(tmp_path):
    # `dvc exp run -S` writes unquoted `no`; YAML 1.1 would turn it into False, 1.2 keeps "no".
    path = tmp_path / "params.yaml"
    path.write_text("sft:\n  objectives: {mle: {}}\n  train: {mixed_precision: no, lr: 3e-4}\n")
    cfg = sft_config(section(read_params(path), "sft"), "mle", 0)
    assert cfg.train.mixed_precision == "no" and cfg.train.lr == 3e-4


def test_prepared_data_reads_declared_keys_typed():
    from beyondlm.data.config import PrepareConfig, prepared_data

    default = prepared_data({})
    assert (default.out_dir, default.max_len, default.prompt_len) == (
        PrepareConfig.out_dir, PrepareConfig.max_len, PrepareConfig.prompt_len)
    ref = prepared_data({"prepare": {"out_dir": "d/p", "max_len": 32, "prompt_len": 4, "n_train": 7}})
    assert str(ref.data_dir) == "d/p" and ref.max_len == 32 and ref.language() is None
    with pytest.raises(ConfigError, match="'prepare.max_len' must be int"):
        prepared_data({"prepare": {"max_len": "long"}})


def test_a_partial_train_mapping_keeps_the_sections_other_defaults():
    """Every section that trains nests `model:` and `train:`; keys a params file leaves out keep the
    section's defaults (RewardConfig's lr, not TrainConfig's)."""
    from beyondlm.align.config import AlignConfig, RewardConfig

    default = RewardConfig()
    cfg = load_section(RewardConfig, {"train": {"max_steps": 70}, "model": {"n_layer": 1}}, "reward")
    assert (cfg.train.max_steps, cfg.train.lr, cfg.train.warmup_steps) == (70, default.train.lr, default.train.warmup_steps)
    assert (cfg.model.n_layer, cfg.model.n_embd) == (1, default.model.n_embd)
    align = load_section(AlignConfig, {"train": {"lr": 0.5, "max_steps": 40}, "eval_every": 10,
                                       "hyperparams": {"rloo": {"beta": 0.1, "train": {"max_steps": 20, "batch_size": 8}}}},
                         "align")
    rloo, dpo = align.train_config("rloo", seed=3), align.train_config("dpo_pref", seed=3)
    assert (rloo.max_steps, rloo.batch_size, rloo.lr, rloo.seed, rloo.group_by_length) == (20, 8, 0.5, 3, False)
    assert (dpo.max_steps, dpo.lr, dpo.eval_every) == (40, 0.5, 10)
    assert align.loss("rloo") == {"K": 4.0, "beta": 0.1}  # RLOO is a row of the loss table
    with pytest.raises(ConfigError, match="align.hyperparams.rloo.train.max_stepz"):
        load_section(AlignConfig, {"hyperparams": {"rloo": {"train": {"max_stepz": 2}}}}, "align")
    with pytest.raises(ConfigError, match=r"align.hyperparams.rloo.K'=1"):
        load_section(AlignConfig, {"hyperparams": {"rloo": {"K": 1}}}, "align")


def test_grpo_and_dr_grpo_are_online_align_methods():
    """The two GRPO rows of the loss table load as align methods: online (prompts batched, never grouped
    by length), their hyperparameters checked against the table's ranges."""
    from beyondlm.align.config import AlignConfig

    align = load_section(AlignConfig, {"methods": ["rloo", "grpo", "dr_grpo"], "train": {"group_by_length": True},
                                       "hyperparams": {"dr_grpo": {"clip": 0.1, "K": 2}}}, "align")
    assert all(align.kind(m) == "online" and not align.train_config(m, seed=0).group_by_length for m in align.methods)
    assert align.loss("grpo") == {"K": 4.0, "beta": 0.04, "clip": 0.2, "unbiased": 0.0}
    assert align.loss("dr_grpo") == {"K": 2.0, "beta": 0.04, "clip": 0.1, "unbiased": 1.0}
    with pytest.raises(ConfigError, match=r"align.hyperparams.grpo.unbiased'=0.5"):
        load_section(AlignConfig, {"hyperparams": {"grpo": {"unbiased": 0.5}}}, "align")
    with pytest.raises(ConfigError, match=r"align.hyperparams.dr_grpo.clip'=1.5"):
        load_section(AlignConfig, {"hyperparams": {"dr_grpo": {"clip": 1.5}}}, "align")


def test_a_precision_the_device_cannot_run_is_refused(monkeypatch):
    """fp16 on a CPU (accelerate would train in float32 and call it fp16) and bf16 on a GPU
    without it are one line naming the key and the fix; bf16 on a CPU runs (autocast)."""
    import torch

    from beyondlm import config
    from beyondlm.config import check_mixed_precision, train_config

    for value, device in (("no", "cpu"), ("bf16", "cpu"), ("fp16", "cuda"), ("fp16", "mps")):
        check_mixed_precision(value, device)
    with pytest.raises(ConfigError, match=r"'mixed_precision'='fp16' cannot run on this machine's device \(cpu.*"
                                          r"set mixed_precision: \"no\" \(or bf16\)"):
        check_mixed_precision("fp16", "cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(ConfigError, match=r"'bf16' cannot run on this GPU \(Tesla V100 has no bf16\)"):
        check_mixed_precision("bf16", "cuda")
    monkeypatch.setattr(config, "training_device", lambda: "cpu")  # every section's TrainConfig, at load
    with pytest.raises(ConfigError, match=r"'fp16' cannot run .*in params section 'align.hyperparams.dpo.train'"):
        train_config({"mixed_precision": "fp16"}, None, "align.hyperparams.dpo.train")
