"""Config-time checks that the optional packages a run's settings need are installed.

`check_optional_deps(cfg)` runs right after the config is loaded (`wz train`, `wz demo`), before any
model is built, so a missing package is one ConfigError naming the setting and the pip line that fixes
it, not a ModuleNotFoundError minutes into a run. Presence is checked with `find_spec` (no import), except
peft, whose import is the version check (an old peft fails to import with a new transformers).
"""

from __future__ import annotations

import importlib.util

from wz_engine.config import ConfigError, RunConfig


def installed(module: str) -> bool:
    """Whether `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_packages(cfg: RunConfig) -> list[str]:
    """One message per setting whose package is missing: the setting, the package, the pip line."""
    out = []

    def need(module: str, setting: str, pip: str) -> None:
        if not installed(module):
            out.append(f"{setting} needs the {module} package: {pip}")

    if cfg.logging.wandb:
        need("wandb", "logging.wandb = true", 'pip install "wz-engine[wandb]" (or set logging.wandb = false)')
    if cfg.logging.tensorboard is True:  # "auto" writes event files only when tensorboard is there
        need("tensorboard", "logging.tensorboard = true",
             'pip install tensorboard (or set logging.tensorboard = "auto" / false)')
    if cfg.model.attn_implementation.startswith("flash_attention"):
        need("flash_attn", f"model.attn_implementation = {cfg.model.attn_implementation!r}",
             'pip install --no-build-isolation "wz-engine[flash-attn]" (builds against your CUDA torch), '
             'or use "wz_varlen"')
    if cfg.data.path.startswith("hf:"):
        need("datasets", f"data.path = {cfg.data.path!r}", 'pip install "wz-engine[datasets]"')
    if cfg.rollout.sampler == "vllm":
        from wz_engine.rollout.vllm_config import check_vllm_install

        try:
            check_vllm_install()
        except RuntimeError as e:
            out.append(f'rollout.sampler = "vllm": {e}')
    elif cfg.judge.kind == "genrm" and cfg.judge.genrm.weight_sharing == "lora":
        from wz_engine.judge.sharing import import_peft

        try:
            import_peft()
        except ImportError as e:
            out.append(str(e))
    return out


def check_optional_deps(cfg: RunConfig) -> RunConfig:
    """Raise a ConfigError listing every missing optional package (with its pip line); return cfg."""
    problems = missing_packages(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg
