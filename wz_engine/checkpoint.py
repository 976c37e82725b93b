"""Checkpoints: torch.distributed.checkpoint for model + optimizer, and per-rank trainer state.

Layout under output_dir/checkpoints/step_00000010/:
    model_optim/       DCP shards of {"model", "optim"} (resharding-safe: any world size loads it)
    trainer_rank{r}.pt whatever state dict the trainer passes (step, data position, scheduler, ...) + RNG states
    config.json        the resolved run config
    manifest.json      written LAST, by rank 0 once every rank's files are on disk: each other file's
                       size and SHA-256, the step, the run id, the world size (manifest.py)
A checkpoint is written to `step_XXXXXXXX.tmp` and renamed into place after its manifest, so a kill
leaves at most a `.tmp` folder. A checkpoint counts only when its manifest verifies: `--resume` and
`wz export` take the newest one of the run that verifies, and say which ones they skipped and why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from wz_engine import chaos, rundir
from wz_engine import distributed as wzdist
from wz_engine import manifest as mf

log = logging.getLogger("wz_engine")

_STEP_DIR = re.compile(r"step_(\d{8})")
MODEL_OPTIM = "model_optim"


class CheckpointError(ValueError):
    """No usable checkpoint where one was asked for (the message lists what was found and why not)."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dirs(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint folder in place, newest first; nothing is verified here."""
    root = checkpoint_root(output_dir)
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))] \
        if root.is_dir() else []
    return sorted(found, reverse=True)


@dataclasses.dataclass
class Skipped:
    path: Path
    reason: str
    foreign: bool
    """It verifies but belongs to another run (left alone; never moved or pruned)."""


@dataclasses.dataclass
class Selection:
    path: Path | None
    """The newest checkpoint that verifies (None: none does)."""
    step: int | None
    run_id: str | None
    skipped: list[Skipped]
    """Newer checkpoints passed over, newest first."""


def newest_verified(output_dir: str | Path, run_id: str | None, candidates: list[Path] | None = None) -> Selection:
    """The newest checkpoint (of run `run_id`, any run when None) whose manifest verifies: listing and
    sizes first, then every file's checksum (collective: rank 0 decides, all ranks hash a share)."""
    main = wzdist.rank() == 0
    if candidates is None:
        candidates = [p for _, p in step_dirs(output_dir)] if main else []
    candidates = [Path(p) for p in wzdist.broadcast_object([str(p) for p in candidates])]
    skipped: list[Skipped] = []
    for path in candidates:
        match = _STEP_DIR.fullmatch(path.name)
        step = int(match.group(1)) if match else None  # a folder named otherwise: the manifest says
        manifest, why, foreign = None, None, False
        if main:
            manifest, why = mf.check_listing(path, step, None)
            if manifest is not None and run_id is not None and manifest.get("run_id") != run_id:
                why, foreign = f"belongs to run {manifest.get('run_id')}, not to this run ({run_id})", True
        why, foreign, names = wzdist.broadcast_object(
            (why, foreign, sorted(manifest["files"]) if manifest is not None and why is None else None))
        if why is None:
            digests = mf.hash_files(path, names)
            why = wzdist.broadcast_object(mf.compare_digests(manifest, digests) if main else None)
        if why is None:
            run, step = wzdist.broadcast_object((manifest["run_id"], manifest["step"]) if main else None)
            return Selection(path, step, run, skipped)
        skipped.append(Skipped(path, why, foreign))
    return Selection(None, None, None, skipped)


def none_verifies(where: str | Path, skipped: list[Skipped]) -> CheckpointError:
    lines = "".join(f"\n  {s.path.name}: {s.reason}" for s in skipped)
    return CheckpointError(f"no checkpoint under {where} verifies:{lines}")


