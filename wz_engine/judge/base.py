"""The pairwise judge interface that BRPO's reward assembly calls.

A judge scores two responses to one prompt. Implementations: a Python callable given by import
path (`pkg.module:function`, signature `(prompt, response_a, response_b) -> (score_a, score_b)`),
and the generative reward model (GenRM) that runs on a sampler. The judge never raises on model
output: an unparseable verdict comes back with `valid=False` and counts as no signal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class PairwiseRequest:
    prompt: str
    response_a: str
    """Shown first."""
    response_b: str
    """Shown second."""
    reference: str | None = None
    """A gold answer, for reference-based judging."""


@dataclass
class Verdict:
    score_a: float | None
    score_b: float | None
    valid: bool
    """False when the judge output could not be parsed; the scores are then None."""
    raw: str = ""
    """The judge's raw output (empty for programmatic judges)."""

    @property
    def winner(self) -> str | None:
        """"a", "b", "tie", or None for an invalid verdict."""
        if not self.valid:
            return None
        if self.score_a > self.score_b:
            return "a"
        if self.score_b > self.score_a:
            return "b"
        return "tie"


@runtime_checkable
class PairwiseJudge(Protocol):
    def judge(self, requests: Sequence[PairwiseRequest]) -> list[Verdict]:
        """One verdict per request, in order. Batched so a GenRM can make few generate calls."""
        ...
