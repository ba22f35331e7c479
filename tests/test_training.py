"""The shared loop: parameters move, accumulation is exact, a crash resumes to identical weights."""

import json

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from beyondlm.config import TrainConfig
from beyondlm.sft import SFTConfig
from beyondlm.logprobs import pad_batch
from beyondlm.sft import make_loss_fn
from beyondlm.training import BatchOrder, train_loop
from tests.helpers import tiny_setup


def _data(n=48, seed=0):
    language, tok, model = tiny_setup()
    seqs = language.sample(n, np.random.default_rng(seed))
    return [[tok.bos_token_id, *s] for s in seqs], tok, model


def _run(model, examples, tok, cfg: TrainConfig, **kw):
    sft = SFTConfig(variant="mle", objective="mle", hyperparams={}, model=None, train=cfg)

    def collate(rows):
        ids, mask = pad_batch(rows, tok.pad_token_id)
        return {"input_ids": ids, "attention_mask": mask}

    return train_loop(model, examples, make_loss_fn(sft), cfg, collate=collate, **kw)


def _params(model):
    """CPU copies: training moves the model to accelerate's device (a GPU where there is one)."""
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters()}


def test_every_trainable_parameter_moves():
    examples, tok, model = _data()
    before = _params(model)
    model, result = _run(model, examples, tok, TrainConfig(lr=1e-2, batch_size=8, max_steps=3, warmup_steps=0, ckpt_every=0))
    after = _params(model)
    frozen = [k for k in before if torch.equal(before[k], after[k])]
    assert not frozen, f"parameters that did not move: {frozen}"
    assert result.steps == 3 and np.isfinite(result.final_loss) and result.tokens > 0


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_the_device_and_precision_that_ran_are_recorded(precision):
    """What every training stage's metrics carry (``train.device``, ``train.mixed_precision``)."""
    from accelerate.state import AcceleratorState

    from beyondlm.config import training_device

    examples, tok, model = _data(n=16)
    AcceleratorState._reset_state()  # accelerate keeps one precision per process otherwise
    try:
        cfg = TrainConfig(batch_size=8, max_steps=1, warmup_steps=0, ckpt_every=0, mixed_precision=precision)
        _, result = _run(model, examples, tok, cfg)
    finally:
        AcceleratorState._reset_state()
    assert (result.device, result.mixed_precision) == (training_device(), precision)


