"""Kill points for the kill -9 tests (tests/engine/test_chaos.py): a process dies where a test says.

`WZ_CHAOS_KILL="<point>:<n>[:<rank>]"` makes the process SIGKILL itself the n-th time it reaches the
named point (on every rank, or on `<rank>` only). `WZ_CHAOS_LOG=<file>` first gets one line
`<point> <n> <rank>` per kill, so a test can check that each kill happened where it was meant to.
Without the variable (every real run) a point is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

POINTS = (
    "run_claimed",                  # the run directory is claimed (run.json written), nothing built yet
    "optim_step_begin",             # inside optimizer.step(): gradients ready, parameters not yet updated
    "optim_step_end",               # inside optimizer.step(): parameters updated, scheduler not stepped
    "metrics_logged",               # a step's metrics row is written, its checkpoint not
    "ckpt_begin",                   # the checkpoint's .tmp folder exists, nothing in it
    "ckpt_dcp_shards_written",      # DCP shards written, DCP's .metadata not (rank 0 only)
    "ckpt_model_optim_written",     # model/optimizer written, this rank's trainer state not
    "ckpt_trainer_state_written",   # this rank's files written, other ranks may still be writing
    "ckpt_manifest_written",        # manifest written (rank 0), folder not yet renamed into place
    "ckpt_renamed",                 # checkpoint in place, older ones not yet pruned (rank 0)
    "resumed",                      # a resumed run loaded its checkpoint and trimmed its logs
)
ENV_KILL = "WZ_CHAOS_KILL"
ENV_LOG = "WZ_CHAOS_LOG"

_hits: Counter = Counter()


def point(name: str) -> None:
    """Count a pass through kill point `name`; SIGKILL this process when WZ_CHAOS_KILL names it."""
    spec = os.environ.get(ENV_KILL)
    if not spec:
        return
    target, n, rank = _parse(spec)
    if name != target:
        return
    _hits[name] += 1
    my_rank = int(os.environ.get("RANK", "0"))
    if _hits[name] == n and (rank is None or rank == my_rank):
        log = os.environ.get(ENV_LOG)
        if log:
            with open(log, "a") as f:
                f.write(f"{name} {n} {my_rank}\n")
        os.kill(os.getpid(), signal.SIGKILL)


def arm_optimizer(optimizer) -> None:
    """Kill points inside `optimizer.step()` (its pre- and post-hooks); nothing when no kill is set."""
    if os.environ.get(ENV_KILL):
        optimizer.register_step_pre_hook(lambda *_: point("optim_step_begin"))
        optimizer.register_step_post_hook(lambda *_: point("optim_step_end"))


def _parse(spec: str) -> tuple[str, int, int | None]:
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] not in POINTS or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(f"{ENV_KILL}={spec!r}: expected <point>:<n>[:<rank>] with a point from {POINTS}")
    return parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None
