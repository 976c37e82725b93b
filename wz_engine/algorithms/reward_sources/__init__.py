"""Built-in reward sources (`judge.kind`): every module here is imported by the registry and registers its own."""
