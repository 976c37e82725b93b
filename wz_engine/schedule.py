"""Several optimizer steps per rollout batch (`algorithm.ppo_epochs` x mini-batches).

A rollout step's groups are cut into mini-batches of whole groups (`algorithm.ppo_mini_batch_size`
prompts over all ranks: a seeded permutation of the step's prompts split into equal pieces, the same
on every rank whatever the world size, and the same pieces in every epoch, as verl and TRL reuse
theirs). Each mini-batch is one
optimizer step, its loss normalised by its own global token / sequence counts; gradient accumulation
inside it stays token-budget packed (`train.micro_batch_tokens`). The old log-probs are computed for
all mini-batches before the first step, so from the second step on the ratio moves and clipping acts.

One mini-batch and one epoch is exactly the single update per rollout batch (rows in their original
order, no shuffle), which keeps the on-policy fast path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def num_mini_batches(prompts_per_step: int, mini_batch_prompts: int | None) -> int:
    return 1 if mini_batch_prompts is None else prompts_per_step // mini_batch_prompts


def mini_batch_rows(num_groups: int, group_size: int | Sequence[int], mini_batches: int, seed: int,
                    first_group: int = 0, total_groups: int | None = None) -> list[torch.Tensor]:
    """Row indices [rows_m] (int64, ascending) of this rank's part of each of `mini_batches` mini-batches.

    The step's `total_groups` groups (default `num_groups`) are permuted with `seed` and cut into
    `mini_batches` pieces of equal size (+-1); this rank holds groups first_group .. first_group +
    num_groups - 1 of them, and takes the rows of those in each piece. Rows are group-major: `group_size`
    consecutive rows per group, or per group its own count (a sequence of num_groups counts: multi-turn
    episode groups hold as many rows as turns). The same seed on every rank makes the mini-batches
    independent of the world size. One mini-batch: every row, in order."""
    sizes = np.full(num_groups, group_size) if np.isscalar(group_size) else np.asarray(group_size, dtype=np.int64)
    if len(sizes) != num_groups:
        raise ValueError(f"mini_batch_rows: {len(sizes)} group sizes for {num_groups} groups")
    if mini_batches == 1:
        return [torch.arange(int(sizes.sum()))]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    order = np.random.default_rng(seed).permutation(num_groups if total_groups is None else total_groups)
    out = []
    for piece in np.array_split(order, mini_batches):
        local = np.sort(piece[(piece >= first_group) & (piece < first_group + num_groups)]) - first_group
        rows = [np.arange(starts[g], starts[g] + sizes[g]) for g in local]
        out.append(torch.from_numpy(np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)).long())
    return out


def combine_updates(updates: list[tuple[dict, float, float, bool]]) -> dict:
    """Per optimizer step (loss metrics, grad norm, lr, taken) -> the rollout step's log: means of the
    metrics and grad norms over the steps, the last step's lr, `skipped` if any step was skipped."""
    n = len(updates)
    out = {k: sum(u[0][k] for u in updates) / n for k in updates[0][0]} if n else {}
    out["grad_norm"] = sum(u[1] for u in updates) / n if n else 0.0
    out["lr"] = updates[-1][2] if n else float("nan")
    out["skipped"] = not all(u[3] for u in updates)
    return out


def ppo_schedule_reference(lm: torch.nn.Module, optimizer: torch.optim.Optimizer, prompts: list[list[int]],
                           responses: list[list[int]], advantages: torch.Tensor, in_loss: torch.Tensor,
                           mini_batches: list[torch.Tensor], epochs: int, *, clip_low: float, clip_high: float,
                           grad_clip: float, temperature: float = 1.0) -> list[dict[str, float]]:
    """Plain-torch specification of the update schedule with the ppo_clip loss and token-mean
    aggregation, independent of wz_engine.update and the fused kernels: every sequence runs alone
    through the HF causal LM (full logits, log_softmax), the old log-probs are taken before the first
    step, then `epochs` passes over `mini_batches` (row indices), one AdamW step each, loss normalised
    by the mini-batch's loss tokens, gradients clipped to `grad_clip` (0: not clipped).

    prompts / responses [B] token ids, advantages [B], in_loss [B] bool. -> per optimizer step:
    loss, clip_frac_low, clip_frac_high (fractions of the mini-batch's loss tokens), grad_norm."""

    device = next(lm.parameters()).device

    def logprobs(i: int) -> torch.Tensor:  # [R_i] log-probs of response i's tokens
        ids = torch.tensor(prompts[i] + responses[i], device=device)[None]
        logits = lm(input_ids=ids, use_cache=False).logits[0, len(prompts[i]) - 1:-1].float() / temperature
        return torch.log_softmax(logits, -1).gather(1, ids[0, len(prompts[i]):, None])[:, 0]

    rows_in_loss = [i for i in range(len(prompts)) if bool(in_loss[i]) and responses[i]]
    with torch.no_grad():
        old = {i: logprobs(i) for i in rows_in_loss}
    params = [p for p in lm.parameters() if p.requires_grad]
    steps = []
    for _ in range(epochs):
        for rows in mini_batches:
            members = [i for i in rows.tolist() if i in old]
            tokens = max(sum(len(responses[i]) for i in members), 1)
            optimizer.zero_grad(set_to_none=True)
            loss, low, high = torch.zeros((), device=device), 0, 0
            for i in members:
                a = float(advantages[i])
                ratio = torch.exp(logprobs(i) - old[i])
                clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
                loss = loss + torch.maximum(-a * ratio, -a * clipped).sum() / tokens
                low += int(((ratio < 1 - clip_low) & (a < 0)).sum())
                high += int(((ratio > 1 + clip_high) & (a > 0)).sum())
            if members:
                loss.backward()
            else:  # the trainer still steps (AdamW moves on its momentum) on an all-zero gradient
                for p in params:
                    p.grad = torch.zeros_like(p)
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
            optimizer.step()
            steps.append({"loss": float(loss.detach()), "clip_frac_low": low / tokens, "clip_frac_high": high / tokens,
                          "grad_norm": float(norm)})
    return steps
