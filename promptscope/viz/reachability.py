"""Figures and tables for reachability runs: k-epsilon curves beside the singular-value bound,
and the rank of each target over the search steps."""

from __future__ import annotations

from typing import Any

from promptscope.viz.style import apply_style

_COLORS = {"true": "#2ca02c", "top": "#1f77b4", "random": "#ff7f0e", "bottom": "#d62728",
           "given": "#9467bd"}
_NAMES = {"true": "true next token", "top": "top-n most likely", "random": "random tokens",
          "bottom": "least likely", "given": "given targets"}


def figure(result: Any) -> Any:
    """k-epsilon curves (fraction of targets reached with at most k control tokens, per target
    set, with the paper's headline as a reference line) and, when the run has it, the
    singular-value bound per attention layer."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from promptscope.analyses.reachability import PAPER_HEADLINE, k_epsilon

    k_max = int(result.params.get("k_max", 1))
    table = k_epsilon(result.df, k_max, int(result.params.get("k_min", 1)))
    bound = result.tables.get("bound")
    has_bound = bound is not None and len(bound)
    fig = make_subplots(rows=1, cols=2 if has_bound else 1, column_widths=[0.6, 0.4]
                        if has_bound else None, subplot_titles=(
                            "k-epsilon: fraction of targets reached",
                            f"bound per attention layer (k={k_max})") if has_bound else None)
    for tset, g in table.groupby("target_set", sort=False):
        fig.add_trace(go.Scatter(
            x=g["k"], y=g["reached"], mode="lines+markers", name=f"{_NAMES.get(tset, tset)} "
            f"(n={int(g['n'].iloc[0])})", line={"color": _COLORS.get(tset)}, line_shape="hv",
            hovertemplate="k ≤ %{x}: %{y:.0%} reached<extra>" + str(tset) + "</extra>"),
            row=1, col=1)
    ref = PAPER_HEADLINE["fraction"]
    fig.add_trace(go.Scatter(
        x=[0, max(k_max, 1)], y=[ref, ref], mode="lines", line={"dash": "dash", "color": "gray"},
        name=f"paper: true next token {ref:.0%} at k ≤ {PAPER_HEADLINE['k']} (7B-40B LLMs)",
        hoverinfo="name"), row=1, col=1)
    fig.update_yaxes(range=[-0.02, 1.02], tickformat=".0%", title_text="reached (1 - ε)",
                     row=1, col=1)
    fig.update_xaxes(title_text="k (control tokens)", dtick=1, row=1, col=1)
    if has_bound:
        from promptscope.analyses.reach_bound import layer_summary

        summ = layer_summary(bound)
        summ = summ[summ["k"] == summ["k"].max()]
        fig.add_trace(go.Bar(x=[f"L{int(x)}" for x in summ["layer"]], y=summ["shift_bound"],
                             name="bound on the control's shift of the attention output",
                             marker_color="#8c564b",
                             customdata=summ[["beta_max"]].values,
                             hovertemplate="%{x}: shift ≤ %{y:.3g}, β ≤ %{customdata[0]:.3f}"
                                           "<extra></extra>"), row=1, col=2)
        fig.add_trace(go.Scatter(x=[f"L{int(x)}" for x in summ["layer"]], y=summ["resid_norm"],
                                 mode="markers", marker={"symbol": "line-ew-open", "size": 18,
                                                         "color": "black"},
                                 name="residual-stream norm (scale)"), row=1, col=2)
        fig.update_yaxes(title_text="norm", row=1, col=2)
    return apply_style(fig, f"Reachability · {result.params.get('method')} · "
                            f"k ≤ {k_max} · {_n_pairs(result.df)} (x0, target) pairs")


def _n_pairs(df: Any) -> int:
    """Distinct searched pairs (``df`` has a row per pair and target set, so a pair two sets
    share has two rows)."""
    return int(df["pair"].nunique()) if "pair" in df else len(df)


def rank_figure(result: Any, pairs: list[int] | None = None, max_pairs: int = 24) -> Any:
    """Rank of each target (1 = argmax) over the search steps, log scale, one line per pair.

    Example:
        >>> promptscope.viz.reachability.rank_figure(run)                     # doctest: +SKIP
    """
    import plotly.graph_objects as go

    trace = result.tables.get("trace")
    fig = go.Figure()
    if trace is None or not len(trace):
        return apply_style(fig, "Rank of the target over steps (no steps were needed)")
    df = result.df.drop_duplicates("pair").set_index("pair")  # one row per searched pair
    ids = pairs if pairs is not None else list(dict.fromkeys(trace["pair"]))[:max_pairs]
    for pid in ids:
        t = trace[trace["pair"] == pid].sort_values("step")
        if not len(t) or pid not in df.index:
            continue
        row = df.loc[pid]
        x = [0, *t["step"].tolist()]
        y = [int(row["base_rank"]), *t["rank"].tolist()]
        fig.add_trace(go.Scatter(
            x=x, y=y, mode="lines+markers", line={"color": _COLORS.get(row["target_set"])},
            name=f"{row['target']!r} after {_short(row['x0'])}"
                 f"{' ✓' if row['reached'] else ''}",
            hovertemplate="step %{x}: rank %{y}<extra></extra>"))
    fig.update_yaxes(type="log", autorange="reversed", title_text="rank of target (1 = argmax)")
    fig.update_xaxes(title_text="search step")
    return apply_style(fig, "Rank of the target over search steps")


def summary(result: Any) -> Any:
    """Per target set: pairs, fraction reached, reached with k <= 1, mean smallest k, median
    rank of the target before and after control."""
    import pandas as pd

    df = result.df
    rows = []
    for tset, g in df.groupby("target_set", sort=False):
        hit = g[g["reached"]]
        rows.append({"target_set": tset, "pairs": len(g), "reached": round(g["reached"].mean(), 3),
                     # (a search from k_min > 1 never tried one token)
                     "reached_k<=1": round((g["reached"] & (g["k"] <= 1)).mean(), 3)
                     if result.params.get("k_min", 1) <= 1 else None,
                     "mean_k": round(float(hit["k"].mean()), 2) if len(hit) else None,
                     "median_rank_before": float(g["base_rank"].median()),
                     "median_rank_after": float(g["rank"].median())})
    return pd.DataFrame(rows)


def _short(text: str, width: int = 18) -> str:
    text = str(text)
    return text if len(text) <= width else "…" + text[-(width - 1):]
