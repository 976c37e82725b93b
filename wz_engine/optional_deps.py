"""Config-time checks that the optional packages a run's settings need are installed.

`check_optional_deps(cfg)` runs right after the config is loaded (`wz train`, `wz demo`), before any
model is built, so a missing package is one ConfigError naming the setting and the pip line that fixes
it, not a ModuleNotFoundError minutes into a run. Presence is checked with `find_spec` (no import), except
peft, whose import is the version check (an old peft fails to import with a new transformers).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

from wz_engine.config import ConfigError, RunConfig


def pip_line(extra: str) -> str:
    """`pip install "<requirements of the extra>"`, read from wz-engine's installed metadata (so it is
    exactly pyproject.toml's range), else `pip install "wz-engine[extra]"`."""
    try:
        from packaging.requirements import Requirement

        reqs = [Requirement(line) for line in importlib.metadata.requires("wz-engine") or []]
    except importlib.metadata.PackageNotFoundError:
        reqs = []
    wanted = [f"{r.name}{r.specifier}" for r in reqs
              if r.marker and r.marker.evaluate({"extra": extra}) and not r.marker.evaluate({"extra": ""})]
    if not wanted:
        return f'pip install "wz-engine[{extra}]"'
    return "pip install " + " ".join(f'"{w}"' for w in wanted) + f" (the [{extra}] extra)"


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
        need("wandb", "logging.wandb = true", pip_line("wandb") + "; or set logging.wandb = false")
    if cfg.logging.tensorboard is True:  # "auto" writes event files only when tensorboard is there
        need("tensorboard", "logging.tensorboard = true",
             'pip install tensorboard (or set logging.tensorboard = "auto" / false)')
    if cfg.model.attn_implementation.startswith("flash_attention"):
        need("flash_attn", f"model.attn_implementation = {cfg.model.attn_implementation!r}",
             pip_line("flash-attn").replace("pip install", "pip install --no-build-isolation", 1)
             + ' (it builds against your CUDA torch); or use "wz_varlen"')
    if cfg.data.path.startswith("hf:"):
        need("datasets", f"data.path = {cfg.data.path!r}", pip_line("datasets"))
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
