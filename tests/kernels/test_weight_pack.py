"""multi_tensor_copy / pack_tensors / unpack: exact round trips, casts vs torch, argument errors."""

import os

import pytest
import torch

from wz_kernels._backend import cuda_extension
from wz_kernels.weight_pack import multi_tensor_copy, pack_tensors, unpack_into, unpack_tensors

CPU_IMPLS = ["reference", "torch"]


def _mixed(gen):
    # odd sizes, a scalar, an empty tensor, a non-contiguous source, non-float dtypes
    return [
        torch.randn(7, 13, generator=gen),
        torch.randn(1, generator=gen).to(torch.bfloat16),
        torch.randn((), generator=gen).to(torch.float16),
        torch.empty(0, 5),
        torch.randn(5, 9, generator=gen).t(),
        torch.randint(-5, 5, (11,), generator=gen, dtype=torch.int64),
        torch.randn(33, generator=gen, dtype=torch.float64),
        torch.tensor([True, False, True]),
    ]


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_multi_tensor_copy_casts_like_torch(impl):
    gen = torch.Generator().manual_seed(0)
    srcs = _mixed(gen)
    targets = [torch.bfloat16, torch.float32, torch.float32, torch.float16, torch.float64, torch.int64,
               torch.bfloat16, torch.bool]
    dsts = [torch.full(s.shape, float("nan")).to(dt) if dt.is_floating_point else torch.empty(s.shape, dtype=dt)
            for s, dt in zip(srcs, targets)]
    multi_tensor_copy(srcs, dsts, impl=impl)
    for s, d, dt in zip(srcs, dsts, targets):
        assert torch.equal(d, s.to(dt)), (s.dtype, dt)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_pack_unpack_round_trip_exact(impl):
    gen = torch.Generator().manual_seed(1)
    tensors = _mixed(gen)
    offsets, pos = [], 0
    for t in tensors:
        pos = (pos + 255) // 256 * 256
        offsets.append(pos)
        pos += t.numel() * t.element_size()
    buf = torch.full((pos + 64,), 0xAB, dtype=torch.uint8)  # poison, incl. the gaps
    pack_tensors(tensors, buf, offsets, impl=impl)
    views = unpack_tensors(buf, offsets, [t.shape for t in tensors], [t.dtype for t in tensors])
    for t, v in zip(tensors, views):
        assert v.dtype == t.dtype and v.shape == t.shape and torch.equal(v, t)
        assert v.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()  # zero-copy
    assert (buf[pos:] == 0xAB).all()  # nothing written past the last slot
    outs = [torch.empty(t.shape, dtype=t.dtype) for t in tensors]
    unpack_into(buf, offsets, outs, [t.dtype for t in tensors], impl=impl)
    for t, o in zip(tensors, outs):
        assert torch.equal(o, t)


def test_pack_with_cast_matches_torch_cast():
    gen = torch.Generator().manual_seed(2)
    tensors = [torch.randn(300, generator=gen) * 1e3, torch.randn(17, 3, generator=gen, dtype=torch.float64)]
    offsets = [0, 1024]
    buf = torch.zeros(2048, dtype=torch.uint8)
    pack_tensors(tensors, buf, offsets, [torch.bfloat16, torch.bfloat16])
    views = unpack_tensors(buf, offsets, [t.shape for t in tensors], [torch.bfloat16] * 2)
    for t, v in zip(tensors, views):
        assert torch.equal(v, t.to(torch.bfloat16))


def test_errors_name_the_problem():
    buf = torch.zeros(64, dtype=torch.uint8)
    a = torch.ones(4)
    with pytest.raises(ValueError, match="multiple of"):
        pack_tensors([a], buf, [2])
    with pytest.raises(ValueError, match="past the buffer"):
        pack_tensors([a], buf, [60])
    with pytest.raises(ValueError, match="overlap"):
        pack_tensors([a, a], buf, [0, 8])
    with pytest.raises(ValueError, match="1-D uint8"):
        pack_tensors([a], torch.zeros(64), [0])
    with pytest.raises(ValueError, match="cannot cast"):
        multi_tensor_copy([a], [torch.zeros(4, dtype=torch.int32)])
    with pytest.raises(ValueError, match="elements"):
        multi_tensor_copy([a], [torch.zeros(5)])
    with pytest.raises(ValueError, match="impl"):
        multi_tensor_copy([a], [torch.zeros(4)], impl="triton")
    if cuda_extension() is None:
        with pytest.raises(RuntimeError, match="not built"):
            multi_tensor_copy([a], [torch.zeros(4)], impl="cuda")


def _cuda_toolchain_present() -> bool:
    """A CUDA build of torch and a CUDA toolchain: where setup.py builds wz_kernels._C."""
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


@pytest.mark.gpu
def test_cuda_extension_matches_torch():
    if cuda_extension() is None:
        if os.environ.get("WZ_BUILD_CUDA") == "0" or not _cuda_toolchain_present():
            pytest.skip("wz_kernels._C not built: no CUDA toolchain here (or WZ_BUILD_CUDA=0)")
        pytest.fail("a CUDA toolchain is present but wz_kernels._C is missing: the extension build failed or "
                    "was skipped (build isolation hides torch: pip install --no-build-isolation -e .)")
    gen = torch.Generator().manual_seed(3)
    srcs = [t.cuda() for t in _mixed(gen)] + [torch.randn(70_001, generator=gen).cuda()]  # > 1 chunk, odd end
    targets = [torch.bfloat16, torch.float32, torch.float32, torch.float16, torch.float64, torch.int64,
               torch.bfloat16, torch.bool, torch.bfloat16]
    ref = [torch.empty(s.shape, dtype=dt, device="cuda") for s, dt in zip(srcs, targets)]
    out = [torch.empty(s.shape, dtype=dt, device="cuda") for s, dt in zip(srcs, targets)]
    multi_tensor_copy(srcs, ref, impl="torch")
    multi_tensor_copy(srcs, out, impl="cuda")
    for r, o in zip(ref, out):
        assert torch.equal(r, o)
