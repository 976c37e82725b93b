"""A multi-prompt trainer step, row by row: each group's rewards, its reference (keyed by prompt uid),
the advantages, and which rows and tokens enter the loss with which normalisers."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

import wz_engine.trainer as train_mod
from wz_engine.config import load_config
from wz_engine.judge.programmatic import CallableJudge
from wz_engine.rewards.brpo import assemble_brpo_rewards, draw_references

TINY = Path(__file__).with_name("tiny_run.toml")
P, G, VOTES = 4, 4, 2


def quirky_judge(prompt: str, a: str, b: str):
    """Deterministic, sometimes invalid: prefers the response whose crc32 is larger (a mix of wins and
    losses), gives no verdict on ~1 in 4 (pair, order), and shows a position bias on some pairs."""
    ha, hb = zlib.crc32(a.encode()), zlib.crc32(b.encode())
    if zlib.crc32(f"{a}|{b}".encode()) % 4 == 0:
        return "no verdict"  # invalid (in this order only)
    if (ha + hb) % 7 == 0:
        return 1.0, 0.0  # the first shown wins
    return float(ha % 1000), float(hb % 1000)


@pytest.fixture(scope="module")
def step_rows(tmp_path_factory):
    cfg = load_config(TINY, [f'train.output_dir="{tmp_path_factory.mktemp("rows")}"', "train.steps=1",
                             f"rollout.prompts_per_step={P}", f"rollout.group_size={G}",
                             f"algorithm.votes={VOTES}", "algorithm.skew_threshold=1.0",
                             'judge.callable="tests.engine.test_train_rows:quirky_judge"'])
    trainer = train_mod.Trainer(cfg)
    seen = {}
    real_collect, real_pack = trainer.collect, train_mod.pack_for_update
    trainer.collect = lambda timer: seen.setdefault("got", real_collect(timer))

    def pack(*args, **kwargs):
        seen["ub"] = real_pack(*args, **kwargs)
        return seen["ub"]

    mp = pytest.MonkeyPatch()
    mp.setattr(train_mod, "pack_for_update", pack)
    try:
        seen["metrics"] = trainer.step()
    finally:
        mp.undo()
    return cfg, seen


def test_each_group_has_its_own_reference_and_rewards(step_rows):
    cfg, seen = step_rows
    got = seen["got"]
    uids = [p.uid for p in got.prompts]
    assert len(uids) == P and len(set(uids)) == P
    refs = [draw_references([u], G, cfg.train.seed, 0)[0] for u in uids]  # one prompt at a time, by uid
    assert len(set(refs)) > 1  # the uids give different references, so a shared one would show
    is_ref = got.cat("is_ref").bool().view(P, G)
    rewards = got.cat("rewards").view(P, G)
    judge = CallableJudge(quirky_judge)
    for p, (prompt, group) in enumerate(zip(got.prompts, got.groups)):
        assert is_ref[p].tolist() == [j == refs[p] for j in range(G)], p
        alone = assemble_brpo_rewards(judge, [prompt.text], [[c.text for c in group]], [prompt.uid], step=0,
                                      seed=cfg.train.seed, votes=VOTES)
        assert rewards[p].tolist() == alone.rewards.tolist(), p  # the batch changes nothing per group
    assert (rewards != 0).any() and got.judge_stats["judge/invalid_rate"] > 0


def test_advantages_and_loss_rows(step_rows):
    _, seen = step_rows
    got = seen["got"]
    is_ref, rewards = got.cat("is_ref").bool(), got.cat("rewards")
    # skew filter off (threshold 1): BRPO's A = r, the reference's A = 0 and it is out of the loss
    assert got.cat("adv").tolist() == torch.where(is_ref, 0.0, rewards).tolist()
    assert got.cat("in_loss").bool().tolist() == (~is_ref).tolist()


def test_loss_tokens_and_normalisers(step_rows):
    _, seen = step_rows
    got, ub = seen["got"], seen["ub"]
    is_ref = got.cat("is_ref").bool().tolist()
    adv = got.cat("adv")
    responses = got.response_ids()
    # Independent count: every response token of a non-reference row, nothing else.
    expected_tokens = sum(len(r) for r, ref in zip(responses, is_ref) if not ref)
    expected_seqs = sum(1 for r, ref in zip(responses, is_ref) if not ref and len(r))
    assert ub.global_tokens == max(expected_tokens, 1) and ub.global_seqs == max(expected_seqs, 1)
    per_row = [0] * len(responses)
    for b, mask, a in zip(ub.batches, ub.masks, ub.advantages):
        rows = b.token_sequence_index
        for t in torch.nonzero(mask).flatten().tolist():
            row = int(rows[t])
            per_row[row] += 1
            assert not is_ref[row] and a[t] == adv[row]
            assert b.targets[t] == responses[row][per_row[row] - 1]  # scored in order, response tokens only
    assert per_row == [0 if ref else len(r) for r, ref in zip(responses, is_ref)]
