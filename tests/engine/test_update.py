"""Packing for the update: global normalisation counts, padding micro-batches, rollout correction."""

import torch

from wz_engine.update import apply_rollout_correction, lr_lambda, pack_for_update


def test_pack_for_update_masks_counts_and_advantages():
    prompts = [[1, 2, 3], [4, 5], [6]]
    responses = [[7, 8], [9], [10, 11, 12]]
    adv = torch.tensor([1.0, -1.0, 0.5])
    in_loss = torch.tensor([True, False, True])  # row 1 is e.g. a BRPO reference
    ub = pack_for_update(prompts, responses, adv, in_loss, micro_batch_tokens=5, pad_id=0)
    assert ub.num_real == len(ub.batches)
    assert ub.global_tokens == 2 + 3 and ub.global_seqs == 2
    for b, a, m in zip(ub.batches, ub.advantages, ub.masks):
        rows = b.token_sequence_index
        assert torch.equal(a, adv[rows])
        assert torch.equal(m, b.loss_mask & in_loss[rows])


def test_rollout_correction_reweights_advantages_by_truncated_ratio():
    prompts, responses = [[1, 2], [3]], [[4, 5], [6]]
    adv = torch.tensor([1.0, -2.0])
    ub = pack_for_update(prompts, responses, adv, torch.tensor([True, True]), micro_batch_tokens=16, pad_id=0)
    (b,) = ub.batches
    old = torch.zeros(b.num_tokens)
    engine = [torch.tensor([0.0, -1.0]), torch.tensor([1.0])]  # per response token, original order
    stats = apply_rollout_correction([ub], [[old]], [engine], cap=2.0)
    expected = torch.zeros(b.num_tokens)
    scattered = b.scatter_responses(engine, fill=0.0)
    w = torch.exp(old - scattered).clamp(max=2.0)
    expected[b.loss_mask] = (b.per_token(adv) * w)[b.loss_mask]
    torch.testing.assert_close(ub.advantages[0], expected)
    assert abs(stats["tis/frac_capped"] - 1 / 3) < 1e-6  # exp(0 - (-1)) > 2 on one of three tokens


def test_lr_schedule():
    f = lr_lambda(warmup_steps=2, total_steps=10, schedule="cosine", min_ratio=0.1)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert abs(f(2) - 1.0) < 1e-9 and abs(f(10) - 0.1) < 1e-9
    assert lr_lambda(0, 10, "linear", 0.0)(5) == 0.5
