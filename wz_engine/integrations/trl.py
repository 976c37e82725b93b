"""TRL's GRPOTrainer with the loss computed by wz kernels: change one line.

    from wz_engine.integrations.trl import WZGRPOTrainer
    trainer = WZGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)  # was GRPOTrainer

Only the training loss changes. TRL runs the policy through its LM head in chunks to get per-token
log-probabilities [B, T], then evaluates the clipped objective in torch. `WZGRPOTrainer` runs the backbone
once, takes the last hidden states of the scored completion tokens [N, H] and the LM head weight [V, H]
(the same route TRL's fused LM head takes), and hands them to the fused kernels; the [N, V] logits never
exist. With beta = 0 that is one `fused_linear_policy_loss` pass (gradients formed in the forward, no
recompute), off-policy and on-policy alike (TRL's default on-policy step, old = current detached, is the
kernel's `old_logprobs=None`); with beta > 0 it is `fused_linear_logprobs` (chunked, differentiable)
followed by `policy_loss` and TRL's KL on [N] vectors.

Precision: under `bf16=True` (TRL's default) TRL autocasts its LM head to bf16; ours computes the head in the
weight's dtype (fp32 master weights -> fp32 logits), so the two agree to bf16 rounding; with fp32 they agree
to fp32 rounding (tests/engine/test_integration_trl.py).

Everything else stays TRL's and is untouched: generation, rewards, advantages (`scale_rewards`,
`multi_objective_aggregation`: TRL's nan-aware statistics with its 1e-4 epsilon, which our
`group_advantages` does not reproduce bit for bit, so they are not replaced), the old and reference
log-probabilities (no-grad passes through TRL's own fused head), the optimizer, logging and checkpoints.

How TRL's options map (trl 1.16, `GRPOTrainer._compute_loss`):

    loss_type  TRL normalisation                                   wz aggregation
    grpo       mean_b(sum_t L*m / max(sum_t m, 1)) / GA            seq-mean-token-mean, global_seqs=B, / GA
    bnpo       sum(L*m) / max(sum(m), 1) / GA                      token-mean (local tokens), / GA
    dr_grpo    sum(L*m) / (B * max_completion_length) / GA         seq-mean-token-sum-norm, global_seqs=B,
                                                                   loss_scale=max_completion_length, / GA
    dapo       sum(L*m) / (num_items_in_batch / processes          token-mean, global_tokens = that normaliser
                           * GA / steps_per_generation)

GA = `current_gradient_accumulation_steps` in training, 1 in evaluation (as TRL). `epsilon` / `epsilon_high`
-> clip_low / clip_high; `beta` -> TRL's k3 KL against TRL's reference log-probs (unclamped, as TRL); with
`use_bias_correction_kl` (TRL's default) the KL term is multiplied by the (differentiable) importance ratio,
as TRL does; `temperature` divides the logits; `delta` (two-sided clipping, INTELLECT-2) equals a dual clip at
`delta` when `delta > 1 + epsilon_high`. Options whose semantics are not reproduced raise a ValueError at
construction (see `unsupported_options`); nothing is silently ignored.

Logged metrics: `kl`, `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean` (same
definitions as TRL). Not logged: `entropy` (the fused loss never forms the distribution's entropy),
`clip_ratio/low_min` and `clip_ratio/high_max` (per-sequence statistics).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from trl import GRPOConfig, GRPOTrainer

# Imported from the defining modules: `wz_kernels.policy_loss` is both a module and a lazily exported
# function, and once the module is imported the package attribute is the module.
from wz_kernels import logprob as _logprob
from wz_kernels.policy_loss import aggregation_weights, policy_loss

__all__ = [
    "SUPPORTED_LOSS_TYPES",
    "TRLLossNormalisation",
    "WZGRPOTrainer",
    "fused_grpo_loss",
    "trl_loss_normalisation",
    "unsupported_options",
]

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")

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
    if opt("importance_sampling_level", "token") != "token":
        problems.append(f"importance_sampling_level={opt('importance_sampling_level')!r}: only 'token' is supported")
    if opt("top_entropy_quantile", 1.0) < 1.0:
        problems.append(f"top_entropy_quantile={opt('top_entropy_quantile')}: needs per-token entropies "
                        "(only 1.0 is supported)")
    if opt("entropy_coef", 0.0) != 0.0 or opt("use_adaptive_entropy", False):
        problems.append("entropy_coef / use_adaptive_entropy: the entropy bonus is not supported")
    epsilon_high = opt("epsilon_high") if opt("epsilon_high") is not None else opt("epsilon")
    delta = opt("delta")
    if delta is not None and not delta > 1 + epsilon_high:
        problems.append(f"delta={delta}: only delta > 1 + epsilon_high (= {1 + epsilon_high}) is supported, where "
                        "two-sided clipping equals a dual clip")
    if opt("use_vllm", False) and opt("vllm_importance_sampling_correction", False):
        problems.append("vllm_importance_sampling_correction=True (with use_vllm=True): the vLLM importance-sampling "
                        "correction is not supported; set it to False")
    if opt("off_policy_mask_threshold") is not None:
        problems.append(f"off_policy_mask_threshold={opt('off_policy_mask_threshold')}: off-policy sequence masking "
                        "is not supported")
    if opt("cast_lm_head_to_fp32", False):
        problems.append("cast_lm_head_to_fp32=True: not supported")
    return problems


def _raise_if_unsupported(problems: list[str]) -> None:
    if problems:
        raise ValueError("WZGRPOTrainer does not support these GRPOConfig settings (use trl.GRPOTrainer for "
                         "them):\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class TRLLossNormalisation:
    """How one TRL loss_type aggregates the per-token loss, in `wz_kernels.policy_loss` terms."""

    agg: str
    """wz aggregation mode."""
    global_tokens: float | torch.Tensor | None = None
    """token-mean denominator (None: the tokens of this micro-batch)."""
    global_seqs: float | None = None
    """Sequence count of the seq-* modes (None: sequences with at least one token)."""
    loss_scale: float | None = None
    """Dr. GRPO's constant."""
    divisor: float = 1.0
    """Applied after aggregation: TRL's gradient-accumulation division."""

    def agg_kwargs(self) -> dict:
        return {"agg": self.agg, "global_tokens": self.global_tokens, "global_seqs": self.global_seqs,
                "loss_scale": self.loss_scale}


