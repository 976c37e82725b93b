"""Use wz kernels inside other trainers without adopting the wz trainer.

- `wz_engine.integrations.trl`: `WZGRPOTrainer`, a drop-in for TRL's `GRPOTrainer` whose loss runs through
  `wz_kernels.fused_linear_policy_loss` (one changed line of user code).
- `wz_engine.integrations.verl`: functions with verl's names, arguments and return values
  (`compute_policy_loss`, `agg_loss`, `kl_penalty`, the outcome advantage estimators) backed by wz kernels.

Submodules are imported on demand: `import wz_engine.integrations` does not import TRL.
"""
