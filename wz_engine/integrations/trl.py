"""TRL's GRPOTrainer with the loss computed by wz kernels: change one line.

    from wz_engine.integrations.trl import WZGRPOTrainer
    trainer = WZGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)  # was GRPOTrainer

Only the training loss changes. TRL runs the policy through its LM head in chunks to get per-token
log-probabilities [B, T], then evaluates the clipped objective in torch. `WZGRPOTrainer` runs the backbone
once, takes the last hidden states of the scored completion tokens [N, H] and the LM head weight [V, H]
(the same route TRL's fused LM head takes), and hands them to the fused kernels; the [N, V] logits never
exist. At token level with beta = 0 and no token mask that is one `fused_linear_policy_loss` pass
(gradients formed in the forward, no recompute), off-policy and on-policy alike (TRL's default on-policy
step, old = current detached, is the kernel's `old_logprobs=None`); otherwise `fused_linear_logprobs`
(chunked, differentiable) followed by `policy_loss` and TRL's KL on [N] vectors.

Precision: under `bf16=True` (TRL's default) TRL autocasts its LM head to bf16; ours computes the head in the
weight's dtype (fp32 master weights -> fp32 logits), so the two agree to bf16 rounding; with fp32 they agree
to fp32 rounding (tests/engine/test_integration_trl.py).

Everything else stays TRL's and is untouched: generation, rewards, advantages (`scale_rewards`,
`multi_objective_aggregation`: TRL's nan-aware statistics with its 1e-4 epsilon, which our
`group_advantages` does not reproduce bit for bit, so they are not replaced), the old and reference
log-probabilities (no-grad passes through TRL's own fused head), the optimizer, logging and checkpoints.

How TRL's options map (trl 1.16, `GRPOTrainer._compute_loss`): see `wz_engine.integrations.trl_loss`. Every
`loss_type` (grpo, bnpo, dr_grpo, dapo, luspo, cispo, sapo with its temperatures, vespo with its gamma
parameters), both `importance_sampling_level`s ("token", "sequence": GSPO), any `delta`,
`top_entropy_quantile`, `off_policy_mask_threshold`, `beta` with and without `use_bias_correction_kl`, the vLLM
importance-sampling correction (`use_vllm` with `vllm_importance_sampling_correction`, token or sequence modes;
not with vespo), on- and off-policy (`steps_per_generation` / `num_iterations` > 1: TRL's buffering and old
log-probs are untouched) give TRL's loss and gradients. Options whose semantics are not reproduced raise a
ValueError at construction (see `unsupported_options`); nothing is silently ignored.

Logged metrics: the ones TRL's `_compute_loss` logs, with TRL's definitions and reductions over processes
(`wz_engine.integrations.trl_metrics`): `entropy` (from the same vocabulary tiles as the log-probs), `kl`,
`clip_ratio/{low_mean, high_mean, region_mean, low_min, high_max}`, `cispo_clip_ratio`, `vespo/phi_seq_mean`.
"""

from __future__ import annotations

import inspect

import torch
from trl import GRPOConfig, GRPOTrainer

from wz_engine.integrations.trl_loss import (
    SUPPORTED_IMPORTANCE_SAMPLING_LEVELS,
    SUPPORTED_LOSS_TYPES,
    TRLLossNormalisation,
    TRLObjective,
    fused_grpo_loss,
    trl_loss_normalisation,
)
from wz_engine.integrations.trl_metrics import trl_metric_terms

__all__ = [
    "SUPPORTED_LOSS_TYPES",
    "TRLLossNormalisation",
    "TRLObjective",
    "WZGRPOTrainer",
    "fused_grpo_loss",
    "trl_loss_normalisation",
    "unsupported_options",
]

# Inputs TRL adds for vision-language models: the hidden-state route below only feeds token ids.
_MULTIMODAL_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                      "token_type_ids", "mm_token_type_ids", "image_position_ids", "num_tiles")
# Config attributes that rescale or soft-cap the logits (TRL's fused head honours them; ours does not).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


