"""No silent zero-signal training (`wz_engine.monitors`): the watch by hand, the per-step rollout
monitors by hand, and a real run whose GenRM judge (a random tiny model judging with its own weights)
returns only invalid verdicts: it warns after `train.zero_signal_steps` steps, or stops when configured."""

import json
import logging
import math
from pathlib import Path

import pytest
import torch

import wz_engine.train as train_mod
from wz_engine.config import ConfigError, load_config
from wz_engine.monitors import ZeroSignalError, ZeroSignalWatch, rollout_monitors
from wz_engine.rollout.base import Completion
from wz_engine.trainer import Trainer

TINY = Path(__file__).with_name("tiny_run.toml")
# The GenRM on the policy's own (random) weights writes gibberish: every verdict invalid, every reward 0.
INVALID_JUDGE = ['judge.kind="genrm"', "judge.genrm.max_new_tokens=4", "rollout.prompts_per_step=2",
                 "rollout.group_size=3", "model.tiny.full_byte_alphabet=true", "algorithm.skew_threshold=1.0"]


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "wz_engine"]


def test_watch_fires_after_k_steps_in_a_row_and_every_k_after(caplog):
    watch = ZeroSignalWatch(threshold=0.9, steps=3)
    high, low = {"judge/invalid_rate": 1.0}, {"judge/invalid_rate": 0.5}
    fired_at = []
    with caplog.at_level(logging.WARNING, logger="wz_engine"):
        for step, m in enumerate([high, high, low, high, high, {"judge/invalid_rate": float("nan")}, {}, high,
                                  high, high, high, high], start=1):
            before = len(_warnings(caplog))
            watch.observe(step, m)
            if len(_warnings(caplog)) > before:
                fired_at.append(step)
    # streak: 1 2 0 1 2 (NaN, missing: unchanged) 3 4 5 6 7 -> fires at streak 3 (step 8) and 6 (step 11)
    assert fired_at == [8, 11]
    msg = _warnings(caplog)[0]
    assert "judge/invalid_rate" in msg and "for 3 steps in a row" in msg and "wz judge eval" in msg
    assert "abort_on_zero_signal" in msg


def test_watch_names_each_check_and_its_cause():
    watch = ZeroSignalWatch(threshold=0.5, steps=1, abort=True)
    with pytest.raises(ZeroSignalError) as e:
        watch.observe(7, {"judge/invalid_rate": 0.1, "brpo/skew_drop_rate": 0.8, "adv/zero_rate": 0.95})
    msg = str(e.value)
    assert "step 7" in msg and "brpo/skew_drop_rate = 0.80" in msg and "adv/zero_rate = 0.95" in msg
    assert "judge/invalid_rate" not in msg  # below the threshold
    assert "skew_threshold" in msg and "Aborting" in msg


def test_watch_off_and_at_threshold():
    off = ZeroSignalWatch(threshold=0.0, steps=0, abort=True)
    off.observe(1, {"adv/zero_rate": 1.0})  # steps = 0: never checks
    at = ZeroSignalWatch(threshold=0.9, steps=1, abort=True)
    at.observe(1, {"adv/zero_rate": 0.9})  # "above" the threshold, not at it


def test_rollout_monitors_by_hand():
    def c(reason):
        return Completion([1, 2], "x", reason)

    groups = [[c("length"), c("stop"), c("stop")], [c("length"), c("length"), c("stop")]]
    adv = torch.tensor([0.0, 1.0, 0.0, -1.0, 0.0, 0.0])
    is_ref = torch.tensor([False, False, True, False, True, False])
    m = rollout_monitors(groups, adv, is_ref)
    assert m["response/truncation_rate"] == pytest.approx(3 / 6)
    assert m["adv/zero_rate"] == pytest.approx(2 / 4)  # rows 0 and 5; the references do not count
    empty = rollout_monitors([], torch.zeros(0), torch.zeros(0, dtype=torch.bool))
    assert math.isnan(empty["response/truncation_rate"]) and math.isnan(empty["adv/zero_rate"])


def test_config_checks():
    with pytest.raises(ConfigError, match="train.zero_signal_threshold"):
        load_config(TINY, ["train.zero_signal_threshold=1.5"])
    with pytest.raises(ConfigError, match="train.zero_signal_steps"):
        load_config(TINY, ["train.zero_signal_steps=-1"])


def test_all_invalid_judge_warns_after_k_steps(tmp_path, caplog):
    cfg = load_config(TINY, [f'train.output_dir="{tmp_path}"', "train.steps=3", "train.zero_signal_steps=2",
                             *INVALID_JUDGE])
    with caplog.at_level(logging.WARNING, logger="wz_engine"):
        Trainer(cfg).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["judge/invalid_rate"] for r in rows] == [1.0, 1.0, 1.0]
    assert [r["adv/zero_rate"] for r in rows] == [1.0, 1.0, 1.0]
    fired = [m for m in _warnings(caplog) if "NO LEARNING SIGNAL" in m]
    assert len(fired) == 1 and "at step 2" in fired[0]  # after K = 2 steps, not again at step 3
    assert "judge/invalid_rate = 1.00" in fired[0] and "wz judge eval" in fired[0]
    assert 'weight_sharing = "self"' in fired[0]  # the likely cause, named


def test_all_invalid_judge_aborts_when_configured(tmp_path, capsys):
    argv = [str(TINY), *[a for s in [f'train.output_dir="{tmp_path}"', "train.steps=10", "train.zero_signal_steps=2",
                                     "train.abort_on_zero_signal=true", *INVALID_JUDGE] for a in ("--set", s)]]
    assert train_mod.main(argv) == 3
    err = capsys.readouterr().err
    assert "NO LEARNING SIGNAL at step 2" in err and "wz judge eval" in err
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # stopped right after the K-th step, its metrics kept


def test_streaks_survive_resume(tmp_path, caplog):
    """The streaks are checkpointed: 2 steps, then a resumed run to step 3 warns at step 3 (K = 3), as
    the uninterrupted run would; a streak that restarted at 0 would not warn before step 5."""
    base = [f'train.output_dir="{tmp_path}"', "train.zero_signal_steps=3", *INVALID_JUDGE]
    Trainer(load_config(TINY, [*base, "train.steps=2"])).fit()
    with caplog.at_level(logging.WARNING, logger="wz_engine"):
        Trainer(load_config(TINY, [*base, "train.steps=3"]), resume=True).fit()
    fired = [m for m in _warnings(caplog) if "NO LEARNING SIGNAL" in m]
    assert len(fired) == 1 and "at step 3" in fired[0] and "for 3 steps in a row" in fired[0]
