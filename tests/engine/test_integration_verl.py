"""verl-named functions against float64 transcriptions of verl's published formulas, in float32 and with
garbage in the padding (test_integration_verl_peer.py compares against verl's own functions in float64).

The oracles below follow verl/trainer/ppo/core_algos.py and verl/utils/torch_functional.py of verl 0.9.1
line by line, including their per-sample Python loops, in float64.
"""

import math
import uuid
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from wz_engine.integrations import verl as wz_verl

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


# ------------------------------------------------------------------------------------- verl oracles (float64)
def masked_sum(values, mask, axis=None):
    return (torch.where(mask.bool(), values, 0.0) * mask).sum(axis=axis)


def masked_mean(values, mask, axis=None):
    return masked_sum(values, mask, axis) / (mask.sum(axis=axis) + 1e-8)


def masked_whiten(values, mask):
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask) * mask.sum() / (mask.sum() - 1)
    return (values - mean) * torch.rsqrt(var + 1e-8)


def verl_agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                  loss_scale_factor=None):
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            batch_num_tokens = loss_mask.sum()
        return masked_sum(loss_mat, loss_mask) / batch_num_tokens * dp_size
    if loss_agg_mode == "token-sum":
        return masked_sum(loss_mat, loss_mask) * dp_size
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        seq_mask = (torch.sum(loss_mask, dim=-1) > 0).double()
        if global_batch_size is None:
            global_batch_size = seq_mask.sum()
        loss = masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        return loss
    if loss_agg_mode == "seq-mean-token-mean":
        seq_mask = torch.sum(loss_mask, dim=-1)
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_mask + 1e-8)
        seq_mask = (seq_mask > 0).double()
        if global_batch_size is None:
            global_batch_size = seq_mask.sum()
        return masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
    raise ValueError(loss_agg_mode)


def verl_policy_loss(old_log_prob, log_prob, advantages, response_mask, cliprange_low, cliprange_high, clip_ratio_c,
                     loss_agg_mode, **global_info):
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    ppo_kl = masked_mean(-negative_approx_kl, response_mask)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses1).double(), response_mask)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = masked_mean(torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).double(), response_mask)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    pg_loss = verl_agg_loss(pg_losses, response_mask, loss_agg_mode, **global_info)
    return pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower


def verl_kl(logprob, ref_logprob, name):
    if name in ("kl", "k1"):
        return logprob - ref_logprob
    if name == "abs":
        return (logprob - ref_logprob).abs()
    if name in ("mse", "k2"):
        return 0.5 * (logprob - ref_logprob).square()
    kl = torch.clamp(ref_logprob - logprob, min=-20, max=20)
    return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)


def verl_outcome_advantage(estimator, token_level_rewards, response_mask, index, epsilon=1e-6, norm_by_std=True):
    scores = token_level_rewards.sum(dim=-1).clone()
    id2score = defaultdict(list)
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
    id2mean = {k: (torch.tensor(0.0, dtype=torch.float64) if len(v) == 1 else torch.mean(torch.stack(v)))
               for k, v in id2score.items()}
    id2std = {k: (torch.tensor(1.0, dtype=torch.float64) if len(v) == 1 else torch.std(torch.stack(v)))
              for k, v in id2score.items()}
    for i in range(scores.shape[0]):
        n = len(id2score[index[i]])
        if estimator == "grpo":
            scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon) if norm_by_std \
                else scores[i] - id2mean[index[i]]
        elif estimator == "rloo":
            if n > 1:
                scores[i] = scores[i] * n / (n - 1) - id2mean[index[i]] * n / (n - 1)
        else:  # reinforce_plus_plus_baseline
            scores[i] = scores[i] - id2mean[index[i]]
    if estimator == "reinforce_plus_plus_baseline":
        tiled = scores.unsqueeze(-1).tile([1, response_mask.shape[-1]]) * response_mask
        return masked_whiten(tiled, response_mask) * response_mask
    return scores.unsqueeze(-1) * response_mask


# ------------------------------------------------------------------------------------- inputs
def padded_batch(b=7, t=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    lengths[1] = 0  # a fully masked row
    lengths[2] = 1  # a single-token row
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).float()
    old = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 3
    new = old + 0.6 * torch.randn(b, t, generator=gen, dtype=torch.float64)  # ratios well outside [0.8, 1.28]
    new[0, 0] = old[0, 0] + 2.0  # ratio e^2 > clip_ratio_c: a dual-clip candidate
    adv = torch.randn(b, generator=gen, dtype=torch.float64).unsqueeze(1).expand(b, t).clone()
    adv[0] = -1.0
    adv[3] = 0.0
    return old, new, adv, mask


def with_garbage_padding(x, mask):
    """NaN in the padding: must not leak into our results (verl's own seq-* modes would turn it into NaN)."""
    return torch.where(mask.bool(), x, torch.full_like(x, float("nan")))


# ------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("global_info", [{}, {"dp_size": 2, "batch_num_tokens": 50, "global_batch_size": 12,
                                             "loss_scale_factor": 16}])
