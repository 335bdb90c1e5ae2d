"""Figures for saved steering vectors: the vector's norm at each layer."""

from __future__ import annotations

from typing import Any

from promptscope.viz.style import apply_style


def figure(result: Any) -> Any:
    """Bar chart of the vector's L2 norm per layer."""
    import plotly.graph_objects as go

    df = result.df
    fig = go.Figure(go.Bar(x=[f"L{int(x)}" for x in df["layer"]], y=df["norm"],
                           hovertemplate="%{x}: norm %{y:.3f}<extra></extra>"))
    fig.update_layout(xaxis_title="layer", yaxis_title="norm")
    p = result.params
    return apply_style(fig, f"Steering vector '{result.name}' ({p.get('method')}, "
                            f"mode {p.get('mode')})")


def summary(result: Any) -> Any:
    """One row per layer: the norm (the values stay in ``result.df``)."""
    return result.df[["layer", "norm"]]
