"""kill -9 anywhere, resume, and end bit-identical to a run that was never interrupted.

A world-size-1 run (two PPO epochs: two optimizer steps per rollout step) and a 2-process torchrun
(gloo, FSDP2) run of the tiny config are each SIGKILLed at 10 seeded random kill points
(wz_engine/chaos.py: inside the optimizer step, inside every stage of a checkpoint save, after a
metrics row, at start-up and right after a resume; each kill is confirmed by the line the dying
process writes) plus once from outside at a random moment, and resumed with `--resume` after each. The final model and optimizer (DCP), every rank's trainer state (data
position, scheduler, RNG states, sampler), the retained checkpoints and metrics.jsonl (but its
wall-clock fields) must equal the uninterrupted run's.
"""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from wz_engine import chaos, rundir
from wz_engine import checkpoint as ckpt
from wz_engine.train import main as train_main

TINY = Path(__file__).with_name("tiny_run.toml")
STEPS = 6
ARGS = ["--set", f"train.steps={STEPS}", "--set", "checkpoint.every=1", "--set", "checkpoint.keep=2"]
# World size 1 takes two optimizer steps per rollout step (two PPO epochs), so kills also land between
# the updates of one rollout batch.
ARGS_BY_WORLD = {1: [*ARGS, "--set", "algorithm.ppo_epochs=2"], 2: ARGS}
WALL_CLOCK = ("time/", "tokens_per_s", "sync/seconds", "sync/gbps")
PER_STEP = [p for p in chaos.POINTS if p not in ("run_claimed", "resumed")]
RANK0_ONLY = ("ckpt_dcp_shards_written", "ckpt_manifest_written", "ckpt_renamed", "metrics_logged")  # rank 0 logs
NAMED_KILLS = 10


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in (chaos.ENV_KILL, chaos.ENV_LOG, "TRITON_INTERPRET")}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def _command(world: int, out: Path, resume: bool) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"] \
        if world > 1 else [sys.executable]
    return [*launcher, "-m", "wz_engine.train", str(TINY), *ARGS_BY_WORLD[world], "--set", f'train.output_dir="{out}"',
            *(["--resume"] if resume else [])]


def _run(world: int, out: Path, resume: bool, env: dict, kill_after_row: int | None = None,
         delay: float = 0.0) -> tuple[int, str]:
    """Run to the end (or death) -> (return code, stderr tail); with `kill_after_row`, SIGKILL every
    process of the run at once (torchrun's agent and its workers, which run in sessions of their own: a
    machine going down) `delay` seconds after metrics.jsonl has that many rows."""
    proc = subprocess.Popen(_command(world, out, resume), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_after_row is not None:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if len(_rows(out, torn_ok=True)) >= kill_after_row:
                time.sleep(delay)
                _kill_tree(proc.pid)
                break
            time.sleep(0.005)
    try:
        _, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        raise
    return proc.returncode, err[-4000:]


def _kill_tree(pid: int) -> None:
    """SIGKILL `pid` and all its descendants at once, and wait until they are gone (their locks freed)."""
    pids = [pid, *_descendants(pid)]
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids[1:]) and time.monotonic() < deadline:
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in map(int, (task / "children").read_text().split()):
                found += [child, *_descendants(child)]
    return found


def _rows(out: Path, torn_ok: bool = False) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            if not torn_ok:
                raise
    return rows


def _deterministic(rows: list[dict]) -> list[str]:
    return [json.dumps({k: v for k, v in r.items() if not k.startswith(WALL_CLOCK)}, sort_keys=True) for r in rows]


def _assert_same(a, b, where="") -> None:
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, where


