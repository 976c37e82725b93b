"""The production launches the sm_90 audit compiles: each op's own launch wrapper at production shapes.

Every case runs inside `audit_compile.sm90_compile_session()`: tensors are storage-less fake "cuda"
tensors, so the shapes are the real ones (logits tiles of 883 x 151936, 2^24 policy-loss tokens)
at no memory cost. A case calls the same private launcher the public op calls on CUDA, so the
block sizes, warps, stages and constexpr flags are the ones production picks.

Shapes (issue 11): logprob N=16384, H=4096, V=151936 and 128256 in bf16 and fp32 (the d weight
float32-accumulation kernel in bf16 and fp16, the dtypes it serves); policy loss
N=2^24; advantages B=16384; attention Hq/Hkv 16/4 and 32/8, D 64 and 128, causal and not, bf16,
fp16 and fp32, forward and backward, on a 64k-token packed batch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class AuditCase:
    op: str
    label: str
    dtype: torch.dtype
    """The dtype that selects the kernel's configuration (q for attention, the logits tile for logprob)."""
    run: Callable[[], object]
    spill_is_failure: bool
    """A spill fails the audit: every 16-bit config, fp32 attention, and every config of an op that is
    fp32 only; not the fp32 logprob epilogues (issue 11 asks spill-free 16-bit production configs)."""


def _empty(*shape, dtype=torch.float32):
    return torch.empty(*shape, dtype=dtype, device="cuda")


# ----------------------------------------------------------------------------- attention

ATTENTION_TOKENS = 65536
ATTENTION_MAX_SEQLEN = 4096
ATTENTION_SEQUENCES = 64


def _attention_run(hq: int, hkv: int, d: int, dtype: torch.dtype, causal: bool):
    attention = importlib.import_module("wz_kernels.attention")  # the module (wz_kernels re-exports same-named functions)

    def run():
        n = ATTENTION_TOKENS
        q, do = _empty(n, hq, d, dtype=dtype), _empty(n, hq, d, dtype=dtype)
        k, v = _empty(n, hkv, d, dtype=dtype), _empty(n, hkv, d, dtype=dtype)
        cu = _empty(ATTENTION_SEQUENCES + 1, dtype=torch.int32)
        scale = d ** -0.5
        out, lse = attention._fwd_launch(q, k, v, cu, ATTENTION_MAX_SEQLEN, causal, scale)
        attention._bwd_launch(do, q, k, v, out, lse, cu, ATTENTION_MAX_SEQLEN, causal, scale)

    return run


def attention_cases() -> list[AuditCase]:
    """Production heads and head dims, plus D=256 (the largest the kernel takes) at one head layout.

    fp32 spills fail too: fp32 on CUDA runs these kernels (their docstring promises no spill)."""
    shapes = [(hq, hkv, d) for hq, hkv in ((16, 4), (32, 8)) for d in (64, 128)] + [(16, 4, 256)]
    cases = []
    for hq, hkv, d in shapes:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for causal in (True, False):
                label = f"Hq{hq}/Hkv{hkv} D{d} {'causal' if causal else 'full'} N={ATTENTION_TOKENS}"
                cases.append(AuditCase("attention", label, dtype, _attention_run(hq, hkv, d, dtype, causal), True))
    return cases


# ----------------------------------------------------------------------------- fused linear logprobs

LOGPROB_TOKENS, LOGPROB_HIDDEN, LOGPROB_VOCABS = 16384, 4096, (151936, 128256)


def _logprob_run(vocab: int, dtype: torch.dtype, with_entropy: bool):
    logprob = importlib.import_module("wz_kernels.logprob")  # the module (wz_kernels re-exports same-named functions)

    def run():
        hidden = _empty(LOGPROB_TOKENS, LOGPROB_HIDDEN, dtype=dtype)
        weight = _empty(vocab, LOGPROB_HIDDEN, dtype=dtype)
        plan = logprob._plan(hidden, weight, None, torch.float32, upcast=False, reference=False)
        logits = _empty(plan.chunk_size, vocab, dtype=plan.compute_dtype)
        targets = _empty(plan.chunk_size, dtype=torch.int64)
        grad = _empty(plan.chunk_size)
        _, entropy, lse = logprob._tile_fwd_triton(logits, targets, 1.0, -100, with_entropy)
        logprob._tile_bwd_triton(logits, targets, lse, entropy, grad, grad if with_entropy else None, 1.0, -100)

    return run


