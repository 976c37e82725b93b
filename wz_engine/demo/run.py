"""`wz demo`: post-train a tiny model with BRPO on CPU, then measure it against the initial model.

Pretrains the base model (`pretrain.py`: it writes, but ignores the prompt), trains it with the packaged
`demo_cpu.toml`, evaluates trained vs initial (the base) on the held-out prompts: the
pairwise win rate (both orders, same judge), the on-topic rate (does the output follow the prompt),
the truncation rate (cut off at max_new_tokens) and the distinct greedy outputs across prompts; prints
them, writes them to OUTPUT_DIR/demo_eval.json and the curves to OUTPUT_DIR/curves.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

DEMO_CONFIG = Path(__file__).with_name("demo_cpu.toml")


def run_demo(overrides: Sequence[str] = (), eval_samples: int = 4, pretrain=None) -> dict:
    """Pretrain the base (unless `model.path` names a model), train it with BRPO, evaluate trained vs
    base; -> the summary also written to OUTPUT_DIR/demo_eval.json. `pretrain`: a `PretrainConfig`."""
    from wz_engine import distributed as wzdist
    from wz_engine.build import build_reward_source, build_tokenizer_and_model
    from wz_engine.config import load_config
    from wz_engine.demo.evaluate import compare_policies
    from wz_engine.demo.judge import is_on_topic
    from wz_engine.metrics import plot_run
    from wz_engine.rollout.base import SamplingParams
    from wz_engine.rollout.hf import HFSampler
    from wz_engine.trainer import Trainer

    cfg = load_config(DEMO_CONFIG, list(overrides))
    start = time.perf_counter()
    try:
        base = _build_base(cfg, pretrain) if cfg.model.path == "tiny" else None  # RL starts from it
        rl_start = time.perf_counter()
        trainer = Trainer(cfg, overwrite=True)  # a rerun moves the previous demo run aside (and says where)
        trainer.fit()
        train_s = time.perf_counter() - rl_start
        with wzdist.gathered_for_generation(trainer.policy):  # every rank gathers; rank 0 evaluates
            if not trainer.info.is_main:
                return {}
            # The initial policy is loaded again from the model directory RL started from: step 0 exactly.
            _, initial_lm = build_tokenizer_and_model(cfg, Path(cfg.train.output_dir))
            judge = build_reward_source(cfg, None, trainer.tokenizer, "cpu", None)
            r = cfg.rollout
            params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                    top_k=r.top_k, n=eval_samples)
            result, trained, initial = compare_policies(
                HFSampler(trainer.policy.model, trainer.tokenizer), HFSampler(initial_lm, trainer.tokenizer),
                judge, trainer.holdout_prompts, params, is_on_topic)
        png = plot_run(cfg.train.output_dir) if trainer.step_idx else None
        summary = {"win_rate": result.win_rate, "wins": result.wins, "ties": result.ties, "losses": result.losses,
                   "invalid": result.invalid, "comparisons": result.comparisons, "train_seconds": train_s,
                   "trained": dataclasses.asdict(trained), "initial": dataclasses.asdict(initial),
                   "max_new_tokens": r.max_new_tokens, "steps": trainer.step_idx, "base": base,
                   "total_seconds": time.perf_counter() - start,
                   "curves": str(png) if png else None}
        Path(cfg.train.output_dir, "demo_eval.json").write_text(json.dumps(summary, indent=2))
        return summary
    finally:
        wzdist.shutdown()


def base_dir_for(output_dir: str | Path) -> Path:
    """Where the demo's base model goes: next to the run directory (which the run owns), rebuilt each time."""
    out = Path(output_dir)
    return out.with_name(out.name + "-base")


def _build_base(cfg, pretrain) -> dict:
    """Pretrain the base model of `cfg.model.tiny` on the training prompts into `base_dir_for(...)` (rank 0;
    the others wait) and point `cfg.model.path` at it; -> the pretraining record."""
    import torch

    from wz_engine import distributed as wzdist
    from wz_engine.data import load_rows, split_holdout
    from wz_engine.demo.pretrain import build_base_model

    start = time.perf_counter()
    base_dir = base_dir_for(cfg.train.output_dir)
    record = None
    if wzdist.init_distributed(cfg.distributed.backend).is_main:
        if cfg.train.cpu_threads > 0:
            torch.set_num_threads(cfg.train.cpu_threads)
        train_rows, _ = split_holdout(load_rows(cfg.data), cfg.data.holdout)
        record = build_base_model(cfg.model.tiny, [str(r[cfg.data.prompt_field]) for r in train_rows], base_dir,
                                  pretrain)
    record = wzdist.broadcast_object(record)
    cfg.model.path = str(base_dir)
    return {**record, "path": str(base_dir), "seconds": time.perf_counter() - start}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wz demo", description=__doc__.splitlines()[0])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the demo config (wz_engine/demo/demo_cpu.toml)")
    p.add_argument("--eval-samples", type=int, default=4, help="completions per held-out prompt and policy")
    p.add_argument("--judge", action="store_true", help="instead: train a tiny GenRM on preference pairs with "
                   "verifiable rewards (wz_engine/demo/judge_cpu.toml; --set overrides that file), then judge "
                   "BRPO steps with it")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.judge:
        from wz_engine.demo.judge_train import format_summary as format_judge_summary
        from wz_engine.demo.judge_train import run_judge_demo

        print("\n" + format_judge_summary(run_judge_demo(args.overrides)))
        return 0
    s = run_demo(args.overrides, args.eval_samples)
    if s:
        print(format_summary(s))
    return 0


def format_summary(s: dict) -> str:
    from wz_engine.demo.judge import TOPICS

    t, i = s["trained"], s["initial"]
    return (f"\nheld-out prompts, trained vs initial policy:\n"
            f"  win rate        {s['win_rate']:.3f}  ({s['wins']} wins, {s['ties']} ties, {s['losses']} losses "
            f"over {s['comparisons']} comparisons, both orders)\n"
            f"  on-topic rate   {i['on_topic_rate']:.3f} -> {t['on_topic_rate']:.3f}  (more words of the prompt's "
            f"topic than of all others; output that ignores the prompt: <= 1/{len(TOPICS)} expected)\n"
            f"  truncated       {i['truncation_rate']:.3f} -> {t['truncation_rate']:.3f}  (hit max_new_tokens "
            f"= {s['max_new_tokens']}; mean length {i['length_mean']:.1f} -> {t['length_mean']:.1f} tokens)\n"
            f"  distinct greedy {i['distinct_greedy']} -> {t['distinct_greedy']}  (different greedy outputs over "
            f"the held-out prompts)\n"
            f"{_initial_line(s.get('base'))}\n"
            f"trained {s['steps']} steps in {s['train_seconds']:.0f} s; curves: {s['curves']}")


def _initial_line(base: dict | None) -> str:
    if not base:
        return "initial policy: model.path as given"
    return (f"initial policy: the base model {base['path']} (pretrained {base['pretrain']['steps']} steps in "
            f"{base['seconds']:.0f} s to write, not to follow the prompt)")
