"""Run a benchmark's cases: check ours, time and measure every provider, write results as they come.

A benchmark module defines `cases(device: str, size: str) -> Iterable[Case]` with size one of SIZES.
Each Case holds one shape and a dict of providers: name -> a zero-argument callable that runs one
iteration (and returns nothing that must be kept), or `Skipped(reason)` for a peer that cannot run
here. For every case `run_cases`:
  1. runs the case's `Check` (ours against its reference on the case's own inputs) before timing;
  2. calls each provider once (compile, lazy setup; peers under a time budget), then measures its peak
     memory (one call) and its median time;
  3. rewrites the CSV after every provider (so a run cut short keeps everything that finished) and, at
     the end of the case, adds `time / ours` (this row's time over ours', > 1: ours is faster).
Ours crashing or disagreeing with its reference fails the benchmark (`BenchmarkFailed`, after every
case has run and the CSV / PNG are written); a peer crashing is a row with status "error: ...".
"""

from __future__ import annotations

import gc
import importlib.util
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.checks import Check, CheckFailed, run_check
from bench.measure import OverBudget, peak_memory_mb, peak_rss_delta_mb, time_budget, time_ms  # noqa: F401
from bench.report import RATIO, format_table, summary_line, write_csv, write_png

RESULTS_DIR = Path(__file__).parent / "results"
SIZES = ("quick", "headline", "full")
"""quick: smoke shapes (CI, seconds); headline: the one shape per op that the targets name; full: tables."""
DEFAULT_COMPILE_BUDGET_S = 120.0
"""Seconds a peer's first call (torch.compile, FlexAttention block masks) may take before it is skipped."""


@dataclass(frozen=True)
class Skipped:
    """A provider that does not run here, with the reason shown in its row (e.g. a peer not installed)."""

    reason: str


Provider = Callable[[], object] | Skipped


@dataclass
class Case:
    """One benchmark shape, the providers that compute it, and how ours is checked."""

    label: str  # e.g. "B=16384 G=16"
    providers: dict[str, Provider]
    check: Check | None = None
    """Ours against its reference on this case's inputs; required when the case has an `ours` provider."""
    ours: str = "ours"
    """The provider `time / ours` divides by. It and its variants ("ours (...)") must not fail."""
    bytes_moved: float | None = None
    """Bytes one iteration must move (each input read once, each output written once): the GB/s column."""
    flops: float | None = None
    """Useful FLOPs of one iteration: the TFLOP/s column."""
    extra: dict = field(default_factory=dict)

    def is_ours(self, provider: str) -> bool:
        return provider == self.ours or provider.startswith(self.ours + " ")


class BenchmarkFailed(Exception):
    """Ours crashed or disagreed with its reference in at least one case (each named in the message)."""


def optional_peer(module: str, pip_name: str, fn: Callable[[], object]) -> Provider:
    """`fn` if `module` is importable, else Skipped("<pip_name> not installed")."""
    if importlib.util.find_spec(module) is None:
        return Skipped(f"{pip_name} not installed")
    return fn


def run_cases(name: str, cases: Iterable[Case], device: str, *, reps: int = 10, memory: bool = True,
              out_dir: Path | None = None, plot: bool = True,
              compile_budget_s: float | None = DEFAULT_COMPILE_BUDGET_S,
              summary_file: Path | None = None) -> list[dict]:
    """Check, time and measure every case (see the module doc). Returns the rows; raises
    BenchmarkFailed naming every case where ours failed, after writing the CSV (and PNG) and appending
    the one-line summary to `summary_file` (if given)."""
    out_dir = out_dir or RESULTS_DIR
    stem = f"{name}_{device.split(':')[0]}"
    rows: list[dict] = []
    failures: list[str] = []
    built = 0
    pending = iter(cases)  # a generator builds each case's inputs only when its turn comes
    while True:
        try:
            case = next(pending)
        except StopIteration:
            break
        except Exception as e:  # noqa: BLE001 (building a case runs our code too: a failure, not a crash)
            failures.append(f"building case #{built + 1} raised {type(e).__name__}: {e}")
            break
        built += 1
        failures += _run_case(name, case, device, rows, lambda: write_csv(rows, out_dir / f"{stem}.csv"),
                              reps=reps, memory=memory, compile_budget_s=compile_budget_s)
        del case
        _free(device, always=True)
    print(format_table(rows))
    if rows:
        print(f"wrote {out_dir / (stem + '.csv')}")
    if plot and rows:
        write_png(rows, out_dir / f"{stem}.png", title=f"{name} ({device})")
    summary = summary_line(name, device, rows, failures)
    print("SUMMARY " + summary)
    if summary_file is not None:
        summary_file.parent.mkdir(parents=True, exist_ok=True)
        with open(summary_file, "a") as f:
            f.write(summary + "\n")
    if failures:
        raise BenchmarkFailed(f"{name}: ours failed in {len(failures)} case(s):\n  " + "\n  ".join(failures))
    return rows


