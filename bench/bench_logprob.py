"""Benchmarks of fused_linear_logprobs and fused_linear_policy_loss against the usual ways to do it.

`python -m bench logprob --device cpu` (or cuda) prints the table and writes CSV + PNG under
bench/results/. `pytest bench/bench_logprob.py --benchmark-enable` runs the pytest-benchmark tests.

Providers (each call builds its leaves fresh, so its peak memory includes the gradients it produces):
  ours           wz_kernels.fused_linear_logprobs / fused_linear_policy_loss (impl="auto")
  naive          matmul + log_softmax + gather (+ policy_loss for the loss variant): the [N, V] path
  compile        torch.compile of naive
  verl-chunked   verl-style torch loop: per token chunk, logits + log_softmax + gather under
                 torch.utils.checkpoint (recomputed in backward)
  liger          LigerFusedLinearCrossEntropyLoss(reduction="none") (= -logprob, CUDA only) /
                 LigerFusedLinearGRPOLoss for the loss variant (runs on CPU; compiled only on GPU)
  cce            cut_cross_entropy.linear_cross_entropy(..., reduction="none") where installed

TFLOP/s counts the useful work: 2NHV forward, 6NHV forward+backward. fused_linear_logprobs does
2NHV more in its backward (it recomputes each logits tile); the fused policy loss does not.
"""

from __future__ import annotations

import functools

import torch

from bench.harness import Case

try:
    from cut_cross_entropy import linear_cross_entropy  # type: ignore[import-not-found]
except ImportError:  # optional peer (bench extra)
    linear_cross_entropy = None


# ------------------------------------------------------------------------------- inputs


