"""Tables, CSV, PNG and the one-line summary of a benchmark's rows (dicts, one per case x provider).

The comparison column is `RATIO` = this row's time / ours' time in the same case: a value > 1 means
ours is faster by that factor. The CSV header and the PNG panel carry the same name.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

RATIO = "time / ours"
"""Column name: provider ms / ours ms in the same case (> 1: ours is faster)."""

_FIRST = ("case", "provider", "status", "ms", RATIO, "peak_mb", "GB/s", "TFLOP/s", "check_rel_err")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def columns(rows: list[dict], *, table: bool = False) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    if table:  # bench / device are the same on every row: said once in the title instead
        keys = [k for k in keys if k not in ("bench", "device")]
    return [k for k in _FIRST if k in keys] + [k for k in keys if k not in _FIRST]


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def format_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = columns(rows, table=True)
    table = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(t, widths)) for t in table]
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    """(Re)write the whole CSV: called after every case, so a run cut short keeps what finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns(rows))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def summary_line(name: str, device: str, rows: list[dict], failures: list[str]) -> str:
    """One line: cases, ours' check, the range of time / ours per peer, skips and failures."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    errs = [r["check_rel_err"] for r in rows if _is_number(r.get("check_rel_err"))]
    parts = [f"{name} ({device}): {len(cases)} case(s)"]
    if errs:
        parts.append(f"ours checked, max rel err {max(errs):.2g}")
    ratios: dict[str, list[float]] = {}
    for r in rows:
        if _is_number(r.get(RATIO)) and r.get(RATIO) != 1.0:
            ratios.setdefault(r["provider"], []).append(r[RATIO])
    if ratios:
        parts.append(RATIO + ": " + ", ".join(
            f"{p} {min(v):.3g}" + (f"-{max(v):.3g}" if max(v) != min(v) else "") for p, v in ratios.items()))
    skipped = sorted({f"{r['provider']} ({r['status'].removeprefix('skipped: ')})"
                      for r in rows if str(r.get("status", "")).startswith("skipped")})
    if skipped:
        parts.append("skipped: " + ", ".join(skipped))
    errors = sorted({r["provider"] for r in rows if str(r.get("status", "")).startswith("error")})
    if errors:
        parts.append("peer errors: " + ", ".join(errors))
    if failures:
        parts.append(f"FAILED: {'; '.join(failures)}")
    else:
        parts.append("ours OK" if errs else "ours not run")
    return " | ".join(parts)


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
    panels = {"ms": "time (ms, lower is better)", "peak_mb": "peak memory (MB)",
              RATIO: f"{RATIO} (> 1: ours faster)"}
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    width = 0.8 / max(len(providers), 1)
    for (metric, ylabel), ax in zip(panels.items(), axes):
        plotted = False
        for j, p in enumerate(providers):
            vals = [next((r.get(metric, math.nan) for r in rows if r["case"] == c and r["provider"] == p),
                         math.nan) for c in cases]
            vals = [v if _is_number(v) else math.nan for v in vals]
            plotted |= any(v > 0 for v in vals if not math.isnan(v))
            ax.bar([i + j * width for i in range(len(cases))], vals, width, label=p)
        ax.set_xticks([i + width * (len(providers) - 1) / 2 for i in range(len(cases))])
        ax.set_xticklabels(cases, rotation=15, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(metric, fontsize=9)
        if metric == RATIO:
            ax.axhline(1.0, color="black", linewidth=0.8)
        if plotted:  # a log axis over only NaN / zero values (e.g. --no-memory) fails to draw
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
