"""Built-in templates. Each module registers itself on import, exactly like a user's plugin file."""
