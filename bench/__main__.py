"""`python -m bench <name> [--device cpu|cuda] [--quick]`: run bench/bench_<name>.py as a table.

Prints the table and writes bench/results/<name>_<device>.csv and .png.
`python -m bench list` shows the available benchmarks.
"""

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

from bench.harness import default_device, run_cases


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("name", help="benchmark name (bench/bench_<name>.py), or 'list'")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if present")
    p.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    args = p.parse_args(argv)
    names = available()
    if args.name == "list":
        print("\n".join(names))
        return 0
    if args.name not in names:
        print(f"unknown benchmark {args.name!r}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    device = args.device or default_device()
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda but no CUDA device is present", file=sys.stderr)
            return 2
    mod = importlib.import_module(f"bench.bench_{args.name}")
    run_cases(args.name, mod.cases(device, args.quick), device, reps=args.reps, memory=not args.no_memory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
