"""varlen_attention: Triton forward/backward (interpreter on CPU) against the float64 reference."""

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_close_to_reference
from tests.kernels.attention_helpers import fwd_bwd as _fwd_bwd
from tests.kernels.attention_helpers import make_inputs as _inputs
from tests.kernels.attention_helpers import poisoned_alloc  # noqa: F401 (fixture)
from tests.kernels.interpreter_guard import guard_memory
from wz_kernels import attention as attn_mod
from wz_kernels.attention import varlen_attention, varlen_attention_reference


@pytest.fixture(autouse=True)
def bounds_checked():
    """Every interpreted launch in this module fails on a load or store outside its tensors."""
    if not attn_mod.interpreting():
        yield
        return
    with guard_memory():
        yield


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "lengths, hq, hkv, d, causal",
    [
        ([5, 1, 17, 33], 2, 1, 64, True),  # odd lengths, a length-1 sequence, GQA 2
        ([23], 4, 1, 128, True),  # B = 1, GQA 4 (MQA)
        ([7, 19], 2, 2, 64, False),  # GQA 1, bidirectional within each sequence
        ([9, 14, 2], 2, 2, 128, True),
    ],
)
@pytest.mark.usefixtures("poisoned_alloc")
def test_triton_matches_float64_reference(lengths, hq, hkv, d, causal):
    q, k, v, do, cu = _inputs(lengths, hq, hkv, d, torch.float32)
    got = _fwd_bwd(q, k, v, do, cu, max(lengths), causal, "triton")
    ref = _fwd_bwd(q, k, v, do, cu, max(lengths), causal, "reference64")
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert a.dtype == torch.float32
        assert_close_to_reference(a, b, atol=2e-5, rtol=1e-4, name=name)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.usefixtures("poisoned_alloc")
def test_triton_low_precision_within_twice_torch_error(dtype):
    lengths, hq, hkv, d = [11, 26], 2, 1, 64
    q, k, v, do, cu = _inputs(lengths, hq, hkv, d, dtype, seed=1)
    got = _fwd_bwd(q, k, v, do, cu, 26, True, "triton")
    torch_lowp = _fwd_bwd(q, k, v, do, cu, 26, True, "reference_lowp")
    ref = _fwd_bwd(q, k, v, do, cu, 26, True, "reference64")
    for name, a, t, b in zip(("out", "dq", "dk", "dv"), got, torch_lowp, ref):
        assert a.dtype == dtype
        assert_close_to_reference(a, b, t, atol=1e-3, name=name)


@pytest.mark.interpreter
@pytest.mark.parametrize("block_m, block_n", [(32, 16), (16, 32)])
def test_unequal_query_and_key_blocks(block_m, block_n, monkeypatch):
    """The GPU configs use BLOCK_M != BLOCK_N; the interpreter's default is 16 x 16, so check both ways."""
    cfg = attn_mod._LaunchConfig(block_m, block_n, 1, 1)
    monkeypatch.setattr(attn_mod, "_launch_config", lambda kernel, head_dim, dtype: cfg)
    lengths = [40, 3, 17]
    for causal in (True, False):
        q, k, v, do, cu = _inputs(lengths, 2, 1, 16, torch.float32, seed=6)
        got = _fwd_bwd(q, k, v, do, cu, 40, causal, "triton")
        ref = _fwd_bwd(q, k, v, do, cu, 40, causal, "reference64")
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
            assert_close_to_reference(a, b, atol=2e-5, rtol=1e-4, name=f"{name} causal={causal}")


