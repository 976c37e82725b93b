"""A judge from a Python callable given by import path: `pkg.module:function`.

The function takes `(prompt, response_a, response_b)` and returns `(score_a, score_b)`. A return
value that is not two finite numbers is an invalid verdict (no signal), like unparseable GenRM
output; exceptions raised by the function propagate (they are bugs in code, not model output).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence

from wz_engine.judge.base import PairwiseRequest, Verdict


def load_callable(path: str) -> Callable:
    """Import `pkg.module:attr` (dotted attributes allowed after the colon)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"judge: expected 'pkg.module:function', got {path!r}")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"judge: cannot import module {module_name!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"judge: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
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
