"""Policy losses: what the update minimises over one packed micro-batch.

A loss is called inside `FusedHeadCausalLM.forward` (where FSDP2 has the lm_head weight unsharded)
with the final hidden states, the lm_head weight and the micro-batch's `PolicyLossBatch`:

    loss(hidden [N, H], weight [V, H], targets [N], batch, *, return_entropy, bias, temperature,
         ignore_index, impl, chunk_size) -> (loss 0-d, metrics {name: 0-d}[, entropy [N]])

Two ways to write one:
  * `@register_policy_loss("name", metrics=(...))` over `fn(logprobs [N], batch) -> (loss, metrics)`:
    a `TokenLoss`. The log-probs (with gradient) come from `wz_kernels.fused_linear_logprobs`, so
    the [N, V] logits never exist either; `batch.old_logprobs` is None on the on-policy fast path
    (use `logprobs.detach()`), `batch.options` holds `options(cfg)` plus the global token / sequence
    counts of the optimizer step (normalise by them so that accumulation is exact).
  * a `PolicyLoss` subclass overriding `__call__` to run a fused kernel on hidden + weight itself
    (what `ppo_clip` does with `wz_kernels.fused_linear_policy_loss`).

`metrics` names the per-token means (over the micro-batch's masked tokens) the loss reports; the
trainer averages them over micro-batches weighted by tokens and logs them under those names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from wz_engine.algorithms.registry import Registry

if TYPE_CHECKING:
    from wz_engine.config import AlgorithmConfig, RunConfig


def common_options(a: AlgorithmConfig, max_new_tokens: int) -> dict[str, Any]:
    """The clip / KL / aggregation settings every loss gets (`wz_kernels.policy_loss` keyword arguments)."""
    loss_scale = (a.loss_scale or float(max_new_tokens)) if a.agg == "seq-mean-token-sum-norm" else None
    return {"clip_low": a.clip_low, "clip_high": a.clip_high, "dual_clip": a.dual_clip, "delta": a.delta,
            "kl_coef": a.kl_coef, "kl_estimator": a.kl_estimator, "agg": a.agg, "loss_scale": loss_scale}


@dataclass(frozen=True)
class PolicyLoss:
    """A registered policy loss; subclasses override `__call__` (see the module docstring)."""

    name: str
    metrics: tuple[str, ...] = ()
    """Per-token-mean metrics the loss returns (logged under these names)."""
    validate: Callable[[RunConfig], None] | None = None
    """Extra config checks (raise ConfigError naming the key)."""
    takes_fused_options: ClassVar[bool] = False
    """Whether the loss honours algorithm.top_entropy_quantile, off_policy_mask_threshold and
    kl_importance_weighted (the fused built-ins do; the config refuses them for others)."""

    def options(self, a: AlgorithmConfig, max_new_tokens: int) -> dict[str, Any]:
        """`batch.options` of every micro-batch (the global counts are added by the update)."""
        return {**common_options(a, max_new_tokens), "custom": dict(a.custom)}

    def __call__(self, hidden, weight, targets, batch, *, return_entropy: bool = False, **head):
        raise NotImplementedError


@dataclass(frozen=True)
class TokenLoss(PolicyLoss):
    """A loss of the tokens' log-probabilities: `fn(logprobs [N], batch) -> (loss 0-d, metrics)`."""

    fn: Callable[[torch.Tensor, Any], tuple[torch.Tensor, dict]] | None = None

    def __call__(self, hidden, weight, targets, batch, *, return_entropy: bool = False, **head):
        import wz_kernels

        out = wz_kernels.fused_linear_logprobs(hidden, weight, targets, return_entropy=return_entropy, **head)
        logprobs, entropy = out if return_entropy else (out, None)
        loss, metrics = self.fn(logprobs, batch)
        missing = [k for k in self.metrics if k not in metrics]
        if missing:
            raise ValueError(f"policy loss {self.name!r} did not return its declared metrics {missing}")
        return (loss, metrics, entropy.detach()) if return_entropy else (loss, metrics)


POLICY_LOSSES: Registry[PolicyLoss] = Registry(
    "policy loss", "wz_engine.algorithms.losses", PolicyLoss,
    hint=" (decorate the function with wz_engine.algorithms.register_policy_loss)")


def register_policy_loss(name: str, *, metrics: tuple[str, ...] = (), validate=None):
    """Decorator: `@register_policy_loss("my_loss", metrics=("my_metric",))` over
    `fn(logprobs [N], batch) -> (loss, metrics)`; or call it on a `PolicyLoss` instance."""

    def wrap(fn) -> PolicyLoss:
        entry = fn if isinstance(fn, PolicyLoss) else TokenLoss(name, tuple(metrics), validate, fn)
        return POLICY_LOSSES.register(name, entry)

    return wrap