def _dweight_run(vocab: int, dtype: torch.dtype):
    """One chunk's d weight update into a float32 accumulator (grad_accum_dtype=torch.float32)."""
    logprob = importlib.import_module("wz_kernels.logprob")

    def run():
        hidden = _empty(LOGPROB_TOKENS, LOGPROB_HIDDEN, dtype=dtype)
        weight = _empty(vocab, LOGPROB_HIDDEN, dtype=dtype)
        plan = logprob._plan(hidden, weight, None, torch.float32, upcast=False, reference=False)
        acc = _empty(vocab, LOGPROB_HIDDEN, dtype=plan.grad_accum_dtype)
        dlogits = _empty(plan.chunk_size, vocab, dtype=plan.compute_dtype)
        logprob._accumulate_weight_grad(acc, dlogits, _empty(plan.chunk_size, LOGPROB_HIDDEN, dtype=dtype))

    return run


def logprob_cases() -> list[AuditCase]:
    shape = f"N={LOGPROB_TOKENS} H={LOGPROB_HIDDEN}"
    epilogues = [
        AuditCase("logprob", f"{shape} V={vocab}{' +entropy' if ent else ''}",
                  dtype, _logprob_run(vocab, dtype, ent), dtype in LOW_PRECISION)
        for vocab in LOGPROB_VOCABS for dtype in (torch.bfloat16, torch.float32) for ent in (False, True)
    ]
    dweight = [AuditCase("logprob", f"{shape} V={vocab} d weight fp32 accumulation", dtype,
                         _dweight_run(vocab, dtype), True)
               for vocab in LOGPROB_VOCABS for dtype in LOW_PRECISION]
    return epilogues + dweight


# ----------------------------------------------------------------------------- policy loss

POLICY_TOKENS = 1 << 24


