"""Checkpoints: a run interrupted and resumed reaches bit-identical weights; atomic layout; export."""

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from wz_engine import checkpoint as ckpt
from wz_engine.cli import main as wz
from wz_engine.config import load_config
from wz_engine.train import main as train_main
from wz_engine.trainer import Trainer

TINY = Path(__file__).with_name("tiny_run.toml")


def _cfg(out, steps=4):
    return load_config(TINY, [f'train.output_dir="{out}"', f"train.steps={steps}", "optim.warmup_steps=1",
                              'optim.schedule="cosine"', "rollout.seed_per_prompt=false"])


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}


def test_resume_is_bit_identical_and_export_loads(tmp_path):
    straight = Trainer(_cfg(tmp_path / "a"))
    straight.fit()
    expected = _weights(straight)

    first = Trainer(_cfg(tmp_path / "b"))
    for _ in range(2):
        first.step()
    first.save()
    first.logger.close()
    # A checkpoint never appears half-written: only the renamed directory is visible.
    names = [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()]
    assert names == ["step_00000002"]
    assert ckpt.newest_verified(tmp_path / "b", first.run.run_id).path.name == "step_00000002"

    resumed = Trainer(_cfg(tmp_path / "b"), resume=True)
    assert resumed.step_idx == 2
    resumed.fit()
    got = _weights(resumed)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    assert resumed.optimizer.state_dict()["state"].keys() == straight.optimizer.state_dict()["state"].keys()

    # Export: HF safetensors + config + tokenizer that transformers loads back with the same weights.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wz_engine.cli import main as wz

    assert wz(["export", str(tmp_path / "b"), str(tmp_path / "export")]) == 0
    out = tmp_path / "export"
    assert (out / "model.safetensors").is_file()
    lm = AutoModelForCausalLM.from_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(out))
    for k, v in lm.state_dict().items():
        assert torch.equal(v, expected[f"model.{k}"]), k

    assert wz(["plot", str(tmp_path / "b"), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert wz(["trian"]) == 2  # unknown command: usage, with a suggestion


def _draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()  # global RNG on purpose


def test_checkpoint_restores_every_rng_state(tmp_path):
    """python, numpy and torch RNG streams continue after a load exactly as they did after the save."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = ckpt.save_checkpoint(tmp_path, 1, model, optimizer, {"step": 1}, {}, rank=0, run_id="rng")
    after_save = _draws()
    random.seed(7), np.random.seed(8), torch.manual_seed(9)  # anything in between
    assert ckpt.load_checkpoint(path, model, optimizer, rank=0)["step"] == 1
    assert _draws() == after_save


# -- corrupt checkpoints: each case ends in the documented fallback (or a clear error) ------------------


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    """A finished 3-step run with a checkpoint after every step (step_1, step_2, step_3)."""
    out = tmp_path_factory.mktemp("ckpts") / "run"
    assert train_main([str(TINY), "--set", f'train.output_dir="{out}"', "--set", "checkpoint.every=1",
                       "--set", "checkpoint.keep=3"]) == 0
    return out


def _corrupt_truncated_shard(root):
    shard = root / "step_00000003" / "model_optim" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _corrupt_garbage_trainer_state(root):
    state = root / "step_00000003" / "trainer_rank0.pt"
    state.write_bytes(np.random.default_rng(0).bytes(state.stat().st_size))  # same size: only the checksum sees it


def _corrupt_missing_metadata(root):
    (root / "step_00000003" / "model_optim" / ".metadata").unlink()


def _corrupt_empty_newest_folder(root):
    (root / "step_00000004").mkdir()


def _corrupt_wrong_run_id(root):
    shutil.copytree(root / "step_00000003", root / "step_00000004")
    manifest = json.loads((root / "step_00000004" / "manifest.json").read_text())
    (root / "step_00000004" / "manifest.json").write_text(json.dumps({**manifest, "step": 4, "run_id": "other"}))


def _corrupt_manifest_checksum(root):
    path = root / "step_00000003" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"]["trainer_rank0.pt"]["sha256"] = "0" * 64
    path.write_text(json.dumps(manifest))


def _corrupt_manifest_garbage(root):
    (root / "step_00000003" / "manifest.json").write_text('{"format": "wz-checkpoint/1", "fi')


def _corrupt_unlisted_file(root):
    (root / "step_00000003" / "model_optim" / "__1_0.distcp").write_bytes(b"stray")


CORRUPTIONS = {  # case -> (corrupt, skipped folder, reason fragment, step resumed from, moved aside)
    "truncated shard": (_corrupt_truncated_shard, "step_00000003",
                        "model_optim/__0_0.distcp: ", 2, True),
    "garbage trainer state": (_corrupt_garbage_trainer_state, "step_00000003",
                              "trainer_rank0.pt: sha256", 2, True),
    "missing .metadata": (_corrupt_missing_metadata, "step_00000003",
                          "model_optim/.metadata: missing", 2, True),
    "empty newest folder": (_corrupt_empty_newest_folder, "step_00000004", "no manifest.json", 3, True),
    "wrong run id": (_corrupt_wrong_run_id, "step_00000004", "belongs to run other, not to this run", 3, False),
    "manifest checksum mismatch": (_corrupt_manifest_checksum, "step_00000003",
                                   "trainer_rank0.pt: sha256", 2, True),
    "manifest unreadable": (_corrupt_manifest_garbage, "step_00000003", "manifest.json unreadable", 2, True),
    "unlisted file": (_corrupt_unlisted_file, "step_00000003",
                      "files not in manifest.json: model_optim/__1_0.distcp", 2, True),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_checkpoint_falls_back_to_the_newest_that_verifies(three_checkpoints, tmp_path, case, capsys,
                                                                   caplog):
    corrupt, bad, reason, fallback, moved = CORRUPTIONS[case]
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    corrupt(out / "checkpoints")

    # wz export takes the newest that verifies and says which it skipped, and why (touching nothing).
    assert wz(["export", str(out), str(tmp_path / "export")]) == 0
    printed = capsys.readouterr()
    assert f"skipped {out / 'checkpoints' / bad}: {reason}" in printed.err
    assert f"step {fallback} (checkpoint {out / 'checkpoints' / f'step_{fallback:08d}'})" in printed.out
    assert (out / "checkpoints" / bad).is_dir()

    # --resume does the same, moves this run's corrupt folder aside (another run's stays), continues.
    with caplog.at_level(logging.WARNING, logger="wz_engine"):
        resumed = Trainer(load_config(TINY, [f'train.output_dir="{out}"', "train.steps=4", "checkpoint.every=1",
                                             "checkpoint.keep=3"]), resume=True)
    assert resumed.step_idx == fallback
    assert f"resume: skipped {out / 'checkpoints' / bad}: {reason}" in caplog.text
    assert (out / "checkpoints" / bad).is_dir() != moved
    assert any(p.name.startswith(f"{bad}.corrupt-") for p in (out / "checkpoints").iterdir()) == moved
    resumed.fit()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4
    assert ckpt.newest_verified(out, resumed.run.run_id).step == 4


def test_no_checkpoint_verifies_is_a_clear_error(three_checkpoints, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(three_checkpoints, out)
    for step in (1, 2, 3):
        (out / "checkpoints" / f"step_{step:08d}" / "trainer_rank0.pt").write_bytes(b"garbage")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    argv = [str(TINY), "--set", f'train.output_dir="{out}"', "--set", "train.steps=4", "--resume"]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert f"no checkpoint under {out / 'checkpoints'} verifies:" in err
    for step in (3, 2, 1):
        assert f"step_{step:08d}: trainer_rank0.pt: 7 bytes, manifest.json says" in err
    assert wz(["export", str(out), str(tmp_path / "export")]) == 2
    assert f"no checkpoint under {out / 'checkpoints'} verifies:" in capsys.readouterr().err
    assert not (tmp_path / "export").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # left as they were
