"""A widget that shows one plotly figure without embedding plotly.js in the widget.

``plotly.graph_objects.FigureWidget`` is an anywidget whose front-end module is the whole
plotly.js bundle (about 4.6 MB), saved again in the notebook's widget state for *every* figure
widget: a notebook with a few explorers grew to 25 MB. ``FigureBox`` is an ``ipywidgets.Output``
whose ``outputs`` hold the figure as a plotly mime bundle instead; JupyterLab renders it with the
plotly renderer that the plotly package installs (bundled, no CDN), so the saved state holds only
the figure's JSON.

The bundle is set as the widget's state rather than displayed inside ``with output:``: capture
routes messages by the running cell's id, and nbclient, under load, then sometimes waited its
whole cell timeout (600 s) for a cell that had finished.
"""

from __future__ import annotations

import html
from typing import Any

import ipywidgets as w


class FigureBox(w.Output):
    """An output area holding one plotly figure; :meth:`show` replaces it.

    Example:
        >>> box = FigureBox(go.Figure(go.Bar(y=[1, 2])))          # doctest: +SKIP
        >>> box.show(other_figure)                                # doctest: +SKIP
    """

    def __init__(self, figure: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.figure: Any = None
        if figure is not None:
            self.show(figure)

    def show(self, figure: Any) -> None:
        """Replace the shown figure (kept as :attr:`figure` for code and tests)."""
        import plotly.io as pio

        self.figure = figure
        bundle = pio.renderers["plotly_mimetype"].to_mimebundle(figure.to_dict())
        title = html.unescape(figure.layout.title.text or "untitled")  # (escaped: style.plain)
        bundle["text/plain"] = f"<plotly figure: {title}>"
        self.outputs = ({"output_type": "display_data", "data": bundle, "metadata": {}},)

    def clear(self) -> None:
        """Show nothing (a new run has no figure yet)."""
        self.figure = None
        self.outputs = ()


def row_wrap() -> w.Layout:
    """A row of figures that wraps onto the next line where the notebook is too narrow for
    them side by side (two 700 px figures do not fit a 1000 px cell)."""
    return w.Layout(flex_flow="row wrap")
