"""`python -m bench audit`: compile every Triton entry kernel for sm_90 (no GPU needed) and check it.

What it does: every launch wrapper of wz_kernels runs at production shapes on storage-less fake
CUDA tensors (bench/audit_cases.py); each launch compiles for `GPUTarget("cuda", 90, 32)` instead of
running (bench/audit_compile.py), and Triton's bundled ptxas reports registers and spills. It prints
one row per distinct binary (registers, spill bytes, shared memory, warps/stages, blocks per SM as
limited by registers and by shared memory on an H100/H200 SM) and writes the table into the
"sm_90 audit" section of bench/RESULTS.md.

It exits 1 on: a compile error; a spill in a 16-bit production config, in any config of an op that
only runs in fp32 (policy loss, advantages), or in an fp32 attention config (fp32 attention on CUDA
runs these kernels); shared memory above 227 KB per block; an entry kernel (`*_kernel`, a
module-level @triton.jit of wz_kernels) that no case compiled. The fp32 logprob epilogues are shown,
and a spill there listed, but it does not fail the audit. Exit 2: the Triton 3.6 environment is
missing (the message gives the command that creates it).

Triton version: the audit compiles with Triton 3.6, the GPU machine's version, whatever the
project's environment has (CPU CI resolves a newer Triton for the interpreter). `--setup` installs
triton==3.6.0 alone into .audit/triton-3.6.0 (pip --target, no dependencies; torch is the current
environment's); the compile runs in a child process with that directory first on PYTHONPATH and
TRITON_INTERPRET unset. Set WZ_AUDIT_TRITON_DIR to keep it elsewhere.

    python -m bench audit --setup      # once per machine (~30 s, ~650 MB)
    python -m bench audit              # ~1.5 min cold on 2 busy cores, seconds with Triton's cache warm
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

AUDIT_TRITON = "3.6.0"
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
SETUP_COMMAND = "python -m bench audit --setup"
BEGIN, END = "<!-- sm90-audit:begin -->", "<!-- sm90-audit:end -->"


@dataclass(frozen=True)
class Sm90Limits:
    """Per-SM resources of an H100/H200 (compute capability 9.0), from the CUDA occupancy tables."""

    registers: int = 65536
    register_unit: int = 256  # registers are allocated per warp in units of 256
    max_warps: int = 64
    max_blocks: int = 32
    shared_bytes: int = 233472  # 228 KB per SM
    shared_reserved_per_block: int = 1024
    max_shared_per_block: int = 232448  # 227 KB: the most one block may request


SM90 = Sm90Limits()


def blocks_per_sm(registers: int, num_warps: int, shared_bytes: int, limits: Sm90Limits = SM90) -> tuple[int, int]:
    """(blocks per SM allowed by registers (and the warp cap), blocks per SM allowed by shared memory)."""
    warp_registers = math.ceil(registers * 32 / limits.register_unit) * limits.register_unit
    warps = min(limits.registers // warp_registers, limits.max_warps)
    by_regs = min(warps // num_warps, limits.max_blocks)
    by_smem = min(limits.shared_bytes // (shared_bytes + limits.shared_reserved_per_block), limits.max_blocks)
    return by_regs, by_smem


def _config(constexprs: dict) -> str:
    """Constexprs that shape the code, compactly (flags off and None dropped)."""
    parts = []
    for name, value in constexprs.items():
        if value is None or value is False:
            continue
        parts.append(name if value is True else f"{name}={value}")
    return " ".join(parts)


# ----------------------------------------------------------------------------- rows and rules


def group_rows(launches: list[dict]) -> list[dict]:
    """One row per distinct binary (same Triton hash), listing every case that compiled it."""
    rows: dict[str, dict] = {}
    for launch in launches:
        row = rows.get(launch["key"])
        if row is None:
            by_regs, by_smem = blocks_per_sm(launch["registers"], launch["num_warps"], launch["shared_bytes"])
            row = rows[launch["key"]] = dict(launch, cases=[], blocks_by_regs=by_regs, blocks_by_smem=by_smem,
                                             config=_config(launch["constexprs"]))
        row["cases"].append(launch["case"])
        row["spill_is_failure"] = row["spill_is_failure"] or launch["spill_is_failure"]
    return list(rows.values())


def failures(rows: list[dict], errors: list[dict], uncovered: list[str]) -> list[str]:
    found = [f"compile error: {e['op']} [{e['case']}] {e['dtype']}: {e['error']}" for e in errors]
    for r in rows:
        spill = r["spill_store_bytes"] + r["spill_load_bytes"]
        where = f"{r['kernel']} {r['dtype']} [{r['config']}] warps={r['num_warps']} stages={r['num_stages']}"
        if spill and r["spill_is_failure"]:
            found.append(f"spill: {where}: {r['spill_store_bytes']} B stores, {r['spill_load_bytes']} B loads "
                         f"at {r['registers']} registers ({r['cases'][0]})")
        if r["shared_bytes"] > SM90.max_shared_per_block:
            found.append(f"shared memory: {where}: {r['shared_bytes']} B > {SM90.max_shared_per_block} B per block")
    found += [f"not audited: entry kernel {name} was compiled by no audit case" for name in uncovered]
    return found


def render(report: dict, fails: list[str]) -> str:
    rows = group_rows(report["launches"])
    lines = [
        (f"Compile-only audit for sm_90 (H100/H200) taken {report['date']} on a CPU machine: "
         f"`python -m bench audit` (triton {report['triton']}, ptxas {report['ptxas']}, torch {report['torch']}). "
         "Registers, spills and shared memory are facts of the compiled code; blocks/SM are what those "
         "resources allow on one SM (65536 registers, 228 KB shared memory, 64 warps, 32 blocks)."),
        "",
        ("| op | kernel | dtype | config | warps/stages | regs | spill B (st/ld) | smem KB | blocks/SM regs | "
         "blocks/SM smem | cases |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["op"], r["kernel"], r["dtype"], r["config"])):
        spill = f"{r['spill_store_bytes']}/{r['spill_load_bytes']}"
        if r["spill_store_bytes"] + r["spill_load_bytes"]:
            spill = f"**{spill}**" + ("" if r["spill_is_failure"] else " (not failing)")
        cases = r["cases"][0] + (f" (+{len(r['cases']) - 1})" if len(r["cases"]) > 1 else "")
        lines.append(f"| {r['op']} | {r['kernel']} | {r['dtype']} | {r['config']} | {r['num_warps']}/{r['num_stages']} "
                     f"| {r['registers']} | {spill} | {r['shared_bytes'] / 1024:.1f} | {r['blocks_by_regs']} "
                     f"| {r['blocks_by_smem']} | {cases} |")
    lines.append("")
    if fails:
        lines += ["Failures:", "", *(f"- {f}" for f in fails)]
    else:
        lines.append("No failures: no compile error, no spill in a config where a spill fails the audit (all but "
                     "the fp32 logprob epilogues), shared memory within 227 KB per block, every entry kernel "
                     "audited.")
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    """Replace the audit section of `path` (between the markers), or append it."""
    text = path.read_text() if path.exists() else ""
    section = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## sm_90 audit (compile-only, no GPU)\n\n{section}\n"
    path.write_text(text)


# ----------------------------------------------------------------------------- the Triton 3.6 environment


def audit_env_dir() -> Path:
    return Path(os.environ.get("WZ_AUDIT_TRITON_DIR", REPO / ".audit" / f"triton-{AUDIT_TRITON}"))


def _installed_triton() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def audit_pythonpath() -> tuple[bool, str | None]:
    """(ready, directory to put first on PYTHONPATH or None when the current Triton is the audited one)."""
    if _installed_triton() == AUDIT_TRITON:
        return True, None
    env = audit_env_dir()
    return (env / f"triton-{AUDIT_TRITON}.dist-info").is_dir(), str(env)


def setup() -> int:
    env = audit_env_dir()
    if (env / f"triton-{AUDIT_TRITON}.dist-info").is_dir():
        print(f"triton {AUDIT_TRITON} already in {env}")
        return 0
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", str(env),
           f"triton=={AUDIT_TRITON}"]
    print(" ".join(cmd))
    return subprocess.run(cmd, check=False).returncode


def run_child(json_path: Path) -> int:
    ready, pythonpath = audit_pythonpath()
    if not ready:
        print(f"bench audit: triton {AUDIT_TRITON} (the GPU machine's version) is not installed in {pythonpath}; "
              f"create it with: {SETUP_COMMAND}", file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = [p for p in (pythonpath, str(REPO), env.get("PYTHONPATH")) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    child = [sys.executable, "-m", "bench.audit_run", str(json_path)]
    return subprocess.run(child, env=env, cwd=REPO, check=False).returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench audit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setup", action="store_true", help=f"install triton {AUDIT_TRITON} for the audit and exit")
    p.add_argument("--results", type=Path, default=RESULTS, help="markdown file whose audit section is rewritten")
    p.add_argument("--no-write", action="store_true", help="print only; leave the results file alone")
    p.add_argument("--json", type=Path, default=None, help="also keep the raw per-launch report here")
    args = p.parse_args(argv)
    if args.setup:
        return setup()
    with tempfile.TemporaryDirectory() as tmp:
        json_path = args.json or Path(tmp) / "audit.json"
        code = run_child(json_path)
        if code != 0:
            print(f"bench audit: the compile step failed (exit {code})", file=sys.stderr)
            return code
        report = json.loads(json_path.read_text())
    report["date"] = datetime.date.today().isoformat()
    fails = failures(group_rows(report["launches"]), report["errors"], report["uncovered"])
    body = render(report, fails)
    print(body)
    if not args.no_write:
        write_section(args.results, body)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
