"""Which weights the GenRM judges with on the `hf` backend, and what each option costs in memory.

- "self": the judge samples from the live policy module through the policy's own HFSampler path:
  zero extra parameters.
- "lora": a peft LoRA adapter (a local adapter directory) is injected into the policy module itself
  (peft's own `inject_adapter_in_model` + `set_peft_model_state_dict`; transformers' `load_adapter`
  wrapper is avoided because its releases demand peft versions newer than the ones published) over
  the same base weights. The adapter is
  DISABLED by default, so the policy's training forward and its rollouts see the plain base weights;
  `AdapterScopedSampler` enables it only for the duration of a judge `generate` call. The adapter is
  frozen, the base weights keep their `requires_grad`. Extra memory: the adapter's parameters.
  Note: injection wraps the targeted linears, so their parameters are renamed in `state_dict`
  (`q_proj.weight` -> `q_proj.base_layer.weight`, plus `lora_A/B` entries); an HF export of the
  policy has to map the names back and leave the adapter out.
- "checkpoint": a separate model loaded from a local HF directory with `from_pretrained`: its full
  parameter bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from wz_engine.judge.config import GenRMConfig
from wz_engine.rollout.base import Completion, SamplingParams

JUDGE_ADAPTER = "wz_judge"


def param_bytes(module: torch.nn.Module) -> int:
    """Bytes held by the module's parameters and buffers, each storage counted once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


@dataclass
class JudgeEngine:
    sampler: object
    """The Sampler the GenRM generates with."""
    model: torch.nn.Module
    """The module the judge runs on (the policy itself for "self" and "lora")."""
    tokenizer: object
    extra_bytes: int
    """Parameter bytes this judge adds on top of the policy."""


class AdapterScopedSampler:
    """Wraps a sampler so that a named LoRA adapter is active only inside `generate`."""

    def __init__(self, sampler, model: torch.nn.Module, adapter_name: str = JUDGE_ADAPTER):
        self.inner = sampler
        self.model = model
        self.adapter_name = adapter_name

    @property
    def weight_version(self) -> int:
        return self.inner.weight_version

    @contextlib.contextmanager
    def adapter_enabled(self):
        set_adapter_enabled(self.model, True, self.adapter_name)
        try:
            yield
        finally:
            set_adapter_enabled(self.model, False, self.adapter_name)

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        with self.adapter_enabled():
            return self.inner.generate(prompt_ids, params)

    def update_weights(self, model, version: int) -> None:
        self.inner.update_weights(model, version)

    def sleep(self) -> None:
        self.inner.sleep()

    def wake_up(self) -> None:
        self.inner.wake_up()


def _tuner_layers(model: torch.nn.Module) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def set_adapter_enabled(model: torch.nn.Module, enabled: bool, adapter_name: str = JUDGE_ADAPTER) -> None:
    """Switch an injected adapter on (and make it the active one) or off, layer by layer."""
    layers = _tuner_layers(model)
    if not layers:
        raise ValueError(f"model: no peft adapter is injected (expected {adapter_name!r})")
    for layer in layers:
        if enabled:
            layer.set_adapter(adapter_name)
        layer.enable_adapters(enabled)


def import_peft():
    """peft, or an ImportError that says whether it is missing or does not fit the installed transformers."""
    import importlib.metadata
    import importlib.util

    from wz_engine.optional_deps import pip_line

    if importlib.util.find_spec("peft") is None:
        raise ImportError(f'judge.genrm.weight_sharing = "lora" needs peft: {pip_line("lora")}')
    try:
        import peft
    except Exception as e:  # e.g. an old peft importing names a newer transformers removed
        raise ImportError(f'judge.genrm.weight_sharing = "lora": peft {importlib.metadata.version("peft")} does '
                          f'not import with transformers {importlib.metadata.version("transformers")} ({e}); '
                          f'install a peft that fits: {pip_line("lora").replace("pip install", "pip install -U", 1)}'
                          ) from e
    return peft


