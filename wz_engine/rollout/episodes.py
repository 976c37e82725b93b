"""The collect phase of agent runs (`env.name` set): env episodes -> training rows with advantages.

Per rollout step, this rank runs rollout.prompts_per_step / world_size tasks x rollout.group_size
episodes (wz_engine.rollout.multiturn). Every turn becomes one row (one packed training sequence: its
prompt, and the model's response as the only tokens in the loss), carrying its step's advantage from the
estimator:

    per-step estimators (gigpo)  rows = steps: episode return, task group, discounted step return,
                                 anchor id (same normalised observation in the same task), trajectory id
    the others (grpo, rloo, ...) rows = trajectories: episode return in the task group, and the
                                 trajectory's advantage copied to each of its steps (episode-level GRPO)

Rows are group-major (a task's episodes, each episode's turns in order), so the trainer's mini-batches
take whole task groups.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from wz_engine import distributed as wzdist
from wz_engine.algorithms import AdvantageInputs, Advantages
from wz_engine.algorithms.estimators.gigpo import anchor_ids, discounted_returns
from wz_engine.envs.base import train_task_seed, turn_call_seed
from wz_engine.envs.pool import EnvPool
from wz_engine.rollout.batch import Rollouts
from wz_engine.rollout.multiturn import Episode, RolloutStats, run_episodes

ANCHOR_SIZE_BUCKETS = ((1, 1), (2, 3), (4, 7), (8, None))
"""Anchor-group size buckets logged as the fraction of steps in each (1 = found no partner)."""


@dataclasses.dataclass
class EpisodeRollouts(Rollouts):
    """Rollouts whose rows are environment turns: groups[k] holds the Completions of every turn of task k's
    episodes, and each row has its own prompt (the rendered turn)."""

    turn_prompts: list = dataclasses.field(default_factory=list)
    """[rows] prompt token ids of each turn."""
    episodes: list = dataclasses.field(default_factory=list)

    def prompt_ids(self) -> list[list[int]]:
        return self.turn_prompts

    def sample(self) -> dict | None:
        if not self.episodes:
            return None
        e = self.episodes[0]
        return {"instruction": e.instruction, "observations": [t.observation for t in e.turns],
                "responses": [t.completion.text for t in e.turns], "rewards": [t.reward for t in e.turns],
                "success": e.success, "advantage": float(self.cat("adv")[0])}


def step_rows(episodes: list[Episode], gamma: float) -> dict[str, list]:
    """Per turn (group-major, turns in order) the columns the estimators and metrics read."""
    cols: dict[str, list] = {k: [] for k in ("group", "trajectory", "episode_return", "step_return", "observation",
                                             "length")}
    for e in episodes:
        rewards = [t.reward for t in e.turns]
        for t, ret in zip(e.turns, discounted_returns(rewards, gamma)):
            cols["group"].append(e.group)
            cols["trajectory"].append(e.slot)
            cols["episode_return"].append(e.episode_return)
            cols["step_return"].append(ret)
            cols["observation"].append(t.observation)
            cols["length"].append(len(t.completion.token_ids))
    return cols


def episode_returns(episodes: list[Episode], kind: str) -> None:
    """Set each episode's return: the sum of its rewards (penalties included), or 1/0 by success."""
    for e in episodes:
        e.episode_return = float(e.success) if kind == "success" else float(sum(t.reward for t in e.turns))


def episode_advantages(episodes: list[Episode], estimator, cfg) -> tuple[Advantages, torch.Tensor]:
    """-> (advantages per step row, anchor ids per step row). `cfg`: the RunConfig."""
    cols = step_rows(episodes, cfg.algorithm.gigpo.gamma)
    anchors = anchor_ids(cols["observation"], cols["group"])
    B = len(cols["group"])
    if estimator.per_step:
        inputs = AdvantageInputs(torch.tensor(cols["episode_return"], dtype=torch.float32),
                                 torch.tensor(cols["group"], dtype=torch.long), torch.zeros(B, dtype=torch.bool),
                                 torch.tensor(cols["length"], dtype=torch.long),
                                 step_returns=torch.tensor(cols["step_return"], dtype=torch.float32),
                                 anchor_ids=anchors, trajectory_ids=torch.tensor(cols["trajectory"], dtype=torch.long))
        return estimator(inputs, cfg.algorithm), anchors
    # one row per trajectory, its advantage copied to every step
    inputs = AdvantageInputs(torch.tensor([e.episode_return for e in episodes], dtype=torch.float32),
                             torch.tensor([e.group for e in episodes], dtype=torch.long),
                             torch.zeros(len(episodes), dtype=torch.bool),
                             torch.tensor([sum(len(t.completion.token_ids) for t in e.turns) for e in episodes]))
    per_episode = estimator(inputs, cfg.algorithm)
    turns = torch.tensor([len(e.turns) for e in episodes])
    values = per_episode.values.repeat_interleave(turns)
    return Advantages(values, per_episode.kept.repeat_interleave(turns), {"episode": values}), anchors


