"""Clipped policy-gradient loss with a KL penalty, over packed tokens (PPO / GRPO / DAPO / Dr. GRPO).

Per token t (all inputs [N] over packed tokens; `mask` selects the tokens that train):

    ratio   = exp(clamp(logp - old_logp, -20, 20))
    L_clip  = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
    L_pg    = min(L_clip, -A * dual_clip)  if A < 0 and dual_clip is set, else L_clip
    d       = logp - ref_logp
    KL      = k1: d | k2: d^2 / 2 | k3: clamp(exp(-d) + d - 1, -10, 10) | k3+: k3's value, k2's gradient
    L_tok   = L_pg + kl_coef * KL
    loss    = sum_t weights[t] * L_tok[t]          (weights from `aggregation_weights`, 0 on masked tokens)

Gradient conventions (what the reference's autograd and the kernel both give):
  * a token whose clipped branch is strictly larger than the unclipped one ("clipped") has gradient 0
    from L_pg (the clipped branch is constant in logp); on a tie the branches have the same gradient.
    A clipped token is `clipped_low` when A < 0 (then ratio < 1 - clip_low) and `clipped_high` when
    A > 0 (then ratio > 1 + clip_high): exactly TRL's `is_low_clipped` / `is_high_clipped`. A == 0 is
    never clipped (its loss and gradient are 0 anyway).
  * a dual-clipped token (A < 0 and -A*ratio > -A*dual_clip, i.e. ratio > dual_clip) has gradient 0.
  * outside the ratio clamp (|logp - old_logp| > 20) the ratio is constant: gradient 0 from L_pg.
  * k3 is clamped to [-10, 10]; where the clamp is active its gradient is 0. exp(-d) is evaluated at
    clamp(d, -20, 20), which changes neither value nor gradient (|d| > 20 is inside the clamped zone)
    but keeps float32 finite.
  * masked tokens (mask == 0) contribute nothing, even if their inputs are NaN/Inf (they are zeroed
    before any arithmetic, so garbage in padding cannot leak into the loss or the gradient).

Layers (see DESIGN.md "one op = one module"):
  `policy_loss_reference`         plain torch autograd: the specification (`upcast=True` -> float64).
  `aggregation_weights`           turns mask (+ seq ids) into per-token weights for every `agg` mode.
  `token_loss_terms`              fused forward+backward primitive (loss, d loss/d logp, additive stats);
                                  `fused_linear_policy_loss` (kernels/logprob.py) builds on it per chunk.
  `_policy_loss_fwd_bwd_kernel`   the Triton kernel: one read of each input, one write of the gradient,
                                  per-program partial stats reduced by a tiny torch sum (deterministic).
  `wz_kernels::policy_loss_terms` torch.library custom op (+ fake + autograd) so torch.compile traces it.
  `policy_loss`                   the public function.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch

from ._backend import check_choice, check_tensor, resolve_impl

try:  # wz_kernels must import (reference paths) where triton is absent
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3", "k3+")
RATIO_LOG_CLAMP = 20.0  # |logp - old_logp| is clamped here before exp (exp(20) ~ 4.9e8)
K3_CLAMP = 10.0  # k3 is clamped to [-K3_CLAMP, K3_CLAMP] (it is >= 0, so only the top matters)

# Additive statistics (0-d sums over masked tokens, a float mask acting as a per-token weight). A
# caller that processes tokens in chunks or micro-batches adds them up and derives the metrics.
STAT_NAMES = (
    "tokens",  # sum of mask
    "clipped_low",  # tokens with ratio < 1 - clip_low and A < 0 (clipped branch active)
    "clipped_high",  # tokens with ratio > 1 + clip_high and A > 0 (clipped branch active)
    "clipped_dual",  # tokens with A < 0 and ratio > dual_clip (dual clip active)
    "ratio_sum",  # sum of ratio (after the log clamp)
    "kl_sum",  # sum of the KL estimate (0 without ref_logprobs)
    "loss_unweighted_sum",  # sum of L_tok = L_pg + kl_coef * KL
    "loss",  # sum of weights * L_tok (== the returned loss)
)
_OP = "policy_loss"


# ----------------------------------------------------------------------------- validation


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_config(op, *, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, ref_logprobs) -> None:
    for name, v in (("clip_low", clip_low), ("clip_high", clip_high)):
        if not _is_number(v) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{op}: {name} must be a finite number >= 0, got {v!r}")
    if dual_clip is not None and (not _is_number(dual_clip) or not math.isfinite(dual_clip) or dual_clip <= 1):
        raise ValueError(f"{op}: dual_clip must be None or a finite number > 1, got {dual_clip!r}")
    if not _is_number(kl_coef) or not math.isfinite(kl_coef) or kl_coef < 0:
        raise ValueError(f"{op}: kl_coef must be a finite number >= 0, got {kl_coef!r}")
    check_choice(op, "kl_estimator", kl_estimator, KL_ESTIMATORS)
    if kl_coef != 0 and ref_logprobs is None:
        raise ValueError(f"{op}: ref_logprobs is required when kl_coef != 0 (kl_coef={kl_coef})")


def _check_token_inputs(op, logprobs, old_logprobs, advantages, mask, ref_logprobs=None, weights=None):
    check_tensor(op, "logprobs", logprobs, ndim=1, floating=True)
    shape, dev = tuple(logprobs.shape), logprobs.device
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("ref_logprobs", ref_logprobs)):
        if t is not None or name in ("old_logprobs", "advantages"):
            check_tensor(op, name, t, shape=shape, floating=True, device=dev)
    _check_mask(op, mask, shape, dev)
    if weights is not None:
        check_tensor(op, "weights", weights, floating=True, device=dev)
        if weights.dim() != 0 and tuple(weights.shape) != shape:
            raise ValueError(f"{op}: weights must have shape {shape} or be 0-d (a scale of mask), "
                             f"got {tuple(weights.shape)}")


def _check_mask(op, mask, shape, dev):
    check_tensor(op, "mask", mask, shape=shape, device=dev)
    if mask.is_complex():
        raise ValueError(f"{op}: mask must be bool, integer or floating, got {mask.dtype}")


def _check_global(op, name, v, dev):
    if v is None:
        return
    if isinstance(v, torch.Tensor):
        if v.dim() != 0:
            raise ValueError(f"{op}: {name} must be a number or a 0-d tensor, got shape {tuple(v.shape)}")
        if v.is_complex() or v.dtype == torch.bool:
            raise ValueError(f"{op}: {name} must be a real number, got dtype {v.dtype}")
        if v.device != dev and v.device.type != "cpu":
            raise ValueError(f"{op}: {name} is on {v.device} but the other inputs are on {dev}")
        return  # a tensor's value is not checked: that would cost a host sync
    if not _is_number(v) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{op}: {name} must be a finite number > 0 (or a 0-d tensor), got {v!r}")


# ----------------------------------------------------------------------------- aggregation


def _dense_segment_ids(seq_ids: torch.Tensor) -> torch.Tensor:
    """Map arbitrary int ids [N] to dense ids in [0, U) [N] without a host sync or a dynamic shape.

    Equivalent to `torch.unique(seq_ids, return_inverse=True)[1]`, but built from a sort and a cumsum so
    it stays static-shaped (torch.compile fullgraph) and never waits on the GPU for the output size.
    """
    n = seq_ids.numel()
    # Packed batches usually come sorted; on CPU checking that is free (no device to wait for) and
    # skips the sort. Not under torch.compile: the branch is data-dependent.
    already_sorted = (seq_ids.device.type == "cpu" and not torch.compiler.is_compiling()
                      and bool((seq_ids[1:] >= seq_ids[:-1]).all()))
    sorted_ids, order = (seq_ids, None) if already_sorted else torch.sort(seq_ids)
    new_segment = torch.ones(n, dtype=torch.long, device=seq_ids.device)
    new_segment[1:] = (sorted_ids[1:] != sorted_ids[:-1]).long()
    dense_sorted = torch.cumsum(new_segment, 0) - 1
    if order is None:
        return dense_sorted
    return torch.empty_like(dense_sorted).scatter_(0, order, dense_sorted)


def aggregation_weights(
    mask: torch.Tensor,  # [N] bool / int / float
    seq_ids: torch.Tensor | None,  # [N] int, any values (tokens of one sequence share an id)
    agg: str,
    *,
    loss_scale: float | None = None,
    global_tokens: float | torch.Tensor | None = None,
    global_seqs: float | torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    per_token: bool = True,
) -> torch.Tensor:  # [N] `dtype` (or 0-d, see per_token)
    """Per-token weights w [N] such that `loss = sum(w * per_token_loss)` for aggregation mode `agg`.

    With m = mask as a float (a float mask acts as a per-token weight), n_s = sum of m over the
    token's sequence, S = `global_seqs` or the number of distinct sequences with sum(m) > 0, and
    T = `global_tokens` or sum(m):

    ======================== ==================== ======================================================
    agg                      w                    meaning
    ======================== ==================== ======================================================
    token-mean               m / T                mean over all unmasked tokens (DAPO; TRL "bnpo"/"dapo")
    seq-mean-token-mean      m / (n_s * S)        mean per sequence, then over sequences (TRL "grpo")
    seq-mean-token-sum       m / S                sum per sequence, mean over sequences
    seq-mean-token-sum-norm  m / (S * loss_scale) Dr. GRPO: sum per sequence / a constant, mean over seqs
    ======================== ==================== ======================================================

    TRL's `dr_grpo` (`(per_token_loss * mask).sum() / (B * max_completion_length)`) is
    `seq-mean-token-sum-norm` with `global_seqs=B` (B counts every sequence, even fully masked ones)
    and `loss_scale=max_completion_length`.

    Gradient accumulation: pass `global_tokens` (token-mean) / `global_seqs` (seq-* modes) computed over
    the whole batch (all micro-batches, all ranks as the caller wants). Then, as long as no sequence is
    split across micro-batches, the micro-batch losses (and gradients) add up exactly to the
    one-big-batch ones. Both may be passed to any mode; each mode uses what it needs. They can be
    Python numbers (checked > 0) or 0-d tensors (not checked: that would sync).

    `seq_ids` is required by the seq-* modes; ids may be any ints, unsorted and non-contiguous.
    Nothing here syncs with the device. An all-masked input gives all-zero weights (no NaN).

    `per_token=False` returns, for every mode but seq-mean-token-mean, the 0-d scale c with
    w = mask * c instead of w [N]: `token_loss_terms` folds it in, saving an [N] float32 pass.
    """
    op = "aggregation_weights"
    check_choice(op, "agg", agg, AGG_MODES)
    check_tensor(op, "mask", mask, ndim=1)
    _check_mask(op, mask, tuple(mask.shape), mask.device)
    dev = mask.device
    _check_global(op, "global_tokens", global_tokens, dev)
    _check_global(op, "global_seqs", global_seqs, dev)
    if agg == "seq-mean-token-sum-norm":
        if loss_scale is None:
            raise ValueError(f"{op}: loss_scale is required for agg='seq-mean-token-sum-norm' "
                             "(Dr. GRPO's constant, e.g. the max completion length)")
        if not _is_number(loss_scale) or not math.isfinite(loss_scale) or loss_scale <= 0:
            raise ValueError(f"{op}: loss_scale must be a finite number > 0, got {loss_scale!r}")
    elif loss_scale is not None:
        raise ValueError(f"{op}: loss_scale only applies to agg='seq-mean-token-sum-norm', got agg={agg!r}")
    if agg.startswith("seq-"):
        if seq_ids is None:
            raise ValueError(f"{op}: seq_ids is required for agg={agg!r}")
        check_tensor(op, "seq_ids", seq_ids, shape=tuple(mask.shape), integer=True, device=dev)

    # w = base * c; base = m, or 1 when the caller takes the 0-d scale c (w = mask * c) to fold in
    uniform = not per_token and agg != "seq-mean-token-mean"
    base = torch.ones((), dtype=dtype, device=dev) if uniform else mask.to(dtype)

    def safe_div(num, den):  # num is 0 wherever den is 0 (masked tokens / empty batch): give 0, not NaN
        den = torch.as_tensor(den, dtype=dtype, device=dev)
        return num / den.clamp_min(torch.finfo(dtype).tiny)  # one small op (launch count matters on GPU)

    if agg == "token-mean":
        return safe_div(base, mask.sum(dtype=dtype) if global_tokens is None else global_tokens)

    n_seqs = global_seqs
    if n_seqs is None or agg == "seq-mean-token-mean":
        dense = _dense_segment_ids(seq_ids)
        per_seq = torch.zeros(mask.numel(), dtype=dtype, device=dev).index_add_(0, dense, mask.to(dtype))  # [N]
        if n_seqs is None:
            n_seqs = (per_seq > 0).sum().to(dtype)
    if agg == "seq-mean-token-mean":
        return safe_div(safe_div(base, per_seq[dense]), n_seqs)
    if agg == "seq-mean-token-sum":
        return safe_div(base, n_seqs)
    return safe_div(base, n_seqs) / loss_scale  # seq-mean-token-sum-norm


# ----------------------------------------------------------------------------- reference (the spec)


def _per_token_terms(logprobs, old_logprobs, advantages, valid, ref_logprobs, *, clip_low, clip_high,
                     dual_clip, kl_coef, kl_estimator):
    """Per-token loss [N] (autograd-able in logprobs) and per-token indicators/values for the stats.

    All inputs already in the compute dtype; `valid` [N] bool. Masked tokens are zeroed first.
    """
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    logp = torch.where(valid, logprobs, zero)
    old = torch.where(valid, old_logprobs, zero)
    adv = torch.where(valid, advantages, zero)

    ratio = torch.exp(torch.clamp(logp - old, -RATIO_LOG_CLAMP, RATIO_LOG_CLAMP))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    if dual_clip is not None:
        dual_bound = -adv * dual_clip
        dual_active = (adv < 0) & (pg > dual_bound)
        pg = torch.where(adv < 0, torch.minimum(pg, dual_bound), pg)
    else:
        dual_active = torch.zeros_like(valid)

    if ref_logprobs is not None:
        d = logp - torch.where(valid, ref_logprobs, zero)
        k2 = 0.5 * d * d
        if kl_estimator == "k1":
            kl = d
        elif kl_estimator == "k2":
            kl = k2
        else:
            d_safe = torch.clamp(d, -2 * K3_CLAMP, 2 * K3_CLAMP)  # see module docstring: value/grad unchanged
            k3 = torch.clamp(torch.exp(-d_safe) + d_safe - 1.0, -K3_CLAMP, K3_CLAMP)
            kl = k3 if kl_estimator == "k3" else k2 + (k3 - k2).detach()  # k3+: straight-through
        total = pg + kl_coef * kl
    else:
        kl = torch.zeros_like(pg)
        total = pg
    total = torch.where(valid, total, zero)
    return total, {
        "clipped_low": clip_active & (adv < 0),
        "clipped_high": clip_active & (adv > 0),
        "clipped_dual": dual_active,
        "ratio": ratio,
        "kl": kl,
    }


def _stats_from_terms(total, terms, m, weights):
    """Additive 0-d stats (see STAT_NAMES) from per-token terms; m = mask as float [N]."""
    m = m.to(total.dtype)
    with torch.no_grad():
        return {
            "tokens": m.sum(),
            "clipped_low": (m * terms["clipped_low"]).sum(),
            "clipped_high": (m * terms["clipped_high"]).sum(),
            "clipped_dual": (m * terms["clipped_dual"]).sum(),
            "ratio_sum": (m * terms["ratio"]).sum(),  # masked inputs were zeroed: ratio 1, kl 0 there
            "kl_sum": (m * terms["kl"].detach()).sum(),
            "loss_unweighted_sum": (m * total.detach()).sum(),
            "loss": (weights * total.detach()).sum(),
        }


def metrics_from_stats(stats: dict | torch.Tensor) -> dict:
    """0-d metric tensors (no host sync) from additive stats (summed over chunks/micro-batches if any).

    `stats`: the dict of `token_loss_terms`, or the same values as a [len(STAT_NAMES)] vector.
    loss; clip_frac_low / clip_frac_high / clip_frac_dual = clipped tokens / tokens (TRL's definition
    for low/high); ratio_mean, kl_mean = means over masked tokens; tokens. Empty -> 0, never NaN.
    """
    vec = stats if isinstance(stats, torch.Tensor) else torch.stack([stats[k] for k in STAT_NAMES])
    vec = vec.detach()
    tokens = vec[STAT_NAMES.index("tokens")]
    # every sum is 0 when tokens is 0, so the tiny floor gives 0, not NaN; two ops in all (GPU launches)
    means = vec / tokens.clamp_min(torch.finfo(vec.dtype).tiny)
    return {
        "loss": vec[STAT_NAMES.index("loss")],
        "clip_frac_low": means[STAT_NAMES.index("clipped_low")],
        "clip_frac_high": means[STAT_NAMES.index("clipped_high")],
        "clip_frac_dual": means[STAT_NAMES.index("clipped_dual")],
        "ratio_mean": means[STAT_NAMES.index("ratio_sum")],
        "kl_mean": means[STAT_NAMES.index("kl_sum")],
        "tokens": tokens,
    }


def policy_loss_reference(
    logprobs, old_logprobs, advantages, mask, *, ref_logprobs=None, seq_ids=None, clip_low=0.2,
    clip_high=0.2, dual_clip=None, kl_coef=0.0, kl_estimator="k3", agg="token-mean", loss_scale=None,
    global_tokens=None, global_seqs=None, upcast=False,
):
    """Plain-torch autograd specification of `policy_loss` (same arguments and outputs).

    Computes in float32 (float64 with `upcast=True`) whatever the input dtypes; the gradient flows to
    `logprobs` through torch autograd.
    """
    _validate_all(_OP, logprobs, old_logprobs, advantages, mask, ref_logprobs, clip_low, clip_high,
                  dual_clip, kl_coef, kl_estimator)
    dtype = torch.float64 if upcast else torch.float32
    weights = aggregation_weights(mask, seq_ids, agg, loss_scale=loss_scale, global_tokens=global_tokens,
                                  global_seqs=global_seqs, dtype=dtype)
    valid = mask != 0
    total, terms = _per_token_terms(
        logprobs.to(dtype), old_logprobs.to(dtype), advantages.to(dtype), valid,
        None if ref_logprobs is None else ref_logprobs.to(dtype),
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef, kl_estimator=kl_estimator,
    )
    loss = (weights * total).sum()
    stats = _stats_from_terms(total, terms, mask.to(dtype), weights)
    return loss, metrics_from_stats(stats)


def _validate_all(op, logprobs, old_logprobs, advantages, mask, ref_logprobs, clip_low, clip_high, dual_clip,
                  kl_coef, kl_estimator, weights=None):
    _check_token_inputs(op, logprobs, old_logprobs, advantages, mask, ref_logprobs, weights)
    _check_config(op, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
                  kl_estimator=kl_estimator, ref_logprobs=ref_logprobs)


# ----------------------------------------------------------------------------- fused primitive


def _token_loss_terms_reference(logprobs, old_logprobs, advantages, mask, weights, ref_logprobs, *, clip_low,
                                clip_high, dual_clip, kl_coef, kl_estimator):
    """`token_loss_terms` by autograd of the reference (float32): the CPU path and the spec."""
    with torch.enable_grad():
        leaf = logprobs.detach().float().requires_grad_(True)
        total, terms = _per_token_terms(
            leaf, old_logprobs.detach().float(), advantages.detach().float(), mask != 0,
            None if ref_logprobs is None else ref_logprobs.detach().float(),
            clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
            kl_estimator=kl_estimator,
        )
        w = weights.detach().float()
        w = mask.float() * w if w.dim() == 0 else w  # [N]
        loss = (w * total).sum()
        (grad,) = torch.autograd.grad(loss, leaf)
    stats = _stats_from_terms(total, terms, mask.float(), w)
    return loss.detach(), grad, stats


def token_loss_terms(
    logprobs: torch.Tensor,  # [N] float (any float dtype)
    old_logprobs: torch.Tensor,  # [N] float
    advantages: torch.Tensor,  # [N] float (per token: broadcast sequence advantages before calling)
    mask: torch.Tensor,  # [N] bool / int / float
    weights: torch.Tensor,  # [N] float from aggregation_weights (0 on masked tokens), or 0-d: w = mask * weights
    *,
    ref_logprobs: torch.Tensor | None = None,  # [N] float
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    kl_coef: float,
    kl_estimator: str,
    impl: str = "auto",
):  # -> (loss 0-d f32, grad_logprobs [N] f32, stats: dict[str, 0-d f32])
    """Fused forward + backward of the per-token loss, no autograd: the primitive other ops build on.

    Returns `loss = sum(weights * L_tok)`, `grad_logprobs = d loss / d logprobs` [N] float32 and a dict
    of ADDITIVE 0-d float32 sums over masked tokens (keys = STAT_NAMES; see `metrics_from_stats`), so a
    caller processing token chunks adds them up. On CUDA (or impl="triton") this is one Triton kernel:
    one read of each input, one write of the gradient, per-program partial stats summed by torch.
    """
    check_tensor("token_loss_terms", "weights", weights, floating=True)
    _validate_all("token_loss_terms", logprobs, old_logprobs, advantages, mask, ref_logprobs, clip_low,
                  clip_high, dual_clip, kl_coef, kl_estimator, weights=weights)
    backend = resolve_impl(impl, logprobs.device, op="token_loss_terms")
    cfg = dict(clip_low=float(clip_low), clip_high=float(clip_high),
               dual_clip=None if dual_clip is None else float(dual_clip), kl_coef=float(kl_coef),
               kl_estimator=kl_estimator)
    if backend == "reference":
        return _token_loss_terms_reference(logprobs, old_logprobs, advantages, mask, weights, ref_logprobs, **cfg)
    loss, grad, stats_vec = policy_loss_terms_op(logprobs, old_logprobs, advantages, mask, weights, ref_logprobs,
                                                 **cfg)
    return loss, grad, dict(zip(STAT_NAMES, stats_vec.unbind(0)))


# ----------------------------------------------------------------------------- Triton kernel

_KL_KIND = {None: 0, "k1": 1, "k2": 2, "k3": 3, "k3+": 4}
_NUM_STATS = len(STAT_NAMES)

if triton is not None:

    @triton.jit
    def _policy_loss_fwd_bwd_kernel(
        logp_ptr, old_ptr, adv_ptr, ref_ptr, mask_ptr, w_ptr,  # [N] inputs (any float / mask dtype); w may be 0-d
        grad_ptr,  # [N] f32 out: d loss / d logp
        partials_ptr,  # [num_programs, NUM_STATS] f32 out: this program's stat sums
        N, n_tiles,
        clip_low, clip_high, dual_clip, kl_coef,  # Python floats (the interpreter passes them as such)
        HAS_DUAL: tl.constexpr, KL_KIND: tl.constexpr,  # KL_KIND: 0 none, 1 k1, 2 k2, 3 k3, 4 k3+
        W_IS_SCALE: tl.constexpr,  # w_ptr holds one scale c: w = mask * c (no [N] weights pass)
        NUM_STATS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # Forward and backward in one pass: the loss is a sum of per-token terms, so each token's
        # gradient needs only that token's inputs. Persistent grid: each program strides over tiles and
        # keeps its stat sums in registers, then writes one row of partials (no atomics: deterministic).
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        lanes = tl.arange(0, BLOCK)
        acc_tok = tl.zeros([BLOCK], dtype=tl.float32)
        acc_low = tl.zeros([BLOCK], dtype=tl.float32)
        acc_high = tl.zeros([BLOCK], dtype=tl.float32)
        acc_dual = tl.zeros([BLOCK], dtype=tl.float32)
        acc_ratio = tl.zeros([BLOCK], dtype=tl.float32)
        acc_kl = tl.zeros([BLOCK], dtype=tl.float32)
        acc_unw = tl.zeros([BLOCK], dtype=tl.float32)
        acc_loss = tl.zeros([BLOCK], dtype=tl.float32)
        if W_IS_SCALE:
            w_scale = tl.load(w_ptr).to(tl.float32)
        for tile in range(pid, n_tiles, nprog):
            offs = tile * BLOCK + lanes  # int32: N < 2**31 tokens per call
            in_bounds = offs < N
            m = tl.load(mask_ptr + offs, mask=in_bounds, other=0).to(tl.float32)
            valid = m != 0.0
            # masked tokens are zeroed before any arithmetic: garbage (NaN/Inf) there cannot leak
            logp = tl.where(valid, tl.load(logp_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32), 0.0)
            old = tl.where(valid, tl.load(old_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32), 0.0)
            adv = tl.where(valid, tl.load(adv_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32), 0.0)
            if W_IS_SCALE:
                w = m * w_scale
            else:
                w = tl.where(valid, tl.load(w_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32), 0.0)

            log_ratio = logp - old
            in_clamp = (log_ratio >= -20.0) & (log_ratio <= 20.0)  # torch.clamp passes grad at the bounds
            ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -20.0), 20.0))
            unclipped = -adv * ratio
            clipped = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
            clip_active = clipped > unclipped  # tie -> unclipped branch (same value and gradient)
            pg = tl.where(clip_active, clipped, unclipped)
            d_pg = tl.where(clip_active | (~in_clamp), 0.0, unclipped)  # d(-A*ratio)/dlogp = -A*ratio
            if HAS_DUAL:
                dual_bound = -adv * dual_clip
                dual_active = (adv < 0.0) & (pg > dual_bound)
                pg = tl.where(dual_active, dual_bound, pg)
                d_pg = tl.where(dual_active, 0.0, d_pg)
                acc_dual += tl.where(dual_active, m, 0.0)

            total = pg
            d_total = d_pg
            if KL_KIND != 0:
                ref = tl.where(valid, tl.load(ref_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32), 0.0)
                d = logp - ref
                if KL_KIND == 1:
                    kl = d
                    d_kl = tl.full([BLOCK], 1.0, tl.float32)
                elif KL_KIND == 2:
                    kl = 0.5 * d * d
                    d_kl = d
                else:
                    d_safe = tl.minimum(tl.maximum(d, -20.0), 20.0)
                    e = tl.exp(-d_safe)
                    k3_raw = e + d_safe - 1.0
                    kl = tl.minimum(tl.maximum(k3_raw, -10.0), 10.0)
                    if KL_KIND == 3:
                        d_kl = tl.where((k3_raw <= 10.0) & (k3_raw >= -10.0), 1.0 - e, 0.0)
                    else:  # k3+: k3's value, k2's gradient (straight-through)
                        d_kl = d
                kl = tl.where(valid, kl, 0.0)
                total = total + kl_coef * kl
                d_total = d_total + kl_coef * d_kl
                acc_kl += m * kl
            total = tl.where(valid, total, 0.0)
            tl.store(grad_ptr + offs, tl.where(valid, w * d_total, 0.0), mask=in_bounds)

            acc_tok += m
            acc_low += tl.where(clip_active & (adv < 0.0), m, 0.0)
            acc_high += tl.where(clip_active & (adv > 0.0), m, 0.0)
            acc_ratio += m * ratio
            acc_unw += m * total
            acc_loss += w * total
        row = partials_ptr + pid * NUM_STATS  # order = STAT_NAMES
        tl.store(row + 0, tl.sum(acc_tok, 0))
        tl.store(row + 1, tl.sum(acc_low, 0))
        tl.store(row + 2, tl.sum(acc_high, 0))
        tl.store(row + 3, tl.sum(acc_dual, 0))
        tl.store(row + 4, tl.sum(acc_ratio, 0))
        tl.store(row + 5, tl.sum(acc_kl, 0))
        tl.store(row + 6, tl.sum(acc_unw, 0))
        tl.store(row + 7, tl.sum(acc_loss, 0))


# CUDA launch, chosen from offline sm_90 compiles (Triton 3.6, ptxas -v) of this launcher at N = 2^24:
#   BLOCK 2048, 8 warps (8 tokens/thread): 98-142 registers -> 1-2 blocks (8-16 warps) per SM
#   BLOCK 1024, 8 warps (4 tokens/thread): 61-72 registers -> 3-4 blocks (24-32 warps) per SM
#   BLOCK  512, 4 warps (4 tokens/thread): 61-72 registers -> 7-8 blocks (28-32 warps) per SM  <- used
#   BLOCK  256, 2 warps (4 tokens/thread): 61-72 registers -> 14-16 blocks (28-32 warps) per SM
# (ranges over the KL / dual-clip / scalar-weight variants; no spills, <= 4 KB shared memory anywhere).
# The eight per-lane stat accumulators cost ~8 registers per token a thread owns, so 4 tokens per
# thread (one 128-bit load per input) is the sweet spot. The kernel is memory-bound (~25 bytes per
# token), so the goal is bytes in flight: 28 warps x 32 x 4 tokens x ~21 B read ~ 75 KB per SM, ~3x
# what 4.3 TB/s x ~700 ns of latency needs across 132 SMs. The persistent grid is exactly one wave of
# the least-resident variant (7 blocks per SM): every program is resident, none waits for a slot.
_CUDA_BLOCK, _CUDA_WARPS, _CUDA_BLOCKS_PER_SM = 512, 4, 7


def _launch_config(n: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK, num_programs, num_warps). The interpreter pays per program x loop step: few, wide tiles."""
    if device.type != "cuda":
        block = 256
        n_tiles = triton.cdiv(max(n, 1), block)
        return block, min(n_tiles, 4), 4
    n_tiles = triton.cdiv(max(n, 1), _CUDA_BLOCK)
    return _CUDA_BLOCK, min(n_tiles, _CUDA_BLOCKS_PER_SM * _sm_count(device.index)), _CUDA_WARPS


