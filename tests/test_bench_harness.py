"""The benchmark harness fails when ours is wrong or crashes, and only then.

Tiny benchmark definitions whose "ours" provider is correct, perturbed, or crashing, run through the
real `run_cases` and the real `python -m bench` entry point (with the definition registered as a
benchmark module).
"""

from __future__ import annotations

import csv
import math
import sys
import time
import types

import pytest
import torch

import bench.__main__ as bench_main
from bench import harness
from bench.checks import Check, CheckFailed, compare, relative_error
from bench.harness import BenchmarkFailed, Case, Skipped, run_cases
from bench.report import RATIO


def _softmax_case(label: str = "N=64", *, ours_perturbation: float = 0.0, ours_crashes: bool = False,
                  peers: dict | None = None) -> Case:
    """ours: a softmax (optionally perturbed or crashing); reference: the float64 softmax."""
    x = torch.randn(64, 33, generator=torch.Generator().manual_seed(0))

    def ours():
        if ours_crashes:
            raise RuntimeError("kernel launch failed")
        return torch.softmax(x, -1) * (1 + ours_perturbation)

    providers = {"ours": ours, "torch": lambda: torch.softmax(x, -1), **(peers or {})}
    check = Check(ours, lambda: torch.softmax(x.double(), -1), dtype=torch.float32)
    return Case(label, providers, check=check)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_correct_ours_passes_and_reports_its_error(tmp_path):
    rows = run_cases("tiny", [_softmax_case()], "cpu", reps=2, out_dir=tmp_path, plot=False)
    ours = next(r for r in rows if r["provider"] == "ours")
    assert ours["status"] == "ok" and ours["check_rel_err"] < 1e-6
    assert [r["status"] for r in _rows(tmp_path / "tiny_cpu.csv")] == ["ok", "ok"]


def test_perturbed_ours_fails_naming_the_case_after_timing_the_rest(tmp_path):
    cases = [_softmax_case("N=64 good"), _softmax_case("N=64 bad", ours_perturbation=0.01)]
    with pytest.raises(BenchmarkFailed, match=r"N=64 bad.*rel err") as err:
        run_cases("tiny", cases, "cpu", reps=2, out_dir=tmp_path, plot=False)
    assert "N=64 good" not in str(err.value)
    rows = {(r["case"], r["provider"]): r for r in _rows(tmp_path / "tiny_cpu.csv")}
    assert rows[("N=64 bad", "ours")]["status"].startswith("FAILED check")
    assert rows[("N=64 bad", "torch")]["status"] == "ok"  # the peers of the failing case still ran
    assert rows[("N=64 good", "ours")]["status"] == "ok"


def test_crashing_ours_fails_with_the_cause(tmp_path):
    with pytest.raises(BenchmarkFailed, match=r"N=64.*RuntimeError: kernel launch failed"):
        run_cases("tiny", [_softmax_case(ours_crashes=True)], "cpu", reps=2, out_dir=tmp_path, plot=False)


def test_ours_crashing_only_when_timed_fails(tmp_path):
    calls = {"n": 0}

    def flaky():  # right in the check, then fails in the timed calls (e.g. an OOM at a later call)
        calls["n"] += 1
        if calls["n"] > 1:
            raise torch.cuda.OutOfMemoryError("out of memory")
        return torch.ones(3)

    case = Case("N=3", {"ours": flaky}, check=Check(flaky, lambda: torch.ones(3), dtype=torch.float32))
    with pytest.raises(BenchmarkFailed, match=r"N=3.*ours raised OutOfMemoryError"):
        run_cases("tiny", [case], "cpu", reps=2, out_dir=tmp_path, plot=False)


def test_peer_failures_and_skips_are_rows_not_failures(tmp_path):
    def broken_peer():
        raise ValueError("unsupported shape")

    case = _softmax_case(peers={"broken": broken_peer, "absent": Skipped("peerlib not installed")})
    rows = {r["provider"]: r for r in run_cases("tiny", [case], "cpu", reps=2, out_dir=tmp_path, plot=False)}
    assert rows["broken"]["status"] == "error: ValueError: unsupported shape"
    assert rows["absent"]["status"] == "skipped: peerlib not installed"
    assert math.isnan(rows["broken"][RATIO]) and math.isnan(rows["absent"][RATIO])


def test_peer_over_its_compile_budget_is_skipped_but_ours_is_not_capped(tmp_path):
    def slow_first_call(state={"compiled": False}):  # noqa: B006 (state across calls, like a compile cache)
        if not state["compiled"]:
            time.sleep(5)
            state["compiled"] = True

    def slow_ours():
        time.sleep(0.3)
        return torch.ones(1)

    case = Case("N=1", {"ours": slow_ours, "compiled peer": slow_first_call},
                check=Check(lambda: torch.ones(1), lambda: torch.ones(1), dtype=torch.float32))
    rows = {r["provider"]: r for r in run_cases("tiny", [case], "cpu", reps=1, memory=False, out_dir=tmp_path,
                                                plot=False, compile_budget_s=0.2)}
    assert rows["compiled peer"]["status"] == "skipped: compile over budget (first call > 0.2 s)"
    assert rows["ours"]["status"] == "ok"


