"""HF-format export (safetensors + config + tokenizer) of a live policy or of a run's checkpoint."""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import torch

from wz_engine import checkpoint as ckpt
from wz_engine import rundir
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


@dataclasses.dataclass
class ExportReport:
    out_dir: Path
    run_id: str
    step: int
    checkpoint: Path
    skipped: list[ckpt.Skipped]
    """Newer checkpoints passed over because they do not verify."""
    moved_aside: Path | None
    """Where the earlier contents of `out_dir` went (--force)."""


def export_run(run_dir: str | Path, out_dir: str | Path, checkpoint: str | Path | None = None,
               force: bool = False) -> ExportReport:
    """Export the run's newest checkpoint that verifies (or the given one, which must verify and belong
    to the run) into `out_dir`, which must be empty or new unless `force` (then its contents are moved
    aside to `<out_dir>.old-<timestamp>`; nothing is deleted). The export is written next to `out_dir`
    and renamed into place. The model is loaded by its HF names, so a checkpoint written with a LoRA
    judge injected (peft-renamed base weights plus adapter entries) loads too; the adapter is not exported."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    run = rundir.read_run(run_dir)
    if run is None and checkpoint is None:
        raise ckpt.CheckpointError(f"run_dir: {run_dir} holds no readable {rundir.RUN_FILE} (not a run directory, "
                                   "or written by an older wz-engine); name a checkpoint with --checkpoint")
    if out_dir.resolve() in (run_dir.resolve(), *run_dir.resolve().parents):
        raise ValueError(f"out_dir: {out_dir} holds the run being exported; choose another folder")
    occupied = out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))
    if occupied and not force:
        raise FileExistsError(f"out_dir: {out_dir} is not empty; pass --force to move what is there aside "
                              f"(to {rundir.aside_path(out_dir).name}) and export anyway")
    run_id = run.run_id if run is not None else None
    if checkpoint is None:
        found = ckpt.newest_verified(run_dir, run_id)
        if found.path is None:
            raise (ckpt.none_verifies(ckpt.checkpoint_root(run_dir), found.skipped) if found.skipped
                   else ckpt.CheckpointError(f"run_dir: no checkpoint under {ckpt.checkpoint_root(run_dir)}"))
    else:
        found = ckpt.newest_verified(run_dir, run_id, candidates=[Path(checkpoint)])
        if found.path is None:
            raise ckpt.CheckpointError(f"--checkpoint {checkpoint}: {found.skipped[0].reason}")
    config = AutoConfig.from_pretrained(str(run_dir / HF_CONFIG_DIR))
    lm = AutoModelForCausalLM.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir / TOKENIZER_DIR))
    ckpt.load_model_weights(found.path, FusedHeadCausalLM(lm))
    staging = out_dir.with_name(out_dir.name + ".exporting")
    shutil.rmtree(staging, ignore_errors=True)
    export_model(lm, tokenizer, staging)
    moved = rundir.move_aside(out_dir) if occupied else None
    if out_dir.is_dir():
        out_dir.rmdir()  # empty
    staging.rename(out_dir)
    return ExportReport(out_dir, found.run_id, found.step, found.path, found.skipped, moved)
