"""The loss curve of a run (and its rewards, for preference methods) as a PNG.

Uses matplotlib's object API with the Agg canvas, imported when a plot is drawn, so the
caller's pyplot backend is left alone and importing this module costs nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_loss(
    train: list[dict[str, Any]],
    evals: list[dict[str, Any]],
    path: Path,
    title: str,
    *,
    rewards: list[dict[str, Any]] | None = None,
    eval_rewards: list[dict[str, Any]] | None = None,
) -> Path | None:
    """Write the loss curve to ``path`` (PNG); None when there is nothing to plot. With
    ``rewards`` (a preference run's ``{"step", "margin", "accuracy"}`` history) a second panel
    shows the reward margin and the reward accuracy (chosen rewarded above rejected); with a
    GRPO run's ``{"step", "reward", "rewards"}`` history, the mean reward and each reward
    function's mean.

    Uses matplotlib's object API with the Agg canvas, so the caller's pyplot backend is left
    alone.
    """
    if not train and not evals:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4) if rewards else (7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 2 if rewards else 1, 1)
    for history, label, style in ((train, "train", "-"), (evals, "eval", "o--")):
        if history:
            steps, losses = [h["step"] for h in history], [h["loss"] for h in history]
            axes.plot(steps, losses, style, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    if rewards:
        _plot_rewards(figure.add_subplot(1, 2, 2), rewards, eval_rewards or [])
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def _plot_rewards(
    axes: Any, rewards: list[dict[str, Any]], eval_rewards: list[dict[str, Any]]
) -> None:
    """Reward margin (left axis) and reward accuracy (right axis, 0 to 1) by step; or the
    mean reward of sampled completions and each reward's mean (GRPO)."""
    if any("reward" in h for h in rewards):
        _plot_sampled_rewards(axes, rewards, eval_rewards)
        return
    accuracy_axes = None
    for history, label, style in ((rewards, "train", "-"), (eval_rewards, "eval", "o--")):
        margins = [(h["step"], h["margin"]) for h in history if h.get("margin") is not None]
        if margins:
            axes.plot(*zip(*margins, strict=True), style, color="tab:blue", label=f"{label} margin")
        accuracies = [(h["step"], h["accuracy"]) for h in history if h.get("accuracy") is not None]
        if accuracies:
            accuracy_axes = accuracy_axes or axes.twinx()
            accuracy_axes.plot(
                *zip(*accuracies, strict=True), style, color="tab:green", label=f"{label} accuracy"
            )
    axes.set_xlabel("step")
    axes.set_ylabel("reward margin (chosen - rejected)", color="tab:blue")
    axes.set_title("rewards")
    axes.grid(alpha=0.3)
    handles, labels = axes.get_legend_handles_labels()
    if accuracy_axes is not None:
        accuracy_axes.set_ylim(-0.05, 1.05)
        accuracy_axes.set_ylabel("reward accuracy", color="tab:green")
        more = accuracy_axes.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    axes.legend(handles, labels, loc="lower right")


def _plot_sampled_rewards(
    axes: Any, rewards: list[dict[str, Any]], eval_rewards: list[dict[str, Any]]
) -> None:
    """The mean (weighted) reward by step, train and eval, and each reward function's mean."""
    for history, label, style in ((rewards, "train", "-"), (eval_rewards, "eval", "o--")):
        points = [(h["step"], h["reward"]) for h in history if h.get("reward") is not None]
        if points:
            axes.plot(*zip(*points, strict=True), style, linewidth=2, label=f"{label} reward")
    names = dict.fromkeys(name for h in rewards for name in h.get("rewards") or {})
    for name in names:
        points = [
            (h["step"], h["rewards"][name]) for h in rewards if name in (h.get("rewards") or {})
        ]
        axes.plot(*zip(*points, strict=True), ":", linewidth=1, label=name)
    axes.set_xlabel("step")
    axes.set_ylabel("mean reward")
    axes.set_title("rewards")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
