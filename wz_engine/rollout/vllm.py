"""The `vllm` sampler: a vLLM engine inside each torchrun process, sharing the GPU with training.

One engine per process (vLLM allows one sleep-mode engine per process, vLLM #18975), built with
`distributed_executor_backend="external_launcher"` so it joins the torchrun world instead of
spawning workers. The step's call sequence, and why each call is where it is:

    update_weights(model, v):  torch.cuda.empty_cache()        # PyTorch's cache holds memory vLLM can't see
                               llm.wake_up(tags=["weights"])   # wake BEFORE pushing: a later wake of a
                                                               # level-1 sleep would restore the old CPU
                                                               # copy over the new weights (vLLM #29341)
                               bucketed push -> model.load_weights (never a reload from disk)
                               llm.reset_prefix_cache()        # no KV computed with the old weights
                               torch.cuda.empty_cache(); llm.wake_up(tags=["kv_cache"])
    generate(...)              wakes a level-1 sleep; refuses discarded or judge weights; every
                               Completion carries v (weight_version is -1 whenever the engine holds
                               no policy weights, so `weight_version != step` tells the trainer to sync)
    judge_sampler().generate   "self": same engine; "lora": LoRARequest; "swap": judge weights pushed
                               from pinned host buckets (the next update_weights restores the policy)
    sleep()                    llm.sleep(level=sleep_level)

The vLLM API this module uses is listed in `VLLM_API` and was read in the vllm 0.31.0 wheel:
vllm/entrypoints/llm.py (LLM.__init__/generate/sleep/wake_up/reset_prefix_cache/apply_model),
vllm/v1/engine/llm_engine.py (apply_model -> collective_rpc("apply_model")),
vllm/v1/worker/worker_base.py (Worker.apply_model: fn(self.get_model())),
vllm/v1/executor/uniproc_executor.py (ExecutorWithExternalLauncher runs in-process:
run_method calls the function directly, so the bucket views are passed without pickling),
vllm/config/parallel.py (external_launcher sets VLLM_ENABLE_V1_MULTIPROCESSING=0),
vllm/engine/arg_utils.py (EngineArgs fields), vllm/sampling_params.py, vllm/lora/request.py,
vllm/outputs.py and vllm/logprobs.py (CompletionOutput.logprobs: per position a mapping
token id -> Logprob with `.logprob`). TRL 1.16 (trl/generation/vllm_generation.py) follows the same
wake-weights / load_weights / reset_prefix_cache / wake-kv order through
`llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights`; we use the public
`LLM.apply_model` instead. tests/engine/test_vllm_conformance.py checks the installed vllm against
`VLLM_API` (skipped where vllm is absent); it passed on vllm 0.28.0, 0.31.0 and 0.32.0 (Python API
only, in a throwaway CPU venv: no engine was built, nothing here has run on a GPU yet).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from wz_engine.rollout.base import Completion, SamplingParams
from wz_engine.rollout.vllm_config import VLLMConfig, check_vllm_install
from wz_engine.sync import ModuleWeightSource, ParamSpec, SyncStats, WeightSyncer

# Every vLLM class / method / keyword used below: name -> keywords (EngineArgs fields for LLM kwargs).
VLLM_API: dict[str, tuple[str, ...]] = {
    "LLM.__init__": ("model", "tokenizer", "tensor_parallel_size", "dtype", "seed", "gpu_memory_utilization",
                     "enforce_eager"),
    "EngineArgs": ("distributed_executor_backend", "enable_sleep_mode", "max_model_len", "max_num_seqs",
                   "max_num_batched_tokens", "enable_prefix_caching", "load_format", "logprobs_mode",
                   "enable_lora", "max_lora_rank", "max_loras"),
    "LLM.generate": ("prompts", "sampling_params", "use_tqdm", "lora_request"),
    "LLM.sleep": ("level",),
    "LLM.wake_up": ("tags",),
    "LLM.reset_prefix_cache": (),
    "LLM.apply_model": ("func",),
    "SamplingParams": ("n", "temperature", "top_p", "top_k", "max_tokens", "seed", "stop_token_ids", "logprobs",
                       "skip_special_tokens"),
    "LoRARequest": ("lora_name", "lora_int_id", "lora_path"),
}

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class VLLMApi:
    """The three vLLM names the sampler constructs. Tests pass a stand-in with the same surface."""

    LLM: Any
    SamplingParams: Any
    LoRARequest: Any


def load_vllm_api() -> VLLMApi:
    """Import vLLM after the config-time version check (so a bad install fails with a clear message)."""
    check_vllm_install()
    from vllm import LLM
    from vllm import SamplingParams as VSamplingParams
    from vllm.lora.request import LoRARequest

    return VLLMApi(LLM, VSamplingParams, LoRARequest)


def engine_kwargs(config: VLLMConfig, model_path: str, seed: int, tokenizer_path: str | None = None) -> dict:
    """Keyword arguments of `vllm.LLM` for one colocated engine (see VLLM_API)."""
    kwargs = dict(
        model=model_path,
        tokenizer=tokenizer_path,  # None: the tokenizer in model_path
        tensor_parallel_size=config.tensor_parallel_size,
        dtype=config.dtype,
        seed=seed,
        gpu_memory_utilization=config.gpu_memory_utilization,
        enforce_eager=config.enforce_eager,
        distributed_executor_backend="external_launcher",
        enable_sleep_mode=config.enable_sleep_mode,
        max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs,
        enable_prefix_caching=config.enable_prefix_caching,
        load_format=config.load_format,
        # Log-probs after temperature / top-p processing: the distribution tokens were drawn from,
        # which is what the IS correction compares with (TRL sets the same).
        logprobs_mode="processed_logprobs",
    )
    if config.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = config.max_num_batched_tokens
    if config.judge_mode == "lora":
        kwargs.update(enable_lora=True, max_lora_rank=config.max_lora_rank, max_loras=1)
    kwargs.update(config.extra_engine_kwargs or {})
    return kwargs


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def request_seed(seed: int, dp_rank: int, prompt_index: int) -> int:
    """Distinct, reproducible per-request seed (one shared seed would give every prompt the same noise)."""
    return (seed * 1_000_003 + dp_rank * 65_537 + prompt_index) % (2**31 - 1)


def assert_weight_version(groups: Sequence[Sequence[Completion]], expected: int) -> None:
    """The trainer's check: every completion was produced by weights of version `expected`."""
    for i, group in enumerate(groups):
        for c in group:
            if c.weight_version != expected:
                raise RuntimeError(f"rollout {i} was sampled with weight version {c.weight_version}, "
                                   f"the trainer is at version {expected}: a weight sync was skipped")


