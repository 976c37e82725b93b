"""Run directories: one run per `train.output_dir`, identified by a run id, and nothing lost silently.

- A new run claims an output directory only when it holds no run (`RUN_ARTIFACTS`); `--resume` continues
  the run that is there; `--overwrite` first MOVES the run that is there aside to `<dir>.old-<timestamp>`
  (nothing is deleted) and starts a new one.
- `run.json` holds the run id; every checkpoint's manifest carries it too (checkpoint.py), so resume,
  pruning and `wz export` never take another run's checkpoint.
- Logs are appended to, never rewritten, except that a resumed run drops (and says so) the rows logged
  after the checkpoint it resumed from, which it is about to log again.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path

from wz_engine import chaos
from wz_engine import distributed as wzdist

log = logging.getLogger("wz_engine")

RUN_FILE = "run.json"
LOCK_FILE = "run.lock"
LOG_FILES = ("metrics.jsonl", "samples.jsonl")
RUN_ARTIFACTS = (RUN_FILE, *LOG_FILES, "checkpoints", "config.json", "tokenizer", "hf_config", "tensorboard",
                 "export")
"""What a run writes into its output directory; any of them there means the directory holds a run."""


class RunDirError(ValueError):
    """A run directory cannot be used as asked (the message says why and what to do)."""


@dataclasses.dataclass(frozen=True)
class RunInfo:
    run_id: str
    created: str
    """UTC time the run was started (ISO 8601)."""


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def read_run(out: str | Path) -> RunInfo | None:
    """The run in `out` (from its run.json), or None when there is none or it cannot be read."""
    try:
        data = json.loads((Path(out) / RUN_FILE).read_text())
        return RunInfo(str(data["run_id"]), str(data.get("created", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_artifacts(out: str | Path) -> list[str]:
    """The entries of `out` that a run wrote (empty when it holds no run)."""
    out = Path(out)
    return [name for name in RUN_ARTIFACTS if (out / name).exists()] if out.is_dir() else []


def describe(out: str | Path) -> str:
    """One line about the run in `out`: run id, logged steps, checkpoints."""
    out = Path(out)
    run = read_run(out)
    parts = [f"run {run.run_id}" if run else "a run without run.json (an older wz-engine, or damaged)"]
    metrics = out / LOG_FILES[0]
    if metrics.is_file():
        parts.append(f"{sum(1 for line in metrics.read_text().splitlines() if line.strip())} metric rows")
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*")) if (out / "checkpoints").is_dir() else []
    parts.append(f"checkpoints {', '.join(ckpts)}" if ckpts else "no checkpoint")
    return ", ".join(parts)


def aside_path(path: Path, tag: str = "old") -> Path:
    """`<path>.<tag>-<UTC timestamp>` (with `-2`, `-3`, ... when that exists)."""
    base = f"{path.name}.{tag}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    candidate, n = path.with_name(base), 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{base}-{n}")
    return candidate


def move_aside(path: Path, tag: str = "old") -> Path:
    target = aside_path(path, tag)
    path.rename(target)
    return target


def claim(out: str | Path, resume: bool, overwrite: bool, is_main: bool) -> RunInfo:
    """Make `out` this run's directory (collective: rank 0 decides and writes, every rank gets the outcome).

    Raises RunDirError (on every rank) when `out` holds another run and neither `resume` nor `overwrite`
    is set, or when `resume` finds no run to continue."""
    outcome: RunInfo | str | None = None
    if is_main:
        try:
            outcome = _claim_here(Path(out), resume, overwrite)
        except RunDirError as e:
            outcome = str(e)
    outcome = wzdist.broadcast_object(outcome)
    if isinstance(outcome, str):
        raise RunDirError(outcome)
    chaos.point("run_claimed")
    return outcome


def _claim_here(out: Path, resume: bool, overwrite: bool) -> RunInfo:
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other: continue the run or replace it")
    if out.is_dir():
        _lock(out)
    found = run_artifacts(out)
    if resume:
        run = read_run(out)
        if run is None:
            what = (f"holds {', '.join(found)} but no readable {RUN_FILE} (written by an older wz-engine, or "
                    "damaged)") if found else "holds no run"
            raise RunDirError(f"--resume: {out} {what}; nothing to continue. Drop --resume to start a run there"
                              f"{' after moving it aside with --overwrite' if found else ''}")
        log.info("resuming %s in %s", describe(out), out)
        return run
    if found:
        if not overwrite:
            raise RunDirError(
                f"train.output_dir {out} already holds {describe(out)}. Pass --resume to continue it, or "
                f"--overwrite to move it aside (to {aside_path(out).name}; nothing is deleted) and start a new "
                "run, or choose another train.output_dir")
        _unlock(out)
        moved = move_aside(out)
        log.warning("--overwrite: moved the earlier run in %s (%s) to %s", out, describe(moved), moved)
    elif overwrite:
        log.info("--overwrite: %s holds no run, nothing to move", out)
    run = RunInfo(new_run_id(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    out.mkdir(parents=True, exist_ok=True)
    _lock(out)
    try:
        write_json_atomic(out / RUN_FILE, dataclasses.asdict(run), exclusive=True)
    except FileExistsError:
        raise RunDirError(f"train.output_dir {out}: another run claimed it at the same moment "
                          f"({describe(out)})") from None
    log.info("run %s starts in %s", run.run_id, out)
    return run


_held_locks: dict[str, int] = {}
"""This process's run-directory locks: lock file path -> open file descriptor."""


