"""Trained vs initial policy on held-out prompts: pairwise win rate (both orders), on-topic rate,
truncation rate, and whether the output depends on the prompt at all."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

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


@dataclass
class PolicyStats:
    """One policy's held-out completions, measured without the judge."""

    on_topic_rate: float
    """Share of sampled completions that are on topic (`wz_engine.demo.judge.is_on_topic`)."""
    truncation_rate: float
    """Share of sampled completions cut off at max_new_tokens (finish_reason "length", no EOS)."""
    length_mean: float
    """Mean completion length in tokens."""
    distinct_greedy: int
    """Distinct greedy (temperature 0) completions over the held-out prompts: 1 means the policy
    writes the same text whatever the prompt."""


def win_rate(prompts: Sequence, trained: list[list], initial: list[list], judge: PairwiseJudge) -> WinRate:
    """Completions [P][n] of each policy (same seeds), each pair judged as (trained, initial) and
    (initial, trained): 2 * n comparisons per prompt."""
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


def policy_stats(prompts: Sequence, sampled: list[list], greedy: list[list],
                 on_topic: Callable[[str, str], bool]) -> PolicyStats:
    """sampled [P][n], greedy [P][1] completions of one policy -> PolicyStats."""
    flat = [(p, c) for p, g in zip(prompts, sampled) for c in g]
    n = max(len(flat), 1)
    return PolicyStats(
        on_topic_rate=sum(on_topic(p.text, c.text) for p, c in flat) / n,
        truncation_rate=sum(c.finish_reason == "length" for _, c in flat) / n,
        length_mean=sum(len(c.token_ids) for _, c in flat) / n,
        distinct_greedy=len({tuple(g[0].token_ids) for g in greedy}),
    )


def compare_policies(trained_sampler, initial_sampler, judge: PairwiseJudge, prompts: Sequence,
                     params: SamplingParams, on_topic: Callable[[str, str], bool],
                     seed: int = 1234) -> tuple[WinRate, PolicyStats, PolicyStats]:
    """-> (trained's win rate vs initial, trained's stats, initial's stats). Both policies sample with
    the same seeds, so zero training steps means identical completions (every comparison a tie)."""
    ids = [list(p.token_ids) for p in prompts]
    greedy = replace(params, temperature=0.0, n=1, seed=seed)
    out = {}
    for name, sampler in (("trained", trained_sampler), ("initial", initial_sampler)):
        sampled = sampler.generate(ids, replace(params, seed=seed))
        out[name] = sampled, policy_stats(prompts, sampled, sampler.generate(ids, greedy), on_topic)
    return win_rate(prompts, out["trained"][0], out["initial"][0], judge), out["trained"][1], out["initial"][1]
