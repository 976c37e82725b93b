"""Policy loss + KL (k3), forward + backward, over N packed tokens (token-mean and seq-mean-token-mean).

Providers:
    ours           wz_kernels.policy_loss (the torch reference on CPU; one fused Triton fwd+bwd kernel
                   on CUDA, plus the tiny weight/stat reductions)
    torch eager    the formula a trainer writes (TRL/verl style): exp, clamp, max, k3, masked mean, the
                   clip-fraction metrics, then autograd backward
    torch.compile  the same formula compiled (inductor)

Liger's `triton_grpo_loss` is not a provider: it takes logits [B, L+1, V] and fuses the log-softmax,
so it computes a different (much larger) thing than a loss over given log-probs; its comparison belongs
to the fused linear policy loss benchmark (bench_logprob).

GB/s counts each input read once (logp, old, ref, adv f32; mask bool; seq ids int64 in seq-* modes)
and the gradient written once (f32).

`python -m bench policy_loss --device cpu` prints the table; `pytest bench/bench_policy_loss.py
--benchmark-enable` runs the pytest-benchmark versions.
"""

from __future__ import annotations

import torch

from bench.checks import REL_TOL, Check, compare, run_check
from bench.harness import Case
from wz_kernels.policy_loss import (  # not wz_kernels.policy_loss: that name is also the module
    policy_loss,
    policy_loss_reference,
)

CLIP_LOW, CLIP_HIGH, KL_COEF = 0.2, 0.28, 0.05


def make_inputs(num_tokens: int, device: str, seed: int = 0, mean_seq_len: int = 512):
    """Packed batch: f32 logp/old/ref/adv [N], bool mask [N] (prompt tokens off), int64 seq ids [N]."""
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(num_tokens, generator=gen) * 3
    old = logp + torch.randn(num_tokens, generator=gen) * 0.2
    ref = logp + torch.randn(num_tokens, generator=gen) * 0.2
    num_seqs = max(1, num_tokens // mean_seq_len)
    seq_ids = torch.sort(torch.randint(0, num_seqs, (num_tokens,), generator=gen)).values
    adv = torch.randn(num_seqs, generator=gen)[seq_ids]
    mask = torch.rand(num_tokens, generator=gen) > 0.2
    t = {"logp": logp, "old": old, "ref": ref, "adv": adv, "mask": mask, "seq_ids": seq_ids}
    return {k: v.to(device) for k, v in t.items()}


def policy_loss_torch_eager(logp, old, ref, adv, mask, seq_ids, agg: str):
    """The plain formula: PPO-clip (asymmetric) + k3 KL, masked aggregation, clip-fraction metrics."""
    ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH))
    d = logp - ref
    kl = torch.clamp(torch.exp(-d) + d - 1, -10.0, 10.0)
    per_token = pg + KL_COEF * kl
    m = mask.float()
    if agg == "token-mean":
        loss = (per_token * m).sum() / m.sum().clamp_min(1.0)
    else:  # seq-mean-token-mean; seq ids dense in 0..B-1 here (what the eager user assumes), B <= N
        num_seqs = seq_ids.numel()
        per_seq = torch.zeros(num_seqs, device=logp.device).index_add_(0, seq_ids, per_token * m)
        count = torch.zeros(num_seqs, device=logp.device).index_add_(0, seq_ids, m)
        loss = (per_seq / count.clamp_min(1.0)).sum() / (count > 0).sum()
    with torch.no_grad():
        tokens = m.sum().clamp_min(1.0)
        metrics = {
            "clip_frac_low": (((ratio < 1 - CLIP_LOW) & (adv < 0)).float() * m).sum() / tokens,
            "clip_frac_high": (((ratio > 1 + CLIP_HIGH) & (adv > 0)).float() * m).sum() / tokens,
            "ratio_mean": (ratio * m).sum() / tokens,
            "kl_mean": (kl * m).sum() / tokens,
        }
    return loss, metrics


_compiled = {}


def policy_loss_torch_compile(*args, agg: str):
    if agg not in _compiled:  # one compiled graph per mode; the first call (harness warmup) pays it
        _compiled[agg] = torch.compile(policy_loss_torch_eager, dynamic=False)
    return _compiled[agg](*args, agg=agg)


