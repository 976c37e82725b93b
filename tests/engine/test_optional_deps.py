"""Settings that need an optional package fail at config time with the pip line from pyproject.toml."""

import importlib.abc
import importlib.machinery
import re
import sys
from pathlib import Path

import pytest
import tomllib

from wz_engine.cli import main
from wz_engine.config import ConfigError, load_config
from wz_engine.optional_deps import check_optional_deps, installed, pip_line

ROOT = Path(__file__).resolve().parents[2]
TINY = Path(__file__).with_name("tiny_run.toml")
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def hide(monkeypatch, module):
    """Make `module` look not installed (find_spec -> None, import -> ImportError)."""
    monkeypatch.setitem(sys.modules, module, None)


def check(*overrides):
    return check_optional_deps(load_config(TINY, list(overrides)))


def test_defaults_need_nothing_optional():
    check()  # no raise


@pytest.mark.parametrize("extra", ["wandb", "lora", "datasets", "vllm"])
def test_pip_line_is_the_extra_from_pyproject(extra):
    pytest.importorskip("packaging")
    line = pip_line(extra)
    for requirement in EXTRAS[extra]:
        name = requirement.split(">")[0].split("<")[0].split("=")[0].strip()
        assert f'"{name}' in line, (extra, line)
    assert f"[{extra}]" in line


def test_wandb_missing_is_a_config_error_with_the_pip_line(monkeypatch):
    hide(monkeypatch, "wandb")
    with pytest.raises(ConfigError, match=r'logging.wandb = true needs the wandb package: pip install "wandb>=') as e:
        check("logging.wandb=true")
    assert "[wandb] extra" in str(e.value) and "logging.wandb = false" in str(e.value)


def test_tensorboard_auto_is_optional_true_is_required(monkeypatch):
    hide(monkeypatch, "tensorboard")
    check()  # the default "auto" skips event files when tensorboard is missing
    check("logging.tensorboard=false")
    with pytest.raises(ConfigError, match="logging.tensorboard = true needs the tensorboard package: pip install"):
        check("logging.tensorboard=true")
    with pytest.raises(ConfigError, match="logging.tensorboard"):
        load_config(TINY, ['logging.tensorboard="yes"'])


def test_flash_attn_missing(monkeypatch):
    hide(monkeypatch, "flash_attn")
    with pytest.raises(ConfigError, match=r"model.attn_implementation = 'flash_attention_2' needs the flash_attn "
                                          r"package: pip install --no-build-isolation \"flash-attn"):
        check('model.attn_implementation="flash_attention_2"')


def test_hf_dataset_needs_datasets(monkeypatch):
    hide(monkeypatch, "datasets")
    with pytest.raises(ConfigError, match=r"data.path = 'hf:some/prompts' needs the datasets package: "
                                          r"pip install \"datasets"):
        check('data.path="hf:some/prompts"')


def test_vllm_missing_names_the_requirement(monkeypatch):
    if installed("vllm"):
        pytest.skip("vllm is installed")
    with pytest.raises(ConfigError, match=r'rollout.sampler = "vllm": .*vllm is not installed'):
        check('rollout.sampler="vllm"')


class _BrokenPeftFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """An installed peft whose import fails the way peft 0.17 does under transformers 5."""

    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == "peft" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise ImportError("cannot import name 'HybridCache' from 'transformers'")


def test_lora_judge_with_a_peft_that_cannot_import_names_both_versions(monkeypatch):
    import importlib.metadata

    monkeypatch.delitem(sys.modules, "peft", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenPeftFinder(), *sys.meta_path])
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda n: "0.17.1" if n == "peft" else real_version(n))
    import transformers

    with pytest.raises(ConfigError) as e:
        check('judge.kind="genrm"', 'judge.genrm.weight_sharing="lora"', 'judge.genrm.lora_path="/adapter"')
    msg = str(e.value)
    assert f"peft 0.17.1 does not import with transformers {transformers.__version__}" in msg
    assert "HybridCache" in msg and 'pip install -U "peft' in msg


def test_lora_judge_without_peft(monkeypatch):
    hide(monkeypatch, "peft")
    with pytest.raises(ConfigError, match=r'weight_sharing = "lora" needs peft: pip install "peft'):
        check('judge.kind="genrm"', 'judge.genrm.weight_sharing="lora"', 'judge.genrm.lora_path="/adapter"')


def test_several_missing_are_reported_together(monkeypatch):
    hide(monkeypatch, "wandb")
    hide(monkeypatch, "datasets")
    with pytest.raises(ConfigError, match=r"logging.wandb .*; data.path"):
        check("logging.wandb=true", 'data.path="hf:x"')


def test_wz_train_and_config_check_exit_2_before_building_anything(monkeypatch, tmp_path, capsys):
    hide(monkeypatch, "wandb")
    out = tmp_path / "run"
    args = [str(TINY), "--set", "logging.wandb=true", "--set", f'train.output_dir="{out}"']
    assert main(["train", *args]) == 2
    assert "wz train: config error: logging.wandb = true needs the wandb package" in capsys.readouterr().err
    assert not out.exists()  # nothing was built or written
    assert main(["config", "check", *args]) == 2
    assert "wz config check: config error: logging.wandb" in capsys.readouterr().err


def test_lora_injection_failure_names_both_versions(monkeypatch, tmp_path):
    peft = pytest.importorskip("peft")
    import transformers

    from wz_engine.demo.tiny import build_tiny_qwen2
    from wz_engine.judge.sharing import attach_lora_judge

    model = build_tiny_qwen2(64, hidden_size=16, intermediate_size=32, num_layers=1)
    peft.LoraConfig(r=2, target_modules=["q_proj"]).save_pretrained(str(tmp_path))

    def skewed(*args, **kwargs):  # what a peft/transformers version skew looks like at injection
        raise TypeError("got an unexpected keyword argument 'adapter_name'")

    monkeypatch.setattr(peft, "inject_adapter_in_model", skewed)
    with pytest.raises(RuntimeError, match=rf"failed with peft {re.escape(peft.__version__)} and transformers "
                                           rf"{re.escape(transformers.__version__)}: got an unexpected keyword"):
        attach_lora_judge(model, str(tmp_path))
