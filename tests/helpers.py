"""Small helpers shared by the kernel tests (never references: those live in the library)."""

import torch

POISON = float("nan")


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer filled with NaN, so an element the kernel forgets to write fails the test."""
    return torch.full_like(t, POISON)


def assert_same_non_finite(out64: torch.Tensor, ref64: torch.Tensor, name: str = "output") -> None:
    """NaN exactly where the reference has NaN, and +-inf exactly where it has the same infinity."""
    inf = float("inf")
    for what, o, r in (("NaN", out64.isnan(), ref64.isnan()), ("+inf", out64 == inf, ref64 == inf),
                       ("-inf", out64 == -inf, ref64 == -inf)):
        wrong = o != r
        if wrong.any():
            i = tuple(int(x) for x in wrong.nonzero()[0])
            raise AssertionError(f"{name}: {int(wrong.sum())} element(s) disagree on {what} with the "
                                 f"reference, first at {i}: got {out64[i].item()}, "
                                 f"reference {ref64[i].item()}")


def assert_close_to_reference(out, ref64, low_prec_torch=None, *, atol=1e-6, rtol=0.0, name="output"):
    """Hold `out` to a float64 reference.

    Non-finite values must sit exactly where the reference has them (`assert_same_non_finite`); the
    error is measured on the reference's finite elements.
    Without `low_prec_torch`: |out - ref64| <= atol + rtol * |ref64|.
    With it (the same computation done by torch in the kernel's precision): the kernel's max error
    must be at most 2x torch's max error plus `atol` (the flash-attention rule).
    """
    out64 = out.detach().double()
    ref64 = ref64.detach().double()
    assert out64.shape == ref64.shape, f"{name}: shape {tuple(out64.shape)} != {tuple(ref64.shape)}"
    assert_same_non_finite(out64, ref64, name)
    finite = ref64.isfinite()
    err = torch.where(finite, out64 - ref64, 0.0).abs()
    if low_prec_torch is not None:
        # torch's own non-finite errors give it no slack (counted as 0)
        torch_err = torch.where(finite, low_prec_torch.detach().double() - ref64, 0.0).abs().nan_to_num(0.0)
        torch_err = torch_err.max().item() if torch_err.numel() else 0.0
        worst = err.max().item() if err.numel() else 0.0
        assert worst <= 2 * torch_err + atol, (
            f"{name}: max error {worst:.3e} > 2 x torch's {torch_err:.3e} + {atol:.1e}"
        )
    else:
        tol = atol + rtol * torch.where(finite, ref64, 0.0).abs()
        worst = (err - tol).max().item() if err.numel() else 0.0
        assert worst <= 0, (f"{name}: max error {err.max().item():.3e} exceeds tolerance "
                            f"(atol={atol}, rtol={rtol})")
