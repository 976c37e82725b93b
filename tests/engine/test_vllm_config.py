"""VLLMConfig validation and the config-time vLLM install check (package metadata faked)."""

import importlib.metadata
import importlib.util
import sys

import pytest

from wz_engine.rollout import vllm_config
from wz_engine.rollout.vllm_config import VLLM_REQUIREMENT, VLLMConfig, check_vllm_install


def test_importable_without_vllm_and_defaults_valid(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # any `import vllm` now raises ImportError
    spec = importlib.util.spec_from_file_location("vllm_config_fresh_copy", vllm_config.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look the module up
    spec.loader.exec_module(module)  # a fresh copy: no side effect on the imported module
    cfg = module.VLLMConfig()
    assert cfg.bucket_size_bytes == cfg.bucket_size_mb * 2**20


@pytest.mark.parametrize("kwargs,field", [
    (dict(gpu_memory_utilization=1.0), "gpu_memory_utilization"),
    (dict(sleep_level=3), "sleep_level"),
    (dict(judge_mode="server"), "judge_mode"),
    (dict(judge_mode="lora"), "judge_lora_path"),
    (dict(judge_mode="swap"), "judge_checkpoint"),
    (dict(judge_mode="swap", judge_checkpoint="/j", enable_sleep_mode=False), "enable_sleep_mode"),
    (dict(is_correction_cap=0.9), "is_correction_cap"),
    (dict(dtype="int8"), "dtype"),
    (dict(bucket_size_mb=0), "bucket_size_mb"),
])
def test_bad_fields_are_named(kwargs, field):
    with pytest.raises(ValueError, match=f"VLLMConfig.{field}"):
        VLLMConfig(**kwargs)


def _fake_metadata(monkeypatch, versions: dict, requires: list[str]):
    def version(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(vllm_config.importlib.metadata, "version", version)
    monkeypatch.setattr(vllm_config.importlib.metadata, "requires", lambda name: requires)


REQUIRES_031 = ["torch==2.13.0", "transformers<5.18.0,>=5.10.4", "numpy",
                'pytest; extra == "test"']


def test_missing_vllm_names_the_requirement(monkeypatch):
    _fake_metadata(monkeypatch, {}, [])
    with pytest.raises(RuntimeError, match=r"not installed \(required: vllm>=0.28,<0.33\)"):
        check_vllm_install()


def test_out_of_range_vllm_names_both_versions(monkeypatch):
    _fake_metadata(monkeypatch, {"vllm": "0.27.1"}, REQUIRES_031)
    with pytest.raises(RuntimeError, match=r"vllm 0.27.1 is installed but wz-engine requires vllm>=0.28,<0.33"):
        VLLMConfig().check_install()


def test_vllm_torch_or_transformers_pin_not_met(monkeypatch):
    _fake_metadata(monkeypatch, {"vllm": "0.31.0", "torch": "2.11.0+cu130", "transformers": "5.17.0"},
                   REQUIRES_031)
    with pytest.raises(RuntimeError, match=r"requires torch==2.13.0 but torch 2.11.0\+cu130 is installed"):
        check_vllm_install()
    _fake_metadata(monkeypatch, {"vllm": "0.31.0", "torch": "2.13.0+cpu", "transformers": "5.23.0"},
                   REQUIRES_031)
    with pytest.raises(RuntimeError, match=r"transformers 5.23.0 is installed"):
        check_vllm_install()


def test_compatible_install_passes(monkeypatch):
    _fake_metadata(monkeypatch, {"vllm": "0.31.0", "torch": "2.13.0+cu130", "transformers": "5.17.0"},
                   REQUIRES_031)
    assert check_vllm_install() == "0.31.0"
    assert VLLM_REQUIREMENT == ">=0.28,<0.33"


def test_requirement_matches_the_extra():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert f"vllm{VLLM_REQUIREMENT}" in pyproject["project"]["optional-dependencies"]["vllm"]
