"""The FormatSpread widget: pick the budget, the number of formats and the model, run, and watch
the Thompson-sampling search converge (accuracy estimates per format and the best/worst trace
redrawn after every round)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ipywidgets as w
import plotly.graph_objects as go

from promptscope.viz.style import apply_style
from promptscope.widgets._figure import FigureBox, row_wrap
from promptscope.widgets._status import shows_errors


class SpreadWidget(w.VBox):
    """Run :func:`promptscope.format_spread` interactively and watch the bandit.

    Args:
        data: the labelled DataFrame (input columns and ``label``).
        models: the models to offer (loaded models or names; default: the models loaded).
        budget: the initial budget as a fraction of exhaustive evaluation.
        n_formats: the initial number of formats.
        kwargs: passed to :func:`promptscope.format_spread` (``label``, ``shots``, ``grammar``...).

    After a run, ``widget.result`` is the run's :class:`~promptscope.result.Result`.

    Example:
        >>> from promptscope.widgets import SpreadWidget
        >>> SpreadWidget(df, models=["organism"], shots=3)      # doctest: +SKIP
    """

    def __init__(self, data: Any, models: Sequence[Any] | None = None, *, budget: float = 0.25,
                 n_formats: int = 16, **kwargs: Any) -> None:
        from promptscope.models import loaded_models

        self.data, self.kwargs = data, kwargs
        self.models = {(m if isinstance(m, str) else m.name): m
                       for m in (models or loaded_models())}
        self.result: Any = None
        self.model = w.Dropdown(options=list(self.models), description="model")
        # in percent: a readout of "30%" that one edits by typing takes 50 for 50 %
        self.budget = w.IntSlider(value=round(budget * 100), min=5, max=100, step=5,
                                  description="budget %", continuous_update=False)
        self.n_formats = w.IntSlider(value=n_formats, min=2, max=64, description="formats",
                                     continuous_update=False)
        self.run_button = w.Button(description="Run", button_style="primary", icon="play")
        self.status = w.HTML("Pick a budget (share of every format x example), the number of "
                             "formats and a model, then Run.")
        self.accuracy = FigureBox()  # plotly mime output, no plotly.js in the widget state
        self.trace = FigureBox()
        self.run_button.on_click(shows_errors(self.status, lambda _: self.run()))
        super().__init__([w.HBox([self.model, self.n_formats, self.budget, self.run_button]),
                          self.status,
                          w.HBox([self.accuracy, self.trace], layout=row_wrap())])

    def run(self) -> Any:
        """Run the search with the current settings, redrawing after every round."""
        import promptscope

        self._history: list[tuple[int, float, float]] = []
        self.status.value = "Running…"
        self.result = promptscope.format_spread(
            self.data, self.models[self.model.value], formats=self.n_formats.value,
            budget=self.budget.value / 100 if self.budget.value < 100 else None,
            on_round=self._draw, progress=False, **self.kwargs)
        p = self.result.params
        self.status.value = (f"<b>spread {p['spread'] * 100:.0f} points</b>: worst format "
                             f"#{p['worst']['format']} {p['interval'][0]:.2f}, best "
                             f"#{p['best']['format']} {p['interval'][1]:.2f}; "
                             f"{p['evaluations']} of {p['exhaustive_evaluations']} evaluations "
                             f"({p['fraction_of_exhaustive']:.0%})"
                             + (f", + {p['report_evaluations']} to measure these two on every "
                                "example" if p.get("report_evaluations") else "")
                             + (f"; session <code>{self.result.session_id}</code>"
                                if self.result.session_id else ""))
        return self.result

    def _draw(self, bandit: Any) -> None:
        """Redraw from the search's state (called after each round)."""
        from promptscope.analyses.sensitivity.bandit import wilson_interval

        mean = bandit.posterior_mean()
        scored = bandit.scored  # failed evaluations are in no format's accuracy
        lo, hi = wilson_interval(bandit.successes, scored)
        best, worst = bandit.best(), bandit.worst()
        colors = ["#2ca02c" if f == best else "#d62728" if f == worst else
                  "#7f7f7f" if n else "#dddddd" for f, n in enumerate(scored)]
        seen = scored > 0
        nan = float("nan")
        self._history.append((bandit.spent, float(mean[best]) if best >= 0 else nan,
                              float(mean[worst]) if worst >= 0 else nan))
        spent, b, wv = zip(*self._history)
        # Figures are built once and their traces updated in place: rebuilding a styled
        # layout every round costs far more than the scoring on small models.
        acc, trace = self._figures()
        with acc.batch_update():
            bar = acc.data[0]
            bar.x, bar.y, bar.marker.color, bar.customdata = (
                [f"#{f}" for f in range(len(mean))], mean, colors, scored)
            bar.error_y = {"type": "data", "symmetric": False,
                           "array": [h - m if k else 0 for h, m, k in zip(hi, mean, seen)],
                           "arrayminus": [m - lo_ if k else 0
                                          for lo_, m, k in zip(lo, mean, seen)]}
        with trace.batch_update():
            trace.data[0].x, trace.data[0].y = spent, b
            trace.data[1].x, trace.data[1].y = spent, wv
        self.accuracy.show(acc)
        self.trace.show(trace)
        self.status.value = (f"Running… {bandit.spent} evaluations, "
                             f"{int(seen.sum())} formats seen")

    def _figures(self) -> tuple[Any, Any]:
        if getattr(self, "_figs", None) is None:
            acc = go.Figure(go.Bar(
                hovertemplate="format %{x}: %{y:.3f} (n=%{customdata})<extra></extra>"))
            acc.update_layout(_layout("Accuracy estimate per format", "format",
                                      "posterior mean accuracy"))
            trace = go.Figure([go.Scatter(name="best", line={"color": "#2ca02c"}),
                               go.Scatter(name="worst", line={"color": "#d62728"})])
            trace.update_layout(_layout("Best and worst estimates", "evaluations spent",
                                        "accuracy"))
            self._figs = (acc, trace)
        return self._figs


def _layout(title: str, x: str, y: str) -> Any:
    fig = apply_style(go.Figure(), title)
    fig.update_layout(xaxis={"title": x}, yaxis={"title": y, "range": [0, 1.02]}, width=480,
                      height=340, showlegend=False)
    return fig.layout