@pytest.mark.interpreter
@pytest.mark.parametrize(
    "lengths, hq, hkv, d, causal, scale",
    [
        ([6, 13], 2, 1, 40, True, 0.3),  # odd head dim (BLOCK_D 64 masks 24 columns), custom scale, GQA 2
        ([9, 17], 3, 1, 72, False, 0.05),  # odd head dim, bidirectional, GQA 3, tiny scale
        ([1, 0, 5, 1, 0, 1], 4, 2, 16, True, 1.7),  # single-token and empty sequences, scale > 1
        ([1, 1, 0], 2, 2, 24, False, None),  # only single tokens and an empty one, bidirectional
    ],
)
@pytest.mark.usefixtures("poisoned_alloc")
def test_gradients_match_float64_reference(lengths, hq, hkv, d, causal, scale):
    """out, dq, dk and dv against float64 for the cases a backward can get wrong while the forward is
    right: the softmax scale (it enters dS and dQ/dK), the head-dim mask on every load and store,
    GQA sums, and sequences of length 0 and 1."""
    q, k, v, do, cu = _inputs(lengths, hq, hkv, d, torch.float32, seed=7)
    kw = {} if scale is None else {"softmax_scale": scale}
    got = _fwd_bwd(q, k, v, do, cu, max(lengths) + 3, causal, "triton", **kw)  # max_seqlen may exceed the max
    ref = _fwd_bwd(q, k, v, do, cu, max(lengths), causal, "reference64", **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_close_to_reference(a, b, atol=2e-5, rtol=1e-4, name=name)


if attn_mod.triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _offsets_probe_kernel(TILE, ROWS, CU, head, stride_n, stride_h, stride_row_h,
                              BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        start = tl.load(CU)  # int32, as the kernels read cu_seqlens
        rows = tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        tile = attn_mod._tile_offsets(start, rows, head, stride_n, stride_h, cols)
        tl.store(TILE + rows[:, None] * BLOCK_D + cols[None, :], tile)
        tl.store(ROWS + rows, attn_mod._row_offsets(start, rows, head, stride_row_h))


@pytest.mark.interpreter
def test_tile_offsets_do_not_overflow_int32():
    """The offset helpers every load and store goes through, at values whose int32 products wrap:
    token 2^28 + r at 16 heads x 128 dims (> 2^31 elements), and head 15 of a head-major view."""
    start, head, d, heads = 2**28, 15, 128, 16
    rows, cols = 16, 16
    tile = torch.zeros(rows, cols, dtype=torch.int64)
    row_offsets = torch.zeros(rows, dtype=torch.int64)
    stride_n, stride_h, stride_row_h = heads * d, 2**28, 2**29
    _offsets_probe_kernel[(1,)](tile, row_offsets, torch.tensor([start], dtype=torch.int32), head, stride_n,
                                stride_h, stride_row_h, BLOCK_R=rows, BLOCK_D=cols)
    expected = [[(start + r) * stride_n + head * stride_h + c for c in range(cols)] for r in range(rows)]
    assert tile.tolist() == expected
    assert row_offsets.tolist() == [head * stride_row_h + start + r for r in range(rows)]
    assert max(map(max, expected)) > 2**31  # the case would wrap in int32


@pytest.mark.interpreter
def test_sequences_do_not_interact():
    """Changing sequence 0 must leave the outputs and gradients of sequence 1 untouched."""
    q, k, v, do, cu = _inputs([10, 12], 2, 2, 64, torch.float32, seed=3)
    base = _fwd_bwd(q, k, v, do, cu, 12, True, "triton")
    k2, v2 = k.clone(), v.clone()
    k2[:10] += 5.0
    v2[:10] -= 3.0
    moved = _fwd_bwd(q, k2, v2, do, cu, 12, True, "triton")
    for a, b in zip(base, moved):
        torch.testing.assert_close(a[10:], b[10:], rtol=0, atol=0)
    assert not torch.allclose(base[0][:10], moved[0][:10])


# Stand-ins for torch's CUDA-only varlen_attn with the signatures of three releases (2.10, 2.11,
# 2.13), computing with the float64 reference: they check how impl="torch" maps causality, the
# scale and GQA onto each signature, not torch's kernel (the GPU tests run that).
def _varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert query.shape[1] == key.shape[1], "2.10 documents equal head counts"
    return varlen_attention_reference(query, key, value, cu_seq_q, causal=is_causal, upcast=True).to(query.dtype)


def _varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1)):
    assert query.shape[1] == key.shape[1], "2.11 documents equal head counts"
    assert window_size in ((-1, -1), (-1, 0))
    return varlen_attention_reference(query, key, value, cu_seq_q, causal=window_size == (-1, 0),
                                      softmax_scale=scale, upcast=True).to(query.dtype)


def _varlen_attn_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    assert enable_gqa == (query.shape[1] != key.shape[1])
    return varlen_attention_reference(query, key, value, cu_seq_q, causal=window_size == (-1, 0),
                                      softmax_scale=scale, upcast=True).to(query.dtype)


