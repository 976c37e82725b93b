"""`python -m bench audit` (bench/audit.py): its verdict rules on constructed launches, and the real
sm_90 compile of every Triton entry kernel.

The real run needs Triton 3.6 (the GPU machine's version) beside the project's Triton: `python -m
bench audit --setup` installs it into .audit/. CI (.ci/run) does that and sets WZ_AUDIT_REQUIRED=1,
so there a missing environment fails this test; on a developer machine without it the test skips
and names the command.
"""

import json
import os
import subprocess
import sys

import pytest

from bench import audit


def _launch(**overrides):
    base = {"op": "attention", "case": "Hq16/Hkv4 D128 causal", "kernel": "_k_kernel", "dtype": "bfloat16",
            "constexprs": {"BLOCK_M": 64, "CAUSAL": True, "PRECISION": None, "UPCAST": False},
            "num_warps": 8, "num_stages": 2, "shared_bytes": 96 * 1024, "key": "a", "registers": 190,
            "spill_store_bytes": 0, "spill_load_bytes": 0, "stack_bytes": 0, "spill_is_failure": True}
    return {**base, **overrides}


def test_blocks_per_sm_from_registers_and_shared_memory():
    # 255 registers: 8192 per warp (units of 256) -> 8 warps of 65536 -> one block of 8 warps
    assert audit.blocks_per_sm(255, 8, 0) == (1, 32)
    assert audit.blocks_per_sm(32, 4, 0) == (16, 32)  # the 64-warp cap, not registers
    assert audit.blocks_per_sm(168, 4, 48 * 1024) == (3, 4)  # 5376 per warp -> 12 warps; 233472 // 50176
    assert audit.blocks_per_sm(64, 4, 227 * 1024)[1] == 1


def test_ptxas_log_is_parsed():
    log = """ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_varlen_attention_bwd_dkdv_kernel' for 'sm_90a'
ptxas info    : Function properties for _varlen_attention_bwd_dkdv_kernel
    376 bytes stack frame, 380 bytes spill stores, 376 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 376 bytes cumulative stack size
"""
    from bench.audit_compile import parse_ptxas_log

    res = parse_ptxas_log(log)
    assert (res.registers, res.spill_store_bytes, res.spill_load_bytes, res.stack_bytes) == (255, 380, 376, 376)
    with pytest.raises(ValueError, match="unrecognised"):
        parse_ptxas_log("ptxas fatal : something else")


def test_failure_rules():
    launches = [
        _launch(key="clean"),
        _launch(key="clean", case="Hq32/Hkv8 D128 causal"),  # the same binary: one row, two cases
        _launch(key="spill16", spill_store_bytes=8, spill_load_bytes=4),
        _launch(key="spill32", dtype="float32", spill_store_bytes=8, spill_is_failure=False),
        _launch(key="smem", shared_bytes=audit.SM90.max_shared_per_block + 1),
    ]
    rows = audit.group_rows(launches)
    assert [len(r["cases"]) for r in rows] == [2, 1, 1, 1]
    assert rows[0]["config"] == "BLOCK_M=64 CAUSAL"
    errors = [{"op": "logprob", "case": "V=151936", "dtype": "bfloat16", "error": "CompilationError: boom"}]
    fails = audit.failures(rows, errors, ["_orphan_kernel"])
    assert len(fails) == 4
    assert fails[0].startswith("compile error: logprob [V=151936] bfloat16: CompilationError: boom")
    assert fails[1].startswith("spill: _k_kernel bfloat16 [BLOCK_M=64 CAUSAL] warps=8 stages=2: 8 B stores, 4 B loads")
    assert fails[2].startswith("shared memory: _k_kernel") and "232449 B > 232448 B" in fails[2]
    assert fails[3] == "not audited: entry kernel _orphan_kernel was compiled by no audit case"
    assert audit.failures([rows[0], rows[2]], [], []) == []  # the fp32 spill is listed in the table, not failed


def test_results_section_is_replaced_in_place(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Other section\n\nkeep me\n")
    audit.write_section(results, "first table")
    audit.write_section(results, "second table")
    text = results.read_text()
    assert text.count(audit.BEGIN) == 1 and "second table" in text and "first table" not in text
    assert text.startswith("# Benchmark results\n\n## Other section\n\nkeep me\n")


@pytest.mark.slow
def test_every_triton_kernel_compiles_for_sm90_without_spills(tmp_path):
    """The audit itself: every entry kernel at production shapes, through the launch wrappers."""
    ready, where = audit.audit_pythonpath()
    if not ready:
        message = (f"the Triton {audit.AUDIT_TRITON} audit environment is missing ({where}); "
                   f"create it with: {audit.SETUP_COMMAND}")
        if os.environ.get("WZ_AUDIT_REQUIRED") == "1":
            pytest.fail(message)
        pytest.skip(message)
    results, report_path = tmp_path / "RESULTS.md", tmp_path / "audit.json"
    run = subprocess.run([sys.executable, "-m", "bench", "audit", "--results", str(results), "--json",
                          str(report_path)], cwd=audit.REPO, capture_output=True, text=True, timeout=1800,
                         check=False)
    assert run.returncode == 0, f"{run.stdout[-8000:]}\n{run.stderr[-4000:]}"
    report = json.loads(report_path.read_text())
    assert report["triton"] == audit.AUDIT_TRITON and not report["errors"] and not report["uncovered"]
    compiled = {launch["kernel"] for launch in report["launches"]}
    assert {"_varlen_attention_fwd_kernel", "_varlen_attention_bwd_dkdv_kernel", "_varlen_attention_bwd_dq_kernel",
            "_logprob_fwd_kernel", "_policy_loss_fwd_bwd_kernel", "_group_advantages_fwd_kernel"} <= compiled
    assert all(launch["registers"] > 0 for launch in report["launches"])
    dtypes = {(launch["op"], launch["dtype"]) for launch in report["launches"]}
    assert {("attention", "bfloat16"), ("attention", "float16"), ("attention", "float32"),
            ("logprob", "bfloat16"), ("logprob", "float32")} <= dtypes
    assert "_varlen_attention_bwd_dkdv_kernel" in results.read_text()
