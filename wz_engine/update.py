"""The training side of a step: packed log-probabilities and the policy-gradient update.

Rollouts are packed into micro-batches of at most `train.micro_batch_tokens` tokens
(`wz_engine.packing.pack_rl_batch`). Each micro-batch runs the backbone on one packed row and the
fused linear log-prob op on the lm_head weight, so the [N, V] logits never exist. The loss is
normalised by the global (all micro-batches, all ranks) token / sequence counts, so gradient
accumulation over micro-batches and FSDP2's summed gradients equal one big batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from wz_engine import distributed as wzdist
from wz_engine.algorithms.loss import PolicyLoss
from wz_engine.algorithms.losses.ppo_clip import PPO_CLIP
from wz_engine.modeling import IGNORE_INDEX, PolicyLossBatch
from wz_engine.packing import PackedRLBatch, pack_rl_batch


def model_inputs(batch: PackedRLBatch, lm_config) -> dict:
    """Keyword arguments of `FusedHeadCausalLM.forward` for one packed micro-batch: one packed row,
    targets on the response tokens (ignore_index elsewhere), and the varlen boundaries when the
    attention implementation takes them."""
    targets = torch.where(batch.loss_mask, batch.targets, torch.full_like(batch.targets, IGNORE_INDEX))
    if getattr(lm_config, "_attn_implementation", None) in ("wz_varlen", "flash_attention_2"):
        kwargs = batch.model_inputs()
    else:
        # sdpa / eager: transformers isolates the packed sequences from the position ids when there is
        # no attention mask and no cache (MACHINE_NOTES.md).
        kwargs = dict(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None], use_cache=False)
    return {**kwargs, "targets": targets}


@dataclass
class UpdateBatch:
    """One rank's share of the step, packed."""

    batches: list[PackedRLBatch]
    """Micro-batches; padded with empty ones so every rank runs the same number (FSDP collectives)."""
    advantages: list[torch.Tensor]
    """[N] per micro-batch: the sequence's advantage on its scored tokens."""
    masks: list[torch.Tensor]
    """[N] bool per micro-batch: tokens in the loss (response tokens of rows kept in the loss)."""
    global_tokens: float
    global_seqs: float
    num_real: int = 0
    """Micro-batches holding rollouts (the rest are the empty padding ones)."""


def pack_for_update(prompt_ids: list[list[int]], response_ids: list[list[int]], advantages: torch.Tensor,
                    in_loss: torch.Tensor, micro_batch_tokens: int, pad_id: int) -> UpdateBatch:
    """Rollouts (B) -> packed micro-batches with per-token advantages and loss masks."""
    batches = pack_rl_batch(prompt_ids, response_ids, micro_batch_tokens) if prompt_ids else []
    num_real = len(batches)
    adv_tok = [advantages[b.token_sequence_index] for b in batches]
    masks = [b.loss_mask & in_loss[b.token_sequence_index] for b in batches]
    n_max = int(wzdist.all_reduce(float(len(batches)), op="max").item())
    while len(batches) < n_max:  # empty micro-batch: forward/backward for the collectives, zero loss
        batches.append(pack_rl_batch([[pad_id]], [[]], micro_batch_tokens)[0])
        adv_tok.append(torch.zeros(1))
        masks.append(torch.zeros(1, dtype=torch.bool))
    local_tokens = float(sum(int(m.sum()) for m in masks))
    local_seqs = float(sum(int(torch.unique(b.token_sequence_index[m]).numel()) for b, m in zip(batches, masks)))
    totals = wzdist.all_reduce(torch.tensor([local_tokens, local_seqs], dtype=torch.float64))
    return UpdateBatch(batches, adv_tok, masks, max(float(totals[0]), 1.0), max(float(totals[1]), 1.0), num_real)


@torch.no_grad()
def warm_up_roots(models: list, pad_id: int, device) -> None:
    """One tiny forward through each FSDP root (None entries skipped), so that each initialises as the
    root before anything calls its submodules directly."""
    dummy = pack_rl_batch([[pad_id]], [[]], 8)[0].to(device)
    for m in models:
        if m is not None:
            m(**model_inputs(dummy, m.config))


