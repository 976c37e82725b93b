"""wz_engine: the BRPO trainer (config, data, rollout, judge, rewards, update, sync, CLI)."""

__version__ = "0.1.0"
