"""`wz demo --agent`: a tiny model learns the shipped gridworld with GiGPO on CPU; episode-level GRPO on the
same config and steps is the baseline.

Trains with the packaged `agent_cpu.toml` (one run per estimator under OUTPUT_DIR/<estimator>), measures
the held-out success rate (odd task seeds, never trained on) of the initial and each trained policy,
prints `success rate: initial A -> trained B` and the comparison, and writes the curves of each run and
both runs' success rates on one plot.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

AGENT_CONFIG = Path(__file__).with_name("agent_cpu.toml")


def _evaluate(trainer, episodes_per_seed: int):
    from wz_engine import distributed as wzdist
    from wz_engine.envs.evaluate import evaluate_agent

    with wzdist.gathered_for_generation(trainer.policy):
        return evaluate_agent(trainer.sampler, trainer.tokenizer, trainer.cfg.env, trainer._sampling_params(),
                              episodes_per_seed=episodes_per_seed)


def train_and_evaluate(overrides: Sequence[str], episodes_per_seed: int) -> dict:
    """One run of the agent config: held-out success before and after training, the curves, timings."""
    from wz_engine import distributed as wzdist
    from wz_engine.config import load_config
    from wz_engine.metrics import plot_run
    from wz_engine.trainer import Trainer

    cfg = load_config(AGENT_CONFIG, list(overrides))
    trainer = Trainer(cfg, overwrite=True)  # a rerun moves the previous demo run aside (and says where)
    try:
        initial = _evaluate(trainer, episodes_per_seed)
        start = time.perf_counter()
        trainer.fit()
        train_s = time.perf_counter() - start
        trained = _evaluate(trainer, episodes_per_seed)
        png = plot_run(cfg.train.output_dir) if trainer.step_idx else None  # agent panels: wz_engine.metrics
        return {"estimator": cfg.algorithm.estimator, "steps": trainer.step_idx, "train_seconds": train_s,
                "initial": vars(initial), "trained": vars(trained), "curves": str(png) if png else None,
                "run_dir": cfg.train.output_dir}
    finally:
        wzdist.shutdown()


def plot_comparison(runs: list[dict], out: Path) -> Path:
    """Training success rate per step of each run (5-step moving average) on one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from wz_engine.metrics import read_metrics

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for run in runs:
        rows = read_metrics(run["run_dir"])
        steps = [r["step"] for r in rows]
        rate = [r["agent/success_rate"] for r in rows]
        smooth = [sum(rate[max(0, i - 4):i + 1]) / len(rate[max(0, i - 4):i + 1]) for i in range(len(rate))]
        ax.plot(steps, smooth, lw=1.4, label=f"{run['estimator']} (held-out {run['trained']['success_rate']:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("training success rate (5-step mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run_agent_demo(overrides: Sequence[str] = (), episodes_per_seed: int = 4, compare: bool = True) -> dict:
    from wz_engine.config import load_config

    base = Path(load_config(AGENT_CONFIG, list(overrides)).train.output_dir)
    runs = []
    for estimator in ("gigpo", "grpo") if compare else ("gigpo",):
        runs.append(train_and_evaluate([*overrides, f'algorithm.estimator="{estimator}"',
                                        f'train.output_dir="{base / estimator}"'], episodes_per_seed))
    summary = {"runs": runs}
    if compare:
        summary["comparison"] = str(plot_comparison(runs, base / "success_gigpo_vs_grpo.png"))
    base.mkdir(parents=True, exist_ok=True)
    (base / "demo_eval.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wz demo --agent", description=__doc__.splitlines()[0])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the agent demo config (wz_engine/demo/agent_cpu.toml)")
    p.add_argument("--episodes-per-seed", type=int, default=4, help="held-out episodes per task seed and policy")
    p.add_argument("--no-compare", action="store_true", help="train GiGPO only (skip the episode-level GRPO run)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = run_agent_demo(args.overrides, args.episodes_per_seed, compare=not args.no_compare)
    gigpo = s["runs"][0]
    n = gigpo["trained"]["episodes"]
    print(f"\nsuccess rate: initial {gigpo['initial']['success_rate']:.3f} -> trained {gigpo['trained']['success_rate']:.3f}"
          f" (GiGPO, {gigpo['steps']} steps in {gigpo['train_seconds']:.0f} s; {n} held-out episodes)")
    if len(s["runs"]) > 1:
        grpo = s["runs"][1]
        print(f"GiGPO vs episode-level GRPO at {grpo['steps']} steps: held-out success "
              f"{gigpo['trained']['success_rate']:.3f} vs {grpo['trained']['success_rate']:.3f}, episode length "
              f"{gigpo['trained']['episode_length']:.2f} vs {grpo['trained']['episode_length']:.2f} "
              f"(GRPO trained in {grpo['train_seconds']:.0f} s)")
        print(f"curves: {gigpo['curves']}, {grpo['curves']}; success of both: {s['comparison']}")
    else:
        print(f"curves: {gigpo['curves']}")
    return 0
