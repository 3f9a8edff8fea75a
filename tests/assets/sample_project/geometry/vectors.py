"""Two-dimensional vectors as tuples."""


def add(u: tuple[float, float], v: tuple[float, float]) -> tuple[float, float]:
    """Add two vectors component by component."""
    return (u[0] + v[0], u[1] + v[1])


def scale(v: tuple[float, float], factor: float) -> tuple[float, float]:
    """Multiply a vector by a scalar factor."""
    return (v[0] * factor, v[1] * factor)


def stub() -> None:
    """Nothing but a docstring."""
