"""Settings of the soft policy losses (`algorithm.sapo`, `algorithm.vespo`), TRL 1.16's defaults.

Importable without torch (wz_engine.config imports it); the losses check them (wz_engine/algorithms/losses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class SAPOConfig:
    temperature_pos: float = 1.0
    """Gate temperature tau of tokens with A > 0 (TRL's sapo_temperature_pos): L = -sigmoid(tau (ratio - 1))
    * 4 / tau * A; a larger tau makes the gate steeper (closer to a hard clip). > 0."""
    temperature_neg: float = 1.05
    """Gate temperature of tokens with A <= 0 (TRL's sapo_temperature_neg). > 0."""

    def as_kernel(self) -> tuple[float, float]:
        return (self.temperature_pos, self.temperature_neg)


@dataclass
class VESPOConfig:
    k_pos: float = 2.0
    """Power k of the gamma weight phi(w) = exp(lambda + k log w - lambda w) for A >= 0 (TRL's vespo_k_pos):
    how hard sequences with a low ratio w (< 1) are down-weighted."""
    lambda_pos: float = 3.0
    """Decay lambda for A >= 0 (TRL's vespo_lambda_pos): how hard sequences with w > 1 are down-weighted. > 0."""
    k_neg: float = 3.0
    """Power k for A < 0 (TRL's vespo_k_neg)."""
    lambda_neg: float = 2.0
    """Decay lambda for A < 0 (TRL's vespo_lambda_neg). > 0."""

    def as_kernel(self) -> tuple[float, float, float, float]:
        return (self.k_pos, self.lambda_pos, self.k_neg, self.lambda_neg)


def check_soft_loss_config(key: str, values: dict[str, float], positive: tuple[str, ...]) -> None:
    """Raise ConfigError naming `key.field` for a non-finite value or a non-positive one in `positive`."""
    from wz_engine.config_loader import ConfigError

    for name, value in values.items():
        if not math.isfinite(value) or (name in positive and value <= 0):
            need = "a finite number > 0" if name in positive else "a finite number"
            raise ConfigError(f"{key}.{name}: must be {need}, got {value}")
