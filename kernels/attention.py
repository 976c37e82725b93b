"""Packed-sequence (varlen) attention: causal within each sequence, never across sequences.

Layout (the flash-attn varlen convention): B sequences are concatenated along the token axis,
`cu_seqlens` [B+1] int32 holds their offsets (cu_seqlens[0] == 0, cu_seqlens[-1] == N), and
`max_seqlen` bounds the longest one (it sizes the launch grid). No token is ever padded.

Layers:
  - `varlen_attention_reference`: per-sequence plain-torch attention (the specification).
  - `_varlen_attention_fwd_kernel` / `_varlen_attention_bwd_*_kernel`: FlashAttention-2-style Triton
    kernels. The forward keeps an online softmax (running max and sum) per query block and saves the
    log-sum-exp (base 2) per query row; the backward recomputes P from it. Nothing of size N x N is
    ever materialised. GQA: a query head h reads key/value head h // (Hq // Hkv); dK/dV of a
    key/value head sum over its query-head group inside one program (no atomics).
  - `wz::varlen_attention_fwd` / `wz::varlen_attention_bwd` torch.library ops with fake kernels and
    autograd, so torch.compile can trace through the Triton path.
  - `varlen_attention(...)`: the public entry, `impl` in auto / reference / triton / torch / flash_attn
    ("torch": torch's own FlashAttention varlen op, `torch.nn.attention.varlen.varlen_attn`).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch

from ._backend import check_tensor, interpreting, next_power_of_2, resolve_impl, triton_available

OP = "varlen_attention"
IMPLS = ("auto", "reference", "triton", "flash_attn", "torch")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------- reference


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """Plain-torch varlen attention, one sequence at a time (the specification).

    q [N, Hq, D], k/v [N, Hkv, D], cu_seqlens [B+1] -> out [N, Hq, D] (float64 when `upcast`).
    GQA by repeating each key/value head Hq // Hkv times. `max_seqlen` is accepted for signature
    parity and ignored.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    outs = [q.new_zeros((0, q.shape[1], v.shape[-1]))]
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs = q[start:end].transpose(0, 1)  # [Hq, L, D]
        ks = k[start:end].repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
        vs = v[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (qs @ ks.transpose(1, 2)) * scale  # [Hq, L, L]
        if causal:
            length = end - start
            future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        outs.append((scores.softmax(dim=-1) @ vs).transpose(0, 1))  # [L, Hq, D]
    return torch.cat(outs, dim=0)


# ----------------------------------------------------------------------------- Triton kernels

if triton_available():
    import triton
    import triton.language as tl

    # Every tile load and store goes through `_tile_offsets`: element offsets are computed in int64,
    # because cu_seqlens is int32 and (start + row) * stride_n passes 2^31 once tokens x Hq x D does
    # (~1M tokens at Hq=16, D=128), and head * stride_h can too when q is a [B, H, L, D] view.
    # Every lane of a load is either in bounds or masked, including rows that are never stored: an
    # over-read there leaves every output right (the numeric tests pass) but reads past the tensor,
    # which the interpreter does on raw host addresses (a segfault when the page is unmapped).
    # tests/kernels/interpreter_guard.py checks every interpreted access of the attention tests.
    #
    # Every kernel walks its key (or query) blocks in two kinds of step: MASKED steps check sequence
    # ends and the causal diagonal, unmasked steps (blocks wholly inside the sequence and wholly
    # below the diagonal: most of them) skip those checks. Each `_*_steps` helper is one such walk.
    #
    # Grid: axis 0 = (sequence, block) flattened (seq = pid // blocks_per_seq), axis 1 = head. The
    # sequence count is not a grid axis of its own: axes 1 and 2 stop at 65,535 on CUDA, axis 0 at
    # 2^31 - 1.

    @triton.jit
    def _tile_offsets(start, rows, head, stride_n, stride_h, offs_d):
        """int64 element offsets [len(rows), len(offs_d)] of tokens start + rows of one head."""
        token = start.to(tl.int64) + rows
        return token[:, None] * stride_n + head.to(tl.int64) * stride_h + offs_d[None, :]

    @triton.jit
    def _row_offsets(start, rows, head, stride_h):
        """int64 offsets [len(rows)] into a per-head row vector [H, N] (LSE, delta)."""
        return head.to(tl.int64) * stride_h + start.to(tl.int64) + rows

    @triton.jit
    def _load_tile(base, start, rows, head, stride_n, stride_h, offs_d, mask, UPCAST: tl.constexpr):
        """[len(rows), BLOCK_D] tile (masked elements read 0), in fp32 when UPCAST (interpreter's bf16 dot)."""
        tile = tl.load(base + _tile_offsets(start, rows, head, stride_n, stride_h, offs_d), mask=mask, other=0.0)
        if UPCAST:
            tile = tile.to(tl.float32)
        return tile

    @triton.jit
    def _sequence_block(CU_SEQLENS, blocks_per_seq, BLOCK: tl.constexpr):
        """(start, length, first row of this program's block) from the flattened grid axis 0."""
        pid = tl.program_id(0)
        seq = pid // blocks_per_seq
        start = tl.load(CU_SEQLENS + seq)
        length = tl.load(CU_SEQLENS + seq + 1) - start
        return start, length, (pid % blocks_per_seq) * BLOCK

    @triton.jit
    def _fwd_steps(
        acc, l_i, m_i, q, K, V, start, length, kv_head, stride_kn, stride_kh, stride_vn, stride_vh,
        offs_m, offs_n, offs_d, d_valid, qk_scale_log2, lo, hi,
        MASKED: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        for n0 in range(lo, hi, BLOCK_N):
            offs_kn = n0 + offs_n
            kv_mask = d_valid[None, :]
            if MASKED:
                kv_mask = kv_mask & (offs_kn < length)[:, None]
            k = _load_tile(K, start, offs_kn, kv_head, stride_kn, stride_kh, offs_d, kv_mask, UPCAST)
            v = _load_tile(V, start, offs_kn, kv_head, stride_vn, stride_vh, offs_d, kv_mask, UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale_log2  # [BLOCK_M, BLOCK_N]
            if MASKED:
                keep = (offs_kn < length)[None, :]
                if CAUSAL:
                    keep = keep & (offs_m[:, None] >= offs_kn[None, :])
                s = tl.where(keep, s, float("-inf"))
            # Every valid row sees at least one key in its first step, so m_new is finite from then on.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _varlen_attention_fwd_kernel(
        Q, K, V, O, LSE, CU_SEQLENS, blocks_per_seq,
        qk_scale_log2,  # softmax_scale * log2(e): the kernel works in base 2
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
        stride_lse_h,
        HEAD_DIM, GROUP: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        start, length, block_start = _sequence_block(CU_SEQLENS, blocks_per_seq, BLOCK_M)
        head = tl.program_id(1)
        kv_head = head // GROUP

        offs_m = block_start + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < length
        d_valid = offs_d < HEAD_DIM
        q_mask = m_valid[:, None] & d_valid[None, :]
        # UPCAST: the interpreter's bf16 tl.dot is wrong, so compute in fp32 there
        q = _load_tile(Q, start, offs_m, head, stride_qn, stride_qh, offs_d, q_mask, UPCAST)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        # Keys [0, hi) matter: causal blocks stop at the diagonal; blocks past the sequence do nothing.
        # Keys [0, full) are valid and (causal) strictly before every query of the block: no masks.
        hi = length
        full = (length // BLOCK_N) * BLOCK_N
        if CAUSAL:
            hi = tl.minimum(length, block_start + BLOCK_M)
            full = tl.minimum(full, (block_start // BLOCK_N) * BLOCK_N)
        hi = tl.where(block_start < length, hi, 0)
        full = tl.minimum(full, hi)
        acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, q, K, V, start, length, kv_head, stride_kn, stride_kh,
                                   stride_vn, stride_vh, offs_m, offs_n, offs_d, d_valid, qk_scale_log2,
                                   0, full, False, CAUSAL, UPCAST, PRECISION, BLOCK_N)
        acc, l_i, m_i = _fwd_steps(acc, l_i, m_i, q, K, V, start, length, kv_head, stride_kn, stride_kh,
                                   stride_vn, stride_vh, offs_m, offs_n, offs_d, d_valid, qk_scale_log2,
                                   full, hi, True, CAUSAL, UPCAST, PRECISION, BLOCK_N)

        l_i = tl.where(l_i > 0, l_i, 1.0)  # rows past the sequence end: never stored, keep them finite
        acc = acc / l_i[:, None]
        tl.store(O + _tile_offsets(start, offs_m, head, stride_on, stride_oh, offs_d),
                 acc.to(O.dtype.element_ty), mask=q_mask)
        tl.store(LSE + _row_offsets(start, offs_m, head, stride_lse_h), m_i + tl.log2(l_i), mask=m_valid)

    @triton.jit
    def _varlen_attention_bwd_preprocess_kernel(
        O, DO, DELTA, N, stride_on, stride_oh, stride_don, stride_doh, stride_delta_h,
        HEAD_DIM, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """delta[h, n] = sum_d dO[n, h, d] * O[n, h, d] (= rowsum(P * dP), needed for dS)."""
        row0 = tl.program_id(0) * BLOCK_M
        head = tl.program_id(1)
        rows = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_valid = row0 + rows < N
        mask = row_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
        o = _load_tile(O, row0, rows, head, stride_on, stride_oh, offs_d, mask, True)
        do = _load_tile(DO, row0, rows, head, stride_don, stride_doh, offs_d, mask, True)
        tl.store(DELTA + _row_offsets(row0, rows, head, stride_delta_h), tl.sum(o * do, 1), mask=row_valid)

    @triton.jit
    def _dkdv_steps(
        dk, dv, k, v, Q, DO, LSE, DELTA, head, start, length, stride_qn, stride_qh, stride_don, stride_doh,
        stride_lse_h, offs_n, offs_m, offs_d, d_valid, qk_scale_log2, lo, hi,
        MASKED: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        for m0 in range(lo, hi, BLOCK_M):
            offs_qm = m0 + offs_m
            q_mask = d_valid[None, :]
            row_mask = offs_qm >= 0
            if MASKED:
                row_mask = offs_qm < length
                q_mask = q_mask & row_mask[:, None]
            q = _load_tile(Q, start, offs_qm, head, stride_qn, stride_qh, offs_d, q_mask, UPCAST)
            do = _load_tile(DO, start, offs_qm, head, stride_don, stride_doh, offs_d, q_mask, UPCAST)
            rows = _row_offsets(start, offs_qm, head, stride_lse_h)
            lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
            delta = tl.load(DELTA + rows, mask=row_mask, other=0.0)
            # Transposed scores: rows are keys, columns queries.
            p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale_log2 - lse[None, :])
            if MASKED:
                keep = (offs_n < length)[:, None] & row_mask[None, :]
                if CAUSAL:
                    keep = keep & (offs_qm[None, :] >= offs_n[:, None])
                p_t = tl.where(keep, p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
        return dk, dv

    @triton.jit
    def _varlen_attention_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS, blocks_per_seq,
        qk_scale_log2, softmax_scale,
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
        stride_dkn, stride_dkh, stride_dvn, stride_dvh, stride_lse_h,
        HEAD_DIM, GROUP: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One key/value block of one key/value head: dK, dV summed over its query-head group."""
        start, length, block_start = _sequence_block(CU_SEQLENS, blocks_per_seq, BLOCK_N)
        kv_head = tl.program_id(1)

        offs_n = block_start + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_valid = offs_d < HEAD_DIM
        kv_mask = (offs_n < length)[:, None] & d_valid[None, :]
        k = _load_tile(K, start, offs_n, kv_head, stride_kn, stride_kh, offs_d, kv_mask, UPCAST)
        v = _load_tile(V, start, offs_n, kv_head, stride_vn, stride_vh, offs_d, kv_mask, UPCAST)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

        # Query blocks [lo, hi) see this key block (causal: only those at or after it). Of these,
        # [u_lo, u_hi) are wholly valid and wholly after the block's last key: no masks there.
        hi = tl.where(block_start < length, length, 0)
        lo = 0
        u_lo = 0
        if CAUSAL:
            lo = (block_start // BLOCK_M) * BLOCK_M
            u_lo = tl.cdiv(block_start + BLOCK_N, BLOCK_M) * BLOCK_M
        u_lo = tl.minimum(u_lo, hi)
        u_hi = tl.minimum(tl.maximum(u_lo, (length // BLOCK_M) * BLOCK_M), hi)
        u_hi = tl.where(block_start + BLOCK_N <= length, u_hi, u_lo)  # a ragged key block: all masked
        for g in range(GROUP):
            head = kv_head * GROUP + g
            dk, dv = _dkdv_steps(dk, dv, k, v, Q, DO, LSE, DELTA, head, start, length, stride_qn, stride_qh,
                                 stride_don, stride_doh, stride_lse_h, offs_n, offs_m, offs_d, d_valid,
                                 qk_scale_log2, lo, u_lo, True, CAUSAL, UPCAST, PRECISION, BLOCK_M)
            dk, dv = _dkdv_steps(dk, dv, k, v, Q, DO, LSE, DELTA, head, start, length, stride_qn, stride_qh,
                                 stride_don, stride_doh, stride_lse_h, offs_n, offs_m, offs_d, d_valid,
                                 qk_scale_log2, u_lo, u_hi, False, CAUSAL, UPCAST, PRECISION, BLOCK_M)
            dk, dv = _dkdv_steps(dk, dv, k, v, Q, DO, LSE, DELTA, head, start, length, stride_qn, stride_qh,
                                 stride_don, stride_doh, stride_lse_h, offs_n, offs_m, offs_d, d_valid,
                                 qk_scale_log2, u_hi, hi, True, CAUSAL, UPCAST, PRECISION, BLOCK_M)

        dk = dk * softmax_scale
        tl.store(DK + _tile_offsets(start, offs_n, kv_head, stride_dkn, stride_dkh, offs_d),
                 dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + _tile_offsets(start, offs_n, kv_head, stride_dvn, stride_dvh, offs_d),
                 dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _dq_steps(
        dq, q, do, lse, delta, K, V, start, length, kv_head, stride_kn, stride_kh, stride_vn, stride_vh,
        offs_m, offs_n, offs_d, d_valid, qk_scale_log2, lo, hi,
        MASKED: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        for n0 in range(lo, hi, BLOCK_N):
            offs_kn = n0 + offs_n
            kv_mask = d_valid[None, :]
            if MASKED:
                kv_mask = kv_mask & (offs_kn < length)[:, None]
            k = _load_tile(K, start, offs_kn, kv_head, stride_kn, stride_kh, offs_d, kv_mask, UPCAST)
            v = _load_tile(V, start, offs_kn, kv_head, stride_vn, stride_vh, offs_d, kv_mask, UPCAST)
            p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale_log2 - lse[:, None])
            if MASKED:
                keep = (offs_m < length)[:, None] & (offs_kn < length)[None, :]
                if CAUSAL:
                    keep = keep & (offs_m[:, None] >= offs_kn[None, :])
                p = tl.where(keep, p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        return dq

    @triton.jit
    def _varlen_attention_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS, blocks_per_seq,
        qk_scale_log2, softmax_scale,
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
        stride_dqn, stride_dqh, stride_lse_h,
        HEAD_DIM, GROUP: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One query block of one query head: dQ = sum over visible keys of dS K * scale."""
        start, length, block_start = _sequence_block(CU_SEQLENS, blocks_per_seq, BLOCK_M)
        head = tl.program_id(1)
        kv_head = head // GROUP

        offs_m = block_start + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < length
        d_valid = offs_d < HEAD_DIM
        q_mask = m_valid[:, None] & d_valid[None, :]
        q = _load_tile(Q, start, offs_m, head, stride_qn, stride_qh, offs_d, q_mask, UPCAST)
        do = _load_tile(DO, start, offs_m, head, stride_don, stride_doh, offs_d, q_mask, UPCAST)
        rows = _row_offsets(start, offs_m, head, stride_lse_h)
        lse = tl.load(LSE + rows, mask=m_valid, other=0.0)
        delta = tl.load(DELTA + rows, mask=m_valid, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        # The same split as the forward: keys [0, full) unmasked, [full, hi) masked. Rows past the
        # sequence end read lse = 0 and get garbage p in unmasked steps, but they are never stored.
        hi = length
        full = (length // BLOCK_N) * BLOCK_N
        if CAUSAL:
            hi = tl.minimum(length, block_start + BLOCK_M)
            full = tl.minimum(full, (block_start // BLOCK_N) * BLOCK_N)
        hi = tl.where(block_start < length, hi, 0)
        full = tl.minimum(full, hi)
        dq = _dq_steps(dq, q, do, lse, delta, K, V, start, length, kv_head, stride_kn, stride_kh, stride_vn,
                       stride_vh, offs_m, offs_n, offs_d, d_valid, qk_scale_log2, 0, full,
                       False, CAUSAL, UPCAST, PRECISION, BLOCK_N)
        dq = _dq_steps(dq, q, do, lse, delta, K, V, start, length, kv_head, stride_kn, stride_kh, stride_vn,
                       stride_vh, offs_m, offs_n, offs_d, d_valid, qk_scale_log2, full, hi,
                       True, CAUSAL, UPCAST, PRECISION, BLOCK_N)

        dq = dq * softmax_scale
        tl.store(DQ + _tile_offsets(start, offs_m, head, stride_dqn, stride_dqh, offs_d),
                 dq.to(DQ.dtype.element_ty), mask=q_mask)


@dataclass(frozen=True)
class _LaunchConfig:
    """Block sizes and warps for one launch (one config: no autotune, so the interpreter works)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Chosen with `python -m bench audit` (sm_90, Triton 3.6): for each kernel, dtype class and head-dim
# class, a tile whose compiled kernel keeps every value in registers (no spill) and fits the 227 KB
# of shared memory per block; registers per thread in the comments (bench/RESULTS.md has the table).
# fp32 runs IEEE dots on CUDA cores (no TF32): each thread then holds whole D-long operand rows, so
# only small tiles fit. wgmma wants M >= 64 per warpgroup, hence BLOCK_M 128 with 8 warps forward.
_INTERPRETER = _LaunchConfig(16, 16, 1, 1)  # ~2.5 ms per program x loop step: smallest tl.dot blocks
_CONFIGS = {  # (kernel, 16-bit?, head-dim class) -> config
    ("fwd", True, 64): _LaunchConfig(128, 64, 8, 3),  # 126-127 registers
    ("fwd", True, 128): _LaunchConfig(128, 64, 8, 3),  # 203-205
    ("fwd", True, 256): _LaunchConfig(64, 64, 8, 2),  # 244 (the D=128 tile needs 256 KB of smem)
    ("dkdv", True, 64): _LaunchConfig(32, 128, 8, 1),  # 166-181
    ("dkdv", True, 128): _LaunchConfig(16, 64, 8, 1),  # 194-207 (BLOCK_M 32: 231-255, at the limit)
    ("dkdv", True, 256): _LaunchConfig(16, 32, 8, 1),  # 175-200
    ("dq", True, 64): _LaunchConfig(64, 64, 4, 2),  # 168
    ("dq", True, 128): _LaunchConfig(64, 64, 8, 2),  # 188-190
    ("dq", True, 256): _LaunchConfig(16, 32, 8, 1),  # 126-128
    ("fwd", False, 64): _LaunchConfig(32, 32, 8, 1),  # 66
    ("fwd", False, 128): _LaunchConfig(16, 16, 4, 1),  # 80-83
    ("fwd", False, 256): _LaunchConfig(16, 16, 4, 1),  # 128-140
    ("dkdv", False, 64): _LaunchConfig(32, 32, 8, 1),  # 102-107
    ("dkdv", False, 128): _LaunchConfig(16, 16, 4, 2),  # 188
    ("dkdv", False, 256): _LaunchConfig(16, 16, 8, 1),  # 152-172
    ("dq", False, 64): _LaunchConfig(32, 32, 8, 1),  # 74
    ("dq", False, 128): _LaunchConfig(16, 16, 8, 1),  # 62-74
    ("dq", False, 256): _LaunchConfig(16, 16, 8, 1),  # 86-93
}


def _launch_config(kernel: str, head_dim: int, dtype: torch.dtype) -> _LaunchConfig:
    """kernel in fwd / dkdv / dq; head_dim <= _MAX_HEAD_DIM."""
    if interpreting():
        return _INTERPRETER
    head_class = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    return _CONFIGS[(kernel, dtype != torch.float32, head_class)]


def _kernel_flags(q: torch.Tensor) -> dict:
    """Constexpr flags shared by every launch: fp32 stays IEEE (no TF32), bf16/fp16 upcast when interpreting."""
    return dict(
        UPCAST=interpreting() and q.dtype != torch.float32,
        PRECISION="ieee" if q.dtype == torch.float32 else None,  # None: triton's default for 16-bit operands
        BLOCK_D=max(16, next_power_of_2(q.shape[-1])),
        HEAD_DIM=q.shape[-1],
    )


_MAX_GRID_X, _MAX_GRID_Y = 2**31 - 1, 65535


def _grid(batch: int, max_seqlen: int, block: int, heads: int) -> tuple[int, int]:
    """(sequences x blocks per sequence, heads): the layout `_sequence_block` decodes."""
    blocks = triton.cdiv(max(max_seqlen, 1), block)
    if batch * blocks > _MAX_GRID_X or heads > _MAX_GRID_Y:
        raise ValueError(f"{OP}: {batch} sequences x {blocks} blocks of {block} tokens or {heads} heads exceed "
                         "the CUDA grid; split the batch")
    return blocks, (batch * blocks, heads)


def _fwd_launch(q, k, v, cu_seqlens, max_seqlen: int, causal: bool, scale: float):
    # q [N, Hq, D], k/v [N, Hkv, D] -> out [N, Hq, D], lse [Hq, N] (float32, base 2)
    n, hq, d = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((hq, n), dtype=torch.float32, device=q.device)
    batch = cu_seqlens.numel() - 1
    if n == 0 or batch == 0:
        return out, lse
    cfg = _launch_config("fwd", d, q.dtype)
    blocks, grid = _grid(batch, max_seqlen, cfg.block_m, hq)
    _varlen_attention_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens, blocks, scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        GROUP=hq // k.shape[1], CAUSAL=causal, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_kernel_flags(q),
    )
    return out, lse


def _bwd_launch(do, q, k, v, out, lse, cu_seqlens, max_seqlen: int, causal: bool, scale: float):
    # -> dq [N, Hq, D], dk/dv [N, Hkv, D]
    n, hq, d = q.shape
    hkv = k.shape[1]
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    batch = cu_seqlens.numel() - 1
    if n == 0 or batch == 0:
        return dq, dk, dv
    if do.stride(-1) != 1:
        do = do.contiguous()
    flags = _kernel_flags(q)
    delta = torch.empty_like(lse)
    rows = 64 if d <= 128 else 32  # 64 x 256 bf16 tiles spill 12 bytes (the audit)
    _varlen_attention_bwd_preprocess_kernel[(triton.cdiv(n, rows), hq)](
        out, do, delta, n, out.stride(0), out.stride(1), do.stride(0), do.stride(1), delta.stride(0),
        HEAD_DIM=d, BLOCK_M=rows, BLOCK_D=flags["BLOCK_D"],
    )
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               do.stride(0), do.stride(1))
    cfg = _launch_config("dkdv", d, q.dtype)
    blocks, grid = _grid(batch, max_seqlen, cfg.block_n, hkv)
    _varlen_attention_bwd_dkdv_kernel[grid](
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, blocks, scale * _LOG2E, scale, *strides,
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
        GROUP=hq // hkv, CAUSAL=causal, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
    )
    cfg = _launch_config("dq", d, q.dtype)
    blocks, grid = _grid(batch, max_seqlen, cfg.block_m, hq)
    _varlen_attention_bwd_dq_kernel[grid](
        q, k, v, do, lse, delta, dq, cu_seqlens, blocks, scale * _LOG2E, scale, *strides,
        dq.stride(0), dq.stride(1), lse.stride(0),
        GROUP=hq // hkv, CAUSAL=causal, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------- registration


@torch.library.custom_op("wz::varlen_attention_fwd", mutates_args=())
def _varlen_attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
    max_seqlen: int, causal: bool, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd_launch(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale)


@_varlen_attention_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("wz::varlen_attention_bwd", mutates_args=())
def _varlen_attention_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, causal: bool, softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_launch(do, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale)


@_varlen_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.causal, ctx.softmax_scale = max_seqlen, causal, softmax_scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, d_out, _d_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _varlen_attention_bwd_op(
        d_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, ctx.causal, ctx.softmax_scale
    )
    return dq, dk, dv, None, None, None, None


_varlen_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API


def _check_inputs(q, k, v, cu_seqlens, max_seqlen) -> None:
    check_tensor(OP, "q", q, ndim=3, floating=True)
    check_tensor(OP, "k", k, ndim=3, floating=True, device=q.device)
    check_tensor(OP, "v", v, ndim=3, floating=True, device=q.device)
    check_tensor(OP, "cu_seqlens", cu_seqlens, ndim=1, device=q.device)
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{OP}: cu_seqlens must be int32 (flash-attn convention), got {cu_seqlens.dtype}")
    if cu_seqlens.numel() < 1:
        raise ValueError(f"{OP}: cu_seqlens must hold at least one offset (0), got an empty tensor")
    n, hq, d = q.shape
    if k.shape != v.shape or k.shape[0] != n or k.shape[2] != d:
        raise ValueError(f"{OP}: k {tuple(k.shape)} and v {tuple(v.shape)} must be [N={n}, Hkv, D={d}]")
    if k.shape[1] == 0 or hq % k.shape[1]:
        raise ValueError(f"{OP}: query heads Hq={hq} must be a multiple of key/value heads Hkv={k.shape[1]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{OP}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"{OP}: max_seqlen must be a non-negative int, got {max_seqlen!r}")
    lengths = cu_seqlens.diff()
    if cu_seqlens.device.type == "cpu":
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != n:
            raise ValueError(f"{OP}: cu_seqlens must start at 0 and end at N={n}, got "
                             f"{int(cu_seqlens[0])}..{int(cu_seqlens[-1])}")
        if lengths.numel() and int(lengths.min()) < 0:
            raise ValueError(f"{OP}: cu_seqlens must be non-decreasing")
        if lengths.numel() and int(lengths.max()) > max_seqlen:
            raise ValueError(f"{OP}: max_seqlen={max_seqlen} is less than the longest sequence "
                             f"({int(lengths.max())}); rows past max_seqlen would go unwritten")
    else:  # no host sync per layer on GPU: a device-side assert still refuses a silent wrong answer
        ok = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == n)
        if lengths.numel():
            ok = ok & (lengths.min() >= 0) & (lengths.max() <= max_seqlen)
        torch._assert_async(ok, f"{OP}: cu_seqlens must run 0..N non-decreasing with lengths <= max_seqlen")


def _flash_attn_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise RuntimeError(f"{OP}: impl='flash_attn' needs the flash-attn package "
                           "(pip install 'wz-engine[flash-attn]' on a CUDA machine)") from e
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{OP}: impl='flash_attn' needs fp16/bf16 CUDA tensors, got {q.dtype} on {q.device}")
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  softmax_scale=scale, causal=causal)


def torch_varlen_options(causal: bool, scale: float, head_dim: int, grouped: bool) -> tuple[dict, float, bool]:
    """How to ask this torch's `torch.nn.attention.varlen.varlen_attn` for our semantics.

    Returns (keyword arguments, factor to multiply q by, whether K/V must be repeated to Hq heads).
    The signature moved between releases: 2.10 takes `is_causal` and no scale (a custom scale is
    then folded into q), 2.11 `scale` and `window_size` ((-1, 0) is causal), 2.12+ also `enable_gqa`
    (without it, K/V are repeated to Hq heads: flash's own GQA is not part of that API).
    """
    params = inspect.signature(_torch_varlen_attn()).parameters
    kwargs, q_factor = {}, 1.0
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale != head_dim ** -0.5:
        q_factor = scale * head_dim ** 0.5
    repeat = grouped and "enable_gqa" not in params
    if grouped and not repeat:
        kwargs["enable_gqa"] = True
    return kwargs, q_factor, repeat


def _torch_varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as e:
        raise RuntimeError(f"{OP}: impl='torch' needs torch.nn.attention.varlen.varlen_attn (torch >= 2.10); "
                           f"torch {torch.__version__} has none") from e
    return varlen_attn


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{OP}: impl='torch' (FlashAttention inside torch) takes fp16/bf16, got {q.dtype}")
    group = q.shape[1] // k.shape[1]
    kwargs, q_factor, repeat = torch_varlen_options(causal, scale, q.shape[-1], group > 1)
    if repeat:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if q_factor != 1.0:
        q = q * q_factor
    try:
        return _torch_varlen_attn()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)
    except NotImplementedError as e:  # e.g. "Could not run 'aten::_flash_attention_forward' ... 'CPU' backend"
        raise RuntimeError(f"{OP}: impl='torch': torch {torch.__version__}'s varlen_attn has no kernel for "
                           f"{q.device.type} tensors (FlashAttention is CUDA-only); use impl='auto'") from e


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Attention over packed sequences; differentiable in q, k and v.

    Args:
        q: [N, Hq, D] queries of all sequences, concatenated along tokens.
        k, v: [N, Hkv, D] keys and values; Hq must be a multiple of Hkv (GQA / MQA).
        cu_seqlens: [B+1] int32 offsets: sequence b is tokens cu_seqlens[b]:cu_seqlens[b+1].
        max_seqlen: an upper bound on the longest sequence (sizes the launch grid; a smaller value
            is an error).
        causal: token i of a sequence attends to tokens 0..i of the same sequence; without it, to
            the whole sequence. Attention never crosses a sequence boundary either way.
        softmax_scale: defaults to D ** -0.5.
        impl: "auto" (our Triton kernel on CUDA, the reference on CPU), "reference", "triton" (on
            CPU only under TRITON_INTERPRET=1), "torch" (torch's own
            `torch.nn.attention.varlen.varlen_attn`, FlashAttention inside torch >= 2.10: CUDA,
            fp16/bf16; GQA and causality mapped onto whatever signature the installed torch has, see
            `torch_varlen_options`), or "flash_attn" (flash-attn's `flash_attn_varlen_func`).
            "auto" keeps our Triton kernel on CUDA until a GPU benchmark table (bench/RESULTS.md,
            `python -m bench attention --device cuda`, where "torch varlen_attn" is a peer) shows
            torch's kernel faster; none has been taken yet.

    Returns:
        out: [N, Hq, D] in q's dtype. Zero-length sequences and N == 0 are allowed.

    The Triton path takes fp32 (IEEE dots, no TF32), fp16 and bf16, any head dim up to 256, any
    number of sequences and > 2^31 elements (int64 offsets). On CUDA fp32 runs the same kernels with
    small fp32 tiles: `python -m bench audit` shows them free of register spills for D <= 256 (as
    are the 16-bit ones); FlashAttention (impl="torch" / "flash_attn") has no fp32 at all. The
    reference path also takes float64.
    """
    if impl not in IMPLS:
        raise ValueError(f"{OP}: impl={impl!r} is not one of {IMPLS}")
    _check_inputs(q, k, v, cu_seqlens, max_seqlen)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{OP}: softmax_scale must be a positive finite number, got {softmax_scale!r}")
    if impl == "flash_attn":
        return _flash_attn_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale)
    if impl == "torch":
        return _torch_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale)
    backend = resolve_impl(impl, q.device, op=OP)
    if backend == "reference":
        return varlen_attention_reference(q, k, v, cu_seqlens, max_seqlen, causal=causal, softmax_scale=scale)
    if q.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"{OP}: the Triton kernel takes {_KERNEL_DTYPES}, got {q.dtype}; use impl='reference'")
    if q.shape[-1] > _MAX_HEAD_DIM:
        raise ValueError(f"{OP}: head dim {q.shape[-1]} > {_MAX_HEAD_DIM} is not supported by the Triton kernel")
    # The kernels index with explicit token/head strides but assume a unit stride along D.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, _lse = _varlen_attention_fwd_op(q, k, v, cu_seqlens, max_seqlen, causal, scale)
    return out
