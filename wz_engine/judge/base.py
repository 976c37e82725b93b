"""The pairwise judge interface that BRPO's reward assembly calls.

A judge scores two responses to one prompt. Implementations: a Python callable given by import
path (`pkg.module:function`, signature `(prompt, response_a, response_b) -> (score_a, score_b)`),
and the generative reward model (GenRM) that runs on a sampler. The judge never raises on model
output: an unparseable verdict comes back with `valid=False` and counts as no signal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


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


INVALID_REASONS = {
    # the GenRM's parser (wz_engine/judge/parser.py), in the order its rules fire
    "not_text": "the output is not text",
    "unclosed_think": "a <think> block is never closed (cut off while thinking? raise max_new_tokens)",
    "empty": "the output is empty",
    "multiple_verdicts": "more than one verdict line (the judge changed its mind or repeated itself)",
    "not_final": "the verdict line is not the last line",
    "malformed": "the last line starts like a verdict but does not parse (missing or unparsable score)",
    "no_verdict": "no verdict line at the end (cut off by max_new_tokens, or the model ignores the format)",
    "out_of_range": "a score outside [score_min, score_max] (never clamped)",
    "tie_not_allowed": 'equal scores with tie_policy = "invalid"',
    "parser_error": "the parser failed (a bug: please report it with the output)",
    # the GenRM before generating
    "prompt_too_long": "the judge prompt exceeds max_prompt_tokens, so it was not generated",
    # programmatic judges (wz_engine/judge/programmatic.py)
    "not_a_score_pair": "the judge function did not return two numbers",
    "non_finite_score": "the judge function returned a NaN or infinite score",
}
"""Why a verdict is invalid: reason -> what it means (what `wz judge eval` prints next to the counts)."""


@runtime_checkable
class PairwiseJudge(Protocol):
    def judge(self, requests: Sequence[PairwiseRequest]) -> list[Verdict]:
        """One verdict per request, in order. Batched so a GenRM can make few generate calls."""
        ...