def test_compute_policy_loss_matches_verl(mode, global_info):
    old, new64, adv, mask = padded_batch()
    ref_new = new64.clone().requires_grad_(True)
    want = verl_policy_loss(old, ref_new, adv, mask.double(), 0.2, 0.28, 3.0, mode, **global_info)
    want[0].backward()
    new = with_garbage_padding(new64.float(), mask).requires_grad_(True)
    got = wz_verl.compute_policy_loss(old.float(), new, adv.float(), mask, loss_agg_mode=mode, cliprange=0.2,
                                      cliprange_high=0.28, clip_ratio_c=3.0, **global_info)
    got[0].backward()
    for name, g, w in zip(("pg_loss", "pg_clipfrac", "ppo_kl", "pg_clipfrac_lower"), got, want):
        torch.testing.assert_close(g.double(), w.detach(), rtol=2e-5, atol=1e-6, msg=name)
    valid = mask.bool()
    torch.testing.assert_close(new.grad[valid].double(), ref_new.grad[valid], rtol=1e-5, atol=1e-7)
    assert torch.all(new.grad[~valid] == 0)
    assert 0 < want[1] < 1 and want[3] > 0  # both clips are really exercised


@pytest.mark.parametrize("mode", AGG_MODES)
def test_agg_loss_matches_verl(mode):
    _, _, _, mask = padded_batch(seed=3)
    loss64 = torch.randn(mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    want = verl_agg_loss(loss64, mask.double(), mode)
    loss = with_garbage_padding(loss64.float(), mask).requires_grad_(True)
    got = wz_verl.agg_loss(loss, mask, mode)
    got.backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # the gradient is the aggregation weight of each token: check against autograd of the oracle
    ref = loss64.clone().requires_grad_(True)
    verl_agg_loss(ref, mask.double(), mode).backward()
    torch.testing.assert_close(loss.grad.double(), ref.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k1+", "k3+", "low_var_kl+"])
def test_kl_penalty_matches_verl(name):
    gen = torch.Generator().manual_seed(5)
    logp = -torch.rand(6, 9, generator=gen, dtype=torch.float64) * 4
    ref = -torch.rand(6, 9, generator=gen, dtype=torch.float64) * 4
    ref[0, 0] = logp[0, 0] + 30.0  # k3 beyond its clamp
    x = logp.float().requires_grad_(True)
    got = wz_verl.kl_penalty(x, ref.float(), name)
    base = name.rstrip("+")
    want = verl_kl(logp, ref, base)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    grad_name = "k2" if name.endswith("+") else base  # "+": the k2 gradient (straight-through)
    y = logp.clone().requires_grad_(True)
    verl_kl(y, ref, grad_name).sum().backward()
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, want", [
    ("k1", [1.0, -1.0, 30.0]),
    ("abs", [1.0, 1.0, 30.0]),
    ("k2", [0.5, 0.5, 450.0]),
    # exp(-d) + d - 1 with -d clamped to +-20, then the value to +-10
    ("low_var_kl", [math.exp(-1.0), math.e - 2.0, 10.0]),
])
def test_kl_penalty_hand_computed(name, want):
    """Hand values, independent of both the library and the transcription above: d = logp - ref."""
    logp = torch.tensor([-1.0, -2.0, 0.0])
    ref = torch.tensor([-2.0, -1.0, -30.0])  # d = 1, -1, 30 (the last hits both clamps for k3)
    got = wz_verl.kl_penalty(logp, ref, name)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, want", [
    ("k1", [1.0, 1.0, 1.0]),
    ("abs", [1.0, -1.0, 1.0]),
    ("k2", [1.0, -1.0, 30.0]),
    ("low_var_kl", [1.0 - math.exp(-1.0), 1.0 - math.e, 0.0]),  # 1 - exp(-d); 0 where the clamp holds
    ("k1+", [1.0, -1.0, 30.0]),  # "+": the k2 gradient d whatever the value
    ("k3+", [1.0, -1.0, 30.0]),
])
def test_kl_penalty_gradient_hand_computed(name, want):
    """d estimate / d logp by hand at d = 1, -1, 30 (independent of the transcription above)."""
    logp = torch.tensor([-1.0, -2.0, 0.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-2.0, -1.0, -30.0], dtype=torch.float64)
    wz_verl.kl_penalty(logp, ref, name).sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def uids(kind, b):
    groups = [0, 0, 0, 1, 1, 2, 3, 3, 3, 3][:b]  # group 2 is a singleton
    if kind == "str":
        return np.array([f"prompt-{g}" for g in groups], dtype=object)
    if kind == "uuid":
        table = {g: uuid.UUID(int=1000 + 7 * g) for g in set(groups)}
        return np.array([table[g] for g in groups], dtype=object)
    if kind == "int-tensor":
        return torch.tensor([10 * g + 5 for g in groups])
    return [10 * g - 3 for g in groups]  # python ints, negative included


