"""fused_linear_policy_loss with GSPO / GSPO-token / CISPO / SAPO / VESPO / two-sided clipping / top-entropy
masking / the importance-weighted KL / the off-policy sequence mask,
off- and on-policy, against the float64 oracle (naive matmul + log_softmax, then the float64 policy-loss
reference with the oracle's own entropy mask) and against the float32 composition of the two ops."""

import pytest
import torch

from tests.helpers import assert_close_to_reference
from tests.kernels.test_logprob import IMPLS, loss_inputs, make_inputs, naive_logprobs64
from wz_kernels.logprob import fused_linear_logprobs, fused_linear_policy_loss
from wz_kernels.policy_loss import high_entropy_mask, off_policy_sequence_mask, policy_loss

VARIANTS = [
    {"importance_sampling_level": "sequence", "agg": "seq-mean-token-mean", "kl_coef": 0.05},
    {"importance_sampling_level": "sequence", "delta": 1.3, "top_entropy_quantile": 0.4},
    {"importance_sampling_level": "sequence_token", "dual_clip": 2.0, "agg": "seq-mean-token-sum"},
    {"loss_type": "cispo", "clip_high": 0.1, "kl_coef": 0.1, "kl_estimator": "k2"},
    {"loss_type": "cispo", "importance_sampling_level": "sequence", "top_entropy_quantile": 0.5},
    {"delta": 1.1, "clip_high": 0.28, "agg": "seq-mean-token-mean"},
    {"top_entropy_quantile": 0.0},
    {"top_entropy_quantile": 0.3, "kl_coef": 0.1, "agg": "seq-mean-token-sum-norm", "loss_scale": 16.0},
    {"loss_type": "sapo", "kl_coef": 0.1, "kl_importance_weighted": True},  # one pass
    {"loss_type": "sapo", "importance_sampling_level": "sequence", "sapo_temperatures": (0.7, 1.4)},
    {"loss_type": "vespo", "kl_coef": 0.05, "vespo_gamma": (1.5, 2.0, 2.5, 1.0)},
    {"importance_sampling_level": "sequence", "kl_coef": 0.1, "kl_importance_weighted": True},
    {"off_policy_mask_threshold": 0.02, "kl_coef": 0.05, "top_entropy_quantile": 0.6},
]
NEVER_CLIP = ("sapo", "vespo")


def variant_id(cfg):
    return "-".join(f"{k}={v}" for k, v in cfg.items())


def oracle64(hidden, weight, bias, targets, old, extra, cfg, T):
    """float64: naive log-probs and entropy, the entropy mask from them, the float64 policy-loss reference."""
    leaves = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    lp, ent = naive_logprobs64(*leaves[:2], targets, leaves[2], T)
    kw = dict(extra, **cfg)
    q = kw.pop("top_entropy_quantile", 1.0)
    threshold = kw.pop("off_policy_mask_threshold", None)
    mask = kw.pop("mask")
    policy_mask = high_entropy_mask(ent.detach(), mask, q) if q < 1.0 else torch.ones_like(mask)
    old64 = lp.detach() if old is None else old.double()
    adv64 = kw.pop("advantages").double()
    if threshold is not None:
        policy_mask = policy_mask & off_policy_sequence_mask(adv64, lp, old64, mask, kw["seq_ids"], threshold)
    loss, metrics = policy_loss(lp, old64, adv64, mask, impl="reference", policy_mask=policy_mask, **kw)
    loss.backward()
    return loss.detach(), metrics, [t.grad for t in leaves], ent.detach(), lp.detach()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("on_policy", [False, True], ids=["off-policy", "on-policy"])
