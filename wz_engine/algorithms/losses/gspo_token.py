"""GSPO-token (the GSPO paper's token-level variant; TRL's experimental importance_sampling_level
"sequence_token"): each token's ratio is logp - sg(logp) + sg(S_b) exponentiated, i.e. the value of the
sequence ratio with the token's own gradient. With one advantage per sequence its gradient equals
GSPO's; it differs when advantages vary along a sequence (per-token advantages)."""

from wz_engine.algorithms.loss import register_policy_loss
from wz_engine.algorithms.losses.ppo_clip import CLIP_METRICS, FusedClipLoss

GSPO_TOKEN = register_policy_loss("gspo_token")(FusedClipLoss(
    "gspo_token", metrics=CLIP_METRICS, kernel_options=(("importance_sampling_level", "sequence_token"),)))
