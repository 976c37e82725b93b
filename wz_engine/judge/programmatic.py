"""A judge from a Python callable given by import path: `pkg.module:function`.

The function takes `(prompt, response_a, response_b)` and returns `(score_a, score_b)`. A return
value that is not two finite numbers is an invalid verdict (no signal), like unparseable GenRM
output; exceptions raised by the function propagate (they are bugs in code, not model output).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

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
    def from_path(cls, path: str) -> "CallableJudge":
        return cls(load_callable(path))

    def judge(self, requests: Sequence[PairwiseRequest]) -> list[Verdict]:
        out = []
        for r in requests:
            result = self.fn(r.prompt, r.response_a, r.response_b)
            out.append(_to_verdict(result))
        return out


def _to_verdict(result) -> Verdict:
    if isinstance(result, (str, bytes)):
        return Verdict(None, None, False, repr(result))
    try:
        score_a, score_b = (float(x) for x in result)
    except (TypeError, ValueError):
        return Verdict(None, None, False, repr(result))
    if not (math.isfinite(score_a) and math.isfinite(score_b)):
        return Verdict(None, None, False, repr(result))
    return Verdict(score_a, score_b, True, "")