def unsupported_options(args: GRPOConfig) -> list[str]:
    """The GRPOConfig settings WZGRPOTrainer cannot reproduce exactly, each as 'option=value: why'."""
    problems = []

    def opt(name, default=None):
        return getattr(args, name, default)

    if opt("loss_type") not in SUPPORTED_LOSS_TYPES:
        problems.append(f"loss_type={opt('loss_type')!r}: supported loss types are {SUPPORTED_LOSS_TYPES}")
    if opt("importance_sampling_level", "token") not in SUPPORTED_IMPORTANCE_SAMPLING_LEVELS:
        problems.append(f"importance_sampling_level={opt('importance_sampling_level')!r}: supported levels "
                        f"are {SUPPORTED_IMPORTANCE_SAMPLING_LEVELS}")
    if opt("entropy_coef", 0.0) != 0.0 or opt("use_adaptive_entropy", False):
        problems.append("entropy_coef / use_adaptive_entropy: the entropy bonus is not supported")
    if opt("use_vllm", False) and opt("vllm_importance_sampling_correction", False) and opt("loss_type") == "vespo":
        problems.append("loss_type='vespo' with vllm_importance_sampling_correction=True: TRL folds the sampler's "
                        "ratio into vespo's gamma weight, which is not reproduced; set it to False")
    if opt("cast_lm_head_to_fp32", False):
        problems.append("cast_lm_head_to_fp32=True: not supported")
    return problems


def _raise_if_unsupported(problems: list[str]) -> None:
    if problems:
        raise ValueError("WZGRPOTrainer does not support these GRPOConfig settings (use trl.GRPOTrainer for "
                         "them):\n  - " + "\n  - ".join(problems))


class WZGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose training loss runs through `wz_kernels.fused_linear_policy_loss`.

    Same constructor and behaviour as `GRPOTrainer` (trl 1.16); unsupported settings raise a ValueError
    naming them before the model is loaded. See the module docstring for the option mapping.
    """

    def __init__(self, *args, **kwargs):
        bound = inspect.signature(GRPOTrainer.__init__).bind(None, *args, **kwargs)
        config = bound.arguments.get("args")
        if config is not None:  # fail fast, before TRL loads the model (None: TRL's defaults, all supported)
            _raise_if_unsupported(unsupported_options(config))
        super().__init__(*args, **kwargs)
        _raise_if_unsupported(unsupported_options(self.args) + self._unsupported_model_features())

    def _unsupported_model_features(self) -> list[str]:
        from transformers import ProcessorMixin

        problems = []
        if isinstance(self.processing_class, ProcessorMixin):
            problems.append("a multimodal processing_class: only text models are supported")
        if getattr(self, "aux_loss_enabled", False):
            problems.append("router_aux_loss_coef (MoE load-balancing loss): not supported")
        text_config = self.model.config.get_text_config()
        for name in _LOGIT_TRANSFORMS:
            value = getattr(text_config, name, None)
            if value is not None and value != 1.0:
                problems.append(f"model config {name}={value}: logit soft-capping / scaling is not supported")
        return problems

    def _lm_head(self, model) -> tuple[torch.Tensor, torch.Tensor | None]:
        """LM head weight [V, H] and bias [V] or None, unwrapped from DDP / PEFT, gathered from FSDP2."""
        unwrapped = self.accelerator.unwrap_model(model)
        if hasattr(unwrapped, "get_base_model"):  # PEFT
            unwrapped = unwrapped.get_base_model()
        head = unwrapped.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor: the fused op needs the whole vocabulary
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        return weight, bias

    def _completion_hidden_states(self, model, input_ids, attention_mask, logits_to_keep: int) -> torch.Tensor:
        """Final (normed) hidden states that predict the completion tokens [B, T, H].

        Goes through `model(...)` (not the bare backbone) so DDP / FSDP / PEFT wrappers see the forward;
        `logits_to_keep=1` keeps transformers' own LM head to one position per row.
        """
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                        use_cache=False, logits_to_keep=1)
        return out.hidden_states[-1][:, -logits_to_keep - 1:-1]

    def _compute_loss(self, model, inputs):
        present = [k for k in _MULTIMODAL_INPUTS if inputs.get(k) is not None]
        if present:
            raise ValueError(f"WZGRPOTrainer supports text-only batches; got multimodal inputs {present}")
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        num_seqs, length = completion_ids.shape
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)

        weight, bias = self._lm_head(model)
        # Under mixed precision the backbone's output dtype may differ from the head's (bf16 autocast over fp32
        # weights); the kernels take one dtype, the head's, as the model's own lm_head Linear would.
        hidden = self._completion_hidden_states(model, input_ids, attention_mask, length).to(weight.dtype)
        valid = mask.bool()  # [B, T]: the tokens that train
        rows = torch.arange(num_seqs, device=valid.device).unsqueeze(1).expand_as(valid)
        advantages = inputs["advantages"]
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)
        old = inputs.get("old_per_token_logps")
        ref = inputs["ref_per_token_logps"][valid].float() if self.beta != 0.0 else None

        mode = "train" if self.model.training else "eval"
        norm = trl_loss_normalisation(
            self.loss_type, num_sequences=num_seqs, max_completion_length=self.max_completion_length,
            num_items_in_batch=inputs.get("num_items_in_batch"), num_processes=self.accelerator.num_processes,
            grad_accum_steps=self.current_gradient_accumulation_steps if mode == "train" else 1,
            steps_per_generation=self.args.steps_per_generation, training=mode == "train")
        objective = TRLObjective.from_trl(self.loss_type, self.args, self.beta)
        old_tokens = None if old is None else old[valid].float()
        token_advantages = advantages.expand_as(valid)[valid].float()
        loss, metrics, (logprobs, entropy) = fused_grpo_loss(
            hidden[valid], weight, completion_ids[valid], old_tokens, token_advantages, rows[valid], norm=norm,
            objective=objective, bias=bias, ref_logprobs=ref, temperature=self.temperature,
            policy_mask_fn=self._policy_mask_fn(inputs, mask, advantages, old))
        row_advantages = inputs["advantages"].float() if inputs["advantages"].dim() == 1 else None
        means, extremes = trl_metric_terms(objective, logprobs, old_tokens, token_advantages, entropy,
                                           rows[valid], num_seqs, row_advantages)
        if self.beta != 0.0:
            tokens = metrics["tokens"].float()
            means["kl"] = (metrics["kl_mean"].float() * tokens, tokens)
        self._log_loss_metrics(means, extremes, mode)
        return loss / norm.divisor

    def _policy_mask_fn(self, inputs, mask, advantages, old):
        """TRL's factors on the policy term (off-policy sequence mask, top-entropy mask, the vLLM importance-
        sampling ratio) from the scored tokens' log-probs / entropies, through TRL's own functions on [B, T] (so
        the entropy quantile is TRL's, gathered over processes); None when none is configured."""
        use_entropy, threshold = self.top_entropy_quantile < 1.0, self.off_policy_mask_threshold
        # [B, T] (token modes) or [B, 1] (sequence modes), detached; TRL multiplies the policy term by it
        is_ratio = inputs["importance_sampling_ratio"] if (
            self.use_vllm and self.vllm_importance_sampling_correction and self.loss_type != "vespo") else None
        if not use_entropy and threshold is None and is_ratio is None:
            return None
        valid = mask.bool()

        def to_rows(values):  # [N] over valid tokens -> [B, T], 0 elsewhere
            out = values.new_zeros(valid.shape)
            out[valid] = values
            return out

        def policy_mask(logprobs, entropy):
            keep = torch.ones(valid.shape, device=valid.device)
            if is_ratio is not None:
                keep = keep * is_ratio.float()
            if threshold is not None:
                current = to_rows(logprobs)
                sampling = inputs.get("sampling_per_token_logps", current if old is None else old)
                keep = keep * self.get_off_policy_mask(advantages, current, sampling, mask, threshold)
            if use_entropy:
                quantile = 1 - self.top_entropy_quantile
                keep = keep * self.get_high_entropy_mask(to_rows(entropy), mask, quantile)
            return keep[valid]

        return policy_mask

    def _log_loss_metrics(self, means: dict, extremes: dict, mode: str) -> None:
        """TRL's metrics (`trl_metric_terms`), reduced over processes as TRL reduces them: each mean as a global
        sum / count, each min / max over the gathered per-row values (NaN rows skipped)."""
        from trl.trainer.utils import nanmax, nanmin

        for name, (total, count) in means.items():
            totals = self.accelerator.reduce(torch.stack([total.float(), count.float()]), reduction="sum")
            self._metrics[mode][name].append((totals[0] / totals[1].clamp(min=1.0)).item())
        for name, (per_row, reduce) in extremes.items():
            gathered = self.accelerator.gather(per_row)
            self._metrics[mode][name].append((nanmin if reduce == "min" else nanmax)(gathered).item())
