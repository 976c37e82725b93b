"""The vllm sampler's call sequence, weight versions and judge modes, against a STAND-IN engine.

vLLM cannot run on these machines, so `StandInLLM` implements exactly the vLLM surface the adapter
calls (`VLLM_API` in wz_engine/rollout/vllm.py: LLM.generate/sleep/wake_up/reset_prefix_cache/
apply_model, SamplingParams, LoRARequest, RequestOutput/CompletionOutput/Logprob) and emulates
the behaviour that matters for correctness, modelled on vllm 0.31.0's gpu_worker.sleep/wake_up:
  - sleep(level=1) backs the weights up to the host and unmaps them; wake_up(["weights"]) copies
    the backup back (so waking AFTER a sync would silently restore stale weights: vLLM #29341);
  - sleep(level=2) drops the weights (garbage = NaN here) and the KV cache;
  - generate on an engine with a sleeping part fails (vLLM would crash or produce garbage);
  - the sampled tokens are a function of the engine weights, so a wrong sync changes them.
`test_standin_surface_is_the_vllm_api_table` ties the stand-in to VLLM_API, and
test_vllm_conformance.py ties VLLM_API to the real vllm package where it is installed.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, fields

import pytest
import torch
from safetensors.torch import save_file

from wz_engine.rollout.base import Completion, SamplingParams
from wz_engine.rollout.vllm import VLLM_API, VLLMApi, VLLMSampler, assert_weight_version, engine_kwargs
from wz_engine.rollout.vllm_config import VLLMConfig

VOCAB = 97


# ---------------------------------------------------------------------- the stand-in


@dataclass
class StandInSamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int | None = 16
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    logprobs: int | None = None
    skip_special_tokens: bool = True


@dataclass
class StandInLoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str = ""


@dataclass
class StandInLogprob:
    logprob: float


@dataclass
class StandInCompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, StandInLogprob]] | None
    finish_reason: str | None


@dataclass
class StandInRequestOutput:
    outputs: list[StandInCompletionOutput]


class StandInModel(torch.nn.Module):
    """The engine's copy of the model: HF names, engine dtype; `load_weights` copies by name."""

    def __init__(self, shapes: dict[str, tuple], dtype):
        super().__init__()
        self.weights = {n: torch.zeros(s, dtype=dtype) for n, s in shapes.items()}
        self.load_calls = 0

    def load_weights(self, weights):
        loaded = set()
        for name, tensor in weights:
            self.weights[name].copy_(tensor)  # KeyError on a name the model does not have, like vLLM
            loaded.add(name)
        self.load_calls += 1
        return loaded


def tiny_shapes():
    return {"model.embed_tokens.weight": (11, 8), "model.layers.0.weight": (8, 8), "model.layers.0.bias": (8,),
            "model.norm.weight": (8,)}


class StandInLLM:
    def __init__(self, model: str, *, tokenizer: str | None = None, tensor_parallel_size: int = 1,
                 dtype: str = "auto", seed: int = 0,
                 gpu_memory_utilization: float = 0.92, enforce_eager: bool = False, **kwargs):
        unknown = set(kwargs) - set(VLLM_API["EngineArgs"])
        assert not unknown, f"adapter passed engine args outside VLLM_API: {unknown}"
        self.kwargs = dict(model=model, tokenizer=tokenizer, tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                           seed=seed, gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                           **kwargs)
        self.model = StandInModel(tiny_shapes(), getattr(torch, dtype))
        self.calls: list[tuple] = []
        self.sleeping: set[str] = set()
        self._backup: dict[str, torch.Tensor] | None = None
        self.generate_requests = []

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None, priority=None):
        self.calls.append(("generate", lora_request))
        if self.sleeping:
            raise RuntimeError(f"stand-in: generate while {self.sleeping} asleep")
        fingerprint = sum(float(w.double().sum()) for w in self.model.weights.values())
        if fingerprint != fingerprint:
            raise RuntimeError("stand-in: generate on discarded (garbage) weights")
        self.generate_requests.append((prompts, sampling_params, lora_request))
        lora_shift = 0 if lora_request is None else 1000 * lora_request.lora_int_id
        results = []
        for prompt, sp in zip(prompts, sampling_params):
            base = int(round(fingerprint * 1000)) + sum(prompt["prompt_token_ids"]) + lora_shift + (sp.seed or 0)
            outs = []
            for j in range(sp.n):
                toks = [(base + 7 * j + k) % VOCAB for k in range(sp.max_tokens)]
                lps = [{t: StandInLogprob(-0.01 * (k + 1))} for k, t in enumerate(toks)] if sp.logprobs == 0 else None
                outs.append(StandInCompletionOutput(j, " ".join(map(str, toks)), toks, lps, "length"))
            results.append(StandInRequestOutput(outs))
        return results

    def sleep(self, level: int = 1, mode: str = "abort"):
        self.calls.append(("sleep", level))
        if level == 1:
            self._backup = {n: w.clone() for n, w in self.model.weights.items()}
        else:
            self._backup = None
        for w in self.model.weights.values():
            w.fill_(float("nan"))  # unmapped / discarded device memory
        self.sleeping = {"weights", "kv_cache"}

    def wake_up(self, tags: list[str] | None = None):
        tags = ["weights", "kv_cache"] if tags is None else tags
        self.calls.append(("wake_up", tuple(tags)))
        if "weights" in tags and "weights" in self.sleeping and self._backup is not None:
            for n, w in self.model.weights.items():
                w.copy_(self._backup[n])  # vLLM restores its host copy on wake
        self.sleeping -= set(tags)

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False):
        self.calls.append(("reset_prefix_cache",))
        return True

    def apply_model(self, func):
        self.calls.append(("apply_model",))
        return [func(self.model)]


