"""Packed-sequence attention on an RL length mix, forward and forward+backward.

Inputs: rollout lengths drawn log-normal (median ~600 tokens, long tail) clipped to [64, 4096]
(CPU: [8, 512]), packed by `wz_engine.packing.pack_sequences` into one token budget (GPU 16k / 32k /
64k; CPU 2k); the case is the first (fullest) bin. Hq = 16, Hkv = 4 (GQA 4), D = 128, bf16 on GPU;
Hq = 4, Hkv = 1, D = 64, fp32 on CPU.

Providers:
    ours                 wz_kernels.varlen_attention (Triton on CUDA, the per-sequence reference on CPU)
    sdpa padded          pad to [B, max L], F.scaled_dot_product_attention(is_causal=True) (flash
                         backend on CUDA); padding/repeat of K,V is done once outside the timed region
    sdpa per sequence    one SDPA call per sequence (no padding, B launches)
    flex document mask   FlexAttention with a block mask "same sequence and causal" (CUDA, compiled)
    torch varlen_attn    torch.nn.attention.varlen.varlen_attn, where the installed torch has it (CUDA)
    flash-attn varlen    flash_attn.flash_attn_varlen_func, where installed (CUDA)

FLOP count (only the causal work that is needed, the flash-attention convention): a sequence of
length L costs 2 matmuls x 2 L^2 D flops per head, halved by causality: fwd = sum_i 2 L_i^2 D Hq;
backward = 2.5 x fwd (5 matmuls instead of 2), so fwd+bwd = 3.5 x fwd. Padded providers do more
work than that; they are charged the same count, so their TFLOP/s is "useful" TFLOP/s.
Extra columns: tokens in the bin, sequences, and the fraction of a padded [B, max L] layout that is
padding (what packing avoids). A last case reports packing efficiency (useful tokens / slots) for
the whole mix, best-fit-decreasing bins against padding every micro-batch to its longest sequence.

`python -m bench attention --device cpu`; `pytest bench/bench_attention.py --benchmark-enable`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import wz_kernels

from bench.harness import Case
from wz_engine.packing import pack_sequences, packing_efficiency, plan_bins


def rl_lengths(n: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    """Log-normal rollout lengths clipped to [lo, hi], median hi / 7 (600 for the 64..4096 GPU mix)."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=np.log(hi / 7), sigma=0.9, size=n), lo, hi).astype(int).tolist()


