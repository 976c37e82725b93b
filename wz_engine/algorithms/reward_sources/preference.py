"""`judge.kind = "preference"`: train the GenRM itself on preference pairs with verifiable rewards.

The policy is the judge; the trainer's prompts are the pairs' judge prompts in both orders and each
sample's reward is its verdict checked against the label (wz_engine/judge/verifiable.py). Pointwise
(one reward per sample), so it pairs with the GRPO-family estimators over the G samples of one
(pair, order); `brpo` is a config error.

Logged every step (this rank's samples, averaged over ranks): judge/accuracy (chosen strictly
preferred), judge/invalid_rate, judge/position_bias, judge/order_agreement (pairs with both orders in
the step), judge/tie_rate, judge/accuracy_chosen_first|second. With `judge.preference.eval_every`,
the same (plus heldout/pair_accuracy) on the held-out pairs, judged by the GenRM on the live policy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from wz_engine.algorithms.reward_source import GroupRewards, register_reward_source

TRAIN_METRICS = ("accuracy", "invalid_rate", "position_bias", "order_agreement", "tie_rate",
                 "accuracy_chosen_first", "accuracy_chosen_second")
HELDOUT_METRICS = (*TRAIN_METRICS, "pair_accuracy")


def _check(cfg) -> None:
    from wz_engine.algorithms.reward_sources.pairwise import derive_vllm_judge_mode
    from wz_engine.config import ConfigError

    g, p, d = cfg.judge.genrm, cfg.judge.preference, cfg.data
    fixes = [
        (d.path == "demo", ("data.path: judge.kind = 'preference' trains on preference pairs: set data.path to a "
                           "JSONL file of {prompt, chosen, rejected} (or TRL's chat variants) or 'hf:<dataset>'")),
        (d.holdout != 0, "data.holdout: counts prompts; hold out preference pairs with judge.preference.holdout"),
        (d.system_prompt is not None, ("data.system_prompt: the judge prompt is the GenRM's: set "
                                      "judge.genrm.system_prompt instead")),
        (g.mode == "pointwise", ("judge.genrm.mode: 'pointwise' has no pair to prefer; use 'pairwise' (or "
                                "'reference' with a reference in every pair)")),
        (g.weight_sharing != "self", ("judge.genrm.weight_sharing: the judge being trained is the policy "
                                     f"itself: 'self', got {g.weight_sharing!r}")),
        (bool(g.chat_template_kwargs), ("judge.genrm.chat_template_kwargs: not applied to the trainer's prompts "
                                       "yet; leave it empty with judge.kind = 'preference'")),
        (p.eval_every > 0 and not (p.holdout or p.eval_data), ("judge.preference.eval_every: needs a held-out "
                                                              "split (judge.preference.holdout or eval_data)")),
    ]
    for wrong, message in fixes:
        if wrong:
            raise ConfigError(message)
    if cfg.rollout.sampler == "vllm":
        derive_vllm_judge_mode(cfg)


def prompt_rows(cfg) -> list[dict]:
    """The training pairs' judge prompts, both orders (wz_engine.judge.verifiable.judge_prompt_rows)."""
    from wz_engine.judge.genrm import GenRM
    from wz_engine.judge.verifiable import judge_prompt_rows

    train, _ = _pairs(cfg)
    renderer = GenRM(None, None, cfg.judge.genrm)  # renders only: no sampler, no tokenizer
    return judge_prompt_rows(train, renderer.render_message, cfg.judge.genrm.system_prompt, cfg.data.prompt_field,
                             cfg.data.reference_field)


def _pairs(cfg):
    """(training pairs, held-out pairs)."""
    from wz_engine.judge.verifiable import load_preference_pairs, split_pairs

    p = cfg.judge.preference
    train, heldout = split_pairs(load_preference_pairs(cfg.data.path, cfg.data.split), p.holdout)
    if p.eval_data:
        heldout = load_preference_pairs(p.eval_data, p.eval_split)
    return train, heldout


@dataclass
class PreferenceJudge:
    """What the source builds: the GenRM (its verdict grammar parses the samples; on the live policy it
    judges the held-out pairs) and this rank's share of the held-out pairs."""

    genrm: object
    heldout: list
    evaluated_at: int | None = None
    """The rollout step of the last held-out evaluation (DAPO may assemble several rounds per step)."""

    def heldout_metrics(self, prefix: str = "heldout/") -> dict[str, float]:
        """Accuracy, both-order agreement, position bias, invalid rate, ... of the live judge on this
        rank's held-out pairs (every key present, NaN where undefined, so ranks average key by key)."""
        from wz_engine.judge.eval import evaluate

        if self.genrm.sampler is None:
            raise ValueError("heldout_metrics: the reward source was built without a model to judge with")
        metrics = evaluate(self.genrm, self.heldout, votes=self.genrm.config.votes)[0] if self.heldout else {}
        return _fixed_keys(metrics, HELDOUT_METRICS, prefix)


def _fixed_keys(metrics: dict, names, prefix: str) -> dict[str, float]:
    return {prefix + k: float(metrics.get(k, math.nan)) for k in names}


def assemble(built: PreferenceJudge, prompts, groups, step: int, cfg) -> GroupRewards:
    """Rewards [B] from each sample's verdict against its prompt's label; metrics as the module says."""
    from wz_engine.judge.base import Verdict
    from wz_engine.judge.eval import preference_metrics
    from wz_engine.judge.metrics import JudgementRecord
    from wz_engine.judge.parser import parse_verdict
    from wz_engine.judge.verifiable import verdict_reward

    p = cfg.judge.preference
    rewards, records = [], []
    for prompt, group in zip(prompts, groups):
        chosen_first = prompt.reference == "A"
        for completion in group:
            parsed = parse_verdict(completion.text, built.genrm.grammar)
            scores = parsed.scores or (None, None)
            verdict = Verdict(scores[0], scores[1], parsed.valid, completion.text)
            rewards.append(verdict_reward(verdict, chosen_first, p.margin, p.format_penalty))
            records.append(JudgementRecord(verdict, prompt.uid // 2, not chosen_first, parsed.reason))
    stats = _fixed_keys(preference_metrics(records, len(prompts), 0.0) if records else {}, TRAIN_METRICS, "judge/")
    if p.eval_every and step % p.eval_every == 0 and built.evaluated_at != step:
        built.evaluated_at = step
        start = time.perf_counter()
        stats.update(built.heldout_metrics())
        stats["time/heldout_eval"] = time.perf_counter() - start
    r = torch.tensor(rewards, dtype=torch.float32)
    return GroupRewards(r, torch.zeros_like(r, dtype=torch.bool), stats)


@register_reward_source("preference", pairwise=False, validate=_check, assemble=assemble, prompt_rows=prompt_rows)
def build(ctx) -> PreferenceJudge:
    import torch.distributed as dist

    from wz_engine.algorithms.reward_sources.pairwise import genrm
    from wz_engine.judge.genrm import GenRM

    cfg, p = ctx.cfg, ctx.cfg.judge.preference
    heldout = _pairs(cfg)[1] if p.holdout or p.eval_data else []
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    # the GenRM on the live policy (as judge.kind = "genrm" builds it) judges the held-out pairs
    judge = genrm.build(ctx) if ctx.lm is not None else GenRM(None, ctx.tokenizer, cfg.judge.genrm)
    return PreferenceJudge(judge, heldout[rank::world])
