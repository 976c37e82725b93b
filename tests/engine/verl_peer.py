"""verl's own `core_algos.py` (and the `torch_functional` / `groupwise` helpers it calls), imported from an
installed verl (`pip install --no-deps verl==0.9.1`, as .ci/run does) or a source tree named by
WZ_VERL_SRC, WITHOUT verl's package `__init__` files (they pull in ray, omegaconf, tensordict, hydra...).

Only infrastructure is stubbed: the package modules themselves (empty, with the real search path),
`verl.utils.device` (device detection: CPU), the two config classes core_algos type-checks against, and
omegaconf / tensordict where they are not installed. Every function the tests compare against is verl's
own code, loaded from its file.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
import types
from pathlib import Path

import torch

# verl 0.9.1 is what the wrappers follow; another version is compared too, but may differ by design
VERL_VERSION = "0.9.1"


def verl_source() -> Path | None:
    """The directory holding verl's `verl/` package, or None."""
    if os.environ.get("WZ_VERL_SRC"):
        root = Path(os.environ["WZ_VERL_SRC"])
        return root if (root / "verl" / "trainer" / "ppo" / "core_algos.py").is_file() else None
    spec = importlib.util.find_spec("verl")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).parent


class ActorConfig(dict):
    """Stand-in for verl.workers.config.ActorConfig: attribute access and `.get`, as core_algos uses it."""

    __getattr__ = dict.get


class AlgoConfig(dict):
    """Stand-in for verl.trainer.config.AlgoConfig."""


def _module(name: str, path: Path | None = None, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    if path is not None:
        module.__path__ = [str(path)]
    module.__dict__.update(attrs)
    return module


def load_core_algos() -> types.ModuleType:
    """verl.trainer.ppo.core_algos, loaded from verl's own file (sys.modules is restored afterwards)."""
    root = verl_source()
    if root is None:
        raise ModuleNotFoundError(f"verl is not installed (pip install --no-deps verl=={VERL_VERSION}) and "
                                  "WZ_VERL_SRC is unset")
    pkg = root / "verl"
    stubs = {
        "verl": _module("verl", pkg),
        "verl.utils": _module("verl.utils", pkg / "utils"),
        "verl.trainer": _module("verl.trainer", pkg / "trainer"),
        "verl.trainer.ppo": _module("verl.trainer.ppo", pkg / "trainer" / "ppo"),
        "verl.workers": _module("verl.workers", pkg / "workers"),
        "verl.utils.device": _module("verl.utils.device", get_device_name=lambda: "cpu",
                                     get_torch_device=lambda: torch.cpu, is_npu_available=False,
                                     is_cuda_available=False),
        "verl.trainer.config": _module("verl.trainer.config", AlgoConfig=AlgoConfig),
        "verl.workers.config": _module("verl.workers.config", ActorConfig=ActorConfig),
    }
    for name, attrs in (("omegaconf", {"DictConfig": dict}), ("tensordict", {"TensorDict": dict})):
        if importlib.util.find_spec(name) is None:
            stubs[name] = _module(name, **attrs)
    saved = {name: sys.modules.get(name) for name in stubs}
    loaded = ("verl.utils.torch_functional", "verl.utils.groupwise", "verl.utils.import_utils",
              "verl.trainer.ppo.core_algos")
    saved.update({name: sys.modules.get(name) for name in loaded})
    try:
        sys.modules.update(stubs)
        groupwise = importlib.import_module("verl.utils.groupwise")
        stubs["verl.utils"].as_torch_index = groupwise.as_torch_index
        stubs["verl.utils"].group_mean_std = groupwise.group_mean_std
        importlib.import_module("verl.utils.torch_functional")
        importlib.import_module("verl.utils.import_utils")
        return importlib.import_module("verl.trainer.ppo.core_algos")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def installed_version() -> str | None:
    try:
        return importlib.metadata.version("verl")
    except importlib.metadata.PackageNotFoundError:
        return None
