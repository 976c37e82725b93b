"""Ours against a reference on a benchmark's own inputs: run once per case, before anything is timed.

A timing of a wrong kernel is worse than no timing, so every benchmark case that has an "ours"
provider carries a `Check`: a callable that returns ours' outputs (values and gradients) and one that
returns the reference's on the same inputs (the library's float64 / float32 specification, or an
independent plain-torch formula). They are compared output by output with the norm-wise relative
error ||ours - ref|| / ||ref|| (one number per output, robust to the few large elementwise errors that
low-precision rounding gives), NaN-aware: a non-finite value where the reference has a finite one (or
the other way round) is an infinite error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

Outputs = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]

# Norm-wise relative error allowed by the precision ours computes in. A wrong kernel (a dropped mask, a
# missing scale, a sign) gives errors of order 0.1-1; rounding gives: float32 far under 1e-3 (TF32 dots
# ~3e-4), float16 ~1e-3, bfloat16 operands 1e-3..1e-2.
REL_TOL = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}


class CheckFailed(AssertionError):
    """Ours disagreed with its reference (or crashed while computing the outputs to compare)."""


@dataclass
class Check:
    """How a case's "ours" is verified: both callables run once, on the case's own inputs."""

    ours: Callable[[], Outputs]
    """Ours' outputs: a tensor, a sequence or a name -> tensor mapping (values and gradients)."""
    reference: Callable[[], Outputs]
    """The reference's outputs, in the same structure as `ours`' (any float dtype; compared in float64)."""
    dtype: torch.dtype
    """The precision ours computes in (the inputs' dtype): chooses the tolerance from REL_TOL."""
    rel_tol: float | None = None
    """Overrides REL_TOL[dtype] (for an output known to be looser, e.g. a whole model's gradients)."""

    @property
    def tolerance(self) -> float:
        return self.rel_tol if self.rel_tol is not None else REL_TOL[self.dtype]


def _named(outputs: Outputs) -> dict[str, torch.Tensor]:
    if isinstance(outputs, torch.Tensor):
        return {"output": outputs}
    if isinstance(outputs, Mapping):
        return dict(outputs)
    return {f"output[{i}]": t for i, t in enumerate(outputs)}


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref|| in float64 over the finite entries; inf where finiteness differs (NaN
    where the reference has a number, inf vs -inf, ...); ||ours - ref|| when the reference is all zero."""
    if ours.shape != ref.shape:
        raise CheckFailed(f"shape {tuple(ours.shape)} != reference shape {tuple(ref.shape)}")
    a = ours.detach().to(torch.float64)  # on ours' device: a whole model's gradient is large
    b = ref.detach().to(a.device, torch.float64)
    fin_a, fin_b = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(fin_a, fin_b):
        return math.inf
    # both non-finite at the same places: they must be the same non-finite value (nan, +inf or -inf)
    if not torch.equal(a[~fin_a].nan_to_num(0.0, 1.0, -1.0), b[~fin_b].nan_to_num(0.0, 1.0, -1.0)):
        return math.inf
    diff = torch.linalg.vector_norm(a[fin_a] - b[fin_b]).item()
    norm = torch.linalg.vector_norm(b[fin_b]).item()
    return diff / norm if norm > 0 else diff


def compare(ours: Outputs, ref: Outputs, rel_tol: float) -> dict[str, float]:
    """Relative error per output name; raises CheckFailed naming every output over `rel_tol`."""
    a, b = _named(ours), _named(ref)
    if a.keys() != b.keys():
        raise CheckFailed(f"outputs {sorted(a)} != reference outputs {sorted(b)}")
    errors = {name: relative_error(a[name], b[name]) for name in a}
    bad = {name: e for name, e in errors.items() if not e <= rel_tol}
    if bad:
        worst = ", ".join(f"{n}: rel err {e:.3g}" for n, e in bad.items())
        raise CheckFailed(f"{worst} > tolerance {rel_tol:.3g}")
    return errors


def run_check(check: Check) -> float:
    """Run both sides once and compare; returns the largest relative error (raises CheckFailed)."""
    try:
        ours = check.ours()
    except Exception as e:  # a crash of ours is a failed check, with its cause kept
        raise CheckFailed(f"ours raised {type(e).__name__}: {e}") from e
    errors = compare(ours, check.reference(), check.tolerance)
    return max(errors.values(), default=0.0)
