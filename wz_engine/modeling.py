"""Run a transformers causal LM on a packed batch without ever calling its lm_head.

`FusedHeadCausalLM(model)` wraps a `*ForCausalLM`. Its forward runs the backbone
(`model.get_decoder()`) on one packed row of tokens to hidden states [N, H], then applies
`wz_kernels.fused_linear_logprobs` or `wz_kernels.fused_linear_policy_loss` with the model's own
output-embedding weight (`model.get_output_embeddings().weight`, the input embedding when the
embeddings are tied), so the [N, V] logits never exist.

FSDP2: the trainer shards the decoder layers with `fully_shard`, then this wrapper as the root. The
root-owned parameters (embeddings, final norm, lm_head) are then unsharded by the root's pre-forward
hook for the whole of `forward`, which is where the fused op reads the lm_head weight, and their
gradients are reduce-scattered after backward as usual. Everything that touches the weight therefore
happens inside `forward`: do not call the fused ops on `lm_head_weight()` from outside.

Packed batch layout (what the packing step produces): `input_ids` and `position_ids` are [1, N]
(several sequences back to back, position ids restarting at 0 for each); `targets` [N] holds the
next token of each position, `ignore_index` where there is none (`next_token_targets`). Extra keyword
arguments (e.g. a packed varlen attention's cu_seqlens) go to the backbone unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import wz_kernels

IGNORE_INDEX = -100


def next_token_targets(input_ids: torch.Tensor, position_ids: torch.Tensor,
                       ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """targets [N]: input_ids[i + 1] where token i + 1 continues token i's sequence, else ignore_index.

    input_ids, position_ids: [N] or [1, N] packed; a sequence starts where position_ids == 0.
    """
    ids, pos = input_ids.reshape(-1), position_ids.reshape(-1)
    if ids.shape != pos.shape:
        raise ValueError(f"next_token_targets: input_ids {tuple(ids.shape)} and position_ids "
                         f"{tuple(pos.shape)} differ")
    targets = torch.full_like(ids, ignore_index)
    continues = pos[1:] != 0
    targets[:-1] = torch.where(continues, ids[1:], torch.full_like(ids[1:], ignore_index))
    return targets


@dataclass
class PolicyLossBatch:
    """Per-token inputs of the policy loss for one packed micro-batch (all [N], aligned with targets)."""

    old_logprobs: torch.Tensor | None
    """[N] float: log-probabilities under the behaviour (sampling) policy; None when it is the current
    policy (on-policy: `fused_linear_policy_loss` then uses the tokens' own detached log-probabilities)."""
    advantages: torch.Tensor
    """[N] float: per-token advantages (sequence advantages broadcast to their tokens)."""
    mask: torch.Tensor
    """[N] bool/int/float: tokens that train (completion tokens with a target)."""
    ref_logprobs: torch.Tensor | None = None
    """[N] float: reference-policy log-probabilities, for the KL term."""
    seq_ids: torch.Tensor | None = None
    """[N] int: sequence id of each token (required by the seq-* aggregation modes)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Loss options: for the built-in losses the keyword arguments of `fused_linear_policy_loss` (clip_low,
    clip_high, dual_clip, delta, kl_coef, kl_estimator, agg, loss_scale, global_tokens, global_seqs, and a
    loss's own: loss_type, importance_sampling_level, top_entropy_quantile)."""
    loss: Any = None
    """A `wz_engine.algorithms.PolicyLoss`; None: PPO-clip (`fused_linear_policy_loss`)."""


class FusedHeadCausalLM(nn.Module):
    """A causal LM whose forward returns log-probabilities (+ entropy) or the policy loss, not logits."""

    def __init__(self, model: nn.Module, *, impl: str = "auto", chunk_size: int | None = None):
        super().__init__()
        if not hasattr(model, "get_decoder") or not hasattr(model, "get_output_embeddings"):
            raise ValueError("FusedHeadCausalLM: model must be a transformers *ForCausalLM "
                             f"(get_decoder / get_output_embeddings), got {type(model).__name__}")
        if model.get_output_embeddings() is None:
            raise ValueError(f"FusedHeadCausalLM: {type(model).__name__} has no output embedding (lm_head)")
        self.model = model  # state-dict keys stay those of the model under "model."
        self.impl = impl
        self.chunk_size = chunk_size

    @property
    def config(self):
        return self.model.config

    def lm_head_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight [V, H], bias [V] | None) of the output embedding (the input embedding when tied)."""
        head = self.model.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)

    def hidden_states(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      **backbone_kwargs) -> torch.Tensor:
        """input_ids, position_ids [1, N] -> final hidden states [N, H] (after the final norm)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError("FusedHeadCausalLM: input_ids must be one packed row [1, N], "
                             f"got {tuple(input_ids.shape)}")
        if position_ids.shape != input_ids.shape:
            raise ValueError(f"FusedHeadCausalLM: position_ids {tuple(position_ids.shape)} must match "
                             f"input_ids {tuple(input_ids.shape)}")
        backbone_kwargs.setdefault("use_cache", False)  # a cache would break packed-sequence isolation
        out = self.model.get_decoder()(input_ids=input_ids, position_ids=position_ids, **backbone_kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden[0]  # [N, H]

    def forward(
        self,
        input_ids: torch.Tensor,  # [1, N]
        position_ids: torch.Tensor,  # [1, N]
        targets: torch.Tensor,  # [N]
        *,
        temperature: float = 1.0,
        return_entropy: bool = False,
        policy_loss: PolicyLossBatch | None = None,
        ignore_index: int = IGNORE_INDEX,
        **backbone_kwargs,
    ):
        """Without `policy_loss`: logprobs [N] f32 (and entropy [N] f32 with `return_entropy`).

        With `policy_loss`: (loss 0-d f32, metrics dict) of its loss (`fused_linear_policy_loss` by
        default) on these tokens, plus entropy [N] f32 (no gradient, same pass) with `return_entropy`.
        """
        hidden = self.hidden_states(input_ids, position_ids, **backbone_kwargs)
        weight, bias = self.lm_head_weight()
        hidden = hidden.to(weight.dtype)  # a backbone under autocast may hand back another dtype
        common = dict(bias=bias, temperature=temperature, ignore_index=ignore_index, impl=self.impl,
                      chunk_size=self.chunk_size)
        if policy_loss is None:
            return wz_kernels.fused_linear_logprobs(hidden, weight, targets, return_entropy=return_entropy,
                                                    **common)
        loss = policy_loss.loss
        if loss is None:
            from wz_engine.algorithms.losses.ppo_clip import PPO_CLIP as loss
        return loss(hidden, weight, targets, policy_loss, return_entropy=return_entropy, **common)