@functools.cache
def _sm_count(device_index: int | None) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _policy_loss_terms_triton(logprobs, old_logprobs, advantages, mask, weights, ref_logprobs, clip_low,
                              clip_high, dual_clip, kl_coef, kl_estimator, grad=None):
    """Launch the fused kernel. `grad` [N] f32: optional output buffer (tests pass a poisoned one)."""
    if triton is None:
        raise RuntimeError("token_loss_terms: impl='triton' was requested but triton is not installed")
    n = logprobs.numel()
    dev = logprobs.device
    grad = torch.empty(n, dtype=torch.float32, device=dev) if grad is None else grad
    if n == 0:
        return torch.zeros((), dtype=torch.float32, device=dev), grad, torch.zeros(_NUM_STATS, device=dev)
    block, nprog, num_warps = _launch_config(n, dev)
    partials = torch.empty(nprog, _NUM_STATS, dtype=torch.float32, device=dev)
    mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    contiguous = [t.contiguous() for t in (logprobs, old_logprobs, advantages, mask_arg, weights)]
    ref = contiguous[0] if ref_logprobs is None else ref_logprobs.contiguous()  # unread when KL_KIND == 0
    _policy_loss_fwd_bwd_kernel[(nprog,)](
        *contiguous[:3], ref, contiguous[3], contiguous[4], grad, partials, n, triton.cdiv(n, block),
        clip_low, clip_high, 0.0 if dual_clip is None else dual_clip, kl_coef,
        HAS_DUAL=dual_clip is not None, W_IS_SCALE=weights.dim() == 0,
        KL_KIND=_KL_KIND[None if ref_logprobs is None else kl_estimator],
        NUM_STATS=_NUM_STATS, BLOCK=block, num_warps=num_warps,
    )
    stats = partials.sum(0)
    return stats[_NUM_STATS - 1].clone(), grad, stats


