"""Backend selection and argument checks shared by every op.

`impl` values:
  "auto"      - CUDA extension > Triton on CUDA tensors; the torch reference on CPU.
  "reference" - the plain-torch specification (runs anywhere).
  "triton"    - the Triton kernel. On CPU tensors it runs under the Triton interpreter, which must
                be switched on with TRITON_INTERPRET=1 *before* triton is imported (that is how the
                kernels are tested on machines without a GPU).
  "cuda"      - the compiled extension `wz_kernels._C` (only some ops have one).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

IMPLS = ("auto", "reference", "triton", "cuda")


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def cuda_extension():
    """The compiled `wz_kernels._C` module, or None when it was not built."""
    try:
        from wz_kernels import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C


def resolve_impl(impl: str, device: torch.device, *, op: str, has_cuda: bool = False) -> str:
    """Turn `impl` into a concrete backend for tensors on `device`, or raise a clear error."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl={impl!r} is not one of {IMPLS}")
    if impl == "auto":
        if device.type == "cuda":
            if has_cuda and cuda_extension() is not None:
                return "cuda"
            if triton_available():
                return "triton"
        return "reference"
    if impl == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: impl='triton' was requested but triton is not installed")
        if device.type == "cpu" and not interpreting():
            raise RuntimeError(
                f"{op}: impl='triton' on CPU tensors needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 before triton is imported, or move the tensors to a GPU"
            )
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"{op}: impl='triton' does not support device {device}")
    if impl == "cuda":
        if not has_cuda:
            raise RuntimeError(f"{op}: has no CUDA-extension implementation; use 'triton' or 'auto'")
        if cuda_extension() is None:
            raise RuntimeError(f"{op}: impl='cuda' but the extension wz_kernels._C was not built")
        if device.type != "cuda":
            raise RuntimeError(f"{op}: impl='cuda' needs CUDA tensors, got {device}")
    return impl


# ----------------------------------------------------------------------------- argument checks


def check_tensor(
    op: str,
    name: str,
    t,
    *,
    ndim: int | None = None,
    shape: tuple | None = None,
    floating: bool | None = None,
    integer: bool | None = None,
    device: torch.device | None = None,
) -> None:
    """Raise ValueError naming `name` when `t` is not a tensor of the expected kind."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise ValueError(f"{op}: {name} must be an integer tensor, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but the other inputs are on {device}")


def check_finite(op: str, name: str, t: torch.Tensor) -> None:
    """Raise ValueError when `t` holds NaN or Inf (one reduction; use on small per-sequence data)."""
    if t.numel() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{op}: {name} contains {bad} non-finite value(s) (NaN or Inf)")


def check_choice(op: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{op}: {name}={value!r} is not one of {tuple(choices)}")


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()
