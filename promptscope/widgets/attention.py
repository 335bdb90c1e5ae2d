"""The attention explorer: pick variants, a layer and a head; see token x token heatmaps side by
side and the layer x head map of attention on a template part."""

from __future__ import annotations

from typing import Any

import ipywidgets as w

from promptscope.viz.attention import default_part, mass_heatmap, token_heatmap
from promptscope.widgets._figure import FigureBox, row_wrap
from promptscope.widgets._status import shows_errors

MEAN = -1  # the head dropdown's "mean over heads"


class AttentionExplorer(w.VBox):
    """Explore a :func:`promptscope.attention` result.

    Example:
        >>> att = promptscope.attention("Q: <<Ann lives in Rome.>> Where is Ann?")  # doctest: +SKIP
        >>> AttentionExplorer(att)                                                  # doctest: +SKIP
    """

    def __init__(self, result: Any, variants: list[int] | None = None) -> None:
        if result.kind != "attention":
            raise ValueError("AttentionExplorer needs a promptscope.attention(...) result.")
        if "weights" not in result.tables:
            raise ValueError("This result kept no matrices; run attention(..., matrices=True).")
        self.result = result
        df = result.df
        all_variants = sorted(df["variant"].unique().tolist())
        chosen = variants or all_variants[:2]
        labels = _variant_labels(result)
        self.variants = w.SelectMultiple(
            options=[(labels[v], v) for v in all_variants], value=tuple(chosen),
            description="variants", rows=min(4, len(all_variants)),
            layout=w.Layout(width="auto", min_width="420px"))
        self.layer = w.Dropdown(options=sorted(df["layer"].unique().tolist()),
                                description="layer")
        heads = sorted(df["head"].unique().tolist())
        # (a None value would show as nothing selected)
        self.head = w.Dropdown(options=[("mean", MEAN)] + [(f"h{h}", h) for h in heads],
                               description="head")
        parts = list(dict.fromkeys(df["part"]))
        self.part = w.Dropdown(options=parts, value=default_part(df), description="mass on")
        self.mass = FigureBox(mass_heatmap(result, self.part.value))
        self.tokens = w.HBox(layout=row_wrap())
        self.status = w.HTML()
        for control in (self.variants, self.layer, self.head):
            control.observe(shows_errors(self.status, self._draw_tokens), names="value")
        self.part.observe(shows_errors(self.status, self._draw_mass), names="value")
        self._draw_tokens()
        super().__init__([
            w.HBox([self.variants, w.VBox([self.layer, self.head])]),
            self.status,
            self.tokens,
            w.HBox([self.part]),
            self.mass,
        ])

    def _draw_tokens(self, _: Any = None) -> None:
        head = None if self.head.value == MEAN else self.head.value
        self.tokens.children = [FigureBox(token_heatmap(self.result, v, self.layer.value, head))
                                for v in self.variants.value]
        self.status.value = ""

    def _draw_mass(self, _: Any = None) -> None:
        self.mass.show(mass_heatmap(self.result, self.part.value))

def _variant_labels(result: Any) -> dict[int, str]:
    """'#variant' and what tells it apart (the template's variables and alternatives)."""
    from promptscope.viz.prompt import variant_labels

    first = result.df.drop_duplicates("variant")
    labels = variant_labels(first, result.params.get("template"))
    return {int(v): text if text == f"#{v}" or text.startswith(f"#{v} ") else f"#{v} {text}"
            for v, text in zip(first["variant"], labels, strict=True)}
