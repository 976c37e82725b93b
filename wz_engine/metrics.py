"""Run logs: JSONL every step (always), TensorBoard when installed, W&B opt-in, a progress bar,
per-phase wall time with NVTX ranges, and Writing-Zero's reward-hacking monitors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from wz_engine import chaos

log = logging.getLogger("wz_engine")

METRICS_FILE = "metrics.jsonl"


class PhaseTimer:
    """`with timer("rollout"):` records wall time per phase and opens an NVTX range of that name."""

    def __init__(self):
        self.times: dict[str, float] = {}
        try:
            import nvtx

            self._annotate = nvtx.annotate
        except ImportError:  # pragma: no cover
            self._annotate = None

    @contextlib.contextmanager
    def __call__(self, phase: str):
        range_ = self._annotate(f"wz/{phase}") if self._annotate else contextlib.nullcontext()
        start = time.perf_counter()
        with range_:
            yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.times.items()}
        self.times = {}
        return out


def reward_monitors(rewards: torch.Tensor, lengths: torch.Tensor) -> dict[str, float]:
    """Mean / max response length and corr(reward, length) (NaN when either is constant)."""
    lengths = lengths.double()
    r = rewards.double()
    out = {"response/length_mean": float(lengths.mean()), "response/length_max": float(lengths.max()),
           "reward/mean": float(r.mean())}
    if r.numel() > 1 and float(r.std()) > 0 and float(lengths.std()) > 0:
        out["reward/length_corr"] = float(torch.corrcoef(torch.stack([r, lengths]))[0, 1])
    else:
        out["reward/length_corr"] = float("nan")
    return out


def step_metrics(update: dict, ubs: list, ents: list | None, rewards: torch.Tensor, skew_kept: torch.Tensor,
                 groups: list, judge_stats: dict, group_size: int, wall: float) -> dict:
    """The rollout step's log, global over ranks (collective: every rank calls it).

    update: `schedule.combine_updates` of the step's optimizer steps; ubs: its mini-batches
    (`update.UpdateBatch`); ents: per mini-batch the old pass's token entropies (None on-policy,
    where the update measured them: update["entropy"]); rewards, skew_kept [B] of this rank."""
    from wz_engine import distributed as wzdist

    lengths = torch.tensor([len(c.token_ids) for g in groups for c in g], dtype=torch.float64)
    masks = [m for ub in ubs for m in ub.masks]
    ent_sum = 0.0 if ents is None else sum(float((e * m).sum()) for e, m in zip([e for x in ents for e in x], masks))
    tokens = sum(b.num_tokens for ub in ubs for b in ub.batches[:ub.num_real])  # not the 1-token padding ones
    global_tokens = sum(ub.global_tokens for ub in ubs)
    dropped = float((~skew_kept.bool()).sum()) / max(group_size, 1) if len(skew_kept) else 0
    # Gather what needs all ranks (sums), then per-rank monitors from rank 0's shard + sums.
    sums = wzdist.all_reduce(torch.tensor([ent_sum, float(tokens), float(len(groups)), dropped,
                                           float(lengths.sum()), float(len(lengths)),
                                           float(lengths.max()) if len(lengths) else 0.0], dtype=torch.float64))
    max_len = float(wzdist.all_reduce(float(lengths.max()) if len(lengths) else 0.0, op="max"))
    all_rewards = torch.cat([torch.as_tensor(x) for x in wzdist.all_gather_object(rewards.tolist())])
    all_lengths = torch.cat([torch.as_tensor(x, dtype=torch.float64) for x in wzdist.all_gather_object(lengths.tolist())])
    out = {**update,
           # on-policy there is no old pass: the update's pass measured it (global token mean)
           "entropy": update["entropy"] if ents is None else float(sums[0]) / global_tokens,
           "tokens": float(sums[1]), "tokens_per_s": float(sums[1]) / wall, "time/step": wall,
           "brpo/skew_drop_rate": float(sums[3]) / max(float(sums[2]), 1.0)}
    if len(all_rewards):
        out.update(reward_monitors(all_rewards, all_lengths))
    out["response/length_max"] = max_len
    # Judge monitors: averaged across ranks (each rank judged its own groups).
    for k, v in judge_stats.items():
        vals = [x for x in wzdist.all_gather_object(v) if x is not None and not math.isnan(x)]
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    return out


class MetricsLogger:
    """Writes one JSON line per step to output_dir/metrics.jsonl (main rank only), plus TensorBoard
    scalars and W&B when enabled."""

    def __init__(self, output_dir: str | Path, enabled: bool, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "wz-engine", config: dict | None = None, resume: bool = False,
                 resume_step: int = 0):
        self.enabled = enabled
        self.dir = Path(output_dir)
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._file = (self.dir / METRICS_FILE).open("a" if resume else "w")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # resumed at step S: TensorBoard drops the events of steps > S that an interrupted run
                # wrote after its checkpoint (they are logged again), as trim_logs does for the JSONL files
                purge = resume_step + 1 if resume else None
                self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=purge)
            except ImportError:
                log.info("tensorboard is not installed: skipping event files")
        if wandb:
            import wandb as wandb_mod

            self._wandb = wandb_mod.init(project=wandb_project, config=config, dir=str(self.dir),
                                         resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        chaos.point("metrics_logged")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(row, step=step)

    def log_sample(self, step: int, sample: dict) -> None:
        """One rollout (prompt, response, reward) to output_dir/samples.jsonl."""
        if not self.enabled:
            return
        with (self.dir / "samples.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, **sample}) + "\n")

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _plain(v):
    if torch.is_tensor(v):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else v
    return v


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"run_dir: no {METRICS_FILE} in {str(run_dir)!r}")
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass(frozen=True)
class Panel:
    """One panel of `plot_run`: one or more metrics on one axis."""

    title: str
    keys: tuple[str, ...]
    unless: str | None = None
    """Left out when the run logged this metric (it says the same thing better)."""
    cap: str | None = None
    """A config value ("section.field" of the run's config.json) drawn as a dashed line."""


PANELS = (
    # learning: an absolute level that rises as the policy improves
    Panel("judge score (mean of valid verdicts)", ("judge/score_mean",)),
    Panel("mean reward", ("reward/mean",), unless="judge/score_mean"),  # BRPO's +-1 rewards: ~0 always
    # agent runs (env.name): success, episode length against its cap, and the GiGPO shares
    Panel("agent success rate (training episodes)", ("agent/success_rate",)),
    Panel("agent episode length (turns) vs max_turns", ("agent/episode_length",), cap="env.max_turns"),
    Panel("agent shares: invalid actions, steps with an anchor partner, step-advantage share",
          ("agent/invalid_action_rate", "agent/anchor_steps_with_partner", "agent/step_advantage_share")),
    # reward-hacking monitors (Writing-Zero): length against its cap, truncation, length bias, position bias
    Panel("response length (tokens) vs max_new_tokens", ("response/length_mean", "response/length_max"),
          cap="rollout.max_new_tokens"),
    Panel("truncated at max_new_tokens (share)", ("response/truncation_rate",)),
    Panel("corr(reward, length)", ("reward/length_corr",)),
    Panel("position bias (first shown wins, share)", ("judge/position_bias",)),
    # no-signal shares (`wz_engine.monitors`): ~1 means the step taught nothing
    Panel("no signal (share)", ("judge/invalid_rate", "brpo/skew_drop_rate", "adv/zero_rate")),
    # optimisation
    Panel("loss", ("loss",)),
    Panel("entropy (nats/token)", ("entropy",)),
    Panel("grad norm", ("grad_norm",)),
    Panel("KL to the reference", ("kl_mean",)),
    Panel("tokens/s", ("tokens_per_s",)),
)
"""`plot_run`'s panels in order; README "Curves" says how to read each."""


def progress_postfix(metrics: dict) -> dict[str, str]:
    """What the progress bar shows: a level that rises as the policy improves (the judge's mean score
    for pairwise judges, whose BRPO rewards are relative and ~0 whatever the policy; the mean reward
    for pointwise ones), response length, truncation, and throughput."""

    def finite(key):
        v = metrics.get(key)
        return v if isinstance(v, (int, float)) and math.isfinite(v) else None

    out = {}
    if finite("judge/score_mean") is not None:
        out["score"] = f"{finite('judge/score_mean'):.2f}"
    elif finite("reward/mean") is not None:
        out["reward"] = f"{finite('reward/mean'):.3f}"
    for name, key, fmt in (("len", "response/length_mean", ".1f"), ("trunc", "response/truncation_rate", ".2f"),
                           ("tok_s", "tokens_per_s", ".0f")):
        if finite(key) is not None:
            out[name] = format(finite(key), fmt)
    return out


def curve(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric with NaN where it is missing, null or non-finite, and a NaN inserted
    where steps are skipped: matplotlib breaks the line there instead of bridging the gap."""
    steps, values = [], []
    for r in rows:
        if steps and r["step"] > steps[-1] + 1:
            steps.append(steps[-1] + 1)
            values.append(float("nan"))
        v = r.get(key)
        steps.append(r["step"])
        values.append(float(v) if isinstance(v, (int, float)) and math.isfinite(v) else float("nan"))
    return steps, values


def select_panels(rows: list[dict], panels=PANELS) -> tuple[list, list[str]]:
    """-> ([(panel, [(key, steps, values), ...]), ...] to draw in order, ["key = value", ...] left out as
    constant). A panel is left out when each of its logged metrics is constant, or its `unless` was logged."""
    logged = {k for r in rows for k, v in r.items() if v is not None}
    drawn, constant = [], []
    for panel in panels:
        if panel.unless in logged:
            continue
        lines, flat = [], []
        for key in panel.keys:
            steps, values = curve(rows, key)
            finite = [v for v in values if not math.isnan(v)]
            if finite:
                lines.append((key, steps, values))
                if max(finite) - min(finite) <= 1e-9 * max(1.0, abs(finite[0])):
                    flat.append(f"{key} = {finite[0]:.4g}")
        if len(flat) < len(lines):
            drawn.append((panel, lines))
        else:  # nothing in this panel changes: a flat line would only take space
            constant += flat
    return drawn, constant


def plot_run(run_dir: str | Path, out: str | Path | None = None, panels=PANELS) -> Path:
    """Plot a run's metric curves to a PNG (default run_dir/curves.png). A panel whose metrics are all
    constant (or never logged) is left out; the constant ones are listed under the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    config = _read_config(run_dir)
    drawn, constant = select_panels(rows, panels)
    if not drawn:
        raise ValueError(f"run_dir: {str(run_dir)!r} has no changing metrics to plot")
    cols = 2
    nrows = math.ceil(len(drawn) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(10, 2.6 * nrows + 0.4), squeeze=False)
    for ax, (panel, lines) in zip(axes.flat, drawn):
        for key, steps, values in lines:
            # markers keep a value between two gaps visible
            ax.plot(steps, values, lw=1.2, marker=".", ms=3, label=key)
        cap = _config_value(config, panel.cap)
        if cap is not None:
            ax.axhline(cap, ls="--", lw=1, color="grey", label=f"{panel.cap} = {cap}")
        if len(lines) > 1 or cap is not None:
            ax.legend(fontsize=7)
        ax.set_title(panel.title if len(lines) > 1 else f"{panel.title}: {lines[0][0]}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    if constant:
        fig.text(0.01, 0.005, "constant, not drawn: " + ", ".join(constant), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.03 if constant else 0, 1, 1))
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _read_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _config_value(config: dict, dotted: str | None):
    if not dotted:
        return None
    value = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value if isinstance(value, (int, float)) else None
