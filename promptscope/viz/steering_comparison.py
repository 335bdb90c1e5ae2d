"""Figures for steering comparisons: accuracy gained against strength and against side effects."""

from __future__ import annotations

from typing import Any

from promptscope.viz.style import apply_style, plain


def figure(result: Any) -> Any:
    """Left: accuracy gain vs strength (PASTA: 1/alpha, or alpha in include mode), log scale.
    Then accuracy gain vs each side-effect cost measured: to unrelated text (drop in log-prob
    per token) and to the control task (drop in its accuracy)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    df = result.df
    costs = {c: t for c, t in (("d_text", "drop in log-prob/token of unrelated text"),
                               ("d_control", "drop in control accuracy")) if c in df}
    panels = {"d_text": "accuracy gain vs text cost", "d_control": "accuracy gain vs control cost"}
    fig = make_subplots(rows=1, cols=1 + len(costs), subplot_titles=(
        "accuracy gain vs strength", *(panels[c] for c in costs)))
    for i, (label, part) in enumerate(df.groupby("method", sort=False)):
        part = part.sort_values("strength")
        hover = [f"{plain(label)} {s}={v:g}<br>accuracy {a:.3f} ({d:+.3f})" +
                 (f"<br>control {c:+.3f}" if "d_control" in part else "") +
                 (f"<br>text log-prob/token {t:+.3f}" if "d_text" in part else "")
                 for s, v, a, d, c, t in zip(part["setting"], part["value"], part["accuracy"],
                                             part["d_accuracy"],
                                             part.get("d_control", part["d_accuracy"]),
                                             part.get("d_text", part["d_accuracy"]))]
        color = _COLORS[i % len(_COLORS)]
        fig.add_trace(go.Scatter(x=part["strength"], y=part["d_accuracy"], mode="lines+markers",
                                 name=label, legendgroup=label, line={"color": color},
                                 hovertext=hover, hoverinfo="text"), row=1, col=1)
        for col, cost in enumerate(costs, start=2):
            fig.add_trace(go.Scatter(x=-part[cost], y=part["d_accuracy"],
                                     mode="lines+markers", name=label, legendgroup=label,
                                     showlegend=False, line={"color": color, "dash": "dot"},
                                     hovertext=hover, hoverinfo="text"), row=1, col=col)
    picked = chosen(df)
    fig.add_trace(go.Scatter(
        x=picked["strength"], y=picked["d_accuracy"], mode="markers", name=_CHOSEN,
        marker={"symbol": "circle-open", "size": 15, "color": "black", "line": {"width": 2}},
        hovertext=[f"{plain(m)}: chosen on the tuning rows" for m in picked["method"]],
        hoverinfo="text"), row=1, col=1)
    # a knob's values may be zero or negative: then the strength axis stays linear
    log = bool((df["strength"] > 0).all())
    fig.update_xaxes(type="log" if log else "linear", row=1, col=1,
                     title_text="strength (PASTA 1/alpha; knob: value)")
    fig.update_yaxes(title_text="accuracy gain over unsteered", row=1, col=1)
    for col, title in enumerate(costs.values(), start=2):
        fig.update_xaxes(title_text=title, row=1, col=col)
    base = result.params.get("baseline", {})
    return apply_style(fig, f"Steering compared (unsteered accuracy "
                            f"{base.get('accuracy', float('nan')):.3f})")


_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
_CHOSEN = "chosen setting"


def chosen(df: Any) -> Any:
    """Per method, the setting picked on the tuning rows: highest tuning accuracy, then the
    right answers' log-prob; ties go to the first swept. (Sessions saved before the split
    existed pick on all rows.)"""
    keys = (["tune_accuracy", "tune_logprob"] if "tune_accuracy" in df
            else ["d_accuracy"])
    ranked = df.sort_values(keys, ascending=False, kind="stable")
    return ranked.groupby("method", sort=False).head(1).sort_index()


def summary(result: Any) -> Any:
    """Per method, the setting picked on the tuning rows, its gain on the test rows (95 %
    interval; ``n_test`` rows), the cross-fitted gain over all rows (``d_crossfit``: each half
    scored by the setting picked on the other; ``value_on_test_rows`` is that other pick) and
    its side effects."""
    from promptscope.analyses.compare_steering import crossfit

    df = result.df
    cols = [c for c in ("method", "setting", "value", "tune_accuracy", "test_accuracy",
                        "d_test", "d_test_low", "d_test_high", "control_accuracy", "d_control",
                        "text_logprob", "d_text") if c in df]
    if "tune_accuracy" not in df:
        cols[3:3] = ["accuracy", "d_accuracy"]
    table = chosen(df)[cols].reset_index(drop=True)
    if "test_accuracy" in table and result.params.get("test_rows") is not None:
        table.insert(table.columns.get_loc("test_accuracy") + 1, "n_test",
                     len(result.params["test_rows"]))  # what d_test and its interval rest on
    crossed = crossfit(result)
    if crossed is None or not len(crossed):
        return table
    table = table.merge(crossed.drop(columns="value"), on="method", how="left")
    at = table.columns.get_loc("d_test_high") + 1  # beside the single-split gain
    moved = ["value_on_test_rows", "d_crossfit", "d_crossfit_low", "d_crossfit_high"]
    rest = [c for c in table.columns if c not in moved]
    return table[rest[:at] + moved + rest[at:]]