STANDIN_API = VLLMApi(StandInLLM, StandInSamplingParams, StandInLoRARequest)


# ---------------------------------------------------------------------- helpers


class TrainerModel(torch.nn.Module):
    """The trainer's module: same HF names as the engine's model, fp32."""

    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(11, 8)
        self.model.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8)])
        self.model.norm = torch.nn.Module()
        self.model.norm.weight = torch.nn.Parameter(torch.ones(8))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))


def _checkpoint(path, seed, **config):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"architectures": ["TinyForCausalLM"], "hidden_size": 8,
                                                  "num_hidden_layers": 1, "vocab_size": 11, **config}))
    m = TrainerModel(seed)
    save_file({n: p.detach().clone() for n, p in m.named_parameters()}, str(path / "model.safetensors"))
    return str(path)


def _sampler(tmp_path, **cfg):
    policy_dir = _checkpoint(tmp_path / "policy", 0)
    config = VLLMConfig(**{"bucket_size_mb": 1, **cfg})
    return VLLMSampler(config, policy_dir, api=STANDIN_API, device="cpu")


def _engine_equals(sampler, model, dtype=torch.bfloat16):
    w = sampler.llm.model.weights
    return all(torch.equal(w[n], p.detach().to(dtype)) for n, p in model.named_parameters())


PARAMS = SamplingParams(max_new_tokens=4, n=2, seed=5, return_logprobs=True)


# ---------------------------------------------------------------------- tests


