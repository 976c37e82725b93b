"""BRPO reward assembly (Writing-Zero, DESIGN.md section 5).

For each prompt with G rollouts, a seeded RNG (fresh per prompt and step) draws the reference o_ref
uniformly. Every other rollout o_i is judged against o_ref in both orders (o_i first, then o_ref
first), `votes` times each. o_i scores:
- +1 if it wins every one of the 2 * votes comparisons,
- -1 if it loses every one (the reference wins each),
- otherwise (mixed results, or ties): -1 by default (`inconsistent="lose"`), 0 with "tie",
- 0 if any of its verdicts is invalid (unparseable judge output: no signal, counted).
The reference scores 0. Advantages are these rewards as they are (no mean/std normalisation),
after the skew filter (`wz_kernels.brpo_advantages`), in `wz_engine.rewards.advantages`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from wz_engine.judge.base import PairwiseJudge, PairwiseRequest
from wz_engine.judge.metrics import JudgementRecord, judge_metrics

SHARED_JUDGE_KEYS = ("judge/order_agreement", "judge/mean_score_a", "judge/mean_score_b", "judge/a_win_rate",
                     "judge/b_win_rate", "judge/tie_rate")
"""Keys taken from `wz_engine.judge.metrics.judge_metrics`; always present (NaN when undefined) so
every rank logs the same keys."""


@dataclass
class BRPORewards:
    rewards: torch.Tensor
    """[P*G] float32: +1 / -1 / 0 per rollout, prompt-major (row p*G + j is prompt p, sample j)."""
    is_reference: torch.Tensor
    """[P*G] bool: True on each group's reference rollout."""
    stats: dict
    """Judge monitors: invalid_rate, position_bias (share of decisive verdicts won by the
    first-shown response), inconsistent_rate, num_verdicts, score_mean (mean raw score of valid
    verdicts: an absolute level, where the rewards are only relative); and from
    `wz_engine.judge.metrics.judge_metrics` (one pair = challenger vs reference, order 1 = swapped):
    order_agreement, mean_score_a / mean_score_b (by position), a_win_rate / b_win_rate / tie_rate.
    Keys are `judge/<name>`; undefined values are NaN."""


def draw_references(prompt_uids: Sequence[int], group_size: int, seed: int, step: int) -> list[int]:
    """Index of the reference rollout per prompt: uniform, from an RNG seeded by (seed, step, uid)."""
    return [int(np.random.default_rng([seed, step, int(uid)]).integers(group_size)) for uid in prompt_uids]


def assemble_brpo_rewards(
    judge: PairwiseJudge,
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    prompt_uids: Sequence[int],
    *,
    step: int,
    seed: int,
    votes: int = 1,
    inconsistent: str = "lose",
    references: Sequence[str | None] | None = None,
) -> BRPORewards:
    """prompts [P], responses [P][G] -> BRPORewards. All judge requests go in one batched call."""
    if votes < 1:
        raise ValueError(f"votes: must be >= 1, got {votes}")
    if inconsistent not in ("lose", "tie"):
        raise ValueError(f"inconsistent: must be 'lose' or 'tie', got {inconsistent!r}")
    if len(prompts) != len(responses) or len(prompts) != len(prompt_uids):
        raise ValueError("prompts, responses and prompt_uids: must have the same length")
    group_sizes = {len(g) for g in responses}
    if len(group_sizes) > 1 or (group_sizes and min(group_sizes) < 2):
        raise ValueError(f"responses: every group needs the same size >= 2, got sizes {sorted(group_sizes)}")
    G = group_sizes.pop() if group_sizes else 0
    refs = draw_references(prompt_uids, G, seed, step)
    references = references or [None] * len(prompts)

    # One request per (prompt, challenger, order, vote); order 0 shows the challenger first.
    requests, keys = [], []
    for p, (prompt, group, ref) in enumerate(zip(prompts, responses, refs)):
        for i in range(G):
            if i == ref:
                continue
            for order in (0, 1):
                a, b = (group[i], group[ref]) if order == 0 else (group[ref], group[i])
                for _ in range(votes):
                    requests.append(PairwiseRequest(prompt, a, b, references[p]))
                    keys.append((p, i, order))
    verdicts = judge.judge(requests) if requests else []
    if len(verdicts) != len(requests):
        raise ValueError(f"judge: returned {len(verdicts)} verdicts for {len(requests)} requests")

    # Tally per challenger: wins, losses, invalid.
    tally: dict[tuple[int, int], list[int]] = {}
    first_wins = decisive = invalid = 0  # decisive: valid, not a tie
    score_sum = 0.0
    for (p, i, order), v in zip(keys, verdicts):
        t = tally.setdefault((p, i), [0, 0, 0])
        w = v.winner
        if w is None:
            t[2] += 1
            invalid += 1
            continue
        score_sum += v.score_a + v.score_b
        if w != "tie":
            decisive += 1
            first_wins += w == "a"
        challenger_won = w == ("a" if order == 0 else "b")
        reference_won = w == ("b" if order == 0 else "a")
        t[0] += challenger_won
        t[1] += reference_won

    total = 2 * votes
    rewards = torch.zeros(len(prompts) * G, dtype=torch.float32)
    is_ref = torch.zeros(len(prompts) * G, dtype=torch.bool)
    n_inconsistent = 0
    for p, ref in enumerate(refs):
        is_ref[p * G + ref] = True
        for i in range(G):
            if i == ref:
                continue
            wins, losses, bad = tally[(p, i)]
            if bad:
                r = 0.0
            elif wins == total:
                r = 1.0
            elif losses == total:
                r = -1.0
            else:
                n_inconsistent += 1
                r = -1.0 if inconsistent == "lose" else 0.0
            rewards[p * G + i] = r

    n_challengers = len(prompts) * max(G - 1, 0)
    shared = judge_metrics([JudgementRecord(v, pair_id=(p, i), swapped=order == 1)
                            for (p, i, order), v in zip(keys, verdicts)])
    stats = {
        **{k: shared.get(k, float("nan")) for k in SHARED_JUDGE_KEYS},
        "judge/invalid_rate": invalid / max(len(verdicts), 1),
        "judge/position_bias": first_wins / decisive if decisive else float("nan"),
        "judge/inconsistent_rate": n_inconsistent / max(n_challengers, 1),
        "judge/num_verdicts": len(verdicts),
        "judge/score_mean": score_sum / (2 * (len(verdicts) - invalid)) if len(verdicts) > invalid else float("nan"),
    }
    return BRPORewards(rewards, is_ref, stats)
