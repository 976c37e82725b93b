"""The `wz` command: train, demo, export, plot, and `judge eval` (GenRM evaluation)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

USAGE = """usage: wz COMMAND [ARGS]

commands:
  train CONFIG [--set k=v ...] [--resume]   train (same as python -m wz_engine.train; use torchrun for >1 GPU)
  demo [--set k=v ...]                      train a tiny model with BRPO on CPU and report its win rate
  export RUN_DIR OUT_DIR                    export the newest checkpoint as HF safetensors + config + tokenizer
  plot RUN_DIR [--out PNG]                  plot a run's metric curves to a PNG
  judge eval ...                            evaluate a pairwise judge on preference data
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from wz_engine.train import main as train_main

        return train_main(rest)
    if command == "demo":
        from wz_engine.demo.run import main as demo_main

        return demo_main(rest)
    if command == "export":
        p = argparse.ArgumentParser(prog="wz export")
        p.add_argument("run_dir")
        p.add_argument("out_dir")
        p.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: the newest)")
        args = p.parse_args(rest)
        from wz_engine.export import export_run

        print(export_run(args.run_dir, args.out_dir, args.checkpoint))
        return 0
    if command == "plot":
        p = argparse.ArgumentParser(prog="wz plot")
        p.add_argument("run_dir")
        p.add_argument("--out", default=None, help="PNG path (default RUN_DIR/curves.png)")
        args = p.parse_args(rest)
        from wz_engine.metrics import plot_run

        print(plot_run(args.run_dir, args.out))
        return 0
    if command == "judge":
        if not rest or rest[0] != "eval":
            print("usage: wz judge eval ...", file=sys.stderr)
            return 2
        from wz_engine.judge.eval import main as judge_eval_main

        return judge_eval_main(rest[1:])
    import difflib

    close = difflib.get_close_matches(command, ["train", "demo", "export", "plot", "judge"], n=1)
    print(f"wz: unknown command {command!r}" + (f"; did you mean {close[0]!r}?" if close else ""), file=sys.stderr)
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
