"""Several optimizer steps per rollout batch: the mini-batch partition, the schedule against a plain-torch
re-implementation (wz_engine.schedule.ppo_schedule_reference), optimizer vs rollout step counting, resume."""

import copy
import json
from pathlib import Path

import pytest
import torch

import wz_engine.trainer as train_mod
from wz_engine.config import ConfigError, load_config
from wz_engine.schedule import combine_updates, mini_batch_rows, ppo_schedule_reference
from wz_engine.trainer import Trainer
from wz_engine.update import lr_lambda

TINY = Path(__file__).with_name("tiny_run.toml")
# a pointwise reward: every rollout has a non-zero advantage (BRPO's tiny-model verdicts are mostly ties)
GRPO_RULE = ('algorithm.estimator="grpo"', 'judge.kind="rule"', 'judge.callable="wz_engine.demo.judge:writing_reward"')


def test_mini_batch_rows_partition_whole_groups_seeded():
    parts = mini_batch_rows(5, 3, 2, seed=11)
    assert [len(p) for p in parts] == [9, 6]  # sizes differ by at most one group
    rows = torch.cat(parts)
    assert sorted(rows.tolist()) == list(range(15))  # a partition of the rows
    for p in parts:
        assert p.tolist() == sorted(p.tolist())
        groups = (p // 3).unique()
        assert sorted(p.tolist()) == sorted((groups[:, None] * 3 + torch.arange(3)).flatten().tolist())
    assert all(torch.equal(a, b) for a, b in zip(parts, mini_batch_rows(5, 3, 2, seed=11)))
    assert any(not torch.equal(mini_batch_rows(8, 2, 4, seed=s)[0], mini_batch_rows(8, 2, 4, seed=0)[0])
               for s in range(1, 6))
    assert mini_batch_rows(4, 2, 1, seed=3)[0].tolist() == list(range(8))  # one mini-batch: no shuffle
    assert [p.numel() for p in mini_batch_rows(0, 4, 2, seed=0)] == [0, 0]


def test_mini_batches_do_not_depend_on_the_world_size():
    """Two ranks holding groups 0-3 and 4-7 take exactly their rows of the one-rank mini-batches."""
    whole = mini_batch_rows(8, 3, 4, seed=5)
    ranks = [mini_batch_rows(4, 3, 4, seed=5, first_group=4 * r, total_groups=8) for r in (0, 1)]
    for m, rows in enumerate(whole):
        assert rows.tolist() == ranks[0][m].tolist() + (ranks[1][m] + 12).tolist()
    # a rank that kept fewer groups (dynamic sampling) takes the pieces' rows of those it has
    short = mini_batch_rows(3, 3, 4, seed=5, first_group=4, total_groups=8)
    assert [r.tolist() for r in short] == [[x for x in r.tolist() if x < 9] for r in ranks[1]]


def test_mini_batch_rows_with_a_row_count_per_group():
    """Multi-turn episode groups hold as many rows as turns: the pieces still take whole groups."""
    sizes = [3, 1, 4, 2, 5]
    starts = [0, 3, 4, 8, 10]
    parts = mini_batch_rows(5, sizes, 2, seed=11)
    same = mini_batch_rows(5, 3, 2, seed=11)  # the same seed picks the same groups
    for p, q in zip(parts, same):
        groups = sorted(set((q // 3).tolist()))
        assert p.tolist() == [r for g in groups for r in range(starts[g], starts[g] + sizes[g])]
    assert sorted(torch.cat(parts).tolist()) == list(range(15))
    assert mini_batch_rows(5, sizes, 1, seed=0)[0].tolist() == list(range(15))
    with pytest.raises(ValueError, match="4 group sizes for 5 groups"):
        mini_batch_rows(5, sizes[:4], 2, seed=0)


def test_combine_updates():
    out = combine_updates([({"loss": 1.0, "clip_frac_low": 0.5}, 2.0, 0.1, True),
                           ({"loss": 3.0, "clip_frac_low": 0.0}, 4.0, 0.2, False)])
    assert out == {"loss": 2.0, "clip_frac_low": 0.25, "grad_norm": 3.0, "lr": 0.2, "skipped": True}


@pytest.mark.parametrize("override, message", [
    ("algorithm.ppo_mini_batch_size=3", "algorithm.ppo_mini_batch_size: must divide rollout.prompts_per_step = 8"),
    ("algorithm.ppo_mini_batch_size=0", "algorithm.ppo_mini_batch_size"),
    ("algorithm.ppo_epochs=0", "algorithm.ppo_epochs: must be >= 1"),
])
def test_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def _cfg(out, *extra):
    return load_config(TINY, [f'train.output_dir="{out}"', *extra])


def _record(monkeypatch, name, into):
    real = getattr(train_mod, name)

    def wrapper(*args, **kwargs):
        out = real(*args, **kwargs)
        into.append(out)
        return out

    monkeypatch.setattr(train_mod, name, wrapper)


@pytest.mark.parametrize("epochs, mini_batch", [(1, None), (2, 2)], ids=["1x1", "2x2"])
def test_schedule_matches_plain_torch(tmp_path, monkeypatch, epochs, mini_batch):
    """One rollout step on the same rollouts, mini-batches and initial weights as the plain-torch
    schedule: every optimizer step's loss, clip fractions and grad norm, and the final weights, agree.
    1 x 1 is the on-policy fast path (no old pass, ratio 1); 2 epochs x 2 mini-batches = 4 optimizer
    steps runs the old pass and clips from its second step on."""
    cfg = _cfg(tmp_path, "train.steps=1", f"algorithm.ppo_epochs={epochs}", "optim.lr=3e-2",
               f"algorithm.ppo_mini_batch_size={mini_batch or 4}", "algorithm.clip_low=0.1",
               "algorithm.clip_high=0.1", *GRPO_RULE)
    trainer = Trainer(cfg)
    n_steps = epochs * (4 // (mini_batch or 4))
    assert trainer._on_policy() == (n_steps == 1) and trainer.updates_per_rollout == n_steps
    lm0 = copy.deepcopy(trainer.policy.model)
    parts, collected, old_passes = [], [], []
    _record(monkeypatch, "mini_batch_rows", parts)
    real_collect = trainer.collect
    monkeypatch.setattr(trainer, "collect", lambda timer: collected.append(real_collect(timer)) or collected[-1])
    _record(monkeypatch, "packed_logprobs", old_passes)
    out = trainer.step()
    got = collected[0]
    assert len(old_passes) == (0 if n_steps == 1 else len(parts[0]))  # once per mini-batch, before any step
    assert out["train/optimizer_step"] == n_steps and out["train/rollout_step"] == 1

    oc = cfg.optim
    ref_opt = torch.optim.AdamW(lm0.parameters(), lr=oc.lr, betas=oc.betas, eps=oc.eps, weight_decay=oc.weight_decay)
    ref = ppo_schedule_reference(lm0, ref_opt, got.prompt_ids(), got.response_ids(), got.cat("adv"),
                                 got.cat("in_loss").bool(), parts[0], epochs=epochs, clip_low=0.1, clip_high=0.1,
                                 grad_clip=oc.grad_clip)
    steps = trainer.last_updates
    assert len(steps) == len(ref) == n_steps
    for i, ((metrics, grad_norm, _, taken), want) in enumerate(zip(steps, ref)):
        assert taken
        # the loss sums terms of both signs: its error is relative to the terms (|A| ~ 1), not to it
        assert metrics["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-5), i
        assert grad_norm == pytest.approx(want["grad_norm"], rel=1e-3), i
        for k in ("clip_frac_low", "clip_frac_high"):
            assert metrics[k] == pytest.approx(want[k], abs=1e-6), (i, k)
    assert steps[0][0]["clip_frac_low"] == steps[0][0]["clip_frac_high"] == 0.0  # first step: ratio 1
    if n_steps > 1:
        assert sum(s[0]["clip_frac_low"] + s[0]["clip_frac_high"] for s in steps[1:]) > 0
    assert out["loss"] == pytest.approx(sum(w["loss"] for w in ref) / n_steps, rel=1e-4, abs=1e-5)
    for (name, p), p_ref in zip(trainer.policy.model.named_parameters(), lm0.parameters()):
        torch.testing.assert_close(p, p_ref, atol=2e-3, rtol=0, msg=name)


def test_lr_schedule_counts_optimizer_steps_and_both_counters_are_logged(tmp_path):
    cfg = _cfg(tmp_path, "train.steps=2", "algorithm.ppo_epochs=2", "algorithm.ppo_mini_batch_size=2",
               "optim.warmup_steps=3", 'optim.schedule="linear"')
    trainer = Trainer(cfg)
    trainer.fit()
    f = lr_lambda(3, 2 * 4, "linear", 0.0)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["train/rollout_step"], r["train/optimizer_step"]) for r in rows] == [(1, 4), (2, 8)]
    assert [r["lr"] for r in rows] == pytest.approx([cfg.optim.lr * f(3), cfg.optim.lr * f(7)])
    assert trainer.scheduler.last_epoch == 8


def test_resume_between_rollout_steps_is_bit_identical(tmp_path):
    extra = ("algorithm.ppo_epochs=2", "algorithm.ppo_mini_batch_size=2", "optim.warmup_steps=2",
             'optim.schedule="cosine"', "rollout.seed_per_prompt=false")
    straight = Trainer(_cfg(tmp_path / "a", "train.steps=3", *extra))
    straight.fit()
    first = Trainer(_cfg(tmp_path / "b", "train.steps=3", *extra))
    first.step()
    first.save()
    first.logger.close()
    resumed = Trainer(_cfg(tmp_path / "b", "train.steps=3", *extra), resume=True)
    assert (resumed.step_idx, resumed.optimizer_step) == (1, 4)
    resumed.fit()
    assert resumed.optimizer_step == straight.optimizer_step == 12
    want = straight.policy.state_dict()
    for k, v in resumed.policy.state_dict().items():
        assert torch.equal(v, want[k]), k
