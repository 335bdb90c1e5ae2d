"""Figures for label-free prompt selection: each candidate's MI score, and its accuracy when
labels were given, with the selected and the oracle prompts marked."""

from __future__ import annotations

from typing import Any

from promptscope.viz.style import apply_style, hover_lines


def figure(result: Any) -> Any:
    """Selection score per candidate (bars) and accuracy (points, when labelled)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    t = result.tables.get("candidates")
    if t is None:
        return None
    labels = [_name(row, result.params.get("groups") or []) + (" ★" if row["selected"] else "")
              for _, row in t.iterrows()]
    cal = result.params.get("calibration")
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Bar(x=labels, y=t["score"], name=f"MI{' (CBM)' if cal else ''}",
                         marker_color=["#f58518" if s else "#4c78a8" for s in t["selected"]],
                         customdata=t["prompt"].map(hover_lines),
                         hovertemplate="%{x}: MI %{y:.3f}<br>%{customdata}<extra></extra>"),
                  secondary_y=False)
    if "accuracy_used" in t.columns:
        fig.add_trace(go.Scatter(x=labels, y=t["accuracy_used"], mode="markers", name="accuracy",
                                 marker={"size": 10, "color": "#2ca02c", "symbol": "diamond"},
                                 hovertemplate="%{x}: accuracy %{y:.3f}<extra></extra>"),
                      secondary_y=True)
        fig.update_yaxes(title_text="accuracy (labels)", range=[0, 1.05], secondary_y=True)
    fig.update_yaxes(title_text="mutual information (nats)", secondary_y=False)
    fig.update_xaxes(title_text="candidate prompt (★ selected)")
    p = result.params
    pick = t[t["candidate"] == p.get("selected")]
    title = "Label-free selection: " + (_name(pick.iloc[0], p.get("groups") or [], 60)
                                        if len(pick) else f"#{p.get('selected')}")
    if "oracle" in p:
        title += (f" (accuracy {p['accuracy_selected']:.2f}); oracle #{p['oracle']} "
                  f"({p['accuracy_oracle']:.2f}), effectiveness {p['effectiveness']:.2f}")
    return apply_style(fig, title)


def _name(row: Any, groups: list[str], width: int = 28) -> str:
    """``#3 Q · A``: a candidate's number, and for one template's combinations the options it
    takes (a newline as ⏎, spaces only as ␣, an empty option as ∅), else the start of its
    prompt; cut to ``width``."""
    def shown(option: str) -> str:
        return option.replace("\n", "⏎").strip() or ("␣" if option else "∅")

    name = f"#{row['candidate']}"
    if groups:
        name += " " + " · ".join(shown(str(row[g])) for g in groups)
    elif isinstance(row.get("prompt"), str):
        name += " " + shown(row["prompt"])
    return name if len(name) <= width else name[:width - 1] + "…"


def summary(result: Any) -> Any:
    """Candidates by selection score, best first."""
    t = result.tables.get("candidates")
    if t is None:
        return result.df
    return t.sort_values("score", ascending=False).reset_index(drop=True)