def test_standin_surface_is_the_vllm_api_table():
    def kw(obj):
        params = inspect.signature(obj).parameters
        return {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"}

    assert set(VLLM_API["LLM.__init__"]) <= kw(StandInLLM.__init__)
    for method in ("generate", "sleep", "wake_up", "reset_prefix_cache", "apply_model"):
        assert set(VLLM_API[f"LLM.{method}"]) <= kw(getattr(StandInLLM, method)), method
    assert set(VLLM_API["SamplingParams"]) == {f.name for f in fields(StandInSamplingParams)}
    assert set(VLLM_API["LoRARequest"]) == {f.name for f in fields(StandInLoRARequest)}
    cfg = VLLMConfig(judge_mode="lora", judge_lora_path="/x", max_num_batched_tokens=512)
    keys = set(engine_kwargs(cfg, "m", 0))
    assert keys <= set(VLLM_API["LLM.__init__"]) | set(VLLM_API["EngineArgs"])


@pytest.mark.parametrize("level", [1, 2])
def test_step_call_sequence_and_weights(tmp_path, level):
    sampler = _sampler(tmp_path, sleep_level=level)
    llm = sampler.llm
    assert llm.kwargs["distributed_executor_backend"] == "external_launcher"
    assert llm.kwargs["enable_sleep_mode"] is True and llm.kwargs["seed"] == 0
    assert llm.calls == [("sleep", level)]  # memory handed to the trainer right after construction

    model = TrainerModel(1)
    for step in (1, 2):
        llm.calls.clear()
        sampler.update_weights(model, step)
        buckets = llm.model.load_calls
        assert llm.calls[0] == ("wake_up", ("weights",))
        assert llm.calls[1:-2] == [("apply_model",)] * (len(llm.calls) - 3)
        assert llm.calls[-2:] == [("reset_prefix_cache",), ("wake_up", ("kv_cache",))]
        assert _engine_equals(sampler, model), "engine does not hold the trainer's weights after the sync"
        groups = sampler.generate([[1, 2, 3], [4]], PARAMS)
        assert_weight_version(groups, step)
        assert [len(g) for g in groups] == [2, 2]
        assert all(isinstance(c, Completion) and len(c.token_ids) == 4 and len(c.logprobs) == 4
                   for g in groups for c in g)
        sampler.sleep()
        assert llm.calls[-1] == ("sleep", level)
        with torch.no_grad():  # the optimizer step
            for p in model.parameters():
                p.add_(0.5)
    assert buckets >= 1 and sampler.sync_count == 2
    assert sampler.last_sync.nbytes == sum(p.numel() * 2 for p in model.parameters())


def test_standin_catches_waking_weights_after_the_sync(tmp_path):
    """Non-vacuity: pushing BEFORE waking a level-1 sleep loses the new weights in the stand-in
    (as in vLLM), so the ordering test above can fail."""
    sampler = _sampler(tmp_path, sleep_level=1)
    model = TrainerModel(1)
    sampler.update_weights(model, 1)
    sampler.sleep()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    sampler.syncer.sync(sampler._source, sampler._load)  # wrong order: load while asleep ...
    sampler.llm.wake_up(tags=["weights"])  # ... then wake: the old host copy comes back
    assert not _engine_equals(sampler, model)


def test_generate_refuses_discarded_or_missing_weights(tmp_path):
    sampler = _sampler(tmp_path, sleep_level=2, load_format="dummy")
    assert sampler.weight_version == -1  # the trainer's `weight_version != step` check triggers a sync
    with pytest.raises(RuntimeError, match="no valid weights"):
        sampler.generate([[1]], PARAMS)
    with pytest.raises(RuntimeError, match="no valid weights"):
        sampler.wake_up()
    model = TrainerModel(2)
    sampler.update_weights(model, 7)
    sampler.sleep()
    assert sampler.weight_version == -1
    with pytest.raises(RuntimeError, match="update_weights"):
        sampler.generate([[1]], PARAMS)
    sampler.update_weights(model, 8)
    groups = sampler.generate([[1]], PARAMS)
    with pytest.raises(RuntimeError, match="version 8.*version 9"):
        assert_weight_version(groups, 9)


def test_level1_sleep_keeps_weights_and_generate_wakes(tmp_path):
    sampler = _sampler(tmp_path, sleep_level=1)
    assert sampler.weight_version == -1  # disk weights are usable but carry no version: sync first
    sampler.wake_up()
    assert_weight_version(sampler.generate([[1]], PARAMS), -1)
    model = TrainerModel(2)
    sampler.update_weights(model, 3)
    sampler.sleep()
    assert sampler.weight_version == 3
    groups = sampler.generate([[1]], PARAMS)  # wakes both tags: the host copy is the last synced version
    assert sampler.llm.calls[-3:] == [("wake_up", ("weights",)), ("wake_up", ("kv_cache",)), ("generate", None)]
    assert _engine_equals(sampler, model)
    assert_weight_version(groups, 3)


def test_sampling_params_seeds_and_logprobs(tmp_path):
    sampler = _sampler(tmp_path, enable_sleep_mode=False)
    sampler.update_weights(TrainerModel(3), 1)
    params = SamplingParams(max_new_tokens=3, temperature=0.7, top_p=0.9, top_k=5, n=3, seed=11,
                            stop_token_ids=(2,), return_logprobs=True)
    a = sampler.generate([[1], [1], [2, 3]], params)
    prompts, sps, lora = sampler.llm.generate_requests[-1]
    assert prompts == [{"prompt_token_ids": [1]}, {"prompt_token_ids": [1]}, {"prompt_token_ids": [2, 3]}]
    assert lora is None
    sp = sps[0]
    assert (sp.n, sp.temperature, sp.top_p, sp.top_k, sp.max_tokens, sp.stop_token_ids, sp.logprobs) == \
        (3, 0.7, 0.9, 5, 3, [2], 0)
    assert len({s.seed for s in sps}) == 3  # one seed per request: identical prompts still differ
    assert a[0][0].token_ids != a[1][0].token_ids
    assert a == sampler.generate([[1], [1], [2, 3]], params)  # reproducible
    assert a[0][0].logprobs == pytest.approx([-0.01, -0.02, -0.03])
    no_lp = sampler.generate([[1]], SamplingParams(max_new_tokens=2))
    assert no_lp[0][0].logprobs is None and sampler.llm.generate_requests[-1][1][0].logprobs is None
    assert sampler.llm.generate_requests[-1][1][0].seed is None


def test_aborted_request_is_an_error(tmp_path, monkeypatch):
    sampler = _sampler(tmp_path, enable_sleep_mode=False)
    sampler.update_weights(TrainerModel(3), 1)
    real = sampler.llm.generate

    def aborted(*args, **kwargs):
        out = real(*args, **kwargs)
        out[0].outputs[0].finish_reason = "abort"
        return out

    monkeypatch.setattr(sampler.llm, "generate", aborted)
    with pytest.raises(RuntimeError, match="abort"):
        sampler.generate([[1]], PARAMS)


def test_lora_judge_bookkeeping(tmp_path):
    sampler = _sampler(tmp_path, sleep_level=2, judge_mode="lora", judge_lora_path="/adapters/judge")
    assert sampler.llm.kwargs["enable_lora"] is True and sampler.llm.kwargs["max_loras"] == 1
    judge = sampler.judge_sampler()
    assert judge is sampler.judge_sampler()
    model = TrainerModel(4)
    sampler.update_weights(model, 1)
    policy_out = sampler.generate([[1]], PARAMS)
    judge_out = judge.generate([[1]], PARAMS)
    req = sampler.llm.generate_requests[-1][2]
    assert (req.lora_name, req.lora_int_id, req.lora_path) == ("wz_judge_1", 1, "/adapters/judge")
    assert sampler.llm.generate_requests[-2][2] is None  # rollouts never carry the adapter
    assert policy_out != judge_out and judge.weight_version == 1
    sampler.sleep()  # level 2 discards GPU memory: the adapter is re-registered under a new id
    sampler.update_weights(model, 2)
    judge.generate([[1]], PARAMS)
    assert sampler.llm.generate_requests[-1][2].lora_int_id == 2


def test_lora_level1_keeps_adapter_id(tmp_path):
    sampler = _sampler(tmp_path, sleep_level=1, judge_mode="lora", judge_lora_path="/a")
    judge = sampler.judge_sampler()
    sampler.update_weights(TrainerModel(4), 1)
    sampler.sleep()
    sampler.update_weights(TrainerModel(4), 2)
    judge.generate([[1]], PARAMS)
    assert sampler.llm.generate_requests[-1][2].lora_int_id == 1


def test_swap_judge_bookkeeping(tmp_path):
    judge_dir = _checkpoint(tmp_path / "judge", 99)
    sampler = _sampler(tmp_path, sleep_level=2, judge_mode="swap", judge_checkpoint=judge_dir)
    judge = sampler.judge_sampler()
    policy, judge_model = TrainerModel(5), TrainerModel(99)
    with pytest.raises(RuntimeError, match="update_weights first"):
        judge.generate([[1]], PARAMS)
    for step in (1, 2):
        sampler.update_weights(policy, step)
        rollouts = sampler.generate([[1]], PARAMS)
        assert_weight_version(rollouts, step)
        sampler.llm.calls.clear()
        verdicts = judge.generate([[1]], PARAMS)
        assert _engine_equals(sampler, judge_model), "judge weights not in the engine"
        calls = sampler.llm.calls  # engine still awake after the rollouts: push, reset, generate
        assert calls[:-2] == [("apply_model",)] * (len(calls) - 2) and len(calls) > 2
        assert calls[-2:] == [("reset_prefix_cache",), ("generate", None)]
        judge.generate([[2]], PARAMS)  # same step: no second push
        assert judge.swaps == step and sampler.serving == "judge"
        assert verdicts[0][0].weight_version == 0 and rollouts != verdicts
        assert sampler.weight_version == -1  # the policy is not in the engine: the trainer must sync
        with pytest.raises(RuntimeError, match="judge's weights"):
            sampler.generate([[1]], PARAMS)
        sampler.sleep()
    sampler.update_weights(policy, 3)  # the next sync restores the policy
    assert _engine_equals(sampler, policy) and sampler.serving == "policy"
    assert sampler.last_swap.nbytes == sampler.last_sync.nbytes
    assert judge.packed is not None and judge.host == {}  # one packed host copy kept, pinned on CUDA


def test_swap_rejects_another_architecture_or_layout(tmp_path):
    other = _checkpoint(tmp_path / "other", 1, hidden_size=16)
    with pytest.raises(ValueError, match="hidden_size"):
        _sampler(tmp_path, judge_mode="swap", judge_checkpoint=other).judge_sampler()
    (tmp_path / "t2").mkdir()
    odd = tmp_path / "t2" / "odd"
    _checkpoint(odd, 1)
    save_file({"model.embed_tokens.weight": torch.zeros(11, 8)}, str(odd / "model.safetensors"))
    sampler = _sampler(tmp_path / "t2", judge_mode="swap", judge_checkpoint=str(odd))
    judge = sampler.judge_sampler()
    sampler.update_weights(TrainerModel(1), 1)
    with pytest.raises(ValueError, match="missing"):
        judge.generate([[1]], PARAMS)