def attach_lora_judge(model: torch.nn.Module, adapter_path: str, adapter_name: str = JUDGE_ADAPTER) -> int:
    """Inject a frozen LoRA adapter into `model`, disabled; return its parameter bytes.

    Goes through peft's public API directly (config, injection, state dict), so it works with any
    transformers the project's range admits. The base weights' `requires_grad` flags are kept.
    """
    from pathlib import Path

    peft = import_peft()
    from peft.utils import load_peft_weights

    if not (Path(adapter_path) / "adapter_config.json").is_file():
        raise ValueError(f"lora_path: {adapter_path!r} holds no peft adapter (adapter_config.json is missing)")
    if any(type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor" for p in model.parameters()):
        # peft would wrap sharded linears with unsharded adapters; not supported on the hf backend
        raise ValueError('model: weight_sharing="lora" on the hf backend needs an unsharded (world size 1) '
                         'module; with FSDP2 use a separate "checkpoint" judge or the vllm sampler')
    config = peft.PeftConfig.from_pretrained(adapter_path)
    if config.peft_type != peft.PeftType.LORA:
        raise ValueError(f"lora_path: {adapter_path!r} is a {config.peft_type} adapter, expected LORA")
    config.inference_mode = True
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    before = {id(p) for p in model.parameters()}
    try:
        peft.inject_adapter_in_model(config, model, adapter_name=adapter_name)
    except Exception as e:  # version skew between peft and the model's modules
        import transformers

        raise RuntimeError(f"injecting the LoRA judge {adapter_path!r} failed with peft {peft.__version__} and "
                           f"transformers {transformers.__version__}: {e}") from e
    weights = load_peft_weights(adapter_path, device=str(next(model.parameters()).device))
    # saved adapters carry PeftModel's "base_model.model." prefix; the bare model has none (peft >= 0.20
    # strips it itself, older releases do not)
    weights = {k.removeprefix("base_model.model."): v for k, v in weights.items()}
    result = peft.set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"lora_path: {len(unexpected)} adapter tensors do not fit the model, "
                         f"e.g. {unexpected[0]!r}")
    set_adapter_enabled(model, False, adapter_name)
    added = [p for p in model.parameters() if id(p) not in before]
    for name, p in model.named_parameters():
        if id(p) in before:
            # injection moved `x.weight` to `x.base_layer.weight`: match on the original name
            p.requires_grad_(name.replace(".base_layer.", ".") in trainable or name in trainable)
        else:
            p.requires_grad_(False)
    return sum(p.numel() * p.element_size() for p in added)


def has_injected_adapter(model: torch.nn.Module) -> bool:
    """Whether peft tuner layers (e.g. the LoRA judge) live inside `model`."""
    try:
        return bool(_tuner_layers(model))
    except ImportError:
        return False


def build_judge_engine(
    config: GenRMConfig,
    policy: torch.nn.Module,
    tokenizer,
    sampler_factory: Callable[[torch.nn.Module, object], object] | None = None,
) -> JudgeEngine:
    """The judge's sampler for `config.weight_sharing`; `sampler_factory(model, tokenizer)` defaults
    to `HFSampler`."""
    if sampler_factory is None:
        from wz_engine.rollout.hf import HFSampler

        sampler_factory = HFSampler
    mode = config.weight_sharing
    if mode == "self":
        return JudgeEngine(sampler_factory(policy, tokenizer), policy, tokenizer, 0)
    if mode == "lora":
        extra = attach_lora_judge(policy, config.lora_path)
        sampler = AdapterScopedSampler(sampler_factory(policy, tokenizer), policy)
        return JudgeEngine(sampler, policy, tokenizer, extra)
    if mode == "checkpoint":
        model, judge_tokenizer = load_judge_checkpoint(config.checkpoint_path, tokenizer)
        device = next(policy.parameters()).device
        model.to(device)
        return JudgeEngine(sampler_factory(model, judge_tokenizer), model, judge_tokenizer, param_bytes(model))
    raise ValueError(f"config.weight_sharing: unknown {mode!r}")


def load_judge_checkpoint(path: str, fallback_tokenizer=None):
    """(model in eval mode, no grad; its tokenizer, or `fallback_tokenizer` if the dir has none)."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(path).is_dir():
        raise ValueError(f"checkpoint_path: {path!r} is not a local directory")
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    model.eval().requires_grad_(False)
    tokenizer = fallback_tokenizer
    if (Path(path) / "tokenizer_config.json").is_file() or (Path(path) / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer is None:
        raise ValueError(f"checkpoint_path: {path!r} has no tokenizer and none was given")
    return model, tokenizer
