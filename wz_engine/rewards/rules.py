"""Pointwise rule rewards given by import path: `reward(prompt, response, reference) -> float`."""

from __future__ import annotations

from typing import Callable, Sequence


class RuleReward:
    """Pointwise reward `fn(prompt, response, reference) -> float` (a function or `pkg.module:function`)."""

    def __init__(self, fn: Callable | str):
        if isinstance(fn, str):
            from wz_engine.judge.programmatic import load_callable

            fn = load_callable(fn)
        self.fn = fn

    def score(self, prompts: Sequence[str], responses: Sequence[str], references: Sequence[str | None]) -> list[float]:
        return [float(self.fn(p, r, ref)) for p, r, ref in zip(prompts, responses, references)]
