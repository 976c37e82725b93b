"""The sampler interface: what the trainer and the GenRM judge ask of a generation engine.

Two implementations: `hf` (transformers `generate` on the live training module: weights shared
with zero copies; the CPU default) and `vllm` (an in-process engine; weights pushed each step).
Both take token ids (prompts are rendered with the chat template by the caller) and return, for
each prompt, `params.n` completions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    """Generation stops after this many new tokens (finish_reason "length")."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k."""
    n: int = 1
    """Completions per prompt (the group size G for GRPO-family estimators)."""
    seed: int | None = None
    """Seed for this call; None draws from the sampler's own generator."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra tokens that end a completion (the tokenizer's EOS always does)."""
    return_logprobs: bool = False
    """Return the engine's log-probability of each sampled token (for rollout correction)."""


@dataclass
class Completion:
    token_ids: list[int]
    """Generated tokens, the stop token included when one was produced."""
    text: str
    """Decoded text, special tokens skipped."""
    finish_reason: str
    """"stop" (EOS / stop token) or "length" (hit max_new_tokens)."""
    logprobs: list[float] | None = None
    """Engine log-probability of each token in `token_ids` (when asked for)."""
    weight_version: int = 0
    """Version of the weights that produced it; the trainer checks it against its own."""
    extra: dict = field(default_factory=dict)


@runtime_checkable
class Sampler(Protocol):
    weight_version: int

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        """Sample `params.n` completions for each prompt: result[i][j] is prompt i, sample j."""
        ...

    def update_weights(self, model: torch.nn.Module, version: int) -> None:
        """Make the engine serve `model`'s current weights, tagged `version` (no-op for `hf`)."""
        ...

    def sleep(self) -> None:
        """Release engine memory (KV cache, weights copy) while the trainer runs; no-op for `hf`."""
        ...

    def wake_up(self) -> None:
        ...