def _lock(out: Path) -> None:
    """Hold `out/run.lock` (flock) while this process lives, so a second live process on the same run
    directory (a double launch, or the workers a killed torchrun agent leaves running) is refused. The
    OS releases it when the holder dies, kill -9 included. Re-entrant within one process."""
    path = out / LOCK_FILE
    key = str(path.resolve())
    held = _held_locks.pop(key, None)
    if held is not None:
        try:
            if os.fstat(held).st_ino == path.stat().st_ino:
                _held_locks[key] = held
                return
        except OSError:
            pass
        os.close(held)  # the directory was moved away since: a new lock file
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunDirError(f"train.output_dir {out} is in use by a live process (pid {holder}); stop it first "
                          "(killing a torchrun agent can leave its workers running)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held_locks[key] = fd


def _unlock(out: Path) -> None:
    held = _held_locks.pop(str((out / LOCK_FILE).resolve()), None)
    if held is not None:
        os.close(held)


def write_json_atomic(path: Path, obj, exclusive: bool = False) -> None:
    """Write JSON to `path` so that a reader (or a kill -9) sees the old file or the new one, never half.
    `exclusive`: FileExistsError when `path` exists (two runs starting at once: one wins)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, default=str))
        f.flush()
        os.fsync(f.fileno())
    try:
        if exclusive:
            _link_exclusive(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _link_exclusive(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # atomic, and fails when the name exists
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: check, then rename
        if dst.exists():
            raise FileExistsError(dst) from None
        os.replace(src, dst)


def save_dir_once(path: Path, write) -> None:
    """`write(tmp_dir)` into a temporary folder renamed to `path`: a folder that exists is complete.
    Does nothing when `path` exists (a resumed run keeps what its first start wrote)."""
    if path.exists():
        return
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    tmp.rename(path)


def trim_logs(out: str | Path, step: int) -> None:
    """Drop the log rows of steps after `step` (a resumed run logs them again), saying how many; a last
    line cut short by a kill is dropped too. Each file is replaced atomically."""
    for name in LOG_FILES:
        path = Path(out) / name
        if not path.is_file():
            continue
        kept, dropped, torn = [], 0, 0
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                row_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                torn += 1
                continue
            if row_step <= step:
                kept.append(line)
            else:
                dropped += 1
        if dropped or torn:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(r + "\n" for r in kept))
            os.replace(tmp, path)
            log.warning("%s: dropped %d rows logged after step %d (logged again now)%s", path, dropped, step,
                        f" and {torn} unreadable (cut short) lines" if torn else "")
