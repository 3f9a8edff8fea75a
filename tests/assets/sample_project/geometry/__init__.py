"""Small geometry helpers: shapes and plane vectors.

Used by the quickstart tests as a tiny code base.
"""

from .shapes import Circle, distance

__all__ = ["Circle", "distance"]
