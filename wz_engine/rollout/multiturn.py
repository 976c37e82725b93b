"""Multi-turn rollouts: episodes of a text environment sampled from any `Sampler` (hf or vllm).

Each turn of every still-running episode is rendered with the chat template from the task instruction,
a window of the last `env.history` (observation, action) pairs and the current observation; all active
episodes then go to the sampler in ONE call (n = 1 each), and the pool steps all their envs in one batch:

    reset all slots -> [render active -> sampler.generate -> parse actions -> pool.step] x max_turns

Every turn keeps its own prompt ids and the model's sampled token ids (with the engine's log-probs when
asked for, for vLLM's truncated IS): a turn is one training sequence whose loss covers only those sampled
tokens, never the observation or history tokens of its prompt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from wz_engine.rollout.base import Completion, SamplingParams


@dataclass
class Turn:
    prompt_ids: list[int]
    """The rendered prompt of this turn (instruction, history window, observation; generation prompt)."""
    completion: Completion
    """The model's response: its token ids are the only tokens of this turn in the loss."""
    observation: str
    """The observation the action was taken from (the anchor state of GiGPO)."""
    action: str | None
    """The parsed action (None: the response held no tagged action span)."""
    reward: float
    """The env's reward, minus env.invalid_penalty for an invalid action."""
    invalid: bool


@dataclass
class Episode:
    slot: int
    """Env instance that ran it (task index * group_size + trajectory index, on this rank)."""
    group: int
    """Episode group: the task (all G episodes of a task seed share it)."""
    seed: int
    """The task seed given to reset."""
    instruction: str
    observation: str
    """The current observation (the last one once done)."""
    turns: list[Turn] = field(default_factory=list)
    done: bool = False
    success: bool = False
    truncated: bool = False
    """Ended by env.max_turns rather than by the env."""
    episode_return: float = 0.0
    """Set after the episode (env.episode_return: the sum of its rewards, or 1/0 by success)."""

    def history(self, action_tag: str) -> list[tuple[str, str]]:
        """(observation, what the agent did) per turn: the action in its tags, or the raw response when no
        action could be parsed from it."""
        def shown(t: Turn) -> str:
            if t.action is None:
                return t.completion.text
            return f"<{action_tag}>{t.action}</{action_tag}>" if action_tag else t.action

        return [(t.observation, shown(t)) for t in self.turns]


def parse_action(text: str, tag: str) -> str | None:
    """The action in a response: the text of the LAST complete <tag>...</tag> span, stripped (thinking or
    drafts before it are allowed); None when there is none. tag "": the whole response, stripped (None if
    empty)."""
    if not tag:
        return text.strip() or None
    spans = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)
    return spans[-1].strip() if spans else None


def render_turn(tokenizer, instruction: str, history: Sequence[tuple[str, str]], observation: str, *,
                history_window: int, system_prompt: str | None, max_prompt_tokens: int) -> list[int]:
    """Prompt token ids of one turn: [system], then the last `history_window` (observation, action) pairs as
    user / assistant messages, then the current observation; the instruction heads the first user message.
    The oldest pairs are dropped while the prompt is longer than `max_prompt_tokens`."""
    window = list(history[-history_window:]) if history_window else []
    while True:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        for obs, action in window:
            messages += [{"role": "user", "content": obs}, {"role": "assistant", "content": action}]
        messages.append({"role": "user", "content": observation})
        first_user = 1 if system_prompt else 0
        if instruction:
            head = messages[first_user]
            messages[first_user] = {**head, "content": f"{instruction}\n\n{head['content']}"}
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_prompt_tokens:
            return list(ids)
        if not window:
            raise ValueError(f"env.max_prompt_tokens: a turn prompt has {len(ids)} tokens > {max_prompt_tokens} even "
                             f"without history (observation: {observation[:80]!r}); raise env.max_prompt_tokens")
        window = window[1:]


