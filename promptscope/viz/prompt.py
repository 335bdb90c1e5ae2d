"""Tables and figures for ``prompt`` runs (``%%prompt`` / ``run_prompt``)."""

from __future__ import annotations

from typing import Any

from promptscope.viz.style import apply_style, plain

_FIXED = ["variant", "prompt", "choice", "logprob", "prob", "rank", "chosen", "n_tokens",
          "tokens", "time_ms", "target", "logprob_per_token", "sample", "output",
          "finish_reason", "error", "key_sentence", "key_similarity"]


def label_columns(df: Any) -> list[str]:
    """The columns that say what each variant chose (row, variables, alternatives groups)."""
    return [c for c in df.columns if c not in _FIXED]


def variant_labels(df: Any, template: str | None = None) -> Any:
    """A short text label per row of ``df``: what tells its variant apart, joined with ' · '.

    With the run's ``template`` only its own variables and alternatives groups count (columns
    carried along from the rows, such as a gold answer, are left out); the row label only where
    nothing else tells the variants apart. An empty alternative shows as '∅', and long values
    are cut so that a label stays near 60 characters.
    """
    names = _template_names(template)
    cols = [c for c in label_columns(df) if df[c].nunique(dropna=False) > 1
            and (names is None or c in names or c in ("row", "steered"))]
    keep = [c for c in cols if c != "row"]
    labels = _joined(df, keep) if keep else None
    if "row" in cols and (labels is None or _ambiguous(df, labels)):
        keep = ["row", *keep]
        labels = _joined(df, keep)
    if labels is None:
        return df["variant"].map(lambda i: f"#{i}")
    if _ambiguous(df, labels):
        # values cut alike ("Answer the following qu…"): the variant number tells them apart
        labels = "#" + df["variant"].astype(str) + " " + labels
    return labels


def _template_names(template: str | None) -> set[str] | None:
    """The variables and groups of ``template`` (None: not given, or it does not parse)."""
    if not template:
        return None
    from promptscope.errors import TemplateError
    from promptscope.templates import parse_template

    try:
        tpl = parse_template(template)
    except TemplateError:
        return None
    return set(tpl.variables) | {g.name for g in tpl.groups}


