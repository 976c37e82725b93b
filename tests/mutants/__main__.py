"""python -m tests.mutants [--list | --check] [--only NAME ...] [--shard I/N] [--jobs J] [--timeout S]

Exit status: 0 when every selected mutant is caught (and, unless --no-baseline, every selection passes
on the unmutated tree); 1 on a missed, stale, timed-out or broken mutant.
"""

from __future__ import annotations

import argparse
import sys
import time

from tests.mutants.catalog import MUTANTS, Mutant
from tests.mutants.runner import StalePatch, format_result, patched_text, run_baseline, run_mutants


def select(names: list[str] | None = None, shard: str | None = None) -> list[Mutant]:
    """Mutants by name (unknown names are an error) and/or shard "i/n" (every n-th, from i)."""
    chosen = MUTANTS
    if names:
        by_name = {m.name: m for m in MUTANTS}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise SystemExit(f"unknown mutant(s): {', '.join(unknown)} (see --list)")
        chosen = [by_name[n] for n in names]
    if shard:
        i, n = (int(x) for x in shard.split("/"))
        if not 0 <= i < n:
            raise SystemExit(f"--shard {shard}: need 0 <= i < n")
        chosen = chosen[i::n]
    return chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.mutants", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="print the catalogue and exit")
    ap.add_argument("--check", action="store_true", help="only check that every patch applies exactly once")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants")
    ap.add_argument("--shard", metavar="I/N", help="run every N-th mutant starting at I")
    ap.add_argument("--jobs", type=int, default=2, help="mutants run in parallel (default 2)")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds per mutant's selection (default 300)")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip running the selections on the unmutated tree first")
    args = ap.parse_args(argv)
    mutants = select(args.only, args.shard)

    if args.list:
        for m in mutants:
            print(f"{m.name:48s} {m.file:34s} {m.description}")
        print(f"{len(mutants)} mutants")
        return 0
    stale = []
    for m in mutants:
        try:
            patched_text(m)
        except (StalePatch, SyntaxError) as e:
            stale.append(f"{m.name}: {e}")
    if args.check or stale:
        print("\n".join(stale) or f"all {len(mutants)} patches apply")
        return 1 if stale else 0

    t0 = time.perf_counter()
    if not args.no_baseline:
        ok, out = run_baseline(mutants, timeout=max(args.timeout, 900.0))
        print(f"baseline (the selections on the unmutated tree): {'pass' if ok else 'FAIL'} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if not ok:
            print(out[-5000:])
            return 1
    results = run_mutants(mutants, jobs=args.jobs, timeout=args.timeout,
                          on_result=lambda r: print(format_result(r), flush=True))
    caught = sum(r.ok for r in results)
    print(f"\nmutation score: {caught}/{len(results)} caught ({time.perf_counter() - t0:.0f} s, "
          f"{args.jobs} jobs)")
    for status in ("missed", "stale", "timeout", "broken"):
        names = [r.mutant.name for r in results if r.status == status]
        if names:
            print(f"{status}: {', '.join(names)}")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
