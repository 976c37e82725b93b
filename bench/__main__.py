"""`python -m bench <name> [--device cpu|cuda] [--size quick|headline|full]`: run bench/bench_<name>.py.

Prints the table and writes bench/results/<name>_<device>.csv (after every case) and .png.
Exits 1 when ours crashed or disagreed with its reference in any case, 0 otherwise (a peer that fails
or is not installed is a row, not a failure). `python -m bench list` shows the available benchmarks;
`python -m bench audit ...` runs bench/audit.py (the sm_90 compile audit) where it exists.
"""

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

from bench.harness import DEFAULT_COMPILE_BUDGET_S, SIZES, BenchmarkFailed, default_device, run_cases
from bench.report import RATIO


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["audit"]:  # its own arguments
        if importlib.util.find_spec("bench.audit") is None:
            print("python -m bench audit: bench/audit.py is not in this tree", file=sys.stderr)
            return 2
        return importlib.import_module("bench.audit").main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="benchmark name (bench/bench_<name>.py), 'list' or 'audit'")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if present")
    p.add_argument("--size", default="full", choices=SIZES,
                   help="quick: smoke shapes; headline: the one shape per op the targets name; "
                        "full: every table")
    p.add_argument("--quick", action="store_true", help="same as --size quick")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--no-plot", action="store_true", help="no PNG")
    p.add_argument("--compile-budget", type=float, default=DEFAULT_COMPILE_BUDGET_S, metavar="SECONDS",
                   help="a peer whose first call (torch.compile, block masks) takes longer is skipped "
                        "(0: no budget); default %(default)s")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where the CSV / PNG go (default bench/results)")
    p.add_argument("--summary", type=Path, default=None, metavar="FILE",
                   help=f"append the one-line summary (cases, ours' check, {RATIO} per peer) to FILE")
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
    size = "quick" if args.quick else args.size
    status = 0
    try:
        run_cases(args.name, mod.cases(device, size), device, reps=args.reps, memory=not args.no_memory,
                  out_dir=args.out_dir, plot=not args.no_plot, compile_budget_s=args.compile_budget or None,
                  summary_file=args.summary)
    except BenchmarkFailed as e:
        print(f"FAILED {e}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:  # bench/gpu_all.sh's timeouts send SIGINT
        print(f"{args.name}: interrupted; the CSV holds every provider that finished", file=sys.stderr)
        status = 130
    return status


if __name__ == "__main__":
    sys.exit(main())