# ----------------------------------------------------------------------------- torch.library registration


@torch.library.custom_op("wz_kernels::policy_loss_terms", mutates_args=())
def policy_loss_terms_op(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    weights: torch.Tensor, ref_logprobs: torch.Tensor | None, clip_low: float, clip_high: float,
    dual_clip: float | None, kl_coef: float, kl_estimator: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss 0-d f32, grad_logprobs [N] f32, stats [len(STAT_NAMES)] f32) from the Triton kernel."""
    return _policy_loss_terms_triton(logprobs, old_logprobs, advantages, mask, weights, ref_logprobs, clip_low,
                                     clip_high, dual_clip, kl_coef, kl_estimator)


@policy_loss_terms_op.register_fake
def _(logprobs, old_logprobs, advantages, mask, weights, ref_logprobs, clip_low, clip_high, dual_clip, kl_coef,
      kl_estimator):
    f32 = dict(dtype=torch.float32, device=logprobs.device)
    return logprobs.new_empty((), **f32), logprobs.new_empty(logprobs.shape, **f32), \
        logprobs.new_empty((_NUM_STATS,), **f32)


def _setup_context(ctx, inputs, output):
    ctx.logprobs_dtype = inputs[0].dtype
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, grad_grad, grad_stats):
    # Only the loss is differentiable (the gradient and the stats outputs are not trained through).
    (saved_grad,) = ctx.saved_tensors
    return ((grad_loss * saved_grad).to(ctx.logprobs_dtype),) + (None,) * 10


policy_loss_terms_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public function


def policy_loss(
    logprobs: torch.Tensor,  # [N] float, requires grad
    old_logprobs: torch.Tensor,  # [N] float (behaviour policy)
    advantages: torch.Tensor,  # [N] float (per token)
    mask: torch.Tensor,  # [N] bool / int / float
    *,
    ref_logprobs: torch.Tensor | None = None,  # [N] float (reference policy, for the KL term)
    seq_ids: torch.Tensor | None = None,  # [N] int (required by the seq-* modes)
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    agg: str = "token-mean",
    loss_scale: float | None = None,
    global_tokens: float | torch.Tensor | None = None,
    global_seqs: float | torch.Tensor | None = None,
    impl: str = "auto",
):  # -> (loss 0-d f32, metrics: dict[str, 0-d f32 tensor])
    """PPO-clip policy loss with asymmetric clip, dual clip and a KL penalty over packed tokens.

    Per-token semantics and gradient conventions: see the module docstring. Aggregation (`agg`,
    `loss_scale`, `global_tokens`, `global_seqs`, `seq_ids`): see `aggregation_weights`.
    Differentiable in `logprobs` only (the gradient comes back in logprobs' dtype).

    metrics (0-d tensors, detached, no host sync; means over this call's masked tokens):
      loss, clip_frac_low (ratio < 1-clip_low and A < 0), clip_frac_high (ratio > 1+clip_high and
      A > 0), clip_frac_dual (A < 0 and ratio > dual_clip), ratio_mean, kl_mean (0 without
      ref_logprobs), tokens (sum of mask).

    impl: "auto" (Triton on CUDA, the torch reference on CPU), "reference", "triton" (on CPU tensors
    under TRITON_INTERPRET=1). Bad input raises ValueError naming the argument.
    """
    _validate_all(_OP, logprobs, old_logprobs, advantages, mask, ref_logprobs, clip_low, clip_high, dual_clip,
                  kl_coef, kl_estimator)
    check_choice(_OP, "agg", agg, AGG_MODES)
    backend = resolve_impl(impl, logprobs.device, op=_OP)
    if backend == "reference":
        return policy_loss_reference(
            logprobs, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs, seq_ids=seq_ids,
            clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
            kl_estimator=kl_estimator, agg=agg, loss_scale=loss_scale, global_tokens=global_tokens,
            global_seqs=global_seqs,
        )
    weights = aggregation_weights(mask, seq_ids, agg, loss_scale=loss_scale, global_tokens=global_tokens,
                                  global_seqs=global_seqs, per_token=False)  # 0-d scale where the mode allows
    loss, _grad, stats_vec = policy_loss_terms_op(
        logprobs, old_logprobs, advantages, mask, weights, ref_logprobs, float(clip_low), float(clip_high),
        None if dual_clip is None else float(dual_clip), float(kl_coef), kl_estimator,
    )
    metrics = metrics_from_stats(stats_vec)
    return loss, metrics
