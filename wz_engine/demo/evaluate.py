"""Trained vs initial policy, judged pairwise on held-out prompts in both orders."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from wz_engine.judge.base import PairwiseJudge, PairwiseRequest
from wz_engine.rollout.base import SamplingParams


@dataclass
class WinRate:
    win_rate: float
    """(wins + ties / 2) / comparisons, from the trained policy's side."""
    wins: int
    ties: int
    losses: int
    invalid: int
    comparisons: int


def pairwise_win_rate(trained_sampler, initial_sampler, judge: PairwiseJudge, prompts: Sequence,
                      params: SamplingParams, seed: int = 1234) -> WinRate:
    """For every prompt, `params.n` completions from each policy (same seeds), each pair judged as
    (trained, initial) and (initial, trained): 2 * n comparisons per prompt."""
    ids = [list(p.token_ids) for p in prompts]
    from dataclasses import replace

    trained = trained_sampler.generate(ids, replace(params, seed=seed))
    initial = initial_sampler.generate(ids, replace(params, seed=seed))
    requests, trained_first = [], []
    for p, tg, ig in zip(prompts, trained, initial):
        for t, i in zip(tg, ig):
            requests += [PairwiseRequest(p.text, t.text, i.text), PairwiseRequest(p.text, i.text, t.text)]
            trained_first += [True, False]
    wins = ties = losses = invalid = 0
    for v, first in zip(judge.judge(requests), trained_first):
        w = v.winner
        if w is None:
            invalid += 1
        elif w == "tie":
            ties += 1
        elif (w == "a") == first:
            wins += 1
        else:
            losses += 1
    n = len(requests)
    return WinRate((wins + 0.5 * ties) / max(n, 1), wins, ties, losses, invalid, n)