def test_time_over_ours_column(tmp_path, monkeypatch):
    times = {"ours": 2.0, "torch": 6.0}
    monkeypatch.setattr(harness, "time_ms", lambda fn, device, reps: times[fn.__name__])

    def ours():
        return torch.ones(1)

    def torch_peer():
        pass

    torch_peer.__name__ = "torch"
    case = Case("N=1", {"ours": ours, "torch": torch_peer},
                check=Check(ours, lambda: torch.ones(1), dtype=torch.float32))
    run_cases("tiny", [case], "cpu", memory=False, out_dir=tmp_path, plot=False)
    rows = {r["provider"]: r for r in _rows(tmp_path / "tiny_cpu.csv")}
    assert float(rows["torch"][RATIO]) == 3.0 and float(rows["ours"][RATIO]) == 1.0


def test_csv_is_written_after_every_case(tmp_path):
    path = tmp_path / "tiny_cpu.csv"

    def cases():
        yield _softmax_case("first")
        assert [r["case"] for r in _rows(path)] == ["first", "first"]  # on disk before case 2 is built
        raise MemoryError("building the second case")

    with pytest.raises(BenchmarkFailed, match=r"building case #2 raised MemoryError"):
        run_cases("tiny", cases(), "cpu", reps=2, out_dir=tmp_path, plot=False)
    assert [r["case"] for r in _rows(path)] == ["first", "first"]


def test_ours_without_a_check_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has an 'ours' provider but no Check"):
        run_cases("tiny", [Case("N=1", {"ours": lambda: None})], "cpu", out_dir=tmp_path, plot=False)


def _register_tiny_benchmark(monkeypatch, case: Case) -> None:
    """Make `python -m bench tiny` run [case], as if bench/bench_tiny.py defined it."""
    module = types.ModuleType("bench.bench_tiny")
    module.cases = lambda device, size: [case]
    monkeypatch.setitem(sys.modules, "bench.bench_tiny", module)
    monkeypatch.setattr(bench_main, "available", lambda: ["tiny"])


@pytest.mark.parametrize(("perturbation", "crashes", "expected_rc"),
                         [(0.0, False, 0), (0.05, False, 1), (0.0, True, 1)])
def test_python_m_bench_exit_status(tmp_path, monkeypatch, capsys, perturbation, crashes, expected_rc):
    _register_tiny_benchmark(monkeypatch, _softmax_case(ours_perturbation=perturbation, ours_crashes=crashes))
    summary = tmp_path / "summary.txt"
    rc = bench_main.main(["tiny", "--device", "cpu", "--reps", "2", "--no-memory", "--no-plot",
                          "--out-dir", str(tmp_path), "--summary", str(summary)])
    assert rc == expected_rc
    line = summary.read_text()
    assert line.startswith("tiny (cpu): 1 case(s)") and line.count("\n") == 1
    assert ("FAILED" in line) == bool(expected_rc)
    if expected_rc:
        assert "N=64" in capsys.readouterr().err


def test_relative_error_is_nan_aware():
    ref = torch.tensor([1.0, float("nan"), float("inf")])
    assert relative_error(ref.clone(), ref) == 0.0  # the same non-finite values in the same places
    assert relative_error(torch.tensor([float("nan"), float("nan"), float("inf")]), ref) == math.inf
    assert relative_error(torch.tensor([1.0, float("nan"), -float("inf")]), ref) == math.inf
    err = relative_error(torch.tensor([1.0, 2.0], dtype=torch.float64),
                         torch.tensor([1.0, 2.001], dtype=torch.float64))
    assert err == pytest.approx(1e-3 / math.hypot(1.0, 2.001), rel=1e-6)
    with pytest.raises(CheckFailed, match="shape"):
        relative_error(torch.ones(2), torch.ones(3))
    with pytest.raises(CheckFailed, match=r"d weight: rel err"):
        compare({"out": torch.ones(2), "d weight": torch.ones(2)},
                {"out": torch.ones(2), "d weight": torch.zeros(2)}, 1e-3)


def test_interrupt_keeps_the_finished_rows(tmp_path, monkeypatch):
    """bench/gpu_all.sh stops a benchmark at its limit with SIGINT: exit 130, the CSV has what finished."""
    def interrupted():
        raise KeyboardInterrupt

    _register_tiny_benchmark(monkeypatch, _softmax_case(peers={"slow peer": interrupted}))
    rc = bench_main.main(["tiny", "--device", "cpu", "--reps", "2", "--no-memory", "--out-dir",
                          str(tmp_path)])
    assert rc == 130
    finished = [(r["provider"], r["status"]) for r in _rows(tmp_path / "tiny_cpu.csv")]
    assert finished == [("ours", "ok"), ("torch", "ok")]
