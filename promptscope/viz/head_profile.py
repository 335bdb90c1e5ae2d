"""Figures for head profiles: the layer x head map of the gain from steering each head."""

from __future__ import annotations

from typing import Any

from promptscope.viz.style import apply_style


def figure(result: Any) -> Any:
    """Layer x head heatmap of the accuracy gain (log-prob gain when accuracy does not move)."""
    import plotly.graph_objects as go

    df = result.df
    metric = "d_accuracy" if df["d_accuracy"].abs().max() > 0 else "d_logprob"
    grid = df.pivot_table(index="layer", columns="head", values=metric)
    limit = float(abs(grid.values).max() or 1)
    fig = go.Figure(go.Heatmap(
        z=grid.values, x=[f"h{h}" for h in grid.columns], y=[f"L{lay}" for lay in grid.index],
        colorscale="RdBu", zmid=0, zmin=-limit, zmax=limit,
        colorbar={"title": {"d_accuracy": "accuracy gain", "d_logprob": "log-prob gain"}[metric]},
        hovertemplate="%{y} %{x}<br>" + metric + ": %{z:+.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title_text="layer")
    fig.update_xaxes(title_text="head")
    base = result.params.get("baseline", {})
    return apply_style(fig, f"Gain from steering each head alone (alpha={result.params['alpha']}; "
                            f"unsteered accuracy {base.get('accuracy', float('nan')):.2f})")


def summary(result: Any) -> Any:
    """Heads ranked best first."""
    from promptscope.analyses.heads import rank

    return rank(result.df)
