"""Pack many tensors into one flat byte bucket (with a cast per tensor), and unpack it.

The weight sync (wz_engine/sync) moves a model's parameters into an inference engine in a few large
buckets instead of hundreds of small tensors. Packing is a multi-tensor copy + cast; one CUDA launch
does it best (csrc/weight_pack.cu, exposed as `torch.ops.wz_kernels.multi_tensor_copy` when the
extension `wz_kernels._C` is built). Elsewhere `torch._foreach_copy_` does the same work (it casts
per pair and groups same-dtype pairs into fused launches).

Layers (no Triton kernel: a byte copy gains nothing from Triton over the CUDA launch):
- `reference_multi_tensor_copy`: one `copy_` per tensor, the specification.
- CUDA: `torch.ops.wz_kernels.multi_tensor_copy` (csrc/), registered by the extension itself;
  no `register_fake` because the sync runs eagerly, outside any compiled graph.
- public: `multi_tensor_copy`, `pack_tensors`, `unpack_tensors`, `unpack_into`.

Bucket layout: a 1-D uint8 tensor; tensor i occupies bytes [offsets[i], offsets[i] + numel_i *
itemsize(dtypes[i])) and is stored in dtypes[i]. Offsets must be multiples of that itemsize (the
packer in wz_engine/sync aligns to 256 bytes), so every slot can be viewed in place as its dtype.
"""

from __future__ import annotations

from typing import Sequence

import torch

from wz_kernels._backend import check_choice, cuda_extension

IMPLS = ("auto", "reference", "torch", "cuda")
_FLOATING = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# wz_dtype codes of csrc/weight_pack.h (the binding computes them itself; kept here for readers
# and for the conformance test of the binding).
WZ_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


# ----------------------------------------------------------------------------- reference


def reference_multi_tensor_copy(srcs: Sequence[torch.Tensor], dsts: Sequence[torch.Tensor]) -> None:
    """dsts[i].view(-1)[:] = srcs[i].reshape(-1) cast to dsts[i].dtype, one copy per tensor."""
    for src, dst in zip(srcs, dsts):
        dst.view(-1).copy_(src.reshape(-1))


# ----------------------------------------------------------------------------- public


def _check_pairs(op: str, srcs, dsts) -> None:
    if len(srcs) != len(dsts):
        raise ValueError(f"{op}: {len(srcs)} srcs but {len(dsts)} dsts")
    for i, (src, dst) in enumerate(zip(srcs, dsts)):
        if not isinstance(src, torch.Tensor) or not isinstance(dst, torch.Tensor):
            raise ValueError(f"{op}: srcs[{i}] and dsts[{i}] must be tensors")
        if src.numel() != dst.numel():
            raise ValueError(f"{op}: srcs[{i}] has {src.numel()} elements but dsts[{i}] has {dst.numel()}")
        if not dst.is_contiguous():
            raise ValueError(f"{op}: dsts[{i}] must be contiguous")
        if src.dtype != dst.dtype and not (src.dtype in _FLOATING and dst.dtype in _FLOATING):
            raise ValueError(f"{op}: cannot cast srcs[{i}] ({src.dtype}) to dsts[{i}] ({dst.dtype})")


def _resolve(impl: str, dsts: Sequence[torch.Tensor]) -> str:
    check_choice("multi_tensor_copy", "impl", impl, IMPLS)
    on_cuda = bool(dsts) and dsts[0].device.type == "cuda"
    has_op = cuda_extension() is not None and hasattr(torch.ops.wz_kernels, "multi_tensor_copy")
    if impl == "auto":
        return "cuda" if on_cuda and has_op else "torch"
    if impl == "cuda":
        if not has_op:
            raise RuntimeError("multi_tensor_copy: impl='cuda' but the extension wz_kernels._C was not built")
        if not on_cuda:
            raise RuntimeError("multi_tensor_copy: impl='cuda' needs CUDA tensors")
    return impl