@pytest.mark.parametrize("release", [_varlen_attn_2_10, _varlen_attn_2_11, _varlen_attn_2_13])
@pytest.mark.parametrize("causal", [True, False])
def test_torch_impl_maps_each_release_signature(release, causal, monkeypatch):
    monkeypatch.setattr(attn_mod, "_torch_varlen_attn", lambda: release)
    q, k, v, do, cu = _inputs([5, 1, 9], 4, 2, 16, torch.float16, seed=8)
    got = _fwd_bwd(q, k, v, do, cu, 9, causal, "torch", softmax_scale=0.4)
    ref = _fwd_bwd(q, k, v, do, cu, 9, causal, "reference64", softmax_scale=0.4)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert a.dtype == torch.float16 and a.shape == b.shape
        assert_close_to_reference(a, b, atol=5e-3, rtol=5e-3, name=name)


def test_torch_impl_refuses_what_flash_cannot_run():
    q, k, v, _, cu = _inputs([3, 4], 2, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="impl='torch'.*fp16/bf16"):
        varlen_attention(q, k, v, cu, 4, impl="torch")
    if not torch.cuda.is_available():  # torch's FlashAttention varlen op has no CPU kernel (2.13 checked)
        with pytest.raises(RuntimeError, match="impl='torch'.*cpu"):
            varlen_attention(q.half(), k.half(), v.half(), cu, 4, impl="torch")


def test_reference_matches_torch_sdpa_per_sequence():
    """The reference itself against an independent implementation (torch SDPA, one sequence at a time)."""
    lengths = [4, 1, 9]
    q, k, v, _, cu = _inputs(lengths, 4, 2, 16, torch.float64, seed=4)
    ref = varlen_attention_reference(q, k, v, cu)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        peer = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), is_causal=True, enable_gqa=True
        ).transpose(0, 1)
        torch.testing.assert_close(ref[s:e], peer, rtol=1e-12, atol=1e-12)


@pytest.mark.interpreter
@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_empty_batch_and_empty_sequences(impl):
    q, k, v, _, _ = _inputs([0], 2, 1, 16, torch.float32)
    out = varlen_attention(q, k, v, torch.zeros(1, dtype=torch.int32), 0, impl=impl)
    assert out.shape == (0, 2, 16)
    q, k, v, _, cu = _inputs([3, 0, 4], 2, 1, 16, torch.float32)
    out = varlen_attention(q, k, v, cu, 4, impl=impl)
    torch.testing.assert_close(out.double(), varlen_attention_reference(q, k, v, cu, upcast=True),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.interpreter
def test_torch_library_op_registration():
    """Fake kernel, schema and autograd registration agree with the real kernel (torch.compile relies on them)."""
    q, k, v, _, cu = _inputs([3, 5], 2, 1, 16, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(attn_mod._varlen_attention_fwd_op, (q, k, v, cu, 5, True, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(cu=torch.tensor([0, 3, 7], dtype=torch.int64)), "int32"),
        (dict(cu=torch.tensor([0, 3, 6], dtype=torch.int32)), "end at N=7"),
        (dict(cu=torch.tensor([0, 5, 3, 7], dtype=torch.int32)), "non-decreasing"),
        (dict(max_seqlen=3), "max_seqlen=3"),
        (dict(k=torch.zeros(7, 3, 16), v=torch.zeros(7, 3, 16)), "multiple of key/value heads"),
        (dict(v=torch.zeros(7, 1, 8)), "must be"),
        (dict(q=torch.zeros(7, 2, 16, dtype=torch.float16)), "share a dtype"),
        (dict(impl="cuda"), "impl='cuda'"),
        (dict(softmax_scale=-1.0), "softmax_scale"),
    ],
)
def test_bad_inputs_raise_value_error(change, match):
    args = dict(q=torch.zeros(7, 2, 16), k=torch.zeros(7, 1, 16), v=torch.zeros(7, 1, 16),
                cu=torch.tensor([0, 3, 7], dtype=torch.int32), max_seqlen=4, impl="reference", softmax_scale=None)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        varlen_attention(args["q"], args["k"], args["v"], args["cu"], args["max_seqlen"], impl=args["impl"],
                         softmax_scale=args["softmax_scale"])


def test_float64_refused_by_triton_and_flash_attn_missing_is_clear():
    q, k, v, _, cu = _inputs([3], 1, 1, 16, torch.float64)
    if attn_mod.interpreting():
        with pytest.raises(ValueError, match="impl='reference'"):
            varlen_attention(q, k, v, cu, 3, impl="triton")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="flash-attn"):
            varlen_attention(q, k, v, cu, 3, impl="flash_attn")