def ours(logp, old, ref, adv, mask, seq_ids, agg: str):
    return policy_loss(logp, old, adv, mask, ref_logprobs=ref, seq_ids=seq_ids, clip_low=CLIP_LOW,
                                  clip_high=CLIP_HIGH, kl_coef=KL_COEF, kl_estimator="k3", agg=agg)


def fwd_bwd(fn, t, agg):
    """One training-step call: a fresh leaf, forward, backward (returns nothing to keep)."""
    logp = t["logp"].detach().requires_grad_(True)
    loss, _metrics = fn(logp, t["old"], t["ref"], t["adv"], t["mask"], t["seq_ids"], agg=agg)
    loss.backward()


def cases(device: str, size: str):
    """CUDA: 2**24 token-mean (headline: the bandwidth-bound regime), 2**20 (the issue's launch-bound
    target shape) and 2**24 in both aggregations (full); CPU: 2**18 (2**14 quick)."""
    if device == "cuda":
        sizes = {"quick": [2**16], "headline": [2**24], "full": [2**20, 2**24]}[size]
    else:
        sizes = [2**14] if size == "quick" else [2**18]
    aggs = ("token-mean",) if size == "headline" else ("token-mean", "seq-mean-token-mean")
    for n in sizes:
        t = make_inputs(n, device)  # built when the case's turn comes, freed after it
        for agg in aggs:
            yield _case(t, agg)


def _case(t: dict, agg: str) -> Case:
    num_tokens = t["logp"].numel()
    providers = {
        "ours": lambda: fwd_bwd(ours, t, agg),
        "torch eager": lambda: fwd_bwd(policy_loss_torch_eager, t, agg),
        "torch.compile": lambda: fwd_bwd(policy_loss_torch_compile, t, agg),
    }
    bytes_per_token = 4 * 4 + 1 + 4 + (8 if agg != "token-mean" else 0)
    # rel_tol: the loss is a mean of nearly zero-mean terms (random advantages), so float32 summation
    # error relative to it is ~1e-4..1e-3; a wrong clip, sign or normaliser gives errors of order 0.1
    check = Check(lambda: loss_grad_metrics(ours, t, agg), lambda: loss_grad_metrics(reference, t, agg),
                  dtype=torch.float32, rel_tol=5e-3)
    return Case(f"N={num_tokens} {agg}", providers, check=check, bytes_moved=num_tokens * bytes_per_token)


CHECKED_METRICS = ("clip_frac_low", "clip_frac_high", "ratio_mean", "kl_mean")


def reference(logp, old, ref, adv, mask, seq_ids, agg: str):
    """The library's specification in float64."""
    return policy_loss_reference(logp, old, adv, mask, ref_logprobs=ref, seq_ids=seq_ids, clip_low=CLIP_LOW,
                                 clip_high=CLIP_HIGH, kl_coef=KL_COEF, kl_estimator="k3", agg=agg,
                                 upcast=True)


def loss_grad_metrics(fn, t, agg) -> dict[str, torch.Tensor]:
    """loss, d loss / d logp [N] and the clip / ratio / KL metrics of one call of `fn`."""
    logp = t["logp"].detach().requires_grad_(True)
    loss, metrics = fn(logp, t["old"], t["ref"], t["adv"], t["mask"], t["seq_ids"], agg=agg)
    (grad,) = torch.autograd.grad(loss, logp)
    return {"loss": loss.detach(), "grad": grad, **{k: metrics[k] for k in CHECKED_METRICS}}


# ----------------------------------------------------------------------------- pytest-benchmark

_SMALL = {"num_tokens": 4096, "device": "cpu"}


def test_ours(benchmark):
    case = _case(make_inputs(**_SMALL), "seq-mean-token-mean")
    benchmark(case.providers["ours"])
    assert run_check(case.check) <= case.check.tolerance


def test_torch_eager(benchmark):
    """The eager formula is the same loss, gradient and metrics (the table compares like with like)."""
    t = make_inputs(**_SMALL)
    benchmark(fwd_bwd, policy_loss_torch_eager, t, "token-mean")
    compare(loss_grad_metrics(policy_loss_torch_eager, t, "token-mean"),
            loss_grad_metrics(reference, t, "token-mean"), REL_TOL[torch.float32])