def _final_state(out: Path, tmp: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    last = out / "checkpoints" / f"step_{STEPS:08d}"
    flat = tmp / f"{out.name}_final.pt"
    dcp_to_torch_save(str(last / ckpt.MODEL_OPTIM), str(flat))
    state = {"model_optim": torch.load(flat, weights_only=False)}
    for f in sorted(last.glob("trainer_rank*.pt")):
        state[f.name] = torch.load(f, weights_only=False)
    return state


def _draw_kill(rng: random.Random, world: int, done: int, resumed_step: int,
               order: list[str]) -> tuple[str, int, int | None]:
    """(point, n-th hit, rank): every per-step point once first (seeded order), then random ones; never
    a hit the run cannot reach any more (it resumes at `resumed_step` of STEPS)."""
    remaining = STEPS - resumed_step
    if remaining == 0:
        point = rng.choice(["run_claimed", "resumed"])
    else:
        point = order[done] if done < len(order) else rng.choice(PER_STEP + ["run_claimed", "resumed"])
    n = 1 if point in ("run_claimed", "resumed") else rng.choice([1, 1, 2]) if remaining >= 2 else 1
    if world == 1 and point.startswith("optim_step") and n == 1:
        n = rng.choice([1, 2])  # two optimizer steps per rollout step: hit 2 is the second update
    rank = None if world == 1 or point in RANK0_ONLY else rng.choice([0, 1, None])
    if world > 1 and point in RANK0_ONLY:
        rank = 0
    return point, n, rank


def _assert_every_checkpoint_verifies(out: Path, kill: str) -> None:
    """A kill may leave `.tmp` / `.pruned` folders, but never a checkpoint folder in place that does not verify."""
    for _, path in ckpt.step_dirs(out):
        assert ckpt.newest_verified(out, None, candidates=[path]).path == path, (kill, path)


def _resumed_step(out: Path) -> int:
    run = rundir.read_run(out)
    return (ckpt.newest_verified(out, run.run_id).step or 0) if run else 0


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_kill_9_anywhere_then_resume_is_bit_identical(tmp_path, world):
    rng = random.Random(1234 + world)
    straight, chaotic = tmp_path / "straight", tmp_path / "chaotic"
    if world == 1:
        assert train_main([str(TINY), *ARGS_BY_WORLD[1], "--set", f'train.output_dir="{straight}"']) == 0
    else:
        rc, err = _run(world, straight, False, _env())
        assert rc == 0, err

    kill_log = tmp_path / "kills.txt"
    order = PER_STEP[:]
    rng.shuffle(order)
    started, kills = False, []
    while len(kills) < NAMED_KILLS:
        resumed = _resumed_step(chaotic) if started else 0
        point, n, rank = _draw_kill(rng, world, len(kills), resumed, order)
        spec = f"{point}:{n}" + (f":{rank}" if rank is not None else "")
        rc, err = _run(world, chaotic, started, _env(WZ_CHAOS_KILL=spec, WZ_CHAOS_LOG=str(kill_log)))
        logged = kill_log.read_text().splitlines() if kill_log.is_file() else []
        assert rc != 0 and len(logged) > len(kills), (spec, rc, err)
        if world == 1:
            assert rc == -signal.SIGKILL
        assert logged[-1].split()[:2] == [point, str(n)]
        kills.append(spec)
        started = True
        _assert_every_checkpoint_verifies(chaotic, spec)
    assert {k.split(":")[0] for k in kills} >= set(PER_STEP)
    print(f"world {world}: killed at", ", ".join(kills))

    # One kill from outside at a random moment (not a named point) while steps are running (it may miss
    # when the last steps are quicker than the delay; the run then simply ends).
    resumed = _resumed_step(chaotic)
    if resumed < STEPS - 1:
        _run(world, chaotic, True, _env(), kill_after_row=resumed + 1, delay=rng.uniform(0.0, 0.3))
        _assert_every_checkpoint_verifies(chaotic, "from outside")
    rc, err = _run(world, chaotic, True, _env())
    assert rc == 0, err

    assert _deterministic(_rows(chaotic)) == _deterministic(_rows(straight))
    assert [r["step"] for r in _rows(chaotic)] == list(range(1, STEPS + 1))
    listing = sorted(p.name for p in (chaotic / "checkpoints").iterdir())
    assert listing == sorted(p.name for p in (straight / "checkpoints").iterdir())
    assert listing == [f"step_{STEPS - 1:08d}", f"step_{STEPS:08d}"]
    _assert_same(_final_state(chaotic, tmp_path), _final_state(straight, tmp_path))
