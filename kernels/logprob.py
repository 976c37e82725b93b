"""Fused linear log-probabilities (+ entropy) and the fused linear policy loss.

    fused_linear_logprobs(hidden [N,H], weight [V,H], targets [N]) -> logprobs [N] f32 (, entropy [N] f32)
    fused_linear_policy_loss(hidden, weight, targets, old_logprobs, advantages, mask, ...) -> (loss, metrics)
        old_logprobs=None: on-policy (old = the chunk's own detached logprobs, no separate pass)

The [N, V] logits never exist, forward or backward. Both ops walk the tokens in chunks of C rows:

    logits tile [C, V] = hidden[c] @ weight^T (+ bias)          one library GEMM (cuBLAS / MKL)
    epilogue: z = logits / T, online log-sum-exp over V,         Triton kernel (or torch on CPU)
              logp = z[target] - lse, entropy = lse - E_p[z]
    backward epilogue: d logits = dz / T, written over the tile   Triton kernel (or torch on CPU)
    d hidden[c] = d logits @ weight;  d weight += d logits^T @ hidden[c];  d bias += sum_rows d logits

Gradient of the two outputs with respect to z = logits / T (p = softmax(z)):
    d logp_i / d z_j    = [j == target] - p_j
    d entropy / d z_j   = -p_j (z_j - E_p[z]) = -p_j (logp_j + entropy)      (logp_j = z_j - lse)

Why library GEMMs per chunk + Triton epilogues rather than one GEMM-fused Triton kernel: the three
GEMMs are 6NHV of the 6-8NHV flops and cuBLAS runs them near peak on every GPU and dtype without
tuning, while a hand GEMM-fused kernel (Cut Cross Entropy's design) needs per-architecture tuning to
match it. The epilogues are memory-bound passes over a tile that stays small (C x V), so the only
cost of not fusing is one write + two reads of each tile, and the memory bound is set by the chunk
size instead of being zero. Liger's FLCE takes the same route. GPU timings are still to be taken
(bench/RESULTS.md); the choice should be revisited with them.

Recompute vs. grads-in-forward:
  * fused_linear_logprobs recomputes each tile in backward (8NHV flops in all): its backward gets
    per-token upstream gradients for logp and entropy, and d weight = sum_i g_i dz_i h_i^T cannot be
    formed before g is known without storing the [N, V] dz.
  * fused_linear_policy_loss returns a scalar, so the whole gradient is known in the forward pass:
    it computes d hidden / d weight / d bias there (6NHV flops, one pass over the tiles) and the
    backward only scales them by the upstream scalar.

d weight accumulation (`grad_accum_dtype`): each chunk's product dlogits_c^T @ hidden_c is one GEMM
accumulating in float32; what `grad_accum_dtype` sets is the accumulator kept ACROSS the k = N / C chunks.
  * None (the default): the weight's dtype. On CUDA with bf16 weights that is cuBLAS addmm_ with
    beta = 1 into the bf16 d weight itself (float32 math, one bf16 rounding per chunk): no extra
    memory, full tensor-core rate. What Liger's fused linear cross entropy does.
  * torch.float32: exact to one final rounding, at V x H x 4 bytes of extra memory (2.5 GB at
    V=151936, H=4096). On CUDA a Triton kernel adds the 16-bit chunk product into the float32 tile
    (`_dweight_accumulate_kernel`). torch's own `addmm(acc, a, b, out_dtype=float32, out=acc)` accepts a
    float32 `self` only since pytorch PR #167931 (merged 2025-11-16: torch >= 2.10; before it raises
    "self and mat2 must have the same dtype", which the old code swallowed, then upcast both operands
    with TF32 off); this package supports torch >= 2.6, the update is memory-bound (K = C), so cuBLAS
    would not be faster, and the kernel is tested on CPU under the interpreter and compile-audited.
  Anything else (e.g. float64 from float32 chunks) upcasts the operands first: it warns once and is
  counted in `DWEIGHT_PATHS["fallback"]`, which tests assert stays 0 on the production paths.
  Precision of the default, measured against float64 on CPU through this module's own accumulation
  (`python -m bench.dweight_precision`: N=16384, H=64, V=4096, bf16, loss = mean logp; the bf16 GEMM
  is MKL's there, float32 accumulation with one rounding per call as in cuBLAS), as max |err| / max |dW|:
      chunks k:                    1        8        32       64       128      256
      bf16 accumulator (default)   2.8e-3   6.3e-3   2.0e-2   4.6e-2   6.5e-2   1.2e-1
      float32 accumulator          2.8e-3   2.8e-3   2.8e-3   2.8e-3   2.8e-3   2.8e-3
      torch's bf16 autograd        2.8e-3 (one GEMM over all N; its error is the bf16 logits tile's)
  (RMS relative error 1.7e-3 at k = 1, 3.5e-3 at 8, 1.2e-2 at 64, 4.9e-2 at 256; with 4x larger logits
  the growth is slower: 1.3e-2 max at k = 64.) The error grows about linearly in k, within (1 + k / 2)
  x torch's in every measurement; at the production shape k = 60 (C = 276), so the default's d weight
  is ~15x torch's bf16 error (~1% RMS): fine for Adam-style RL updates, which is why it is the
  default; pass grad_accum_dtype=torch.float32 where exactness matters more than 2.5 GB. d bias
  follows the same rule (a [V] sum per chunk); d hidden (one GEMM per chunk over the full V) is
  unaffected. An exact bounded-memory alternative
  (a second sweep over vocabulary slices, dW[v] = dlogits[:, v]^T @ hidden with K = N) costs 2NHV more
  GEMM flops and is not implemented.

Ignored positions (targets == ignore_index) give logprob 0, entropy 0 and no gradient.

Memory: one [C, V] workspace (reused by every chunk), d hidden [N, H], the d weight accumulator
[V, H] and O(N) vectors. At N=4096, H=256, V=32000 fp32 on CPU, forward+backward grows peak RSS by
~105 MB against ~1.5 GB for matmul + log_softmax (tests/kernels/test_logprob.py asserts <= 10%).
Extra memory on CUDA at N=16384, H=4096, V=151936, bf16, defaults (beyond the inputs, the outputs and
the gradients d hidden [N, H] bf16 = 128 MiB and d weight [V, H] bf16 = 1.16 GiB that autograd hands
back), forward + backward of either op:
    [C, V] logits / d logits workspace, C = 80 MiB // (V x 2) = 276:  276 x 151936 x 2 = 83.9 MB
    lse, logp, entropy, g [N] float32 (+ the policy loss's weights [N]):   <= 5 x 65.5 KB = 0.3 MB
    per-chunk [C] vectors and stat partials:                                          < 0.1 MB
    d hidden rows are written by torch.mm(out=) (no [C, H] temporary); the policy loss scales its
    gradients in place in backward (no second [V, H]); d weight is accumulated in its own bf16 storage
    total                                                                            ~84.3 MB <= 100 MB
(cuBLAS's own workspace, allocated once per stream by the first GEMM of the process, is not counted.)
tests/kernels/test_logprob.py::test_gpu_production_shape_fast_path_and_memory measures it on a GPU.
Possible next step on CPU, where N x H is small next to V x H: walk vocabulary slices instead of
token chunks (online LSE across slices; d weight slices written once, no re-reads of the weight).
"""

