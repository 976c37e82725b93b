"""Built-in policy losses: every module here is imported by the registry and registers its own."""
