"""TRL 1.16's `_compute_loss` metrics from the scored tokens (WZGRPOTrainer logs them under TRL's names).

TRL's definitions, with B rows and the completion mask m (tool mask folded in):
    entropy                    token mean of the entropy
    kl                         (trl.py, from the loss) token mean of the KL term, importance-weighted if so
    clip_ratio/low_mean        mean of (coef < 1 - epsilon_low) & (A < 0)    coef = exp(log_w) unclamped,
    clip_ratio/high_mean       mean of (coef > 1 + epsilon_high) & (A > 0)   capped at delta when set
    clip_ratio/region_mean     mean of low | high
    clip_ratio/low_min         min over rows of the row's low fraction   (gathered over processes)
    clip_ratio/high_max        max over rows of the row's high fraction
    cispo_clip_ratio           mean of (coef > epsilon_high) & (A > 0)      (cispo instead of clip_ratio/*)
    vespo/phi_seq_mean         mean of vespo's gamma weight phi              (vespo)
"Mean" is over tokens, or over all B rows when the quantity is one per row (TRL's [B, 1] shapes: sequence
level with advantages [B], and vespo's phi with advantages [B]); then a row without tokens counts with its
empty-row value (ratio 1: not clipped, phi = 1). A row fraction at token level is NaN for a row without
tokens (TRL's 0 / 0), which the min / max skip. sapo logs only entropy and kl, as TRL.
"""

from __future__ import annotations

import torch

from wz_kernels.policy_loss import gamma_weights, log_importance_weights, vespo_log_weights


def _rows(values: torch.Tensor, rows: torch.Tensor, num_rows: int) -> torch.Tensor:  # [N] -> [B] sums
    return values.new_zeros(num_rows).index_add_(0, rows, values)


def trl_metric_terms(objective, logprobs: torch.Tensor, old_logprobs: torch.Tensor | None,
                     advantages: torch.Tensor, entropy: torch.Tensor, rows: torch.Tensor, num_rows: int,
                     row_advantages: torch.Tensor | None) -> tuple[dict, dict]:
    """(means, extremes) of this process: means {name: (sum, count) 0-d tensors} to add up over processes,
    extremes {name: ([B] per-row values, "min" | "max")} to gather. All inputs are over the N scored tokens:
    logprobs, old_logprobs (None: on-policy), advantages, entropy [N]; rows [N] (each token's row in [0, B));
    row_advantages [B] when TRL's advantages are one per row, else None. `objective`: a TRLObjective."""
    f32 = torch.float32
    logprobs, advantages = logprobs.detach().to(f32), advantages.to(f32)
    old = logprobs if old_logprobs is None else old_logprobs.to(f32)
    n_tokens = torch.tensor(float(logprobs.numel()), device=logprobs.device)
    n_rows = torch.tensor(float(num_rows), device=logprobs.device)
    ones = torch.ones_like(logprobs)
    counts = _rows(ones, rows, num_rows)
    means = {"entropy": (entropy.to(f32).sum(), n_tokens)}

    def per_row(token_values):  # a per-row quantity, broadcast to its tokens -> [B] (0 for empty rows)
        return token_values.new_zeros(num_rows).index_copy_(0, rows, token_values)

    def add(name, values, one_per_row, reduce=None):
        """values: [B] when one_per_row (TRL's [B, 1] shape), else [N] per token."""
        values = values.to(f32)
        if one_per_row:
            means[name] = (values.sum(), n_rows)
            row_values = values
        else:
            means[name] = (values.sum(), n_tokens)
            row_values = _rows(values, rows, num_rows) / counts  # NaN for empty rows, as TRL
        return (row_values, reduce) if reduce else None

    extremes = {}
    if objective.loss_type == "vespo":
        log_w = vespo_log_weights(logprobs, old, ones, rows)
        if row_advantages is not None:
            phi = gamma_weights(per_row(log_w), row_advantages.to(f32), objective.vespo_gamma)
        else:
            phi = gamma_weights(log_w, advantages, objective.vespo_gamma)
        add("vespo/phi_seq_mean", phi, row_advantages is not None)
        return means, extremes
    if objective.loss_type == "sapo":
        return means, extremes
    log_w = log_importance_weights(logprobs, old, ones, rows, objective.importance_sampling_level)
    adv = advantages
    one_per_row = objective.importance_sampling_level == "sequence" and row_advantages is not None
    if one_per_row:
        log_w, adv = per_row(log_w), row_advantages.to(f32)  # TRL's [B, 1] coef and advantages
    coef = torch.exp(log_w)
    if objective.loss_type == "cispo":
        add("cispo_clip_ratio", (coef > objective.epsilon_high) & (adv > 0), one_per_row)
        return means, extremes
    if objective.delta is not None:
        coef = coef.clamp(max=objective.delta)
    low = (coef < 1 - objective.epsilon_low) & (adv < 0)
    high = (coef > 1 + objective.epsilon_high) & (adv > 0)
    extremes["clip_ratio/low_min"] = add("clip_ratio/low_mean", low, one_per_row, "min")
    extremes["clip_ratio/high_max"] = add("clip_ratio/high_mean", high, one_per_row, "max")
    add("clip_ratio/region_mean", low | high, one_per_row)
    return means, extremes
