"""TensorBoard on resume: the events an interrupted run wrote after its checkpoint are purged, so every
step appears once, with the resumed run's value (read back from the real event files)."""

import pytest

from wz_engine.metrics import MetricsLogger

pytest.importorskip("tensorboard")


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_resumed_run_replaces_the_steps_after_its_checkpoint(tmp_path):
    first = MetricsLogger(tmp_path, enabled=True)
    for step in range(1, 6):  # the run got to step 5, its last checkpoint was step 3
        first.log(step, {"loss": float(step)})
    first.close()
    resumed = MetricsLogger(tmp_path, enabled=True, resume=True, resume_step=3)
    for step in (4, 5, 6):
        resumed.log(step, {"loss": 10.0 * step})
    resumed.close()
    assert _scalars(tmp_path, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()  # appended: trim_logs is the trainer's part
    assert len(lines) == 8


def test_fresh_run_purges_nothing(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True)
    for step in (1, 2):
        logger.log(step, {"loss": float(step)})
    logger.close()
    assert _scalars(tmp_path, "loss") == [(1, 1.0), (2, 2.0)]


def test_trainer_resume_logs_each_step_once(tmp_path):
    """A run to step 3 whose step-3 checkpoint is lost resumes from step 2 and logs step 3 again: the event
    files hold steps 1, 2, 3 once each (the resumed step 3 replaces the lost one)."""
    import shutil
    from pathlib import Path

    from wz_engine.checkpoint import step_dirs
    from wz_engine.config import load_config
    from wz_engine.trainer import Trainer

    tiny = Path(__file__).with_name("tiny_run.toml")
    cfg = [f'train.output_dir="{tmp_path}"', "logging.tensorboard=true", "checkpoint.every=2", "checkpoint.keep=5"]
    Trainer(load_config(tiny, cfg)).fit()
    newest = dict(step_dirs(tmp_path))
    shutil.rmtree(newest[3])
    Trainer(load_config(tiny, cfg), resume=True).fit()
    assert [s for s, _ in _scalars(tmp_path, "train/rollout_step")] == [1, 2, 3]
