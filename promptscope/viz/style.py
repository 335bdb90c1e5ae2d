"""One look for every promptscope figure, and offline display.

Figures never load plotly.js from a CDN: in JupyterLab they render through plotly's own
mimetype extension (shipped in the plotly wheel), so they work on air-gapped boxes.
"""

from __future__ import annotations

from typing import Any


def apply_style(fig: Any, title: str) -> Any:
    """Common title, margins and template; the title, the traces' names and their text
    categories (variants, tokens, formats: a prompt's own text) shown as they are
    (:func:`plain`)."""
    for trace in fig.data:
        for axis in ("x", "y"):
            values = trace[axis] if axis in trace else None
            if values is not None and any(isinstance(v, str) for v in values):
                trace[axis] = [None if _missing(v) else plain(v) for v in values]
        if isinstance(trace.name, str):
            trace.name = plain(trace.name)
    legend_on_top = fig.layout.legend.orientation == "h" and (fig.layout.legend.y or 0) >= 1
    fig.update_layout(title={"text": plain(title), "x": 0.01}, template="plotly_white",
                      margin={"l": 60, "r": 20, "t": 85 if legend_on_top else 50, "b": 60},
                      hoverlabel={"namelength": -1})
    return fig


def hover_lines(text: str) -> str:
    """A prompt's text for hover boxes: shown as typed, its newlines as ``⏎`` and a line break,
    its tabs as ``⇥``."""
    return plain(text).replace("\n", "⏎<br>").replace("\t", "⇥")


def _missing(value: Any) -> bool:
    """pandas' NA (a "string" column's gap), which plotly cannot compare."""
    return type(value).__name__ == "NAType"


def plain(text: Any) -> Any:
    """``text`` to show as it is in a figure: plotly reads ``<b>``, ``<br>``, ``<s>``... in
    labels as markup (a Llama prompt's ``<s>Paris`` would come out struck through), so ``&``,
    ``<`` and ``>`` become the entities plotly turns back into those characters."""
    if not isinstance(text, str):
        return text
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

