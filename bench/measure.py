"""Time, peak memory and a time budget for one provider call (CUDA events on GPU, wall clock on CPU)."""

from __future__ import annotations

import contextlib
import gc
import signal
import statistics
import threading
import time
from collections.abc import Callable

import torch


class OverBudget(BaseException):
    """A provider's first call (compile, block masks, lazy setup) ran past its time budget.

    A BaseException, like KeyboardInterrupt: library code that catches Exception broadly (compilers
    falling back on errors) must not swallow it."""


@contextlib.contextmanager
def time_budget(seconds: float | None):
    """Raise OverBudget in this thread once `seconds` of wall time have passed (SIGALRM).

    Soft: the exception is raised when control next returns to the Python interpreter, which
    torch.compile / inductor (Python code waiting on compile workers) does all the time. Only the
    main thread can receive signals; elsewhere (or with seconds None / 0) there is no budget.
    """
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise OverBudget(f"first call over {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, *, warmup: int = 1, reps: int = 10,
            max_seconds: float = 10.0) -> float:
    """Median time of one call in milliseconds (CUDA events on GPU); stops early after `max_seconds`
    once it has 3 samples, so a slow peer costs seconds, not minutes."""
    for _ in range(warmup):
        fn()
    sync(device)
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
