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
    torch varlen_attn    torch.nn.attention.varlen.varlen_attn, where the installed torch has it (CUDA);
                         also available as ours with impl="torch" (same signature mapping)
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

import itertools

import numpy as np
import torch
import torch.nn.functional as F

import wz_kernels
from bench.checks import REL_TOL, Check, compare, run_check
from bench.harness import Case, Skipped, optional_peer
from wz_engine.packing import pack_sequences, packing_efficiency, plan_bins
from wz_kernels.attention import torch_varlen_options, varlen_attention_reference


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


def sdpa_per_sequence(q, k, v, cu) -> torch.Tensor:
    """One causal SDPA call per sequence (GQA through enable_gqa): [N, Hq, D]."""
    bounds = cu.tolist()
    return torch.cat([
        F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                                       is_causal=True, enable_gqa=True).transpose(0, 1)
        for s, e in itertools.pairwise(bounds)
    ])


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

    out["sdpa per sequence"] = lambda: _run(lambda: sdpa_per_sequence(q, k, v, cu), (q, k, v), backward)

    if device == "cuda":
        out.update(_gpu_peers(lengths, q, k, v, cu, backward, group))
    return out


def _gpu_peers(lengths, q, k, v, cu, backward, group) -> dict:
    max_len = max(lengths)
    peers = {"flex document mask": _flex_peer(lengths, q, k, v, backward)}
    try:
        from torch.nn.attention.varlen import varlen_attn

        call = _varlen_attn_call(varlen_attn, q, k, v, cu, max_len, group, backward)
        peers["torch varlen_attn"] = lambda: _run(call[0], call[1], backward)
    except ImportError:
        peers["torch varlen_attn"] = Skipped(f"torch {torch.__version__} has no torch.nn.attention.varlen")

    def flash_attn_varlen():
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)

    peers["flash-attn varlen"] = optional_peer(
        "flash_attn", "flash-attn", lambda: _run(flash_attn_varlen, (q, k, v), backward))
    return peers


def _varlen_attn_call(varlen_attn, q, k, v, cu, max_len, group, backward):
    """(forward callable, tensors to differentiate) for this torch's varlen_attn signature, mapped as
    impl="torch" maps it (`wz_kernels.attention.torch_varlen_options`); where that torch lacks
    `enable_gqa`, K/V are repeated to Hq heads once here, outside the timed region."""
    kwargs, _, repeat = torch_varlen_options(True, q.shape[-1] ** -0.5, q.shape[-1], group > 1)
    kr, vr = k, v
    if repeat:
        kr, vr = (t.detach().repeat_interleave(group, 1).requires_grad_(backward) for t in (k, v))
    return (lambda: varlen_attn(q, kr, vr, cu, cu, max_len, max_len, **kwargs)), (q, kr, vr)


def _flex_peer(lengths, q, k, v, backward):
    """FlexAttention with a document-causal block mask. The block mask and the compile are built in the
    first call, so the harness's compile budget covers both (they take long at 64k tokens)."""
    state = {}

    def setup():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        seq = torch.repeat_interleave(torch.arange(len(lengths), device=q.device),
                                      torch.tensor(lengths, device=q.device))
        n = q.shape[0]

        def document_causal(b, h, qi, ki):
            return (seq[qi] == seq[ki]) & (qi >= ki)

        state["mask"] = create_block_mask(document_causal, None, None, n, n, device=q.device)
        state["flex"] = torch.compile(flex_attention, dynamic=False)
        state["qkv"] = [t.detach().transpose(0, 1)[None].requires_grad_(backward) for t in (q, k, v)]

    def run():
        if not state:
            setup()
        qf, kf, vf = state["qkv"]
        _run(lambda: state["flex"](qf, kf, vf, block_mask=state["mask"], enable_gqa=True), (qf, kf, vf),
             backward)
    return run


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
    extra = {"tokens": sum(lengths), "sequences": num_seqs, "bins": len(bins),
             "packed_efficiency": round(packing_efficiency(bins, budget), 4),
             "padded_efficiency": round(padded_efficiency(lengths, budget, hi), 4)}
    return Case(f"packing {num_seqs} seqs T={budget}", {"pack_sequences (BFD)": lambda: pack_sequences(seqs, budget),
                                                        "plan_bins only": lambda: plan_bins(lengths, budget)},
                extra=extra)


