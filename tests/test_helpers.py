"""The comparison helper itself: it must fail on a misplaced NaN / inf, whatever else is NaN."""

import pytest
import torch

from tests.helpers import assert_close_to_reference

NAN, INF = float("nan"), float("inf")


def _ref():
    return torch.tensor([1.0, NAN, 3.0, INF, -INF, 0.5], dtype=torch.float64)


def test_matching_non_finite_positions_and_close_values_pass():
    out = torch.tensor([1.0 + 1e-8, NAN, 3.0, INF, -INF, 0.5], dtype=torch.float32)
    assert_close_to_reference(out, _ref(), atol=1e-6)
    assert_close_to_reference(out, _ref(), low_prec_torch=_ref().float(), atol=1e-6)


@pytest.mark.parametrize("index, value, what", [
    (0, NAN, "NaN"),  # a NaN where the reference is finite (the reference has a NaN elsewhere)
    (1, 2.0, "NaN"),  # a finite value where the reference has NaN
    (3, -INF, r"\+inf"),  # the wrong infinity
    (5, INF, r"\+inf"),  # an infinity where the reference is finite
    (4, 7.0, "-inf"),
])
def test_misplaced_non_finite_fails(index, value, what):
    out = _ref()
    out[index] = value
    with pytest.raises(AssertionError, match=f"disagree on {what}.*first at \\({index},\\)"):
        assert_close_to_reference(out, _ref(), atol=1.0)
    with pytest.raises(AssertionError, match=f"disagree on {what}"):
        assert_close_to_reference(out, _ref(), low_prec_torch=_ref(), atol=1.0)


def test_finite_errors_still_count_beside_nan():
    out = _ref()
    out[2] = 3.1
    with pytest.raises(AssertionError, match="exceeds tolerance"):
        assert_close_to_reference(out, _ref(), atol=1e-3)
    with pytest.raises(AssertionError, match="2 x torch's"):
        assert_close_to_reference(out, _ref(), low_prec_torch=_ref(), atol=1e-3)
