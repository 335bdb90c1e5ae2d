"""Figures for ``attribution`` results: the prompt as a heatmap, a bar per part, and how a part's
attribution moves across variants.

The heatmap is plain HTML and CSS (escaped text, a background colour per part or token, the value
on hover through the ``title`` attribute): no script, no CDN, so it renders in any notebook
viewer and in exported HTML.
"""

from __future__ import annotations

import html
import math
from typing import Any

from promptscope.viz.style import apply_style

#: Colours of positive (the part raises the target's log-prob) and negative attribution.
POSITIVE = (214, 39, 40)
NEGATIVE = (31, 119, 180)


def _unit(result: Any) -> str:
    """What the rows are: ``part`` (parts level) or ``token``."""
    return "token" if result.params.get("level") == "tokens" else "part"


def _pick(df: Any, variant: int | None, steered: bool | None, target: str | None) -> Any:
    """Rows of one variant x condition x target (defaults: the first of each)."""
    if variant is None:
        variant = int(df["variant"].iloc[0])
    rows = df[df["variant"] == variant]
    if "steered" in rows.columns:
        want = rows["steered"].iloc[0] if steered is None else steered
        rows = rows[rows["steered"] == want]
    if target is None:
        # choices: the chosen answer, else the first target
        target = rows["target"].iloc[0]
        if "chosen" in rows.columns and rows["chosen"].any():
            target = rows[rows["chosen"]]["target"].iloc[0]
    return rows[rows["target"] == target]


def heatmap_html(result: Any, variant: int | None = None, steered: bool | None = None,
                 target: str | None = None) -> str:
    """The prompt with each part (or token) coloured by its attribution, as an HTML string.

    Red raises the target's log-prob, blue lowers it; the strongest feature of the variant has
    full colour. Hover shows the part name and value.

    Example:
        >>> from IPython.display import HTML
        >>> HTML(heatmap_html(att, variant=0))                       # doctest: +SKIP
    """
    rows = _pick(result.df, variant, steered, target)
    if rows.empty:
        return "<div>(no rows)</div>"
    tokens = _unit(result) == "token"
    rows = rows.sort_values("position" if tokens else "segment")
    values = [v for v in rows["attribution"] if not math.isnan(v)]
    scale = max((abs(v) for v in values), default=0.0) or 1.0
    spans = []
    for _, r in rows.iterrows():
        piece = r["token"] if tokens else r["text"]
        a = r["attribution"]
        name = r["part"]
        if math.isnan(a):
            style, tip = "outline:1px dashed #888;", f"{name}: the target"
        else:
            rgb = POSITIVE if a >= 0 else NEGATIVE
            style = f"background:rgba({rgb[0]},{rgb[1]},{rgb[2]},{abs(a) / scale:.3f});"
            tip = f"{name}: {a:+.4f} (share {r['share']:+.1%})"
        spans.append(f'<span title="{html.escape(tip)}" style="{style}border-radius:2px">'
                     f"{html.escape(str(piece))}</span>")
    first = rows.iloc[0]
    cond = ""
    if "steered" in rows.columns:
        cond = " · steered (PASTA)" if first["steered"] else " · plain"
    head = (f"variant {int(first['variant'])}{cond} · target {html.escape(repr(first['target']))}"
            f" · log-prob {first['logprob']:.3f} · {html.escape(str(first['method']))}")
    return ('<div class="promptscope-attribution" style="font-family:monospace;'
            'line-height:1.7">'
            f'<div style="font-size:85%;color:#555">{head}</div>'
            f'<div style="white-space:pre-wrap">{"".join(spans)}</div>'
            '<div style="font-size:80%;color:#555"><span style="background:rgba(214,39,40,.6)">'
            "&nbsp;raises&nbsp;</span> <span style=\"background:rgba(31,119,180,.6)\">"
            "&nbsp;lowers&nbsp;</span> the target's log-prob (hover for values)</div></div>")


def heatmap(result: Any, variant: int | None = None, steered: bool | None = None,
            target: str | None = None) -> Any:
    """:func:`heatmap_html` as an IPython ``HTML`` object for display."""
    from IPython.display import HTML

    return HTML(heatmap_html(result, variant, steered, target))


def _chosen(df: Any) -> Any:
    """With ``--choices``: the rows of each variant's chosen answer (averaging in the other
    choices mixed opposite signs: a sentence that helps one answer hurts its rival)."""
    if "chosen" in df.columns and df["chosen"].any():
        return df[df["chosen"].astype(bool)]
    return df