def trl_loss_normalisation(loss_type: str, *, num_sequences: int, max_completion_length: int,
                           num_items_in_batch: torch.Tensor | float | None, num_processes: int,
                           grad_accum_steps: int, steps_per_generation: int, training: bool) -> TRLLossNormalisation:
    """TRL 1.16's normalisation for `loss_type` (see the module docstring's table)."""
    accum = float(grad_accum_steps) if training else 1.0
    if loss_type == "grpo":
        return TRLLossNormalisation("seq-mean-token-mean", global_seqs=float(num_sequences), divisor=accum)
    if loss_type == "bnpo":
        return TRLLossNormalisation("token-mean", divisor=accum)
    if loss_type == "dr_grpo":
        return TRLLossNormalisation("seq-mean-token-sum-norm", global_seqs=float(num_sequences),
                                    loss_scale=float(max_completion_length), divisor=accum)
    if loss_type == "dapo":
        if num_items_in_batch is None:
            raise ValueError("loss_type='dapo' needs inputs['num_items_in_batch']")
        normaliser = torch.as_tensor(num_items_in_batch, dtype=torch.float32).clamp(min=1.0) / num_processes
        if training:
            normaliser = normaliser * grad_accum_steps / steps_per_generation
        return TRLLossNormalisation("token-mean", global_tokens=normaliser)
    raise ValueError(f"loss_type must be one of {SUPPORTED_LOSS_TYPES}, got {loss_type!r}")


