"""The environment protocol: the registry (built-ins and module paths), the shipped gridworld's rules,
the batched pool (state across episodes, threads), and the config checks of agent runs."""

from __future__ import annotations

import pytest

from tests.engine.agent_helpers import CounterEnv
from wz_engine.config import ConfigError, load_config
from wz_engine.envs.base import ENVS, env_corpus, eval_task_seeds, instance_seed, train_task_seed
from wz_engine.envs.builtin.gridworld import GridWorld, parse_move
from wz_engine.envs.config import EnvConfig
from wz_engine.envs.pool import EnvPool

AGENT = ['env.name="gridworld"', 'algorithm.estimator="gigpo"', "env.max_prompt_tokens=64",
         "train.micro_batch_tokens=256"]


def test_registry_builtin_and_module_path():
    assert "gridworld" in ENVS.names()
    assert ENVS.get("gridworld").factory is GridWorld
    spec = ENVS.get("tests.engine.agent_helpers:CounterEnv")
    env = spec.make({"noise": 1.0}, seed=5)
    assert isinstance(env, CounterEnv) and env.noise == 1.0
    assert env.rng.random() == CounterEnv(seed=5).rng.random()  # the factory takes `seed`: it got one
    with pytest.raises(ValueError, match="did you mean 'gridworld'"):
        ENVS.get("gridworl")

    def not_an_env():
        return object()

    from wz_engine.envs.base import EnvSpec

    with pytest.raises(TypeError, match="has no reset or step"):
        EnvSpec("x", not_an_env).make({}, seed=0)


def test_gridworld_rules():
    env = GridWorld(rows=2, cols=3, observe="absolute")
    obs, info = env.reset(7)
    assert obs == GridWorld(rows=2, cols=3, observe="absolute").reset(7)[0]  # same seed, same task
    assert info["instruction"] == "Reach the goal (2x3 grid)."
    env.pos, env.goal = (0, 0), (1, 2)
    assert env.step("up") == ("You: row 1, col 1. Goal: row 2, col 3.", 0.0, False, {})  # border: stays
    assert env.step("Go RIGHT")[0].startswith("You: row 1, col 2.")
    o, _, d, i = env.step("jump")
    assert i == {"invalid": True} and o.startswith("Invalid action. You: row 1, col 2.") and not d
    assert env.step(None)[3] == {"invalid": True}
    env.step("down")
    assert env.step("right") == ("You reached the goal.", 1.0, True, {"success": True})
    with pytest.raises(RuntimeError, match="reset first"):
        env.step("up")
    assert parse_move("left, then up") == "left" and parse_move("Up") == "up"
    assert parse_move("upward") is None and parse_move("") is None and parse_move(None) is None
    with pytest.raises(ValueError, match="two cells"):
        GridWorld(rows=1, cols=1)
    with pytest.raises(ValueError, match="observe"):
        GridWorld(observe="both")
    starts = {GridWorld(observe="absolute").reset(s)[0] for s in range(1000)}
    assert len(starts) == 72  # every (start, goal) pair of a 3x3 grid is a task


def test_gridworld_relative_observation_is_a_compass():
    env = GridWorld(rows=3, cols=3)
    env.reset(0)
    env.pos, env.goal = (2, 0), (0, 1)
    assert env._observation() == "Goal: 2 up, 1 right."
    assert env.step("right")[0] == "Goal: 2 up."
    assert env.step("up")[0] == "Goal: 1 up."
    assert env.step("left")[0] == "Goal: 1 up, 1 right."
    assert env.step("left")[0] == "Goal: 1 up, 1 right."  # border: same cell, same observation
    texts = set(env.corpus())
    assert {"Goal: 2 up.", "Goal: 1 down, 2 left.", "up", "Invalid action."} <= texts


