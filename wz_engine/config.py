"""Run configuration: dataclasses with field docstrings, loaded from TOML/YAML plus `--set` overrides.

A run is one file (sections below) plus `--set a.b=c` overrides, e.g.

    wz train run.toml --set algorithm.group_size=8 --set optim.lr=2e-6

Unknown keys and ill-typed values are errors that name the key and suggest the closest valid one.
Override values are parsed as TOML values (`8`, `2e-6`, `true`, `"text"`, `[1, 2]`); anything that
does not parse as TOML is taken as a bare string.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from wz_engine.algorithm_config import AlgorithmConfig
from wz_engine.config_loader import ConfigError, from_dict, parse_override, read_file, set_dotted
from wz_engine.envs.config import EnvConfig
from wz_engine.judge.config import GenRMConfig
from wz_engine.judge.verifiable import PreferenceConfig
from wz_engine.rollout.vllm_config import VLLMConfig  # importable without vllm installed

# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass
class TinyModelConfig:
    """A randomly initialised Qwen2 built from a config (no download), for CPU runs and tests."""

    vocab_size: int = 384
    """Size of the byte-level BPE vocabulary trained on the run's own prompts."""
    full_byte_alphabet: bool = True
    """Keep all 256 bytes in the vocabulary; false keeps only the bytes of the training text."""
    hidden_size: int = 64
    """Width of the residual stream."""
    num_layers: int = 2
    """Decoder layers."""
    num_heads: int = 4
    """Attention (query) heads."""
    num_kv_heads: int = 2
    """Key/value heads (fewer than num_heads: grouped-query attention)."""
    intermediate_size: int = 128
    """Width of the MLP's hidden layer."""
    seed: int = 0
    """Seed of the random initialisation."""


@dataclass
class ModelConfig:
    path: str = "tiny"
    """HF model directory or hub id of the policy, or "tiny" for a random tiny Qwen2 (see `tiny`)."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Shape of the tiny model when path = "tiny"."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the master weights. With FSDP2 on GPU keep float32 and let `distributed.mixed_precision`
    compute in bf16."""
    attn_implementation: str = "sdpa"
    """transformers attention for the training forward ("wz_varlen" when the packed-attention op is
    registered; "sdpa" packs through position ids, which is exact without a mask and cache)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass (saves activation memory)."""
    trust_remote_code: bool = False
    """Let transformers run the model repository's own modelling code (needed by some hub models)."""


@dataclass
class DataConfig:
    path: str = "demo"
    """Prompts: "demo" (the built-in writing prompts), a JSONL file, or "hf:<name>" for a `datasets` dataset."""
    split: str = "train"
    """Split of a `datasets` dataset."""
    prompt_field: str = "prompt"
    """Field holding the prompt: a string, or a list of chat messages."""
    reference_field: str = "reference"
    """Optional field with a reference answer (passed to rule rewards and reference-based judges)."""
    system_prompt: str | None = None
    """System message prepended to every prompt before the chat template."""
    max_prompt_tokens: int = 512
    """Prompts longer than this (after the chat template) are handled per `overlong`."""
    overlong: Literal["filter", "error"] = "filter"
    """"filter": drop them and log the count; "error": stop with an error naming the prompt."""
    shuffle: bool = True
    """Reshuffle the prompts every epoch (seeded by train.seed and the epoch)."""
    holdout: int = 0
    """Keep the last `holdout` prompts out of training (evaluation prompts, e.g. for the demo)."""