def make_inputs(N, H, V, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(device, dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(device, dtype)
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    return hidden, weight, targets


def loss_inputs(N, device, n_seqs=8, seed=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return dict(
        old_logprobs=(-5.0 + 0.3 * torch.randn(N, generator=g)).to(device),
        ref_logprobs=(-5.0 + 0.3 * torch.randn(N, generator=g)).to(device),
        advantages=torch.randn(n_seqs, generator=g).repeat_interleave(N // n_seqs).to(device),
        mask=torch.ones(N, dtype=torch.bool, device=device),
    )


# ------------------------------------------------------------------------------- log-prob providers


def naive_logprobs(hidden, weight, targets):
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]


@functools.cache
def compiled_naive():
    return torch.compile(naive_logprobs)


def verl_chunked_logprobs(hidden, weight, targets, chunk=1024):
    from torch.utils.checkpoint import checkpoint

    outs = [checkpoint(naive_logprobs, hidden[s:s + chunk], weight, targets[s:s + chunk], use_reentrant=False)
            for s in range(0, hidden.shape[0], chunk)]
    return torch.cat(outs)


def ours_logprobs(hidden, weight, targets):
    from wz_kernels.logprob import fused_linear_logprobs

    return fused_linear_logprobs(hidden, weight, targets)


@functools.cache
def _liger_flce():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(reduction="none")


def liger_logprobs(hidden, weight, targets):
    return -_liger_flce()(weight, hidden, targets)


def cce_logprobs(hidden, weight, targets):
    if linear_cross_entropy is None:
        raise ImportError("cut_cross_entropy is not installed")
    return -linear_cross_entropy(hidden, weight, targets, reduction="none")


LOGPROB_PROVIDERS = {
    "ours": ours_logprobs,
    "naive": naive_logprobs,
    "compile": lambda h, w, t: compiled_naive()(h, w, t),
    "verl-chunked": verl_chunked_logprobs,
    "liger": liger_logprobs,
    "cce": cce_logprobs,
}


def _fwd(fn, hidden, weight, targets):
    def run():
        with torch.no_grad():
            fn(hidden, weight, targets)
    return run


def _fwd_bwd(fn, hidden, weight, targets):
    def run():
        h = hidden.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(True)
        fn(h, w, targets).sum().backward()
    return run


# ------------------------------------------------------------------------------- policy-loss providers

LOSS_OPTS = dict(clip_low=0.2, clip_high=0.2, kl_coef=0.04, kl_estimator="k3", agg="token-mean")


def _loss_runner(kind, hidden, weight, targets, extra, n_seqs):
    from wz_kernels.logprob import fused_linear_policy_loss
    from wz_kernels.policy_loss import policy_loss  # (the package attribute is shadowed by the submodule)

    def run():
        h = hidden.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(True)
        if kind == "ours":
            loss, _ = fused_linear_policy_loss(h, w, targets, **extra, **LOSS_OPTS)
        elif kind in ("naive", "compile"):
            lp = (naive_logprobs if kind == "naive" else compiled_naive())(h, w, targets)
            loss, _ = policy_loss(lp, **extra, **LOSS_OPTS)
        else:  # liger: [B, T, H] layout, sequence advantages, DAPO (= token-mean) aggregation
            loss = _liger_grpo(h.is_cuda)(
                h.view(n_seqs, -1, h.shape[1]), w, targets.view(n_seqs, -1), extra["mask"].view(n_seqs, -1),
                extra["advantages"].view(n_seqs, -1)[:, 0],
                ref_per_token_logps=extra["ref_logprobs"].view(n_seqs, -1),
                old_per_token_logps=extra["old_logprobs"].view(n_seqs, -1),
            )
            loss = loss[0] if isinstance(loss, tuple) else loss
        loss.backward()
    return run


@functools.cache
def _liger_grpo(compiled: bool):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    return LigerFusedLinearGRPOLoss(beta=LOSS_OPTS["kl_coef"], compiled=compiled, use_ref_model=True,
                                    loss_type="dapo", epsilon_low=0.2, epsilon_high=0.2)


# ------------------------------------------------------------------------------- cases


def shapes(device: str, quick: bool):
    if quick:
        return [(256, 64, 1000, torch.float32)]
    if device == "cpu":
        return [(4096, 256, 32000, torch.float32)]
    return [(16384, 4096, 151936, torch.bfloat16), (2048, 4096, 151936, torch.bfloat16),
            (16384, 4096, 128256, torch.bfloat16)]


def cases(device: str, quick: bool) -> list[Case]:
    out = []
    providers = dict(LOGPROB_PROVIDERS)
    if linear_cross_entropy is None or device == "cpu":
        providers.pop("cce")  # CCE's kernels are Triton-on-CUDA only
    if device == "cpu":
        providers.pop("liger")  # Liger's FLCE is a Triton kernel: CUDA only (its GRPO loss runs on CPU)
    for N, H, V, dtype in shapes(device, quick):
        hidden, weight, targets = make_inputs(N, H, V, dtype, device)
        tag = f"N={N} H={H} V={V} {str(dtype).removeprefix('torch.')}"
        nhv = N * H * V
        fwd = {k: _fwd(f, hidden, weight, targets) for k, f in providers.items()}
        out.append(Case(f"logprobs fwd {tag}", fwd, flops=2 * nhv))
        out.append(Case(f"logprobs fwd+bwd {tag}",
                        {k: _fwd_bwd(f, hidden, weight, targets) for k, f in providers.items()},
                        flops=6 * nhv))
        n_seqs = 8
        extra = loss_inputs(N, device, n_seqs)
        out.append(Case(f"policy-loss fwd+bwd {tag}",
                        {k: _loss_runner(k, hidden, weight, targets, extra, n_seqs)
                         for k in ("ours", "naive", "compile", "liger")}, flops=6 * nhv))
    return out


# ------------------------------------------------------------------------------- pytest-benchmark

_SMALL = (512, 64, 2000)


def test_bench_fused_logprobs_fwd_bwd(benchmark):
    hidden, weight, targets = make_inputs(*_SMALL, torch.float32, "cpu")
    benchmark(_fwd_bwd(ours_logprobs, hidden, weight, targets))


def test_bench_naive_logprobs_fwd_bwd(benchmark):
    hidden, weight, targets = make_inputs(*_SMALL, torch.float32, "cpu")
    benchmark(_fwd_bwd(naive_logprobs, hidden, weight, targets))


def test_bench_fused_policy_loss_fwd_bwd(benchmark):
    hidden, weight, targets = make_inputs(*_SMALL, torch.float32, "cpu")
    benchmark(_loss_runner("ours", hidden, weight, targets, loss_inputs(_SMALL[0], "cpu"), 8))