def _run_case(name: str, case: Case, device: str, rows: list[dict], flush: Callable[[], None], *, reps: int,
              memory: bool, compile_budget_s: float | None) -> list[str]:
    """Check ours, then measure each provider, appending a row to `rows` and calling `flush` (which
    rewrites the CSV) after each one. Returns the failures of ours, one line each naming the case."""
    has_ours = any(case.is_ours(p) for p, fn in case.providers.items() if not isinstance(fn, Skipped))
    if has_ours and case.check is None:
        raise ValueError(f"{name}: case {case.label!r} has an {case.ours!r} provider but no Check")
    check_err, check_failure = None, None
    if case.check is not None:
        try:
            check_err = run_check(case.check)
        except CheckFailed as e:
            check_failure = str(e)
        print(f"  [{name}] {case.label} | check of {case.ours!r}: "
              + (f"FAILED: {check_failure}" if check_failure else f"rel err {check_err:.3g}"), flush=True)
        _free(device)
    failures = []
    if check_failure:
        failures.append(f"{case.label!r}: ours disagrees with its reference: {check_failure}")

    first = len(rows)
    for provider, fn in case.providers.items():
        row = {"bench": name, "device": device, "case": case.label, "provider": provider,
               "ms": math.nan, "peak_mb": math.nan}
        ours = case.is_ours(provider)
        if isinstance(fn, Skipped):
            row["status"] = f"skipped: {fn.reason}"
        elif ours and check_failure:
            row["status"] = "FAILED check (not timed)"
        else:
            try:
                row.update(_measure(fn, device, case, reps=reps, memory=memory,
                                    budget=None if ours else compile_budget_s))
            except OverBudget:
                row["status"] = f"skipped: compile over budget (first call > {compile_budget_s:g} s)"
            except Exception as e:  # noqa: BLE001 (reported in the row; fatal only for ours, below)
                message = f"{type(e).__name__}: {e}".replace("\n", " ")[:200]
                row["status"] = ("FAILED: " if ours else "error: ") + message
                if ours:
                    failures.append(f"{case.label!r}: {provider} raised {message}")
        if ours and check_err is not None:
            row["check_rel_err"] = check_err
        row.update(case.extra)
        rows.append(row)
        flush()
        print(f"  [{name}] {case.label} | {provider}: {row['status']}"
              + (f", {row['ms']:.4g} ms" if not math.isnan(row["ms"]) else ""), flush=True)
        _free(device)

    case_rows = rows[first:]
    ours_ms = next((r["ms"] for r in case_rows if r["provider"] == case.ours), math.nan)
    for r in case_rows:
        r[RATIO] = r["ms"] / ours_ms if ours_ms > 0 else math.nan
    flush()
    return failures


def _measure(fn: Callable[[], object], device: str, case: Case, *, reps: int, memory: bool,
             budget: float | None) -> dict:
    with time_budget(budget):  # first call: compile / lazy setup, outside every measurement
        fn()
    mem = peak_memory_mb(fn, device) if memory else math.nan
    ms = time_ms(fn, device, reps=reps)
    out = {"status": "ok", "ms": ms, "peak_mb": mem}
    if case.bytes_moved:
        out["GB/s"] = case.bytes_moved / (ms * 1e-3) / 1e9
    if case.flops:
        out["TFLOP/s"] = case.flops / (ms * 1e-3) / 1e12
    return out


def _free(device: str, *, always: bool = False) -> None:
    """Collect garbage (cycles can hold big tensors) and return cached CUDA blocks: between providers
    on CUDA, so each one's peak memory starts from the same place; on CPU only between cases (slow)."""
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()
    elif always:
        gc.collect()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
