"""Built-in advantage estimators: every module here is imported by the registry and registers its own."""
