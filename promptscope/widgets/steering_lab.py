"""The steering lab: pick a method (PASTA or a steering vector), its strength and layers, and see
the answer probabilities of a template's variants before and after, beside the accuracy versus
side-effect curve of a saved comparison."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ipywidgets as w

from promptscope.viz.prompt import plain_vs_steered
from promptscope.viz.style import plain
from promptscope.widgets._figure import FigureBox, row_wrap
from promptscope.widgets._status import shows_errors
from promptscope.widgets.steering import answers_status


class SteeringLab(w.VBox):
    """Try PASTA and steering vectors side by side on one template.

    Args:
        template: the template (``<<...>>`` marks what PASTA emphasises; vector steering needs
            no marks).
        model: a loaded local model.
        choices: the answers to compare (``" yes| no"`` or a list).
        vars: rows for the template's variables.
        vectors: name -> SteeringVector offered besides PASTA.
        comparison: a ``compare_steering`` Result whose accuracy/side-effect curve is shown;
            a star marks where the current setting falls on the curve of the method with the
            same label (read off the measured points, interpolated between them).
        heads: PASTA's heads.

    Example:
        >>> SteeringLab(TEMPLATE, model, choices=colors, vars=rows.head(4),
        ...             vectors={"CAA": caa, "ICV": icv}, comparison=cmp)    # doctest: +SKIP
    """

    def __init__(self, template: str, model: Any, *, choices: Any, vars: Any = None,
                 vectors: Mapping[str, Any] | None = None, comparison: Any = None,
                 heads: str = "all") -> None:
        self.template, self.model, self.choices, self.rows = template, model, choices, vars
        self.vectors = dict(vectors or {})
        self.heads = heads
        self.method = w.Dropdown(options=["PASTA", *self.vectors], description="method")
        self.alpha = w.FloatLogSlider(value=0.01, base=10, min=-5, max=0, step=0.25,
                                      description="alpha", continuous_update=False,
                                      readout_format=".1e")
        self.strength = w.FloatSlider(value=1.0, min=0.0, max=8.0, step=0.25,
                                      description="strength", continuous_update=False)
        n_layers = int(model.text_config.num_hidden_layers)
        self.layers = w.SelectMultiple(options=list(range(n_layers)), description="layers",
                                       rows=min(n_layers, 6))
        self.status = w.HTML()
        self.answers = FigureBox()
        self.comparison = comparison
        self.curve = FigureBox()
        self._on_change = shows_errors(self.status, self.update)
        for control in (self.method, self.alpha, self.strength, self.layers):
            control.observe(self._on_change, names="value")
        self._sync_controls()
        self.update()
        super().__init__([w.HBox([self.method, self.alpha, self.strength, self.layers]),
                          self.status, w.HBox([self.answers, self.curve], layout=row_wrap())])

    def _sync_controls(self) -> None:
        vector = self.method.value != "PASTA"
        self.alpha.layout.display = "none" if vector else None
        self.strength.layout.display = None if vector else "none"
        self.layers.layout.display = None if vector else "none"
        if vector:
            have = self.vectors[self.method.value].layers
            # the layers the comparison measured this vector at, so the star sits on its curve
            compared = [layer for layer in self._compared().get("layers") or have
                        if layer in have] or have
            self.layers.unobserve(self._on_change, names="value")
            self.layers.options = have
            self.layers.value = tuple(compared)
            self.layers.observe(self._on_change, names="value")

    def _compared(self) -> dict[str, Any]:
        """The current method's settings in the comparison (empty without one)."""
        if self.comparison is None:
            return {}
        return self.comparison.params.get("methods", {}).get(self.method.value, {})

    def _off_curve(self) -> bool:
        """Whether the current layers differ from those the comparison measured."""
        layers = self._compared().get("layers")
        return (self.method.value != "PASTA" and layers is not None
                and sorted(self.layers.value) != sorted(layers))

    def steering(self) -> dict[str, Any]:
        """The ``steer=`` options of the current controls."""
        if self.method.value == "PASTA":
            return {"heads": self.heads, "alpha": self.alpha.value}
        return {"method": "vector", "vector": self.vectors[self.method.value],
                "strength": self.strength.value, "layers": list(self.layers.value)}

    def current_strength(self) -> float:
        """The current setting on the comparison's strength axis (PASTA: 1/alpha)."""
        if self.method.value == "PASTA":
            return 1.0 / self.alpha.value
        return float(self.strength.value)

    def curve_figure(self) -> Any:
        """The comparison's figure with a star at the current setting of the current method."""
        import numpy as np
        import plotly.graph_objects as go

        fig = self.comparison.figure()
        part = self.comparison.df[self.comparison.df["method"] == self.method.value]
        part = part.sort_values("strength")
        if part.empty:
            return fig
        x = self.current_strength()
        if self._off_curve():
            return fig  # measured at other layers: the curve says nothing of this setting
        if x <= 0 and bool((self.comparison.df["strength"] > 0).all()):
            return fig  # strength 0 (no steering) lies off the log axis: no star to place
        log = bool((part["strength"] > 0).all()) and x > 0
        xs = np.log(part["strength"]) if log else part["strength"]
        at = float(np.log(x)) if log else x

        def read(col: str) -> float:
            return float(np.interp(at, xs, part[col]))

        gain = read("d_accuracy")
        star = {"symbol": "star", "size": 16, "color": "black"}
        fig.add_trace(go.Scatter(x=[x], y=[gain], mode="markers", marker=star,
                                 name="current setting", hovertext=[
                                     f"{plain(self.method.value)} at {x:g}: gain "
                                     f"{gain:+.3f} "
                                     "(read off the curve)"], hoverinfo="text"), row=1, col=1)
        cost = next((c for c in ("d_text", "d_control") if c in part), None)
        if cost is not None:
            fig.add_trace(go.Scatter(x=[-read(cost)], y=[gain], mode="markers", marker=star,
                                     showlegend=False, hoverinfo="skip"), row=1, col=2)
        return fig

    def update(self, change: Any = None) -> None:
        """Re-run plain and steered on the current settings and redraw the answers."""
        import promptscope

        if change is not None and change.get("owner") is self.method:
            self._sync_controls()
        if self.method.value != "PASTA" and not self.layers.value:
            self.status.value = "<b>Pick at least one layer</b> to add the vector at."
            return
        run = promptscope.run_prompt(self.template, self.model, vars=self.rows,
                                     choices=self.choices, save=False, progress=False,
                                     steer={**self.steering(), "compare": True})
        self.last = run
        self.answers.show(plain_vs_steered(run))
        if self.comparison is not None:
            self.curve.show(self.curve_figure())
        self.status.value = answers_status(self.method.value, run) + (
            " · (not the layers the comparison measured: no star on its curve)"
            if self.comparison is not None and self._off_curve() else "")
