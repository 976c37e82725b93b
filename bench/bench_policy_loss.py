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

from bench.harness import Case
from wz_kernels.policy_loss import policy_loss  # not wz_kernels.policy_loss: that name is also the module

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
    t = dict(logp=logp, old=old, ref=ref, adv=adv, mask=mask, seq_ids=seq_ids)
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


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cuda":  # 2**20: the target shape (launch-bound); 2**24: the bandwidth-bound regime
        sizes = [2**16] if quick else [2**20, 2**24]
    else:
        sizes = [2**14] if quick else [2**18]
    return [case for n in sizes for case in _cases_at(n, device)]


def _cases_at(num_tokens: int, device: str) -> list[Case]:
    t = make_inputs(num_tokens, device)
    out = []
    for agg in ("token-mean", "seq-mean-token-mean"):
        providers = {
            "ours": lambda agg=agg: fwd_bwd(ours, t, agg),
            "torch eager": lambda agg=agg: fwd_bwd(policy_loss_torch_eager, t, agg),
            "torch.compile": lambda agg=agg: fwd_bwd(policy_loss_torch_compile, t, agg),
        }
        bytes_per_token = 4 * 4 + 1 + 4 + (8 if agg != "token-mean" else 0)
        out.append(Case(f"N={num_tokens} {agg}", providers, bytes_moved=num_tokens * bytes_per_token))
    return out


# ----------------------------------------------------------------------------- pytest-benchmark

_SMALL = dict(num_tokens=4096, device="cpu")


def test_ours(benchmark):
    t = make_inputs(**_SMALL)
    benchmark(fwd_bwd, ours, t, "token-mean")


def test_torch_eager(benchmark):
    t = make_inputs(**_SMALL)
    benchmark(fwd_bwd, policy_loss_torch_eager, t, "token-mean")
    # the eager formula is the same loss as ours (a check that the benchmark compares like with like)
    logp = t["logp"].detach().requires_grad_(True)
    a, _ = policy_loss_torch_eager(logp, t["old"], t["ref"], t["adv"], t["mask"], t["seq_ids"], "token-mean")
    b, _ = ours(logp, t["old"], t["ref"], t["adv"], t["mask"], t["seq_ids"], "token-mean")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
