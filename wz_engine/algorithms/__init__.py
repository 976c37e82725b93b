"""Algorithm variants as registries: advantage estimators, policy losses and reward sources.

The config names one of each (`algorithm.estimator`, `algorithm.policy_loss`, `judge.kind`); the
trainer looks them up here and never branches on the names. `RunConfig.validate` resolves all three
(unknown names are errors with a did-you-mean), checks that the estimator and the reward source
agree on pairwise vs pointwise rewards, and runs each entry's own `validate(cfg)` hook.

Built-ins (one module per file, discovered: every module of the package is imported on first lookup)

    estimators/      brpo (pairwise); grpo, dr_grpo, rloo, reinforce_pp_baseline (wz_kernels.advantage);
                     gigpo (per_step: multi-turn agent runs with an env, wz_kernels.gigpo_advantages)
    losses/          ppo_clip, gspo, gspo_token, luspo, cispo, sapo, vespo (wz_kernels.fused_linear_policy_loss:
                     clip, dual / two-sided clip, KL (importance-weighted), agg modes, top-entropy and
                     off-policy sequence masks)
    reward_sources/  callable, genrm (pairwise judges); rule, scalar_rm, preference (pointwise; preference
                     trains the policy as the GenRM on preference pairs)

Adding one (no trainer edit)

  * In the package: a new file in the directory above, registering at import time, e.g.

        from wz_engine.algorithms import register_estimator

        @register_estimator("my_estimator")
        def my_estimator(inputs, cfg):          # AdvantageInputs, AlgorithmConfig
            return inputs.rewards - inputs.rewards.mean()       # [B] (or Advantages(values, kept))

  * Outside the package: the same code in any importable module, named in the config by module path
    (`algorithm.estimator = "my_pkg.algos:my_estimator"`, likewise `algorithm.policy_loss` and
    `judge.kind`). The module is imported when the config is validated; the attribute must be an
    entry (what the decorators return; a plain function is also accepted as a pointwise estimator).
    Options of your own go in the free-form table `algorithm.custom` (the estimator reads
    `cfg.custom`, a `TokenLoss` reads `batch.options["custom"]`).

Extension points, per kind (see each module's docstring for the exact contract)

  * `Estimator` (estimator.py): `fn(AdvantageInputs, AlgorithmConfig) -> [B] | Advantages`, `pairwise`,
    `per_step`, `validate`. The rewards are checked on the host first (`check_rewards`), so the kernels run
    with `validate=False` (no device sync). Per-row inputs beyond the rewards are optional fields of
    `AdvantageInputs`: GiGPO's step_returns / anchor_ids / trajectory_ids, filled for `per_step` estimators
    in multi-turn runs (wz_engine/rollout/episodes.py); other estimators see one row per trajectory there.
  * `PolicyLoss` (loss.py): `TokenLoss` for `fn(logprobs, batch) -> (loss, metrics)` written in torch,
    or a subclass whose `__call__` runs a fused kernel on hidden states + lm_head weight (as
    `ppo_clip`); `options(cfg.algorithm, max_new_tokens)` builds the per-micro-batch options (a fused
    loss passes them to its kernel: GSPO / CISPO / other kernel loss types add their keyword arguments
    there), `metrics` names what it reports.
  * `RewardSource` (reward_source.py): `build(RewardContext)`, `pairwise`, `validate` (may also derive
    settings, as genrm does for vLLM), `assemble` for a reward protocol other than pairwise verdicts or
    pointwise `score(...)`, and `prompt_rows` for one that brings its own prompts (both: `preference`).
"""

from wz_engine.algorithms.estimator import (
    ESTIMATORS,
    AdvantageInputs,
    Advantages,
    Estimator,
    register_estimator,
)
from wz_engine.algorithms.loss import (
    POLICY_LOSSES,
    PolicyLoss,
    TokenLoss,
    common_options,
    register_policy_loss,
)
from wz_engine.algorithms.registry import Registry, RegistryError, load_object
from wz_engine.algorithms.reward_source import (
    REWARD_SOURCES,
    GroupRewards,
    RewardContext,
    RewardSource,
    register_reward_source,
)

__all__ = [
    "ESTIMATORS", "POLICY_LOSSES", "REWARD_SOURCES", "AdvantageInputs", "Advantages", "Estimator", "GroupRewards",
    "PolicyLoss", "Registry", "RegistryError", "RewardContext", "RewardSource", "TokenLoss", "common_options",
    "load_object", "register_estimator", "register_policy_loss", "register_reward_source",
]
