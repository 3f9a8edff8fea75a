def hidden() -> None:
    """A hidden module that must not be scanned."""
