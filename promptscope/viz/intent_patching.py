"""Figures for intent patching: how much of an intent one layer's last token carries, and in
how many directions."""

from __future__ import annotations

from typing import Any

from promptscope.viz.style import apply_style


def figure(result: Any) -> Any:
    """Share of answers switched to the positive intent's against the patch (the knob's one
    direction, the top-k principal directions, the full state), one line per layer; dashed:
    the two intents unpatched."""
    import plotly.graph_objects as go

    df = result.df
    order = list(dict.fromkeys(df.sort_values("dims", kind="stable")["patch"]))
    fig = go.Figure()
    for layer, part in df.groupby("layer"):
        part = part.set_index("patch").reindex(order)
        fig.add_trace(go.Scatter(
            x=order, y=part["followed"], mode="lines+markers", name=f"layer {layer}",
            customdata=part["dims"],
            hovertemplate=f"layer {layer}<br>%{{x}} (%{{customdata}} dims)<br>"
                          "answers switched %{y:.2f}<extra></extra>"))
    base = result.params.get("baseline", {})
    for side, label in (("positive", "positive intent, unpatched"),
                        ("negative", "negative intent, unpatched")):
        if side in base:
            fig.add_hline(y=base[side], line={"dash": "dash", "width": 1, "color": "#777"},
                          annotation_text=label, annotation_position="top left")
    fig.update_xaxes(title_text="patched at the last prompt token (directions)")
    fig.update_yaxes(title_text="share answered as the positive intent asks", range=[-0.02, 1.02])
    return apply_style(fig, "Intent patching: where the intent lives, and in how many directions")


def summary(result: Any) -> Any:
    """Per layer: the full patch's share, the knob direction's, and the fewest principal
    directions that reach 90 % of the full patch's effect (over the unpatched negative)."""
    import pandas as pd

    df = result.df
    low = result.params.get("baseline", {}).get("negative", 0.0)
    rows = []
    for layer, part in df.groupby("layer"):
        share = dict(zip(part["patch"], part["followed"]))
        full = share.get("full", float("nan"))
        enough = part[(part["patch"].str.startswith("top")) &
                      (part["followed"] - low >= 0.9 * (full - low))]
        rows.append({"layer": layer, "full": full, "knob": share.get("knob"),
                     "dims_for_90%": int(enough["dims"].min()) if len(enough) else None})
    out = pd.DataFrame(rows).astype({"dims_for_90%": "Int64"})  # <NA> where none reaches it
    return out.sort_values("full", ascending=False, ignore_index=True)
