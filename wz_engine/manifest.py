"""Checkpoint manifests: a checkpoint is complete only when its manifest, written last, verifies.

`manifest.json` lists every other file of the checkpoint folder with its size and SHA-256, plus the
step, the run id and the world size. SHA-256 because `sha256sum` checks it by hand and hashlib runs it
at ~0.7 GB/s per core on our CPU machines (faster than blake2b there); the hashing is spread over
ranks and threads (see `hash_files`). Verification is two-staged: `check_listing` reads only the
manifest and the folder listing (sizes, names, step, run id), `compare_digests` the file contents.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from wz_engine import distributed as wzdist

MANIFEST = "manifest.json"
FORMAT = "wz-checkpoint/1"
ALGORITHM = "sha256"
_CHUNK = 8 << 20


def list_files(folder: Path) -> list[str]:
    """Every file under `folder` but the manifest, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST)


def file_digest(path: Path) -> str:
    h = hashlib.new(ALGORITHM)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)  # hashlib releases the GIL on large updates: threads hash in parallel
    return h.hexdigest()


def hash_files(folder: Path, names: list[str]) -> dict[str, dict]:
    """{name: {"size", "sha256"}} for `names` in `folder` (collective: every rank hashes every
    world_size-th name on a few threads, rank 0 gets them all; other ranks get theirs only)."""
    mine = names[wzdist.rank()::wzdist.world_size()]
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(mine)))) as pool:
        digests = list(pool.map(lambda n: file_digest(folder / n), mine))
    local = {n: {"size": (folder / n).stat().st_size, ALGORITHM: d} for n, d in zip(mine, digests)}
    merged: dict[str, dict] = {}
    for part in wzdist.all_gather_object(local):
        merged.update(part)
    return merged


def write_manifest(folder: Path, files: dict[str, dict], step: int, run_id: str, world_size: int) -> dict:
    """Write `folder/manifest.json` atomically (temporary name, fsync, rename); returns it."""
    manifest = {"format": FORMAT, "run_id": run_id, "step": step, "world_size": world_size,
                "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "algorithm": ALGORITHM,
                "files": files}
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    return manifest


def read_manifest(folder: Path) -> tuple[dict | None, str | None]:
    """-> (manifest, None) or (None, why it cannot be used)."""
    path = folder / MANIFEST
    if not path.is_file():
        return None, f"no {MANIFEST} (an unfinished save, or written by an older wz-engine)"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return None, f"{MANIFEST} unreadable ({e})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"),
                                                                                             dict):
        return None, f"{MANIFEST} is not a {FORMAT} manifest"
    return manifest, None


def check_listing(folder: Path, step: int | None, run_id: str | None) -> tuple[dict | None, str | None]:
    """Everything but the file contents: manifest readable, same step and run id (each when given), every
    listed file present with its size, no unlisted file, DCP metadata and rank 0's state listed.
    -> (manifest, None) or (None, why not)."""
    manifest, why = read_manifest(folder)
    if manifest is None:
        return None, why
    if step is not None and manifest.get("step") != step:
        return None, f"{MANIFEST} says step {manifest.get('step')}, the folder step {step}"
    if run_id is not None and manifest.get("run_id") != run_id:
        return None, f"belongs to run {manifest.get('run_id')}, not to this run ({run_id})"
    files = manifest["files"]
    for required in ("model_optim/.metadata", "trainer_rank0.pt"):
        if required not in files:
            return None, f"{MANIFEST} does not list {required}"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return None, f"{name}: missing (listed in {MANIFEST})"
        size = path.stat().st_size
        if size != entry.get("size"):
            return None, f"{name}: {size} bytes, {MANIFEST} says {entry.get('size')} (truncated or rewritten)"
    unlisted = sorted(set(list_files(folder)) - set(files))
    if unlisted:
        return None, f"files not in {MANIFEST}: {', '.join(unlisted[:3])}{' ...' if len(unlisted) > 3 else ''}"
    return manifest, None


def compare_digests(manifest: dict, digests: dict[str, dict]) -> str | None:
    """Why the hashed files do not match the manifest, or None when they all do."""
    for name, entry in manifest["files"].items():
        got = digests.get(name, {}).get(ALGORITHM)
        if got != entry.get(ALGORITHM):
            return f"{name}: {ALGORITHM} {str(got)[:12]}..., {MANIFEST} says {str(entry.get(ALGORITHM))[:12]}..."
    return None
