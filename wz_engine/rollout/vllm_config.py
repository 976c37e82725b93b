"""Configuration of the colocated vLLM sampler, importable without vLLM installed.

The run config embeds `VLLMConfig` as `rollout.vllm`; nothing here imports vllm.
`check_vllm_install()` is the config-time gate: when `sampler = "vllm"` the trainer calls it once,
before any process group or model is built, so a missing or incompatible vLLM is one clear error
naming the installed and required versions, never an ImportError deep inside a step.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

# The `[vllm]` extra in pyproject.toml. Keep the two in step.
VLLM_REQUIREMENT = ">=0.28,<0.33"

JUDGE_MODES = ("self", "lora", "swap")
DTYPES = ("bfloat16", "float16", "float32", "auto")


@dataclass
class VLLMConfig:
    model: str | None = None
    """HF model directory or hub id vLLM builds the engine from (architecture, tokenizer, initial
    weights). None: the trainer passes the policy's own path. Its weights are replaced by the first
    sync before any rollout, so `load_format="dummy"` is safe when the path has only a config."""
    load_format: str = "auto"
    """vLLM `load_format`; "dummy" skips reading weights from disk (the first sync provides them)."""
    gpu_memory_utilization: float = 0.4
    """Fraction of GPU memory vLLM may take (weights + KV cache) while awake. The trainer's
    parameters, gradients and optimizer state live beside it, so keep this well under 1."""
    tensor_parallel_size: int = 1
    """Tensor parallel degree inside a node. With `external_launcher` every torchrun rank runs one
    engine shard; world_size must be a multiple of it and consecutive ranks form one TP group."""
    max_model_len: int = 4096
    """Prompt + completion budget per sequence (the judge's prompts are long: size for them)."""
    max_num_seqs: int = 256
    """Concurrent sequences per engine step (vLLM's scheduler limit)."""
    max_num_batched_tokens: int | None = None
    """Token budget per scheduler step; None keeps vLLM's default."""
    enable_sleep_mode: bool = True
    """Let the engine release its memory between rollouts (`LLM.sleep` / `LLM.wake_up`)."""
    sleep_level: int = 1
    """1: offload weights to CPU and drop the KV cache; 2: drop both (weights must be re-synced,
    which happens every step anyway, so 2 saves host memory and a copy). The judge modes work
    with either; level 2 is the leaner choice once the sync is fast."""
    bucket_size_mb: int = 1024
    """Size of one flat weight-sync bucket in MiB (the issue's 256 MB-2 GB range). A parameter
    larger than a bucket gets a bucket of its own."""
    enforce_eager: bool = False
    """Disable CUDA graphs (faster start, slower decode; also frees the graph pool's memory)."""
    dtype: str = "bfloat16"
    """Engine dtype; the sync casts trainer weights to it while packing."""
    enable_prefix_caching: bool = True
    """Prefix caching in vLLM; the cache is reset after every weight sync so stale KV never
    serves a new policy."""
    seed: int = 0
    """Base seed; rank r's engine uses seed + r // tensor_parallel_size (one seed per TP group)."""
    judge_mode: str = "self"
    """Where the GenRM judge runs, always on this one engine (vLLM allows one sleep-mode engine per
    process): "self" = the current policy judges; "lora" = the judge is a LoRA adapter over the
    shared (synced) base weights, sent with a `LoRARequest`; "swap" = the judge's own checkpoint
    (same architecture) is kept in pinned host memory and pushed into the engine after rollouts;
    the next policy sync restores the policy. When the trainer runs the GenRM, this (and the
    judge paths) is derived from `judge.genrm.weight_sharing`; an explicit contradicting value is a
    config error."""
    judge_lora_path: str | None = None
    """PEFT adapter directory for judge_mode="lora"."""
    max_lora_rank: int = 64
    """vLLM `max_lora_rank` when judge_mode="lora" (must be >= the adapter's rank)."""
    judge_checkpoint: str | None = None
    """HF checkpoint directory (safetensors) of the judge for judge_mode="swap"."""
    is_correction: bool = True
    """Truncated importance-sampling correction of the rollout/trainer mismatch: per-token
    advantages are multiplied by min(exp(trainer_old_logp - engine_logp), is_correction_cap)."""
    is_correction_cap: float = 2.0
    """Cap C of the truncated IS weight (verl/TIS use 2; must be >= 1)."""
    check_weight_version: bool = True
    """Raise if a rollout's weight version differs from the trainer's step version."""
    extra_engine_kwargs: dict | None = None
    """Further keyword arguments passed to `vllm.LLM` verbatim (e.g. kv_cache_dtype)."""

    def __post_init__(self):
        def bad(field: str, why: str):
            raise ValueError(f"VLLMConfig.{field}={getattr(self, field)!r}: {why}")

        if not 0.0 < self.gpu_memory_utilization < 1.0:
            bad("gpu_memory_utilization", "must be in (0, 1)")
        if self.tensor_parallel_size < 1:
            bad("tensor_parallel_size", "must be >= 1")
        if self.max_model_len < 1:
            bad("max_model_len", "must be >= 1")
        if self.max_num_seqs < 1:
            bad("max_num_seqs", "must be >= 1")
        if self.sleep_level not in (1, 2):
            bad("sleep_level", "must be 1 or 2")
        if self.bucket_size_mb < 1:
            bad("bucket_size_mb", "must be >= 1")
        if self.dtype not in DTYPES:
            bad("dtype", f"must be one of {DTYPES}")
        if self.judge_mode not in JUDGE_MODES:
            bad("judge_mode", f"must be one of {JUDGE_MODES}")
        if self.judge_mode == "lora" and not self.judge_lora_path:
            bad("judge_lora_path", 'judge_mode="lora" needs the judge adapter directory')
        if self.judge_mode == "swap" and not self.judge_checkpoint:
            bad("judge_checkpoint", 'judge_mode="swap" needs the judge checkpoint directory')
        if self.judge_mode == "swap" and not self.enable_sleep_mode:
            bad("enable_sleep_mode", 'judge_mode="swap" relies on sleep/wake to share the engine')
        if self.is_correction_cap < 1.0:
            bad("is_correction_cap", "must be >= 1 (a cap below 1 down-weights on-policy tokens)")
        if self.max_lora_rank < 1:
            bad("max_lora_rank", "must be >= 1")

    @property
    def bucket_size_bytes(self) -> int:
        return self.bucket_size_mb * 1024 * 1024

    def check_install(self) -> str:
        """Config-time check of the vLLM install; returns the installed version (see module doc)."""
        return check_vllm_install()


def check_vllm_install(requirement: str = VLLM_REQUIREMENT) -> str:
    """Return the installed vLLM version, or raise RuntimeError naming installed vs required.

    Checks, from package metadata only (importing vllm would initialise CUDA): vllm is installed,
    its version is in `requirement`, and the torch / transformers it declares are satisfied by the
    installed ones (vllm 0.28-0.32 pin torch==2.13.0; 0.31 wants transformers < 5.18).
    """
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    hint = f'install it with `pip install "wz-engine[vllm]"` (vllm{requirement})'
    try:
        installed = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f'sampler="vllm" but vllm is not installed (required: vllm{requirement}); {hint}')
    if Version(installed) not in SpecifierSet(requirement):
        raise RuntimeError(f"vllm {installed} is installed but wz-engine requires vllm{requirement}; {hint}")
    for line in importlib.metadata.requires("vllm") or []:
        req = Requirement(line)
        if req.name not in ("torch", "transformers") or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        try:
            have = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            raise RuntimeError(f"vllm {installed} requires {req} but {req.name} is not installed")
        # Local builds ("2.13.0+cpu", "2.13.0+cu130") satisfy "==2.13.0": compare the public part.
        if Version(Version(have).public) not in req.specifier:
            raise RuntimeError(f"vllm {installed} requires {req} but {req.name} {have} is installed")
    return installed
