"""Pairwise judges (BRPO): a Python function by import path, or the generative reward model."""

from __future__ import annotations

import dataclasses

from wz_engine.algorithms.reward_source import register_reward_source
from wz_engine.algorithms.reward_sources.pointwise import _check_callable_path


@register_reward_source("callable", pairwise=True, validate=_check_callable_path)
def callable_judge(ctx):
    """`judge.callable`: (prompt, response_a, response_b) -> (score_a, score_b)."""
    from wz_engine.judge.programmatic import CallableJudge

    return CallableJudge.from_path(ctx.cfg.judge.callable)


def _genrm_settings(cfg) -> None:
    unify_votes(cfg)
    if cfg.rollout.sampler == "vllm":
        derive_vllm_judge_mode(cfg)


@register_reward_source("genrm", pairwise=True, validate=_genrm_settings)
def genrm(ctx):
    """The GenRM on the vLLM engine (judge_mode), or on an HF sampler sharing the policy's weights."""
    from wz_engine.judge.genrm import GenRM

    cfg = ctx.cfg
    if ctx.sampler is not None and cfg.rollout.sampler == "vllm":
        return GenRM(ctx.sampler.judge_sampler(), ctx.tokenizer, cfg.judge.genrm)  # one engine
    from wz_engine.judge.sharing import build_judge_engine
    from wz_engine.rollout.hf import HFSampler

    engine = build_judge_engine(cfg.judge.genrm, ctx.lm, ctx.tokenizer,
                                sampler_factory=lambda m, t: HFSampler(m, t, gather=ctx.gather,
                                                                       seed=cfg.train.seed + 7919))
    return GenRM(engine.sampler, engine.tokenizer, cfg.judge.genrm)


def unify_votes(cfg) -> None:
    """algorithm.votes and judge.genrm.votes are one setting (1 = unset): both take the value set."""
    from wz_engine.config import ConfigError

    a, g = cfg.algorithm.votes, cfg.judge.genrm.votes
    if a == g:
        return
    if a > 1 and g > 1:
        raise ConfigError(f"algorithm.votes = {a} and judge.genrm.votes = {g} disagree: they are one setting "
                          "(judge samples per pair and order); set only one of them")
    votes = max(a, g)
    cfg.algorithm.votes = votes
    cfg.judge.genrm = dataclasses.replace(cfg.judge.genrm, votes=votes)


def derive_vllm_judge_mode(cfg) -> None:
    """rollout.vllm.judge_mode (+ its path) from judge.genrm.weight_sharing; explicit contradictions
    are errors naming both keys."""
    from wz_engine.config import ConfigError

    g, v = cfg.judge.genrm, cfg.rollout.vllm
    mode, path_key, path = {"self": ("self", None, None),
                            "lora": ("lora", "judge_lora_path", g.lora_path),
                            "checkpoint": ("swap", "judge_checkpoint", g.checkpoint_path)}[g.weight_sharing]
    if v.judge_mode not in ("self", mode):
        raise ConfigError(f"rollout.vllm.judge_mode = {v.judge_mode!r} contradicts judge.genrm.weight_sharing = "
                          f"{g.weight_sharing!r} (which implies {mode!r}): set only judge.genrm.weight_sharing "
                          "(\"lora\" -> vllm \"lora\", \"checkpoint\" -> vllm \"swap\")")
    genrm_key = {"judge_lora_path": "judge.genrm.lora_path", "judge_checkpoint": "judge.genrm.checkpoint_path"}
    for key in ("judge_lora_path", "judge_checkpoint"):
        explicit = getattr(v, key)
        if explicit is not None and (key != path_key or explicit != path):
            wanted = f"{genrm_key[key]} = {path!r}" if key == path_key else \
                f"judge.genrm.weight_sharing = {g.weight_sharing!r}"
            raise ConfigError(f"rollout.vllm.{key} = {explicit!r} contradicts {wanted}: set the judge's "
                              f"weights under judge.genrm only")
    changes = {"judge_mode": mode, **({path_key: path} if path_key else {})}
    try:
        cfg.rollout.vllm = dataclasses.replace(v, **changes)
    except ValueError as e:  # e.g. "swap" needs enable_sleep_mode
        raise ConfigError(f"rollout.vllm (judge_mode {mode!r} from judge.genrm.weight_sharing = "
                          f"{g.weight_sharing!r}): {e}") from None
