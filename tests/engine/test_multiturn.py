"""Multi-turn rollouts: action parsing, turn rendering (history window), and the episode loop on a scripted
environment (one sampler call per turn, invalid actions and their penalty, max_turns, seeded calls)."""

from __future__ import annotations

import re

import pytest

from tests.engine.agent_helpers import CounterEnv, ScriptedSampler
from wz_engine.demo.tiny import build_tokenizer
from wz_engine.envs.config import EnvConfig
from wz_engine.envs.pool import EnvPool
from wz_engine.rollout.base import SamplingParams
from wz_engine.rollout.multiturn import parse_action, render_turn, run_episodes


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CounterEnv().corpus() + ["<action>", "</action>", "think hmm sys", "jump"] * 3,
                           vocab_size=200, full_byte_alphabet=True)


@pytest.mark.parametrize("text, tag, want", [
    ("<action>up</action>", "action", "up"),
    ("I think left... no.\n<action> right </action>", "action", "right"),  # thinking before, stripped
    ("<action>a</action> then <action>b</action>", "action", "b"),  # the last complete span
    ("<action>two\nlines</action>", "action", "two\nlines"),
    ("<action>up", "action", None),  # unclosed
    ("no tags at all", "action", None),
    ("<act>up</act>", "action", None),
    ("<move>up</move>", "move", "up"),
    ("  go left  ", "", "go left"),  # tag "": the whole response
    ("   ", "", None),
])
def test_parse_action(text, tag, want):
    assert parse_action(text, tag) == want


