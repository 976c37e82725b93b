"""A Sampler that answers from a Python function: exact judge outputs for tests and dry runs.

`respond(prompt_text, sample_index) -> str` sees the decoded prompt (the rendered judge prompt), so a
script can answer by content ("which response is shown as A?"). Every generate call is recorded.
"""

from __future__ import annotations

from typing import Callable, Sequence

from wz_engine.rollout.base import Completion, SamplingParams


class ScriptedSampler:
    def __init__(self, tokenizer, respond: Callable[[str, int], str]):
        self.tokenizer = tokenizer
        self.respond = respond
        self.weight_version = 0
        self.calls: list[tuple[int, SamplingParams]] = []
        """(number of prompts, params) of every generate call."""

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        self.calls.append((len(prompt_ids), params))
        out = []
        for ids in prompt_ids:
            prompt = self.tokenizer.decode(list(ids), skip_special_tokens=False)
            group = []
            for j in range(params.n):
                text = self.respond(prompt, j)
                tokens = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                group.append(Completion(tokens, text, "stop", None, self.weight_version))
            out.append(group)
        return out

    def update_weights(self, model, version: int) -> None:
        self.weight_version = version

    def sleep(self) -> None:
        pass

    def wake_up(self) -> None:
        pass
