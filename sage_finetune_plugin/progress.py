"""The progress vocabulary every service speaks: text lines and progress events.

A service takes ``status`` (a ``Status``: called with one line of text for the user, such as
"Loading the base model") and, where it works through steps, ``progress`` (a
``ProgressSink``: called with a ``Progress`` event at the start, after each step and at the
end). The command layer draws the events as one kind of progress bar and prints the lines
above it; a Python caller may pass ``print`` and a list's ``append``. Imports nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

#: A line of text for the user.
Status = Callable[[str], None]


@dataclass
class Progress:
    """One progress event: ``event`` is ``start``, ``step`` (``done`` of ``total`` finished),
    ``log`` (something to keep as a line, ``line()``) or ``end``; ``label`` says what
    progresses, ``unit`` what is counted. Subclasses add what their work measures."""

    event: str
    done: int
    total: int
    label: str = ""
    unit: str = "step"

    def postfix(self) -> dict[str, str]:
        """Figures to show beside the bar."""
        return {}

    def line(self) -> str:
        """The event as one line of text (logged events)."""
        return f"{self.label} {self.done}/{self.total}"


#: Receives progress events.
ProgressSink = Callable[[Progress], None]
