"""Group-relative estimators of scalar rewards: one wz_kernels call, the rule named by the estimator
(GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline; formulas in wz_kernels.advantage)."""

from __future__ import annotations

import functools

from wz_engine.algorithms.estimator import register_estimator


def _group_relative(kernel_name: str, inputs, cfg):
    from wz_kernels.advantage import group_advantages

    return group_advantages(inputs.rewards.float(), inputs.group_ids, kernel_name,
                            validate=False)  # checked on the host by Estimator.check_rewards


for _name in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"):
    register_estimator(_name)(functools.partial(_group_relative, _name))
