"""The compile step of `python -m bench audit`, run in a child process with Triton 3.6 and no interpreter.

    python -m bench.audit_run OUT.json

Writes {"launches": [...], "errors": [...], "uncovered": [...], versions}; bench/audit.py turns it
into the table and the verdict. Not meant to be run by hand (bench/audit.py sets up PYTHONPATH).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback


def main(out_path: str) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("audit_run: TRITON_INTERPRET=1 is set; the audit compiles for a GPU", file=sys.stderr)
        return 2
    import torch
    import triton

    from bench.audit import AUDIT_TRITON
    from bench.audit_cases import all_cases, entry_kernels
    from bench.audit_compile import ptxas_resources, sm90_compile_session

    if triton.__version__ != AUDIT_TRITON:
        print(f"audit_run: triton {triton.__version__} imported from {triton.__file__}, need {AUDIT_TRITON}",
              file=sys.stderr)
        return 2
    from triton.backends.nvidia.compiler import get_ptxas

    cases = all_cases()
    errors = []
    with sm90_compile_session() as (records, set_case):
        case_of_record = []
        for case in cases:
            set_case(case.label)
            before = len(records)
            try:
                case.run()
            except Exception as e:  # noqa: BLE001 - a compile error is a finding, not a crash of the audit
                summary = "".join(traceback.format_exception_only(e)).strip().splitlines()
                errors.append({"op": case.op, "case": case.label, "dtype": str(case.dtype).removeprefix("torch."),
                               "error": " | ".join(summary[-6:])[:1500]})
            case_of_record += [case] * (len(records) - before)

    resources = {}
    launches = []
    for record, case in zip(records, case_of_record):
        if record.key not in resources:
            resources[record.key] = ptxas_resources(record.ptx)
        res = resources[record.key]
        launches.append({
            "op": case.op, "case": record.case, "kernel": record.kernel,
            "dtype": str(case.dtype).removeprefix("torch."), "constexprs": record.constexprs,
            "num_warps": record.num_warps, "num_stages": record.num_stages, "shared_bytes": record.shared_bytes,
            "key": record.key, "registers": res.registers, "spill_store_bytes": res.spill_store_bytes,
            "spill_load_bytes": res.spill_load_bytes, "stack_bytes": res.stack_bytes,
            "spill_is_failure": case.spill_is_failure,
        })
    compiled = {r.kernel for r in records}
    ptxas = subprocess.run([get_ptxas(90).path, "--version"], capture_output=True, text=True, check=True).stdout
    report = {"launches": launches, "errors": errors, "uncovered": sorted(set(entry_kernels()) - compiled),
              "triton": triton.__version__, "torch": torch.__version__,
              "ptxas": next((line.split("release")[-1].strip(" ,") for line in ptxas.splitlines()
                             if "release" in line), ptxas.strip())}
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