from __future__ import annotations

import collections
import math
import warnings
from dataclasses import dataclass

import torch

from ._backend import check_tensor, interpreting, next_power_of_2, resolve_impl, triton_available
from .policy_loss import SAPO_TEMPERATURES, VESPO_GAMMA

OP = "fused_linear_logprobs"
OP_LOSS = "fused_linear_policy_loss"


@dataclass(frozen=True)
class ChunkPlan:
    """How the token dimension is cut into tiles."""

    chunk_size: int
    """Tokens per tile (rows C of the [C, V] logits tile)."""
    compute_dtype: torch.dtype
    """Dtype of the GEMM operands and the logits tile (the epilogue math is always >= float32)."""
    grad_accum_dtype: torch.dtype
    """Dtype d weight / d bias are accumulated in across chunks."""
    out_dtype: torch.dtype = torch.float32
    """Dtype of logprobs / entropy (float64 only for the upcast reference)."""


# Logits-tile budget in bytes (C = budget / (V x itemsize of the compute dtype)).
# CPU: 64 MiB (2^24 fp32 elements, C = 524 at V = 32000): each chunk re-reads the V x H weight three
# times and read-modify-writes the d weight accumulator, so smaller tiles are memory-bound (C = 64
# costs ~2x the CPU time of C = 512 at H = 256), while the peak stays ~100 MB, far below N x V (the
# memory-ceiling test: ~1.5 GB naive).
# CUDA: 80 MiB, so that forward + backward at N=16384, H=4096, V=151936 bf16 stays within the 100 MB
# extra-memory target (bytes counted in the module docstring): C = 276 there (327 at V = 128256), 138
# in fp32. Each chunk's logits and d hidden GEMMs then do C flops per weight byte read, above the
# H100/H200 ridge (~185-230 flops/byte), while the d weight update (K = C) read-modify-writes the
# [V, H] accumulator: memory-bound below C ~ 400 (bf16). A larger `chunk_size` trades memory for that.
_TILE_BYTES = {"cpu": 64 << 20, "cuda": 80 << 20}


def default_chunk_size(num_tokens: int, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
    """Tokens per [C, V] logits tile from the per-device byte budget (at least 1, at most num_tokens)."""
    budget = _TILE_BYTES["cuda" if device.type == "cuda" else "cpu"]
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, min(num_tokens, budget // (max(vocab, 1) * itemsize)))


def _plan(hidden, weight, chunk_size, grad_accum_dtype, *, upcast: bool, reference: bool) -> ChunkPlan:
    N, V = hidden.shape[0], weight.shape[0]
    if upcast:
        compute = torch.float64
    elif reference and hidden.dtype in (torch.float16, torch.bfloat16):
        compute = torch.float32  # the CPU specification: low precision inputs, float32 math
    else:
        compute = hidden.dtype
    if chunk_size is None:
        chunk_size = default_chunk_size(N, V, compute, hidden.device)
    elif not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{OP}: chunk_size must be a positive int, got {chunk_size!r}")
    chunk_size = max(1, min(chunk_size, N))
    keep = upcast or grad_accum_dtype is None
    accum = compute if keep else torch.promote_types(grad_accum_dtype, compute)
    return ChunkPlan(chunk_size, compute, accum, torch.float64 if upcast else torch.float32)


def _check_inputs(op, hidden, weight, targets, bias, temperature, ignore_index, *,
                  host_check_targets: bool = True):
    check_tensor(op, "hidden", hidden, ndim=2, floating=True)
    device = hidden.device
    N, H = hidden.shape
    check_tensor(op, "weight", weight, ndim=2, floating=True, device=device)
    if weight.shape[1] != H:
        raise ValueError(f"{op}: weight must be [V, H={H}], got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"{op}: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.shape[0] < 1:
        raise ValueError(f"{op}: weight has an empty vocabulary")
    check_tensor(op, "targets", targets, shape=(N,), integer=True, device=device)
    if bias is not None:
        check_tensor(op, "bias", bias, shape=(weight.shape[0],), floating=True, device=device)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"{op}: temperature must be a float, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: temperature must be finite and > 0, got {temperature}")
    if not isinstance(ignore_index, int):
        raise ValueError(f"{op}: ignore_index must be an int, got {type(ignore_index).__name__}")
    V = weight.shape[0]
    # The range check reads the targets on the host: free on CPU, a device sync on CUDA. The Triton
    # path checks in its kernel instead (an out-of-range target gives a NaN log-prob, no sync).
    if N and host_check_targets and not torch.compiler.is_compiling():  # data-dependent: graph break
        bad = ((targets < 0) | (targets >= V)) & (targets != ignore_index)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{op}: targets[{i}]={int(targets[i])} is outside [0, V={V}) "
                f"and is not ignore_index={ignore_index}"
            )


# ============================================================================ torch tile epilogues
# The readable specification of one tile. `logits` [C, V] in the compute dtype; math in >= float32.


def _tile_fwd_reference(logits, targets, inv_temp: float, ignore_index: int, with_entropy: bool,
                        scratch: bool = True):
    """logits [C,V] -> logp [C], entropy [C], lse [C] of z = logits / T (float32, or float64 for float64).

    With `scratch` the tile is overwritten (saves a [C, V] temporary); otherwise it is left intact.
    """
    acc = torch.promote_types(logits.dtype, torch.float32)
    z = logits if (scratch and logits.dtype == acc) else logits.to(acc, copy=True)
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    m = z.amax(dim=1, keepdim=True)  # [C,1]
    z.sub_(m)  # shifted logits: the largest is 0, so exp never overflows (extreme logits)
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, 0)
    z_t = z.gather(1, safe_t[:, None])[:, 0]
    if with_entropy:
        e = z.exp()
        s0 = e.sum(dim=1)  # [C]
        # sum_j e_j z_j as a batched dot product (no second [C,V] temporary)
        ez = torch.bmm(e[:, None, :], z[:, :, None])[:, 0, 0]
        del e
        log_s0 = s0.log()
        entropy = log_s0 - ez / s0  # = lse - E_p[z], both shifted by m
    else:
        log_s0 = z.exp_().sum(dim=1).log()
        entropy = torch.zeros_like(log_s0)
    logp = z_t - log_s0
    lse = log_s0 + m[:, 0]
    zero = torch.zeros((), dtype=acc, device=logits.device)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero), lse


