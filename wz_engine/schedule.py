"""Several optimizer steps per rollout batch (`algorithm.ppo_epochs` x mini-batches).

A rollout step's groups are cut into mini-batches of whole groups (`algorithm.ppo_mini_batch_size`
prompts over all ranks, each rank cutting its own groups: a seeded permutation split into equal
pieces, the same pieces in every epoch, as verl and TRL reuse theirs). Each mini-batch is one
optimizer step, its loss normalised by its own global token / sequence counts; gradient accumulation
inside it stays token-budget packed (`train.micro_batch_tokens`). The old log-probs are computed for
all mini-batches before the first step, so from the second step on the ratio moves and clipping acts.

One mini-batch and one epoch is exactly the single update per rollout batch (rows in their original
order, no shuffle), which keeps the on-policy fast path.
"""

from __future__ import annotations

import numpy as np
import torch


def num_mini_batches(prompts_per_step: int, mini_batch_prompts: int | None) -> int:
    return 1 if mini_batch_prompts is None else prompts_per_step // mini_batch_prompts


def mini_batch_rows(num_groups: int, group_size: int, mini_batches: int, seed: int) -> list[torch.Tensor]:
    """Row indices [rows_m] (int64, ascending) of each of `mini_batches` mini-batches over
    `num_groups` groups of `group_size` consecutive rows: a permutation seeded by `seed` split into
    pieces whose sizes differ by at most one group. One mini-batch: every row in order."""
    if mini_batches == 1:
        return [torch.arange(num_groups * group_size)]
    order = np.random.default_rng(seed).permutation(num_groups)
    pieces = [np.sort(piece) for piece in np.array_split(order, mini_batches)]
    return [torch.from_numpy((piece[:, None] * group_size + np.arange(group_size)).reshape(-1)).long()
            for piece in pieces]


def combine_updates(updates: list[tuple[dict, float, float, bool]]) -> dict:
    """Per optimizer step (loss metrics, grad norm, lr, taken) -> the rollout step's log: means of the
    metrics and grad norms over the steps, the last step's lr, `skipped` if any step was skipped."""
    n = len(updates)
    out = {k: sum(u[0][k] for u in updates) / n for k in updates[0][0]} if n else {}
    out["grad_norm"] = sum(u[1] for u in updates) / n if n else 0.0
    out["lr"] = updates[-1][2] if n else float("nan")
    out["skipped"] = not all(u[3] for u in updates)
    return out
