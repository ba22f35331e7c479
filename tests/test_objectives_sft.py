"""Hand-computed values, limit cases and gradient checks of the token-level SFT objectives."""

import math

import pytest
import torch

from beyondlm.objectives.sft import (
    OBJECTIVES,
    emo_cost,
    emo_loss,
    mixce_loss,
    mle_loss,
    reduce_tokens,
    resolve_objective,
    sft_token_loss,
    tailr_loss,
)

# A 1×2×3 example whose softmax is known by hand:
#   position 0: logits [0, 0, 0]          → q = [1/3, 1/3, 1/3], label 1 → q_t = 1/3
#   position 1: logits [0, ln 2, ln 5]    → exp = [1, 2, 5], q = [1/8, 2/8, 5/8], label 2 → q_t = 5/8
LOGITS = torch.tensor([[[0.0, 0.0, 0.0], [0.0, math.log(2), math.log(5)]]])
LABELS = torch.tensor([[1, 2]])
MASK = torch.ones(1, 2, dtype=torch.bool)
NLL = [math.log(3), math.log(8 / 5)]  # −log(1/3) = 1.0986..., −log(5/8) = 0.4700...


def _close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual, torch.tensor([expected], dtype=torch.float32), atol=atol, rtol=0)


def _random_batch(B=2, T=3, V=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    return logits, labels, torch.ones(B, T, dtype=torch.bool)


def test_mle_by_hand():
    _close(mle_loss(LOGITS, LABELS, MASK), NLL)


def test_tailr_weight_by_hand():
    # γ = 0.5: w = p / (0.5 + 0.5 p)
    #   p = 1/3 → (1/3) / (2/3) = 1/2;   p = 5/8 → (5/8) / (13/16) = 10/13   (both above w_min = 0.2)
    loss = tailr_loss(LOGITS, LABELS, MASK, gamma=0.5, w_min=0.2)
    _close(loss, [0.5 * NLL[0], 10 / 13 * NLL[1]])


def test_tailr_gamma_one_weight_is_p_and_clamps_at_w_min():
    # γ = 1: w = p exactly (w_min = 0 never binds)
    _close(tailr_loss(LOGITS, LABELS, MASK, gamma=1.0, w_min=0.0), [NLL[0] / 3, 5 / 8 * NLL[1]])
    # w_min = 0.4: p = 1/3 < 0.4 is clamped up to 0.4; p = 5/8 is kept
    _close(tailr_loss(LOGITS, LABELS, MASK, gamma=1.0, w_min=0.4), [0.4 * NLL[0], 5 / 8 * NLL[1]])


def test_tailr_gamma_to_zero_is_mle():
    logits, labels, mask = _random_batch()
    torch.testing.assert_close(
        tailr_loss(logits, labels, mask, gamma=1e-12, w_min=0.2), mle_loss(logits, labels, mask), atol=1e-6, rtol=0
    )


def test_mixce_eta_one_is_exactly_mle():
    logits, labels, mask = _random_batch()
    assert torch.equal(mixce_loss(logits, labels, mask, eta=1.0), mle_loss(logits, labels, mask))


def test_mixce_by_hand():
    # η = 0.5: w = 0.5 + 0.5 q → q = 1/3: 2/3;  q = 5/8: 13/16
    _close(mixce_loss(LOGITS, LABELS, MASK, eta=0.5), [2 / 3 * NLL[0], 13 / 16 * NLL[1]])


def test_mixce_weight_is_per_token():
    # η = 0: w = q_t, so the two tokens get 1/3 and 5/8. A batch-scalar weight (mean q = 23/48)
    # would give both tokens the same ratio loss / NLL and fail here.
    ratio = mixce_loss(LOGITS, LABELS, MASK, eta=0.0) / mle_loss(LOGITS, LABELS, MASK)
    _close(ratio, [1 / 3, 5 / 8])


@pytest.mark.parametrize(
    "fn, hp, weight",
    [
        (tailr_loss, {"gamma": 0.3, "w_min": 0.2}, lambda p: (p / (0.3 + 0.7 * p)).clamp(0.2, 1.0)),
        (mixce_loss, {"eta": 0.2}, lambda p: 0.2 + 0.8 * p),
    ],
)
def test_weights_carry_no_gradient(fn, hp, weight):
    # With sg(w): ∂(w · −log q_t)/∂logits = w · (softmax − onehot(y)); a weight with gradient adds a term.
    logits, labels, mask = _random_batch()
    logits.requires_grad_(True)
    fn(logits, labels, mask, **hp).sum().backward()
    q = torch.softmax(logits.detach(), -1)  # (B, T, V)
    w = weight(q.gather(-1, labels.unsqueeze(-1)))  # (B, T, 1)
    expected = w * (q - torch.nn.functional.one_hot(labels, q.shape[-1]))
    torch.testing.assert_close(logits.grad, expected, atol=1e-6, rtol=1e-5)


def test_emo_cost_matches_explicit_loops():
    logits, labels, mask = _random_batch(B=1, T=2, V=4)
    emb = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q = torch.softmax(logits.double(), -1)
    expected = []
    for t in range(2):
        e_y = emb[labels[0, t]]
        total = 0.0
        for j in range(4):
            cos = float(emb[j] @ e_y) / (float(emb[j].norm()) * float(e_y.norm()))
            total += float(q[0, t, j]) * (1.0 - cos)
        expected.append(total)
    _close(emo_cost(logits, labels, mask, emb), expected)


def test_emo_value_equals_mle_but_gradient_differs():
    logits, labels, mask = _random_batch(V=6)
    emb = torch.randn(6, 4, generator=torch.Generator().manual_seed(2), requires_grad=True)
    lg_emo = logits.clone().requires_grad_(True)
    lg_mle = logits.clone().requires_grad_(True)
    loss = emo_loss(lg_emo, labels, mask, embedding=emb)
    mle = mle_loss(lg_mle, labels, mask)
    # ½[ℓ_MLE + sg(ℓ_MLE/ℓ_EMO)·ℓ_EMO] = ½[ℓ_MLE + ℓ_MLE] in value
    torch.testing.assert_close(loss, mle, atol=1e-5, rtol=1e-5)
    loss.sum().backward()
    mle.sum().backward()
    assert not torch.allclose(lg_emo.grad, lg_mle.grad, atol=1e-4)
    assert emb.grad is None  # the cost matrix is fixed


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_masked_positions_are_zero_with_zero_gradient(name):
    logits, labels, _ = _random_batch(V=6)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    labels = labels.masked_fill(~mask, -100)  # ignore index at masked positions must be harmless
    logits.requires_grad_(True)
    emb = torch.randn(6, 4)
    loss = sft_token_loss(name, logits, labels, mask, {}, embedding=emb)
    assert torch.all(loss[~mask] == 0)
    loss.sum().backward()
    assert torch.all(logits.grad[~mask] == 0)
    assert torch.all(logits.grad[mask].abs().sum(-1) > 0)


def test_reduce_tokens_averages_unmasked():
    per_tok = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert reduce_tokens(per_tok, mask).item() == pytest.approx(2.0)  # (1 + 2 + 3) / 3


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_objective_runs_and_is_finite(name):
    logits, labels, mask = _random_batch(B=3, T=4, V=7)
    emb = torch.randn(7, 5)
    loss = sft_token_loss(name, logits.to(torch.bfloat16), labels, mask, {}, embedding=emb)
    assert loss.shape == (3, 4) and loss.dtype == torch.float32
    assert torch.isfinite(loss).all() and (loss >= 0).all()


def test_resolve_objective_merges_defaults():
    obj, hp = resolve_objective("tailr", {"gamma": 0.5})
    assert obj is OBJECTIVES["tailr"] and hp == {"gamma": 0.5, "w_min": 0.2}
    assert resolve_objective("mle", {})[1] == {}


@pytest.mark.parametrize(
    "name, hp, words",
    [
        ("dpo", {}, ["'dpo'", "mle", "tailr", "mixce", "emo"]),
        ("tailr", {"beta": 1.0}, ["beta", "gamma", "w_min"]),
        ("mle", {"eta": 0.1}, ["eta"]),
        ("tailr", {"gamma": 0.0}, ["gamma", "(0, 1]"]),
        ("tailr", {"w_min": 1.5}, ["w_min", "[0, 1]"]),
        ("mixce", {"eta": -0.1}, ["eta", "[0, 1]"]),
        ("mixce", {"eta": True}, ["eta"]),
        ("mixce", {"eta": "0.1"}, ["eta"]),
    ],
)
def test_resolve_objective_errors_name_the_key(name, hp, words):
    with pytest.raises(ValueError) as err:
        resolve_objective(name, hp)
    for word in words:
        assert word in str(err.value)


def test_emo_requires_embedding():
    logits, labels, mask = _random_batch()
    with pytest.raises(ValueError, match="embedding"):
        sft_token_loss("emo", logits, labels, mask, {})
