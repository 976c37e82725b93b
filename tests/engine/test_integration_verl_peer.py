"""The verl wrappers against verl's OWN functions (verl 0.9.1's core_algos.py, imported by
tests/engine/verl_peer.py) on the same inputs: float64 in, float64 out, to float64 rounding; rewards with a
large common offset (1e4 + 0.01 x noise), rollout importance-sampling weights with zeros, verl's positional
calls, and every signature checked against verl's. Skipped (with the reason) where verl is not installed."""

import inspect

import numpy as np
import pytest
import torch

from tests.engine.verl_peer import VERL_VERSION, ActorConfig, installed_version, load_core_algos, verl_source
from wz_engine.integrations import verl as wz_verl

if verl_source() is None:
    pytest.skip(f"verl is not installed: pip install --no-deps verl=={VERL_VERSION} (or set WZ_VERL_SRC)",
                allow_module_level=True)
verl = load_core_algos()
AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
             "seq-mean-token-sum-norm"]
F64 = {"rtol": 1e-10, "atol": 1e-12}  # float64 against float64: rounding only


def test_the_version_compared_is_the_one_the_wrappers_follow():
    if installed_version() is not None:
        assert installed_version() == VERL_VERSION


def padded(b=9, t=13, seed=0):
    """old / new log-probs [B, T] float64 (ratios well outside the clip range), per-row advantages with a
    zero row and a dual-clip candidate, a ragged 0/1 mask with an empty and a single-token row."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[1], lengths[2] = 0, 1
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).double()
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    new = old + 0.6 * torch.randn(b, t, generator=g, dtype=torch.float64)
    new[0, 0] = old[0, 0] + 2.0
    adv = torch.randn(b, 1, generator=g, dtype=torch.float64).expand(b, t).clone()
    adv[0], adv[3] = -1.0, 0.0
    return old, new, adv, mask


def loss_and_grad(fn, new, old, *args, **kwargs):
    """fn(old, new, *args) with new as a fresh leaf -> (outputs, d outputs[0] / d new)."""
    leaf = new.clone().requires_grad_(True)
    out = fn(old, leaf, *args, **kwargs)
    loss = out[0]
    loss.backward()
    return out, leaf.grad


# ------------------------------------------------------------------------------------- signatures
def positional(fn):
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


@pytest.mark.parametrize("name", ["agg_loss", "compute_policy_loss", "compute_policy_loss_vanilla",
                                  "kl_penalty"])
def test_positional_signature_is_verls(name):
    verl_fn = inspect.unwrap(getattr(verl, name))
    assert positional(getattr(wz_verl, name)) == positional(verl_fn)


@pytest.mark.parametrize("name", sorted(wz_verl.ADV_ESTIMATORS))
def test_estimator_signature_is_verls(name):
    assert positional(wz_verl.get_adv_estimator_fn(name)) == positional(verl.get_adv_estimator_fn(name))


def test_get_adv_estimator_fn_covers_verls_names_it_implements_and_names_the_rest():
    for member in verl.AdvantageEstimator:
        if member.value in wz_verl.ADV_ESTIMATORS:
            assert wz_verl.get_adv_estimator_fn(member) is wz_verl.ADV_ESTIMATORS[member.value]
        else:
            with pytest.raises(ValueError, match=rf"{member.value!r} is not provided by wz.*available: \["):
                wz_verl.get_adv_estimator_fn(member)
    implemented = {"grpo", "rloo", "rloo_vectorized", "reinforce_plus_plus_baseline", "gpg"}
    assert implemented <= set(wz_verl.ADV_ESTIMATORS)


# ------------------------------------------------------------------------------------- advantages
def large_offset_rewards(b, t, mask, seed):
    """Rewards 1e4 + 0.01 x noise on each row's last valid token; group 3 all equal; float64."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.zeros(b, t, dtype=torch.float64)
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(b), last] = 1e4 + 0.01 * torch.randn(b, generator=g, dtype=torch.float64)
    rewards[7:10] = 0.0
    rewards[7:10, 0] = 1e4 + 0.005
    return rewards


GROUPS = ["p0", "p0", "p0", "p1", "p1", "p2", "p3", "p3", "p3", "p3", "p4", "p4"]  # p2: a singleton


@pytest.mark.parametrize("name,kwargs", [
    ("grpo", {}), ("grpo", {"norm_adv_by_std_in_grpo": False}), ("grpo", {"epsilon": 1e-3}), ("rloo", {}),
    ("rloo_vectorized", {}), ("reinforce_plus_plus_baseline", {}), ("gpg", {"f_norm": 2.0}),
])
def test_advantages_equal_verls_in_float64_with_large_offsets(name, kwargs):
    b, t = len(GROUPS), 7
    _, _, _, mask = padded(b, t, seed=4)
    rewards = large_offset_rewards(b, t, mask, seed=5)
    index = np.array(GROUPS, dtype=object)
    want, _ = verl.get_adv_estimator_fn(name)(rewards.clone(), mask, index, **kwargs)
    got, got_returns = wz_verl.get_adv_estimator_fn(name)(rewards, mask, index, **kwargs)
    assert got.dtype == torch.float64 and got_returns is got
    # Two places where verl itself rounds to float32 (ours is exact): GPG's alpha = B / #non-zero, and a
    # singleton group's std + epsilon (its std is the float32 tensor(1.0)); elsewhere float64 rounding only.
    singleton = torch.tensor([GROUPS.count(g) == 1 for g in GROUPS])
    loose = {"rtol": 2e-7, "atol": 1e-12}
    torch.testing.assert_close(got[~singleton], want[~singleton], **(loose if name == "gpg" else F64))
    torch.testing.assert_close(got[singleton], want[singleton], **loose)
    assert want[~singleton].abs().max() > 1e-3  # the 0.01 spread, not the 1e4 offset, decides


