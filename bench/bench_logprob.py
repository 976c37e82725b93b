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

from bench.checks import REL_TOL, Check, compare, run_check
from bench.harness import Case, Skipped, optional_peer
from wz_kernels.logprob import fused_linear_logprobs_reference

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
    return {
        "old_logprobs": (-5.0 + 0.3 * torch.randn(N, generator=g)).to(device),
        "ref_logprobs": (-5.0 + 0.3 * torch.randn(N, generator=g)).to(device),
        "advantages": torch.randn(n_seqs, generator=g).repeat_interleave(N // n_seqs).to(device),
        "mask": torch.ones(N, dtype=torch.bool, device=device),
    }


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


def _run(fn, hidden, weight, targets, *, backward: bool):
    """One iteration: forward under no_grad, or forward + backward of sum(logp) into fresh leaves."""
    if isinstance(fn, Skipped):
        return fn

    def fwd():
        with torch.no_grad():
            fn(hidden, weight, targets)

    def fwd_bwd():
        h = hidden.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(True)
        fn(h, w, targets).sum().backward()
    return fwd_bwd if backward else fwd


# ------------------------------------------------------------------------------- policy-loss providers

LOSS_OPTS = {"clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.04, "kl_estimator": "k3", "agg": "token-mean"}


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


# ------------------------------------------------------------------------------- checks


def _leaves(hidden, weight, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in (hidden, weight)]


def logprob_outputs(kind: str, hidden, weight, targets, backward: bool) -> dict[str, torch.Tensor]:
    """Log-probs [N] (and d sum(logp) / d hidden, d weight) from ours, or from the library's
    specification in float64 (float64 leaves: its gradients are not rounded to the inputs' dtype)."""
    if kind == "ours":
        h, w = _leaves(hidden, weight)
        out = {"logprobs": ours_logprobs(h, w, targets)}
    else:
        h, w = _leaves(hidden, weight, torch.float64)
        out = {"logprobs": fused_linear_logprobs_reference(h, w, targets, upcast=True)}
    if backward:
        out["logprobs"].sum().backward()
        out.update({"d hidden": h.grad, "d weight": w.grad})
    return {k: v.detach() for k, v in out.items()}


def policy_loss_outputs(kind: str, hidden, weight, targets, extra) -> dict[str, torch.Tensor]:
    """Loss and d loss / d hidden, d weight: ours fused, or float64 reference log-probs -> reference loss."""
    from wz_kernels.logprob import fused_linear_policy_loss
    from wz_kernels.policy_loss import policy_loss_reference

    if kind == "ours":
        h, w = _leaves(hidden, weight)
        loss, _ = fused_linear_policy_loss(h, w, targets, **extra, **LOSS_OPTS)
    else:
        h, w = _leaves(hidden, weight, torch.float64)
        logp = fused_linear_logprobs_reference(h, w, targets, upcast=True)
        loss, _ = policy_loss_reference(logp, **extra, **LOSS_OPTS, upcast=True)
    loss.backward()
    return {"loss": loss.detach(), "d hidden": h.grad, "d weight": w.grad}


# ------------------------------------------------------------------------------- cases


def shapes(device: str, size: str):
    if size == "quick":
        return [(256, 64, 1000, torch.float32)]
    if device == "cpu":
        return [(4096, 256, 32000, torch.float32)]
    gpu = [(16384, 4096, 151936, torch.bfloat16), (2048, 4096, 151936, torch.bfloat16),
           (16384, 4096, 128256, torch.bfloat16)]
    return gpu[:1] if size == "headline" else gpu


def _peers(device: str) -> dict:
    """The log-prob providers that can run here; Liger's FLCE and CCE are Triton-on-CUDA only."""
    providers = dict(LOGPROB_PROVIDERS)
    if device == "cpu":
        providers["liger"] = providers["cce"] = Skipped("CUDA only")
    else:
        providers["liger"] = optional_peer("liger_kernel", "liger-kernel", liger_logprobs)
        providers["cce"] = optional_peer("cut_cross_entropy", "cut-cross-entropy", cce_logprobs)
    return providers


def cases(device: str, size: str):
    """Per shape: logprobs fwd, logprobs fwd+bwd, fused policy loss fwd+bwd (headline: the fwd+bwd
    of the target shape N=16384 H=4096 V=151936 bf16 only). Inputs are built when a shape's turn comes."""
    providers = _peers(device)
    for N, H, V, dtype in shapes(device, size):
        yield from _shape_cases(make_inputs(N, H, V, dtype, device), providers, device, size)


def _shape_cases(inputs, providers: dict, device: str, size: str):
    hidden, weight, targets = inputs
    (N, H), V, dtype = hidden.shape, weight.shape[0], hidden.dtype
    tag = f"N={N} H={H} V={V} {str(dtype).removeprefix('torch.')}"
    nhv = N * H * V

    # bf16: d weight is accumulated across the k token chunks in bf16 by default (<= 100 MB extra), which
    # RESULTS.md measures at ~1.2e-2 RMS relative error for k = 64 (k ~ 60 at the target shape)
    rel_tol = 5e-2 if dtype == torch.bfloat16 else None

    def check(backward: bool) -> Check:
        return Check(lambda: logprob_outputs("ours", hidden, weight, targets, backward),
                     lambda: logprob_outputs("reference", hidden, weight, targets, backward), dtype=dtype,
                     rel_tol=rel_tol)

    for backward in (False, True) if size != "headline" else (True,):
        yield Case(f"logprobs {'fwd+bwd' if backward else 'fwd'} {tag}",
                   {k: _run(f, hidden, weight, targets, backward=backward) for k, f in providers.items()},
                   check=check(backward), flops=(6 if backward else 2) * nhv)
    if size == "headline":
        return
    n_seqs = 8
    extra = loss_inputs(N, device, n_seqs)
    loss_providers = {k: _loss_runner(k, hidden, weight, targets, extra, n_seqs)
                      for k in ("ours", "naive", "compile", "liger")}
    loss_providers["liger"] = optional_peer("liger_kernel", "liger-kernel", loss_providers["liger"])
    yield Case(f"policy-loss fwd+bwd {tag}", loss_providers,
               check=Check(lambda: policy_loss_outputs("ours", hidden, weight, targets, extra),
                           lambda: policy_loss_outputs("reference", hidden, weight, targets, extra),
                           dtype=dtype, rel_tol=rel_tol),
               flops=6 * nhv)


# ------------------------------------------------------------------------------- pytest-benchmark

_SMALL = (512, 64, 2000)


def _small_case(label: str) -> Case:
    return next(c for c in cases("cpu", "quick") if c.label.startswith(label))


def test_bench_fused_logprobs_fwd_bwd(benchmark):
    case = _small_case("logprobs fwd+bwd")
    benchmark(case.providers["ours"])
    assert run_check(case.check) <= case.check.tolerance


def test_bench_naive_logprobs_fwd_bwd(benchmark):
    """The naive peer computes the same log-probs and gradients (the table compares like with like)."""
    hidden, weight, targets = make_inputs(*_SMALL, torch.float32, "cpu")
    benchmark(_run(naive_logprobs, hidden, weight, targets, backward=True))
    h, w = _leaves(hidden, weight)
    logp = naive_logprobs(h, w, targets)
    logp.sum().backward()
    compare({"logprobs": logp.detach(), "d hidden": h.grad, "d weight": w.grad},
            logprob_outputs("reference", hidden, weight, targets, backward=True), REL_TOL[torch.float32])


def test_bench_fused_policy_loss_fwd_bwd(benchmark):
    case = _small_case("policy-loss fwd+bwd")
    benchmark(case.providers["ours"])
    assert run_check(case.check) <= case.check.tolerance
