"""A judge from a Python callable given by import path: `pkg.module:function`.

The function takes `(prompt, response_a, response_b)` and returns `(score_a, score_b)`. A return
value that is not two finite numbers is an invalid verdict (no signal), like unparseable GenRM
output; exceptions raised by the function propagate (they are bugs in code, not model output).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from wz_engine.judge.base import PairwiseRequest, Verdict


def load_callable(path: str) -> Callable:
    """Import `pkg.module:attr` (dotted attributes allowed after the colon)."""
    from wz_engine.algorithms.registry import RegistryError, load_object

    if ":" not in path:
        raise ValueError(f"judge: expected 'pkg.module:function', got {path!r}")
    try:
        obj = load_object(path)
    except RegistryError as e:
        raise ValueError(f"judge: {e}") from e.__cause__
    if not callable(obj):
        raise ValueError(f"judge: {path!r} is not callable")
    return obj


class CallableJudge:
    """`PairwiseJudge` over `fn(prompt, response_a, response_b) -> (score_a, score_b)`."""

    def __init__(self, fn: Callable[[str, str, str], tuple[float, float]]):
        self.fn = fn

    @classmethod
    def from_path(cls, path: str) -> CallableJudge:
        return cls(load_callable(path))

    def judge(self, requests: Sequence[PairwiseRequest]) -> list[Verdict]:
        return [v for v, _ in self.judge_with_reasons(requests)]

    def judge_with_reasons(self, requests: Sequence[PairwiseRequest]) -> list[tuple[Verdict, str]]:
        """Like `judge`, with "ok" or why each verdict is invalid (see `base.INVALID_REASONS`)."""
        return [_to_verdict(self.fn(r.prompt, r.response_a, r.response_b)) for r in requests]


def _to_verdict(result) -> tuple[Verdict, str]:
    if isinstance(result, (str, bytes)):
        return Verdict(None, None, False, repr(result)), "not_a_score_pair"
    try:
        score_a, score_b = (float(x) for x in result)
    except (TypeError, ValueError):
        return Verdict(None, None, False, repr(result)), "not_a_score_pair"
    if not (math.isfinite(score_a) and math.isfinite(score_b)):
        return Verdict(None, None, False, repr(result)), "non_finite_score"
    return Verdict(score_a, score_b, True, ""), "ok"
