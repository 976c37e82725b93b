"""A scripted environment and a scripted sampler for the multi-turn tests.

`CounterEnv` is an environment a user could write (it is also loaded by module path in the tests).
`ScriptedSampler` stands in for the policy only where a test needs exact control of the responses;
the trainer tests use the real HF sampler on a tiny model, and the vLLM tests the vLLM adapter.
"""

from __future__ import annotations

import random

from wz_engine.rollout.base import Completion


class CounterEnv:
    """Count up with "inc", finish with "stop" (reward = the count, success when it is >= 2).

    Unparseable actions (None) and unknown words are invalid; with `end_on_invalid` an invalid action ends
    the episode. `noise` > 0 adds a random bonus to "stop" from the instance's own RNG (checkpointed)."""

    def __init__(self, end_on_invalid: bool = False, noise: float = 0.0, seed: int = 0):
        self.end_on_invalid, self.noise = end_on_invalid, noise
        self.rng = random.Random(seed)
        self.seen: list = []  # every action step() received

    def reset(self, seed):
        self.task, self.count = seed, 0
        return f"task {seed} count 0", {"instruction": "Say inc or stop."}

    def step(self, action):
        self.seen.append(action)
        if action == "inc":
            self.count += 1
            return f"task {self.task} count {self.count}", 0.0, False, {}
        if action == "stop":
            bonus = self.rng.random() * self.noise if self.noise else 0.0
            return "stopped", float(self.count) + bonus, True, {"success": self.count >= 2}
        return f"task {self.task} count {self.count} (invalid)", 0.0, self.end_on_invalid, {"invalid": True}

    def state_dict(self):
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state):
        self.rng.setstate(state["rng"])

    def corpus(self):
        return ["Say inc or stop.", "task 0123456789 count", "stopped", "(invalid)", "inc", "stop"]


class ScriptedSampler:
    """Sampler protocol; the response to a prompt is `policy(decoded prompt text)`. Records every call."""

    weight_version = 0

    def __init__(self, tokenizer, policy):
        self.tokenizer, self.policy = tokenizer, policy
        self.calls: list[tuple[int, object]] = []  # (number of prompts, params)

    def generate(self, prompt_ids, params):
        self.calls.append((len(prompt_ids), params))
        out = []
        for ids in prompt_ids:
            text = self.policy(self.tokenizer.decode(ids))
            tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            out.append([Completion(tokens, text, "stop", [-0.5] * len(tokens)) for _ in range(params.n)])
        return out

    def update_weights(self, model, version):
        self.weight_version = version

    def sleep(self):
        pass

    def wake_up(self):
        pass
