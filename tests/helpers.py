"""Small helpers shared by the kernel tests (never references: those live in the library)."""

import torch

POISON = float("nan")


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer filled with NaN, so an element the kernel forgets to write fails the test."""
    return torch.full_like(t, POISON)


def assert_close_to_reference(out, ref64, low_prec_torch=None, *, atol=1e-6, rtol=0.0, name="output"):
    """Hold `out` to a float64 reference.

    Without `low_prec_torch`: |out - ref64| <= atol + rtol * |ref64|.
    With it (the same computation done by torch in the kernel's precision): the kernel's max error
    must be at most 2x torch's max error plus `atol` (the flash-attention rule).
    """
    out64 = out.detach().double()
    ref64 = ref64.detach().double()
    assert out64.shape == ref64.shape, f"{name}: shape {tuple(out64.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out64).all() == torch.isfinite(ref64).all(), f"{name}: non-finite mismatch"
    err = (out64 - ref64).abs().nan_to_num(0.0)
    if low_prec_torch is not None:
        torch_err = (low_prec_torch.detach().double() - ref64).abs().nan_to_num(0.0).max().item()
        assert err.max().item() <= 2 * torch_err + atol, (
            f"{name}: max error {err.max().item():.3e} > 2 x torch's {torch_err:.3e} + {atol:.1e}"
        )
    else:
        tol = atol + rtol * ref64.abs()
        worst = (err - tol).max().item() if err.numel() else 0.0
        assert worst <= 0, f"{name}: max error {err.max().item():.3e} exceeds tolerance (atol={atol}, rtol={rtol})"