def packed_bin_lengths(budget: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    """Lengths of the fullest bin when a generous RL mix is packed to `budget` tokens."""
    lengths = rl_lengths(max(64, 4 * budget // 600), lo, hi, seed)
    return [lengths[i] for i in plan_bins(lengths, budget)[0]]


def causal_fwd_flops(lengths: list[int], head_dim: int, q_heads: int) -> float:
    return float(sum(2 * n * n * head_dim * q_heads for n in lengths))


def make_inputs(lengths, q_heads, kv_heads, head_dim, dtype, device, requires_grad, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q, k, v = (torch.randn(n, h, head_dim, generator=g).to(device=device, dtype=dtype).requires_grad_(requires_grad)
               for h in (q_heads, kv_heads, kv_heads))
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu


def _run(fn, grad_of, backward: bool):
    """One iteration: forward, and the backward of sum(out) into the inputs `grad_of` if asked."""
    if not backward:
        with torch.no_grad():
            fn()
        return
    out = fn()
    torch.autograd.grad(out, grad_of, torch.ones_like(out))


def _padded(lengths, q, k, v):
    """[N, H, D] packed -> [B, H, max L, D] padded, K/V heads repeated to Hq (flash SDPA has no GQA)."""
    group = q.shape[1] // k.shape[1]

    def pad(t):  # [N, H, D] -> [B, H, max L, D]
        return torch.nn.utils.rnn.pad_sequence(list(t.split(lengths)), batch_first=True).transpose(1, 2)

    qp, kp, vp = pad(q.detach()), pad(k.detach().repeat_interleave(group, 1)), pad(v.detach().repeat_interleave(group, 1))
    return [t.contiguous().requires_grad_(q.requires_grad) for t in (qp, kp, vp)]


def providers(lengths, q, k, v, cu, device: str, backward: bool) -> dict:
    max_len = max(lengths)
    group = q.shape[1] // k.shape[1]
    out = {"ours": lambda: _run(lambda: wz_kernels.varlen_attention(q, k, v, cu, max_len), (q, k, v), backward)}

    qp, kp, vp = _padded(lengths, q, k, v)

    def sdpa_padded():
        if device == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
        return F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)

    out["sdpa padded"] = lambda: _run(sdpa_padded, (qp, kp, vp), backward)

    def sdpa_per_sequence():
        bounds = cu.tolist()
        return torch.cat([
            F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                                           is_causal=True, enable_gqa=True).transpose(0, 1)
            for s, e in zip(bounds[:-1], bounds[1:])
        ])

    out["sdpa per sequence"] = lambda: _run(sdpa_per_sequence, (q, k, v), backward)

    if device == "cuda":
        out.update(_gpu_peers(lengths, q, k, v, cu, backward, group))
    return out


def _gpu_peers(lengths, q, k, v, cu, backward, group) -> dict:
    peers = {}
    max_len = max(lengths)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        seq = torch.repeat_interleave(torch.arange(len(lengths), device=q.device),
                                      torch.tensor(lengths, device=q.device))
        n = q.shape[0]

        def document_causal(b, h, qi, ki):
            return (seq[qi] == seq[ki]) & (qi >= ki)

        block_mask = create_block_mask(document_causal, None, None, n, n, device=q.device)
        flex = torch.compile(flex_attention, dynamic=False)
        qf, kf, vf = (t.detach().transpose(0, 1)[None].requires_grad_(backward) for t in (q, k, v))
        peers["flex document mask"] = lambda: _run(
            lambda: flex(qf, kf, vf, block_mask=block_mask, enable_gqa=True), (qf, kf, vf), backward)
    except Exception as e:  # older torch: reported as a missing row
        print(f"flex attention unavailable: {e}")
    try:
        from torch.nn.attention.varlen import varlen_attn

        kr, vr = (t.detach().repeat_interleave(group, 1).requires_grad_(backward) for t in (k, v))
        peers["torch varlen_attn"] = lambda: _run(
            lambda: varlen_attn(q, kr, vr, cu, cu, max_len, max_len, window_size=(-1, 0)), (q, kr, vr), backward)
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_varlen_func

        peers["flash-attn varlen"] = lambda: _run(
            lambda: flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True), (q, k, v), backward)
    except ImportError:
        pass
    return peers


def padded_efficiency(lengths: list[int], budget: int, hi: int) -> float:
    """The padded baseline under the same memory budget: micro-batches of budget // hi sequences in
    arrival order (the only fixed size that always fits), each padded to its longest sequence."""
    size = max(1, budget // hi)
    batches = [lengths[i:i + size] for i in range(0, len(lengths), size)]
    return sum(lengths) / sum(len(b) * max(b) for b in batches)


def packing_case(budget: int, num_seqs: int = 1024, lo: int = 64, hi: int = 4096) -> Case:
    """The GPU length mix (64..4096) on any device: packing is pure bookkeeping."""
    lengths = rl_lengths(num_seqs, lo, hi, seed=1)
    seqs = [torch.zeros(n, dtype=torch.long) for n in lengths]
    bins = pack_sequences(seqs, budget)
    extra = dict(tokens=sum(lengths), sequences=num_seqs, bins=len(bins),
                 packed_efficiency=round(packing_efficiency(bins, budget), 4),
                 padded_efficiency=round(padded_efficiency(lengths, budget, hi), 4))
    return Case(f"packing {num_seqs} seqs T={budget}", {"pack_sequences (BFD)": lambda: pack_sequences(seqs, budget),
                                                        "plan_bins only": lambda: plan_bins(lengths, budget)},
                extra=extra)


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cuda":
        budgets, lo, hi, hq, hkv, d, dtype = [16384, 32768, 65536], 64, 4096, 16, 4, 128, torch.bfloat16
        if quick:
            budgets = [16384]
    else:
        budgets, lo, hi, hq, hkv, d, dtype = [2048], 8, 512, 4, 1, 64, torch.float32
        if quick:
            budgets = [1024]
    out = []
    for budget in budgets:
        lengths = packed_bin_lengths(budget, lo, hi)
        fwd = causal_fwd_flops(lengths, d, hq)
        extra = dict(tokens=sum(lengths), sequences=len(lengths),
                     padding_avoided=round(1 - sum(lengths) / (len(lengths) * max(lengths)), 3))
        for backward in (False, True):
            q, k, v, cu = make_inputs(lengths, hq, hkv, d, dtype, device, requires_grad=backward)
            label = f"T={budget} B={len(lengths)} {'fwd+bwd' if backward else 'fwd'}"
            out.append(Case(label, providers(lengths, q, k, v, cu, device, backward),
                            flops=fwd * (3.5 if backward else 1.0), extra=extra))
    out.extend(packing_case(budget) for budget in ((16384,) if quick else (16384, 32768, 65536)))
    return out


# ----------------------------------------------------------------------------- pytest-benchmark

_SMALL = dict(lengths=[37, 120, 9, 250, 64], q_heads=4, kv_heads=1, head_dim=64, dtype=torch.float32, device="cpu")


def test_ours_fwd(benchmark):
    q, k, v, cu = make_inputs(**_SMALL, requires_grad=False)
    out = benchmark(wz_kernels.varlen_attention, q, k, v, cu, 250)
    assert out.shape == q.shape


def test_sdpa_per_sequence_fwd(benchmark):
    q, k, v, cu = make_inputs(**_SMALL, requires_grad=False)
    run = providers(_SMALL["lengths"], q, k, v, cu, "cpu", backward=False)["sdpa per sequence"]
    benchmark(run)


def test_pack_sequences(benchmark):
    lengths = rl_lengths(1024, 64, 4096)
    bins = benchmark(pack_sequences, [[0] * n for n in lengths], 16384)
    assert packing_efficiency(bins, 16384) >= 0.95
