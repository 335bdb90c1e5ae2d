"""Figures for POSIX runs: the index by variant type and the pairwise log-likelihood change."""

from __future__ import annotations

from typing import Any

from promptscope.viz.style import apply_style, plain


def figure(result: Any) -> Any:
    """POSIX by variant type: the mean (bar) and each intent's value (points)."""
    import plotly.graph_objects as go

    items = result.tables.get("items")
    if items is None:  # a stopped run: nothing aggregated yet
        return None
    types = list(dict.fromkeys(items["type"]))
    means = items.groupby("type")["posix"].mean()
    fig = go.Figure([
        go.Bar(x=types, y=[means[t] for t in types], name="mean over intents",
               marker_color="#4c78a8", hovertemplate="%{x}: POSIX %{y:.3f}<extra></extra>"),
        go.Box(x=items["type"], y=items["posix"], name="per intent", boxpoints="all",
               jitter=0.4, pointpos=0, fillcolor="rgba(0,0,0,0)", line={"color": "#444"},
               marker={"size": 5}, hovertemplate="intent %{text}: %{y:.3f}<extra></extra>",
               text=items["item"].astype(str).map(plain)),
    ])
    fig.update_layout(yaxis={"title": "POSIX (mean |Δ log-likelihood| per response token)"},
                      xaxis={"title": "variant type"}, showlegend=False)
    return apply_style(fig, "Prompt sensitivity (POSIX) by variant type")


def heatmap(result: Any, type: str | None = None, item: int | None = None) -> Any:
    """Pairwise change in the response's log-likelihood per token when prompt j is replaced by
    prompt i, ``(log P(y_j|x_i) - log P(y_j|x_j)) / L_{y_j}``, averaged over intents (or for one
    ``item``), for one variant ``type`` (default: the first)."""
    import numpy as np
    import plotly.graph_objects as go

    from promptscope.errors import PromptscopeError

    df = result.df
    kind = type or df["type"].iloc[0]
    part = df[df["type"] == kind]
    if item is not None:
        part = part[part["item"] == item]
    if part.empty:
        raise PromptscopeError(f"No scored pairs for type={kind!r}, item={item!r}; the run has "
                               f"types {sorted(set(df['type']))} and items 0..{df['item'].max()}.")
    grid = part.pivot_table(index="i", columns="j", values="change", aggfunc="mean")
    finite = np.abs(grid.values)[np.isfinite(grid.values)]  # failed pairs are NaN
    limit = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    fig = go.Figure(go.Heatmap(
        z=grid.values, x=[f"y{j}" for j in grid.columns], y=[f"x{i}" for i in grid.index],
        colorscale="RdBu", zmid=0, zmin=-limit, zmax=limit,
        colorbar={"title": "Δ log-lik / token"},
        hovertemplate="response %{x} after prompt %{y}: %{z:+.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title="prompt x_i (0 = original)")
    fig.update_xaxes(title="response y_j (to prompt x_j)")
    what = f"intent {item}" if item is not None else "mean over intents"
    return apply_style(fig, f"Log-likelihood change per token, {kind} variants ({what})")


def summary(result: Any) -> Any:
    """POSIX per variant type (mean, spread over intents) and the number of intents."""
    items = result.tables.get("items")
    if items is None:
        return result.df
    return items.groupby("type", sort=False)["posix"].agg(
        ["mean", "std", "min", "max", "count"]).reset_index()
