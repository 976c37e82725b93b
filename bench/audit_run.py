"""The compile step of `python -m bench audit`, run in a child process with Triton 3.6 and no interpreter.

    python -m bench.audit_run OUT.json [--workers N]

Writes {"launches": [...], "errors": [...], "uncovered": [...], versions}; bench/audit.py turns it
into the table and the verdict. Not meant to be run by hand (bench/audit.py sets up PYTHONPATH).
The cases are compiled by N worker processes (default: one per core, at most 8): each compile is
a single-threaded MLIR pipeline plus a ptxas run, so a GPU machine's 16 cores take ~10 s.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import subprocess
import sys
import traceback


def compile_cases(indices: list[int]) -> tuple[list[dict], list[dict]]:
    """Compile the cases `indices` of `all_cases()` for sm_90: (launch rows, compile errors)."""
    from bench.audit_cases import all_cases
    from bench.audit_compile import ptxas_resources, sm90_compile_session

    cases = all_cases()
    errors, ran = [], []
    with sm90_compile_session() as (records, set_case):
        for i in indices:
            case = cases[i]
            set_case(case.label)
            before = len(records)
            try:
                case.run()
            except Exception as e:  # noqa: BLE001 - a compile error is a finding, not a crash of the audit
                summary = "".join(traceback.format_exception_only(e)).strip().splitlines()
                errors.append({"op": case.op, "case": case.label, "dtype": str(case.dtype).removeprefix("torch."),
                               "error": " | ".join(summary[-6:])[:1500], "index": i})
            ran += [(i, case)] * (len(records) - before)
    resources, launches = {}, []
    for record, (i, case) in zip(records, ran):
        if record.key not in resources:
            resources[record.key] = ptxas_resources(record.ptx)
        res = resources[record.key]
        launches.append({
            "op": case.op, "case": record.case, "kernel": record.kernel,
            "dtype": str(case.dtype).removeprefix("torch."), "constexprs": record.constexprs,
            "num_warps": record.num_warps, "num_stages": record.num_stages, "shared_bytes": record.shared_bytes,
            "key": record.key, "registers": res.registers, "spill_store_bytes": res.spill_store_bytes,
            "spill_load_bytes": res.spill_load_bytes, "stack_bytes": res.stack_bytes,
            "spill_is_failure": case.spill_is_failure, "index": i,
        })
    return launches, errors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.audit_run")
    p.add_argument("out", help="where the JSON report goes")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("audit_run: TRITON_INTERPRET=1 is set; the audit compiles for a GPU", file=sys.stderr)
        return 2
    import torch
    import triton

    from bench.audit import AUDIT_TRITON
    from bench.audit_cases import all_cases, entry_kernels

    if triton.__version__ != AUDIT_TRITON:
        print(f"audit_run: triton {triton.__version__} imported from {triton.__file__}, need {AUDIT_TRITON}",
              file=sys.stderr)
        return 2
    from triton.backends.nvidia.compiler import get_ptxas

    count = len(all_cases())
    workers = max(1, min(args.workers, count))
    shards = [list(range(w, count, workers)) for w in range(workers)]
    if workers == 1:
        results = [compile_cases(shards[0])]
    else:  # spawn: every worker imports torch and triton afresh (no forked driver or thread state)
        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        with pool:
            results = list(pool.map(compile_cases, shards))
    launches = sorted((row for rows, _ in results for row in rows), key=lambda row: row.pop("index"))
    errors = sorted((e for _, errs in results for e in errs), key=lambda e: e.pop("index"))
    compiled = {row["kernel"] for row in launches}
    ptxas = subprocess.run([get_ptxas(90).path, "--version"], capture_output=True, text=True, check=True).stdout
    report = {"launches": launches, "errors": errors, "uncovered": sorted(set(entry_kernels()) - compiled),
              "triton": triton.__version__, "torch": torch.__version__,
              "ptxas": next((line.split("release")[-1].strip(" ,") for line in ptxas.splitlines()
                             if "release" in line), ptxas.strip())}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