@dataclass
class RolloutConfig:
    sampler: Literal["hf", "vllm"] = "hf"
    """Generation engine: "hf" (transformers generate on the live module) or "vllm" (colocated engine)."""
    prompts_per_step: int = 8
    """Prompts per training step over all ranks (must divide evenly by the world size)."""
    group_size: int = 4
    """Completions per prompt (G)."""
    max_new_tokens: int = 128
    """Longest response in tokens; a response that reaches it is truncated."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest token set with this much probability (1 disables)."""
    top_k: int = 0
    """0 disables top-k."""
    seed_per_prompt: bool = False
    """Sample each prompt alone, seeded by (train.seed, step, prompt uid): samples then do not depend
    on the world size or on batching (slower: one generate call per prompt)."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """Engine settings when sampler = "vllm". Its judge_mode / judge_lora_path / judge_checkpoint
    are derived from `judge.genrm` when judge.kind = "genrm" (see JudgeConfig.genrm)."""


@dataclass
class JudgeConfig:
    kind: str = "callable"
    """Reward source (wz_engine.algorithms). Pairwise (BRPO): "callable" (a Python judge by import path)
    or "genrm". Pointwise: "rule" (a Python reward function by import path), "scalar_rm" (a sequence
    classifier) or "preference" (train the policy as the GenRM on preference pairs; see `preference`).
    Or a module path "pkg.module:name" to a RewardSource of your own."""
    callable: str = "wz_engine.demo.judge:writing_judge"
    """Import path `pkg.module:function`. kind="callable": (prompt, response_a, response_b) ->
    (score_a, score_b); kind="rule": (prompt, response, reference) -> float."""
    scalar_rm_path: str | None = None
    """HF directory of an AutoModelForSequenceClassification reward model (kind="scalar_rm")."""
    scalar_rm_batch_size: int = 16
    """Responses per forward pass of the scalar reward model."""
    genrm: GenRMConfig = field(default_factory=GenRMConfig)
    """GenRM settings when kind = "genrm" (see wz_engine/judge/config.py). `genrm.votes` is shared
    with `algorithm.votes` (see there). `genrm.weight_sharing` is the one user-facing choice of the
    judge's weights on both samplers: with rollout.sampler = "vllm" it sets `rollout.vllm.judge_mode`
    ("self" -> "self", "lora" -> "lora" with judge_lora_path = genrm.lora_path, "checkpoint" ->
    "swap" with judge_checkpoint = genrm.checkpoint_path); leave the rollout.vllm judge keys unset."""
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    """kind = "preference" (wz_engine/judge/verifiable.py): the pairs are data.path, each judged in both
    orders by the policy with judge.genrm's template and verdict grammar; rewards +1 / -1 / -format_penalty
    against the label, for a GRPO-family estimator over the G samples of each (pair, order)."""


@dataclass
class OptimConfig:
    lr: float = 1e-6
    """Peak learning rate of AdamW (after warmup)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW's moment decay rates."""
    eps: float = 1e-8
    """AdamW's denominator epsilon."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping (the norm is still logged)."""
    warmup_steps: int = 0
    """Linear warmup over this many optimizer steps (0: none); a run takes train.steps x ppo_epochs x
    mini-batches optimizer steps."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warmup, down to lr * min_lr_ratio at the last optimizer step."""
    min_lr_ratio: float = 0.0
    """Final learning rate of the "cosine" / "linear" schedules, as a fraction of lr."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Rollout steps (each: one rollout batch, then algorithm.ppo_epochs x mini-batches optimizer steps)."""
    seed: int = 0
    """Seeds the initialisation RNGs, the prompt order, BRPO's reference draws and the samplers."""
    micro_batch_tokens: int = 4096
    """Token budget of one packed micro-batch (prompt + response tokens); the batch is split into as
    many micro-batches as needed and the gradients accumulated."""
    output_dir: str = "runs/run"
    """Metrics, checkpoints and the final export go here."""
    cpu_threads: int = 0
    """torch intra-op threads on CPU (0: torch's default). 1 is fastest for tiny models and on busy machines."""
    max_nonfinite_steps: int = 3
    """Abort after this many consecutive optimizer steps with a non-finite loss or gradient (each is skipped)."""
    zero_signal_steps: int = 5
    """Warn loudly when, this many steps in a row, the judge's invalid rate, BRPO's skew-filter drop rate
    or the share of zero-advantage rollouts stays above `zero_signal_threshold` (the policy learns
    nothing); 0 turns the check off. See `wz_engine.monitors`."""
    zero_signal_threshold: float = 0.9
    """A step counts as without signal when one of those shares is above this (in [0, 1])."""
    abort_on_zero_signal: bool = False
    """Stop the run (an error naming the cause) instead of only warning when the zero-signal check fires."""


