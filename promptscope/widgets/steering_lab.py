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
            same label (PASTA: the comparison's exclude-mode PASTA on the template's marks,
            whatever its label), read off the measured points, interpolated between them. No
            star where the setting differs from what the comparison measured (heads, layers)
            or lies outside its measured strengths; the status line says why.
        heads: PASTA's heads (default: those of the comparison's PASTA, else all).

    Example:
        >>> SteeringLab(TEMPLATE, model, choices=colors, vars=rows.head(4),
        ...             vectors={"CAA": caa, "ICV": icv}, comparison=cmp)    # doctest: +SKIP
    """

    def __init__(self, template: str, model: Any, *, choices: Any, vars: Any = None,
                 vectors: Mapping[str, Any] | None = None, comparison: Any = None,
                 heads: Any = None) -> None:
        self.template, self.model, self.choices, self.rows = template, model, choices, vars
        self.vectors = dict(vectors or {})
        self.comparison = comparison
        self.method = w.Dropdown(options=["PASTA", *self.vectors], description="method")
        self.heads = heads if heads is not None else self._compared("PASTA").get("heads", "all")
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
            spec = self._compared()
            # the layers the comparison measured this vector at, so the star sits on its curve
            compared = [layer for layer in spec.get("layers") or have if layer in have] or have
            # and strengths that reach its measured ones (a knob's values are tens)
            values = [float(v) for v in spec.get("values", [])] if \
                spec.get("swept") == "strength" else []
            low, high = min([0.0, *values]), max([8.0, *(2 * v for v in values)])
            for control in (self.layers, self.strength):
                control.unobserve(self._on_change, names="value")
            self.layers.options = have
            self.layers.value = tuple(compared)
            self.strength.min, self.strength.max = -1e9, 1e9  # (no clamping while moved)
            self.strength.min, self.strength.max = low, high
            small = min([abs(v) for v in values if v] or [1.0])
            self.strength.step = min((high - low) / 64, small / 4) if values else 0.25
            if values and not min(values) <= self.strength.value <= max(values):
                self.strength.value = values[0]  # a measured setting, not another method's
            for control in (self.layers, self.strength):
                control.observe(self._on_change, names="value")

    def _label(self, method: str | None = None) -> str | None:
        """The comparison's label of a lab method: the same name, or for PASTA the
        comparison's attention-only method (named "PASTA (L1)", say)."""
        method = method or self.method.value
        methods = self.comparison.params.get("methods", {}) if self.comparison else {}
        if method in methods:
            return method
        if method == "PASTA":  # as the lab steers: exclude mode, on the template's marks
            return next((k for k, spec in methods.items() if "vector" not in spec
                         and spec.get("method", "pasta") == "pasta"
                         and spec.get("mode", "exclude") == "exclude"
                         and not spec.get("auto") and "template" not in spec), None)
        return None

    def _compared(self, method: str | None = None) -> dict[str, Any]:
        """A method's settings in the comparison (empty without one)."""
        label = self._label(method)
        return self.comparison.params["methods"][label] if label is not None else {}

    def _off_curve(self) -> str:
        """Why the comparison's curve says nothing of the current setting ("" when it does)."""
        spec = self._compared()
        if self.method.value == "PASTA":
            heads = spec.get("heads", "all")
            return "" if str(heads) == str(self.heads) else (
                f"PASTA steers heads {self.heads}; the comparison measured {heads}")
        layers = spec.get("layers")
        if layers is not None and sorted(self.layers.value) != sorted(layers):
            return "not the layers the comparison measured"
        return ""

    def steering(self) -> dict[str, Any]:
        """The ``steer=`` options of the current controls."""
        if self.method.value == "PASTA":
            return {"heads": self.heads, "alpha": self.alpha.value}
        start = self._compared().get("start")  # as measured (a knob: "last")
        return {"method": "vector", "vector": self.vectors[self.method.value],
                "strength": self.strength.value, "layers": list(self.layers.value),
                **({"start": start} if start is not None else {})}

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
        if self._why_no_star():
            return fig  # the curve says nothing of this setting (the status line says why)
        part = self.comparison.df[self.comparison.df["method"] == self._label()]
        part = part.sort_values("strength")
        x = self.current_strength()
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
        for col, cost in enumerate((c for c in ("d_text", "d_control") if c in part), start=2):
            fig.add_trace(go.Scatter(x=[-read(cost)], y=[gain], mode="markers", marker=star,
                                     showlegend=False, hoverinfo="skip"), row=1, col=col)
        return fig

    def _outside(self, part: Any) -> str:
        """Why the current strength cannot be read off ``part``'s measured points ("" when
        it can): it lies outside them."""
        x, measured = self.current_strength(), part["strength"]
        if measured.min() <= x <= measured.max():
            return ""
        return f"strength {x:g} is outside the measured {measured.min():g} to {measured.max():g}"

    def _why_no_star(self) -> str:
        """Why the curve gets no star for the current setting ("" when it gets one; also
        without a comparison, where there is no curve)."""
        if self.comparison is None:
            return ""
        label = self._label()
        part = self.comparison.df[self.comparison.df["method"] == label]
        if label is None or part.empty:
            return f"the comparison has no {self.method.value} curve"
        return self._off_curve() or self._outside(part)

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
        why = self._why_no_star()
        self.status.value = answers_status(self.method.value, run) + (
            f" · ({plain(why)}: no star on its curve)" if why else "")
