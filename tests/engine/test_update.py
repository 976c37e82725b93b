"""Packing for the update: global normalisation counts, padding micro-batches, rollout correction."""

import math

import pytest
import torch

from tests.engine.modeling_fsdp_worker import tiny_model
from wz_engine.modeling import FusedHeadCausalLM
from wz_engine.update import accumulate_gradients, apply_rollout_correction, lr_lambda, pack_for_update
from wz_kernels.policy_loss import policy_loss_reference


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
    # by hand: the longer sequence first; scored positions are those whose next token is a response token
    assert b.input_ids.tolist() == [1, 2, 4, 5, 3, 6]
    old = torch.zeros(b.num_tokens)
    engine = [torch.tensor([0.0, -1.0]), torch.tensor([1.0])]  # per response token, original order
    stats = apply_rollout_correction([ub], [[old]], [engine], cap=2.0)
    # position 1 -> token 4 (engine 0, w = 1), 2 -> 5 (engine -1, w = min(e, 2) = 2),
    # 4 -> 6 (engine 1, w = 1/e)
    expected = torch.tensor([0.0, 1.0 * 1.0, 1.0 * 2.0, 0.0, -2.0 * math.exp(-1.0), 0.0])
    torch.testing.assert_close(ub.advantages[0], expected)
    assert abs(stats["tis/frac_capped"] - 1 / 3) < 1e-6  # exp(0 - (-1)) > 2 on one of three tokens


def test_lr_schedule():
    f = lr_lambda(warmup_steps=2, total_steps=10, schedule="cosine", min_ratio=0.1)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert abs(f(2) - 1.0) < 1e-9 and abs(f(10) - 0.1) < 1e-9
    assert lr_lambda(0, 10, "linear", 0.0)(5) == 0.5


def _sequence_logprobs(model, prompt, response, temperature):
    """Oracle: log-probs [R] of the response tokens, the sequence run alone through the whole model
    (its own logits, float64 log-softmax)."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids, use_cache=False).logits[0].double() / temperature
    lsm = torch.log_softmax(logits[len(prompt) - 1: len(prompt) + len(response) - 1], dim=-1)
    return lsm.gather(1, torch.tensor(response)[:, None])[:, 0]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_accumulated_micro_batch_gradients_equal_the_whole_batch_oracle(agg):
    """Gradient accumulation over several packed micro-batches (old and reference log-probs from two
    other models, so the clip and the KL are active) equals the float64 autograd of the whole batch's
    loss, computed sequence by sequence from the models' own logits."""
    temperature = 0.8
    opts = {"clip_low": 0.1, "clip_high": 0.15, "dual_clip": 2.0, "kl_coef": 0.3, "kl_estimator": "k3",
            "agg": agg, "loss_scale": 8.0 if agg == "seq-mean-token-sum-norm" else None}
    policy, old_model, ref_model = (tiny_model(True, torch.float64) for _ in range(3))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # old and reference: nearby policies (ratios around 1, some clipped)
        for m, scale in ((old_model, 0.03), (ref_model, 0.05)):
            for prm in m.parameters():
                prm.add_(scale * torch.randn(prm.shape, generator=g, dtype=prm.dtype))
    prompts = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (3, 1, 4, 2, 5)]
    responses = [torch.randint(0, 97, (n,), generator=g).tolist() for n in (4, 2, 0, 6, 3)]
    adv = torch.randn(5, generator=g)
    in_loss = torch.tensor([True, True, True, False, True])  # row 3: e.g. a BRPO reference
    ub = pack_for_update(prompts, responses, adv, in_loss, micro_batch_tokens=9, pad_id=0)
    assert ub.num_real >= 3  # several micro-batches
    wrap = {m: FusedHeadCausalLM(m) for m in (policy, old_model, ref_model)}

    def packed(model):  # per micro-batch log-probs [N] of a model (no grad)
        with torch.no_grad():
            return [wrap[model](b.input_ids[None], b.position_ids[None], b.targets,
                                temperature=temperature).double() for b in ub.batches]

    metrics = accumulate_gradients(wrap[policy], ub, packed(old_model), packed(ref_model), "cpu", temperature,
                                   opts)
    assert 0 < metrics["clip_frac_low"] + metrics["clip_frac_high"] < 0.5 and metrics["kl_mean"] > 0
    got = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad(set_to_none=True)

    rows = [i for i, r in enumerate(responses) if r]
    lp = torch.cat([_sequence_logprobs(policy, prompts[i], responses[i], temperature) for i in rows])
    with torch.no_grad():
        old = torch.cat([_sequence_logprobs(old_model, prompts[i], responses[i], temperature) for i in rows])
        ref = torch.cat([_sequence_logprobs(ref_model, prompts[i], responses[i], temperature) for i in rows])
    seq = torch.cat([torch.full((len(responses[i]),), i) for i in rows])
    loss, _ = policy_loss_reference(lp, old, adv.double()[seq], in_loss[seq], ref_logprobs=ref, seq_ids=seq,
                                    **opts, upcast=True)
    loss.backward()
    for n, p in policy.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)
    assert any(p.grad.abs().sum() > 0 for p in policy.parameters())
