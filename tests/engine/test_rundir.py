"""Run directories lose nothing: a second run into a directory that holds one is refused unless
--resume or --overwrite (which moves it aside), pruning and export keep to one run (run id), `wz export`
refuses a non-empty target without --force and says what it exported, `wz plot` says where it wrote."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wz_engine import checkpoint as ckpt
from wz_engine import manifest as mf
from wz_engine import rundir
from wz_engine.cli import main as wz
from wz_engine.train import main as train_main

TINY = Path(__file__).with_name("tiny_run.toml")


def _train(out, *extra, steps=2, keep=2):
    return train_main([str(TINY), "--set", f'train.output_dir="{out}"', "--set", f"train.steps={steps}",
                       "--set", "checkpoint.every=1", "--set", f"checkpoint.keep={keep}", *extra])


def _steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _listing(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def _checkpoint_weights(path):
    """The policy weights a checkpoint holds, under their HF names (as an export writes them)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(str(path / ckpt.MODEL_OPTIM), str(flat))
    state = torch.load(flat, weights_only=False)["model"]
    flat.unlink()
    return {k[len("model."):]: v for k, v in state.items()}


def test_a_second_run_is_refused_then_overwrite_moves_the_first_aside(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    assert _train(out, steps=3) == 0
    first = rundir.read_run(out).run_id
    metrics, listing = (out / "metrics.jsonl").read_text(), _listing(out)

    assert _train(out) == 2  # no --resume, no --overwrite
    err = capsys.readouterr().err
    assert f"already holds run {first}, 3 metric rows" in err and "--resume" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").read_text() == metrics and _listing(out) == listing  # untouched

    with pytest.raises(SystemExit) as e:  # the two exclude each other
        _train(out, "--resume", "--overwrite")
    assert e.value.code == 2

    with caplog.at_level(logging.WARNING, logger="wz_engine"):
        assert _train(out, "--overwrite") == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and f"moved the earlier run in {out}" in caplog.text and aside[0].name in caplog.text
    # The first run is whole where it was moved; the new one is another run.
    assert rundir.read_run(aside[0]).run_id == first
    assert (aside[0] / "metrics.jsonl").read_text() == metrics and _listing(aside[0]) == listing
    assert rundir.read_run(out).run_id != first and _steps(out) == [1, 2]


def test_resume_needs_a_run_to_continue(tmp_path, capsys):
    assert _train(tmp_path / "empty", "--resume") == 2
    assert "holds no run; nothing to continue" in capsys.readouterr().err
    legacy = tmp_path / "legacy"  # a run directory from before run ids
    legacy.mkdir()
    (legacy / "metrics.jsonl").write_text('{"step": 1}\n')
    assert _train(legacy, "--resume") == 2
    assert "no readable run.json" in capsys.readouterr().err
    assert (legacy / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_pruning_resume_and_export_never_mix_runs(tmp_path, capsys, caplog):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train(a, steps=4, keep=1) == 0
    assert _train(b, steps=3) == 0
    run_a, run_b = rundir.read_run(a).run_id, rundir.read_run(b).run_id
    # Run A's step 4 lands among run B's checkpoints (a copy by hand, a shared folder): it verifies,
    # but it is not B's.
    shutil.copytree(a / "checkpoints" / "step_00000004", b / "checkpoints" / "step_00000004")
    expected = _checkpoint_weights(b / "checkpoints" / "step_00000003")

    assert wz(["export", str(b), str(tmp_path / "exp")]) == 0
    out = capsys.readouterr()
    assert f"step_00000004: belongs to run {run_a}, not to this run ({run_b})" in out.err
    assert f"exported run {run_b} step 3 (checkpoint {b / 'checkpoints' / 'step_00000003'})" in out.out
    got = load_file(str(tmp_path / "exp" / "model.safetensors"))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)

    with caplog.at_level(logging.WARNING, logger="wz_engine"):
        assert _train(b, "--resume", steps=5) == 0
    assert f"belongs to run {run_a}" in caplog.text
    assert _steps(b) == [1, 2, 3, 4, 5]
    # B's own step 4 took the place of A's, which was moved aside, not deleted; pruning kept B's two
    # newest and never touched A's.
    assert [p.name for _, p in ckpt.step_dirs(b)] == ["step_00000005", "step_00000004"]
    assert all(mf.read_manifest(p)[0]["run_id"] == run_b for _, p in ckpt.step_dirs(b))
    others = [n for n in _listing(b) if n.startswith("step_00000004.other-")]
    assert len(others) == 1 and mf.read_manifest(b / "checkpoints" / others[0])[0]["run_id"] == run_a
    assert len(_listing(b)) == 3


def test_export_refuses_a_non_empty_target_without_force_and_plot_says_where(tmp_path, capsys):
    run, target = tmp_path / "run", tmp_path / "export"
    assert _train(run) == 0
    run_id = rundir.read_run(run).run_id
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert wz(["export", str(run), str(target)]) == 2
    assert "is not empty; pass --force" in capsys.readouterr().err
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]

    assert wz(["export", str(run), str(target), "--force"]) == 0
    out = capsys.readouterr().out
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("export.old-")]
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "mine"
    assert f"moved the earlier contents of {target} to {aside[0]}" in out
    assert f"exported run {run_id} step 2 (checkpoint {run / 'checkpoints' / 'step_00000002'}) to {target}" in out
    assert (target / "model.safetensors").is_file() and not (target / "notes.txt").exists()
    assert wz(["export", str(run), str(run / "inside")]) == 0  # a new folder inside the run is fine
    assert wz(["export", str(run), str(run), "--force"]) == 2  # the run itself never is
    assert "holds the run being exported" in capsys.readouterr().err

    assert wz(["plot", str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert capsys.readouterr().out.strip() == f"wz plot: wrote {tmp_path / 'c.png'}"


def test_trim_logs_drops_later_rows_and_a_line_cut_short(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    with caplog.at_level(logging.WARNING, logger="wz_engine"):
        rundir.trim_logs(tmp_path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert path.read_text().endswith("\n")
    assert "dropped 1 rows logged after step 2" in caplog.text and "1 unreadable" in caplog.text


def test_run_json_is_claimed_exclusively(tmp_path):
    """Two runs starting into one directory at once: the second claim fails, the first stays."""
    rundir.write_json_atomic(tmp_path / "run.json", {"run_id": "a"}, exclusive=True)
    with pytest.raises(FileExistsError):
        rundir.write_json_atomic(tmp_path / "run.json", {"run_id": "b"}, exclusive=True)
    assert rundir.read_run(tmp_path).run_id == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary file left behind


HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
os.pwrite(fd, b"%d\\n" % os.getpid(), 0)
print("held", flush=True)
time.sleep(120)
"""


def test_a_run_directory_in_use_by_a_live_process_is_refused(tmp_path, capsys):
    """Another live process holds the run (a double launch, workers left by a killed torchrun agent):
    refused while it lives, free once it is gone (kill -9 included)."""
    out = tmp_path / "run"
    assert _train(out) == 0
    rundir._unlock(out)  # this test process ran it: let the other process take it
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / rundir.LOCK_FILE)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _train(out, "--resume", steps=3) == 2
        assert f"is in use by a live process (pid {holder.pid})" in capsys.readouterr().err
        assert _steps(out) == [1, 2]
    finally:
        holder.kill()
        holder.wait()
    assert _train(out, "--resume", steps=3) == 0
    assert _steps(out) == [1, 2, 3]