def resume_point(output_dir: str | Path, run_id: str, keep: int) -> Path | None:
    """The checkpoint a resumed run loads (collective). It also finishes what a killed save left undone:
    newer checkpoints of this run that do not verify are moved aside to `step_X.corrupt-<time>` (another
    run's are left alone), leftover `.tmp` folders of unfinished saves removed, each with a log line, and
    the run's checkpoints pruned to `keep`. None when the run has no checkpoint yet (it starts again from
    step 0); CheckpointError, touching nothing, when it has some but none verifies."""
    found = newest_verified(output_dir, run_id)
    if found.path is None and found.skipped:  # nothing to continue from: leave every folder as it is
        raise none_verifies(checkpoint_root(output_dir), found.skipped)
    if wzdist.rank() == 0:
        for s in found.skipped:
            if s.foreign:
                log.warning("resume: skipped %s: %s", s.path, s.reason)
            else:
                moved = rundir.move_aside(s.path, "corrupt")
                log.warning("resume: skipped %s: %s; moved it to %s", s.path, s.reason, moved.name)
        root = checkpoint_root(output_dir)
        leftovers = [p for pattern in ("step_*.tmp", "step_*.replaced", "step_*.pruned")
                     for p in sorted(root.glob(pattern))] if root.is_dir() else []
        for tmp in leftovers:
            shutil.rmtree(tmp, ignore_errors=True)
            log.info("resume: removed %s (a save or prune that did not finish)", tmp)
        if found.path is not None:
            _prune(output_dir, keep, run_id)
    if found.path is None:
        log.warning("resume: run %s has no checkpoint yet: it starts again from step 0", run_id)
    return found.path


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
                    trainer_state: dict, config: dict, rank: int, keep: int = 2, *, run_id: str) -> Path:
    """Write checkpoint `step` of run `run_id` (all ranks call this): files, barrier, manifest (rank 0),
    rename into place, prune this run's checkpoints to the newest `keep`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    class Writer(dcp.FileSystemWriter):  # fsyncs its files (sync_files=True)
        def finish(self, metadata, results):  # rank 0, once every rank's shards are written
            chaos.point("ckpt_dcp_shards_written")
            return super().finish(metadata, results)

    root = checkpoint_root(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"{final.name}.tmp"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    wzdist.barrier()
    chaos.point("ckpt_begin")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_ok():
        dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=Writer(str(tmp / MODEL_OPTIM)))
    chaos.point("ckpt_model_optim_written")
    with open(tmp / f"trainer_rank{rank}.pt", "wb") as f:
        torch.save({**trainer_state, "rng": rng_state()}, f)
        _sync(f)
    if rank == 0:
        with open(tmp / "config.json", "w") as f:
            f.write(json.dumps(config, indent=2, default=str))
            _sync(f)
    chaos.point("ckpt_trainer_state_written")
    wzdist.barrier()  # every rank's files are on disk
    names = wzdist.broadcast_object(mf.list_files(tmp) if rank == 0 else None)
    files = mf.hash_files(tmp, names)
    if rank == 0:
        mf.write_manifest(tmp, files, step, run_id, wzdist.world_size())
        chaos.point("ckpt_manifest_written")
        _move_into_place(tmp, final, run_id)
        chaos.point("ckpt_renamed")
        _prune(output_dir, keep, run_id)
    wzdist.barrier()
    return final


def _sync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _move_into_place(tmp: Path, final: Path, run_id: str) -> None:
    """Rename `tmp` to `final`. A folder of this run already there (the same step saved again) is deleted
    only afterwards; anything else there (another run's, no manifest) is moved aside, not deleted."""
    old = final.with_name(final.name + ".replaced") if final.exists() else None
    if old is not None and (mf.read_manifest(final)[0] or {}).get("run_id") != run_id:
        moved = rundir.move_aside(final, "other")
        log.warning("checkpoint %s: moved the folder that was there (not this run's) to %s", final, moved.name)
        old = None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    fd = os.open(final.parent, os.O_RDONLY)  # the rename itself reaches the disk
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _prune(output_dir: str | Path, keep: int, run_id: str) -> None:
    """Delete this run's checkpoints but the newest `keep` (by the run id in their manifests; another
    run's, or a folder without a readable manifest, is never touched)."""
    if keep <= 0:
        return
    ours = [p for _, p in step_dirs(output_dir) if (mf.read_manifest(p)[0] or {}).get("run_id") == run_id]
    for old in ours[keep:]:
        doomed = old.with_name(old.name + ".pruned")  # renamed first: a kill mid-delete leaves no step folder
        shutil.rmtree(doomed, ignore_errors=True)
        old.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)


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
