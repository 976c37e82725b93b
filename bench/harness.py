"""Timing and memory measurement shared by every `bench/bench_<op>.py`.

A benchmark module defines `cases(device: str, quick: bool) -> list[Case]`. Each Case holds one
shape and a dict of providers: name -> a zero-argument callable that runs one iteration (and
returns nothing that must be kept). `run_cases` times every provider, measures its peak memory,
prints a table and writes CSV + PNG under bench/results/.
"""

from __future__ import annotations

import csv
import gc
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).parent / "results"


@dataclass
class Case:
    """One benchmark shape and the providers that compute it."""

    label: str  # e.g. "B=16384 G=16"
    providers: dict[str, Callable[[], object]]
    # Optional: bytes moved / flops of one iteration, for GB/s and TFLOP/s columns.
    bytes_moved: float | None = None
    flops: float | None = None
    extra: dict = field(default_factory=dict)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, *, warmup: int = 2, reps: int = 10,
            max_seconds: float = 20.0) -> float:
    """Median wall time of one call in milliseconds (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    start_all = time.perf_counter()
    for _ in range(reps):
        if device.startswith("cuda"):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            samples.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start_all > max_seconds and len(samples) >= 3:
            break
    return statistics.median(samples)


def _read_vm(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def peak_rss_delta_mb(fn: Callable[[], object]) -> float:
    """Growth of this process's peak RSS while `fn` runs, in MB (Linux).

    Resets the kernel's high-water mark (write "5" to /proc/self/clear_refs) first, so successive
    measurements in one process are independent. Stable where wall time is not.
    """
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _read_vm("VmRSS")
    fn()
    return (_read_vm("VmHWM") - base) / 2**20


def peak_cuda_delta_mb(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def peak_memory_mb(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        return peak_cuda_delta_mb(fn)
    try:
        return peak_rss_delta_mb(fn)
    except (OSError, RuntimeError):
        return float("nan")


def run_cases(name: str, cases: list[Case], device: str, *, reps: int = 10, memory: bool = True,
              out_dir: Path | None = None, plot: bool = True) -> list[dict]:
    """Time every provider of every case; print a table; write CSV (+ PNG). Returns the rows."""
    rows = []
    for case in cases:
        for provider, fn in case.providers.items():
            row = {"bench": name, "device": device, "case": case.label, "provider": provider}
            try:
                mem = peak_memory_mb(fn, device) if memory else float("nan")
                ms = time_ms(fn, device, reps=reps)
                row.update(ms=ms, peak_mb=mem)
                if case.bytes_moved:
                    row["GB/s"] = case.bytes_moved / (ms * 1e-3) / 1e9
                if case.flops:
                    row["TFLOP/s"] = case.flops / (ms * 1e-3) / 1e12
            except Exception as e:  # a peer missing or failing on this shape is reported, not fatal
                row.update(ms=float("nan"), peak_mb=float("nan"), error=f"{type(e).__name__}: {e}"[:120])
            row.update(case.extra)
            rows.append(row)
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    print_table(rows)
    out_dir = out_dir or RESULTS_DIR
    write_csv(rows, out_dir / f"{name}_{device.split(':')[0]}.csv")
    if plot:
        write_png(rows, out_dir / f"{name}_{device.split(':')[0]}.png", title=f"{name} ({device})")
    return rows


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    cols = list(dict.fromkeys(k for r in rows for k in r if k not in ("bench", "device")))
    # speedup relative to the first provider of each case
    base = {}
    for r in rows:
        base.setdefault(r["case"], r.get("ms"))
    for r in rows:
        b = base[r["case"]]
        r["speedup"] = (b / r["ms"]) if b and r.get("ms") and not math.isnan(r["ms"]) else float("nan")
    if "speedup" not in cols:
        cols.append("speedup")
    table = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    line = " | ".join(c.ljust(w) for c, w in zip(cols, widths))
    print(line)
    print("-+-".join("-" * w for w in widths))
    for t in table:
        print(" | ".join(v.ljust(w) for v, w in zip(t, widths)))


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")


def write_png(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    cases = list(dict.fromkeys(r["case"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(providers), 1)
    for metric, ax in zip(("ms", "peak_mb"), axes):
        plotted = False
        for j, p in enumerate(providers):
            vals = [next((r.get(metric, float("nan")) for r in rows if r["case"] == c and r["provider"] == p),
                         float("nan")) for c in cases]
            plotted |= any(v > 0 for v in vals if not math.isnan(v))
            ax.bar([i + j * width for i in range(len(cases))], vals, width, label=p)
        ax.set_xticks([i + width * (len(providers) - 1) / 2 for i in range(len(cases))])
        ax.set_xticklabels(cases, rotation=15, fontsize=8)
        ax.set_ylabel({"ms": "time (ms, lower is better)", "peak_mb": "peak memory (MB)"}[metric])
        if plotted:  # a log axis over only NaN / zero values (e.g. --no-memory) fails to draw
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def env_quick() -> bool:
    return os.environ.get("WZ_BENCH_QUICK", "0") == "1"
