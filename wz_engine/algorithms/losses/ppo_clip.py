"""PPO's clipped surrogate with dual clip, two-sided clip (delta) and a KL penalty, fused with the lm_head
(`wz_kernels.fused_linear_policy_loss`: the [N, V] logits never exist; formulas in wz_kernels.policy_loss).
`FusedClipLoss` is also the base of the other fused built-ins (gspo, gspo_token, luspo, cispo, sapo, vespo)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from wz_engine.algorithms.loss import PolicyLoss, common_options, register_policy_loss

CLIP_METRICS = ("clip_frac_low", "clip_frac_high", "clip_frac_dual", "ratio_mean", "kl_mean")


@dataclass(frozen=True)
class FusedClipLoss(PolicyLoss):
    """`batch.options` are `fused_linear_policy_loss` keyword arguments (so no `custom`)."""

    kernel_options: tuple[tuple[str, Any], ...] = ()
    """This loss's fixed kernel options (e.g. importance_sampling_level="sequence"), over the config's."""
    takes_fused_options: ClassVar[bool] = True

    def options(self, a, max_new_tokens: int) -> dict:
        fused = {"top_entropy_quantile": a.top_entropy_quantile} if a.top_entropy_quantile < 1.0 else {}
        if a.off_policy_mask_threshold is not None:
            fused["off_policy_mask_threshold"] = a.off_policy_mask_threshold
        if a.kl_importance_weighted:
            fused["kl_importance_weighted"] = True
        return {**common_options(a, max_new_tokens), **fused, **dict(self.kernel_options)}

    def __call__(self, hidden, weight, targets, batch, *, return_entropy: bool = False, **head):
        import wz_kernels

        return wz_kernels.fused_linear_policy_loss(
            hidden, weight, targets, batch.old_logprobs, batch.advantages, batch.mask,
            ref_logprobs=batch.ref_logprobs, seq_ids=batch.seq_ids, return_entropy=return_entropy,
            **head, **batch.options)


PPO_CLIP = register_policy_loss("ppo_clip")(FusedClipLoss("ppo_clip", metrics=CLIP_METRICS))
