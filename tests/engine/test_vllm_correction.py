"""Truncated IS correction: weights and metrics vs a float64 hand computation, and the claim that
multiplying advantages by w equals weighting each token's policy-gradient loss (float64 reference
of wz_kernels.policy_loss)."""

import math

import pytest
import torch

from wz_engine.rollout.correction import apply_tis, tis_weights
from wz_kernels.policy_loss import policy_loss_reference


def _inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    engine = -torch.rand(n, generator=g, dtype=torch.float64) * 5
    trainer = engine + torch.randn(n, generator=g, dtype=torch.float64) * 0.7
    mask = torch.rand(n, generator=g) > 0.3
    return trainer, engine, mask


@pytest.mark.parametrize("n,cap", [(1, 1.0), (37, 2.0), (500, 1.5)])
def test_weights_and_metrics_match_float64(n, cap):
    trainer, engine, mask = _inputs(n, n)
    mask[0] = True
    engine_nan = engine.clone()
    engine_nan[~mask] = float("nan")  # masked positions may carry no engine logprob at all
    w, m = tis_weights(trainer.float(), engine_nan.float(), mask, cap)
    ref_ratio = [math.exp(t - e) for t, e, k in zip(trainer.tolist(), engine.tolist(), mask.tolist()) if k]
    ref_w = torch.tensor([min(math.exp(t - e), cap) if k else 0.0
                          for t, e, k in zip(trainer.tolist(), engine.tolist(), mask.tolist())], dtype=torch.float64)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-5, atol=1e-6)
    assert m.tokens == len(ref_ratio)
    assert m.mean_abs_logp_diff == pytest.approx(
        sum(abs(t - e) for t, e, k in zip(trainer.tolist(), engine.tolist(), mask.tolist()) if k) / m.tokens,
        rel=1e-5)
    assert m.max_ratio == pytest.approx(max(ref_ratio), rel=1e-5)
    assert m.frac_capped == pytest.approx(sum(r > cap for r in ref_ratio) / m.tokens)
    # float64 in -> float64 out, exact formula
    w64, _ = tis_weights(trainer, engine_nan, mask, cap)
    torch.testing.assert_close(w64, ref_w, rtol=1e-12, atol=0)


def test_edge_cases_and_errors():
    w, m = tis_weights(torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.bool), 2.0)
    assert torch.equal(w, torch.zeros(3)) and m.tokens == 0
    w, _ = tis_weights(torch.tensor([100.0]), torch.tensor([-100.0]), torch.tensor([1]), 3.0)
    assert w.item() == 3.0  # huge ratio: clamped, finite, capped
    with pytest.raises(ValueError, match="cap"):
        tis_weights(torch.zeros(2), torch.zeros(2), torch.ones(2), 0.5)
    with pytest.raises(ValueError, match="engine_logp"):
        tis_weights(torch.zeros(2), torch.zeros(3), torch.ones(2), 2.0)
    with pytest.raises(ValueError, match="non-finite"):
        tis_weights(torch.zeros(2), torch.tensor([0.0, float("nan")]), torch.ones(2), 2.0)
    with pytest.raises(ValueError, match="advantages"):
        apply_tis(torch.zeros(2), torch.zeros(3))


@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_scaling_advantages_equals_weighting_token_pg_loss(dual_clip):
    """L(w*A) == w*L(A) per token (w >= 0): compare loss and gradient in float64.

    Weighted form: token-mean aggregation with a float mask m*w and a fixed token count T is
    sum_t m_t w_t L_t(A_t) / T; the TIS form scales the advantages instead: sum_t m_t L_t(w_t A_t) / T.
    """
    n = 64
    g = torch.Generator().manual_seed(7)
    trainer_old, engine, mask = _inputs(n, 3)
    logp = (trainer_old + torch.randn(n, generator=g, dtype=torch.float64) * 0.3).requires_grad_(True)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    w, _ = tis_weights(trainer_old, engine, mask, 2.0)
    w[3] = 0.0  # w = 0 must give a zero contribution in both forms
    mask_f = mask.double()
    T = float(mask.sum())
    kwargs = dict(clip_low=0.2, clip_high=0.28, dual_clip=dual_clip, agg="token-mean", global_tokens=T, upcast=True)

    loss_tis, _ = policy_loss_reference(logp, trainer_old, apply_tis(adv, w), mask_f, **kwargs)
    (grad_tis,) = torch.autograd.grad(loss_tis, logp)
    loss_w, _ = policy_loss_reference(logp, trainer_old, adv, mask_f * w, **kwargs)
    (grad_w,) = torch.autograd.grad(loss_w, logp)
    torch.testing.assert_close(loss_tis, loss_w, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_tis, grad_w, rtol=1e-12, atol=1e-14)
    assert grad_tis.abs().sum() > 0  # the check is not vacuous
