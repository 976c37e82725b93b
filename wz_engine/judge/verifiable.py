"""Training the GenRM itself: preference pairs as a verifiable reward for the judge (Writing-Zero).

The policy being trained IS the judge. Every pair {prompt, chosen, rejected} is rendered with the
GenRM's own template (`judge.genrm`: template, verdict_style, system_prompt, mode) in both orders,
chosen shown as A and chosen shown as B; each rendered judge prompt is one prompt of the trainer, so
its G samples form one group of a GRPO-family estimator. A sample's reward is checked against the
label (`verdict_reward`): +1 when its parsed verdict scores the chosen response at least `margin`
points above the rejected one, -1 for any other valid verdict (the rejected one preferred, a tie, a
smaller gap), -`format_penalty` when the verdict is invalid (wz_engine/judge/parser.py).

Prompt rows: pair i becomes rows 2i (chosen as A) and 2i + 1 (chosen as B), so a prompt's `uid // 2`
is its pair and its `reference` field holds the labelled winner's position ("A" or "B").

The reward source itself (registration, config checks, metrics) is
`wz_engine/algorithms/reward_sources/preference.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from wz_engine.judge.base import PairwiseRequest, Verdict
from wz_engine.judge.eval import PreferencePair, normalize_row

CHOSEN_POSITIONS = ("A", "B")


@dataclass
class PreferenceConfig:
    """judge.kind = "preference": train the policy as a pairwise judge on preference pairs. The pairs are
    `data.path` (JSONL or "hf:<name>"), the judge prompt and verdict grammar are `judge.genrm`'s."""

    margin: float = 1.0
    """Reward +1 when the verdict scores the labelled winner at least this many points above the loser;
    every other valid verdict (loser preferred, a tie, a smaller gap) scores -1. Must be > 0."""
    format_penalty: float = 1.0
    """An invalid verdict (unparseable, out of range, cut off) scores -format_penalty. Above 1 every valid
    verdict beats every invalid one, which lets a judge that starts out of format learn the format."""
    holdout: int = 0
    """Keep the last N pairs of data.path out of training: the held-out split (see eval_every)."""
    eval_data: str | None = None
    """A separate held-out preference file (JSONL) or "hf:<name>" (split `eval_split`), instead of holdout."""
    eval_split: str = "test"
    """Split of an "hf:" eval_data."""
    eval_every: int = 0
    """Judge the held-out pairs (both orders, judge.genrm's votes / temperature / max_new_tokens) every N
    rollout steps, before that step's update (step 1 is the starting judge); logged as heldout/*.
    0: never. With several ranks each judges its share and the rates are averaged."""

    def __post_init__(self) -> None:
        if not self.margin > 0:
            raise ValueError(f"margin must be > 0 (a tie never counts as correct), got {self.margin!r}")
        if not self.format_penalty >= 0:
            raise ValueError(f"format_penalty must be >= 0 (the reward is -format_penalty), got {self.format_penalty!r}")
        if self.holdout < 0 or self.eval_every < 0:
            raise ValueError(f"holdout and eval_every must be >= 0, got {self.holdout}, {self.eval_every}")
        if self.holdout and self.eval_data:
            raise ValueError("holdout and eval_data both name a held-out split: set one of them")


def verdict_reward(verdict: Verdict, chosen_first: bool, margin: float, format_penalty: float) -> float:
    """The verifiable reward of one judge sample (see the module docstring)."""
    if not verdict.valid:
        return -float(format_penalty)
    chosen, rejected = (verdict.score_a, verdict.score_b) if chosen_first else (verdict.score_b, verdict.score_a)
    return 1.0 if chosen - rejected >= margin else -1.0


def load_preference_pairs(path: str, split: str = "train") -> list[PreferencePair]:
    """Pairs from a JSONL file or "hf:<name>" (the shapes `wz judge eval` accepts: standard,
    conversational, implicit prompt); a bad row is a DataError naming file:line or the dataset row."""
    from wz_engine.data import DataError, load_hf_rows, read_jsonl

    if path.startswith("hf:"):
        located = [(f"dataset {path[3:]!r} split {split!r} row {i}", row)
                   for i, row in enumerate(load_hf_rows(path[3:], split))]
    else:
        located = read_jsonl(path)
    pairs = []
    for where, row in located:
        try:
            pairs.append(normalize_row(row, where))
        except ValueError as e:
            raise DataError(f"{e} (a preference pair: {{prompt, chosen, rejected}} or TRL's chat variants)") from None
    if not pairs:
        raise DataError(f"{path!r} holds no preference pairs")
    return pairs


def split_pairs(pairs: list[PreferencePair], holdout: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out): the last `holdout` pairs are held out."""
    from wz_engine.data import DataError

    if holdout >= len(pairs):
        raise DataError(f"judge.preference.holdout = {holdout} leaves no training pairs (of {len(pairs)})")
    return pairs[: len(pairs) - holdout], pairs[len(pairs) - holdout:]


def ordered_requests(pair: PreferencePair) -> list[tuple[PairwiseRequest, str]]:
    """The pair in both orders: (request, position of the chosen response), chosen as A first."""
    return [(PairwiseRequest(pair.prompt, pair.chosen, pair.rejected, pair.reference), "A"),
            (PairwiseRequest(pair.prompt, pair.rejected, pair.chosen, pair.reference), "B")]


def judge_prompt_rows(pairs: Sequence[PreferencePair], render, system_prompt: str | None, prompt_field: str,
                      reference_field: str) -> list[dict]:
    """Trainer prompt rows: 2 per pair (see the module docstring). `render(request) -> str` is the
    GenRM's user message; the trainer applies the chat template to it, as the GenRM does."""
    from wz_engine.data import DataError

    rows = []
    for i, pair in enumerate(pairs):
        for request, chosen_at in ordered_requests(pair):
            try:
                message = render(request)
            except ValueError as e:  # e.g. reference mode and a pair without a reference
                raise DataError(f"preference pair {i}: {e}") from None
            prompt = message if system_prompt is None else [{"role": "system", "content": system_prompt},
                                                             {"role": "user", "content": message}]
            rows.append({prompt_field: prompt, reference_field: chosen_at})
    return rows
