"""Entry point: `torchrun --nproc_per_node=N -m wz_engine.train run.toml [--set k=v] [--resume | --overwrite]`.

Plain `python -m wz_engine.train run.toml` runs the same code at world size 1. The step itself lives
in `trainer.py`, the builders in `build.py`, the HF export in `export.py`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from wz_engine import distributed as wzdist
from wz_engine.checkpoint import CheckpointError
from wz_engine.config import ConfigError, load_config
from wz_engine.data import DataError
from wz_engine.monitors import ZeroSignalError
from wz_engine.optional_deps import check_optional_deps
from wz_engine.rundir import RunDirError
from wz_engine.trainer import Trainer

log = logging.getLogger("wz_engine")


def build_parser(prog: str = "wz train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train a policy with BRPO (or GRPO-family estimators).",
                                epilog="Every config key with its default and meaning: wz config list. "
                                       "Validate a run file without training: wz config check CONFIG.")
    p.add_argument("config", help="run file (TOML or YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=1e-6 (repeatable)")
    run_dir = p.add_mutually_exclusive_group()
    run_dir.add_argument("--resume", action="store_true",
                         help="continue the run in train.output_dir from its newest checkpoint that verifies")
    run_dir.add_argument("--overwrite", action="store_true",
                         help="train.output_dir holds an earlier run: move it aside to <output_dir>.old-<timestamp> "
                              "(nothing is deleted) and start a new run. Without --resume or --overwrite, a "
                              "directory that holds a run is refused")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = check_optional_deps(load_config(args.config, args.overrides))
    except ConfigError as e:  # a user error: the message names the key, no traceback needed
        print(f"wz train: config error: {e}", file=sys.stderr)
        return 2
    try:
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
    except (DataError, RunDirError, CheckpointError) as e:  # a data file, or what train.output_dir holds
        kind = "data error: " if isinstance(e, DataError) else ""  # DataError names the file and line
        print(f"wz train: {kind}{e}", file=sys.stderr)
        wzdist.shutdown()
        return 2
    try:
        last = trainer.fit()
        if trainer.info.is_main and last:
            keys = ("reward/mean", "loss", "response/length_mean", "tokens_per_s")
            log.info("done: step %d %s", trainer.step_idx, {k: last.get(k) for k in keys})
    except ZeroSignalError as e:  # train.abort_on_zero_signal: the message says why and what to check
        print(f"wz train: stopped: {e}", file=sys.stderr)
        return 3
    finally:
        wzdist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