@dataclass
class RolloutStats:
    sampler_calls: int = 0
    turns: int = 0
    """Turn batches (sampler rounds)."""
    generated_tokens: int = 0
    prompt_tokens: int = 0


def run_episodes(sampler, tokenizer, pool, env_cfg, tasks: Sequence[tuple[int, int]], group_size: int,
                 params: SamplingParams, *, call_seed: Callable[[int, int], int] | None = None,
                 turn_seed: Callable[[int], int] | None = None, timer=None,
                 stats: RolloutStats | None = None) -> list[Episode]:
    """Run `group_size` episodes of every task (group id, task seed) to the end; episode k * group_size + j is
    env slot k * group_size + j of `pool`. -> the episodes, in slot order.

    One sampler call per turn for all active episodes (each prompt with n = 1), seeded turn_seed(turn) when
    given (else by the sampler's own generator). With `call_seed`, one call per (task, turn) instead, seeded
    call_seed(group id, turn): the samples then depend on neither the batching nor the world size (as
    rollout.seed_per_prompt does for single-turn runs)."""
    timer = timer or (lambda name: contextlib.nullcontext())
    stats = stats if stats is not None else RolloutStats()
    if len(pool) < len(tasks) * group_size:
        raise ValueError(f"env pool: {len(pool)} instances for {len(tasks)} tasks x {group_size} episodes")
    slots = list(range(len(tasks) * group_size))
    seeds = [tasks[s // group_size][1] for s in slots]
    with timer("env"):
        starts = pool.reset(slots, seeds)
    episodes = [Episode(s, tasks[s // group_size][0], seeds[s], str(info.get("instruction", "")), obs)
                for s, (obs, info) in zip(slots, starts)]
    one = dataclasses.replace(params, n=1)
    for turn in range(env_cfg.max_turns):
        active = [e for e in episodes if not e.done]
        if not active:
            break
        prompts = [render_turn(tokenizer, e.instruction, e.history(env_cfg.action_tag), e.observation,
                               history_window=env_cfg.history, system_prompt=env_cfg.system_prompt,
                               max_prompt_tokens=env_cfg.max_prompt_tokens) for e in active]
        with timer("rollout"):
            turn_params = one if turn_seed is None else dataclasses.replace(one, seed=turn_seed(turn))
            completions = _generate(sampler, active, prompts, turn_params, turn, call_seed, stats)
        actions = [parse_action(c.text, env_cfg.action_tag) for c in completions]
        with timer("env"):
            transitions = pool.step([e.slot for e in active], actions)
        stats.turns += 1
        stats.prompt_tokens += sum(len(p) for p in prompts)
        stats.generated_tokens += sum(len(c.token_ids) for c in completions)
        for e, ids, c, a, tr in zip(active, prompts, completions, actions, transitions):
            invalid = a is None or bool(tr.info.get("invalid", False))
            reward = tr.reward - (env_cfg.invalid_penalty if invalid else 0.0)
            e.turns.append(Turn(ids, c, e.observation, a, reward, invalid))
            e.observation = tr.observation
            e.success = e.success or bool(tr.info.get("success", False))
            e.done = tr.done
    for e in episodes:
        if not e.done:
            e.done = e.truncated = True
    return episodes


def _generate(sampler, active: list[Episode], prompts: list[list[int]], params: SamplingParams, turn: int,
              call_seed, stats: RolloutStats) -> list[Completion]:
    if call_seed is None:
        stats.sampler_calls += 1
        return [g[0] for g in sampler.generate(prompts, params)]
    out: list[Completion | None] = [None] * len(active)
    by_group: dict[int, list[int]] = {}
    for i, e in enumerate(active):
        by_group.setdefault(e.group, []).append(i)
    for group, members in by_group.items():
        stats.sampler_calls += 1
        groups = sampler.generate([prompts[i] for i in members],
                                  dataclasses.replace(params, seed=call_seed(group, turn)))
        for i, g in zip(members, groups):
            out[i] = g[0]
    return out  # type: ignore[return-value]
