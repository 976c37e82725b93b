"""`wz demo --judge`: train a tiny GenRM with verifiable rewards on CPU, then judge a BRPO run with it.

1. Writes synthetic preference pairs (wz_engine/demo/pairs.py) to data.path, unless data.path is set.
2. Trains the tiny policy as the judge with the packaged `judge_cpu.toml` (judge.kind = "preference"),
   measuring its held-out accuracy (both orders, greedy) before the first step and after the last,
   and exports it (checkpoint.export_at_end: OUTPUT_DIR/export).
3. Runs `brpo_steps` steps of the BRPO demo (`demo_cpu.toml`) judged by the export
   (judge.genrm.weight_sharing = "checkpoint") and reports the share of valid verdicts it gave there.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("wz_engine")

JUDGE_CONFIG = Path(__file__).with_name("judge_cpu.toml")
SUMMARY_KEYS = ("accuracy", "pair_accuracy", "invalid_rate", "order_agreement", "position_bias")
JUDGE_SETTINGS = ("mode", "template", "system_prompt", "verdict_style", "score_min", "score_max", "tie_policy",
                  "max_new_tokens", "temperature", "top_p")
"""The judge.genrm settings a trained judge keeps when it judges a BRPO run (its prompt, grammar, sampling)."""


def train_judge(overrides: Sequence[str] = (), pairs: int = 600) -> dict:
    """Steps 1-2: {"start": held-out metrics, "end": ..., "train_seconds", "steps", "export"}."""
    from wz_engine import distributed as wzdist
    from wz_engine import rundir
    from wz_engine.config import load_config
    from wz_engine.demo.pairs import write_pairs
    from wz_engine.trainer import Trainer

    overrides = [*overrides, "checkpoint.export_at_end=true"]  # step 3 needs the export
    cfg = load_config(JUDGE_CONFIG, overrides)
    out = Path(cfg.train.output_dir)
    if rundir.run_artifacts(out):  # a rerun: move the previous one aside (with its pairs), as `wz demo` does
        log.warning("moved the previous judge demo run in %s to %s", out, rundir.move_aside(out))
    if not any(o.split("=", 1)[0].strip() == "data.path" for o in overrides):
        path = write_pairs(out / "pairs.jsonl", pairs, seed=cfg.train.seed)
        cfg = load_config(JUDGE_CONFIG, [f'data.path="{path}"', *overrides])
    trainer = Trainer(cfg)
    with wzdist.gathered_for_generation(trainer.policy):
        start = trainer.rewarder.heldout_metrics()
    t0 = time.perf_counter()
    trainer.fit()
    train_s = time.perf_counter() - t0
    with wzdist.gathered_for_generation(trainer.policy):
        end = trainer.rewarder.heldout_metrics()
    return {"start": start, "end": end, "train_seconds": train_s, "steps": trainer.step_idx,
            "export": str(Path(cfg.train.output_dir) / "export"), "judge": cfg.judge.genrm}


def brpo_config(export: str, judge, output_dir: str | Path, steps: int = 2, overrides: Sequence[str] = ()):
    """The BRPO demo's RunConfig judged by the exported GenRM (`judge`: the GenRMConfig it was trained with,
    for its template, verdict grammar and sampling)."""
    from wz_engine.config import load_config
    from wz_engine.demo.run import DEMO_CONFIG

    trained_with = [f"judge.genrm.{k}={json.dumps(getattr(judge, k))}" for k in JUDGE_SETTINGS
                    if getattr(judge, k) is not None]
    return load_config(DEMO_CONFIG, [f'train.output_dir="{output_dir}"', f"train.steps={steps}", 'judge.kind="genrm"',
                                     'judge.genrm.weight_sharing="checkpoint"', f"judge.genrm.checkpoint_path={json.dumps(export)}",
                                     *trained_with, "logging.progress_bar=false", "logging.tensorboard=false", *overrides])


def brpo_with_judge(export: str, judge, output_dir: str | Path, steps: int = 2) -> dict:
    """Step 3: BRPO demo steps judged by the export -> {"valid_rate", "verdicts", "steps"}."""
    from wz_engine.metrics import read_metrics
    from wz_engine.trainer import Trainer

    Trainer(brpo_config(export, judge, output_dir, steps)).fit()
    rows = read_metrics(output_dir)
    verdicts = int(sum(r["judge/num_verdicts"] for r in rows))
    invalid = sum(r["judge/invalid_rate"] * r["judge/num_verdicts"] for r in rows)
    return {"valid_rate": 1 - invalid / verdicts if verdicts else float("nan"), "verdicts": verdicts,
            "steps": len(rows)}


def run_judge_demo(overrides: Sequence[str] = (), pairs: int = 600, brpo_steps: int = 2) -> dict:
    from wz_engine import distributed as wzdist

    start = time.perf_counter()
    try:
        summary = train_judge(overrides, pairs)
        out = Path(summary["export"]).parent
        summary["brpo"] = brpo_with_judge(summary["export"], summary.pop("judge"), out / "brpo", brpo_steps)
        summary["wall_seconds"] = time.perf_counter() - start
        (out / "judge_demo.json").write_text(json.dumps(summary, indent=2))
        return summary
    finally:
        wzdist.shutdown()


def format_summary(s: dict) -> str:
    rows = [f"  {k:<16}{s['start'][f'heldout/{k}']:>8.3f} -> {s['end'][f'heldout/{k}']:.3f}" for k in SUMMARY_KEYS]
    b = s["brpo"]
    return "\n".join([
        "held-out judge metrics (both orders, greedy), start -> end:", *rows,
        f"trained {s['steps']} steps in {s['train_seconds']:.0f} s; export: {s['export']}",
        f"BRPO with the exported judge: {b['valid_rate']:.3f} of {b['verdicts']} verdicts valid over {b['steps']} steps",
        f"wall time {s['wall_seconds']:.0f} s"])
