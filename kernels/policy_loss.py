"""Clipped policy-gradient loss with a KL penalty, over packed tokens (PPO / GRPO / DAPO / Dr. GRPO,
GSPO and GSPO-token, CISPO, SAPO, VESPO, two-sided clipping, top-entropy masking).

Per token t of sequence b (all inputs [N] over packed tokens; `mask` selects the tokens that train):

    log_w   = importance_sampling_level  "token":          logp - old_logp
                                         "sequence":       S_b = mean of (logp - old_logp) over b's tokens
                                                           (GSPO; the gradient reaches every token of b)
                                         "sequence_token": logp - sg(logp) + sg(S_b) (GSPO-token: S_b's value,
                                                           each token's own gradient)
    ratio   = exp(clamp(log_w, -20, 20))                   (sg = stop-gradient)
    loss_type "ppo":
      coef    = min(ratio, delta)  if delta is set (two-sided clipping, INTELLECT-2 / TRL), else ratio
      L_clip  = max(-A * coef, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
      L_pg    = min(L_clip, -A * dual_clip)  if A < 0 and dual_clip is set, else L_clip
    loss_type "cispo" (MiniMax-M1; clip_low >= 1: no lower bound, as TRL implements it):
      L_pg    = -sg(clip(ratio, 1 - clip_low, 1 + clip_high)) * A * logp
    loss_type "sapo" (Soft Adaptive Policy Optimization; a soft gate instead of the hard clip):
      L_pg    = -sigmoid(tau * (ratio - 1)) * 4 / tau * A,   tau = tau_pos if A > 0 else tau_neg
    loss_type "vespo" (its own sequence-level weight; importance_sampling_level must be "token"):
      W_b     = clamp(sum over b's tokens of clamp(logp - old_logp, -20, 20), log(1e-8), 20)   (a SUM)
      phi_b   = exp(lam + k * W_b - lam * exp(W_b))   (k, lam) = (k_pos, lam_pos) if A >= 0 else the neg pair,
                lam floored at 1e-4, a non-finite phi set to 0 (TRL's get_gamma_weights; phi(ratio 1) = 1)
      L_pg    = -sg(phi_b) * A * logp      (ratio = exp(W_b) in the stats)
    L_pg   *= policy_mask[t]  where given (e.g. `high_entropy_mask`: only the top-entropy tokens' policy term)
    d       = logp - ref_logp
    KL      = k1: d | k2: d^2 / 2 | k3: clamp(exp(-d) + d - 1, -10, 10) | k3+: k3's value, k2's gradient
    KL     *= ratio  with kl_importance_weighted (DeepSeek-V3.2's unbiased KL, TRL's use_bias_correction_kl:
              the ratio differentiable, through the sequence mean at level "sequence"; not for vespo)
    L_tok   = L_pg + kl_coef * KL
    loss    = sum_t weights[t] * L_tok[t]          (weights from `aggregation_weights`, 0 on masked tokens)

TRL's `loss_type`s in these terms: grpo / bnpo / dr_grpo / dapo / luspo are "ppo" with an aggregation
(luspo = seq-mean-token-sum), cispo is "cispo" with clip_low = 1 and clip_high = TRL's epsilon_high - 1 (TRL
caps at epsilon_high itself); sapo and vespo are ours with TRL's temperatures / gamma parameters
(`sapo_temperatures`, `vespo_gamma`); TRL's `delta` is `delta`, its `importance_sampling_level` is ours.
verl's cispo is "cispo" with its clip ratios.

Gradient conventions (what the reference's autograd and the kernel both give):
  * a token whose clipped branch is strictly larger than the unclipped one ("clipped") takes the
    clipped branch's gradient (0 outside [1 - clip_low, 1 + clip_high]); on a tie the branches have the
    same gradient. `clipped_low` counts tokens with coef < 1 - clip_low and A < 0, `clipped_high` those
    with coef > 1 + clip_high and A > 0: exactly TRL's `is_low_clipped` / `is_high_clipped` (for
    "cispo": ratio > 1 + clip_high and A > 0, TRL's `cispo_clip_ratio`; clipped_low is then 0; sapo and
    vespo never clip: both 0).
    A == 0 is never clipped (its loss and gradient are 0 anyway).
  * with delta, coef = min(ratio, delta) has gradient 0 where ratio > delta.
  * a dual-clipped token (A < 0 and -A*ratio > -A*dual_clip, i.e. ratio > dual_clip) has gradient 0.
  * outside the ratio clamp (|log_w| > 20) the ratio is constant: gradient 0 through it.
  * k3 is clamped to [-10, 10]; where the clamp is active its gradient is 0. exp(-d) is evaluated at
    clamp(d, -20, 20), which changes neither value nor gradient (|d| > 20 is inside the clamped zone)
    but keeps float32 finite.
  * masked tokens (mask == 0) contribute nothing, even if their inputs are NaN/Inf (they are zeroed
    before any arithmetic, so garbage in padding cannot leak into the loss or the gradient). S_b is a
    plain mean over b's masked-in tokens (a float mask weights the loss, not the mean); a sequence
    without any has no loss.
  * "sequence" needs whole sequences in one call (the trainer never splits one across micro-batches).

Layers (see DESIGN.md "one op = one module"):
  `policy_loss_reference`         plain torch autograd: the specification (`upcast=True` -> float64).
  `aggregation_weights`           turns mask (+ seq ids) into per-token weights for every `agg` mode.
  `log_importance_weights`        log_w above, differentiable (reference; TRL's importance weights).
  `high_entropy_mask`             TRL's top-entropy-quantile token mask (one process's tokens).
  `token_loss_terms`              fused forward+backward primitive (loss, d loss/d logp, additive stats);
                                  `fused_linear_policy_loss` (kernels/logprob.py) builds on it per chunk.
  `_policy_loss_fwd_bwd_kernel`   the Triton kernel: one read of each input, one write of the gradient,
                                  per-program partial stats reduced by a tiny torch sum (deterministic).
                                  Sequence level: S_b comes in per token from two O(N) segment sums,
                                  the kernel writes each token's d loss / d log_w, and one more segment
                                  sum hands it to the sequence's tokens (float64 sums: order-independent
                                  to float64 rounding).
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
LOSS_TYPES = ("ppo", "cispo", "sapo", "vespo")
DETACHED_WEIGHT_LOSSES = ("cispo", "vespo")  # L_pg = -sg(weight) * A * logp: no gradient through log_w
SAPO_TEMPERATURES = (1.0, 1.05)  # (tau for A > 0, tau for A <= 0): TRL's defaults
VESPO_GAMMA = (2.0, 3.0, 3.0, 2.0)  # (k_pos, lambda_pos, k_neg, lambda_neg): TRL's defaults
VESPO_LOG_W_MIN = math.log(1e-8)  # TRL's lower clamp of the sequence log-ratio
VESPO_LAMBDA_MIN = 1e-4  # TRL floors lambda here
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_token")
RATIO_LOG_CLAMP = 20.0  # |log_w| (e.g. logp - old_logp) is clamped here before exp (exp(20) ~ 4.9e8)
K3_CLAMP = 10.0  # k3 is clamped to [-K3_CLAMP, K3_CLAMP] (it is >= 0, so only the top matters)

# Additive statistics (0-d sums over masked tokens, a float mask acting as a per-token weight). A
# caller that processes tokens in chunks or micro-batches adds them up and derives the metrics.
STAT_NAMES = (
    "tokens",  # sum of mask
    "clipped_low",  # tokens with coef < 1 - clip_low and A < 0 (clipped branch active; 0 for cispo)
    "clipped_high",  # tokens with coef > 1 + clip_high and A > 0 (cispo: ratio capped, A > 0)
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


def _check_config(op, *, clip_low, clip_high, dual_clip, kl_coef, kl_estimator, ref_logprobs, loss_type="ppo",
                  importance_sampling_level="token", delta=None, seq_ids=None, sapo_temperatures=SAPO_TEMPERATURES,
                  vespo_gamma=VESPO_GAMMA, kl_importance_weighted=False) -> None:
    check_choice(op, "loss_type", loss_type, LOSS_TYPES)
    check_choice(op, "importance_sampling_level", importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
    # cispo caps the ratio at 1 + clip_high, which may be below 1 (TRL's epsilon_high < 1): only > 0 is needed
    low_bounds = {"clip_low": 0.0, "clip_high": -1.0 if loss_type == "cispo" else 0.0}
    for name, v in (("clip_low", clip_low), ("clip_high", clip_high)):
        too_low = v < low_bounds[name] or (name == "clip_high" and v == -1.0) if _is_number(v) else True
        if too_low or not math.isfinite(v):
            bound = "> -1 for loss_type='cispo'" if low_bounds[name] < 0 else ">= 0"
            raise ValueError(f"{op}: {name} must be a finite number {bound}, got {v!r}")
    if dual_clip is not None and (not _is_number(dual_clip) or not math.isfinite(dual_clip) or dual_clip <= 1):
        raise ValueError(f"{op}: dual_clip must be None or a finite number > 1, got {dual_clip!r}")
    if delta is not None and (not _is_number(delta) or not math.isfinite(delta) or delta <= 0):
        raise ValueError(f"{op}: delta must be None or a finite number > 0, got {delta!r}")
    if loss_type != "ppo" and (dual_clip is not None or delta is not None):
        raise ValueError(f"{op}: dual_clip / delta bound the clipped PPO objective; loss_type={loss_type!r} takes "
                         f"neither (got dual_clip={dual_clip!r}, delta={delta!r})")
    _check_soft_params(op, sapo_temperatures, vespo_gamma)
    if loss_type == "vespo":
        if importance_sampling_level != "token":
            raise ValueError(f"{op}: loss_type='vespo' weighs each sequence by its own summed log-ratio; "
                             f"importance_sampling_level must be 'token', got {importance_sampling_level!r}")
        if kl_importance_weighted:
            raise ValueError(f"{op}: kl_importance_weighted is not defined for loss_type='vespo' (its weight "
                             "is not an importance ratio of the token)")
    if (importance_sampling_level != "token" or loss_type == "vespo") and seq_ids is None:
        raise ValueError(f"{op}: seq_ids is required for loss_type={loss_type!r}, "
                         f"importance_sampling_level={importance_sampling_level!r}")
    if kl_importance_weighted is not True and kl_importance_weighted is not False:
        raise ValueError(f"{op}: kl_importance_weighted must be a bool, got {kl_importance_weighted!r}")
    if not _is_number(kl_coef) or not math.isfinite(kl_coef) or kl_coef < 0:
        raise ValueError(f"{op}: kl_coef must be a finite number >= 0, got {kl_coef!r}")
    check_choice(op, "kl_estimator", kl_estimator, KL_ESTIMATORS)
    if kl_coef != 0 and ref_logprobs is None:
        raise ValueError(f"{op}: ref_logprobs is required when kl_coef != 0 (kl_coef={kl_coef})")


def _check_soft_params(op, sapo_temperatures, vespo_gamma) -> None:
    def numbers(v, n):
        return isinstance(v, (tuple, list)) and len(v) == n and all(_is_number(x) and math.isfinite(x) for x in v)

    if not numbers(sapo_temperatures, 2) or min(sapo_temperatures) <= 0:
        raise ValueError(f"{op}: sapo_temperatures must be two finite numbers > 0 (tau for A > 0, tau for "
                         f"A <= 0), got {sapo_temperatures!r}")
    if not numbers(vespo_gamma, 4) or vespo_gamma[1] <= 0 or vespo_gamma[3] <= 0:
        raise ValueError(f"{op}: vespo_gamma must be four finite numbers (k_pos, lambda_pos, k_neg, "
                         f"lambda_neg) with both lambdas > 0, got {vespo_gamma!r}")


def _check_token_inputs(op, logprobs, old_logprobs, advantages, mask, ref_logprobs=None, weights=None,
                        seq_ids=None, policy_mask=None):
    check_tensor(op, "logprobs", logprobs, ndim=1, floating=True)
    shape, dev = tuple(logprobs.shape), logprobs.device
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("ref_logprobs", ref_logprobs)):
        if t is not None or name in ("old_logprobs", "advantages"):
            check_tensor(op, name, t, shape=shape, floating=True, device=dev)
    _check_mask(op, mask, shape, dev)
    if policy_mask is not None:
        check_tensor(op, "policy_mask", policy_mask, shape=shape, device=dev)
        if policy_mask.is_complex():
            raise ValueError(f"{op}: policy_mask must be bool, integer or floating, got {policy_mask.dtype}")
    if seq_ids is not None:
        check_tensor(op, "seq_ids", seq_ids, shape=shape, integer=True, device=dev)
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


def log_importance_weights(
    logprobs: torch.Tensor,  # [N] float (requires grad or not)
    old_logprobs: torch.Tensor,  # [N] float
    mask: torch.Tensor,  # [N] bool / int / float
    seq_ids: torch.Tensor | None = None,  # [N] int (required unless level == "token")
    level: str = "token",
) -> torch.Tensor:  # [N] in logprobs' dtype, differentiable in logprobs
    """log_w of every token (module docstring; TRL's `log_importance_weights`, broadcast to tokens).

    "token": logp - old; "sequence": the mean of (logp - old) over the sequence's masked-in tokens (TRL
    divides by max(count, 1)), its gradient spread over those tokens; "sequence_token": that value with
    each token's own gradient (logp - sg(logp) + sg(S)). Masked tokens get 0 (and no gradient); NaN/Inf
    there never reaches a sequence's mean. Plain torch: the specification and what callers that need
    the weight itself (TRL's importance-weighted KL) use.
    """
    check_choice("log_importance_weights", "level", level, IMPORTANCE_SAMPLING_LEVELS)
    valid = mask != 0
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio = torch.where(valid, logprobs - old_logprobs.to(logprobs.dtype), zero)
    if level == "token":
        return log_ratio
    if seq_ids is None:
        raise ValueError(f"log_importance_weights: seq_ids is required for level={level!r}")
    dense = _dense_segment_ids(seq_ids)
    n = logprobs.numel()
    counts = torch.zeros(n, dtype=logprobs.dtype, device=logprobs.device)
    counts = counts.index_add(0, dense, valid.to(logprobs.dtype))
    seq_mean = torch.zeros_like(counts).index_add(0, dense, log_ratio) / counts.clamp_min(1.0)
    per_token = seq_mean[dense]
    if level == "sequence_token":
        own = torch.where(valid, logprobs, zero)
        per_token = own - own.detach() + per_token.detach()
    return torch.where(valid, per_token, zero)


def _segment_sum(values, dense):  # [N] -> each token's sequence total [N] (differentiable)
    return torch.zeros_like(values).index_add(0, dense, values)[dense]


def vespo_log_weights(
    logprobs: torch.Tensor,  # [N] float
    old_logprobs: torch.Tensor,  # [N] float
    mask: torch.Tensor,  # [N] bool / int / float
    seq_ids: torch.Tensor,  # [N] int
) -> torch.Tensor:  # [N] in logprobs' dtype, detached: W_b of each token's sequence (0 on masked tokens)
    """VESPO's sequence log-ratio W_b (module docstring): the SUM over b's masked-in tokens of the per-token
    log-ratio clamped to [-20, 20], clamped to [log(1e-8), 20] (TRL's `get_gamma_weights`, no vLLM ratio)."""
    valid = mask != 0
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    log_ratio = torch.where(valid, (logprobs - old_logprobs.to(logprobs.dtype)).detach(), zero)
    clamped = log_ratio.clamp(-RATIO_LOG_CLAMP, RATIO_LOG_CLAMP)
    per_token = _segment_sum(clamped, _dense_segment_ids(seq_ids)).clamp(VESPO_LOG_W_MIN, RATIO_LOG_CLAMP)
    return torch.where(valid, per_token, zero)


def gamma_weights(
    log_w: torch.Tensor,  # [N] float: W_b per token (vespo_log_weights)
    advantages: torch.Tensor,  # [N] float
    vespo_gamma: tuple[float, float, float, float] = VESPO_GAMMA,
) -> torch.Tensor:  # [N] phi_b, detached
    """VESPO's gamma weight phi = exp(lam + k W - lam e^W) (module docstring), non-finite -> 0."""
    k_pos, lam_pos, k_neg, lam_neg = (float(x) for x in vespo_gamma)
    nonneg = advantages >= 0
    k = torch.where(nonneg, k_pos, k_neg).to(log_w.dtype)
    lam = torch.where(nonneg, max(lam_pos, VESPO_LAMBDA_MIN), max(lam_neg, VESPO_LAMBDA_MIN)).to(log_w.dtype)
    log_w = log_w.detach()
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def off_policy_sequence_mask(
    advantages: torch.Tensor,  # [N] float
    logprobs: torch.Tensor,  # [N] float: the current policy's (used detached)
    sampling_logprobs: torch.Tensor,  # [N] float: the policy that sampled (old, or the inference engine's)
    mask: torch.Tensor,  # [N] bool / int / float
    seq_ids: torch.Tensor,  # [N] int
    threshold: float,
) -> torch.Tensor:  # [N] bool: keep
    """Off-policy sequence mask (DeepSeek-V3.2; TRL's `off_policy_mask_threshold`): drop the sequences with
    A < 0 whose mean over masked-in tokens of (sampling_logp - logp) exceeds `threshold` (a NaN difference
    counts 0, as TRL). Keeps every other token, masked ones included (the caller's mask handles those)."""
    if not _is_number(threshold) or not math.isfinite(threshold):
        raise ValueError(f"off_policy_sequence_mask: threshold must be a finite number, got {threshold!r}")
    valid = mask != 0
    dense = _dense_segment_ids(seq_ids)
    f64 = torch.float64
    kl = torch.where(valid, (sampling_logprobs.to(f64) - logprobs.detach().to(f64)).nan_to_num(nan=0.0), 0.0)
    mean_kl = _segment_sum(kl, dense) / _segment_sum(valid.to(f64), dense).clamp_min(1.0)
    return (advantages >= 0) | (mean_kl <= threshold)


def high_entropy_mask(
    entropy: torch.Tensor,  # [N] float
    mask: torch.Tensor,  # [N] bool / int / float
    top_quantile: float,
) -> torch.Tensor:  # [N] bool
    """Tokens in the top `top_quantile` of entropy among the masked-in ones (Beyond the 80/20 Rule; TRL's
    `get_high_entropy_mask` on one process): entropy >= torch.quantile(entropy[mask], 1 - top_quantile)
    (linear interpolation), always False where mask is 0. 1.0 keeps every token, 0.0 only the highest
    entropy (ties included). Compared in float32 whatever the entropy's dtype (TRL's entropies are float32,
    and a threshold that lands on a token's own value must select it). No tokens -> all False. TRL takes the quantile over all processes' tokens
    (gathered); a caller that wants that computes the threshold itself and passes the mask as
    `policy_mask`.
    """
    op = "high_entropy_mask"
    check_tensor(op, "entropy", entropy, ndim=1, floating=True)
    _check_mask(op, mask, tuple(entropy.shape), entropy.device)
    if not _is_number(top_quantile) or not 0.0 <= top_quantile <= 1.0:
        raise ValueError(f"{op}: top_quantile must be a number in [0, 1], got {top_quantile!r}")
    valid = mask != 0
    local = entropy[valid].float()
    if local.numel() == 0:
        return torch.zeros_like(valid)
    q = 1.0 - float(top_quantile)
    if local.numel() <= 1 << 24:  # torch.quantile's input limit
        threshold = torch.quantile(local, q)
    else:  # the same linear interpolation over a sort (what torch.quantile does internally)
        ordered = local.sort().values
        rank = torch.tensor(q * (ordered.numel() - 1), dtype=torch.float32, device=ordered.device)
        below = rank.long()
        threshold = torch.lerp(ordered[below], ordered[rank.ceil().long()], rank - below)
    return ((entropy.float() * valid.float()) >= threshold) & valid  # float32 throughout, as TRL


def _per_token_terms(logprobs, old_logprobs, advantages, valid, ref_logprobs, *, clip_low, clip_high,
                     dual_clip, kl_coef, kl_estimator, loss_type="ppo", importance_sampling_level="token",
                     delta=None, seq_ids=None, policy_mask=None, sapo_temperatures=SAPO_TEMPERATURES,
                     vespo_gamma=VESPO_GAMMA, kl_importance_weighted=False):
    """Per-token loss [N] (autograd-able in logprobs) and per-token indicators/values for the stats.

    All inputs already in the compute dtype; `valid` [N] bool. Masked tokens are zeroed first.
    """
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    logp = torch.where(valid, logprobs, zero)
    old = torch.where(valid, old_logprobs, zero)
    adv = torch.where(valid, advantages, zero)

    if loss_type == "vespo":
        log_w = vespo_log_weights(logp, old, valid, seq_ids)
    else:
        log_w = log_importance_weights(logp, old, valid, seq_ids, importance_sampling_level)
    ratio = torch.exp(torch.clamp(log_w, -RATIO_LOG_CLAMP, RATIO_LOG_CLAMP))
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    no_token = torch.zeros_like(valid)
    clipped_low, clipped_high, dual_active = no_token, no_token, no_token
    if loss_type == "cispo":
        pg = -torch.clamp(ratio, lo, hi).detach() * adv * logp
        clipped_high = (ratio > hi) & (adv > 0)
    elif loss_type == "vespo":
        pg = -gamma_weights(log_w, adv, vespo_gamma) * adv * logp
    elif loss_type == "sapo":
        tau = torch.where(adv > 0, float(sapo_temperatures[0]), float(sapo_temperatures[1])).to(ratio.dtype)
        pg = -torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * adv
    else:
        coef = ratio if delta is None else torch.clamp(ratio, max=delta)
        unclipped = -adv * coef
        clipped = -adv * torch.clamp(ratio, lo, hi)
        pg = torch.maximum(unclipped, clipped)
        clipped_low, clipped_high = (coef < lo) & (adv < 0), (coef > hi) & (adv > 0)
        if dual_clip is not None:
            dual_bound = -adv * dual_clip
            dual_active = (adv < 0) & (pg > dual_bound)
            pg = torch.where(adv < 0, torch.minimum(pg, dual_bound), pg)
    if policy_mask is not None:
        pg = pg * torch.where(valid, policy_mask.to(pg.dtype), zero)

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
        if kl_importance_weighted:
            kl = kl * ratio
        total = pg + kl_coef * kl
    else:
        kl = torch.zeros_like(pg)
        total = pg
    total = torch.where(valid, total, zero)
    return total, {
        "clipped_low": clipped_low,
        "clipped_high": clipped_high,
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
    global_tokens=None, global_seqs=None, loss_type="ppo", importance_sampling_level="token", delta=None,
    policy_mask=None, sapo_temperatures=SAPO_TEMPERATURES, vespo_gamma=VESPO_GAMMA, kl_importance_weighted=False,
    upcast=False,
):
    """Plain-torch autograd specification of `policy_loss` (same arguments and outputs).

    Computes in float32 (float64 with `upcast=True`) whatever the input dtypes; the gradient flows to
    `logprobs` through torch autograd.
    """
    variant = {"loss_type": loss_type, "importance_sampling_level": importance_sampling_level, "delta": delta,
               "sapo_temperatures": sapo_temperatures, "vespo_gamma": vespo_gamma,
               "kl_importance_weighted": kl_importance_weighted}
    _validate_all(_OP, logprobs, old_logprobs, advantages, mask, ref_logprobs, clip_low, clip_high,
                  dual_clip, kl_coef, kl_estimator, seq_ids=seq_ids, policy_mask=policy_mask, **variant)
    dtype = torch.float64 if upcast else torch.float32
    weights = aggregation_weights(mask, seq_ids, agg, loss_scale=loss_scale, global_tokens=global_tokens,
                                  global_seqs=global_seqs, dtype=dtype)
    valid = mask != 0
    total, terms = _per_token_terms(
        logprobs.to(dtype), old_logprobs.to(dtype), advantages.to(dtype), valid,
        None if ref_logprobs is None else ref_logprobs.to(dtype),
        clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef, kl_estimator=kl_estimator,
        seq_ids=seq_ids, policy_mask=policy_mask, **variant,
    )
    loss = (weights * total).sum()
    stats = _stats_from_terms(total, terms, mask.to(dtype), weights)
    return loss, metrics_from_stats(stats)


def _validate_all(op, logprobs, old_logprobs, advantages, mask, ref_logprobs, clip_low, clip_high, dual_clip,
                  kl_coef, kl_estimator, weights=None, seq_ids=None, policy_mask=None, **variant):
    _check_token_inputs(op, logprobs, old_logprobs, advantages, mask, ref_logprobs, weights, seq_ids,
                        policy_mask)
    _check_config(op, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, kl_coef=kl_coef,
                  kl_estimator=kl_estimator, ref_logprobs=ref_logprobs, seq_ids=seq_ids, **variant)


# ----------------------------------------------------------------------------- fused primitive


def _token_loss_terms_reference(logprobs, old_logprobs, advantages, mask, weights, ref_logprobs, seq_ids,
                                policy_mask, **cfg):
    """`token_loss_terms` by autograd of the reference (float32): the CPU path and the spec."""
    with torch.enable_grad():
        leaf = logprobs.detach().float().requires_grad_(True)
        total, terms = _per_token_terms(
            leaf, old_logprobs.detach().float(), advantages.detach().float(), mask != 0,
            None if ref_logprobs is None else ref_logprobs.detach().float(), seq_ids=seq_ids,
            policy_mask=policy_mask, **cfg,
        )
        w = weights.detach().float()
        w = mask.float() * w if w.dim() == 0 else w  # [N]
        loss = (w * total).sum()
        (grad,) = torch.autograd.grad(loss, leaf)
    stats = _stats_from_terms(total, terms, mask.float(), w)
    return loss.detach(), grad, stats


def _loss_config(clip_low, clip_high, dual_clip, kl_coef, kl_estimator, loss_type, importance_sampling_level,
                 delta, sapo_temperatures=SAPO_TEMPERATURES, vespo_gamma=VESPO_GAMMA,
                 kl_importance_weighted=False) -> dict:
    """The scalar settings as the custom op takes them (plain Python floats / strings / float lists); the
    values are validated by `_check_config` (a bad one passes through unconverted to be named there)."""
    def floats(v):
        return [float(x) for x in v] if isinstance(v, (tuple, list)) and all(map(_is_number, v)) else v

    return {"clip_low": float(clip_low), "clip_high": float(clip_high),
            "dual_clip": None if dual_clip is None else float(dual_clip), "kl_coef": float(kl_coef),
            "kl_estimator": kl_estimator, "loss_type": loss_type,
            "importance_sampling_level": importance_sampling_level,
            "delta": None if delta is None else float(delta), "sapo_temperatures": floats(sapo_temperatures),
            "vespo_gamma": floats(vespo_gamma), "kl_importance_weighted": kl_importance_weighted}


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
    loss_type: str = "ppo",
    importance_sampling_level: str = "token",
    delta: float | None = None,
    seq_ids: torch.Tensor | None = None,  # [N] int: required unless importance_sampling_level == "token"
    policy_mask: torch.Tensor | None = None,  # [N] bool / int / float
    sapo_temperatures: tuple[float, float] = SAPO_TEMPERATURES,
    vespo_gamma: tuple[float, float, float, float] = VESPO_GAMMA,
    kl_importance_weighted: bool = False,
    impl: str = "auto",
):  # -> (loss 0-d f32, grad_logprobs [N] f32, stats: dict[str, 0-d f32])
    """Fused forward + backward of the per-token loss, no autograd: the primitive other ops build on.

    Returns `loss = sum(weights * L_tok)`, `grad_logprobs = d loss / d logprobs` [N] float32 and a dict
    of ADDITIVE 0-d float32 sums over masked tokens (keys = STAT_NAMES; see `metrics_from_stats`), so a
    caller processing token chunks adds them up (importance_sampling_level "sequence" / "sequence_token":
    chunks of whole sequences). On CUDA (or impl="triton") this is one Triton kernel: one read of each
    input, one write of the gradient, per-program partial stats summed by torch.
    """
    check_tensor("token_loss_terms", "weights", weights, floating=True)
    cfg = _loss_config(clip_low, clip_high, dual_clip, kl_coef, kl_estimator, loss_type,
                       importance_sampling_level, delta, sapo_temperatures, vespo_gamma, kl_importance_weighted)
    _validate_all("token_loss_terms", logprobs, old_logprobs, advantages, mask, ref_logprobs, weights=weights,
                  seq_ids=seq_ids, policy_mask=policy_mask, **cfg)
    backend = resolve_impl(impl, logprobs.device, op="token_loss_terms")
    if backend == "reference":
        return _token_loss_terms_reference(logprobs, old_logprobs, advantages, mask, weights, ref_logprobs,
                                           seq_ids, policy_mask, **cfg)
    loss, grad, stats_vec = policy_loss_terms_op(logprobs, old_logprobs, advantages, mask, weights, ref_logprobs,
                                                 seq_ids=seq_ids, policy_mask=policy_mask, **cfg)
    return loss, grad, dict(zip(STAT_NAMES, stats_vec.unbind(0)))


# ----------------------------------------------------------------------------- Triton kernel

_KL_KIND = {None: 0, "k1": 1, "k2": 2, "k3": 3, "k3+": 4}
_NUM_STATS = len(STAT_NAMES)

if triton is not None:

    @triton.jit
    def _policy_loss_fwd_bwd_kernel(
        logp_ptr, old_ptr, adv_ptr, ref_ptr, mask_ptr, w_ptr,  # [N] inputs (any float / mask dtype); w may be 0-d
        lw_ptr,  # [N] f32: log_w per token (IS_LEVEL 1, 2: the sequence's mean log-ratio), else unread
        pm_ptr,  # [N] policy mask (HAS_PMASK), else unread
        grad_ptr,  # [N] f32 out: d loss / d logp (IS_LEVEL 1: only the terms not through log_w)
        dlw_ptr,  # [N] f32 out (IS_LEVEL 1): weight * d L_tok / d log_w, else unwritten
        partials_ptr,  # [num_programs, NUM_STATS] f32 out: this program's stat sums
        N, n_tiles,
        ratio_lo, ratio_hi, dual_clip, kl_coef, delta,  # Python floats (the interpreter passes them as such)
        soft_a_pos, soft_b_pos, soft_a_neg, soft_b_neg,  # sapo: (tau, -); vespo: (k, lambda) by the sign of A
        HAS_DUAL: tl.constexpr, KL_KIND: tl.constexpr,  # KL_KIND: 0 none, 1 k1, 2 k2, 3 k3, 4 k3+
        W_IS_SCALE: tl.constexpr,  # w_ptr holds one scale c: w = mask * c (no [N] weights pass)
        LOSS_KIND: tl.constexpr,  # LOSS_TYPES index: 0 ppo, 1 cispo, 2 sapo, 3 vespo (log_w = W_b, IS_LEVEL 2)
        KL_IW: tl.constexpr,  # the KL term times the (differentiable) ratio
        IS_LEVEL: tl.constexpr,  # 0 token, 1 sequence, 2 sequence_token (or a precomputed, detached log_w)
        HAS_DELTA: tl.constexpr, HAS_PMASK: tl.constexpr,
        NUM_STATS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # Forward and backward in one pass: the loss is a sum of per-token terms, so each token's
        # gradient needs only that token's inputs (and, at sequence level, its sequence's mean log-ratio,
        # precomputed; the gradient through that mean is finished by the caller). Persistent grid: each
        # program strides over tiles and keeps its stat sums in registers, then writes one row of
        # partials (no atomics: deterministic).
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
            if IS_LEVEL == 0:
                old = tl.where(valid, tl.load(old_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32), 0.0)
            else:
                log_w = tl.where(valid, tl.load(lw_ptr + offs, mask=in_bounds, other=0.0), 0.0)
            adv = tl.where(valid, tl.load(adv_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32), 0.0)
            if W_IS_SCALE:
                w = m * w_scale
            else:
                w = tl.where(valid, tl.load(w_ptr + offs, mask=in_bounds, other=0.0).to(tl.float32), 0.0)

            if IS_LEVEL == 0:
                log_w = logp - old
            in_clamp = (log_w >= -20.0) & (log_w <= 20.0)  # torch.clamp passes grad at the bounds
            ratio = tl.exp(tl.minimum(tl.maximum(log_w, -20.0), 20.0))
            if LOSS_KIND == 1 or LOSS_KIND == 3:  # -sg(weight) * A * logp: gradient only through logp itself
                if LOSS_KIND == 1:  # cispo: the clipped ratio
                    weight = tl.minimum(tl.maximum(ratio, ratio_lo), ratio_hi)
                    is_high = (ratio > ratio_hi) & (adv > 0.0)
                else:  # vespo: phi = exp(lam + k W - lam e^W) (W in [log 1e-8, 20]); inf / NaN -> 0
                    nonneg = adv >= 0.0
                    k = tl.where(nonneg, soft_a_pos, soft_a_neg)
                    lam = tl.where(nonneg, soft_b_pos, soft_b_neg)
                    weight = tl.exp(lam + k * log_w - lam * ratio)
                    weight = tl.where(weight <= 3.4028234663852886e38, weight, 0.0)
                    is_high = tl.zeros([BLOCK], dtype=tl.int1)
                pg = -weight * adv * logp
                d_own = -weight * adv
                d_lw = tl.zeros([BLOCK], dtype=tl.float32)
                is_low = tl.zeros([BLOCK], dtype=tl.int1)
            elif LOSS_KIND == 2:  # sapo: -sigmoid(tau (ratio - 1)) 4 / tau * A, a smooth gate (no clipping)
                tau = tl.where(adv > 0.0, soft_a_pos, soft_a_neg)
                gate = 1.0 / (1.0 + tl.exp(-tau * (ratio - 1.0)))
                pg = -gate * (4.0 / tau) * adv
                d_lw = tl.where(in_clamp, -4.0 * adv * gate * (1.0 - gate) * ratio, 0.0)
                is_low = tl.zeros([BLOCK], dtype=tl.int1)
                is_high = tl.zeros([BLOCK], dtype=tl.int1)
            else:
                if HAS_DELTA:
                    coef = tl.minimum(ratio, delta)
                else:
                    coef = ratio
                unclipped = -adv * coef
                clipped = -adv * tl.minimum(tl.maximum(ratio, ratio_lo), ratio_hi)
                clip_active = clipped > unclipped  # tie -> unclipped branch (same value and gradient)
                pg = tl.where(clip_active, clipped, unclipped)
                if HAS_DELTA:  # either branch may carry a gradient: ratio inside its bounds
                    inside = (ratio >= ratio_lo) & (ratio <= ratio_hi)
                    d_coef = tl.where(clip_active, tl.where(inside, ratio, 0.0),
                                      tl.where(ratio <= delta, ratio, 0.0))
                    d_lw = tl.where(in_clamp, -adv * d_coef, 0.0)
                    is_low = (coef < ratio_lo) & (adv < 0.0)
                    is_high = (coef > ratio_hi) & (adv > 0.0)
                else:  # a strictly larger clipped branch is outside [lo, hi]: constant, gradient 0
                    d_lw = tl.where(clip_active | (~in_clamp), 0.0, unclipped)  # d(-A*ratio)/dlog_w
                    is_low = clip_active & (adv < 0.0)
                    is_high = clip_active & (adv > 0.0)
                if HAS_DUAL:
                    dual_bound = -adv * dual_clip
                    dual_active = (adv < 0.0) & (pg > dual_bound)
                    pg = tl.where(dual_active, dual_bound, pg)
                    d_lw = tl.where(dual_active, 0.0, d_lw)
                    acc_dual += tl.where(dual_active, m, 0.0)
            if HAS_PMASK:
                pmask = tl.where(valid, tl.load(pm_ptr + offs, mask=in_bounds, other=0).to(tl.float32), 0.0)
                pg = pg * pmask
                d_lw = d_lw * pmask
                if LOSS_KIND == 1 or LOSS_KIND == 3:
                    d_own = d_own * pmask

            total = pg
            if LOSS_KIND == 1 or LOSS_KIND == 3:  # cispo "sequence" runs as IS_LEVEL 2 (no KL_IW): see launcher
                d_total = d_own
            elif IS_LEVEL == 1:  # through log_w = the sequence mean: finished by the caller from dlw
                d_total = tl.zeros([BLOCK], dtype=tl.float32)
            else:  # d log_w / d logp = 1 (token; sequence_token's own-token gradient)
                d_total = d_lw
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
                if KL_IW:  # d(kl * ratio) = ratio * d_kl (own) + kl * ratio * d log_w
                    d_kl = d_kl * ratio
                    kl_lw = tl.where(in_clamp, kl * ratio, 0.0)
                    kl = kl * ratio
                    if IS_LEVEL == 1:
                        d_lw = d_lw + kl_coef * kl_lw
                    else:
                        d_kl = d_kl + kl_lw
                kl = tl.where(valid, kl, 0.0)
                total = total + kl_coef * kl
                d_total = d_total + kl_coef * d_kl
                acc_kl += m * kl
            total = tl.where(valid, total, 0.0)
            tl.store(grad_ptr + offs, tl.where(valid, w * d_total, 0.0), mask=in_bounds)
            if IS_LEVEL == 1:
                tl.store(dlw_ptr + offs, tl.where(valid, w * d_lw, 0.0), mask=in_bounds)

            acc_tok += m
            acc_low += tl.where(is_low, m, 0.0)
            acc_high += tl.where(is_high, m, 0.0)
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
# The loss variants (2026-11-30, the same compile of bench/audit's policy-loss cases plus these): cispo
# 56-64 registers, sequence / sequence_token 64-72, policy_mask 61, k3+ 72 (was 77): 7-9 blocks per SM,
# no spills; two-sided clip (delta) 72-75 and sequence + delta + dual + policy_mask 79: 6 blocks per SM
# there, so one program in seven waits for a slot in those (non-default) configurations only. SAPO 61 (sequence
# level, importance-weighted KL, policy mask: 64), VESPO 56, the importance-weighted KL 68-72: 7-9 blocks per
# SM, no spills (`python -m bench audit`, 2026-11-30).
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


def _sequence_log_ratio(logprobs, old_logprobs, mask, seq_ids):
    """(dense ids [N], n_b per token [N] f64 (>= 1), S_b per token [N] f32): each token's sequence mean
    log-ratio, the per-token difference taken in float32 as the token-level kernel takes it, the sums
    in float64 (index_add_ runs with atomics on CUDA: float64 keeps the result order-independent to
    float64 rounding)."""
    valid = mask != 0
    dense = _dense_segment_ids(seq_ids)
    f64 = {"dtype": torch.float64, "device": logprobs.device}
    counts = torch.zeros(logprobs.numel(), **f64).index_add_(0, dense, valid.to(torch.float64))
    log_ratio = torch.where(valid, logprobs.float() - old_logprobs.float(), 0.0)
    sums = torch.zeros(logprobs.numel(), **f64).index_add_(0, dense, log_ratio.to(torch.float64))
    counts = counts.clamp_min_(1.0)[dense]
    return dense, counts, (sums[dense] / counts).float()


def _policy_loss_terms_triton(logprobs, old_logprobs, advantages, mask, weights, ref_logprobs, clip_low,
                              clip_high, dual_clip, kl_coef, kl_estimator, grad=None, *, loss_type="ppo",
                              importance_sampling_level="token", delta=None, seq_ids=None, policy_mask=None,
                              sapo_temperatures=SAPO_TEMPERATURES, vespo_gamma=VESPO_GAMMA,
                              kl_importance_weighted=False):
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

    def as_loadable(t):  # the kernel loads bool as uint8
        return t.view(torch.uint8) if t.dtype == torch.bool else t

    contiguous = [t.contiguous() for t in (logprobs, old_logprobs, advantages, as_loadable(mask), weights)]
    ref = contiguous[0] if ref_logprobs is None else ref_logprobs.contiguous()  # unread when KL_KIND == 0
    pmask = contiguous[0] if policy_mask is None else as_loadable(policy_mask).contiguous()  # unread if None
    level = IMPORTANCE_SAMPLING_LEVELS.index(importance_sampling_level)
    if loss_type == "cispo" and level == 1 and not kl_importance_weighted:
        level = 2  # the weight is stop-gradient: "sequence" has no gradient through the mean either
    log_w = d_log_w = contiguous[0]  # unread / unwritten at token level
    if loss_type == "vespo":  # W_b: a clamped SUM, computed here (float64 sums: order-independent); detached
        level = 2
        log_w = vespo_log_weights(logprobs.detach().float().double(), old_logprobs.float().double(), mask,
                                  seq_ids).float()
    elif level != 0:
        dense, counts, log_w = _sequence_log_ratio(logprobs, old_logprobs, mask, seq_ids)
    if level == 1:
        d_log_w = torch.empty(n, dtype=torch.float32, device=dev)
    # the soft losses' (A > 0 | A >= 0, A <= 0 | A < 0) parameters: sapo (tau, -), vespo (k, lambda)
    if loss_type == "sapo":
        soft = (sapo_temperatures[0], 0.0, sapo_temperatures[1], 0.0)
    else:
        soft = (vespo_gamma[0], max(vespo_gamma[1], VESPO_LAMBDA_MIN), vespo_gamma[2],
                max(vespo_gamma[3], VESPO_LAMBDA_MIN))
    _policy_loss_fwd_bwd_kernel[(nprog,)](
        *contiguous[:3], ref, contiguous[3], contiguous[4], log_w, pmask, grad, d_log_w, partials, n,
        triton.cdiv(n, block), 1.0 - clip_low, 1.0 + clip_high, 0.0 if dual_clip is None else dual_clip,
        kl_coef, 0.0 if delta is None else delta, *(float(x) for x in soft),
        HAS_DUAL=dual_clip is not None, W_IS_SCALE=weights.dim() == 0,
        KL_KIND=_KL_KIND[None if ref_logprobs is None else kl_estimator],
        LOSS_KIND=LOSS_TYPES.index(loss_type), KL_IW=kl_importance_weighted and ref_logprobs is not None,
        IS_LEVEL=level, HAS_DELTA=delta is not None, HAS_PMASK=policy_mask is not None,
        NUM_STATS=_NUM_STATS, BLOCK=block, num_warps=num_warps,
    )
    if level == 1:  # d S_b / d logp_u = valid_u / n_b: each sequence's sum of d loss / d S_b to its tokens
        per_seq = torch.zeros(n, dtype=torch.float64, device=dev)
        per_seq.index_add_(0, dense, d_log_w.to(torch.float64))
        grad += (per_seq[dense] * (mask != 0) / counts).float()
    stats = partials.sum(0)
    return stats[_NUM_STATS - 1].clone(), grad, stats


# ----------------------------------------------------------------------------- torch.library registration


@torch.library.custom_op("wz_kernels::policy_loss_terms", mutates_args=())
def policy_loss_terms_op(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    weights: torch.Tensor, ref_logprobs: torch.Tensor | None, clip_low: float, clip_high: float,
    dual_clip: float | None, kl_coef: float, kl_estimator: str, loss_type: str = "ppo",
    importance_sampling_level: str = "token", delta: float | None = None, seq_ids: torch.Tensor | None = None,
    policy_mask: torch.Tensor | None = None, sapo_temperatures: list[float] | None = None,
    vespo_gamma: list[float] | None = None, kl_importance_weighted: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss 0-d f32, grad_logprobs [N] f32, stats [len(STAT_NAMES)] f32) from the Triton kernel."""
    return _policy_loss_terms_triton(logprobs, old_logprobs, advantages, mask, weights, ref_logprobs, clip_low,
                                     clip_high, dual_clip, kl_coef, kl_estimator, loss_type=loss_type,
                                     importance_sampling_level=importance_sampling_level, delta=delta,
                                     seq_ids=seq_ids, policy_mask=policy_mask,
                                     sapo_temperatures=sapo_temperatures or SAPO_TEMPERATURES,
                                     vespo_gamma=vespo_gamma or VESPO_GAMMA,
                                     kl_importance_weighted=kl_importance_weighted)


@policy_loss_terms_op.register_fake
def _(logprobs, old_logprobs, advantages, mask, weights, ref_logprobs, clip_low, clip_high, dual_clip, kl_coef,
      kl_estimator, loss_type="ppo", importance_sampling_level="token", delta=None, seq_ids=None,
      policy_mask=None, sapo_temperatures=None, vespo_gamma=None, kl_importance_weighted=False):
    f32 = {"dtype": torch.float32, "device": logprobs.device}
    return logprobs.new_empty((), **f32), logprobs.new_empty(logprobs.shape, **f32), \
        logprobs.new_empty((_NUM_STATS,), **f32)


def _setup_context(ctx, inputs, output):
    ctx.logprobs_dtype = inputs[0].dtype
    ctx.num_inputs = len(inputs)
    ctx.save_for_backward(output[1])


def _backward(ctx, grad_loss, grad_grad, grad_stats):
    # Only the loss is differentiable (the gradient and the stats outputs are not trained through).
    (saved_grad,) = ctx.saved_tensors
    return ((grad_loss * saved_grad).to(ctx.logprobs_dtype),) + (None,) * (ctx.num_inputs - 1)


policy_loss_terms_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public function


def policy_loss(
    logprobs: torch.Tensor,  # [N] float, requires grad
    old_logprobs: torch.Tensor,  # [N] float (behaviour policy)
    advantages: torch.Tensor,  # [N] float (per token)
    mask: torch.Tensor,  # [N] bool / int / float
    *,
    ref_logprobs: torch.Tensor | None = None,  # [N] float (reference policy, for the KL term)
    seq_ids: torch.Tensor | None = None,  # [N] int (required by the seq-* modes and sequence-level weights)
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    agg: str = "token-mean",
    loss_scale: float | None = None,
    global_tokens: float | torch.Tensor | None = None,
    global_seqs: float | torch.Tensor | None = None,
    loss_type: str = "ppo",
    importance_sampling_level: str = "token",
    delta: float | None = None,
    policy_mask: torch.Tensor | None = None,  # [N] bool / int / float (e.g. `high_entropy_mask`)
    sapo_temperatures: tuple[float, float] = SAPO_TEMPERATURES,
    vespo_gamma: tuple[float, float, float, float] = VESPO_GAMMA,
    kl_importance_weighted: bool = False,
    impl: str = "auto",
):  # -> (loss 0-d f32, metrics: dict[str, 0-d f32 tensor])
    """Clipped policy loss (PPO / GSPO / CISPO / SAPO / VESPO) with asymmetric clip, dual or two-sided clip
    and a KL penalty over packed tokens.

    Per-token semantics and gradient conventions: see the module docstring (`loss_type` "ppo" | "cispo" |
    "sapo" | "vespo", `importance_sampling_level` "token" | "sequence" | "sequence_token", `delta`,
    `policy_mask`, `sapo_temperatures` (tau for A > 0, tau for A <= 0), `vespo_gamma` (k_pos, lambda_pos,
    k_neg, lambda_neg), `kl_importance_weighted`).
    Aggregation (`agg`, `loss_scale`, `global_tokens`, `global_seqs`, `seq_ids`): see
    `aggregation_weights`. Differentiable in `logprobs` only (the gradient comes back in logprobs' dtype).

    metrics (0-d tensors, detached, no host sync; means over this call's masked tokens):
      loss, clip_frac_low (coef < 1-clip_low and A < 0), clip_frac_high (coef > 1+clip_high and
      A > 0; cispo: ratio > 1+clip_high and A > 0), clip_frac_dual (A < 0 and ratio > dual_clip),
      ratio_mean (vespo: exp(W_b)), kl_mean (0 without ref_logprobs; times the ratio with
      kl_importance_weighted), tokens (sum of mask). At sequence level a token counts with its
      sequence's ratio (token-weighted, not per sequence).

    impl: "auto" (Triton on CUDA, the torch reference on CPU), "reference", "triton" (on CPU tensors
    under TRITON_INTERPRET=1). Bad input raises ValueError naming the argument.
    """
    cfg = _loss_config(clip_low, clip_high, dual_clip, kl_coef, kl_estimator, loss_type,
                       importance_sampling_level, delta, sapo_temperatures, vespo_gamma, kl_importance_weighted)
    _validate_all(_OP, logprobs, old_logprobs, advantages, mask, ref_logprobs, seq_ids=seq_ids,
                  policy_mask=policy_mask, **cfg)
    check_choice(_OP, "agg", agg, AGG_MODES)
    backend = resolve_impl(impl, logprobs.device, op=_OP)
    agg_kwargs = {"agg": agg, "loss_scale": loss_scale, "global_tokens": global_tokens,
                  "global_seqs": global_seqs}
    if backend == "reference":
        return policy_loss_reference(logprobs, old_logprobs, advantages, mask, ref_logprobs=ref_logprobs,
                                     seq_ids=seq_ids, policy_mask=policy_mask, **cfg, **agg_kwargs)
    # a 0-d scale where the mode allows
    weights = aggregation_weights(mask, seq_ids, per_token=False, **agg_kwargs)
    loss, _grad, stats_vec = policy_loss_terms_op(logprobs, old_logprobs, advantages, mask, weights,
                                                  ref_logprobs, seq_ids=seq_ids, policy_mask=policy_mask,
                                                  **cfg)
    metrics = metrics_from_stats(stats_vec)
    return loss, metrics
