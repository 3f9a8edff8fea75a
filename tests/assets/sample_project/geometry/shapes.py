"""Shapes in the plane."""

from __future__ import annotations

import math


class Circle:
    """A circle given by its centre and radius."""

    def __init__(self, x: float, y: float, radius: float) -> None:
        """Create a circle centred on (x, y); the radius must not be negative."""
        if radius < 0:
            raise ValueError("radius must not be negative")
        self.x, self.y, self.radius = x, y, radius

    def __repr__(self) -> str:
        """Show the circle's centre and radius."""
        return f"Circle({self.x}, {self.y}, {self.radius})"

    def area(self) -> float:
        """Return the area enclosed by the circle."""
        return math.pi * self.radius**2

    def contains(self, x: float, y: float) -> bool:
        return distance((self.x, self.y), (x, y)) <= self.radius


def distance(p: tuple[float, float], q: tuple[float, float]) -> float:
    """Return the Euclidean distance between points p and q."""
    return math.hypot(p[0] - q[0], p[1] - q[1])


def _clamp(value: float, low: float, high: float) -> float:
    """Limit value to the closed interval [low, high]."""
    return max(low, min(high, value))


def undocumented(a, b):
    return a + b
