"""Figures for knob sweeps: which source the answers follow as the knob is set, per layer."""

from __future__ import annotations

from typing import Any

from promptscope.viz.style import apply_style

_COLORS = {"context": "#1f77b4", "prior": "#d62728"}
_OTHER = ("#2ca02c", "#9467bd", "#ff7f0e")


def figure(result: Any) -> Any:
    """One panel per layer: the share of answers following each source against the knob's
    value, with the two intents' mean values (dotted) and the unsteered shares (faint)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    df = result.df
    sources = list(result.params.get("answers", {"context": "", "prior": ""}))
    layers = sorted(df["layer"].unique())
    fig = make_subplots(rows=1, cols=len(layers), shared_yaxes=True,
                        subplot_titles=[f"layer {k}" for k in layers])
    base = result.params.get("baseline", {})
    facts = result.params.get("layers", {})
    for col, layer in enumerate(layers, start=1):
        part = df[df["layer"] == layer].sort_values("value")
        for i, source in enumerate(sources):
            color = _COLORS.get(source, _OTHER[i % len(_OTHER)])
            fig.add_trace(go.Scatter(
                x=part["value"], y=part[source], mode="lines+markers", name=f"follows {source}",
                legendgroup=source, showlegend=col == 1, line={"color": color},
                hovertemplate=f"layer {layer}<br>knob %{{x:.2f}}<br>{source} %{{y:.2f}}"
                              "<extra></extra>"), row=1, col=col)
            if source in base:
                fig.add_hline(y=base[source], line={"color": color, "width": 1, "dash": "dash"},
                              opacity=0.4, row=1, col=col)
        for side, dash in (("positive", "dot"), ("negative", "dot")):
            x = facts.get(str(layer), {}).get(side)
            if x is not None:
                fig.add_vline(x=x, line={"color": "#777", "width": 1, "dash": dash}, row=1,
                              col=col)
        fig.update_xaxes(title_text="knob value", row=1, col=col)
    fig.update_yaxes(title_text="share of answers", range=[-0.02, 1.02], row=1, col=1)
    return apply_style(fig, "Context-sensitivity knob: answers as its value is set, per layer "
                            "(dotted: the intents' own values; dashed: unsteered)")


def summary(result: Any) -> Any:
    """Per layer: how far the sweep moves each source's share (max - min) and the separation
    of the two intents along the direction; the knob lives where the range is largest."""
    import pandas as pd

    df = result.df
    sources = list(result.params.get("answers", {}))
    facts = result.params.get("layers", {})
    rows = []
    for layer, part in df.groupby("layer"):
        row: dict[str, Any] = {"layer": layer}
        for s in sources:
            row[f"{s}_min"], row[f"{s}_max"] = part[s].min(), part[s].max()
            row[f"{s}_range"] = part[s].max() - part[s].min()
        row["separation"] = facts.get(str(layer), {}).get("separation")
        rows.append(row)
    out = pd.DataFrame(rows)
    key = f"{sources[0]}_range" if sources else "layer"
    return out.sort_values(key, ascending=False, ignore_index=True)
