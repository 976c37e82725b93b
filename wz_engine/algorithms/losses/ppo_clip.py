"""PPO's clipped surrogate with dual clip and a KL penalty, fused with the lm_head
(`wz_kernels.fused_linear_policy_loss`: the [N, V] logits never exist; formulas in wz_kernels.policy_loss)."""

from __future__ import annotations

from dataclasses import dataclass

from wz_engine.algorithms.loss import PolicyLoss, common_options, register_policy_loss


@dataclass(frozen=True)
class FusedClipLoss(PolicyLoss):
    """`batch.options` are `fused_linear_policy_loss` keyword arguments (so no `custom`)."""

    def options(self, a, max_new_tokens: int) -> dict:
        return common_options(a, max_new_tokens)

    def __call__(self, hidden, weight, targets, batch, *, return_entropy: bool = False, **head):
        import wz_kernels

        return wz_kernels.fused_linear_policy_loss(
            hidden, weight, targets, batch.old_logprobs, batch.advantages, batch.mask,
            ref_logprobs=batch.ref_logprobs, seq_ids=batch.seq_ids, return_entropy=return_entropy,
            **head, **batch.options)


PPO_CLIP = register_policy_loss("ppo_clip")(FusedClipLoss(
    "ppo_clip", metrics=("clip_frac_low", "clip_frac_high", "clip_frac_dual", "ratio_mean", "kl_mean")))