def _user_messages(tokenizer, ids):
    text = tokenizer.decode(ids)
    return re.findall(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>", text, flags=re.DOTALL)


def test_render_turn_history_window_and_trimming(tokenizer):
    history = [(f"task 1 count {k}", "<action>inc</action>") for k in range(5)]
    ids = render_turn(tokenizer, "Say inc or stop.", history, "task 1 count 5", history_window=2,
                      system_prompt="sys", max_prompt_tokens=10_000)
    msgs = _user_messages(tokenizer, ids)
    assert [r for r, _ in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert msgs[0][1] == "sys"
    # the instruction heads the first user message; only the last two pairs are shown, newest last
    assert msgs[1][1] == "Say inc or stop.\n\ntask 1 count 3" and msgs[3][1] == "task 1 count 4"
    assert msgs[2][1] == "<action>inc</action>" and msgs[-1][1] == "task 1 count 5"
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")  # generation prompt
    # no window: the current observation only
    none = _user_messages(tokenizer, render_turn(tokenizer, "I", history, "now", history_window=0,
                                                 system_prompt=None, max_prompt_tokens=10_000))
    assert none == [("user", "I\n\nnow")]
    # over the limit: the oldest pairs go first
    full = render_turn(tokenizer, "I", history, "now", history_window=5, system_prompt=None, max_prompt_tokens=10_000)
    one_less = render_turn(tokenizer, "I", history[1:], "now", history_window=5, system_prompt=None,
                           max_prompt_tokens=10_000)
    trimmed = render_turn(tokenizer, "I", history, "now", history_window=5, system_prompt=None,
                          max_prompt_tokens=len(full) - 1)
    assert trimmed == one_less
    with pytest.raises(ValueError, match="env.max_prompt_tokens"):
        render_turn(tokenizer, "I", history, "now", history_window=5, system_prompt=None, max_prompt_tokens=5)


def _policy(prompt: str) -> str:
    """Task 10: inc, inc, stop (success). Task 11: no tag, then an unknown action, then inc forever."""
    last = prompt.rsplit("<|im_start|>user\n", 1)[-1]
    if "task 10" in last:
        return "<action>stop</action>" if "count 2" in last else "thinking... <action>inc</action>"
    if "(invalid)" in last:  # history 1: the previous answer is in the prompt
        return "<action>inc</action>" if "jump" in prompt else "<action>jump</action>"
    return "<action>inc</action>" if "count 0" not in last else "I will not use tags"


@pytest.mark.parametrize("workers", [0, 2])
def test_episodes_on_a_scripted_env(tokenizer, workers):
    cfg = EnvConfig(name="x", max_turns=5, history=1, invalid_penalty=0.25, workers=workers)
    pool = EnvPool(lambda i: CounterEnv(), 4, workers=workers)
    sampler = ScriptedSampler(tokenizer, _policy)
    episodes = run_episodes(sampler, tokenizer, pool, cfg, [(0, 10), (1, 11)], 2,
                            SamplingParams(max_new_tokens=8, n=3))
    assert [(e.slot, e.group, e.seed) for e in episodes] == [(0, 0, 10), (1, 0, 10), (2, 1, 11), (3, 1, 11)]
    # one sampler call per turn for every active episode, each prompt with n = 1
    assert [n for n, _ in sampler.calls] == [4, 4, 4, 2, 2]
    assert all(p.n == 1 for _, p in sampler.calls)
    solved, stuck = episodes[0], episodes[2]
    assert [t.action for t in solved.turns] == ["inc", "inc", "stop"]
    assert solved.success and not solved.truncated and [t.reward for t in solved.turns] == [0.0, 0.0, 2.0]
    assert not any(t.invalid for t in solved.turns)
    # no tagged span: the env gets None; an unknown action: the env says invalid; both pay the penalty
    assert [t.action for t in stuck.turns] == [None, "jump", "inc", "inc", "inc"]
    assert [t.invalid for t in stuck.turns] == [True, True, False, False, False]
    assert [t.reward for t in stuck.turns] == [-0.25, -0.25, 0.0, 0.0, 0.0]
    assert pool.envs[2].seen[:2] == [None, "jump"]
    assert stuck.truncated and stuck.done and not stuck.success and len(stuck.turns) == cfg.max_turns
    # each turn keeps the observation it acted on and its own prompt (history window 1)
    assert [t.observation for t in solved.turns] == ["task 10 count 0", "task 10 count 1", "task 10 count 2"]
    shown = tokenizer.decode(solved.turns[2].prompt_ids)
    assert "task 10 count 1" in shown and "task 10 count 0" not in shown and "<action>inc</action>" in shown
    assert "I will not use tags" in tokenizer.decode(stuck.turns[1].prompt_ids)  # an invalid response, as said
    for e in episodes:
        for t in e.turns:
            assert t.completion.token_ids[-1] == tokenizer.eos_token_id


def test_the_env_may_end_an_episode_on_an_invalid_action(tokenizer):
    cfg = EnvConfig(name="x", max_turns=5, invalid_penalty=1.0)
    pool = EnvPool(lambda i: CounterEnv(end_on_invalid=True), 2)
    episodes = run_episodes(ScriptedSampler(tokenizer, lambda p: "nothing"), tokenizer, pool, cfg, [(0, 3)], 2,
                            SamplingParams(max_new_tokens=4))
    for e in episodes:
        assert len(e.turns) == 1 and e.turns[0].invalid and e.turns[0].reward == -1.0
        assert e.done and not e.truncated and not e.success


def test_seeded_calls_are_one_per_task_and_turn(tokenizer):
    cfg = EnvConfig(name="x", max_turns=3)
    pool = EnvPool(lambda i: CounterEnv(), 6)
    sampler = ScriptedSampler(tokenizer, lambda p: "<action>inc</action>")
    run_episodes(sampler, tokenizer, pool, cfg, [(4, 1), (9, 2), (5, 3)], 2, SamplingParams(max_new_tokens=4),
                 call_seed=lambda group, turn: 1000 * group + turn)
    assert [(n, p.seed) for n, p in sampler.calls] == [(2, 1000 * g + t) for t in range(3) for g in (4, 9, 5)]


def test_pool_checks_what_the_env_returns():
    class Bad:
        def __init__(self, out):
            self.out = out

        def reset(self, seed):
            return "ok", {}

        def step(self, action):
            return self.out

    for out, match in [(("obs", float("nan"), False, {}), "non-finite reward"), (("obs", 0.0), "must return"),
                       ((3, 0.0, False, {}), "observation as a str")]:
        pool = EnvPool(lambda i, out=out: Bad(out), 1)
        pool.reset([0], [0])
        with pytest.raises((ValueError, TypeError), match=match):
            pool.step([0], ["a"])
    with pytest.raises(ValueError, match="2 instances for 2 tasks x 2"):
        run_episodes(None, None, EnvPool(lambda i: CounterEnv(), 2), EnvConfig(name="x"), [(0, 1), (1, 2)], 2,
                     SamplingParams())
