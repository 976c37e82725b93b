"""Built-in environments: every module here is imported by the registry (wz_engine.envs.base.ENVS) and
registers its own."""
