"""Bounds checking for Triton kernels run by the interpreter: a CPU stand-in for compute-sanitizer.

The interpreter executes `tl.load` / `tl.store` by reading and writing raw host addresses for every
lane whose mask is true (triton/runtime/interpreter.py -> `_interpreter.load`). A kernel that lets
one lane past its tensor therefore reads whatever lies there: usually another allocation (silent
garbage that a later mask may hide), sometimes an unmapped page (a segfault that depends on what
the rest of the process allocated). `guard_memory()` checks every unmasked address of every load
and store against the extent of the launch's tensor arguments and raises before the access.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte) that the view `t` can address (non-negative strides)."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


class OutOfBoundsAccess(AssertionError):
    pass


@contextlib.contextmanager
def guard_memory():
    """Inside the block, an interpreted kernel touching memory outside its tensor arguments raises."""
    from triton.runtime import interpreter

    extents: list[tuple[int, int]] = []
    launch = {"kernel": "?"}
    builder = interpreter.InterpreterBuilder
    original_call = interpreter.GridExecutor.__call__
    original_load, original_store = builder.create_masked_load, builder.create_masked_store

    def call(self, *args, **kwargs):
        # The launch's host copies share memory with the CPU tensors: their extents are what the
        # kernel may touch.
        extents[:] = [_extent(a) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        launch["kernel"] = getattr(self.fn, "__name__", "?")
        return original_call(self, *args, **kwargs)

    def check(ptrs, mask, what):
        addresses = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)].astype(np.uint64)
        if addresses.size == 0:
            return
        width = ptrs.get_element_ty().primitive_bitwidth // 8
        inside = np.zeros(addresses.shape, dtype=bool)
        for lo, hi in extents:
            inside |= (addresses >= lo) & (addresses + width <= hi)
        if not inside.all():
            bad = addresses[~inside]
            raise OutOfBoundsAccess(
                f"{launch['kernel']}: {bad.size} {what} lane(s) outside every tensor argument, first at "
                f"{int(bad[0]):#x}; tensor extents {[(hex(lo), hi - lo) for lo, hi in extents]}")

    def load(self, ptrs, mask, other, cache_policy, is_volatile):
        check(ptrs, mask, "load")
        return original_load(self, ptrs, mask, other, cache_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_policy):
        check(ptrs, mask, "store")
        return original_store(self, ptrs, value, mask, cache_policy)

    interpreter.GridExecutor.__call__ = call
    builder.create_masked_load, builder.create_masked_store = load, store
    try:
        yield
    finally:
        interpreter.GridExecutor.__call__ = original_call
        builder.create_masked_load, builder.create_masked_store = original_load, original_store
