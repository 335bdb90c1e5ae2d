"""Figures for FormatSpread runs: accuracy per format with intervals and the spread marked,
the search's convergence, feature effects, and a model-vs-model scatter."""

from __future__ import annotations

from typing import Any

from promptscope.viz.style import apply_style, hover_lines


def _formats(result: Any) -> Any:
    """The per-format table (rebuilt from the rows for a run stopped before it was saved)."""
    table = result.tables.get("formats")
    if table is not None:
        return table
    from promptscope.analyses.sensitivity.bandit import wilson_interval

    df = result.df
    failed = df["failed"].astype(bool) if "failed" in df else None
    # as the search counts: a failed evaluation is in no format's accuracy
    g = df.assign(scored=True if failed is None else ~failed).groupby("format").agg(
        sum=("correct", "sum"), count=("scored", "sum"), n=("correct", "size")).reset_index()
    lo, hi = wilson_interval(g["sum"], g["count"])
    g = g.assign(evaluations=g["count"], correct=g["sum"], failed=g["n"] - g["count"],
                 accuracy=g["sum"] / g["count"].where(g["count"] > 0), ci_low=lo, ci_high=hi,
                 pattern=g["format"].map(lambda f: f"format {f}"), best=False,
                 worst=False).drop(columns="n")
    defs = result.tables.get("format_defs")  # saved before the search started
    if defs is not None:
        g = g.drop(columns="pattern").merge(defs, on="format", how="left")
    return g


def figure(result: Any) -> Any:
    """Accuracy per format, sorted, with 95 % Wilson intervals; best and worst formats coloured
    and the spread (max - min) marked between two lines."""
    import plotly.graph_objects as go

    every = _formats(result)
    t = every[every["evaluations"] > 0].sort_values("accuracy").reset_index(drop=True)
    colors = ["#d62728" if w else "#2ca02c" if b else "#7f7f7f"
              for b, w in zip(t["best"], t["worst"])]
    fig = go.Figure(go.Scatter(
        x=[f"#{f}" for f in t["format"]], y=t["accuracy"], mode="markers",
        marker={"color": colors, "size": 9},
        error_y={"type": "data", "symmetric": False, "array": t["ci_high"] - t["accuracy"],
                 "arrayminus": t["accuracy"] - t["ci_low"], "color": "#bbbbbb"},
        customdata=list(zip(t["evaluations"], [hover_lines(p) for p in t["pattern"]])),
        hovertemplate="format %{x}: %{y:.3f} (n=%{customdata[0]})<br>%{customdata[1]}"
                      "<extra></extra>"))
    lo, hi = result.params.get("interval", [t["accuracy"].min(), t["accuracy"].max()])
    # labels inside the plot, away from the points: high ones sit right, low ones left
    for y, text, where in ((lo, "worst", "bottom right"), (hi, "best", "top left")):
        fig.add_hline(y=y, line_dash="dot", line_color="#444",
                      annotation_text=f"{text} {y:.2f}", annotation_position=where)
    spread = hi - lo
    fig.update_layout(xaxis={"title": "format (sorted by accuracy)", "type": "category"},
                      yaxis={"title": "accuracy", "range": [-0.02, 1.05]}, showlegend=False)
    p = result.params
    done = p.get("evaluations", len(result.df))  # (an interrupted run: the rows it kept)
    how = ("exhaustive" if done >= p.get("exhaustive_evaluations", 1)
           else f"bandit, {done} of {p.get('exhaustive_evaluations')} evals")
    if p.get("report_evaluations"):
        how += f", + {p['report_evaluations']} to measure best and worst on every example"
    unseen = len(every) - len(t)  # a bandit may never pull a format it already rules out
    shown = f"{len(t)} formats" + (f" ({unseen} never evaluated)" if unseen else "")
    return apply_style(fig, f"Accuracy across {shown}: spread {spread * 100:.0f} points ({how})")


def summary(result: Any) -> Any:
    """Formats best first: accuracy, interval, evaluations and the exact pattern."""
    t = _formats(result)
    cols = [c for c in ["format", "accuracy", "ci_low", "ci_high", "evaluations", "best",
                        "worst", "pattern"] if c in t.columns]
    return t.sort_values(["accuracy", "evaluations"], ascending=False)[cols].reset_index(
        drop=True)


