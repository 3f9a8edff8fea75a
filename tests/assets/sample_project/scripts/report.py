import functools


@functools.cache
def banner(title: str, width: int = 20) -> str:
    """Center title in a line of '=' characters of the given width."""
    return f" {title} ".center(width, "=")