@pytest.mark.parametrize("kind", ["str", "uuid", "int-tensor", "list"])
@pytest.mark.parametrize("estimator,kwargs", [
    ("grpo", {}), ("grpo", {"norm_adv_by_std_in_grpo": False}), ("grpo", {"epsilon": 1e-2}), ("rloo", {}),
    ("reinforce_plus_plus_baseline", {}),
])
def test_outcome_advantages_match_verl(kind, estimator, kwargs):
    b, t = 10, 6
    gen = torch.Generator().manual_seed(6)
    _, _, _, mask = padded_batch(b, t, seed=7)
    rewards = torch.zeros(b, t, dtype=torch.float64)
    rewards[torch.arange(b), (mask.sum(1).long() - 1).clamp(min=0)] = torch.randn(b, generator=gen, dtype=torch.float64)
    rewards[7:10, -1] = 0.5  # group 3: equal rewards except the first token's reward below
    rewards[7:10, :-1] = 0.0
    index = uids(kind, b)
    fn = wz_verl.get_adv_estimator_fn(estimator)
    adv, returns = fn(rewards.float(), mask, index, **kwargs)
    oracle_index = index.tolist() if isinstance(index, torch.Tensor) else list(index)
    want = verl_outcome_advantage(estimator, rewards, mask.double(), oracle_index,
                                  epsilon=kwargs.get("epsilon", 1e-6),
                                  norm_by_std=kwargs.get("norm_adv_by_std_in_grpo", True))
    torch.testing.assert_close(adv.double(), want, rtol=1e-5, atol=1e-5)
    assert returns is adv


def test_index_to_group_ids_is_a_consistent_factorisation():
    mixed = np.array(["a", 3, "a", 3, uuid.UUID(int=1)], dtype=object)  # unorderable mix -> str fallback
    ids = wz_verl.index_to_group_ids(mixed)
    assert ids.tolist()[0] == ids.tolist()[2] and ids.tolist()[1] == ids.tolist()[3]
    assert len(set(ids.tolist())) == 3
    floats = wz_verl.index_to_group_ids(torch.tensor([0.5, 1.5, 0.5]))
    assert floats[0] == floats[2] != floats[1]


def test_compute_policy_loss_vanilla_config_and_rollout_weights():
    old, new64, adv, mask = padded_batch(seed=8)
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    weights[:, ::2] = 0.0  # zero weights (rejected samples): they still count in the clip metrics, as in verl
    config = SimpleNamespace(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=0.28, clip_ratio_c=3.0,
                             global_batch_info={})
    loss, metrics = wz_verl.compute_policy_loss_vanilla(old.float(), new64.float(), adv.float(), mask,
                                                         loss_agg_mode="token-mean", config=config,
                                                         rollout_is_weights=weights.float())
    # verl multiplies the per-token loss by the weights after the clipping
    negative_approx_kl = torch.clamp(new64 - old, -20, 20)
    ratio = torch.exp(negative_approx_kl)
    l1, l2 = -adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.28)
    clipped = torch.maximum(l1, l2)
    per_token = torch.where(adv < 0, torch.min(-adv * 3.0, clipped), clipped) * weights
    want = verl_agg_loss(per_token, mask.double(), "token-mean")
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert set(metrics) == {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}
    # verl computes the clip metrics on the unweighted advantages
    _, clipfrac, ppo_kl, clipfrac_lower = verl_policy_loss(old, new64, adv, mask.double(), 0.2, 0.28, 3.0,
                                                           "token-mean")
    for key, want_metric in (("actor/pg_clipfrac", clipfrac), ("actor/ppo_kl", ppo_kl),
                             ("actor/pg_clipfrac_lower", clipfrac_lower)):
        assert metrics[key] == pytest.approx(float(want_metric), rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("call,match", [
    (lambda o, n, a, m: wz_verl.compute_policy_loss(o, n, a, m, cliprange=0.2, loss_agg_mode="token-avg"),
     "loss_agg_mode"),
    (lambda o, n, a, m: wz_verl.agg_loss(n, m, "token-mean", dp_size=2), "batch_num_tokens"),
    (lambda o, n, a, m: wz_verl.agg_loss(n, m, "seq-mean-token-mean", dp_size=2), "global_batch_size"),
    (lambda o, n, a, m: wz_verl.compute_policy_loss(o, n, a, m, cliprange=0.2, clip_ratio_c=1.0), "clip_ratio_c"),
    (lambda o, n, a, m: wz_verl.compute_policy_loss(o, n, a, m), "cliprange"),
    (lambda o, n, a, m: wz_verl.compute_policy_loss(o, n[:, :3], a, m, cliprange=0.2), "log_prob"),
    (lambda o, n, a, m: wz_verl.kl_penalty(n, o, "full"), "full"),
    (lambda o, n, a, m: wz_verl.kl_penalty(n, o, "k4"), "kl_penalty"),
    (lambda o, n, a, m: wz_verl.get_adv_estimator_fn("gae"), "gae"),
    (lambda o, n, a, m: wz_verl.compute_grpo_outcome_advantage(a, m, ["x"] * 3), "index"),
])
def test_bad_input_is_a_clear_error(call, match):
    old, new, adv, mask = padded_batch()
    with pytest.raises(ValueError, match=match):
        call(old.float(), new.float(), adv.float(), mask)
