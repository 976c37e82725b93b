"""GiGPO (Group-in-Group Policy Optimization, arXiv 2505.10978): advantages for multi-turn agents.

Rows are environment steps. Two levels of groups, no critic, no extra rollouts:

    A_episode  the episode return R of the step's trajectory against the other trajectories of the same
               task (Eq. 3): R - mean, or (R - mean) / (std + eps); a group of one keeps R (grpo's rule)
    A_step     the step's discounted return-to-go against the other steps taken from the same anchor
               state (the same normalised observation met anywhere in the task's trajectories, Eq. 6-7);
               an anchor group of one gives 0
    A          A_episode + step_weight * A_step (Eq. 8), the same for every token of the step's response

`anchor_ids` builds the anchor groups; `discounted_returns` the step returns; the estimator runs ONE
`wz_kernels.gigpo_advantages` launch for both levels (see `gigpo`); `gigpo_python_reference` is the same
definition in plain Python loops, the specification the tests hold the assembly to.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

from wz_engine.algorithms.estimator import Advantages, register_estimator


def normalise_observation(text: str) -> str:
    """The anchor-state key of an observation: surrounding whitespace dropped, inner runs collapsed to one
    space (so "at  row 1\\n" and "at row 1" are the same state); case and punctuation are kept."""
    return " ".join(text.split())


def anchor_ids(observations: Sequence[str], group_ids: Sequence[int]) -> torch.Tensor:
    """[B] int64 anchor ids of steps: two steps share an id exactly when they belong to the same episode
    group AND their normalised observations are equal. Steps of different groups never share an id, even
    with identical observations (their tasks differ). Ids are dense, in order of first appearance."""
    if len(observations) != len(group_ids):
        raise ValueError(f"anchor_ids: {len(observations)} observations for {len(group_ids)} group ids")
    table: dict[tuple[int, str], int] = {}
    ids = [table.setdefault((int(g), normalise_observation(o)), len(table)) for o, g in zip(observations, group_ids)]
    return torch.tensor(ids, dtype=torch.long)


def discounted_returns(rewards: Sequence[float], gamma: float) -> list[float]:
    """Return-to-go of one trajectory: G_t = r_t + gamma * G_{t+1}, G_T = 0."""
    out, running = [0.0] * len(rewards), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = float(rewards[t]) + gamma * running
        out[t] = running
    return out


@register_estimator("gigpo", per_step=True)  # per_step: RunConfig.validate requires an env
def gigpo(inputs, cfg) -> Advantages:
    """A = A_episode + w * A_step (module docstring), in one `gigpo_advantages` launch over B_e + B rows:

      episode rows (one per trajectory, or one per step with episode_baseline = "steps"): the episode
          return, in its task's group, each its own anchor (singleton: A_step = 0)      -> A_episode
      step rows (one per step): episode value 0 in groups of their own (all-equal: A_episode = 0 exactly),
          the step return in its anchor group                                         -> w * A_step

    The kernel keys anchor groups by (group id, anchor id), and `anchor_ids` already never shares an id
    across tasks: two independent guards against mixing tasks' states.
    """
    from wz_kernels.advantage import gigpo_advantages

    g = cfg.gigpo
    if inputs.step_returns is None or inputs.anchor_ids is None or inputs.trajectory_ids is None:
        raise ValueError("estimator 'gigpo': needs step_returns, anchor_ids and trajectory_ids (multi-turn rows)")
    B = inputs.rewards.numel()
    _, group = torch.unique(inputs.group_ids, return_inverse=True)  # dense task groups [B]
    num_groups = int(group.max()) + 1 if B else 0
    if g.episode_baseline == "trajectories":
        _, row_episode = torch.unique(inputs.trajectory_ids, return_inverse=True)  # [B] -> trajectory
        E = int(row_episode.max()) + 1 if B else 0
        # every step of a trajectory holds the same return and group: any of its rows gives them
        episode_return = inputs.rewards.new_zeros(E).index_copy_(0, row_episode, inputs.rewards)
        episode_group = group.new_zeros(E).index_copy_(0, row_episode, group)
    else:
        row_episode, E = torch.arange(B), B
        episode_return, episode_group = inputs.rewards, group
    values = torch.cat([episode_return.float(), torch.zeros(B)])
    groups = torch.cat([episode_group, group + num_groups])
    steps = torch.cat([torch.zeros(E), inputs.step_returns.float()])
    anchors = torch.cat([-1 - torch.arange(E), inputs.anchor_ids.long()])
    # host tensors: validating the step returns too is a host check, no device sync
    out = gigpo_advantages(values, groups, steps, anchors, step_weight=g.step_weight, mode=g.mode)
    a_episode = out[:E].index_select(0, row_episode)
    a_step = out[E:]
    return Advantages(a_episode + a_step, torch.ones(B, dtype=torch.bool), {"episode": a_episode, "step": a_step})


def gigpo_python_reference(group_ids: Sequence[int], trajectory_ids: Sequence[int], step_rewards: Sequence[float],
                           observations: Sequence[str], *, gamma: float, step_weight: float, mode: str,
                           episode_baseline: str = "trajectories", eps: float = 1e-6) -> list[float]:
    """GiGPO's definition in plain Python (no torch, no kernel): per step row (rows of a trajectory
    consecutive and in time order) the advantage A_episode + step_weight * A_step, with the episode
    return = the sum of the trajectory's step rewards."""
    by_std = {"mean_norm": False, "mean_std_norm": True}[mode]

    def normalised(value: float, members: list[float], singleton_keeps: bool) -> float:
        if len(members) == 1:
            if not singleton_keeps:
                return 0.0
            return value / (1.0 + eps) if by_std else value
        mean = sum(members) / len(members)
        return (value - mean) / (statistics.stdev(members) + eps) if by_std else value - mean

    trajectories: dict[int, list[int]] = {}
    for row, t in enumerate(trajectory_ids):
        trajectories.setdefault(t, []).append(row)
    episode_return = {t: sum(step_rewards[r] for r in rows) for t, rows in trajectories.items()}
    step_return = [0.0] * len(step_rewards)
    for rows in trajectories.values():
        running = 0.0
        for r in reversed(rows):
            running = step_rewards[r] + gamma * running
            step_return[r] = running
    episode_members: dict[int, list[float]] = {}
    if episode_baseline == "trajectories":
        for t, rows in trajectories.items():
            episode_members.setdefault(group_ids[rows[0]], []).append(episode_return[t])
    else:
        for r, t in enumerate(trajectory_ids):
            episode_members.setdefault(group_ids[r], []).append(episode_return[t])
    anchors: dict[tuple[int, str], list[float]] = {}
    for r, obs in enumerate(observations):
        anchors.setdefault((group_ids[r], " ".join(obs.split())), []).append(step_return[r])
    out = []
    for r, t in enumerate(trajectory_ids):
        a_episode = normalised(episode_return[t], episode_members[group_ids[r]], singleton_keeps=True)
        a_step = normalised(step_return[r], anchors[(group_ids[r], " ".join(observations[r].split()))],
                            singleton_keeps=False)
        out.append(a_episode + step_weight * a_step)
    return out
