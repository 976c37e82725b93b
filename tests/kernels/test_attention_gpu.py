"""varlen_attention on a CUDA device: every impl against float64, fp32, and the GPU-scale edges
(offsets past 2^31 elements, more sequences than a CUDA grid axis holds). Skipped without CUDA.

Low precision follows the flash-attention rule: the error against float64 is at most 2x the error
of the same computation done by torch in that precision, plus a small atol.
"""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_close_to_reference
from tests.kernels.attention_helpers import (
    cu_seqlens,
    fwd_bwd,
    make_inputs,
    poisoned_alloc,  # noqa: F401 (fixture)
)
from wz_kernels.attention import varlen_attention, varlen_attention_reference

pytestmark = pytest.mark.gpu

RL_LENGTHS = [1, 37, 500, 1500, 129]  # a single token, ragged tails, one long sequence


def _require(impl: str, request) -> None:
    """Skip peers this machine lacks; poison our own op's allocations (peers allocate in C++)."""
    if impl == "flash_attn":
        pytest.importorskip("flash_attn")
    if impl == "torch":
        pytest.importorskip("torch.nn.attention.varlen", reason="torch < 2.10 has no varlen_attn")
    if impl == "triton":
        request.getfixturevalue("poisoned_alloc")


def _compare_to_float64(got, lowp, ref, atol, label=""):
    for name, a, t, b in zip(("out", "dq", "dk", "dv"), got, lowp, ref):
        assert a.dtype == t.dtype and a.shape == b.shape, name
        assert_close_to_reference(a, b, t, atol=atol, name=f"{name}{label}")