def _joined(df: Any, cols: list[str]) -> Any:
    """The columns' values as text (cut to fit, '∅' for empty), joined with ' · '; whole
    columns at a time (a run has thousands of rows)."""
    width = max(10, min(24, 60 // len(cols)))
    parts = []
    for c in cols:
        if c == "steered":
            parts.append(df[c].map({True: "steered", False: "plain"}).astype(str))
            continue
        # object first: a categorical column would refuse the new texts; NaN: "nan"
        # (astype(str) keeps it missing in pandas 3)
        text = df[c].astype(object).map(str)
        cut = text.str.len() > width
        text = text.where(~cut, text.str[: width - 1] + "…")
        parts.append(text.mask(df[c].astype(object).eq(""), "∅"))
    labels = parts[0]
    for part in parts[1:]:
        labels = labels + " · " + part
    return labels


def _ambiguous(df: Any, labels: Any) -> bool:
    """Whether two variants share a label."""
    return bool(df["variant"].groupby(labels.to_numpy()).nunique().gt(1).any())


def summary(result: Any) -> Any:
    """One row per variant (and steering condition): labels, prompt, the answer and each
    choice's probability."""
    df = result.df
    mode = result.params.get("mode")
    keys = ["variant"] + (["steered"] if "steered" in df.columns else [])
    labels = [c for c in label_columns(df) if c not in keys]
    if mode == "choices":
        wide = df.pivot_table(index=keys, columns="choice", values="prob", sort=False)
        wide.columns = [f"p({c!r})" for c in wide.columns]
        # every variant, also one whose scoring failed (no choice chosen: its error shows)
        best = df.sort_values("chosen", ascending=False, kind="stable").drop_duplicates(keys)
        best = best.set_index(keys).loc[df.drop_duplicates(keys).set_index(keys).index]
        failed = ~best["chosen"].astype(bool)
        best.loc[failed, ["choice", "prob"]] = None
        extra = ["error"] if "error" in best.columns and best["error"].notna().any() else []
        out = best[labels + ["prompt", "choice", "prob", "time_ms", *extra]].rename(
            columns={"choice": "top_choice", "prob": "p(top_choice)"})
        return out.join(wide).reset_index()
    if mode == "target":
        return df.drop(columns=["tokens"])
    return df


#: A run's figure shows at most this many variants: a 250 k-variant heatmap was a 17 MB figure
#: that froze JupyterLab for seconds, with far more rows than pixels.
MAX_VARIANTS_SHOWN = 2000


def figure(result: Any) -> Any:
    """Probability of each choice per variant (choices), log-prob per variant (target)."""
    import plotly.graph_objects as go

    df = result.df
    mode = result.params.get("mode")
    if mode not in ("choices", "target"):
        return None  # generation: the outputs are text, read in the table
    x = variant_labels(df, result.params.get("template"))
    names = x.unique()
    note = ""
    if len(names) > MAX_VARIANTS_SHOWN:  # more rows than a figure has pixels: the first ones
        shown = x.isin(names[:MAX_VARIANTS_SHOWN])
        df, x = df[shown], x[shown]
        note = f" (the first {MAX_VARIANTS_SHOWN:,} of {len(names):,} variants; .df has all)"
    if mode == "choices":
        choices = result.params["choices"]
        n_variants = len(x.unique())
        if n_variants > 40:  # too many bars to read: a heatmap, variants down the side
            # every variant, a failed one too (its row stays empty)
            wide = df.assign(label=x).pivot_table(index="label", columns="choice", values="prob",
                                                  sort=False, dropna=False).reindex(
                index=list(dict.fromkeys(x)), columns=choices)
            fig = go.Figure(go.Heatmap(z=wide.values, x=[repr(c) for c in choices],
                                       y=list(wide.index), colorscale="Viridis", zmin=0, zmax=1,
                                       colorbar={"title": "p"},
                                       hovertemplate="%{y}<br>%{x}: %{z:.3f}<extra></extra>"))
            fig.update_layout(height=min(1200, 200 + 14 * n_variants),
                              xaxis_title="choice", yaxis_title="variant")
        else:
            fig = go.Figure([
                go.Bar(name=repr(c), x=x[df["choice"] == c], y=df.loc[df["choice"] == c, "prob"],
                       hovertemplate="%{x}<br>p=%{y:.3f}<extra>" + plain(repr(c)) + "</extra>")
                for c in choices
            ])
            fig.update_layout(barmode="group", yaxis={"title": "probability", "range": [0, 1]},
                              xaxis_title="variant", legend_title="choice",
                              **_room_for_labels(x))
        return apply_style(fig, "Choice probability per variant" + note)
    fig = go.Figure(go.Bar(x=x, y=df["logprob"],
                           hovertemplate="%{x}<br>log p=%{y:.3f}<extra></extra>"))
    fig.update_layout(yaxis_title=f"log p({plain(repr(result.params.get('target')))})",
                      xaxis_title="variant")
    return apply_style(fig, "Target log-probability per variant" + note)


def plain_vs_steered(run: Any) -> Any:
    """Choice probabilities of a ``compare`` run (``steer={..., "compare": True}``): one bar per
    variant, choice and steered/plain."""
    import plotly.graph_objects as go

    df = run.df.assign(label=variant_labels(run.df.assign(steered=False),
                                            run.params.get("template")))
    fig = go.Figure([
        go.Bar(name=f"{'steered' if s else 'plain'} {c!r}", x=part["label"], y=part["prob"],
               hovertemplate="%{x}<br>p=%{y:.3f}<extra></extra>")
        for (s, c), part in df.groupby(["steered", "choice"], sort=True)
    ])
    fig.update_layout(barmode="group", yaxis={"title": "probability", "range": [0, 1]},
                      xaxis_title="variant", **_room_for_labels(df["label"]))
    return apply_style(fig, "Answer probabilities, plain vs steered")


def _room_for_labels(labels: Any) -> dict[str, Any]:
    """Layout that keeps the bars readable under long, slanted variant labels: taller with
    the labels' length, and the legend in a row above the plot rather than a scrolled column."""
    longest = int(labels.astype(str).str.len().max()) if len(labels) else 0
    return {"height": 420 + min(240, 4 * longest),
            "legend": {"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0}}
