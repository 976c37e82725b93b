"""GSPO (Group Sequence Policy Optimization, Qwen 2025): one importance ratio per sequence,
s_b = exp(mean over b's tokens of (logp - old_logp)), clipped per sequence; the gradient of s_b reaches
every token of b. The paper averages per sequence: pair it with algorithm.agg = "seq-mean-token-mean"
(TRL: loss_type="grpo", importance_sampling_level="sequence"). Clip ranges, delta, dual clip and the KL
term are the config's; the ratios are typically far closer to 1 than token ratios, so GSPO recipes
use much smaller clip ranges (the paper: 3e-4 / 4e-4)."""

from wz_engine.algorithms.loss import register_policy_loss
from wz_engine.algorithms.losses.ppo_clip import CLIP_METRICS, FusedClipLoss

GSPO = register_policy_loss("gspo")(FusedClipLoss(
    "gspo", metrics=CLIP_METRICS, kernel_options=(("importance_sampling_level", "sequence"),)))
