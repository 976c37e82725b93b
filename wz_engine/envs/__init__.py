"""Environments for multi-turn agent runs (GiGPO or episode-level GRPO).

Plugging in your own environment (no engine edit):

    # my_pkg/envs.py
    class Guess:                                  # one episode at a time per instance
        def __init__(self, high=10, seed=0): ...  # env.kwargs; `seed` (optional): the instance's own RNG
        def reset(self, seed):                    # the task seed -> (observation, info)
            return "Guess a number from 1 to 10.", {"instruction": "Play the guessing game."}
        def step(self, action):                   # the parsed action text, or None (no <action> span)
            return "Too low.", 0.0, False, {}     # (observation, reward, done, info); info may say
                                                  # "invalid": True or "success": True

    # run.toml
    [env]
    name = "my_pkg.envs:Guess"
    kwargs = { high = 10 }
    max_turns = 6
    [algorithm]
    estimator = "gigpo"

The protocol in full: wz_engine/envs/base.py. Built-ins register themselves from wz_engine/envs/builtin/
(`gridworld`). The engine runs `rollout.prompts_per_step` tasks x `rollout.group_size` episodes per step
in an `EnvPool` (pool.py), one sampler call per turn for every active episode
(wz_engine/rollout/multiturn.py), and turns them into training rows (wz_engine/rollout/episodes.py).
"""
