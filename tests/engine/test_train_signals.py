"""SIGTERM/SIGINT: the trainer finishes its step, writes a checkpoint, and `main` returns 0;
`--resume` then continues from that step."""

import json
import os
import signal
from pathlib import Path

import pytest

import wz_engine.train as train_mod

TINY = Path(__file__).with_name("tiny_run.toml")


@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_signal_checkpoints_and_returns_zero(tmp_path, monkeypatch, signum):
    class SignalledAfterTwoSteps(train_mod.Trainer):
        def step(self):
            out = super().step()
            if self.step_idx == 2:
                os.kill(os.getpid(), signum)  # arrives mid-run, as from a scheduler
            return out

    monkeypatch.setattr(train_mod, "Trainer", SignalledAfterTwoSteps)
    out = tmp_path / "run"
    argv = [str(TINY), "--set", "train.steps=1000", "--set", f'train.output_dir="{out}"']
    assert train_mod.main(argv) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]
    assert signal.getsignal(signum) is not None  # the previous handler is back

    monkeypatch.undo()
    resumed = train_mod.Trainer(train_mod.load_config(TINY, [f'train.output_dir="{out}"', "train.steps=3"]),
                                resume=True)
    assert resumed.step_idx == 2
    resumed.fit()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
