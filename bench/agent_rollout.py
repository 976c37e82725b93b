"""Rollout throughput of the agent demo vs the single-turn demo: `python -m bench.agent_rollout`.

Builds each demo's tiny policy from its packaged config (wz_engine/demo/agent_cpu.toml and demo_cpu.toml,
untrained: the same weights a demo starts from) and times the rollout phase alone on the HF sampler:

    single-turn   one `generate` call: rollout.prompts_per_step prompts x group_size completions
    agent         rollout.prompts_per_step tasks x group_size episodes of the gridworld, one sampler call
                  per turn for every active episode (the trainer's default)
    agent/task    the same episodes with one call per task and turn (rollout.seed_per_prompt = true)

Reports, per mode, the mean over --reps repetitions (after one warm-up) of: wall seconds, sampler calls,
generated tokens, prompt tokens, generated tokens/s and (prompt + generated) tokens/s. Prompt tokens count
because every turn re-encodes its prompt (the HF sampler has no prefix cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch


def _policy(cfg_path: Path, threads: int):
    from wz_engine.build import build_tokenizer_and_model
    from wz_engine.config import load_config
    from wz_engine.rollout.hf import HFSampler

    cfg = load_config(cfg_path, ['train.output_dir="/nonexistent/bench_agent_rollout"'])
    torch.set_num_threads(threads)
    from wz_engine.data import load_rows

    rows = load_rows(cfg.data) if cfg.env.name is None else []
    tokenizer, lm = build_tokenizer_and_model(cfg, Path(cfg.train.output_dir),
                                              [str(r[cfg.data.prompt_field]) for r in rows])
    lm.eval()
    return cfg, tokenizer, HFSampler(lm, tokenizer, seed=0), rows


def _params(cfg):
    from wz_engine.rollout.base import SamplingParams

    r = cfg.rollout
    return SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                          n=r.group_size)


def single_turn(cfg_path: Path, threads: int, reps: int) -> dict:
    from wz_engine.data import render_prompts

    cfg, tokenizer, sampler, rows = _policy(cfg_path, threads)
    prompts, _ = render_prompts(rows, tokenizer, cfg.data)
    batch = [list(p.token_ids) for p in prompts[:cfg.rollout.prompts_per_step]]
    params = _params(cfg)

    def once(seed):
        groups = sampler.generate(batch, dataclasses.replace(params, seed=seed))
        gen = sum(len(c.token_ids) for g in groups for c in g)
        return 1, gen, sum(len(p) for p in batch) * params.n

    return _time(once, reps)


def agent(cfg_path: Path, threads: int, reps: int, per_task: bool) -> dict:
    from wz_engine.envs.base import train_task_seed, turn_call_seed
    from wz_engine.envs.pool import EnvPool
    from wz_engine.rollout.multiturn import RolloutStats, run_episodes

    cfg, tokenizer, sampler, _ = _policy(cfg_path, threads)
    P, G = cfg.rollout.prompts_per_step, cfg.rollout.group_size
    pool = EnvPool.from_config(cfg.env, P * G, cfg.train.seed)
    params = dataclasses.replace(_params(cfg), n=1)

    def once(seed):
        stats = RolloutStats()
        tasks = [(k, train_task_seed(cfg.train.seed, seed, k)) for k in range(P)]
        call_seed = (lambda g, t: turn_call_seed(seed, 0, g, t)) if per_task else None
        run_episodes(sampler, tokenizer, pool, cfg.env, tasks, G, params, call_seed=call_seed,
                     turn_seed=None if per_task else (lambda t: seed * 100 + t), stats=stats)
        return stats.sampler_calls, stats.generated_tokens, stats.prompt_tokens

    return _time(once, reps)


def _time(once, reps: int) -> dict:
    once(0)  # warm-up
    rows = []
    for rep in range(reps):
        start = time.perf_counter()
        calls, gen, prompt = once(rep + 1)
        rows.append((time.perf_counter() - start, calls, gen, prompt))
    wall, calls, gen, prompt = (sum(x) / reps for x in zip(*rows))
    return {"seconds": wall, "calls": calls, "generated": gen, "prompt": prompt, "gen_tok_s": gen / wall,
            "all_tok_s": (gen + prompt) / wall}


def main(argv=None) -> int:
    from wz_engine.demo.agent import AGENT_CONFIG
    from wz_engine.demo.run import DEMO_CONFIG

    p = argparse.ArgumentParser(prog="python -m bench.agent_rollout", description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the demos use 1)")
    args = p.parse_args(argv)
    results = {"single-turn demo": single_turn(DEMO_CONFIG, args.threads, args.reps),
               "agent demo": agent(AGENT_CONFIG, args.threads, args.reps, per_task=False),
               "agent demo, one call per task+turn": agent(AGENT_CONFIG, args.threads, args.reps, per_task=True)}
    print("| rollout | s | sampler calls | generated tok | prompt tok | generated tok/s | all tok/s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']:.3f} | {r['calls']:.0f} | {r['generated']:.0f} | {r['prompt']:.0f} | "
              f"{r['gen_tok_s']:,.0f} | {r['all_tok_s']:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
