"""Configuration of multi-turn agent runs: the environment (`env`) and GiGPO (`algorithm.gigpo`).

Importable without torch or transformers (wz_engine.config imports it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

GIGPO_MODES = ("mean_norm", "mean_std_norm")


@dataclass
class EnvConfig:
    name: str | None = None
    """Environment of a multi-turn agent run: a built-in ("gridworld") or a module path "pkg.module:factory"
    to your own (wz_engine/envs/__init__.py describes the protocol). None: single-turn prompts (data.*).
    With an environment, rollout.prompts_per_step is tasks (seeds) per step and rollout.group_size the
    trajectories per task; rollout.max_new_tokens limits each turn."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the factory (a table, e.g. kwargs = { size = 3 })."""
    max_turns: int = 8
    """Episode length limit: an episode still running after this many turns ends (truncated, no success)."""
    history: int = 2
    """Past (observation, action) pairs shown in each turn's prompt, newest last (0: the current observation
    only). Older ones are dropped first when the prompt would exceed max_prompt_tokens."""
    action_tag: str = "action"
    """The action is the text inside the last <tag>...</tag> span of a turn's response (thinking before it is
    fine); no span: the action is invalid (the env's step gets None). "": the whole response is the action."""
    invalid_penalty: float = 0.1
    """Subtracted from the step's reward when the action is invalid (no tagged span, or the env's info says
    "invalid"). The env's observation says so; whether the episode goes on is the env's decision."""
    episode_return: Literal["sum", "success"] = "sum"
    """Return of an episode: the sum of its rewards (penalties included), or 1/0 by the env's final
    info["success"]. Episode-level advantages compare these within a task's group."""
    system_prompt: str | None = None
    """System message of every turn's prompt (before the task instruction and the history)."""
    max_prompt_tokens: int = 1024
    """Longest rendered turn prompt; history is trimmed to fit, and a turn that does not fit without history
    is an error naming the observation."""
    workers: int = 0
    """Threads stepping the environments of a turn (for envs that wait on I/O); 0: the calling thread."""
    eval_seeds: int = 64
    """Held-out task seeds for evaluation (`wz demo --agent`): odd seeds 1, 3, ..., never used in training
    (training tasks have even seeds)."""


@dataclass
class GiGPOConfig:
    step_weight: float = 1.0
    """w in A = A_episode + w * A_step."""
    mode: Literal["mean_norm", "mean_std_norm"] = "mean_norm"
    """Normalisation at both levels: "mean_norm" (x - mean) or "mean_std_norm" ((x - mean) / (std + eps))."""
    gamma: float = 0.95
    """Discount of the step returns (return-to-go from each step) that anchor groups compare."""
    episode_baseline: Literal["trajectories", "steps"] = "trajectories"
    """Statistics of the episode level: over the G trajectories of a task (the paper's Eq. 3), or over all
    steps of the group (each trajectory weighted by its length, verl-agent's compute_mean_std_cross_steps)."""