def agent_metrics(episodes: list[Episode], anchors: torch.Tensor, adv: Advantages, stats: RolloutStats,
                  rollout_s: float) -> dict:
    """The step's agent monitors, global over ranks (collective: every rank calls it). `rollout_s`: this
    rank's wall time of the episodes (sampling and env steps); tokens/s uses the slowest rank's."""
    steps = [t for e in episodes for t in e.turns]
    sizes = torch.bincount(anchors)[anchors] if len(anchors) else torch.zeros(0, dtype=torch.long)  # [B]
    buckets = [float(((sizes >= lo) & (sizes <= (hi or sizes.max()))).sum()) if len(sizes) else 0.0
               for lo, hi in ANCHOR_SIZE_BUCKETS]
    episode_part = float(adv.components.get("episode", adv.values).abs().sum())
    step_part = float(adv.components["step"].abs().sum()) if "step" in adv.components else 0.0
    sums = wzdist.all_reduce(torch.tensor([
        len(episodes), sum(e.success for e in episodes), sum(e.truncated for e in episodes), len(steps),
        sum(t.invalid for t in steps), sum(e.episode_return for e in episodes), float(torch.unique(anchors).numel()),
        episode_part, step_part, stats.generated_tokens, stats.prompt_tokens, stats.sampler_calls, stats.turns,
        *buckets], dtype=torch.float64)).tolist()
    slowest = float(wzdist.all_reduce(rollout_s, op="max"))
    n_ep, n_steps = max(sums[0], 1.0), max(sums[3], 1.0)
    out = {"agent/success_rate": sums[1] / n_ep, "agent/truncated_rate": sums[2] / n_ep,
           "agent/episode_length": sums[3] / n_ep, "agent/invalid_action_rate": sums[4] / n_steps,
           "agent/return_mean": sums[5] / n_ep, "agent/anchor_group_size_mean": sums[3] / max(sums[6], 1.0),
           "agent/step_advantage_share": sums[8] / max(sums[7] + sums[8], 1e-12),
           "agent/generated_tokens": sums[9], "agent/prompt_tokens": sums[10], "agent/sampler_calls": sums[11],
           "agent/turn_rounds": sums[12], "agent/rollout_tokens_per_s": sums[9] / max(slowest, 1e-9)}
    for (lo, hi), count in zip(ANCHOR_SIZE_BUCKETS, sums[13:]):
        name = f"{lo}" if lo == hi else (f"{lo}_{hi}" if hi else f"{lo}+")
        out[f"agent/anchor_steps_size_{name}"] = count / n_steps
    out["agent/anchor_steps_with_partner"] = 1.0 - out["agent/anchor_steps_size_1"]
    return out


class EpisodeCollector:
    """`collect(timer)` for agent runs: this rank's tasks of the step -> EpisodeRollouts (with metrics).
    Its env pool persists across steps; `state_dict` (every instance's own state, e.g. an RNG) goes into
    the trainer's checkpoints."""

    def __init__(self, trainer):
        cfg, info = trainer.cfg, trainer.info
        self.trainer = trainer
        self.tasks_per_rank = cfg.rollout.prompts_per_step // info.world_size
        size = self.tasks_per_rank * cfg.rollout.group_size
        self.pool = EnvPool.from_config(cfg.env, size, cfg.train.seed, first_slot=info.rank * size)

    def state_dict(self) -> dict:
        return {"envs": self.pool.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "envs" in state:
            self.pool.load_state_dict(state["envs"])

    def collect(self, timer) -> EpisodeRollouts:
        t = self.trainer
        cfg, step = t.cfg, t.step_idx
        if t.sampler.weight_version != step:
            t.sync_weights(step, timer)
        first = t.info.rank * self.tasks_per_rank
        tasks = [(slot, train_task_seed(cfg.train.seed, step, slot))
                 for slot in range(first, first + self.tasks_per_rank)]
        call_seed = None
        if cfg.rollout.seed_per_prompt:  # one seeded call per task and turn: independent of the world size
            def call_seed(group: int, turn: int) -> int:
                return turn_call_seed(cfg.train.seed, step, group, turn)

        stats = RolloutStats()
        start = time.perf_counter()
        episodes = run_episodes(t.sampler, t.tokenizer, self.pool, cfg.env, tasks, cfg.rollout.group_size,
                                t._sampling_params(), call_seed=call_seed, timer=timer, stats=stats)
        rollout_s = time.perf_counter() - start
        if cfg.rollout.sampler == "vllm" and cfg.rollout.vllm.check_weight_version:
            from wz_engine.rollout.vllm import assert_weight_version

            assert_weight_version([[turn.completion for turn in e.turns] for e in episodes], step)
        episode_returns(episodes, cfg.env.episode_return)
        with timer("advantage"):
            adv, anchors = episode_advantages(episodes, t.estimator, cfg)
        got = EpisodeRollouts(rounds=1, episodes=episodes)
        G, row = cfg.rollout.group_size, 0
        for k in range(len(tasks)):
            members = episodes[k * G:(k + 1) * G]
            group = [turn.completion for e in members for turn in e.turns]
            rows = slice(row, row + len(group))
            returns = torch.tensor([e.episode_return for e in members for _ in e.turns], dtype=torch.float32)
            got.add(tasks[k], group, returns, torch.zeros(len(group), dtype=torch.bool), adv.values[rows],
                    torch.ones(len(group), dtype=torch.bool), adv.kept[rows])
            got.turn_prompts += [turn.prompt_ids for e in members for turn in e.turns]
            row += len(group)
        got.metrics = agent_metrics(episodes, anchors, adv, stats, rollout_s)
        return got
