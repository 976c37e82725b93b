"""GiGPO assembly: anchor-state grouping, step returns, and the estimator against the definition
(a hand-computed case, and the plain-Python reference on fresh random trajectories)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from wz_engine.algorithms import ESTIMATORS, AdvantageInputs
from wz_engine.algorithms.estimators.gigpo import (
    anchor_ids,
    discounted_returns,
    gigpo_python_reference,
    normalise_observation,
)
from wz_engine.config import AlgorithmConfig
from wz_engine.envs.config import GiGPOConfig


def test_identical_observations_share_an_anchor_within_a_group_only():
    obs = ["at 1", "at 2", "at 1", "at  1\n", "at 1", "at 2", "At 1"]
    groups = [0, 0, 0, 0, 1, 1, 0]
    ids = anchor_ids(obs, groups).tolist()
    # same group, same (normalised) observation, different trajectories / turns: one anchor
    assert ids[0] == ids[2] == ids[3]
    # the same text in another episode group is another anchor, never the first group's
    assert ids[4] != ids[0] and ids[5] != ids[1]
    assert ids[4] != ids[5]
    # normalisation collapses whitespace only: case is part of the state
    assert ids[6] != ids[0]
    assert sorted(set(ids)) == list(range(len(set(ids))))  # dense
    with pytest.raises(ValueError, match="observations for"):
        anchor_ids(obs, groups[:-1])


def test_anchor_groups_never_cross_episode_groups_on_random_batches():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(1, 40)
        obs = [f"s{rng.randint(0, 3)}" + " " * rng.randint(0, 2) for _ in range(n)]
        groups = [rng.randint(0, 4) for _ in range(n)]
        ids = anchor_ids(obs, groups)
        for i in range(n):
            for j in range(n):
                same = groups[i] == groups[j] and normalise_observation(obs[i]) == normalise_observation(obs[j])
                assert (ids[i] == ids[j]) == same


def test_discounted_returns_by_hand():
    assert discounted_returns([0.0, 0.0, 1.0], 0.5) == [0.25, 0.5, 1.0]
    assert discounted_returns([1.0, -1.0, 2.0], 1.0) == [2.0, 1.0, 2.0]
    assert discounted_returns([3.0], 0.9) == [3.0]
    assert discounted_returns([], 0.9) == []


# A hand-computed case: task 0 has trajectories A (2 steps) and B (3 steps), task 1 one trajectory C.
#   A: obs [s0, s1],     rewards [0, 1]      R = 1   G(gamma=.5) = [0.5, 1]
#   B: obs [s0, s0, s2], rewards [0, 0, -1]  R = -1  G = [-0.25, -0.5, -1]
#   C: obs [s0],         rewards [2]         R = 2   G = [2]
# mean_norm, trajectories: A_ep = R - mean(1, -1) = +-1; C alone keeps R = 2.
# Anchor s0 of task 0 = {A0: .5, B0: -.25, B1: -.5}, mean -1/12; s1, s2 and task 1's s0 are alone: 0.
GROUPS = [0, 0, 0, 0, 0, 1]
TRAJ = [0, 0, 1, 1, 1, 2]
REWARDS = [0.0, 1.0, 0.0, 0.0, -1.0, 2.0]
OBS = ["s0", "s1", "s0", "s0 ", "s2", "s0"]
HAND_W05 = [1 + 0.5 * (0.5 + 1 / 12), 1.0, -1 + 0.5 * (-0.25 + 1 / 12), -1 + 0.5 * (-0.5 + 1 / 12), -1.0, 2.0]
HAND_STEPS_BASELINE_W0 = [1.2, 1.2, -0.8, -0.8, -0.8, 2.0]  # episode stats over steps: mean(1,1,-1,-1,-1) = -0.2


def _inputs(groups, traj, rewards, obs, gamma):
    returns = {t: sum(r for r, u in zip(rewards, traj) if u == t) for t in set(traj)}
    step_returns = []
    for t in dict.fromkeys(traj):
        step_returns += discounted_returns([r for r, u in zip(rewards, traj) if u == t], gamma)
    B = len(groups)
    return AdvantageInputs(torch.tensor([returns[t] for t in traj], dtype=torch.float32), torch.tensor(groups),
                           torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.long),
                           step_returns=torch.tensor(step_returns, dtype=torch.float32),
                           anchor_ids=anchor_ids(obs, groups), trajectory_ids=torch.tensor(traj))


def _cfg(**gigpo) -> AlgorithmConfig:
    return replace(AlgorithmConfig(estimator="gigpo"), gigpo=GiGPOConfig(**gigpo))


def test_estimator_on_the_hand_computed_case():
    est = ESTIMATORS.get("gigpo")
    assert est.per_step and not est.pairwise
    out = est(_inputs(GROUPS, TRAJ, REWARDS, OBS, 0.5), _cfg(step_weight=0.5, gamma=0.5, mode="mean_norm"))
    torch.testing.assert_close(out.values.double(), torch.tensor(HAND_W05, dtype=torch.float64), atol=1e-6, rtol=0)
    ref = gigpo_python_reference(GROUPS, TRAJ, REWARDS, OBS, gamma=0.5, step_weight=0.5, mode="mean_norm")
    assert ref == pytest.approx(HAND_W05, abs=1e-12)
    # the components: episode part per step, and the weighted step part
    torch.testing.assert_close(out.components["episode"], torch.tensor([1.0, 1, -1, -1, -1, 2]))
    torch.testing.assert_close(out.components["step"] + out.components["episode"], out.values)
    steps = est(_inputs(GROUPS, TRAJ, REWARDS, OBS, 0.5),
                _cfg(step_weight=0.0, gamma=0.5, mode="mean_norm", episode_baseline="steps"))
    torch.testing.assert_close(steps.values.double(), torch.tensor(HAND_STEPS_BASELINE_W0, dtype=torch.float64),
                               atol=1e-6, rtol=0)


def test_estimator_std_mode_by_hand():
    out = ESTIMATORS.get("gigpo")(_inputs(GROUPS, TRAJ, REWARDS, OBS, 0.5),
                                  _cfg(step_weight=1.0, gamma=0.5, mode="mean_std_norm"))
    eps = 1e-6
    s0 = [0.5, -0.25, -0.5]
    mean = sum(s0) / 3
    std = (sum((x - mean) ** 2 for x in s0) / 2) ** 0.5
    a_ep = 1 / (2 ** 0.5 + eps)  # returns (1, -1): mean 0, unbiased std sqrt(2)
    want = [a_ep + (0.5 - mean) / (std + eps), a_ep, -a_ep + (-0.25 - mean) / (std + eps),
            -a_ep + (-0.5 - mean) / (std + eps), -a_ep, 2 / (1 + eps)]
    torch.testing.assert_close(out.values.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["mean_norm", "mean_std_norm"])
@pytest.mark.parametrize("baseline", ["trajectories", "steps"])
def test_estimator_matches_the_python_reference_on_random_trajectories(mode, baseline):
    rng = random.Random({"mean_norm": 1, "mean_std_norm": 2}[mode] * 10 + {"trajectories": 1, "steps": 2}[baseline])
    for case in range(15):
        groups, traj, rewards, obs = [], [], [], []
        t = 0
        for g in range(rng.randint(1, 4)):
            for _ in range(rng.randint(1, 4)):  # a group may hold a single trajectory
                for _ in range(rng.randint(1, 5)):  # and a trajectory a single step
                    groups.append(g * 7 + 3)  # arbitrary, non-dense group ids
                    traj.append(t)
                    rewards.append(rng.choice([0.0, 1.0, -0.1, rng.uniform(-2, 2)]))
                    obs.append(f"cell {rng.randint(0, 3)}")
                t += 1
        gamma, w = rng.choice([1.0, 0.9, 0.0]), rng.uniform(0, 2)
        out = ESTIMATORS.get("gigpo")(_inputs(groups, traj, rewards, obs, gamma),
                                      _cfg(step_weight=w, gamma=gamma, mode=mode, episode_baseline=baseline))
        ref = gigpo_python_reference(groups, traj, rewards, obs, gamma=gamma, step_weight=w, mode=mode,
                                     episode_baseline=baseline)
        torch.testing.assert_close(out.values.double(), torch.tensor(ref, dtype=torch.float64), atol=2e-5,
                                   rtol=1e-5, msg=f"case {case}")


def test_estimator_refuses_rows_without_step_inputs():
    inputs = AdvantageInputs(torch.ones(2), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.bool),
                             torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="step_returns"):
        ESTIMATORS.get("gigpo")(inputs, _cfg())