def _policy_loss_run(kl_estimator: str | None, dual_clip: float | None, scalar_weight: bool,
                     loss_type: str = "ppo", level: str = "token", delta: float | None = None,
                     policy_mask: bool = False, kl_importance_weighted: bool = False):
    policy_loss = importlib.import_module("wz_kernels.policy_loss")  # the module (wz_kernels re-exports same-named functions)

    def run():
        n = POLICY_TOKENS
        logp, old, adv = _empty(n), _empty(n), _empty(n)
        ref = None if kl_estimator is None else _empty(n)
        weights = _empty(()) if scalar_weight else _empty(n)
        pmask = _empty(n, dtype=torch.bool) if policy_mask else None
        if level == "token" and loss_type != "vespo":
            policy_loss._policy_loss_terms_triton(
                logp, old, adv, _empty(n, dtype=torch.bool), weights, ref, 0.2, 0.28, dual_clip,
                0.0 if kl_estimator is None else 0.05, kl_estimator or "k3", loss_type=loss_type, delta=delta,
                policy_mask=pmask, kl_importance_weighted=kl_importance_weighted)
            return
        # Sequence levels and vespo: the launcher's O(N) torch segment sums cannot run on fake tensors, so the
        # kernel is launched as the launcher launches it (its launch config, its constexprs), with the per-token
        # sequence log-ratio and the d loss / d log_w output as plain [N] float32 tensors.
        block, programs, warps = policy_loss._launch_config(n, torch.device("cuda"))
        detached = loss_type in ("cispo", "vespo") and not kl_importance_weighted
        policy_loss._policy_loss_fwd_bwd_kernel[(programs,)](
            logp, old, adv, logp if ref is None else ref, _empty(n, dtype=torch.uint8), weights, _empty(n),
            logp if pmask is None else pmask.view(torch.uint8), _empty(n), _empty(n),
            _empty(programs, len(policy_loss.STAT_NAMES)), n, -(-n // block), 0.8, 1.28,
            0.0 if dual_clip is None else dual_clip, 0.05, 0.0 if delta is None else delta, 2.0, 3.0, 3.0, 2.0,
            HAS_DUAL=dual_clip is not None, W_IS_SCALE=scalar_weight,
            KL_KIND=policy_loss._KL_KIND[kl_estimator], LOSS_KIND=policy_loss.LOSS_TYPES.index(loss_type),
            KL_IW=kl_importance_weighted, IS_LEVEL=2 if detached or level == "sequence_token" else 1,
            HAS_DELTA=delta is not None, HAS_PMASK=policy_mask, NUM_STATS=len(policy_loss.STAT_NAMES),
            BLOCK=block, num_warps=warps)

    return run


def policy_loss_cases() -> list[AuditCase]:
    from wz_kernels.policy_loss import KL_ESTIMATORS

    variants = [(None, None, False), *((kl, None, False) for kl in KL_ESTIMATORS), ("k3", 3.0, False),
                ("k3", None, True)]
    cases = [
        AuditCase("policy_loss", f"N=2^24 kl={kl or 'none'}{' dual' if dual else ''}"
                  f"{' scalar-weight' if scalar else ''}", torch.float32, _policy_loss_run(kl, dual, scalar), True)
        for kl, dual, scalar in variants
    ]
    # the loss variants (GSPO, GSPO-token, CISPO, SAPO, VESPO, two-sided clip, top-entropy policy mask, the
    # importance-weighted KL), as the trainer and the TRL / verl wrappers launch them
    loss_variants = [
        ("delta", ("k3", None, True), {"delta": 1.5}),
        ("delta dual", ("k3", 3.0, False), {"delta": 1.5}),
        ("cispo", ("k3", None, True), {"loss_type": "cispo"}),
        ("cispo sequence policy-mask", ("k3", None, False),
         {"loss_type": "cispo", "level": "sequence", "policy_mask": True}),
        ("sequence", ("k3", None, True), {"level": "sequence"}),
        ("sequence delta dual policy-mask", ("k3", 3.0, False),
         {"level": "sequence", "delta": 1.5, "policy_mask": True}),
        ("sequence_token", ("k3+", None, True), {"level": "sequence_token"}),
        ("policy-mask", (None, None, True), {"policy_mask": True}),
        ("sapo", ("k3", None, True), {"loss_type": "sapo"}),
        ("sapo sequence kl-weighted policy-mask", ("k3", None, False),
         {"loss_type": "sapo", "level": "sequence", "kl_importance_weighted": True, "policy_mask": True}),
        ("vespo", ("k3", None, True), {"loss_type": "vespo"}),
        ("kl-weighted", ("k3", None, True), {"kl_importance_weighted": True}),
        ("cispo sequence kl-weighted", ("k2", None, False),
         {"loss_type": "cispo", "level": "sequence", "kl_importance_weighted": True}),
    ]
    cases += [AuditCase("policy_loss", f"N=2^24 {label} kl={args[0] or 'none'}", torch.float32,
                        _policy_loss_run(*args, **kwargs), True) for label, args, kwargs in loss_variants]
    return cases


# ----------------------------------------------------------------------------- advantages

ADVANTAGE_ROWS = 16384


def advantage_cases() -> list[AuditCase]:
    advantage = importlib.import_module("wz_kernels.advantage")  # the module (wz_kernels re-exports same-named functions)

    def estimator(name):
        return lambda: advantage._group_advantages_triton(
            _empty(ADVANTAGE_ROWS), _empty(ADVANTAGE_ROWS, dtype=torch.int64), name, 1e-6)

    def gigpo(mode):
        return lambda: advantage._gigpo_advantages_triton(
            _empty(ADVANTAGE_ROWS), _empty(ADVANTAGE_ROWS, dtype=torch.int64), _empty(ADVANTAGE_ROWS),
            _empty(ADVANTAGE_ROWS, dtype=torch.int64), 1.0, mode, 1e-6)

    def brpo():
        return advantage._brpo_advantages_triton(_empty(ADVANTAGE_ROWS), _empty(ADVANTAGE_ROWS, dtype=torch.int64),
                                                 0.6)

    cases = [AuditCase("advantage", f"B={ADVANTAGE_ROWS} {name}", torch.float32, estimator(name), True)
             for name in advantage.ESTIMATORS]
    cases.append(AuditCase("advantage", f"B={ADVANTAGE_ROWS} brpo", torch.float32, brpo, True))
    cases += [AuditCase("advantage", f"B={ADVANTAGE_ROWS} gigpo {mode}", torch.float32, gigpo(mode), True)
              for mode in advantage.GIGPO_MODES]
    return cases


def all_cases() -> list[AuditCase]:
    return attention_cases() + logprob_cases() + policy_loss_cases() + advantage_cases()


def entry_kernels() -> dict[str, str]:
    """Every module-level `@triton.jit` function of wz_kernels named `*_kernel` -> its module.

    The naming rule of the kernel contract (`_<op>_fwd_kernel`, ...): helpers called from kernels
    have other names. The audit fails when one of these is compiled by no case.
    """
    import pkgutil

    from triton.runtime.jit import JITFunction

    import wz_kernels

    found = {}
    for info in pkgutil.iter_modules(wz_kernels.__path__):
        module = importlib.import_module(f"wz_kernels.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                found[name] = info.name
    return found

