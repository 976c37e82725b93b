"""Checkpoints: torch.distributed.checkpoint for model + optimizer, and per-rank trainer state.

Layout under output_dir/checkpoints/step_00000010/:
    model_optim/       DCP shards of {"model", "optim"} (resharding-safe: any world size loads it)
    trainer_rank{r}.pt step, data position, scheduler, sampler generator, every RNG state, counters
    config.json        the resolved run config
A checkpoint is written to `step_XXXXXXXX.tmp` and renamed into place only once every rank has
finished, so a partial checkpoint is never found by `--resume`.
"""

from __future__ import annotations

import contextlib
import json
import random
import warnings
import shutil
from pathlib import Path

import numpy as np
import torch

from wz_engine import distributed as wzdist

_PREFIX = "step_"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """Newest complete checkpoint directory, or None."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and not p.name.endswith(".tmp")]
    return max(done, key=lambda p: int(p.name[len(_PREFIX):])) if done else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, config: dict, rank: int, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically (all ranks call this)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = checkpoint_root(output_dir)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f"{final.name}.tmp"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    wzdist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_ok():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "model_optim"))
    torch.save({**trainer_state, "rng": rng_state()}, tmp / f"trainer_rank{rank}.pt")
    if rank == 0:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    wzdist.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _prune(root, keep)
    wzdist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    done = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.endswith(".tmp")),
                  key=lambda p: int(p.name[len(_PREFIX):]))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    rank: int) -> dict:
    """Load model (+ optimizer) in place; returns this rank's trainer state (RNG states restored).

    A run resumed with a different world size still loads model and optimizer (DCP reshards), but
    takes rank 0's trainer state for its data position when its own file is missing."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with _single_process_ok():
            dcp.load(state, checkpoint_id=str(path / "model_optim"))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        state = {"model": get_model_state_dict(model)}
        with _single_process_ok():
            dcp.load(state, checkpoint_id=str(path / "model_optim"))
        set_model_state_dict(model, state["model"])
    mine = path / f"trainer_rank{rank}.pt"
    trainer = torch.load(mine if mine.exists() else path / "trainer_rank0.pt", weights_only=False)
    if mine.exists():
        set_rng_state(trainer["rng"])
    return trainer


def policy_param_name(name: str) -> str | None:
    """A parameter's own HF name when a peft adapter (a LoRA judge, wz_engine/judge/sharing.py) is
    injected: `x.base_layer.weight` -> `x.weight`; None for the adapter's entries (`lora_A.<adapter>.weight`,
    `lora_B`, `lora_embedding_*`, `lora_magnitude_vector`). Other names come back unchanged."""
    parts = name.split(".")
    if any(part.startswith("lora_") for part in parts):
        return None
    return ".".join(p for p in parts if p != "base_layer")


def load_model_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Load only the model weights of checkpoint `path` into an unsharded `model`, matching names
    modulo a peft adapter that was injected when it was saved (a LoRA judge: `x.base_layer.weight`
    in the checkpoint is `x.weight` here; the adapter's `lora_*` entries are not read)."""
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(Path(path) / "model_optim")).read_metadata().state_dict_metadata
    saved_names = [k[len("model."):] for k in saved if k.startswith("model.")]  # DCP flattens {"model": {...}}
    by_plain = {policy_param_name(name): name for name in saved_names if policy_param_name(name) is not None}
    state = model.state_dict()
    missing = [name for name in state if name not in by_plain]
    if missing:
        raise ValueError(f"checkpoint {path}: no weights for {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    request = {by_plain[name]: tensor for name, tensor in state.items()}
    with _single_process_ok():
        dcp.load({"model": request}, checkpoint_id=str(Path(path) / "model_optim"))


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns when there is no process group; world size 1 without one is a supported mode here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
