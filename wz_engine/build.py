"""Builders of a run's parts from its config: tokenizer and model, sampler, reward source."""

from __future__ import annotations

from pathlib import Path

import torch

from wz_engine import distributed as wzdist
from wz_engine.config import RunConfig
from wz_engine.modeling import FusedHeadCausalLM

TOKENIZER_DIR = "tokenizer"
HF_CONFIG_DIR = "hf_config"


def build_tokenizer_and_model(cfg: RunConfig, output_dir: Path, prompt_texts: list[str] | None = None):
    """(tokenizer, causal LM in float32/bf16 on CPU). A tiny model's tokenizer is trained on the
    run's prompts (the demo's judge vocabulary for the demo set) and saved in the run directory so
    that a resumed run and `wz export` get exactly the same one."""
    mc = cfg.model
    if mc.attn_implementation == "wz_varlen":
        import wz_engine.attention  # noqa: F401  (registers "wz_varlen" with transformers)
    dtype = torch.bfloat16 if mc.dtype == "bfloat16" else torch.float32
    if mc.path == "tiny":
        from wz_engine.demo.tiny import build_tiny_qwen2, build_tokenizer

        saved = output_dir / TOKENIZER_DIR
        if saved.is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(saved))
        else:
            if cfg.env.name is not None:  # an agent run: the environment's texts
                from wz_engine.envs.base import env_corpus

                texts = env_corpus(cfg.env)
            elif cfg.data.path == "demo":
                from wz_engine.demo.judge import corpus

                texts = corpus()
            else:
                texts = list(prompt_texts or [])
            tokenizer = build_tokenizer(texts, vocab_size=mc.tiny.vocab_size,
                                        full_byte_alphabet=mc.tiny.full_byte_alphabet)
        t = mc.tiny
        lm = build_tiny_qwen2(len(tokenizer), hidden_size=t.hidden_size, num_layers=t.num_layers,
                              num_heads=t.num_heads, num_kv_heads=t.num_kv_heads,
                              intermediate_size=t.intermediate_size, seed=t.seed,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        lm.set_attn_implementation(mc.attn_implementation)
        lm = lm.to(dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(mc.path, trust_remote_code=mc.trust_remote_code)
        lm = AutoModelForCausalLM.from_pretrained(mc.path, dtype=dtype, attn_implementation=mc.attn_implementation,
                                                  trust_remote_code=mc.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm.config.use_cache = False
    return tokenizer, lm


def build_reward_source(cfg: RunConfig, lm, tokenizer, device, gather, sampler=None):
    """The judge (pairwise) or the scorer (pointwise) of the reward source `cfg.judge.kind`."""
    from wz_engine.algorithms import REWARD_SOURCES, RewardContext

    return REWARD_SOURCES.get(cfg.judge.kind).build(RewardContext(cfg, lm, tokenizer, device, gather, sampler))


def build_sampler(cfg: RunConfig, policy: FusedHeadCausalLM, tokenizer, info: wzdist.DistInfo):
    if cfg.rollout.sampler == "vllm":
        from wz_engine.rollout.vllm import VLLMSampler  # owned by the vLLM issue

        cfg.rollout.vllm.check_install()
        return VLLMSampler(cfg.rollout.vllm, cfg.rollout.vllm.model or cfg.model.path, device=info.device)
    from wz_engine.rollout.hf import HFSampler

    return HFSampler(policy.model, tokenizer, gather=lambda: wzdist.gathered_for_generation(policy),
                     seed=cfg.train.seed * 1000 + info.rank)


def build_collector(trainer):
    """The trainer's collect phase: single-turn prompts (`Trainer.collect`), or multi-turn episodes of the
    environment `env.name` (wz_engine.rollout.episodes)."""
    if trainer.cfg.env.name is None:
        from wz_engine.rollout.batch import PromptCollector

        return PromptCollector(trainer)
    from wz_engine.rollout.episodes import EpisodeCollector

    return EpisodeCollector(trainer)
