"""Group advantages (GRPO) at B rows in groups of G with shuffled, non-contiguous ids.

Providers:
    ours           wz_kernels.group_advantages (reference on CPU; one Triton launch on CUDA)
    torch eager    the plain vectorised formula: unique + index_add_ (count, sum, sum of squares)
    torch.compile  the same formula compiled
    verl loop      verl's compute_grpo_outcome_advantage, re-implemented: a defaultdict of lists
                   over samples, per-group torch.mean / torch.std, a per-sample update loop

`python -m bench advantage --device cpu` prints the table; `pytest bench/bench_advantage.py
--benchmark-enable` runs the pytest-benchmark versions.
"""

from __future__ import annotations

from collections import defaultdict

import torch

import wz_kernels
from bench.checks import REL_TOL, Check, compare, run_check
from bench.harness import Case
from wz_kernels.advantage import group_advantages_reference

EPS = 1e-6


def make_inputs(num_rows: int, group_size: int, device: str, seed: int = 0):
    """rewards [B] f32, group_ids [B] int64: B / G groups with random 40-bit ids, rows shuffled."""
    gen = torch.Generator().manual_seed(seed)
    num_groups = num_rows // group_size
    ids = torch.randint(0, 2**40, (num_groups,), generator=gen)
    group_ids = ids.repeat_interleave(group_size)[torch.randperm(num_rows, generator=gen)]
    rewards = torch.randn(num_rows, generator=gen)
    return rewards.to(device), group_ids.to(device)


def grpo_torch_eager(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """What a user writes without this library: unique + index_add_, E[x^2] - E[x]^2 variance."""
    uniques, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = uniques.numel()
    zeros = rewards.new_zeros(num_groups)
    count = zeros.index_add(0, inverse, torch.ones_like(rewards))
    mean = zeros.index_add(0, inverse, rewards) / count
    sq = zeros.index_add(0, inverse, rewards * rewards)
    std = ((sq - count * mean * mean).clamp_min(0) / (count - 1).clamp_min(1)).sqrt()
    std = torch.where(count > 1, std, torch.ones_like(std))
    mean = torch.where(count > 1, mean, torch.zeros_like(mean))
    # index_select rather than mean[inverse]: the same result, and much faster on CPU
    return (rewards - mean.index_select(0, inverse)) / (std.index_select(0, inverse) + EPS)


def grpo_verl_loop(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """verl-style per-sample loop (compute_grpo_outcome_advantage), re-implemented."""
    scores = rewards.clone()
    index = group_ids.tolist()
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
    for idx, group in id2score.items():
        if len(group) == 1:
            id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            stacked = torch.stack(group)
            id2mean[idx], id2std[idx] = torch.mean(stacked), torch.std(stacked)
    for i in range(scores.shape[0]):
        scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + EPS)
    return scores


_compiled = {}


def grpo_torch_compile(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """The eager formula compiled; unique's data-dependent size is captured instead of graph-breaking."""
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(grpo_torch_eager, dynamic=False)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        return _compiled["fn"](rewards, group_ids)


def cases(device: str, size: str) -> list[Case]:
    """One case: B=16384 G=16 (the target's shape) for headline and full, B=1024 for quick."""
    num_rows, group_size = (1024, 16) if size == "quick" else (16384, 16)
    rewards, group_ids = make_inputs(num_rows, group_size, device)
    group_advantages = wz_kernels.group_advantages  # import outside the timed / measured calls
    providers = {
        "ours": lambda: group_advantages(rewards, group_ids, "grpo"),
        "torch eager": lambda: grpo_torch_eager(rewards, group_ids),
        "torch.compile": lambda: grpo_torch_compile(rewards, group_ids),
        "verl loop": lambda: grpo_verl_loop(rewards, group_ids),
    }
    if device == "cuda":  # both calls are asynchronous; validate=False also skips the in-kernel check
        providers["ours (validate=False)"] = lambda: group_advantages(
            rewards, group_ids, "grpo", validate=False)
    # rewards + ids read once, advantages written once
    bytes_moved = num_rows * (rewards.element_size() + group_ids.element_size() + 4)
    return [Case(f"B={num_rows} G={group_size}", providers, check=check(rewards, group_ids, device),
                 bytes_moved=bytes_moved)]


def check(rewards: torch.Tensor, group_ids: torch.Tensor, device: str) -> Check:
    """Ours (and its validate=False call on CUDA) against the float64 reference."""
    calls = {"advantages": {}}
    if device == "cuda":
        calls["advantages (validate=False)"] = {"validate": False}
    return Check(
        lambda: {n: wz_kernels.group_advantages(rewards, group_ids, "grpo", **kw) for n, kw in calls.items()},
        lambda: dict.fromkeys(calls, group_advantages_reference(rewards, group_ids, "grpo", upcast=True)),
        dtype=rewards.dtype)


# ----------------------------------------------------------------------------- pytest-benchmark

_SMALL = {"num_rows": 1024, "group_size": 16, "device": "cpu"}


def test_ours(benchmark):
    (case,) = cases("cpu", "quick")
    benchmark(case.providers["ours"])
    assert run_check(case.check) <= case.check.tolerance


def test_torch_eager(benchmark):
    """The eager peer computes the same advantages (the table compares like with like)."""
    rewards, group_ids = make_inputs(**_SMALL)
    out = benchmark(grpo_torch_eager, rewards, group_ids)
    compare(out, group_advantages_reference(rewards, group_ids, "grpo", upcast=True), REL_TOL[torch.float32])


def test_verl_loop(benchmark):
    rewards, group_ids = make_inputs(**_SMALL)
    out = benchmark(grpo_verl_loop, rewards, group_ids)
    compare(out, group_advantages_reference(rewards, group_ids, "grpo", upcast=True), REL_TOL[torch.float32])