def bar(result: Any, variant: int | None = None) -> Any:
    """Attribution per template part (mean over variants, or one variant; with choices, of
    each variant's chosen answer, as the heatmap shows); a bar per condition when the run
    compared plain and steered."""
    import plotly.graph_objects as go

    df = _chosen(result.df)
    if variant is not None:
        df = df[df["variant"] == variant]
    key = "segment_part" if _unit(result) == "token" else "part"
    order = list(dict.fromkeys(df[key]))
    groups = [(None, df)] if "steered" not in df.columns else [
        ("steered (PASTA)" if s else "plain", d) for s, d in df.groupby("steered", sort=True)]
    fig = go.Figure()
    for label, d in groups:
        # one value per variant x target x part (a repeated variable or a part's tokens summed)
        per = d.groupby(["variant", "target", key], sort=False)["attribution"].sum(min_count=1)
        mean = per.groupby(level=key).mean().reindex(order)
        fig.add_bar(x=order, y=mean.values, name=label or "attribution",
                    hovertemplate="%{x}: %{y:.4f}<extra>" + (label or "") + "</extra>")
    which = "mean over variants" if variant is None else f"variant {variant}"
    if df is not result.df:
        which = f"chosen answers, {which}"
    fig.update_layout(barmode="group", yaxis_title="attribution (log-prob)",
                      xaxis_title="template part",
                      showlegend=len(groups) > 1)
    return apply_style(fig, f"Attribution per part ({which}, {result.params.get('method')})")


def across_variants(result: Any, parts: list[str] | None = None, share: bool = False) -> Any:
    """How each part's attribution moves across variants (a line per part; dashed: steered;
    with choices, for each variant's chosen answer)."""
    import plotly.graph_objects as go

    df = _chosen(result.df)
    key = "segment_part" if _unit(result) == "token" else "part"
    col = "share" if share else "attribution"
    parts = parts or list(dict.fromkeys(df[key]))
    labels = _variant_labels(df, result.params.get("template"))
    fig = go.Figure()
    conds = [None] if "steered" not in df.columns else sorted(df["steered"].unique())
    for cond in conds:
        d = df if cond is None else df[df["steered"] == cond]
        # a part's rows added up per answer, then the mean over the answers (choices)
        per = (d.groupby(["variant", "target", key], sort=False)[col].sum(min_count=1)
               .groupby(level=["variant", key], sort=False).mean().unstack(key))
        for part in parts:
            if part not in per.columns:
                continue
            name = part if cond is None else f"{part} ({'steered' if cond else 'plain'})"
            fig.add_scatter(x=[labels.get(i, str(i)) for i in per.index], y=per[part].values,
                            mode="lines+markers", name=name,
                            line={"dash": "dash" if cond else "solid"},
                            hovertemplate="%{x}<br>" + part + ": %{y:.4f}<extra></extra>")
    fig.update_layout(xaxis_title="variant", yaxis_title=col)
    return apply_style(fig, f"Attribution {'share ' if share else ''}across variants")


def _variant_labels(df: Any, template: str | None) -> dict[int, str]:
    """Short labels per variant (:func:`promptscope.viz.prompt.variant_labels` of each
    variant's first row)."""
    from promptscope.viz.prompt import variant_labels

    first = df.drop_duplicates("variant")
    return dict(zip(first["variant"].astype(int), variant_labels(first, template), strict=True))


def figure(result: Any) -> Any:
    """The bar chart of attribution per part."""
    return bar(result)


def summary(result: Any) -> Any:
    """One row per variant x target (x condition): the attribution of each part as columns."""
    df = result.df
    key = "segment_part" if _unit(result) == "token" else "part"
    index = [c for c in ("variant", "steered", "target", "chosen", "logprob") if c in df.columns]
    # (a part without a value, e.g. target_part's own, stays NaN instead of summing to 0)
    per = df.groupby(index + [key], sort=False, dropna=False)["attribution"].sum(min_count=1)
    wide = per.unstack(key).reindex(df[index].drop_duplicates().set_index(index).index)
    wide = wide[list(dict.fromkeys(df[key]))]
    wide.columns = [f"attr({c})" for c in wide.columns]
    return wide.reset_index()


class _View:
    """What a displayed attribution Result shows: the heatmap of its first variant, then the bar
    chart (the plotly figure)."""

    def __init__(self, result: Any) -> None:
        self.result = result

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(heatmap(self.result))
        if "steered" in self.result.df.columns and self.result.df["steered"].nunique() > 1:
            display(heatmap(self.result, steered=True))
        display(self.result.figure())


def widget(result: Any) -> Any:
    """Shown under the result's table: the heatmap and the bar chart."""
    return _View(result)
