"""Bradley–Terry reward model: loss values, pooling at the last real token, a training smoke test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from beyondlm.config import ModelConfig, TrainConfig
from beyondlm.data import tokenization
from beyondlm.reward import (
    Pair,
    bt_loss,
    build_reward_model,
    pair_accuracy,
    pair_collate,
    reward_loss_fn,
    rewards,
    score,
)
from beyondlm.training import train_loop

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h"]
VOCAB = ["<|endoftext|>", "<unk>", *WORDS, "MARK"]
SMALL = ModelConfig(n_layer=1, n_head=2, n_embd=32, n_positions=32)


@pytest.fixture(scope="module")
def tok():
    return tokenization.word_tokenizer(VOCAB)


def _model(tok, seed=0, cfg=SMALL):
    torch.manual_seed(seed)
    return build_reward_model(cfg, tok)


def test_bt_loss_hand_values():
    got = bt_loss(torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 0.0, 1.0]))
    # −log σ(1) = log(1 + e^−1), −log σ(0) = log 2, −log σ(−3) = log(1 + e^3)
    expected = torch.tensor([math.log1p(math.exp(-1)), math.log(2), math.log1p(math.exp(3))])
    torch.testing.assert_close(got, expected)
    assert torch.isfinite(bt_loss(torch.tensor([1e4, -1e4]), torch.tensor([-1e4, 1e4]))).all()


def test_build_uses_dedicated_pad_and_scalar_head(tok):
    model = _model(tok)
    assert model.config.num_labels == 1
    assert tok.pad_token_id == tok.eos_token_id == 0  # why the dedicated pad is needed
    assert model.config.pad_token_id == len(tok) == model.get_input_embeddings().num_embeddings - 1


def test_pooling_is_at_last_real_token_and_padding_invariant(tok):
    model = _model(tok)
    eos = tok.eos_token_id
    done, truncated, longer = [eos, 3, 4, eos], [eos, 3, 4], [eos, 5, 6, 7, 8, 9, eos]
    alone = score(model, [done], pad_id=eos)
    batched = score(model, [done, truncated, longer], pad_id=eos, batch_size=8)
    np.testing.assert_allclose(batched[0], alone[0], rtol=1e-5, atol=1e-6)  # padding does not matter
    # With stock pooling (pad id = EOS id) these two would score identically.
    assert abs(batched[0] - batched[1]) > 1e-6
    assert batched.shape == (3,) and batched.dtype == np.float64


def test_real_token_equal_to_pad_id_is_refused(tok):
    model = _model(tok)
    ids = torch.tensor([[0, model.config.pad_token_id, 0]])
    with pytest.raises(ValueError, match="pad id"):
        rewards(model, ids, torch.ones_like(ids))


def test_reward_loss_fn_contract(tok):
    model = _model(tok)
    pairs = [Pair([0, 2, 3, 0], [0, 4, 0]), Pair([0, 5, 0], [0, 6, 7, 8, 0])]
    batch = pair_collate(tok.pad_token_id)(pairs)
    assert batch["input_ids"].shape == (4, 5)
    loss_sum, n = reward_loss_fn(model, batch)
    assert n == 2 and loss_sum.dim() == 0
    r = score(model, [p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id=0)
    expected = sum(math.log1p(math.exp(-(r[i] - r[i + 2]))) for i in range(2))
    assert loss_sum.item() == pytest.approx(expected, rel=1e-4)


def _synthetic_pairs(n: int, seed: int) -> list[Pair]:
    """Chosen = random words with MARK somewhere; rejected = the same text with MARK replaced by a
    random word, so only the marker (not length) tells them apart."""
    rng = np.random.default_rng(seed)
    mark, word_ids = VOCAB.index("MARK"), [VOCAB.index(w) for w in WORDS]

    def words():
        return [int(w) for w in rng.choice(word_ids, size=int(rng.integers(3, 9)))]

    pairs = []
    for _ in range(n):
        rejected = words()
        at = int(rng.integers(0, len(rejected)))
        chosen = [*rejected[:at], mark, *rejected[at + 1 :]]
        pairs.append(Pair([0, *chosen, 0], [0, *rejected, 0]))
    return pairs


def test_training_smoke_learns_marker_and_moves_every_parameter(tok):
    model = _model(tok, seed=1)
    before = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    train, held_out = _synthetic_pairs(64, seed=0), _synthetic_pairs(64, seed=1)
    cfg = TrainConfig(lr=3e-3, batch_size=16, max_steps=30, warmup_steps=3, ckpt_every=0, log_every=10)
    model, result = train_loop(model, train, reward_loss_fn, cfg, collate=pair_collate(tok.pad_token_id),
                               desc="reward smoke")
    assert result.steps == 30 and math.isfinite(result.final_loss)
    acc = pair_accuracy(model, [p.chosen for p in held_out], [p.rejected for p in held_out],
                        pad_id=tok.pad_token_id)
    assert acc > 0.9, acc
    # BT is invariant to a constant shift of r, and the head has no bias, so the final LayerNorm's
    # bias (which adds w·b to every reward) gets an exactly-cancelling gradient: it alone may stay.
    unmoved = {n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p.detach().cpu(), before[n])}
    assert unmoved <= {"transformer.ln_f.bias"}, unmoved
    # ... and that is the reason: its gradient is zero up to rounding (Adam may still amplify noise).
    model.zero_grad()
    batch = pair_collate(tok.pad_token_id)(train[:16])
    reward_loss_fn(model, {k: v.to(model.device) for k, v in batch.items()})[0].backward()
    assert model.transformer.ln_f.bias.grad.abs().max() < 1e-6 * model.score.weight.grad.abs().max() + 1e-9


def test_pair_accuracy_length_mismatch(tok):
    with pytest.raises(ValueError, match="chosen has 1"):
        pair_accuracy(_model(tok), [[0, 2, 0]], [], pad_id=0)


def test_pretrained_path_gets_dedicated_pad(tok, tmp_path):
    # A saved classifier whose pad id is the EOS id (the stock setting) gets one extra pad row.
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(vocab_size=len(tok), n_positions=16, n_embd=16, n_layer=1, n_head=2,
                        num_labels=1, pad_token_id=tok.eos_token_id)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)  # its own tokenizer: the prepared ids are checked against it
    model = build_reward_model(ModelConfig(name_or_path=str(tmp_path)), tok)
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == len(tok) == model.get_input_embeddings().num_embeddings - 1
    r = score(model, [[0, 2, 3, 0], [0, 2, 3]], pad_id=0)
    assert np.isfinite(r).all() and r[0] != r[1]