class VLLMSampler:
    """`Sampler` on a colocated vLLM engine (see the module doc for the call sequence)."""

    def __init__(self, config: VLLMConfig, model_path: str, *, tokenizer_path: str | None = None,
                 api: VLLMApi | None = None, device: torch.device | str | None = None):
        """model_path: HF directory (config.json; weights unless load_format="dummy") the engine is built
        from; tokenizer_path: its tokenizer when not in model_path. api: None imports vLLM (after the
        version check); tests pass a stand-in. device: where sync buckets are built (default: cuda)."""
        self.config = config
        self.model_path = model_path
        self.api = api if api is not None else load_vllm_api()
        self.rank, self.world_size = _dist_rank_world()
        tp = config.tensor_parallel_size
        if self.world_size % tp:
            raise ValueError(f"tensor_parallel_size={tp}: must divide the world size {self.world_size}")
        self.dp_rank = self.rank // tp
        self._tp_group = self._make_tp_group(tp)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = _TORCH_DTYPES.get(config.dtype)  # None ("auto"): keep the trainer's dtype
        self.syncer = WeightSyncer(config.bucket_size_bytes, self.device)
        self.llm = self.api.LLM(**engine_kwargs(config, model_path, config.seed + self.dp_rank, tokenizer_path))

        # State. weight_version: version of the POLICY weights the engine holds, -1 when it holds none
        # (dummy load, level-2 sleep, judge swapped in): the trainer syncs whenever it differs from its
        # step. serving: whose weights the engine holds. weights_valid: False after a level-2 sleep.
        # The checkpoint the engine loaded counts as no version: the trainer's first sync (< 1 s) is
        # cheaper than proving that the disk weights equal the trainer's initial ones.
        self.weights_valid = config.load_format != "dummy"
        self.weight_version = -1
        self.serving = "policy"
        self.asleep: set[str] = set()  # subset of {"weights", "kv_cache"}
        self.last_sync: SyncStats | None = None
        self.last_swap: SyncStats | None = None
        self.sync_count = 0
        self._policy_specs: list[ParamSpec] | None = None
        self._source: ModuleWeightSource | None = None
        self._judge = None  # the judge view (wz_engine.rollout.vllm_judge), built on first use
        if config.enable_sleep_mode:
            self.sleep()  # give the memory to the trainer until the first sync

    # ------------------------------------------------------------------ Sampler protocol

    def update_weights(self, model: torch.nn.Module, version: int) -> None:
        """Push `model`'s weights (FSDP2-sharded or not) into the engine, tagged `version`.

        Collective: every rank calls it at the same point (the FSDP2 gathers are all-gathers).
        """
        self._wake(["weights"])
        if self._source is None or self._source.model is not model:
            dtype = self.dtype or next(model.parameters()).dtype
            self._source = ModuleWeightSource(model, dtype)
        stats = self.syncer.sync(self._source, self._load)
        self.syncer.release()
        self._policy_specs = self._source.specs()
        self.llm.reset_prefix_cache()
        self.weight_version = int(version)
        self.serving = "policy"
        self.weights_valid = True
        self.last_sync = stats
        self.sync_count += 1
        log.info("weight sync v%d: %.1f MB in %d bucket(s), %.3f s (%.2f GB/s; load %.3f s)", self.weight_version,
                 stats.nbytes / 1e6, stats.buckets, stats.seconds, stats.gbps, stats.load_seconds)
        self._wake(["kv_cache"])

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        """Rollouts from the policy weights; wakes a level-1 sleeping engine, refuses anything stale."""
        self._ready("policy")
        return self._generate(prompt_ids, params, lora_request=None)

    def sleep(self) -> None:
        """Release the engine's GPU memory (level 1: weights to CPU; level 2: weights dropped)."""
        if not self.config.enable_sleep_mode or self.asleep == {"weights", "kv_cache"}:
            return
        self.llm.sleep(level=self.config.sleep_level)
        self.asleep = {"weights", "kv_cache"}
        if self.config.sleep_level == 2:
            self.weights_valid = False
            self.weight_version = -1
            if self._judge is not None:
                self._judge.on_weights_discarded()

    def wake_up(self) -> None:
        """Wake weights and KV cache without a sync (only valid after a level-1 sleep)."""
        if not self.weights_valid:
            raise RuntimeError("wake_up: the engine holds no valid weights (level-2 sleep or dummy load); "
                               "call update_weights instead")
        self._wake(["weights"])
        self._wake(["kv_cache"])

    # ------------------------------------------------------------------ judge on the same engine

    def judge_sampler(self) -> "Sampler":  # noqa: F821 - the protocol from rollout.base
        """The sampler the GenRM generates with, per `config.judge_mode` (one engine in all modes)."""
        mode = self.config.judge_mode
        if mode == "self":
            return self
        if self._judge is None:
            from wz_engine.rollout.vllm_judge import LoRAJudge, SwapJudge

            self._judge = LoRAJudge(self) if mode == "lora" else SwapJudge(self)
        return self._judge

    # ------------------------------------------------------------------ internals

    def _make_tp_group(self, tp: int):
        if tp == 1 or not (dist.is_available() and dist.is_initialized()):
            return None
        group, _ = dist.new_subgroups_by_enumeration(
            [list(range(g * tp, (g + 1) * tp)) for g in range(self.world_size // tp)])
        return group

    def _wake(self, tags: list[str]) -> None:
        todo = [t for t in tags if t in self.asleep]
        if not todo:
            return
        _empty_cache()
        self.llm.wake_up(tags=todo)
        self.asleep -= set(todo)

    def _load(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        # One call per bucket. vLLM maps HF names onto its (fused) parameters and copies.
        self.llm.apply_model(lambda model: model.load_weights(weights))

    def _ready(self, serving: str) -> None:
        """Raise unless the engine holds valid `serving` weights; wake it if it sleeps (level 1)."""
        if not self.weights_valid:
            raise RuntimeError("generate: the engine holds no valid weights (level-2 sleep or dummy load); "
                               "call update_weights first")
        if self.serving != serving:
            raise RuntimeError(f"generate: the engine holds the {self.serving}'s weights, not the {serving}'s; "
                               "call update_weights to restore the policy")
        if self.asleep:
            self.wake_up()

    def _generate(self, prompt_ids, params: SamplingParams, lora_request, version: int | None = None):
        prompt_ids = [list(p) for p in prompt_ids]
        local_count = len(prompt_ids)
        if self._tp_group is not None:
            # external_launcher: every rank of a TP group must submit the same requests.
            gathered = [None] * dist.get_world_size(self._tp_group)
            dist.all_gather_object(gathered, prompt_ids, group=self._tp_group)
            offset = sum(len(g) for g in gathered[: dist.get_rank(self._tp_group)])
            prompt_ids = [p for g in gathered for p in g]
        else:
            offset = 0
        sampling = [self._sampling_params(params, i) for i in range(len(prompt_ids))]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids], sampling, use_tqdm=False,
                                    lora_request=lora_request)
        version = self.weight_version if version is None else version
        result = [[_completion(o, params.return_logprobs, version) for o in out.outputs] for out in outputs]
        return result[offset: offset + local_count]

    def _sampling_params(self, params: SamplingParams, index: int):
        seed = None if params.seed is None else request_seed(params.seed, self.dp_rank, index)
        return self.api.SamplingParams(
            n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            max_tokens=params.max_new_tokens, seed=seed, stop_token_ids=list(params.stop_token_ids),
            logprobs=0 if params.return_logprobs else None, skip_special_tokens=True,
        )


def _completion(output, with_logprobs: bool, version: int) -> Completion:
    if output.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM returned finish_reason={output.finish_reason!r} (request aborted?)")
    token_ids = list(output.token_ids)
    logprobs = None
    if with_logprobs:
        if output.logprobs is None or len(output.logprobs) != len(token_ids):
            raise RuntimeError("vLLM returned no per-token logprobs although logprobs=0 was requested")
        # logprobs[j]: mapping token id -> Logprob; the sampled token is always present.
        logprobs = [float(pos[tok].logprob) for tok, pos in zip(token_ids, output.logprobs)]
    return Completion(token_ids=token_ids, text=output.text, finish_reason=output.finish_reason,
                      logprobs=logprobs, weight_version=version)