def convergence(result: Any) -> Any:
    """The search's current best and worst accuracy estimates (posterior means) after each
    round, against evaluations spent."""
    import plotly.graph_objects as go

    if "trace" not in result.tables:
        from promptscope.errors import PromptscopeError

        if result.status != "done":
            raise PromptscopeError("This spread stopped before its search trace was saved; "
                                   "figure() shows the formats it evaluated.")
        raise PromptscopeError("This spread has no search trace: it evaluated every format on "
                               "every row (a %%prompt --spread run), so there is nothing to "
                               "converge; figure() shows it.")
    tr = result.tables["trace"]
    fig = go.Figure([
        go.Scatter(x=tr["evaluations"], y=tr["best_mean"], name="best format (estimate)",
                   mode="lines", line={"color": "#2ca02c"}),
        go.Scatter(x=tr["evaluations"], y=tr["worst_mean"], name="worst format (estimate)",
                   mode="lines", line={"color": "#d62728"}),
    ])
    fig.update_layout(xaxis={"title": "evaluations spent"},
                      yaxis={"title": "posterior mean accuracy", "range": [0, 1.02]})
    return apply_style(fig, "Thompson sampling: best and worst format estimates")


def features_figure(result: Any) -> Any:
    """Mean accuracy of the formats having each feature value, minus the mean of all formats."""
    import plotly.graph_objects as go

    eff = result.tables.get("features")
    if eff is None:  # a search stopped before the end: from the formats it evaluated
        from promptscope.analyses.sensitivity.spread import feature_effects
        from promptscope.errors import PromptscopeError

        table = _formats(result)
        if "key" not in table:
            raise PromptscopeError("This spread stopped before its formats were saved; rerun "
                                   "it to see the feature effects.")
        eff = feature_effects(table)[0]
    fig = go.Figure()
    for feat, part in eff.groupby("feature", sort=False):
        fig.add_trace(go.Bar(
            name=feat, x=[f"{feat}={v!r}" for v in part["value"]], y=part["effect"],
            customdata=part["n_formats"],
            hovertemplate="%{x}<br>effect %{y:+.3f} (%{customdata} formats)<extra></extra>"))
    fig.update_layout(yaxis={"title": "accuracy difference from the mean format"},
                      xaxis={"title": "feature = value", "tickangle": 45},
                      legend_title="feature")
    return apply_style(fig, "Which atomic change matters: accuracy by feature value")


def scatter(a: Any, b: Any) -> Any:
    """Format accuracy of model ``a`` vs model ``b`` on the formats both evaluated (matched by
    their exact pattern); the title gives the Pearson and Spearman correlations.

    Example:
        >>> scatter(spread_model_a, spread_model_b)   # doctest: +SKIP
    """
    import plotly.graph_objects as go

    ta, tb = _formats(a), _formats(b)
    m = ta.merge(tb, on="key", suffixes=("_a", "_b"))
    m = m[(m["evaluations_a"] > 0) & (m["evaluations_b"] > 0)]
    name_a, name_b = a.model.get("name", "model A"), b.model.get("name", "model B")
    if name_a == name_b:
        name_a, name_b = f"{name_a} (A)", f"{name_b} (B)"
    pearson = m["accuracy_a"].corr(m["accuracy_b"]) if len(m) > 1 else float("nan")
    # Spearman = Pearson on ranks (pandas' method="spearman" needs scipy)
    spearman = m["accuracy_a"].rank().corr(m["accuracy_b"].rank()) if len(m) > 1 \
        else float("nan")
    fig = go.Figure(go.Scatter(
        x=m["accuracy_a"], y=m["accuracy_b"], mode="markers", marker={"size": 9},
        customdata=[hover_lines(p) for p in m["pattern_a"]],
        hovertemplate="A %{x:.3f} · B %{y:.3f}<br>%{customdata}<extra></extra>"))
    fig.add_shape(type="line", x0=0, y0=0, x1=1, y1=1, line={"dash": "dot", "color": "#aaa"})
    fig.update_layout(xaxis={"title": f"accuracy, {name_a}", "range": [0, 1.02]},
                      yaxis={"title": f"accuracy, {name_b}", "range": [0, 1.02]})
    return apply_style(fig, f"Format accuracy, model vs model ({len(m)} formats): Pearson "
                            f"{pearson:.2f}, Spearman {spearman:.2f}")
