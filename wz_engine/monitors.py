"""No silent zero-signal training: per-step rollout monitors, and a watch that warns loudly (or aborts)
when the run has had (almost) no learning signal for several steps in a row.

A run can "train" for hours on nothing: a GenRM whose every verdict is invalid gives every rollout
reward 0, the loss is 0, and the run still ends "done". `ZeroSignalWatch` looks at three per-step
metrics, each a share in [0, 1] that is ~1 when the step taught the policy nothing:

- `judge/invalid_rate`: verdicts the judge's output could not be parsed into (reward 0),
- `brpo/skew_drop_rate`: groups BRPO's skew filter dropped (advantages zeroed),
- `adv/zero_rate`: rollouts (references excluded) whose advantage is exactly 0.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from wz_engine import distributed as wzdist

log = logging.getLogger("wz_engine")


class ZeroSignalError(RuntimeError):
    """Raised when `train.abort_on_zero_signal` is set and the watch fires."""


@dataclass(frozen=True)
class SignalCheck:
    key: str
    """Metric name, a share in [0, 1]."""
    what: str
    """What the metric is, for the message."""
    cause: str
    """The likely cause when it stays high."""


CHECKS = (
    SignalCheck("judge/invalid_rate", "of the judge's verdicts were invalid (no parsable scores, reward 0)",
                "the judge model does not write the verdict format: a base or untrained model as GenRM "
                "(e.g. judge.genrm.weight_sharing = \"self\" on a policy never trained to judge), "
                "judge.genrm.max_new_tokens too small to reach the final scores line, or a template the "
                "parser does not read"),
    SignalCheck("brpo/skew_drop_rate", "of the groups were dropped by BRPO's skew filter (advantages zeroed)",
                "the reference beats (or loses to) nearly every rollout: a judge that ties everything or "
                "decides by position, rollouts that are all alike (a collapsed policy), or "
                "algorithm.skew_threshold set too low"),
    SignalCheck("adv/zero_rate", "of the rollouts had advantage 0 (no gradient)",
                "the rewards do not separate the rollouts of a group: invalid verdicts, ties, groups "
                "dropped by the skew filter, or (group-relative estimators) every rollout of a group "
                "scoring the same"),
)


def rollout_monitors(groups: list[list], advantages: torch.Tensor, is_reference: torch.Tensor) -> dict:
    """groups [P_local][G] Completions, advantages [B], is_reference [B] bool (this rank's rows) ->
    `response/truncation_rate` (share of completions cut off at max_new_tokens) and `adv/zero_rate`
    (share of non-reference rows with advantage 0), over all ranks (collective: every rank calls it)."""
    truncated = sum(c.finish_reason == "length" for g in groups for c in g)
    completions = sum(len(g) for g in groups)
    challengers = ~is_reference.bool()
    zero = int(((advantages == 0) & challengers).sum()) if len(advantages) else 0
    sums = wzdist.all_reduce(torch.tensor([truncated, completions, zero, int(challengers.sum())],
                                          dtype=torch.float64))
    nan = float("nan")
    return {"response/truncation_rate": float(sums[0] / sums[1]) if sums[1] else nan,
            "adv/zero_rate": float(sums[2] / sums[3]) if sums[3] else nan}


class ZeroSignalWatch:
    """Counts consecutive steps on which a check's metric is above `threshold`; at `steps` in a row
    (and every `steps` after while it lasts) it logs a warning naming the metric, its likely cause and
    `wz judge eval`, or raises ZeroSignalError when `abort`. Every rank sees the same (reduced) metrics,
    so every rank decides alike. `steps = 0` turns it off."""

    def __init__(self, threshold: float, steps: int, abort: bool = False):
        self.threshold = threshold
        self.steps = steps
        self.abort = abort
        self.streaks = {c.key: 0 for c in CHECKS}

    @classmethod
    def from_config(cls, train_cfg) -> ZeroSignalWatch:
        return cls(train_cfg.zero_signal_threshold, train_cfg.zero_signal_steps, train_cfg.abort_on_zero_signal)

    def state_dict(self) -> dict:
        """The streaks, checkpointed: a resumed run warns (or aborts) at the same step as an uninterrupted one."""
        return dict(self.streaks)

    def load_state_dict(self, state: dict) -> None:
        self.streaks.update({k: int(v) for k, v in state.items() if k in self.streaks})

    def observe(self, step: int, metrics: dict) -> None:
        """Feed one step's metrics (missing or NaN metrics break no streak and extend none)."""
        if self.steps <= 0:
            return
        fired = []
        for check in CHECKS:
            value = metrics.get(check.key)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            self.streaks[check.key] = self.streaks[check.key] + 1 if value > self.threshold else 0
            streak = self.streaks[check.key]
            if streak >= self.steps and streak % self.steps == 0:
                fired.append((check, value, streak))
        if not fired:
            return
        message = self.message(step, fired)
        if self.abort:
            raise ZeroSignalError(message)
        log.warning(message)

    def message(self, step: int, fired: list) -> str:
        lines = [f"NO LEARNING SIGNAL at step {step}:"]
        for check, value, streak in fired:
            lines.append(f"  {check.key} = {value:.2f}: for {streak} steps in a row more than "
                         f"{self.threshold:.0%} {check.what}.\n    Likely cause: {check.cause}.")
        lines.append("  Check the judge on its own first: `wz judge eval` (invalid verdicts, agreement, position "
                     "bias). " + ("Aborting (train.abort_on_zero_signal = true)." if self.abort else
                                  "Set train.abort_on_zero_signal = true to stop such a run instead."))
        return "\n".join(lines)