def multi_tensor_copy(srcs: Sequence[torch.Tensor], dsts: Sequence[torch.Tensor], *, impl: str = "auto") -> None:
    """Copy srcs[i] into dsts[i] (flattened, cast to dsts[i].dtype), all pairs at once.

    srcs[i]: any shape, any float dtype (or the same non-float dtype as dsts[i]); dsts[i]: contiguous,
    same numel. `impl`: "auto" (CUDA extension on CUDA tensors when built, else torch),
    "reference" (one copy_ per pair), "torch" (`torch._foreach_copy_`), "cuda" (one launch).
    """
    _check_pairs("multi_tensor_copy", srcs, dsts)
    if not srcs:
        return
    impl = _resolve(impl, dsts)
    if impl == "reference":
        reference_multi_tensor_copy(srcs, dsts)
    elif impl == "cuda":
        torch.ops.wz_kernels.multi_tensor_copy([s.contiguous() for s in srcs], list(dsts))
    else:
        torch._foreach_copy_([d.view(-1) for d in dsts], [s.reshape(-1) for s in srcs])


def _slots(op: str, buffer: torch.Tensor, offsets, numels, dtypes) -> list[torch.Tensor]:
    """Views of `buffer` (1-D uint8) at byte `offsets` as `dtypes`, `numels` elements each."""
    if not isinstance(buffer, torch.Tensor) or buffer.dtype != torch.uint8 or buffer.dim() != 1:
        raise ValueError(f"{op}: buffer must be a 1-D uint8 tensor")
    if not buffer.is_contiguous():
        raise ValueError(f"{op}: buffer must be contiguous")
    if not (len(offsets) == len(numels) == len(dtypes)):
        raise ValueError(f"{op}: offsets ({len(offsets)}), tensors ({len(numels)}) and dtypes "
                         f"({len(dtypes)}) differ in length")
    views, spans = [], []
    for i, (off, n, dt) in enumerate(zip(offsets, numels, dtypes)):
        size = torch.empty((), dtype=dt).element_size()
        if off < 0 or off % size:
            raise ValueError(f"{op}: offsets[{i}]={off} is negative or not a multiple of {dt}'s itemsize {size}")
        end = off + n * size
        if end > buffer.numel():
            raise ValueError(f"{op}: slot {i} ends at byte {end}, past the buffer's {buffer.numel()} bytes")
        spans.append((off, end, i))
        views.append(buffer[off:end].view(dt))
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise ValueError(f"{op}: slots {a} and {b} overlap (byte {start_b} < {end_a})")
    return views


def pack_tensors(tensors: Sequence[torch.Tensor], buffer: torch.Tensor, offsets: Sequence[int],
                 dtypes: Sequence[torch.dtype] | None = None, *, impl: str = "auto") -> torch.Tensor:
    """Write tensors[i] (cast to dtypes[i], default its own dtype) into `buffer` at byte offsets[i].

    tensors: any shapes; buffer: [B] uint8; offsets: byte offsets, each a multiple of the itemsize
    of dtypes[i], slots must not overlap. Bytes between slots are left as they are. Returns buffer.
    """
    dtypes = [t.dtype for t in tensors] if dtypes is None else list(dtypes)
    slots = _slots("pack_tensors", buffer, list(offsets), [t.numel() for t in tensors], dtypes)
    multi_tensor_copy(list(tensors), slots, impl=impl)
    return buffer


def unpack_tensors(buffer: torch.Tensor, offsets: Sequence[int], shapes: Sequence[Sequence[int]],
                   dtypes: Sequence[torch.dtype]) -> list[torch.Tensor]:
    """Zero-copy views of the slots of `buffer`: result[i] has shapes[i] and dtypes[i]."""
    numels = [_numel(s) for s in shapes]
    views = _slots("unpack_tensors", buffer, list(offsets), numels, list(dtypes))
    return [v.view(tuple(s)) for v, s in zip(views, shapes)]


def unpack_into(buffer: torch.Tensor, offsets: Sequence[int], outs: Sequence[torch.Tensor],
                dtypes: Sequence[torch.dtype], *, impl: str = "auto") -> None:
    """Copy slot i of `buffer` (stored as dtypes[i]) into outs[i], cast to outs[i].dtype."""
    views = _slots("unpack_into", buffer, list(offsets), [o.numel() for o in outs], list(dtypes))
    multi_tensor_copy(views, list(outs), impl=impl)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