def test_float32_group_statistics_would_fail_this_comparison():
    """What the float64 path buys: rounding the same rewards to float32 first (the old behaviour) is off
    by far more than the tolerance above."""
    b, t = len(GROUPS), 7
    _, _, _, mask = padded(b, t, seed=4)
    rewards = large_offset_rewards(b, t, mask, seed=5)
    index = np.array(GROUPS, dtype=object)
    want, _ = verl.compute_grpo_outcome_advantage(rewards.clone(), mask, index)
    rounded, _ = wz_verl.compute_grpo_outcome_advantage(rewards.float(), mask.float(), index)
    assert (rounded.double() - want).abs().max() > 1e-3


# ------------------------------------------------------------------------------------- policy loss
@pytest.mark.parametrize("mode", AGG_MODES)
def test_positional_compute_policy_loss_equals_verls(mode):
    old, new, adv, mask = padded(seed=1)
    rest = (adv, mask, None, 0.2, 0.28, 3.0, mode)  # verl's positional order, cliprange=None
    want, want_grad = loss_and_grad(verl.compute_policy_loss, new, old, *rest)
    got, got_grad = loss_and_grad(wz_verl.compute_policy_loss, new, old, *rest)
    for name, g, w in zip(("pg_loss", "pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"), got, want):
        assert g.dtype == torch.float64, name
        torch.testing.assert_close(g.detach(), w.detach(), **F64, msg=name)
    torch.testing.assert_close(got_grad, want_grad, **F64)
    assert 0 < want[1] < 1 and want[3] > 0  # both clips really active


def test_the_five_argument_call_works():
    old, new, adv, mask = padded(seed=2)
    got = wz_verl.compute_policy_loss(old, new, adv, mask, 0.2)
    want = verl.compute_policy_loss(old, new, adv, mask, 0.2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **F64)


def weights_with_zeros(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = 2 * torch.rand(shape, generator=g, dtype=torch.float64)
    w[torch.rand(shape, generator=g) < 0.4] = 0.0
    return w


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("global_info", [{}, {"dp_size": 2, "batch_num_tokens": 61, "global_batch_size": 14,
                                             "loss_scale_factor": 16}], ids=["local", "global"])
def test_vanilla_with_is_weights_with_zeros_equals_verls(mode, global_info):
    old, new, adv, mask = padded(seed=3)
    weights = weights_with_zeros(mask.shape, seed=4)
    config = ActorConfig(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=0.28, clip_ratio_c=3.0,
                         global_batch_info=global_info)
    want, want_grad = loss_and_grad(verl.compute_policy_loss_vanilla, new, old, adv, mask, mode, config,
                                    rollout_is_weights=weights)
    got, got_grad = loss_and_grad(wz_verl.compute_policy_loss_vanilla, new, old, adv, mask, mode, config,
                                  rollout_is_weights=weights)
    torch.testing.assert_close(got[0], want[0], **F64)
    assert got[0].dtype == torch.float64
    assert got[1].keys() == want[1].keys()
    for key in want[1]:
        assert got[1][key] == pytest.approx(want[1][key], rel=1e-12, abs=1e-15), key
    torch.testing.assert_close(got_grad, want_grad, **F64)
    # the weights' zeros sit on clipped tokens: folding them into the advantages would lower pg_clipfrac
    folded = verl.compute_policy_loss(old, new, adv * weights, mask, None, 0.2, 0.28, 3.0, mode)[1]
    assert want[1]["actor/pg_clipfrac"] > float(folded) + 0.05


# ------------------------------------------------------------------------------------- agg_loss, KL
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("global_info", [{}, {"dp_size": 4, "batch_num_tokens": 90, "global_batch_size": 30,
                                             "loss_scale_factor": 11}], ids=["local", "global"])
def test_agg_loss_equals_verls(mode, global_info):
    _, _, _, mask = padded(seed=6)
    mask[4, :3] = 0.5  # a fractional mask weights tokens, in verl's sums and ours
    loss_mat = torch.randn(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    ref = loss_mat.clone().requires_grad_(True)
    want = verl.agg_loss(ref, mask, mode, **global_info)
    want.backward()
    ours = loss_mat.clone().requires_grad_(True)
    got = wz_verl.agg_loss(ours, mask, mode, **global_info)
    got.backward()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, **F64)
    torch.testing.assert_close(ours.grad, ref.grad, **F64)


@pytest.mark.parametrize("name", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k3+",
                                  "low_var_kl+", "k2+"])
def test_kl_penalty_equals_verls(name):
    g = torch.Generator().manual_seed(8)
    logp = -torch.rand(6, 9, generator=g, dtype=torch.float64) * 4
    ref = -torch.rand(6, 9, generator=g, dtype=torch.float64) * 4
    ref[0, 0] = logp[0, 0] + 30.0  # beyond both k3 clamps
    outs = []
    for fn in (verl.kl_penalty, wz_verl.kl_penalty):
        x = logp.clone().requires_grad_(True)
        value = fn(x, ref, name)
        value.sum().backward()
        outs.append((value.detach(), x.grad))
    (want, want_grad), (got, got_grad) = outs
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, **F64)
    torch.testing.assert_close(got_grad, want_grad, **F64)