def _tile_bwd_reference(logits, targets, lse, entropy, g_logp, g_entropy, inv_temp: float, ignore_index: int):
    """Overwrite logits [C,V] with d loss / d logits given upstream grads g_logp [C], g_entropy [C] | None.

    dz_j = [j == t] g_lp - p_j (g_lp + g_en (logp_j + entropy)),  d logits = dz / T.
    """
    acc = torch.promote_types(logits.dtype, torch.float32)
    valid = targets != ignore_index
    # upstream grads pre-scaled by 1/T (d logits = dz / T); ignored rows get no gradient
    g_lp = torch.where(valid, g_logp.to(acc) * inv_temp, 0.0)[:, None]  # [C,1]
    z = logits if logits.dtype == acc else logits.to(acc)
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    z.sub_(lse.to(acc)[:, None])  # z now holds logp_j
    if g_entropy is not None:
        g_en = torch.where(valid, g_entropy.to(acc) * inv_temp, 0.0)[:, None]
        p = z.exp()
        z.add_(entropy.to(acc)[:, None]).mul_(g_en).add_(g_lp).mul_(p).neg_()
        del p
    else:
        z.exp_().mul_(-g_lp)
    safe_t = torch.where(valid, targets, 0)
    z.scatter_add_(1, safe_t[:, None], g_lp)
    if z is not logits:
        logits.copy_(z)
    return logits


def _tile_probs_reference(logits, targets, inv_temp: float, ignore_index: int, with_entropy: bool = False):
    """Fused-loss forward on a float32/64 tile: logp [C], lse [C], entropy [C] | None; the tile becomes
    p = softmax(z).

    The policy loss needs d logits = g (onehot - p) / T right after the forward of the same tile, so
    leaving p in place saves both a [C, V] copy and the recompute of exp. The entropy (only when asked:
    it costs a [C, V] temporary) is -sum p log p of that p.
    """
    z = logits
    if inv_temp != 1.0:
        z.mul_(inv_temp)
    m = z.amax(dim=1, keepdim=True)
    z.sub_(m)
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, 0)
    z_t = z.gather(1, safe_t[:, None])[:, 0]
    s0 = z.exp_().sum(dim=1, keepdim=True)
    z.div_(s0)  # now p
    log_s0 = s0[:, 0].log()
    zero = torch.zeros((), dtype=z.dtype)
    logp = torch.where(valid, z_t - log_s0, zero)
    entropy = torch.where(valid, torch.special.entr(z).sum(dim=1), zero) if with_entropy else None
    return logp, log_s0 + m[:, 0], entropy


def _tile_bwd_from_probs_reference(probs, targets, g_logp, inv_temp: float, ignore_index: int):
    """Overwrite probs [C,V] with d loss / d logits = g (onehot - p) / T (upstream g_logp [C])."""
    valid = targets != ignore_index
    g = torch.where(valid, g_logp.to(probs.dtype) * inv_temp, 0.0)[:, None]
    probs.mul_(-g).scatter_add_(1, torch.where(valid, targets, 0)[:, None], g)
    return probs


