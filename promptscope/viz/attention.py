"""Figures for ``attention`` results: token x token heatmaps and layer x head span mass."""

from __future__ import annotations

from typing import Any

from promptscope.viz.style import apply_style


def default_part(df: Any) -> str:
    """The part worth looking at first: the emphasis, else the first variable/group, else the
    prompt's own text (not the special tokens, which would lead with the attention sink)."""
    parts = list(dict.fromkeys(df["part"]))
    if "emphasis" in parts:
        return "emphasis"
    named = [p for p in parts if p not in ("text", "special", "template")]
    return named[0] if named else ("text" if "text" in parts else parts[0])


def mass_heatmap(result: Any, part: str | None = None, variant: int | None = None) -> Any:
    """Layer x head heatmap of the attention mass the last token puts on ``part``."""
    import plotly.graph_objects as go

    df = result.df
    part = part or default_part(df)
    rows = df[df["part"] == part]
    if variant is not None:
        rows = rows[rows["variant"] == variant]
    grid = rows.pivot_table(index="layer", columns="head", values="mass", aggfunc="mean")
    fig = go.Figure(go.Heatmap(
        z=grid.values, x=[f"h{h}" for h in grid.columns], y=[f"L{layer}" for layer in grid.index],
        colorscale="Viridis", zmin=0, zmax=1, colorbar={"title": "mass"},
        hovertemplate="%{y} %{x}<br>mass on " + part + ": %{z:.3f}<extra></extra>"))
    which = "mean over variants" if variant is None else f"variant {variant}"
    fig.update_yaxes(autorange="reversed")
    return apply_style(fig, f"Attention of the last token on '{part}' ({which})")


def token_heatmap(result: Any, variant: int, layer: int, head: int | None = None) -> Any:
    """Token x token attention of one variant, layer and head (``None``: mean over heads)."""
    import numpy as np
    import plotly.graph_objects as go

    w = result.tables["weights"]
    w = w[(w["variant"] == variant) & (w["layer"] == layer)]
    if head is not None:
        w = w[w["head"] == head]
    tokens = result.tables["tokens"]
    tokens = tokens[tokens["variant"] == variant].sort_values("position")["token"].tolist()
    n = len(tokens)
    grid = np.zeros((n, n), dtype="float32")
    mean = w.groupby(["query", "key"])["weight"].mean()
    grid[mean.index.get_level_values(0), mean.index.get_level_values(1)] = mean.values
    # Unique axis labels per position, spaces and newlines visible (Ġ/Ċ: sessions saved with
    # byte-level token names)
    labels = [f"{i}:{t.replace('Ġ', '␣').replace('Ċ', '↵').replace(' ', '␣')}"
              .replace("\n", "↵") for i, t in enumerate(tokens)]
    fig = go.Figure(go.Heatmap(
        z=grid, x=labels, y=labels, colorscale="Blues", zmin=0, zmax=float(grid.max() or 1),
        hovertemplate="query %{y}<br>key %{x}<br>weight %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(height=max(350, 18 * n + 120))
    which = "mean over heads" if head is None else f"head {head}"
    return apply_style(fig, f"Variant {variant}, layer {layer}, {which}")


def figure(result: Any) -> Any:
    """The layer x head map of the attention on the most interesting part."""
    return mass_heatmap(result)


def widget(result: Any) -> Any:
    """The interactive explorer when the result kept its matrices (else ``None``)."""
    if "weights" not in result.tables:
        return None
    from promptscope.widgets.attention import AttentionExplorer

    return AttentionExplorer(result)


def summary(result: Any) -> Any:
    """Mass per part, averaged over layers and heads, one row per variant."""
    df = result.df
    keys = [c for c in df.columns if c not in ("layer", "head", "part", "mass")]
    wide = df.pivot_table(index=keys, columns="part", values="mass", aggfunc="mean", sort=False)
    wide.columns = [f"mass({c})" for c in wide.columns]
    return wide.reset_index()