def cases(device: str, size: str):
    """CUDA: budgets 16k / 32k / 64k tokens, fwd and fwd+bwd (headline: 16k fwd+bwd; quick: 16k);
    CPU: 2k (quick: 1k). Then the packing-efficiency cases."""
    if device == "cuda":
        budgets, lo, hi, hq, hkv, d, dtype = [16384, 32768, 65536], 64, 4096, 16, 4, 128, torch.bfloat16
        if size != "full":
            budgets = [16384]
    else:
        budgets, lo, hi, hq, hkv, d, dtype = [2048], 8, 512, 4, 1, 64, torch.float32
        if size == "quick":
            budgets = [1024]
    passes = (True,) if size == "headline" else (False, True)
    for budget in budgets:
        lengths = packed_bin_lengths(budget, lo, hi)
        fwd = causal_fwd_flops(lengths, d, hq)
        extra = {"tokens": sum(lengths), "sequences": len(lengths),
                 "padding_avoided": round(1 - sum(lengths) / (len(lengths) * max(lengths)), 3)}
        for backward in passes:
            q, k, v, cu = make_inputs(lengths, hq, hkv, d, dtype, device, requires_grad=backward)
            label = f"T={budget} B={len(lengths)} {'fwd+bwd' if backward else 'fwd'}"
            yield Case(label, providers(lengths, q, k, v, cu, device, backward),
                       check=check(q, k, v, cu, backward),
                       flops=fwd * (3.5 if backward else 1.0), extra=extra)
    if size != "headline":
        yield from (packing_case(b) for b in ((16384,) if size == "quick" else (16384, 32768, 65536)))


def attention_outputs(kind: str, q, k, v, cu, grad_out) -> dict[str, torch.Tensor]:
    """out [N, Hq, D] (and dq, dk, dv for the upstream gradient `grad_out`, when given) from ours, or
    from the library's per-sequence specification on float64 copies of the inputs."""
    dtype = torch.float64 if kind == "reference" else q.dtype
    leaves = [t.detach().to(dtype).requires_grad_(grad_out is not None) for t in (q, k, v)]
    max_len = int((cu[1:] - cu[:-1]).max())
    if kind == "reference":
        out = varlen_attention_reference(*leaves, cu, max_len, upcast=True)
    else:
        out = wz_kernels.varlen_attention(*leaves, cu, max_len)
    result = {"out": out.detach()}
    if grad_out is not None:
        grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
        result.update(zip(("dq", "dk", "dv"), grads))
    return result


def check(q, k, v, cu, backward: bool) -> Check:
    """Ours' output (and dq, dk, dv for a random upstream gradient) against float64 on the case's inputs."""
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q) if backward else None
    return Check(lambda: attention_outputs("ours", q, k, v, cu, grad_out),
                 lambda: attention_outputs("reference", q, k, v, cu, grad_out), dtype=q.dtype)


# ----------------------------------------------------------------------------- pytest-benchmark

_SMALL = {"lengths": [37, 120, 9, 250, 64], "q_heads": 4, "kv_heads": 1, "head_dim": 64,
          "dtype": torch.float32, "device": "cpu"}


def test_ours_fwd_bwd(benchmark):
    q, k, v, cu = make_inputs(**_SMALL, requires_grad=True)
    benchmark(providers(_SMALL["lengths"], q, k, v, cu, "cpu", backward=True)["ours"])
    assert run_check(check(q, k, v, cu, backward=True)) <= REL_TOL[torch.float32]


def test_sdpa_per_sequence_fwd(benchmark):
    """The per-sequence SDPA peer computes the same attention (the table compares like with like)."""
    q, k, v, cu = make_inputs(**_SMALL, requires_grad=False)
    run = providers(_SMALL["lengths"], q, k, v, cu, "cpu", backward=False)["sdpa per sequence"]
    benchmark(run)
    out = sdpa_per_sequence(q, k, v, cu)
    compare(out, attention_outputs("reference", q, k, v, cu, None)["out"], REL_TOL[torch.float32])


def test_pack_sequences(benchmark):
    lengths = rl_lengths(1024, 64, 4096)
    bins = benchmark(pack_sequences, [[0] * n for n in lengths], 16384)
    assert packing_efficiency(bins, 16384) >= 0.95