def _grads_seen_by_optimizer(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Gradients at the first optimizer step (a global pre-step hook; post-clipping)."""
    examples, tok, model = _data()
    names = {id(p): k for k, p in model.named_parameters()}
    seen = {}

    def hook(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            seen.update({names[id(p)]: p.grad.clone() for p in group["params"] if p.grad is not None})

    handle = register_optimizer_step_pre_hook(hook)
    try:
        _run(model, examples, tok, cfg)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("batch_size, grad_accum", [(4, 2), (2, 4)])
def test_gradient_accumulation_is_exact(batch_size, grad_accum):
    """One step over 8 sequences gets the same gradient whatever the micro-batch split: the loss
    is the per-token mean over the whole optimizer batch, not a mean of micro-batch means."""
    common = dict(lr=1e-2, max_steps=1, warmup_steps=0, ckpt_every=0, max_grad_norm=1e9)
    ref = _grads_seen_by_optimizer(TrainConfig(batch_size=8, grad_accum=1, **common))
    split = _grads_seen_by_optimizer(TrainConfig(batch_size=batch_size, grad_accum=grad_accum, **common))
    assert ref.keys() == split.keys() and len(ref) > 0
    for k in ref:
        torch.testing.assert_close(split[k], ref[k], rtol=1e-4, atol=1e-7, msg=k)


def test_crash_and_resume_gives_identical_weights(tmp_path):
    cfg = TrainConfig(lr=1e-2, batch_size=8, max_steps=8, warmup_steps=2, ckpt_every=3, log_every=1)
    examples, tok, model = _data()
    straight, _ = _run(model, examples, tok, cfg, ckpt_dir=tmp_path / "a", live_dir=tmp_path / "live_a")

    class Crash(RuntimeError):
        pass

    def crash(step):
        if step == 7:  # after the checkpoint at step 6
            raise Crash

    examples, tok, model = _data()
    with pytest.raises(Crash):
        _run(model, examples, tok, cfg, ckpt_dir=tmp_path / "b", live_dir=tmp_path / "live_b",
             fingerprint={"run": 1}, on_step=crash)
    assert [p.name for p in (tmp_path / "b").glob("step-*")] == ["step-00000006"]
    examples, tok, model = _data()  # a fresh process would rebuild the model from scratch
    resumed, result = _run(model, examples, tok, cfg, ckpt_dir=tmp_path / "b", live_dir=tmp_path / "live_b",
                           fingerprint={"run": 1})
    assert result.resumed_from == 6 and result.steps == 8
    for k, v in _params(resumed).items():
        torch.testing.assert_close(v, _params(straight)[k], rtol=0, atol=0, msg=k)
    # finished: resumable states dropped, completion recorded, curve has each step exactly once
    assert not list((tmp_path / "b").glob("step-*"))
    assert json.loads((tmp_path / "b" / "complete.json").read_text())["steps"] == 8
    tsv = (tmp_path / "live_b" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    header = tsv[0].split("\t")
    steps = [int(row.split("\t")[header.index("step")]) for row in tsv[1:]]
    assert steps == list(range(1, 9))


def test_checkpoint_from_other_params_is_not_resumed(tmp_path):
    cfg = TrainConfig(lr=1e-2, batch_size=8, max_steps=4, warmup_steps=0, ckpt_every=2)

    def stop(step):
        if step == 3:
            raise KeyboardInterrupt

    examples, tok, model = _data()
    with pytest.raises(KeyboardInterrupt):
        _run(model, examples, tok, cfg, ckpt_dir=tmp_path, fingerprint={"lr": 1}, on_step=stop)
    examples, tok, model = _data()
    _, result = _run(model, examples, tok, cfg, ckpt_dir=tmp_path, fingerprint={"lr": 2})
    assert result.resumed_from is None


def test_batch_order_covers_each_epoch_once():
    order = BatchOrder(n_examples=10, per_step=4, seed=3)
    first_epoch = [i for s in range(2) for i in order.indices(s)] + order.indices(2)[:2]
    assert sorted(first_epoch) == list(range(10))
    assert order.indices(5) == BatchOrder(10, 4, 3).indices(5)  # stateless: resumable by index


def test_length_grouping_keeps_epochs_complete_and_cuts_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=1000)
    plain, grouped = BatchOrder(1000, 50, 1), BatchOrder(1000, 50, 1, lengths=lengths, group=8)
    for order in (plain, grouped):
        assert sorted(i for s in range(20) for i in order.indices(s)) == list(range(1000))

    def padded(order):  # total padded positions over one epoch
        return sum(len(ix) * lengths[ix].max() for ix in (order.indices(s) for s in range(20)))

    assert padded(grouped) < 0.75 * padded(plain)
    assert grouped.indices(7) == BatchOrder(1000, 50, 1, lengths=lengths, group=8).indices(7)


def _epoch_mean_grad(cfg: TrainConfig, examples, tok, model, **kw) -> dict[str, torch.Tensor]:
    """Mean over one epoch's optimizer steps of the gradient each step applies (lr = 0: the
    parameters stay put, so every step's gradient is taken at the same point)."""
    names = {id(p): k for k, p in model.named_parameters()}
    total: dict[str, torch.Tensor] = {}

    def hook(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    total[names[id(p)]] = total.get(names[id(p)], 0) + p.grad.clone()

    handle = register_optimizer_step_pre_hook(hook)
    try:
        _run(model, examples, tok, cfg, **kw)
    finally:
        handle.remove()
    return {k: (v / cfg.max_steps).cpu() for k, v in total.items()}  # trained on accelerate's device


def test_grouped_batches_give_the_corpus_token_mean_gradient():
    """One short and one long text, each repeated: grouped batches hold only short or only long
    texts. With the fixed normaliser the steps of an epoch average to the full-corpus token-mean
    gradient exactly; dividing each step by its own token count over-weights the short texts."""
    from beyondlm.training import target_tokens

    language, tok, model = tiny_setup()
    rng = np.random.default_rng(0)
    texts = sorted(language.sample(200, rng), key=len)
    short, long = [tok.bos_token_id, *texts[0]], [tok.bos_token_id, *texts[-1]]
    assert len(long) >= 3 * len(short)
    examples = [short, long] * 8  # 16 examples, 4 steps of 4: grouped → 2 short and 2 long steps
    cfg = TrainConfig(lr=0.0, batch_size=4, max_steps=4, warmup_steps=0, ckpt_every=0, max_grad_norm=1e9,
                      group_by_length=True)
    model.zero_grad()
    ids, mask = pad_batch(examples, tok.pad_token_id)
    sft = SFTConfig(variant="mle", objective="mle", hyperparams={}, model=None, train=cfg)
    loss_sum, n = make_loss_fn(sft)(model, {"input_ids": ids, "attention_mask": mask})
    (loss_sum / n).backward()
    corpus = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()

    fixed = _epoch_mean_grad(cfg, examples, tok, model, units=target_tokens(examples))
    own = _epoch_mean_grad(cfg, examples, tok, model)
    for k in corpus:
        torch.testing.assert_close(fixed[k], corpus[k], rtol=1e-4, atol=1e-7, msg=k)
    biased = max(float((own[k] - corpus[k]).norm() / corpus[k].norm().clamp_min(1e-12)) for k in corpus)
    assert biased > 0.05, "per-step normalisation should be visibly biased on this corpus"


def test_wrong_units_are_refused():
    examples, tok, model = _data()
    cfg = TrainConfig(lr=1e-2, batch_size=8, max_steps=1, warmup_steps=0, ckpt_every=0)
    with pytest.raises(RuntimeError, match="units"):
        _run(model, examples, tok, cfg, units=[len(x) for x in examples])  # not len - 1


def test_held_out_curve_keeps_the_best_weights_and_judges_convergence(tmp_path):
    """A validation that gets worse after step 4 (as if over-fitting): the loop returns the step-4
    weights and a verdict over the curve; a crash and resume keep the curve and the best weights."""
    examples, tok, model = _data()
    cfg = TrainConfig(lr=1e-2, batch_size=8, max_steps=8, warmup_steps=0, ckpt_every=3, eval_every=2)
    snapshots: dict[int, dict] = {}
    calls = []

    def validate(m, step):
        calls.append(step)
        snapshots[step] = _params(m)
        return abs(step - 4) + 1.0  # best at step 4

    trained, result = _run(model, examples, tok, cfg, validate=validate, live_dir=tmp_path / "live")
    assert [s for s, _ in result.valid_curve] == [0, 2, 4, 6, 8]
    for k, v in _params(trained).items():
        torch.testing.assert_close(v, snapshots[4][k], rtol=0, atol=0, msg=k)
    assert result.convergence["best_step"] == 4 and result.convergence["converged"] is True
    tsv = (tmp_path / "live" / "plots" / "metrics" / "valid" / "loss.tsv").read_text().splitlines()
    assert len(tsv) == 1 + 5

    # crash after the step-6 checkpoint, resume: same best weights, curve not re-evaluated
    def crash(step):
        if step == 7:
            raise KeyboardInterrupt

    examples, tok, model = _data()
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        _run(model, examples, tok, cfg, validate=validate, ckpt_dir=tmp_path / "c", on_step=crash)
    examples, tok, model = _data()
    resumed, again = _run(model, examples, tok, cfg, validate=validate, ckpt_dir=tmp_path / "c")
    assert again.resumed_from == 6 and [s for s, _ in again.valid_curve] == [0, 2, 4, 6, 8]
    assert calls == [0, 2, 4, 6, 8]  # the resumed run evaluated only what the crash left
    for k, v in _params(resumed).items():
        torch.testing.assert_close(v, _params(trained)[k], rtol=0, atol=0, msg=k)


def test_grouped_steps_stay_whole_across_epochs():
    """N % per_step ≠ 0: later epochs start mid-step. The sorted steps must still be whole steps
    (not halves of two), so padding stays as low in epoch 3 as in epoch 1; epochs stay complete."""
    rng = np.random.default_rng(0)
    n, per_step = 1000, 64  # 15.625 steps an epoch
    lengths = rng.integers(5, 60, size=n)
    order = BatchOrder(n, per_step, 1, lengths=lengths, group=4)
    positions = [i for s in range(48) for i in order.indices(s)]
    for e in range(3):
        assert sorted(positions[e * n : (e + 1) * n]) == list(range(n))

    def real_fraction(steps):
        batches = [order.indices(s) for s in steps]
        return sum(lengths[b].sum() for b in batches) / sum(len(b) * lengths[b].max() for b in batches)

    first, third = real_fraction(range(0, 15)), real_fraction(range(32, 46))
    assert first > 0.75 and third > 0.95 * first, (first, third)


def test_skip_pad_mask_keeps_every_per_token_loss():
    """Right-padded rows through a causal LM without the attention mask: every real position's
    per-token loss equals the masked forward's (pads are masked out of the loss either way)."""
    from beyondlm.logprobs import lm_targets, token_logps
    from beyondlm.training import CausalNoPadMask, _skip_pad_mask_ok, right_padded

    examples, tok, model = _data(16)
    model.eval()
    ids, mask = pad_batch(examples, tok.pad_token_id)
    assert not bool(mask.all())  # the batch is padded
    labels, target = lm_targets(ids, mask)
    with torch.no_grad():
        masked = token_logps(model(input_ids=ids, attention_mask=mask).logits[:, :-1], labels)
        unmasked = token_logps(CausalNoPadMask(model)(input_ids=ids, attention_mask=mask).logits[:, :-1], labels)
    torch.testing.assert_close(unmasked[target], masked[target], rtol=1e-5, atol=1e-5)
    sft = SFTConfig(variant="mle", objective="mle", hyperparams={}, model=None, train=TrainConfig())
    assert _skip_pad_mask_ok(model, make_loss_fn(sft), {"input_ids": ids, "attention_mask": mask})
    left = {"input_ids": ids.flip(1), "attention_mask": mask.flip(1)}  # left padding: the mask stays
    assert CausalNoPadMask(model)(**left).logits.shape[:2] == ids.shape
    assert right_padded(mask) and not right_padded(left["attention_mask"])