def test_gridworld_progress_reward_is_potential_based():
    env = GridWorld(rows=3, cols=3, progress_reward=0.25)
    env.reset(0)
    env.pos, env.goal = (1, 1), (0, 2)
    assert env.step("down")[1] == -0.25  # one step farther
    assert env.step("down")[1] == 0.0  # into the wall: no move, no progress
    assert env.step("jump")[1] == 0.0  # invalid: the engine's env.invalid_penalty applies, not shaping
    assert env.step("up")[1] == 0.25
    assert env.step("up")[1] == 0.25
    assert env.step("right") == ("You reached the goal.", 1.25, True, {"success": True})
    # the shaped rewards of an episode sum to progress x (start distance - final distance) + the goal reward


def test_gridworld_slip_comes_from_its_own_saved_rng():
    def run(env):
        env.reset(3)
        return [env.step("down")[0] for _ in range(3) for _ in [env.reset(3)]]

    a, b = GridWorld(slip=0.5, seed=1), GridWorld(slip=0.5, seed=1)
    run(a)
    state = a.state_dict()
    first = run(a)
    b.load_state_dict(state)
    assert run(b) == first
    assert len({tuple(run(GridWorld(slip=0.5, seed=s))) for s in range(8)}) > 1  # the seed matters


def test_pool_state_dict_round_trip_and_threads():
    pool = EnvPool(lambda i: CounterEnv(noise=1.0, seed=i), 3, workers=2)
    pool.reset([0, 1, 2], [5, 6, 7])
    state = pool.state_dict()
    first = pool.step([0, 1, 2], ["stop"] * 3)
    assert [t.reward for t in first] != [0.0] * 3
    other = EnvPool(lambda i: CounterEnv(noise=1.0, seed=100 + i), 3)
    other.load_state_dict(state)
    other.reset([0, 1, 2], [5, 6, 7])
    assert [t.reward for t in other.step([0, 1, 2], ["stop"] * 3)] == [t.reward for t in first]
    with pytest.raises(ValueError, match="holds 3 instances"):
        EnvPool(lambda i: CounterEnv(), 2).load_state_dict(state)
    pool.close()


def test_task_seeds_train_even_eval_odd_and_world_size_free():
    seeds = [train_task_seed(0, step, slot) for step in range(5) for slot in range(8)]
    assert all(s % 2 == 0 for s in seeds) and len(set(seeds)) == len(seeds)
    assert train_task_seed(0, 3, 5) == train_task_seed(0, 3, 5) != train_task_seed(1, 3, 5)
    assert eval_task_seeds(3) == [1, 3, 5]
    assert instance_seed(0, 1) != instance_seed(0, 2) != instance_seed(1, 2)


def test_corpus_holds_the_action_tags():
    texts = "".join(env_corpus(EnvConfig(name="gridworld", action_tag="move")))
    assert "<move>" in texts and "</move>" in texts and "Goal" in texts and "assistant\n" in texts
    assert "<action>" not in "".join(env_corpus(EnvConfig(name="tests.engine.agent_helpers:CounterEnv",
                                                          action_tag="")))


@pytest.mark.parametrize("overrides, match", [
    (['algorithm.estimator="gigpo"'], "needs? .*env.name|set env.name"),
    ([a for a in AGENT if "estimator" not in a] + ['algorithm.estimator="brpo"'], "pairwise"),
    (AGENT + ['env.name="gridwrld"'], "env.name: .*did you mean 'gridworld'"),
    (AGENT + ['env.action_tag="<action>"'], "env.action_tag"),
    (AGENT + ["env.max_turns=0"], "env.max_turns"),
    (AGENT + ["env.invalid_penalty=-1"], "env.invalid_penalty"),
    (AGENT + ["train.micro_batch_tokens=32"], "train.micro_batch_tokens"),
    (AGENT + ["algorithm.dynamic_sampling=true"], "algorithm.dynamic_sampling: not supported"),
    (AGENT + ["algorithm.gigpo.gamma=1.5"], "algorithm.gigpo.gamma"),
    (AGENT + ['algorithm.gigpo.mode="std"'], "algorithm.gigpo.mode"),
])
def test_agent_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_agent_config_needs_no_judge():
    cfg = load_config(None, AGENT + ['judge.kind="genrm"'])  # the env gives the rewards: the judge is ignored
    assert cfg.env.name == "gridworld"
    assert load_config(None, [a for a in AGENT if "estimator" not in a] + ['algorithm.estimator="grpo"'])
