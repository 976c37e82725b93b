"""The other estimators and options run end to end: GRPO on a rule reward with a KL reference model,
DAPO dynamic sampling + overlong shaping, seq-mean aggregation, sample logging."""

import json
from pathlib import Path

import pytest
import torch

from wz_engine.config import load_config
from wz_engine.trainer import Trainer

TINY = Path(__file__).with_name("tiny_run.toml")


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_estimators_with_rule_reward_kl_and_dapo(tmp_path, estimator):
    cfg = load_config(TINY, [
        f'train.output_dir="{tmp_path}"', "train.steps=2", f'algorithm.estimator="{estimator}"',
        'judge.kind="rule"', 'judge.callable="wz_engine.demo.judge:writing_reward"',
        "algorithm.kl_coef=0.05", "algorithm.dynamic_sampling=true", "algorithm.max_sampling_rounds=2",
        "algorithm.overlong_buffer=4", 'algorithm.agg="seq-mean-token-mean"', "logging.samples_every=1",
    ])
    trainer = Trainer(cfg)
    assert trainer.ref is not None
    last = trainer.fit()
    assert trainer.step_idx == 2
    assert last["kl_mean"] >= 0 and last["sampling_rounds"] in (1, 2)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl_mean"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 2] and 0 <= samples[0]["reward"] <= 1


def test_packed_varlen_attention_matches_sdpa(tmp_path):
    """The same run through transformers' sdpa (position-id packing) and the wz_varlen attention."""
    runs = {}
    for attn in ("sdpa", "wz_varlen"):
        cfg = load_config(TINY, [f'train.output_dir="{tmp_path / attn}"', "train.steps=2",
                                 f'model.attn_implementation="{attn}"'])
        Trainer(cfg).fit()
        runs[attn] = [json.loads(x) for x in (tmp_path / attn / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(runs["sdpa"], runs["wz_varlen"]):
        assert a["tokens"] == b["tokens"] and a["reward/mean"] == b["reward/mean"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-5)


def test_nonfinite_steps_are_skipped_then_abort(tmp_path, monkeypatch):
    import wz_engine.trainer as train_mod

    cfg = load_config(TINY, [f'train.output_dir="{tmp_path}"', "train.steps=5", "train.max_nonfinite_steps=2"])
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    real = train_mod.accumulate_gradients

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        return {**out, "loss": float("nan")}

    monkeypatch.setattr(train_mod, "accumulate_gradients", poisoned)
    first = trainer.step()
    assert first["skipped"] is True
    assert all(torch.equal(v, before[k]) for k, v in trainer.policy.state_dict().items())  # no update
    with pytest.raises(RuntimeError, match="2 consecutive steps had a non-finite loss"):
        trainer.step()


def test_on_policy_fast_path_skips_old_logprob_pass_and_matches_it(tmp_path, monkeypatch):
    """One update per rollout batch: the old-logprob pass is skipped, and three steps (several
    micro-batches each, KL against a reference model) end at the same weights and metrics as with
    the separate pass (`recompute_old_logprobs`)."""
    import wz_engine.trainer as train_mod

    real = train_mod.packed_logprobs
    runs = {}
    for recompute in (False, True):
        calls = []
        monkeypatch.setattr(train_mod, "packed_logprobs",
                            lambda model, *a, **k: calls.append(model) or real(model, *a, **k))
        cfg = load_config(TINY, [f'train.output_dir="{tmp_path / str(recompute)}"', "train.steps=3",
                                 "algorithm.kl_coef=0.05", f"algorithm.recompute_old_logprobs={str(recompute).lower()}"])
        trainer = Trainer(cfg)
        assert trainer._on_policy() == (not recompute)
        trainer.fit()
        old_passes = sum(m is trainer.policy for m in calls)
        assert old_passes == (3 if recompute else 0)
        assert sum(m is trainer.ref for m in calls) == 3  # the KL reference pass always runs
        rows = [json.loads(x) for x in (tmp_path / str(recompute) / "metrics.jsonl").read_text().splitlines()]
        runs[recompute] = (trainer.policy.state_dict(), rows)
    (fast_state, fast_rows), (slow_state, slow_rows) = runs[False], runs[True]
    assert fast_state.keys() == slow_state.keys()
    for k in fast_state:
        assert torch.equal(fast_state[k], slow_state[k]), k
    for fast, slow in zip(fast_rows, slow_rows, strict=True):
        assert fast["ratio_mean"] == 1.0 and fast["clip_frac_low"] == fast["clip_frac_high"] == 0.0
        for k in ("loss", "grad_norm", "kl_mean", "ratio_mean", "clip_frac_low", "clip_frac_high", "tokens"):
            assert fast[k] == slow[k], k
        assert fast["entropy"] == pytest.approx(slow["entropy"], rel=1e-5)
        assert fast["time/logprob"] >= 0


def test_rollout_correction_keeps_the_old_logprob_pass(tmp_path):
    cfg = load_config(TINY, [f'train.output_dir="{tmp_path}"'])
    trainer = Trainer(cfg)
    cfg.rollout.sampler, cfg.rollout.vllm.is_correction = "vllm", True  # decision only: nothing runs
    assert not trainer._on_policy()
