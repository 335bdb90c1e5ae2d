"""One look for every promptscope figure, and offline display.

Figures never load plotly.js from a CDN: in JupyterLab they render through plotly's own
mimetype extension (shipped in the plotly wheel), so they work on air-gapped boxes.
"""

from __future__ import annotations

from typing import Any


def apply_style(fig: Any, title: str) -> Any:
    """Common title, margins and template."""
    fig.update_layout(title={"text": title, "x": 0.01}, template="plotly_white",
                      margin={"l": 60, "r": 20, "t": 50, "b": 60}, hoverlabel={"namelength": -1})
    return fig