@pytest.mark.parametrize("impl", ["triton", "torch", "flash_attn"])
@pytest.mark.parametrize("heads", [(16, 4), (8, 8)], ids=["gqa4", "mha"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_float64(dtype, d, causal, heads, impl, request):
    _require(impl, request)
    hq, hkv = heads
    q, k, v, do, cu = (t.cuda() for t in make_inputs(RL_LENGTHS, hq, hkv, d, dtype, seed=5))
    max_len = max(RL_LENGTHS)
    got = fwd_bwd(q, k, v, do, cu, max_len, causal, impl)
    lowp = fwd_bwd(q, k, v, do, cu, max_len, causal, "reference_lowp")
    ref = fwd_bwd(q, k, v, do, cu, max_len, causal, "reference64")
    _compare_to_float64(got, lowp, ref, atol=1e-3)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("d", [40, 64, 128, 256])
@pytest.mark.usefixtures("poisoned_alloc")
def test_fp32_runs_the_triton_kernel_at_ieee_accuracy(d, causal):
    """fp32 on CUDA: impl="auto" is the Triton kernel (IEEE dots, no TF32), held to 2x torch's own
    fp32 error; D=40 exercises the head-dim masks, 256 the largest tiles' shared-memory budget."""
    lengths = [1, 37, 300, 129]
    q, k, v, do, cu = (t.cuda() for t in make_inputs(lengths, 4, 2, d, torch.float32, seed=6))
    got = fwd_bwd(q, k, v, do, cu, 300, causal, "auto", softmax_scale=0.2)
    triton = fwd_bwd(q, k, v, do, cu, 300, causal, "triton", softmax_scale=0.2)
    for a, b in zip(got, triton):
        assert torch.equal(a, b)  # auto on CUDA fp32 is the Triton path
    lowp = fwd_bwd(q, k, v, do, cu, 300, causal, "reference_lowp", softmax_scale=0.2)
    ref = fwd_bwd(q, k, v, do, cu, 300, causal, "reference64", softmax_scale=0.2)
    _compare_to_float64(got, lowp, ref, atol=1e-5)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_custom_scale_odd_head_dim_and_short_sequences(impl, request):
    _require(impl, request)
    lengths = [1, 0, 5, 1, 0, 77, 1]
    q, k, v, do, cu = (t.cuda() for t in make_inputs(lengths, 6, 2, 72, torch.bfloat16, seed=9))
    got = fwd_bwd(q, k, v, do, cu, 80, True, impl, softmax_scale=0.3)
    lowp = fwd_bwd(q, k, v, do, cu, 80, True, "reference_lowp", softmax_scale=0.3)
    ref = fwd_bwd(q, k, v, do, cu, 80, True, "reference64", softmax_scale=0.3)
    _compare_to_float64(got, lowp, ref, atol=1e-3)


def test_offsets_past_2_31_elements():
    """1.12M tokens x 16 heads x 128 dims: q holds 2.3e9 elements (token offsets past 2^31), and dO is
    a head-major view whose head stride x 15 passes 2^31 too. The last sequences and the first are
    checked against the per-sequence reference (~25 GB of GPU memory)."""
    hq, hkv, d, length, count = 16, 4, 128, 4096, 274
    n = length * count
    g = torch.Generator(device="cuda").manual_seed(11)
    q = torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    do = torch.randn(hq, n, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(0, 1)
    assert q.numel() > 2**31 and (hq - 1) * do.stride(1) > 2**31
    cu = torch.arange(0, n + 1, length, dtype=torch.int32, device="cuda")
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out = varlen_attention(qg, kg, vg, cu, length, impl="triton")
    dq, dk, dv = torch.autograd.grad(out, (qg, kg, vg), do)
    del qg, kg, vg
    one = torch.tensor([0, length], dtype=torch.int32, device="cuda")
    for seq in (0, count - 2, count - 1):
        s = slice(seq * length, (seq + 1) * length)
        part = (q[s], k[s], v[s], do[s].contiguous(), one)
        lowp = fwd_bwd(*part, length, True, "reference_lowp")
        ref = fwd_bwd(*part, length, True, "reference64")
        _compare_to_float64((out[s], dq[s], dk[s], dv[s]), lowp, ref, atol=1e-3, label=f" (sequence {seq})")


def _batched_sdpa(q, k, v, do, batch, causal, dtype):
    """Equal-length sequences as one [B, H, L, D] SDPA call (an independent reference)."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))

    def heads_first(t):  # [B*L, H, D] -> [B, H, L, D]
        return t.view(batch, -1, t.shape[1], t.shape[2]).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), is_causal=causal,
                                         enable_gqa=True).transpose(1, 2).reshape(q.shape)
    return (out, *torch.autograd.grad(out, (q, k, v), do.to(dtype)))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.usefixtures("poisoned_alloc")
def test_more_sequences_than_a_grid_axis_holds(causal):
    """70,000 sequences (CUDA grid axes 1 and 2 stop at 65,535), against batched SDPA."""
    batch, length = 70_000, 3
    q, k, v, do, _ = (t.cuda() for t in make_inputs([batch * length], 8, 2, 64, torch.bfloat16, seed=12))
    cu = torch.arange(0, batch * length + 1, length, dtype=torch.int32, device="cuda")
    got = fwd_bwd(q, k, v, do, cu, length, causal, "triton")
    lowp = _batched_sdpa(q, k, v, do, batch, causal, torch.bfloat16)
    ref = _batched_sdpa(q, k, v, do, batch, causal, torch.float64)
    _compare_to_float64(got, lowp, ref, atol=1e-3)


def test_reference_matches_sdpa_on_gpu():
    """The float64 reference the tests above trust, against SDPA on the device (GQA, causal)."""
    lengths = [4, 4, 4]
    q, k, v, do, cu = (t.cuda() for t in make_inputs(lengths, 4, 2, 32, torch.float64, seed=13))
    ref = varlen_attention_reference(q, k, v, cu, causal=True)
    sdpa = _batched_sdpa(q, k, v, do, 3, True, torch.float64)[0]
    torch.testing.assert_close(ref, sdpa, rtol=1e-10, atol=1e-10)
    assert cu_seqlens(lengths).tolist() == cu.tolist()
