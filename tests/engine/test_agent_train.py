"""Agent runs through the trainer: turn rows and their loss masks, episode-level GRPO on the same rollouts,
resume with env state, the vLLM adapter (stand-in engine) and the 2-process torchrun path."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import wz_engine.trainer as train_mod
from wz_engine.config import load_config
from wz_engine.metrics import PhaseTimer
from wz_engine.update import pack_for_update

AGENT = Path(__file__).with_name("agent_run.toml")


def _cfg(out, *overrides):
    return load_config(AGENT, [f'train.output_dir="{out}"', *overrides])


def test_turns_are_rows_and_only_the_model_tokens_are_in_the_loss(tmp_path):
    trainer = train_mod.Trainer(_cfg(tmp_path))
    got = trainer.collector.collect(PhaseTimer())
    episodes = got.episodes
    G = trainer.cfg.rollout.group_size
    assert len(episodes) == 2 * G and all(1 <= len(e.turns) <= 4 for e in episodes)
    turns = [t for e in episodes for t in e.turns]
    assert got.group_rows() == [sum(len(e.turns) for e in episodes[k * G:(k + 1) * G]) for k in range(2)]
    prompts, responses = got.prompt_ids(), got.response_ids()
    assert len(prompts) == len(responses) == len(turns) == len(got.cat("adv"))
    tok = trainer.tokenizer
    for t, p, r in zip(turns, prompts, responses):
        assert p == t.prompt_ids and r == t.completion.token_ids
        assert t.observation in tok.decode(p)  # the observation is prompt, never response
    ub = pack_for_update(prompts, responses, got.cat("adv"), got.cat("in_loss").bool(), 512, tok.pad_token_id)
    scored = 0
    for b, mask in zip(ub.batches, ub.masks):
        for k, i in enumerate(b.sequence_index.tolist()):
            lo, hi = int(b.cu_seqlens[k]), int(b.cu_seqlens[k + 1])
            m = mask[lo:hi]
            # the loss covers exactly the positions whose target is one of the turn's sampled tokens
            assert b.targets[lo:hi][m].tolist() == responses[i]
            assert not m[:len(prompts[i]) - 1].any()  # no prompt (observation, history) token is a target
            scored += int(m.sum())
    assert scored == sum(len(r) for r in responses)
    m = trainer.step()
    for key in ("agent/success_rate", "agent/episode_length", "agent/invalid_action_rate",
                "agent/anchor_group_size_mean", "agent/anchor_steps_with_partner", "agent/step_advantage_share",
                "agent/rollout_tokens_per_s", "loss", "grad_norm"):
        assert key in m and math.isfinite(m[key]), key
    assert m["agent/sampler_calls"] == m["agent/turn_rounds"] * 2  # seed_per_prompt: one call per task and turn
    assert 0 < m["agent/step_advantage_share"] < 1


def test_episode_level_grpo_on_the_same_rollouts(tmp_path):
    from wz_kernels.advantage import group_advantages

    trainer = train_mod.Trainer(_cfg(tmp_path, 'algorithm.estimator="grpo"', 'env.episode_return="success"'))
    got = trainer.collector.collect(PhaseTimer())
    returns = torch.tensor([float(e.success) for e in got.episodes])
    want = group_advantages(returns, torch.tensor([e.group for e in got.episodes]), "grpo")
    per_turn = want.repeat_interleave(torch.tensor([len(e.turns) for e in got.episodes]))
    torch.testing.assert_close(got.cat("adv"), per_turn)  # every turn carries its trajectory's advantage
    assert got.metrics["agent/step_advantage_share"] == 0.0


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}


def _rows(out):
    drop = ("time/", "tokens_per_s", "agent/rollout_tokens_per_s")
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(drop)}
            for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_resume_mid_run_is_bit_identical_with_env_state(tmp_path):
    """gridworld with slip: every env instance's own RNG moves during a step, so the resumed run matches the
    straight one only if the checkpoint restores it (and the non-restored control run does not)."""
    overrides = ["train.steps=4", "rollout.seed_per_prompt=false"]  # the sampler's generator is state too
    straight = train_mod.Trainer(_cfg(tmp_path / "a", *overrides))
    straight.fit()

    first = train_mod.Trainer(_cfg(tmp_path / "b", *overrides))
    for _ in range(2):
        first.logger.log(first.step_idx + 1, first.step())
    first.save()
    first.logger.close()
    saved = torch.load(next((tmp_path / "b" / "checkpoints").iterdir()) / "trainer_rank0.pt", weights_only=False)
    fresh = train_mod.Trainer(_cfg(tmp_path / "c", *overrides)).collector.state_dict()
    assert saved["collector"]["envs"] != fresh["envs"]  # the env RNGs moved: restoring them matters

    resumed = train_mod.Trainer(_cfg(tmp_path / "b", *overrides), resume=True)
    assert resumed.step_idx == 2
    resumed.fit()
    assert _rows(tmp_path / "b") == _rows(tmp_path / "a")
    want, got = _weights(straight), _weights(resumed)
    assert all(torch.equal(got[k], want[k]) for k in want)

    control = train_mod.Trainer(_cfg(tmp_path / "b", *overrides), resume=True)
    control.collector.load_state_dict(fresh)  # as if the env state were not in the checkpoint
    rows_a = _rows(tmp_path / "a")
    assert {k: v for k, v in control.step().items() if k in rows_a[2]} != rows_a[2]


# ---------------------------------------------------------------------- the vLLM adapter


def test_agent_step_on_the_vllm_sampler(tmp_path, monkeypatch):
    from tests.engine.test_train_wiring import _standin_api
    from wz_engine.rollout.vllm import VLLMSampler

    def build_sampler(cfg, policy, tokenizer, info):  # the real adapter, a stand-in engine
        shapes = {n: tuple(p.shape) for n, p in policy.model.named_parameters()}
        policy.model.save_pretrained(str(tmp_path / "hf"))
        return VLLMSampler(cfg.rollout.vllm, str(tmp_path / "hf"), api=_standin_api(shapes), device="cpu")

    monkeypatch.setattr(train_mod, "build_sampler", build_sampler)
    trainer = train_mod.Trainer(_cfg(tmp_path, 'rollout.sampler="vllm"', "rollout.vllm.bucket_size_mb=1",
                                     "rollout.seed_per_prompt=false",  # the stand-in emits ids < 97:
                                     "model.tiny.full_byte_alphabet=true"))  # a vocabulary above that
    m = trainer.step()
    requests = trainer.sampler.llm.generate_requests
    # one engine call per turn for all active episodes, each with n = 1 and the engine's log-probs (TIS)
    assert len(requests) == m["agent/turn_rounds"] == m["agent/sampler_calls"]
    assert len(requests[0][0]) == 2 * trainer.cfg.rollout.group_size
    assert all(sp.n == 1 and sp.logprobs == 0 for _, params, _ in requests for sp in params)
    for key in ("tis/mean_abs_logp_diff", "tis/max_ratio", "agent/invalid_action_rate"):
        assert math.isfinite(m[key]), key
    assert trainer.sampler.weight_version == 1


# ---------------------------------------------------------------------- torchrun


def test_two_process_agent_run_matches_one_process(tmp_path):
    from tests.engine.test_train_distributed import _env, _metrics
    from wz_engine.train import main as train_main

    overrides = ["--set", "train.steps=2"]
    assert train_main([str(AGENT), *overrides, "--set", f'train.output_dir="{tmp_path / "one"}"']) == 0
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "wz_engine.train", str(AGENT), *overrides,
                          "--set", f'train.output_dir="{tmp_path / "two"}"'],
                         env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        # the same tasks (seeded by slot), the same samples (seeded per task and turn), each rank its share
        for key in ("agent/success_rate", "agent/episode_length", "agent/invalid_action_rate", "tokens",
                    "agent/generated_tokens", "agent/anchor_group_size_mean", "agent/sampler_calls"):
            assert ra[key] == rb[key], key
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
    for rank in (0, 1):  # each rank checkpointed its own env instances
        state = torch.load(tmp_path / "two" / "checkpoints" / "step_00000002" / f"trainer_rank{rank}.pt",
                           weights_only=False)
        assert len(state["collector"]["envs"]["instances"]) == 4


# ---------------------------------------------------------------------- wz demo --agent


def test_agent_demo_runs_both_estimators_and_reports(tmp_path, capsys):
    """The demo's plumbing on a short run (its learning is measured in bench/RESULTS.md): both runs, the
    held-out evaluation before and after, curves and the comparison plot, the printed lines."""
    from wz_engine.cli import main as wz

    assert wz(["demo", "--agent", "--set", f'train.output_dir="{tmp_path}"', "--set", "train.steps=2",
               "--set", "env.eval_seeds=3", "--set", "rollout.prompts_per_step=2", "--episodes-per-seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "success rate: initial " in out and " -> trained " in out and "GiGPO vs episode-level GRPO at 2 steps" in out
    summary = json.loads((tmp_path / "demo_eval.json").read_text())
    gigpo, grpo = summary["runs"]
    assert (gigpo["estimator"], grpo["estimator"]) == ("gigpo", "grpo")
    assert gigpo["initial"] == grpo["initial"]  # the same initial weights and held-out episodes
    assert gigpo["trained"]["episodes"] == 6
    for png in (gigpo["curves"], grpo["curves"], summary["comparison"]):
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "gigpo" / "metrics.jsonl").is_file() and (tmp_path / "grpo" / "metrics.jsonl").is_file()