# ============================================================================ Triton tile epilogues

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _logprob_fwd_kernel(
        logits_ptr, stride_row, targets_ptr, logp_ptr, entropy_ptr, lse_ptr,
        V, inv_temp, ignore_index,
        BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    ):
        # One program per token row: online log-sum-exp over V in BLOCK_V slices.
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        target = tl.load(targets_ptr + row)
        valid = target != ignore_index
        m = float("-inf")  # running max of z
        s0 = 0.0  # sum exp(z - m)
        s1 = 0.0  # sum exp(z - m) * (z - m)   (entropy numerator, kept shifted for extreme logits)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            inb = cols < V
            z = tl.load(base + cols, mask=inb, other=float("-inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(z, axis=0))
            scale = tl.exp(m - m_new)
            e = tl.exp(z - m_new)
            if WITH_ENTROPY:
                # re-centre the old sum: sum e_old (z - m_new) = scale * (s1 + (m - m_new) * s0)
                # (s0 == 0 only before the first slice, where m = -inf: keep -inf * 0 out of it)
                shift = tl.where(s0 > 0, m - m_new, 0.0)
                z_c = tl.where(inb, z - m_new, 0.0)
                s1 = scale * (s1 + shift * s0) + tl.sum(e * z_c, axis=0)
            s0 = s0 * scale + tl.sum(e, axis=0)
            m = m_new
        log_s0 = tl.log(s0)
        lse = m + log_s0
        # range check in the kernel (the host check would sync): out of range -> NaN, no stray read
        in_range = (target >= 0) & (target < V)
        z_t = tl.load(base + tl.where(valid & in_range, target, 0)).to(tl.float32) * inv_temp
        logp = tl.where(valid, tl.where(in_range, z_t - lse, float("nan")), 0.0)
        tl.store(logp_ptr + row, logp)
        tl.store(lse_ptr + row, lse)
        if WITH_ENTROPY:
            tl.store(entropy_ptr + row, tl.where(valid, log_s0 - s1 / s0, 0.0))

    @triton.jit
    def _logprob_bwd_kernel(
        logits_ptr, stride_row, targets_ptr, lse_ptr, entropy_ptr, g_logp_ptr, g_entropy_ptr,
        V, inv_temp, ignore_index,
        BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    ):
        # One program per token row: d logits = (g_lp (onehot - p) - g_en p (logp + H)) / T, in place.
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        target = tl.load(targets_ptr + row)
        valid = target != ignore_index
        lse = tl.load(lse_ptr + row)
        g_lp = tl.where(valid, tl.load(g_logp_ptr + row), 0.0)
        if WITH_ENTROPY:
            ent = tl.load(entropy_ptr + row)
            g_en = tl.where(valid, tl.load(g_entropy_ptr + row), 0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            inb = cols < V
            z = tl.load(base + cols, mask=inb, other=0.0).to(tl.float32) * inv_temp
            logp_j = z - lse
            p = tl.exp(logp_j)
            dz = tl.where(cols == target, g_lp, 0.0) - g_lp * p
            if WITH_ENTROPY:
                dz -= g_en * p * (logp_j + ent)
            dz = dz * inv_temp
            tl.store(base + cols, dz.to(logits_ptr.dtype.element_ty), mask=inb)

    @triton.jit
    def _dweight_accumulate_kernel(
        acc_ptr, stride_acc,  # [V, H] float32 accumulator, read-modify-written
        dlogits_ptr, stride_dl,  # [C, V] 16-bit d logits tile (row-major: the chunk's workspace)
        hidden_ptr, stride_h,  # [C, H] 16-bit hidden rows of the chunk
        V, H, C,
        BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # acc[v, h] += sum_c dlogits[c, v] * hidden[c, h]: 16-bit tensor-core MMAs accumulating in
        # float32 registers on top of the loaded float32 tile, one store. The H tiles of one V tile are
        # consecutive program ids, so they run together and share its [C, BLOCK_V] slice through L2.
        pid = tl.program_id(0)
        n_h = tl.cdiv(H, BLOCK_H)
        pid_v, pid_h = pid // n_h, pid % n_h
        rows_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        cols_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        in_v, in_h = rows_v < V, cols_h < H
        acc_ptrs = acc_ptr + rows_v.to(tl.int64)[:, None] * stride_acc + cols_h[None, :]
        acc_mask = in_v[:, None] & in_h[None, :]
        acc = tl.load(acc_ptrs, mask=acc_mask, other=0.0)
        for start in range(0, C, BLOCK_C):
            ks = start + tl.arange(0, BLOCK_C)
            in_c = ks < C
            a = tl.load(dlogits_ptr + ks.to(tl.int64)[:, None] * stride_dl + rows_v[None, :],
                        mask=in_c[:, None] & in_v[None, :], other=0.0)  # [BLOCK_C, BLOCK_V]
            b = tl.load(hidden_ptr + ks.to(tl.int64)[:, None] * stride_h + cols_h[None, :],
                        mask=in_c[:, None] & in_h[None, :], other=0.0)  # [BLOCK_C, BLOCK_H]
            if UPCAST:  # the interpreter multiplies bf16 bits as integers in tl.dot
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(tl.trans(a), b, acc)
        tl.store(acc_ptrs, acc, mask=acc_mask)

    def _dweight_accumulate_triton(acc, dlogits, h_c):
        """acc [V, H] float32 += dlogits^T [V, C] @ h_c [C, H] (16-bit operands, unit inner strides)."""
        C, V = dlogits.shape
        H = h_c.shape[1]
        assert acc.stride(1) == 1 and dlogits.stride(1) == 1 and h_c.stride(1) == 1
        cfg = _DWEIGHT_CONFIG_INTERPRETER if interpreting() else _DWEIGHT_CONFIG
        grid = (triton.cdiv(V, cfg.block_v) * triton.cdiv(H, cfg.block_h),)
        _dweight_accumulate_kernel[grid](
            acc, acc.stride(0), dlogits, dlogits.stride(0), h_c, h_c.stride(0), V, H, C,
            BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, BLOCK_C=cfg.block_c, UPCAST=interpreting(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    def _block_v(V: int) -> int:
        cap = 1024 if interpreting() else 4096
        return max(16, min(next_power_of_2(V), cap))

    def _tile_fwd_triton(logits, targets, inv_temp: float, ignore_index: int, with_entropy: bool,
                         scratch: bool = True):  # never writes the tile
        C, V = logits.shape
        logits = logits if logits.stride(1) == 1 else logits.contiguous()
        logp = torch.empty(C, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if with_entropy else torch.zeros_like(logp)
        if C:
            _logprob_fwd_kernel[(C,)](
                logits, logits.stride(0), targets, logp, entropy, lse,
                V, float(inv_temp), int(ignore_index),
                BLOCK_V=_block_v(V), WITH_ENTROPY=with_entropy,
            )
        return logp, entropy, lse

    def _tile_bwd_triton(logits, targets, lse, entropy, g_logp, g_entropy, inv_temp: float,
                         ignore_index: int):
        C, V = logits.shape
        assert logits.stride(1) == 1
        g_logp = g_logp.float().contiguous()
        with_entropy = g_entropy is not None
        g_en = g_entropy.float().contiguous() if with_entropy else g_logp
        ent = entropy if with_entropy else lse
        if C:
            _logprob_bwd_kernel[(C,)](
                logits, logits.stride(0), targets, lse, ent, g_logp, g_en,
                V, float(inv_temp), int(ignore_index),
                BLOCK_V=_block_v(V), WITH_ENTROPY=with_entropy,
            )
        return logits


# ============================================================================ torch.library registration
# The tile epilogues are registered ops so torch.compile can trace the chunk loop around them. Both
# take the logits tile as scratch (the torch epilogue works in place to keep one [C, V] buffer alive).


@torch.library.custom_op("wz_kernels::logprob_tile_fwd", mutates_args=("logits",))
def _logprob_tile_fwd_op(
    logits: torch.Tensor, targets: torch.Tensor, inv_temp: float, ignore_index: int, with_entropy: bool,
    triton: bool, scratch: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = _tile_fwd_triton if triton else _tile_fwd_reference
    logp, ent, lse = fn(logits, targets, inv_temp, ignore_index, with_entropy, scratch)
    return logp, ent, lse


@_logprob_tile_fwd_op.register_fake
def _(logits, targets, inv_temp, ignore_index, with_entropy, triton, scratch):
    C = logits.shape[0]
    out = logits.new_empty(C, dtype=torch.promote_types(logits.dtype, torch.float32))
    return out, torch.empty_like(out), torch.empty_like(out)


@torch.library.custom_op("wz_kernels::logprob_tile_bwd", mutates_args=("logits",))
def _logprob_tile_bwd_op(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor | None,
    g_logp: torch.Tensor, g_entropy: torch.Tensor | None, inv_temp: float, ignore_index: int, triton: bool,
) -> None:
    fn = _tile_bwd_triton if triton else _tile_bwd_reference
    fn(logits, targets, lse, entropy, g_logp, g_entropy, inv_temp, ignore_index)


@_logprob_tile_bwd_op.register_fake
def _(logits, targets, lse, entropy, g_logp, g_entropy, inv_temp, ignore_index, triton):
    return None


def _tile_fwd(logits, targets, inv_temp, ignore_index, with_entropy, triton, scratch):
    # Eager calls skip the custom-op dispatcher (its first call imports torch._dynamo: seconds).
    if torch.compiler.is_compiling():
        return _logprob_tile_fwd_op(logits, targets, inv_temp, ignore_index, with_entropy, triton, scratch)
    fn = _tile_fwd_triton if triton else _tile_fwd_reference
    return fn(logits, targets, inv_temp, ignore_index, with_entropy, scratch)


def _tile_bwd(logits, targets, lse, entropy, g_logp, g_entropy, inv_temp, ignore_index, triton):
    if torch.compiler.is_compiling():
        return _logprob_tile_bwd_op(logits, targets, lse, entropy, g_logp, g_entropy, inv_temp, ignore_index,
                                    triton)
    fn = _tile_bwd_triton if triton else _tile_bwd_reference
    fn(logits, targets, lse, entropy, g_logp, g_entropy, inv_temp, ignore_index)


# ============================================================================ the chunk loop


def _tile_logits(h_c, weight_c, bias_c, out):
    """h_c [C,H] @ weight_c^T [H,V] (+ bias) -> logits [C,V], written into the workspace `out`."""
    if bias_c is None:
        return torch.mm(h_c, weight_c.T, out=out)
    return torch.addmm(bias_c, h_c, weight_c.T, out=out)


@dataclass(frozen=True)
class _DWeightConfig:
    """Tiles of `_dweight_accumulate_kernel` (one program per [block_v, block_h] tile of d weight)."""

    block_v: int
    block_h: int
    block_c: int
    num_warps: int
    num_stages: int


# sm_90, Triton 3.6, offline compile through this launcher at V=151936/128256, H=4096, bf16 and fp16:
#   64x128x64, 4 warps, 2 stages: 134 registers, 0 spills, 48 KB shared -> 3 blocks (12 warps) per SM
#   128x128x32, 8 warps, 3 stages: 162 registers, 64 KB -> 1 block per SM;  64x64x64: 72 regs, 4 blocks
# The update is memory-bound (it reads and writes the float32 [V, H] tile once per chunk, K = C is
# small), so the pick is the most warps in flight per SM without halving the tile (which doubles the
# L2 re-reads of the [C, V] d logits slice).
_DWEIGHT_CONFIG = _DWeightConfig(block_v=64, block_h=128, block_c=64, num_warps=4, num_stages=2)
_DWEIGHT_CONFIG_INTERPRETER = _DWeightConfig(block_v=64, block_h=64, block_c=64, num_warps=4, num_stages=1)

DWEIGHT_PATHS: collections.Counter = collections.Counter()
"""How each chunk's d weight update ran, by path (tests and benchmarks read it): "gemm" (a library
GEMM in the accumulator's own dtype), "triton-fp32" (the Triton kernel adding 16-bit products into a
float32 accumulator), "fallback" (operands upcast to the accumulator's dtype first: slow, warns once)."""
_FALLBACK_WARNED: set = set()


def _accumulate_weight_grad(acc, dlogits, h_c):
    """acc [V,H] += dlogits^T [V,C] @ h_c [C,H], accumulating in acc's dtype."""
    if acc.dtype == dlogits.dtype:
        # cuBLAS / MKL: float32 accumulation inside the GEMM, one rounding to acc's dtype per chunk
        path = "gemm"
        acc.addmm_(dlogits.T, h_c)
    elif (acc.dtype == torch.float32 and dlogits.dtype in (torch.float16, torch.bfloat16)
          and triton_available() and (acc.is_cuda or interpreting())):
        path = "triton-fp32"
        _dweight_accumulate_triton(acc, dlogits, h_c)
    else:
        path = "fallback"
        key = (acc.dtype, dlogits.dtype, acc.device.type)
        if key not in _FALLBACK_WARNED:
            _FALLBACK_WARNED.add(key)
            warnings.warn(f"{OP}: d weight accumulates in {acc.dtype} from {dlogits.dtype} chunks by upcasting "
                          "both operands first (no fast path for this combination); pass "
                          "grad_accum_dtype=None to accumulate in the weight's dtype", stacklevel=4)
        acc.addmm_(dlogits.T.to(acc.dtype), h_c.to(acc.dtype))
    if not torch.compiler.is_compiling():
        DWEIGHT_PATHS[path] += 1


class _Chunks:
    """Shared state of one forward or backward sweep over the token chunks."""

    def __init__(self, hidden, weight, bias, plan: ChunkPlan):
        self.plan = plan
        cd = plan.compute_dtype
        self.hidden = hidden
        # one cast for the whole sweep (a no-op when the dtype already matches)
        self.weight = weight.to(cd)
        self.bias = None if bias is None else bias.to(cd)
        self.workspace = None

    def ranges(self):
        N, C = self.hidden.shape[0], self.plan.chunk_size
        for s in range(0, N, C):
            yield s, min(s + C, N)

    def logits(self, s, e):
        # One [C, V] workspace reused by every chunk: a fresh tile per chunk would churn the
        # allocator (on CPU, glibc keeps freed 10+ MB blocks resident and RSS creeps up).
        if self.workspace is None:
            C, V = min(self.plan.chunk_size, self.hidden.shape[0]), self.weight.shape[0]
            self.workspace = torch.empty(C, V, dtype=self.plan.compute_dtype, device=self.hidden.device)
        h_c = self.hidden[s:e].to(self.plan.compute_dtype)
        return h_c, _tile_logits(h_c, self.weight, self.bias, self.workspace[: e - s])


def _backward_sweep(chunks: _Chunks, dlogits_of, need_h, need_w, need_b, hidden_dtype, weight_dtype,
                    bias_dtype):
    """Run dlogits_of(s, e) -> (h_c [C,H], dlogits [C,V]) per chunk and form d hidden, d weight, d bias."""
    plan = chunks.plan
    N, H = chunks.hidden.shape
    V = chunks.weight.shape[0]
    dev = chunks.hidden.device
    d_hidden = torch.empty(N, H, dtype=hidden_dtype, device=dev) if need_h else None
    d_weight = torch.zeros(V, H, dtype=plan.grad_accum_dtype, device=dev) if need_w else None
    d_bias = torch.zeros(V, dtype=plan.grad_accum_dtype, device=dev) if need_b else None
    for s, e in chunks.ranges():
        h_c, dlogits = dlogits_of(s, e)
        if need_h:
            if d_hidden.dtype == dlogits.dtype:
                torch.mm(dlogits, chunks.weight, out=d_hidden[s:e])  # no [C, H] temporary
            else:
                d_hidden[s:e] = dlogits @ chunks.weight
        if need_w:
            _accumulate_weight_grad(d_weight, dlogits, h_c)
        if need_b:
            d_bias += dlogits.sum(dim=0, dtype=plan.grad_accum_dtype)
    if need_w:
        d_weight = d_weight.to(weight_dtype)
    if need_b:
        d_bias = d_bias.to(bias_dtype)
    return d_hidden, d_weight, d_bias


class _FusedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, with_entropy, plan,
                use_triton):
        chunks = _Chunks(hidden, weight, bias, plan)
        N = hidden.shape[0]
        logp = torch.empty(N, dtype=plan.out_dtype, device=hidden.device)
        entropy = torch.zeros_like(logp)
        lse_dtype = torch.promote_types(plan.compute_dtype, torch.float32)
        lse = torch.empty(N, dtype=lse_dtype, device=hidden.device)
        inv_t = 1.0 / temperature
        for s, e in chunks.ranges():
            _, logits = chunks.logits(s, e)
            lp, en, ls = _tile_fwd(
                logits, targets[s:e], inv_t, ignore_index, with_entropy, use_triton, True
            )
            logp[s:e], entropy[s:e], lse[s:e] = lp, en, ls
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.cfg = (inv_t, ignore_index, with_entropy, plan, use_triton)
        if with_entropy:
            return logp, entropy
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        inv_t, ignore_index, with_entropy, plan, use_triton = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if not (need_h or need_w or need_b):
            return (None,) * 9
        chunks = _Chunks(hidden, weight, bias, plan)
        N = hidden.shape[0]
        g_logp = torch.zeros(N, device=hidden.device) if g_logp is None else g_logp
        g_entropy = g_entropy if with_entropy else None  # without entropy its term is skipped entirely

        def dlogits_of(s, e):
            h_c, logits = chunks.logits(s, e)  # recompute the tile
            g_en = None if g_entropy is None else g_entropy[s:e]
            _tile_bwd(
                logits, targets[s:e], lse[s:e], entropy[s:e], g_logp[s:e], g_en, inv_t, ignore_index,
                use_triton,
            )
            return h_c, logits

        dh, dw, db = _backward_sweep(
            chunks, dlogits_of, need_h, need_w, need_b, hidden.dtype, weight.dtype,
            None if bias is None else bias.dtype,
        )
        return dh, dw, db, None, None, None, None, None, None


def _kernel_checks_targets(impl: str, hidden) -> bool:
    """True where the Triton epilogue range-checks the targets itself (CUDA tensors on the Triton
    path), so the input check skips its host-syncing read of them."""
    return isinstance(hidden, torch.Tensor) and hidden.is_cuda and impl in ("auto", "triton") \
        and triton_available()


def _use_triton(impl: str, device, op: str) -> bool:
    backend = resolve_impl(impl, device, op=op)
    if backend == "cuda":
        raise RuntimeError(f"{op}: has no CUDA-extension implementation")
    return backend == "triton"


def fused_linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    upcast: bool = False,
    chunk_size: int | None = None,
    grad_accum_dtype: torch.dtype | None = None,
):
    """The plain-torch specification (and the CPU path): same contract as `fused_linear_logprobs`.

    Chunked over tokens with a custom autograd that recomputes each [C, V] tile in backward, so its
    peak memory is O(C x V + V x H) instead of O(N x V). Low-precision inputs are computed in float32;
    `upcast=True` computes everything in float64 (outputs stay float32 unless upcast: then float64).
    """
    _check_inputs(OP, hidden, weight, targets, bias, temperature, ignore_index)
    plan = _plan(hidden, weight, chunk_size, grad_accum_dtype, upcast=upcast, reference=True)
    logp, ent = _FusedLinearLogprobs.apply(
        hidden, weight, bias, targets, float(temperature), ignore_index, bool(return_entropy), plan, False
    )
    return (logp, ent) if return_entropy else logp


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    impl: str = "auto",
    chunk_size: int | None = None,
    grad_accum_dtype: torch.dtype | None = None,
):
    """Log-probability (and entropy) of `targets` under softmax((hidden @ weight^T + bias) / temperature).

    Args:
        hidden: [N, H] float32 / float16 / bfloat16 final hidden states (packed tokens).
        weight: [V, H] the lm_head weight, same dtype as hidden.
        targets: [N] int64 token ids in [0, V), or `ignore_index`.
        bias: optional [V] lm_head bias.
        temperature: sampling temperature (> 0): logits are divided by it.
        return_entropy: also return the entropy of each token's distribution.
        ignore_index: target value whose position gets logprob 0, entropy 0 and no gradient.
        impl: "auto" | "reference" | "triton" (see wz_kernels._backend).
        chunk_size: tokens per [C, V] tile (default: from a per-device tile budget).
        grad_accum_dtype: dtype d weight / d bias are accumulated in across chunks: None (default) the
            weight's dtype, torch.float32 exact at V x H x 4 bytes (module docstring: precision).

    Returns:
        logprobs [N] float32 (and entropy [N] float32 when `return_entropy`). Differentiable with
        respect to hidden, weight and bias through both outputs. The [N, V] logits are never formed.
    """
    _check_inputs(OP, hidden, weight, targets, bias, temperature, ignore_index,
                  host_check_targets=not _kernel_checks_targets(impl, hidden))
    use_triton = _use_triton(impl, hidden.device, OP)
    plan = _plan(hidden, weight, chunk_size, grad_accum_dtype, upcast=False, reference=not use_triton)
    logp, ent = _FusedLinearLogprobs.apply(
        hidden, weight, bias, targets, float(temperature), ignore_index, bool(return_entropy), plan,
        use_triton,
    )
    return (logp, ent) if return_entropy else logp


# ============================================================================ fused policy loss


class _FusedLinearPolicyLoss(torch.autograd.Function):
    """One sweep: per chunk logits -> logp -> token_loss_terms -> d logits -> d hidden, d weight.

    The loss is a scalar, so its whole gradient is known in the forward pass: it is computed there
    (no recompute) and the backward only multiplies by the upstream scalar.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, old_logprobs, advantages, mask, ref_logprobs, weights,
                temperature, ignore_index, plan, use_triton, loss_cfg, with_entropy, with_logprobs):
        from .policy_loss import STAT_NAMES, token_loss_terms

        chunks = _Chunks(hidden, weight, bias, plan)
        inv_t = 1.0 / temperature
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        terms_impl = "triton" if use_triton else "reference"
        totals = torch.zeros(len(STAT_NAMES), dtype=torch.float32, device=hidden.device)
        N = hidden.shape[0]
        entropy = torch.zeros(N, dtype=plan.out_dtype, device=hidden.device) if with_entropy else None
        logprobs = torch.zeros(N, dtype=plan.out_dtype, device=hidden.device) if with_logprobs else None

        # the torch path leaves p in the tile (no copy, no recompute); the Triton path reads the tile
        # twice (its forward epilogue does not write it)
        probs_in_tile = not use_triton and plan.compute_dtype in (torch.float32, torch.float64)

        def chunk_terms(s, e):
            h_c, logits = chunks.logits(s, e)
            t_c = targets[s:e]
            if probs_in_tile:
                lp, lse, en = _tile_probs_reference(logits, t_c, inv_t, ignore_index, with_entropy)
            else:
                lp, en, lse = _tile_fwd(logits, t_c, inv_t, ignore_index, with_entropy, use_triton, False)
            if with_entropy:
                entropy[s:e] = en
            if with_logprobs:
                logprobs[s:e] = lp
            ref_c = None if ref_logprobs is None else ref_logprobs[s:e]
            # on-policy: old = this chunk's own logprobs (a plain tensor here: no graph to detach)
            old_c = lp if old_logprobs is None else old_logprobs[s:e]
            _, g_c, stats = token_loss_terms(
                lp, old_c, advantages[s:e], mask[s:e], weights[s:e], ref_logprobs=ref_c,
                impl=terms_impl, **loss_cfg,
            )
            totals.add_(torch.stack([stats[k].float() for k in STAT_NAMES]))
            return h_c, logits, t_c, lse, g_c

        if need_h or need_w or need_b:
            def dlogits_of(s, e):
                h_c, logits, t_c, lse, g_c = chunk_terms(s, e)
                if probs_in_tile:
                    _tile_bwd_from_probs_reference(logits, t_c, g_c, inv_t, ignore_index)
                else:
                    _tile_bwd(logits, t_c, lse, None, g_c, None, inv_t, ignore_index, use_triton)
                return h_c, logits

            grads = _backward_sweep(
                chunks, dlogits_of, need_h, need_w, need_b, hidden.dtype, weight.dtype,
                None if bias is None else bias.dtype,
            )
        else:
            for s, e in chunks.ranges():
                chunk_terms(s, e)
            grads = (None, None, None)
        ctx.grads = grads
        empty = torch.zeros(0, dtype=plan.out_dtype, device=hidden.device)
        entropy = empty if entropy is None else entropy
        logprobs = empty if logprobs is None else logprobs
        ctx.mark_non_differentiable(totals, entropy, logprobs)
        loss = totals[STAT_NAMES.index("loss")].clone()
        return loss, totals, entropy, logprobs

    @staticmethod
    def backward(ctx, g_loss, _g_totals, _g_entropy, _g_logprobs):
        # in place: the gradients are ours alone (a fresh [V, H] product would add a second d weight)
        d_hidden, d_weight, d_bias = (None if g is None else g.mul_(g_loss.to(g.dtype)) for g in ctx.grads)
        ctx.grads = None
        return (d_hidden, d_weight, d_bias) + (None,) * 13


def fused_linear_policy_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None = None,
    seq_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    kl_coef: float = 0.0,
    kl_estimator: str = "k3",
    agg: str = "token-mean",
    loss_scale: float | None = None,
    global_tokens: float | torch.Tensor | None = None,
    global_seqs: float | torch.Tensor | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
    chunk_size: int | None = None,
    grad_accum_dtype: torch.dtype | None = None,
    return_entropy: bool = False,
    loss_type: str = "ppo",
    importance_sampling_level: str = "token",
    delta: float | None = None,
    top_entropy_quantile: float = 1.0,
    sapo_temperatures: tuple[float, float] = SAPO_TEMPERATURES,
    vespo_gamma: tuple[float, float, float, float] = VESPO_GAMMA,
    kl_importance_weighted: bool = False,
    off_policy_mask_threshold: float | None = None,
    return_logprobs: bool = False,
):
    """Policy loss of the tokens' log-probabilities, with the lm_head fused in: never forms [N, V].

    Equal (loss, metrics and gradients) to
        policy_loss(fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                    ignore_index=ignore_index), old_logprobs, advantages, mask, ...)
    but in one pass over the token chunks: the loss maths is `wz_kernels.policy_loss.token_loss_terms`
    applied per chunk with weights from `aggregation_weights` over all N tokens, and d hidden / d weight /
    d bias are formed in the forward pass (6NHV flops, no recompute) and scaled by the upstream scalar
    in backward. Per-token memory is O(N) (weights, logp, d logp of a chunk).

    On-policy fast path: `old_logprobs=None` uses each chunk's freshly computed log-probabilities,
    detached, as the old ones, inside the same pass. That is
        lp = fused_linear_logprobs(...);  policy_loss(lp, lp.detach(), advantages, mask, ...)
    in one pass over the vocabulary instead of two (no separate no-grad "old logprob" sweep): the
    ratio is exactly 1, no token clips, and the gradient is the plain policy gradient (+ the KL term's).
    Valid when the rollouts were sampled from the current weights and this is the only optimizer step
    on them (one update per rollout batch) and nothing else needs the old log-probabilities.

    Two sweeps instead of one where a token's loss needs other tokens first: importance_sampling_level
    "sequence" / "sequence_token" (GSPO: the sequence's mean log-ratio), loss_type "vespo" (its summed
    sequence log-ratio), top_entropy_quantile < 1 (the entropy quantile of all the call's tokens) and
    off_policy_mask_threshold (each sequence's mean KL). Then it is exactly
        lp, ent = fused_linear_logprobs(..., return_entropy=True)
        policy_loss(lp, old_logprobs or lp.detach(), ..., policy_mask=high_entropy_mask(ent, mask, q)
                    * off_policy_sequence_mask(advantages, lp, old_logprobs, mask, seq_ids, threshold))
    (forward 2NHV flops, backward recomputes the tiles: 8NHV in all, the same as one pass + recompute).
    The call must then hold whole sequences (the trainer never splits one across micro-batches).

    Args:
        hidden [N, H], weight [V, H], targets [N], bias [V] | None, temperature, ignore_index: as in
            `fused_linear_logprobs`.
        old_logprobs: [N] float (behaviour policy), or None for the on-policy fast path above.
        advantages [N] float; mask [N] bool/int/float; ref_logprobs [N] | None;
        seq_ids [N] int | None; clip_low, clip_high, dual_clip, kl_coef, kl_estimator, agg,
        loss_scale, global_tokens, global_seqs, loss_type, importance_sampling_level, delta,
        sapo_temperatures, vespo_gamma, kl_importance_weighted: as in `wz_kernels.policy_loss`.
        top_entropy_quantile: keep the policy term of only the tokens in this top quantile of entropy
            (`wz_kernels.policy_loss.high_entropy_mask` over this call's masked tokens; 1.0: all). The KL
            term and the aggregation still count every masked token, as TRL does.
        off_policy_mask_threshold: drop the policy term of the sequences with A < 0 whose mean
            (old_logprobs - logprobs) exceeds it (DeepSeek-V3.2's off-policy sequence mask, TRL's option of
            that name; `wz_kernels.policy_loss.off_policy_sequence_mask`); None: off. Needs seq_ids.
        impl, chunk_size, grad_accum_dtype: as in `fused_linear_logprobs`.
        return_entropy: also return each token's entropy [N] (float32, no gradient; 0 at ignored
            positions), computed from the same tiles (what the trainer logs when it skips the old pass).
        return_logprobs: also return each token's log-probability [N] (float32, detached), for metrics.

    Returns:
        (loss 0-d float32, metrics dict of 0-d float32 tensors: see `policy_loss`), plus entropy [N]
        float32 when `return_entropy`, plus logprobs [N] when `return_logprobs` (in that order).
    """
    from .policy_loss import STAT_NAMES, aggregation_weights, metrics_from_stats

    if not isinstance(top_entropy_quantile, (int, float)) or not 0.0 <= top_entropy_quantile <= 1.0:
        raise ValueError(f"{OP_LOSS}: top_entropy_quantile must be a number in [0, 1], "
                         f"got {top_entropy_quantile!r}")
    soft = {"sapo_temperatures": sapo_temperatures, "vespo_gamma": vespo_gamma,
            "kl_importance_weighted": kl_importance_weighted}
    if off_policy_mask_threshold is not None and (
            not isinstance(off_policy_mask_threshold, (int, float)) or not math.isfinite(off_policy_mask_threshold)
            or seq_ids is None):
        raise ValueError(f"{OP_LOSS}: off_policy_mask_threshold must be None or a finite number, with seq_ids; "
                         f"got {off_policy_mask_threshold!r} (seq_ids {'missing' if seq_ids is None else 'given'})")
    if (importance_sampling_level != "token" or top_entropy_quantile < 1.0 or loss_type == "vespo"
            or off_policy_mask_threshold is not None):
        logprob_kwargs = {"bias": bias, "temperature": temperature, "ignore_index": ignore_index,
                          "impl": impl, "chunk_size": chunk_size, "grad_accum_dtype": grad_accum_dtype}
        loss_kwargs = {"ref_logprobs": ref_logprobs, "seq_ids": seq_ids, "clip_low": clip_low,
                       "clip_high": clip_high, "dual_clip": dual_clip, "kl_coef": kl_coef,
                       "kl_estimator": kl_estimator, "agg": agg, "loss_scale": loss_scale,
                       "global_tokens": global_tokens, "global_seqs": global_seqs, "loss_type": loss_type,
                       "importance_sampling_level": importance_sampling_level, "delta": delta, "impl": impl,
                       **soft}
        return _two_sweep_policy_loss(hidden, weight, targets, old_logprobs, advantages, mask,
                                      top_entropy_quantile, off_policy_mask_threshold, return_entropy,
                                      return_logprobs, logprob_kwargs, loss_kwargs)
    _check_inputs(OP_LOSS, hidden, weight, targets, bias, temperature, ignore_index,
                  host_check_targets=not _kernel_checks_targets(impl, hidden))
    N = hidden.shape[0]
    per_token = (("old_logprobs", old_logprobs), ("advantages", advantages), ("ref_logprobs", ref_logprobs))
    for name, t in per_token:
        if t is not None:
            check_tensor(OP_LOSS, name, t, shape=(N,), floating=True, device=hidden.device)
    check_tensor(OP_LOSS, "mask", mask, shape=(N,), device=hidden.device)
    use_triton = _use_triton(impl, hidden.device, OP_LOSS)
    plan = _plan(hidden, weight, chunk_size, grad_accum_dtype, upcast=False, reference=not use_triton)
    weights = aggregation_weights(  # [N] f32, O(N), computed once for all chunks
        mask, seq_ids, agg, loss_scale=loss_scale, global_tokens=global_tokens, global_seqs=global_seqs
    )
    loss_cfg = {
        "clip_low": float(clip_low), "clip_high": float(clip_high),
        "dual_clip": None if dual_clip is None else float(dual_clip), "kl_coef": float(kl_coef),
        "kl_estimator": kl_estimator, "loss_type": loss_type,
        "delta": None if delta is None else float(delta), **soft,
    }
    loss, totals, entropy, logprobs = _FusedLinearPolicyLoss.apply(
        hidden, weight, bias, targets, old_logprobs, advantages, mask, ref_logprobs, weights,
        float(temperature), ignore_index, plan, use_triton, loss_cfg, bool(return_entropy), bool(return_logprobs),
    )
    metrics = metrics_from_stats(dict(zip(STAT_NAMES, totals.unbind(0))))
    return (loss, metrics) + ((entropy,) if return_entropy else ()) + ((logprobs,) if return_logprobs else ())


def _two_sweep_policy_loss(hidden, weight, targets, old_logprobs, advantages, mask, top_entropy_quantile,
                           off_policy_mask_threshold, return_entropy, return_logprobs, logprob_kwargs,
                           loss_kwargs):
    """`fused_linear_policy_loss` where tokens depend on each other (see its docstring): the log-probs
    (+ entropy) of every token first, then the loss on [N] vectors; autograd recomputes the tiles."""
    from .policy_loss import high_entropy_mask, off_policy_sequence_mask, policy_loss

    need_entropy = return_entropy or top_entropy_quantile < 1.0
    out = fused_linear_logprobs(hidden, weight, targets, return_entropy=need_entropy, **logprob_kwargs)
    logprobs, entropy = out if need_entropy else (out, None)
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    policy_mask = None
    if top_entropy_quantile < 1.0:
        policy_mask = high_entropy_mask(entropy.detach(), mask, top_entropy_quantile)
    if off_policy_mask_threshold is not None:
        keep = off_policy_sequence_mask(advantages, logprobs, old, mask, loss_kwargs["seq_ids"],
                                        off_policy_mask_threshold)
        policy_mask = keep if policy_mask is None else policy_mask & keep
    loss, metrics = policy_loss(logprobs, old, advantages, mask, policy_mask=policy_mask, **loss_kwargs)
    return ((loss, metrics) + ((entropy.detach(),) if return_entropy else ())
            + ((logprobs.detach().float(),) if return_logprobs else ()))
