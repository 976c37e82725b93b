"""SIGTERM: the trainer finishes its step, writes a checkpoint and exits 0; --resume continues."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TINY = Path(__file__).with_name("tiny_run.toml")


def test_sigterm_checkpoints_and_exits_zero(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "wz_engine.train", str(TINY), "--set", "train.steps=1000",
           "--set", f'train.output_dir="{out}"']
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == [f"step_{steps[-1]:08d}"]  # exactly the last finished step, no .tmp left
    assert "stopped by signal" in stderr
