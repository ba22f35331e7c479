import math

import torch

from beyondlm.logprobs import lm_targets, pad_batch, sequence_logps, token_logps
from tests.helpers import tiny_setup


def test_token_logps_hand_computed():
    # logits [0, ln 3] → p = [1/4, 3/4]; label 1 → log 3/4; at T = 2: logits [0, ln 3 / 2] → p1 = √3/(1+√3)
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    labels = torch.tensor([[1]])
    assert abs(token_logps(logits, labels).item() - math.log(0.75)) < 1e-6
    expected = math.log(math.sqrt(3) / (1 + math.sqrt(3)))
    assert abs(token_logps(logits, labels, temperature=2.0).item() - expected) < 1e-6


def test_lm_targets_mask_prompt_and_padding():
    ids, attn = pad_batch([[0, 5, 6, 7], [0, 5]], pad_id=0)
    labels, mask = lm_targets(ids, attn, start=torch.tensor([2, 1]))
    assert labels.tolist() == [[5, 6, 7], [5, 0, 0]]
    # row 0 scores positions ≥ 2 (6, 7); row 1 scores position 1 only (5), not the padding
    assert mask.tolist() == [[False, True, True], [True, False, False]]


def test_sequence_logps_equal_a_manual_loop_and_ignore_batching():
    _, tok, model = tiny_setup()
    model.eval()
    seqs = [[0, 5, 6, 7, 0], [0, 9, 0], [0, 4, 4, 4, 4, 4, 0]]
    got, n = sequence_logps(model, seqs, pad_id=0, batch_size=2)
    for i, s in enumerate(seqs):
        with torch.no_grad():
            logp = model(torch.tensor([s])).logits.log_softmax(-1)[0]  # (T, V), no padding at all
        manual = sum(logp[t - 1, s[t]].item() for t in range(1, len(s)))
        assert abs(got[i].item() - manual) < 1e-4 and n[i].item() == len(s) - 1
    starts_got, starts_n = sequence_logps(model, seqs, pad_id=0, starts=[3, 1, 6], batch_size=3)
    assert starts_n.tolist() == [2, 2, 1]
    assert starts_got[0] > got[0]  # fewer (negative) terms


def test_batch_token_logps_per_position_sum_to_the_sequence_logps():
    """Token log-probs of padded rows: the manual per-token values on scored positions, 0 elsewhere
    (prompt, padding), and their row sums are ``batch_sequence_logps``."""
    from beyondlm.logprobs import batch_sequence_logps, batch_token_logps

    _, tok, model = tiny_setup()
    model.eval()
    seqs, start = [[0, 5, 6, 7, 0], [0, 9, 0]], torch.tensor([3, 1])
    ids, attn = pad_batch(seqs, pad_id=0)
    with torch.no_grad():
        logps, mask = batch_token_logps(model, ids, attn, start)  # (2, 4)
        assert mask.tolist() == [[False, False, True, True], [True, True, False, False]]
        for i, s in enumerate(seqs):
            logp = model(torch.tensor([s])).logits.log_softmax(-1)[0]  # (T, V), no padding at all
            for t in range(1, len(s)):  # position t − 1 scores token t
                want = logp[t - 1, s[t]].item() if t >= start[i] else 0.0
                assert abs(logps[i, t - 1].item() - want) < 1e-5
        assert (logps[~mask] == 0).all()
        torch.testing.assert_close(batch_sequence_logps(model, ids, attn, start), logps.sum(-1))
