"""Checkpoints: a run interrupted and resumed reaches bit-identical weights; atomic layout; export."""

from pathlib import Path

import torch

from wz_engine import checkpoint as ckpt
from wz_engine.config import load_config
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
