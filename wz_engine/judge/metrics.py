"""Judge health metrics for the trainer's logs and the eval CLI.

Definitions (over the judgements given; "valid" = parsed, scores in range):
- invalid_rate: invalid / all.
- a_win_rate, b_win_rate, tie_rate: how often the response shown FIRST (A) / second (B) wins, or
  the scores tie, among valid judgements.
- position_bias: the share of decisive (valid, not tied) judgements won by the response shown
  first, in [0, 1]; 0.5 = no preference for a position (DESIGN.md: "how often A wins"; the same
  definition as `wz_engine.rewards.brpo`). With both orders judged on the same pairs, a judge
  that only looks at content scores exactly 0.5.
- order_agreement: among pairs judged in both orders with at least one valid judgement in each,
  the fraction whose valid judgements all name the same winner in content terms (or all tie).
  Needs `pair_id` and `swapped` on the records; absent when no pair qualifies.
- mean_score_a, mean_score_b: mean scores by position over valid judgements.
- time_s, judgements_per_s: when the judge's wall time is given.
Undefined rates (no valid judgement) are omitted rather than logged as NaN.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from wz_engine.judge.base import Verdict


@dataclass
class JudgementRecord:
    verdict: Verdict
    pair_id: Hashable | None = None
    """Which comparison this judgement belongs to (all its orders and votes share it)."""
    swapped: bool = False
    """True when the pair's first item was shown as B (the reverse order)."""
    reason: str = ""
    """"ok" or why the verdict is invalid (`base.INVALID_REASONS`); "" when the judge gives no reasons."""


def judge_metrics(
    records: Sequence[JudgementRecord | Verdict],
    judge_seconds: float | None = None,
    prefix: str = "judge/",
) -> dict[str, float]:
    """Judge health metrics (see the module docstring) keyed `prefix + name`."""
    recs = [r if isinstance(r, JudgementRecord) else JudgementRecord(r) for r in records]
    n = len(recs)
    valid = [r for r in recs if r.verdict.valid]
    out: dict[str, float] = {"n": float(n)}
    if n:
        out["invalid_rate"] = (n - len(valid)) / n
    if valid:
        wins = [r.verdict.winner for r in valid]
        a, b, t = wins.count("a"), wins.count("b"), wins.count("tie")
        out["a_win_rate"] = a / len(valid)
        out["b_win_rate"] = b / len(valid)
        out["tie_rate"] = t / len(valid)
        if a + b:
            out["position_bias"] = a / (a + b)
        out["mean_score_a"] = sum(r.verdict.score_a for r in valid) / len(valid)
        out["mean_score_b"] = sum(r.verdict.score_b for r in valid) / len(valid)
    agreement = order_agreement(recs)
    if agreement is not None:
        out["order_agreement"] = agreement
    if judge_seconds is not None:
        out["time_s"] = float(judge_seconds)
        if judge_seconds > 0:
            out["judgements_per_s"] = n / judge_seconds
    return {prefix + k: v for k, v in out.items()}


def content_winner(record: JudgementRecord) -> str | None:
    """"first" / "second" in the pair's own terms (undoing the swap), "tie", or None if invalid."""
    w = record.verdict.winner
    if w in (None, "tie"):
        return w
    first_shown_first = not record.swapped
    return "first" if (w == "a") == first_shown_first else "second"


def order_agreement(records: Sequence[JudgementRecord]) -> float | None:
    """Fraction of pairs (valid judgements in both orders) whose valid judgements all agree."""
    pairs: dict[Hashable, list[JudgementRecord]] = {}
    for r in records:
        if r.pair_id is not None and r.verdict.valid:
            pairs.setdefault(r.pair_id, []).append(r)
    qualifying = agree = 0
    for group in pairs.values():
        if len({r.swapped for r in group}) < 2:
            continue
        qualifying += 1
        agree += len({content_winner(r) for r in group}) == 1
    return agree / qualifying if qualifying else None
