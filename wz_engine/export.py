"""HF-format export (safetensors + config + tokenizer) of a live policy or of a run's checkpoint."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from wz_engine import checkpoint as ckpt
from wz_engine.build import HF_CONFIG_DIR, TOKENIZER_DIR
from wz_engine.modeling import FusedHeadCausalLM


def policy_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The policy's own HF names from a module state dict that may hold an injected peft adapter
    (`ckpt.policy_param_name`): base weights renamed back, adapter entries dropped."""
    names = {key: ckpt.policy_param_name(key) for key in state}
    return {name: state[key] for key, name in names.items() if name is not None}


def export_model(lm, tokenizer, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """HF format: safetensors + config + tokenizer, loadable by transformers and vLLM.
    `state_dict` (full tensors) replaces the module's own, e.g. when the module is FSDP-sharded.
    An injected LoRA judge is left out: the export holds the policy's weights under its HF names."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = policy_state_dict(lm.state_dict() if state_dict is None else state_dict)
    from wz_engine.judge.sharing import has_injected_adapter

    if getattr(lm, "_hf_peft_config_loaded", False) or has_injected_adapter(lm):
        # transformers saves only the adapter of a model with adapters loaded, and an injected one
        # renames the wrapped linears: save through a parameter-free (meta) instance of the plain
        # architecture instead.
        with torch.device("meta"):
            plain = type(lm)(copy.deepcopy(lm.config))
        plain.generation_config = copy.deepcopy(lm.generation_config)
        lm = plain
    lm.save_pretrained(str(out_dir), safe_serialization=True, state_dict=state)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def export_live_policy(policy, tokenizer, out_dir: str | Path, is_main: bool) -> Path:
    """HF export of a live `FusedHeadCausalLM` policy, FSDP2-sharded or not (collective: the full
    weights are gathered to rank 0 on CPU, which writes them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from wz_engine import distributed as wzdist

    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main:
        prefix = "model."
        state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        export_model(policy.model, tokenizer, out_dir, state_dict=state)
    wzdist.barrier()
    return Path(out_dir)


def export_run(run_dir: str | Path, out_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Load a run's latest (or given) checkpoint into an unsharded model and export it. The model
    is loaded by its HF names, so a checkpoint written with a LoRA judge injected (peft-renamed
    base weights plus adapter entries) loads too; the adapter is not exported."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    run_dir = Path(run_dir)
    path = Path(checkpoint) if checkpoint else ckpt.latest_checkpoint(run_dir)
    if path is None:
        raise ValueError(f"run_dir: no checkpoint under {run_dir / 'checkpoints'}")
    config = AutoConfig.from_pretrained(str(run_dir / HF_CONFIG_DIR))
    lm = AutoModelForCausalLM.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / TOKENIZER_DIR))
    ckpt.load_model_weights(path, FusedHeadCausalLM(lm))
    return export_model(lm, tokenizer, out_dir)