@torch.no_grad()
def packed_logprobs(model: torch.nn.Module, ub: UpdateBatch, device, temperature: float,
                    return_entropy: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Log-probs [N] (and entropies) of every micro-batch, no grad (old / reference policy)."""
    lps, ents = [], []
    for b in ub.batches:
        out = model(**model_inputs(b.to(device), model.config), temperature=temperature,
                    return_entropy=return_entropy)
        if return_entropy:
            lps.append(out[0].float())
            ents.append(out[1].float())
        else:
            lps.append(out.float())
    return lps, (ents if return_entropy else None)


def apply_rollout_correction(ubs: list[UpdateBatch], old_lps: list[list[torch.Tensor]],
                             engine_logprobs: list[list[torch.Tensor]], cap: float) -> dict[str, float]:
    """Truncated importance sampling for the sampler/trainer mismatch (wz_engine.rollout.correction):
    multiplies each micro-batch's per-token advantages by min(pi_old / pi_engine, cap) in place.

    Per mini-batch: `ubs[m]`, its old log-probs per micro-batch `old_lps[m]`, and `engine_logprobs[m]`:
    per rollout (in the order packed into ubs[m]) the sampler's log-prob of each response token.
    Returns the step's global monitors (all ranks): mean |old - engine| log-prob, fraction of tokens
    capped, and the largest untruncated ratio (the outlier a mean hides)."""
    from wz_engine.rollout.correction import apply_tis, tis_weights

    diff_sum = capped = tokens = 0.0
    max_ratio = 0.0
    for ub, olds, engines in zip(ubs, old_lps, engine_logprobs, strict=True):
        for i in range(ub.num_real):
            engine = ub.batches[i].scatter_responses(engines, fill=0.0).to(olds[i].device)
            weights, m = tis_weights(olds[i], engine, ub.masks[i].to(olds[i].device), cap)
            ub.advantages[i] = apply_tis(ub.advantages[i].to(weights.device), weights.to(torch.float32))
            diff_sum += m.mean_abs_logp_diff * m.tokens
            capped += m.frac_capped * m.tokens
            tokens += m.tokens
            if m.tokens:
                max_ratio = max(max_ratio, m.max_ratio)
    sums = wzdist.all_reduce(torch.tensor([diff_sum, capped, tokens], dtype=torch.float64))
    max_ratio = float(wzdist.all_reduce(max_ratio, op="max"))
    n = max(float(sums[2]), 1.0)
    return {"tis/mean_abs_logp_diff": float(sums[0]) / n, "tis/frac_capped": float(sums[1]) / n,
            "tis/max_ratio": max_ratio}


def accumulate_gradients(model: torch.nn.Module, ub: UpdateBatch, old_lps: list[torch.Tensor] | None,
                         ref_lps: list[torch.Tensor] | None, device, temperature: float, options: dict,
                         loss_fn: PolicyLoss | None = None) -> dict[str, float]:
    """Forward + backward over every micro-batch; gradients accumulate in `.grad`.

    `loss_fn`: a registered policy loss (None: ppo_clip); `options`: its `options(cfg)` (for ppo_clip
    the keyword arguments of `fused_linear_policy_loss`: clip_low, clip_high, agg, ...).

    old_lps None is the on-policy fast path (the rollouts were sampled from the current weights and
    this is their only optimizer step): the fused loss takes each token's own detached log-prob as the
    old one (ratio 1, no clipping), so no separate old-logprob pass is needed. The token entropy that
    pass measured is then computed in this one and returned as metrics["entropy"].

    Returns this step's global metrics (loss summed over micro-batches and ranks; the clip fractions,
    ratio, KL and, on-policy, entropy as token-weighted means)."""
    on_policy = old_lps is None
    loss_fn = loss_fn or PPO_CLIP
    # Token-weighted metric sums accumulate on the device and cross to the host once per step:
    # reading them per micro-batch would stall the GPU between micro-batches.
    mean_keys = list(loss_fn.metrics)
    keys = ["loss", *mean_keys, *(["entropy"] if on_policy else [])]
    sums = torch.zeros(len(keys) + 1, dtype=torch.float64, device=device)  # [metrics..., tokens]
    options = {**options, "global_tokens": ub.global_tokens, "global_seqs": ub.global_seqs}
    for i, b in enumerate(ub.batches):
        b = b.to(device)
        mask = ub.masks[i].to(device)
        batch_loss = PolicyLossBatch(None if on_policy else old_lps[i].to(device), ub.advantages[i].to(device),
                                     mask, ref_lps[i].to(device) if ref_lps is not None else None,
                                     b.token_sequence_index, options, loss_fn)
        # fused_linear_policy_loss inside the root's forward: logprob + loss per chunk, no [N, V].
        out = model(**model_inputs(b, model.config), temperature=temperature, policy_loss=batch_loss,
                    return_entropy=on_policy)
        loss, metrics = out[:2]
        loss.backward()
        n = mask.sum().to(torch.float64)
        row = [loss.detach().to(torch.float64)] + [torch.as_tensor(metrics[k], dtype=torch.float64, device=device) * n
                                                   for k in mean_keys]
        if on_policy:
            row.append((out[2] * mask).sum().to(torch.float64))
        sums += torch.stack(row + [n])
    reduced = wzdist.all_reduce(sums).tolist()  # the step's one host sync
    total_tokens = max(reduced[-1], 1.0)
    result = {"loss": reduced[0]}
    for j, k in enumerate(keys[1:], start=1):
        result[k] = reduced[j] / total_tokens
    return result


def clip_and_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Global gradient norm (all ranks), clipping to `max_norm` when > 0. Non-finite norms come back
    as they are (the caller skips the step)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"),
                                          error_if_nonfinite=False)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str, min_ratio: float):
    """Multiplier of the base learning rate at optimizer step `s` (0-based)."""

    def f(s: int) -> float:
        if warmup_steps > 0 and s < warmup_steps:
            return (s + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(total_steps - warmup_steps, 1)
        progress = min(max(s - warmup_steps, 0) / span, 1.0)
        if schedule == "linear":
            return min_ratio + (1 - min_ratio) * (1 - progress)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f