def fused_grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    old_logprobs: torch.Tensor | None, advantages: torch.Tensor, seq_ids: torch.Tensor, *,
                    norm: TRLLossNormalisation, bias: torch.Tensor | None = None, ref_logprobs: torch.Tensor | None = None,
                    temperature: float = 1.0, clip_low: float = 0.2, clip_high: float = 0.2,
                    dual_clip: float | None = None, kl_coef: float = 0.0, kl_importance_weighted: bool = False):
    """GRPO-family loss from hidden states, never forming [N, V] logits -> (loss 0-d, metrics dict).

    hidden [N, H] (the scored tokens only), weight [V, H], targets [N], old_logprobs [N] or None (on-policy:
    TRL's `per_token_logps.detach()`), advantages [N], seq_ids [N], ref_logprobs [N] when kl_coef != 0.
    The KL term is TRL's: k3 = exp(ref - logp) - (ref - logp) - 1, unclamped (the kernel's k3 is clamped at 10,
    as verl's), times the differentiable importance ratio exp(logp - old) when `kl_importance_weighted` (TRL's
    `use_bias_correction_kl`). The loss is before `norm.divisor`.

    With beta = 0 the whole loss is one `fused_linear_policy_loss` pass (6NHV flops, no recompute in backward);
    on-policy it takes each chunk's own detached log-probabilities as old inside that pass (`old_logprobs=None`),
    which is TRL's `old = per_token_logps.detach()`. With beta > 0 the log-probabilities come from
    `fused_linear_logprobs` (differentiable, chunked over the vocabulary, 8NHV flops) and the objective from
    `policy_loss` on [N] vectors, plus TRL's KL in torch on [N] vectors: TRL's k3 is unclamped and, with
    `use_bias_correction_kl`, weighted by the differentiable ratio, neither of which the kernel's KL term is.
    """
    ones = torch.ones_like(targets, dtype=torch.float32)
    options = dict(seq_ids=seq_ids, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, **norm.agg_kwargs())
    if kl_coef == 0.0:  # one vocabulary pass; old_logprobs None = on-policy inside the kernel
        return _logprob.fused_linear_policy_loss(hidden, weight, targets, old_logprobs, advantages, ones, bias=bias,
                                                   temperature=temperature, **options)
    logprobs = _logprob.fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature)
    old = logprobs.detach() if old_logprobs is None else old_logprobs
    loss, metrics = policy_loss(logprobs, old, advantages, ones, **options)
    if kl_coef == 0.0:
        return loss, metrics
    if ref_logprobs is None:
        raise ValueError("ref_logprobs is required when kl_coef != 0")
    log_ref_ratio = ref_logprobs - logprobs
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # [N]
    if kl_importance_weighted:
        kl = kl * torch.exp(logprobs - old)
    weights = aggregation_weights(ones, seq_ids, **norm.agg_kwargs())
    loss = loss + kl_coef * (weights * kl).sum()
    kl_mean = kl.detach().mean() if kl.numel() else kl.new_zeros(())
    return loss, dict(metrics, kl_mean=kl_mean)


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
        advantages = advantages.expand_as(valid)
        old = inputs.get("old_per_token_logps")
        ref = inputs["ref_per_token_logps"][valid].float() if self.beta != 0.0 else None

        mode = "train" if self.model.training else "eval"
        norm = trl_loss_normalisation(
            self.loss_type, num_sequences=num_seqs, max_completion_length=self.max_completion_length,
            num_items_in_batch=inputs.get("num_items_in_batch"), num_processes=self.accelerator.num_processes,
            grad_accum_steps=self.current_gradient_accumulation_steps if mode == "train" else 1,
            steps_per_generation=self.args.steps_per_generation, training=mode == "train")
        loss, metrics = fused_grpo_loss(
            hidden[valid], weight, completion_ids[valid], None if old is None else old[valid].float(),
            advantages[valid].float(), rows[valid], norm=norm, bias=bias, ref_logprobs=ref,
            temperature=self.temperature, clip_low=self.epsilon_low, clip_high=self.epsilon_high,
            dual_clip=self.args.delta, kl_coef=self.beta,
            kl_importance_weighted=bool(getattr(self.args, "use_bias_correction_kl", False)))
        self._log_loss_metrics(metrics, mode)
        return loss / norm.divisor

    def _log_loss_metrics(self, metrics: dict, mode: str) -> None:
        """TRL's token-mean metrics, reduced over processes the way TRL reduces them."""
        tokens = metrics["tokens"].float()

        def global_mean(value):
            totals = self.accelerator.reduce(torch.stack([value.float() * tokens, tokens]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(global_mean(metrics["kl_mean"]))
        low, high = metrics["clip_frac_low"], metrics["clip_frac_high"]
        self._metrics[mode]["clip_ratio/low_mean"].append(global_mean(low))
        self._metrics[mode]["clip_ratio/high_mean"].append(global_mean(high))
        self._metrics[mode]["clip_ratio/region_mean"].append(global_mean(low + high))
