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
    metrics: dict = dataclasses.field(default_factory=dict)
    """The collect phase's own step metrics (global over ranks), logged as they are."""

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

    def group_rows(self) -> list[int]:
        """Rows of each group (the mini-batches take whole groups)."""
        return [len(g) for g in self.groups]

    def engine_logprobs(self) -> list[torch.Tensor]:
        """Per row [R] the sampler's log-prob of each response token (vLLM's truncated IS)."""
        return [torch.tensor(c.logprobs, dtype=torch.float32) for g in self.groups for c in g]

    def sample(self) -> dict | None:
        """One rollout for the samples log."""
        if not self.groups:
            return None
        return {"prompt": self.prompts[0].text, "response": self.groups[0][0].text,
                "reward": float(self.cat("rewards")[0]), "advantage": float(self.cat("adv")[0])}


class PromptCollector:
    """The single-turn collect phase: `Trainer.collect` (prompts -> G judged responses each). The data
    position it consumes is saved by the trainer itself (PromptStream)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def collect(self, timer) -> Rollouts:
        return self.trainer.collect(timer)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
