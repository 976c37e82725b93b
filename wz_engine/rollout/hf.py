"""The `hf` sampler: transformers `generate` on the live training module.

The sampler holds a reference to the very module being trained, so the weights are shared with
zero copies and `update_weights` is a no-op. Prompts are left-padded into one batch. When the
module is sharded with FSDP2, every shard is gathered for the whole `generate` call (see
`wz_engine.distributed.gathered_for_generation`): ranks then sample independently with no
collectives, so they may stop after different numbers of decode steps without deadlocking.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from wz_engine.rollout.base import Completion, SamplingParams


class HFSampler:
    """Sampler protocol over a transformers causal LM (`model.generate`).

    Args:
        model: the causal LM to sample from (the live training module, possibly FSDP2-sharded).
        tokenizer: decodes completions; its `eos_token_id` always ends a completion and its
            `pad_token_id` (or EOS when it has none) pads the prompt batch on the left.
        gather: optional context-manager factory entered around `generate` (e.g. FSDP2 unshard).
        seed: seed of the sampler's own generator, used when `SamplingParams.seed` is None.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        gather: Callable[[], contextlib.AbstractContextManager] | None = None,
        seed: int = 0,
    ):
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer: has no eos_token_id; the sampler needs one to stop completions")
        self.model = model
        self.tokenizer = tokenizer
        self.gather = gather or contextlib.nullcontext
        self.weight_version = 0
        self._generator = torch.Generator().manual_seed(seed)

    # -- Sampler protocol -------------------------------------------------------------------
    def update_weights(self, model: torch.nn.Module, version: int) -> None:
        """The weights are the live module's: nothing to copy, only the version tag moves."""
        self.weight_version = version

    def sleep(self) -> None:
        pass

    def wake_up(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"generator": self._generator.get_state(), "weight_version": self.weight_version}

    def load_state_dict(self, state: dict) -> None:
        self._generator.set_state(state["generator"])
        self.weight_version = state["weight_version"]

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        if len(prompt_ids) == 0:
            return []
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("prompt_ids: every prompt needs at least one token")
        if params.n < 1 or params.max_new_tokens < 1:
            raise ValueError(f"params: n and max_new_tokens must be >= 1, got {params.n}, {params.max_new_tokens}")
        device = _device_of(self.model)
        input_ids, attention_mask = self._left_pad(prompt_ids, device)
        stop_ids = self._stop_ids(params)
        seed = params.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._generator))

        was_training = self.model.training
        self.model.eval()
        fork_devices = [device] if device.type == "cuda" else []
        try:
            with self.gather(), torch.random.fork_rng(devices=fork_devices):
                torch.manual_seed(seed)
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=self._generation_config(params, stop_ids),
                    # transformers turns this on for FSDP modules (an all-reduce per decode step so
                    # ranks stop together); with the shards gathered, each rank decodes on its own.
                    synced_gpus=False,
                )
        finally:
            self.model.train(was_training)

        new_tokens = out.sequences[:, input_ids.shape[1] :]  # [P*n, T]
        token_logprobs = None
        if params.return_logprobs:
            # out.scores are the logits after the same processors (temperature, top-k, top-p)
            # that sampling used, so their log-softmax is the sampling distribution.
            scores = torch.stack(out.scores, dim=1).float()  # [P*n, T, V]
            token_logprobs = torch.log_softmax(scores, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)

        results: list[list[Completion]] = []
        for i in range(len(prompt_ids)):
            group = []
            for j in range(params.n):
                row = i * params.n + j
                ids = new_tokens[row].tolist()
                cut, reason = _cut_at_stop(ids, stop_ids)
                ids = ids[:cut]
                lps = token_logprobs[row, :cut].tolist() if token_logprobs is not None else None
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                group.append(Completion(ids, text, reason, lps, self.weight_version))
            results.append(group)
        return results

    # -- helpers ----------------------------------------------------------------------------
    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def _stop_ids(self, params: SamplingParams) -> list[int]:
        ids = [self.tokenizer.eos_token_id, *params.stop_token_ids]
        return list(dict.fromkeys(ids))

    def _left_pad(self, prompt_ids, device):
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for i, p in enumerate(prompt_ids):
            ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
        return ids.to(device), mask.to(device)

    def _generation_config(self, params: SamplingParams, stop_ids: list[int]):
        from transformers import GenerationConfig

        greedy = params.temperature == 0
        # A fresh config: the model's own generation_config may carry defaults (top_k=50,
        # repetition penalty, ...) that would change the sampling distribution silently.
        return GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p,
            top_k=None if greedy else params.top_k,
            num_return_sequences=params.n,
            eos_token_id=stop_ids,
            pad_token_id=self._pad_id(),
            output_scores=params.return_logprobs,
            return_dict_in_generate=True,
            use_cache=True,
        )


def _cut_at_stop(ids: list[int], stop_ids: list[int]) -> tuple[int, str]:
    """Length to keep (the stop token included) and the finish reason."""
    stops = set(stop_ids)
    for k, t in enumerate(ids):
        if t in stops:
            return k + 1, "stop"
    return len(ids), "length"


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
