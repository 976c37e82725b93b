"""One step's rollouts on this rank, with their rewards and advantages (rows prompt-major)."""

from __future__ import annotations

import dataclasses

import torch

ROW_KEYS = ("rewards", "is_ref", "adv", "in_loss", "skew")


@dataclasses.dataclass
class Rollouts:
    """This rank's groups for one step, with their rewards and advantages (rows prompt-major)."""

    prompts: list = dataclasses.field(default_factory=list)
    groups: list = dataclasses.field(default_factory=list)
    """groups[p][j]: Completion j of prompt p."""
    rows: dict = dataclasses.field(default_factory=lambda: {k: [] for k in ROW_KEYS})
    """Per-row tensors [G] per group: rewards, is_ref, adv, in_loss, skew (kept by the skew filter)."""
    judge_stats: dict = dataclasses.field(default_factory=dict)
    rounds: int = 0

    def add(self, prompt, group, *row_values) -> None:
        self.prompts.append(prompt)
        self.groups.append(group)
        for key, value in zip(ROW_KEYS, row_values):
            self.rows[key].append(value)

    def cat(self, key: str) -> torch.Tensor:
        return torch.cat(self.rows[key]) if self.rows[key] else torch.zeros(0)

    def prompt_ids(self) -> list[list[int]]:
        return [list(p.token_ids) for p, g in zip(self.prompts, self.groups) for _ in g]

    def response_ids(self) -> list[list[int]]:
        return [list(c.token_ids) for g in self.groups for c in g]