@pytest.mark.parametrize("cfg", VARIANTS, ids=variant_id)
def test_matches_float64_oracle_and_composition(impl, on_policy, cfg):
    N, H, V, T = 31, 16, 173, 0.9
    hidden, weight, bias, targets = make_inputs(N, H, V, with_bias=True, n_ignored=2, seed=5)
    extra = loss_inputs(N, seed=6)
    extra["mask"] &= targets != -100
    extra["seq_ids"] = torch.tensor([5] * 9 + [-2] + [7] * 6 + [1] * 15)  # a single-token sequence
    old = None
    if not on_policy:
        with torch.no_grad():
            old = fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=T) + 0.4 * torch.randn(
                N, generator=torch.Generator().manual_seed(7))

    kw = dict(extra, **cfg)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss, metrics, entropy, logprobs = fused_linear_policy_loss(
        leaves[0], leaves[1], targets, old, kw.pop("advantages"), kw.pop("mask"), bias=leaves[2], temperature=T,
        impl=impl, chunk_size=8, return_entropy=True, return_logprobs=True, **kw)
    (2.0 * loss).backward()

    loss64, metrics64, grads64, entropy64, logprobs64 = oracle64(hidden, weight, bias, targets, old, extra, cfg, T)
    assert_close_to_reference(loss, loss64, atol=1e-6, rtol=1e-5, name="loss")
    for k in metrics64:
        assert_close_to_reference(metrics[k], metrics64[k], atol=1e-6, rtol=1e-5, name=f"metric {k}")
    for name, leaf, g64 in zip(("d hidden", "d weight", "d bias"), leaves, grads64):
        assert_close_to_reference(leaf.grad, 2.0 * g64, atol=2e-6, rtol=1e-4, name=name)
    assert not entropy.requires_grad
    assert_close_to_reference(entropy, entropy64, atol=1e-5, rtol=1e-5, name="entropy")
    assert not logprobs.requires_grad
    assert_close_to_reference(logprobs, logprobs64, atol=1e-5, rtol=1e-5, name="logprobs")
    if "off_policy_mask_threshold" in cfg and not on_policy:  # some but not all sequences dropped
        keep = off_policy_sequence_mask(extra["advantages"], fused_linear_logprobs(
            hidden, weight, targets, bias=bias, temperature=T), old, extra["mask"], extra["seq_ids"], 0.02)
        assert 0 < int(keep[extra["mask"]].sum()) < int(extra["mask"].sum())
    if not on_policy and cfg.get("loss_type") not in NEVER_CLIP:
        assert float(metrics["clip_frac_high"]) + float(metrics["clip_frac_low"]) > 0, "no clipping exercised"


def test_top_entropy_mask_drops_the_policy_term_of_low_entropy_tokens():
    """With q = 0 only the highest-entropy token keeps its policy term; the KL term stays on every token
    (TRL's order): the loss equals the composed ops with that one-token policy mask."""
    N, H, V = 20, 8, 50
    hidden, weight, _, targets = make_inputs(N, H, V, seed=13)
    extra = loss_inputs(N, seed=14)
    lp, ent = fused_linear_logprobs(hidden, weight, targets, return_entropy=True)
    keep = high_entropy_mask(ent, extra["mask"], 0.0)
    assert int(keep.sum()) == 1
    kw = dict(extra, kl_coef=0.1)
    adv, mask = kw.pop("advantages"), kw.pop("mask")
    want, _ = policy_loss(lp, lp, adv, mask, policy_mask=keep, **kw)
    got, _ = fused_linear_policy_loss(hidden, weight, targets, None, adv, mask, top_entropy_quantile=0.0, **kw)
    assert_close_to_reference(got, want, atol=1e-7, rtol=1e-6)
    kl_only, _ = policy_loss(lp, lp, torch.zeros_like(adv), mask, **kw)
    assert float(got) != pytest.approx(float(kl_only))  # the kept token's policy term is there


@pytest.mark.parametrize("bad,match", [({"top_entropy_quantile": 1.5}, "top_entropy_quantile"),
                                       ({"importance_sampling_level": "sequence", "seq_ids": None}, "seq_ids"),
                                       ({"loss_type": "cispo", "delta": 2.0}, "delta"),
                                       ({"loss_type": "vespo", "seq_ids": None}, "seq_ids"),
                                       ({"loss_type": "sapo", "sapo_temperatures": (1.0, -1.0)},
                                        "sapo_temperatures"),
                                       ({"off_policy_mask_threshold": 0.1, "seq_ids": None}, "seq_ids"),
                                       ({"off_policy_mask_threshold": float("nan")}, "off_policy_mask_threshold")])
def test_bad_variant_input(bad, match):
    hidden, weight, _, targets = make_inputs(6, 4, 11, seed=1)
    kw = {"seq_ids": torch.zeros(6, dtype=torch.long), **bad}
    with pytest.raises(ValueError, match=match):
        fused_linear_policy_loss(hidden, weight, targets, torch.zeros(6), torch.zeros(6), torch.ones(6), **kw)