@dataclass
class DistributedConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend; auto = nccl on GPU, gloo on CPU."""
    mixed_precision: Literal["auto", "bf16", "none"] = "auto"
    """FSDP2 compute dtype; auto = bf16 on GPU, full precision on CPU."""
    reshard_after_forward: bool = True
    """FSDP2: free each layer's gathered weights after its forward (less memory, one more all-gather in the
    backward)."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every N rollout steps (0: only at the end and on SIGTERM/SIGINT). Checkpoints are written
    only between rollout steps, never inside one's epochs."""
    keep: int = 2
    """Keep the newest N checkpoints."""
    export_at_end: bool = False
    """Also write an HF-format export (safetensors + config + tokenizer) to output_dir/export."""


@dataclass
class LoggingConfig:
    tensorboard: bool | Literal["auto"] = "auto"
    """TensorBoard event files: "auto" = when tensorboard is installed; true = required (a config error
    with the pip line when it is missing); false = off."""
    wandb: bool = False
    """Log to Weights & Biases (opt-in; needs `pip install "wz-engine[wandb]"`, checked at config time)."""
    wandb_project: str = "wz-engine"
    """W&B project the run is logged to."""
    progress_bar: bool = True
    """Show a progress bar with the step's main metrics on rank 0."""
    samples_every: int = 0
    """Log one sampled completion every N steps (0: never)."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    env: EnvConfig = field(default_factory=EnvConfig)

    def validate(self) -> RunConfig:
        """Cross-field checks that a single field's type cannot express."""

        def bad(key: str, why: str):
            raise ConfigError(f"{key}: {why}")

        if self.rollout.group_size < 2:
            bad("rollout.group_size", f"must be >= 2 for group-relative estimators, got {self.rollout.group_size}")
        for key, value in [("rollout.prompts_per_step", self.rollout.prompts_per_step),
                           ("rollout.max_new_tokens", self.rollout.max_new_tokens),
                           ("train.micro_batch_tokens", self.train.micro_batch_tokens),
                           ("algorithm.votes", self.algorithm.votes),
                           ("algorithm.max_sampling_rounds", self.algorithm.max_sampling_rounds),
                           ("algorithm.ppo_epochs", self.algorithm.ppo_epochs)]:
            if value < 1:
                bad(key, f"must be >= 1, got {value}")
        if not 0 < self.algorithm.skew_threshold <= 1:
            bad("algorithm.skew_threshold", f"must be in (0, 1], got {self.algorithm.skew_threshold}")
        if self.algorithm.dual_clip is not None and self.algorithm.dual_clip <= 1:
            bad("algorithm.dual_clip", f"must be > 1, got {self.algorithm.dual_clip}")
        if self.algorithm.delta is not None and not self.algorithm.delta > 0:
            bad("algorithm.delta", f"must be > 0 (a cap on the ratio), got {self.algorithm.delta}")
        threshold = self.algorithm.off_policy_mask_threshold
        if threshold is not None and not math.isfinite(threshold):
            bad("algorithm.off_policy_mask_threshold", f"must be None or a finite number, got {threshold}")
        if not 0 <= self.algorithm.top_entropy_quantile <= 1:
            bad("algorithm.top_entropy_quantile",
                f"must be in [0, 1], got {self.algorithm.top_entropy_quantile}")
        if self.optim.lr <= 0:
            bad("optim.lr", f"must be > 0, got {self.optim.lr}")
        if not 0 <= self.train.zero_signal_threshold < 1:
            bad("train.zero_signal_threshold", f"must be in [0, 1), got {self.train.zero_signal_threshold}")
        if self.train.zero_signal_steps < 0:
            bad("train.zero_signal_steps", f"must be >= 0 (0: off), got {self.train.zero_signal_steps}")
        if self.train.steps < 0:
            bad("train.steps", f"must be >= 0, got {self.train.steps}")
        if self.algorithm.overlong_buffer >= self.rollout.max_new_tokens:
            bad("algorithm.overlong_buffer", "must be smaller than rollout.max_new_tokens")
        mb, P = self.algorithm.ppo_mini_batch_size, self.rollout.prompts_per_step
        if mb is not None and not (1 <= mb <= P and P % mb == 0):
            bad("algorithm.ppo_mini_batch_size", f"must divide rollout.prompts_per_step = {P}, got {mb}")
        if self.env.name is not None:
            from wz_engine.envs.base import validate_env_config

            validate_env_config(self)
        self._validate_algorithms()
        return self

    def _validate_algorithms(self) -> None:
        """Resolve the registered (or module-path) estimator, loss and reward source; check that they
        agree on pairwise rewards; run their own checks."""
        from wz_engine.algorithms import ESTIMATORS, POLICY_LOSSES, REWARD_SOURCES, RegistryError

        entries = {}
        # with an environment the env is the reward source: the judge is not used
        judge = [] if self.env.name is not None else [("judge.kind", REWARD_SOURCES, self.judge.kind)]
        for key, registry, name in [("algorithm.estimator", ESTIMATORS, self.algorithm.estimator),
                                    ("algorithm.policy_loss", POLICY_LOSSES, self.algorithm.policy_loss), *judge]:
            try:
                entries[key] = registry.get(name)
            except RegistryError as e:
                raise ConfigError(f"{key}: {e}") from None
        estimator, source = entries["algorithm.estimator"], entries.get("judge.kind")
        if source is not None and estimator.per_step:
            raise ConfigError(f"algorithm.estimator: {self.algorithm.estimator!r} takes the steps of multi-turn "
                              "episodes; set env.name (an environment) or use a single-turn estimator such as 'grpo'")
        if source is None and estimator.pairwise:
            raise ConfigError(f"algorithm.estimator: {self.algorithm.estimator!r} needs pairwise judge verdicts; "
                              "an environment's rewards are scalar (use \"gigpo\" or \"grpo\")")
        pairwise = [n for n in REWARD_SOURCES.names() if REWARD_SOURCES.get(n).pairwise]
        if source is not None and estimator.pairwise and not source.pairwise:
            pointwise = [n for n in ESTIMATORS.names() if not ESTIMATORS.get(n).pairwise]
            raise ConfigError(f"judge.kind: estimator {self.algorithm.estimator!r} needs a pairwise judge "
                              f"(one of {pairwise}), got {self.judge.kind!r}, whose rewards are pointwise: "
                              f"keep it and set algorithm.estimator to one of {pointwise}")
        if source is not None and source.pairwise and not estimator.pairwise:
            wanted = [n for n in ESTIMATORS.names() if ESTIMATORS.get(n).pairwise]
            raise ConfigError(f"algorithm.estimator: a pairwise judge ({self.judge.kind!r}) pairs with a pairwise "
                              f"estimator (one of {wanted}), got {self.algorithm.estimator!r}")
        loss = entries["algorithm.policy_loss"]
        a = self.algorithm
        for key, on in (("top_entropy_quantile", a.top_entropy_quantile < 1),
                        ("off_policy_mask_threshold", a.off_policy_mask_threshold is not None),
                        ("kl_importance_weighted", a.kl_importance_weighted)):
            if on and not loss.takes_fused_options:
                raise ConfigError(f"algorithm.{key}: policy loss {a.policy_loss!r} does not apply it "
                                  "(the built-in fused losses do)")
        for entry in entries.values():
            if entry.validate is not None:
                entry.validate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a TOML/YAML run file (or defaults when path is None), apply `a.b=c` overrides, validate."""
    raw: dict = {}
    if path is not None:
        raw = read_file(path)
    for item in overrides:
        set_dotted(raw, *parse_override(item))
    return from_dict(RunConfig, raw).validate()
