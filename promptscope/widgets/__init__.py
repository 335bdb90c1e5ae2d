"""Interactive widgets (ipywidgets; figures in a ``FigureBox``, see ``_figure.py``); each
composes an analysis result and its plots and holds no analysis logic."""

from __future__ import annotations

from typing import Any

__all__ = ["AttentionExplorer", "SteeringWidget", "SpreadWidget", "ReachWidget", "SteeringLab"]


def __getattr__(name: str) -> Any:  # imported lazily: ipywidgets and plotly are not light
    if name == "AttentionExplorer":
        from promptscope.widgets.attention import AttentionExplorer

        return AttentionExplorer
    if name == "SteeringWidget":
        from promptscope.widgets.steering import SteeringWidget

        return SteeringWidget
    if name == "SteeringLab":
        from promptscope.widgets.steering_lab import SteeringLab

        return SteeringLab
    if name == "SpreadWidget":
        from promptscope.widgets.spread import SpreadWidget

        return SpreadWidget
    if name == "ReachWidget":
        from promptscope.widgets.reach import ReachWidget

        return ReachWidget
    raise AttributeError(name)
