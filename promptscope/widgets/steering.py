"""The steering widget: an alpha slider and a head-set picker, with the answer probabilities and
the attention on the emphasised span before and after PASTA steering."""

from __future__ import annotations

from typing import Any

import ipywidgets as w
import plotly.graph_objects as go

from promptscope.viz.prompt import plain_vs_steered
from promptscope.viz.style import apply_style
from promptscope.widgets._figure import FigureBox, row_wrap
from promptscope.widgets._status import shows_errors


def head_options(model: Any) -> list[str]:
    """Head sets to offer: all heads, and the top-k of this model's newest saved profile."""
    from promptscope.analyses.heads import KIND
    from promptscope.store import Store

    options = ["all"]
    if any(r.status == "done" for r in Store.default().list(kind=KIND, model=model.name)):
        options += [f"top:{k}" for k in (1, 2, 4, 8, 16)]
    return options


class SteeringWidget(w.VBox):
    """Try PASTA steering interactively on a template with ``<<emphasis>>``.

    Args:
        template: the template (with ``<<...>>`` around what to emphasise).
        model: a loaded local model.
        choices: the answers to compare (``" yes| no"`` or a list).
        vars: rows for the template's variables.
        heads: the head sets offered (default: ``all`` and the top-k of a saved profile).
        alpha: PASTA's starting alpha (the slider spans 1e-5 to 1).

    Example:
        >>> SteeringWidget("<<Ann lives in Rome.>> Ann lives in", model,
        ...                choices=" Rome| Paris")                        # doctest: +SKIP
    """

    def __init__(self, template: str, model: Any, *, choices: Any, vars: Any = None,
                 heads: list[str] | None = None, alpha: float = 0.01) -> None:
        self.template, self.model, self.choices, self.rows = template, model, choices, vars
        self.alpha = w.FloatLogSlider(value=alpha, base=10, min=-5, max=0, step=0.25,
                                      description="alpha", continuous_update=False,
                                      readout_format=".1e")
        self.heads = w.Dropdown(options=heads or head_options(model), description="heads")
        self.status = w.HTML()
        self.answers = FigureBox()
        self.attention = FigureBox()
        for control in (self.alpha, self.heads):
            control.observe(shows_errors(self.status, self.update), names="value")
        self.update()
        super().__init__([w.HBox([self.alpha, self.heads]), self.status,
                          w.HBox([self.answers, self.attention], layout=row_wrap())])

    def steering(self) -> dict[str, Any]:
        return {"heads": self.heads.value, "alpha": self.alpha.value}

    def update(self, _: Any = None) -> None:
        """Re-run plain and steered on the current settings and redraw both figures."""
        import promptscope

        run = promptscope.run_prompt(self.template, self.model, vars=self.rows,
                                     choices=self.choices, save=False, progress=False,
                                     steer={**self.steering(), "compare": True})
        plain = promptscope.attention(self.template, self.model, vars=self.rows,
                                      matrices=False, save=False, progress=False)
        steered = promptscope.attention(self.template, self.model, vars=self.rows,
                                        matrices=False, save=False, progress=False,
                                        steer=self.steering())
        self.last = run
        self.answers.show(plain_vs_steered(run))
        self.attention.show(_mass_figure(plain, steered))
        self.status.value = answers_status(f"heads {self.heads.value}", run)


def answers_status(label: str, run: Any) -> str:
    """``<b>label</b> · answers plain: [...] → steered: [...]``, as HTML with the user's text
    (a method's name, the answers) escaped."""
    import html

    acc = run.df[run.df.chosen].groupby("steered")["choice"].agg(list)
    return (f"<b>{html.escape(label)}</b> · answers plain: {html.escape(str(acc.get(False)))} "
            f"→ steered: {html.escape(str(acc.get(True)))}")


def _mass_figure(plain: Any, steered: Any) -> go.Figure:
    """Per layer, the last token's attention on the emphasis, plain and steered, averaged over
    the steered heads (a few steered heads among many would look like no effect)."""
    heads = {(int(layer), h) for layer, hs in steered.params["steer"]["heads"].items()
             for h in hs}
    fig = go.Figure()
    for name, res in (("plain", plain), ("steered", steered)):
        d = res.df[res.df["part"] == "emphasis"]
        d = d[[(lay, h) in heads for lay, h in zip(d["layer"], d["head"])]]
        d = d.groupby("layer")["mass"].mean()
        fig.add_trace(go.Bar(name=name, x=[f"L{i}" for i in d.index], y=d.values,
                             hovertemplate="%{x}: %{y:.3f}<extra>" + name + "</extra>"))
    fig.update_layout(barmode="group", yaxis={"title": "mass on emphasis", "range": [0, 1]})
    n = len(heads)
    return apply_style(fig, f"Last token's attention on the emphasis (mean over the {n} "
                            f"steered head{'' if n == 1 else 's'})")
