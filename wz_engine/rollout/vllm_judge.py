"""The GenRM's views of the one vLLM engine (`VLLMSampler.judge_sampler`), per `judge_mode`:

    "lora"  LoRAJudge: the judge is a LoRA adapter over the synced policy weights (a LoRARequest per call)
    "swap"  SwapJudge: the judge's own checkpoint (same architecture) in pinned host buckets, pushed into the
            engine before judging; the next `update_weights` restores the policy
    "self"  the sampler itself (no view)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from wz_engine.rollout.base import Completion, SamplingParams

if TYPE_CHECKING:
    from wz_engine.rollout.vllm import VLLMSampler

JUDGE_LORA_NAME = "wz_judge"


class JudgeView:
    """A judge view of the sampler: generates with the judge's weights or adapter."""

    def __init__(self, sampler: VLLMSampler):
        self.sampler = sampler

    @property
    def weight_version(self) -> int:
        return self.sampler.weight_version

    def update_weights(self, model, version: int) -> None:
        self.sampler.update_weights(model, version)

    def sleep(self) -> None:
        self.sampler.sleep()

    def wake_up(self) -> None:
        self.sampler.wake_up()

    def on_weights_discarded(self) -> None:
        pass


class LoRAJudge(JudgeView):
    """The judge is a LoRA adapter over the engine's (synced policy) base weights.

    A level-2 sleep discards the engine's GPU memory; whether vLLM's adapter cache survives it is
    not verified, so after one the adapter is re-registered under a fresh `lora_int_id` (vLLM then
    loads it again from `judge_lora_path`, a few MB).
    """

    def __init__(self, sampler: VLLMSampler):
        super().__init__(sampler)
        self.lora_int_id = 1
        self.request = self._make_request()

    def _make_request(self):
        return self.sampler.api.LoRARequest(lora_name=f"{JUDGE_LORA_NAME}_{self.lora_int_id}",
                                            lora_int_id=self.lora_int_id,
                                            lora_path=self.sampler.config.judge_lora_path)

    def on_weights_discarded(self) -> None:
        self.lora_int_id += 1
        self.request = self._make_request()

    def generate(self, prompt_ids, params: SamplingParams) -> list[list[Completion]]:
        self.sampler._ready("policy")  # the adapter applies over the policy's base weights
        return self.sampler._generate(prompt_ids, params, lora_request=self.request)


def _read_config(path: str, what: str) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ValueError(f"{what}: {path!r} has no config.json (swap mode needs local checkpoint directories)")
    return json.loads(file.read_text())


ARCH_KEYS = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "intermediate_size", "vocab_size", "tie_word_embeddings", "head_dim")


def check_same_architecture(policy_config: dict, judge_config: dict) -> None:
    """Raise ValueError naming every differing key (swap pushes the judge into the policy's engine)."""
    diffs = [f"{k}: policy {policy_config.get(k)!r} vs judge {judge_config.get(k)!r}"
             for k in ARCH_KEYS if policy_config.get(k) != judge_config.get(k)]
    if diffs:
        raise ValueError("judge_checkpoint: judge_mode='swap' needs the policy's architecture; " + "; ".join(diffs))


def load_host_weights(path: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint directory, on the host."""
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"judge_checkpoint: no *.safetensors files in {path!r}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


class SwapJudge(JudgeView):
    """The judge's own checkpoint (same architecture), kept packed in pinned host buckets and pushed
    into the engine before judging; the next `update_weights` restores the policy."""

    def __init__(self, sampler: VLLMSampler):
        super().__init__(sampler)
        cfg = sampler.config
        check_same_architecture(_read_config(sampler.model_path, "model_path"),
                                _read_config(cfg.judge_checkpoint, "judge_checkpoint"))
        self.host = load_host_weights(cfg.judge_checkpoint)
        self.packed = None  # built at the first swap, once the policy's parameter list is known
        self.swaps = 0

    @property
    def weight_version(self) -> int:
        return 0  # the judge checkpoint never changes

    def _pack(self) -> None:
        policy = self.sampler._policy_specs
        if policy is None:
            raise RuntimeError("judge generate: swap mode needs one update_weights first (it defines the layout)")
        judge_names = set(self.host)
        missing = [s.name for s in policy if s.name not in judge_names]
        shapes = [s.name for s in policy if s.name in judge_names and tuple(self.host[s.name].shape) != s.shape]
        if missing or shapes:
            raise ValueError(f"judge_checkpoint: does not match the policy's parameters (missing {missing[:3]}, "
                             f"shape mismatch {shapes[:3]})")
        self.packed = self.sampler.syncer.pack_host(policy, self.host)
        self.host = {}  # the packed buckets are the only copy kept

    def generate(self, prompt_ids, params: SamplingParams) -> list[list[Completion]]:
        s = self.sampler
        if s.serving != "judge":
            if self.packed is None:
                self._pack()
            s._wake(["weights"])
            s.last_swap = s.syncer.push_packed(self.packed, s._load)
            s.syncer.release()
            s.llm.reset_prefix_cache()
            s.serving = "judge"
            s.weights_valid = True
            s.weight_version = -1  # the policy is no longer in the engine
            self.swaps += 1
            s._wake(["kv_cache"])
        s._ready("judge")
        return s._generate(prompt_ids, params, lora_request=None, version=self.weight_version)
