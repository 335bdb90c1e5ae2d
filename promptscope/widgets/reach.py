"""The reachability widget: type an initial state, pick targets from the model's next-token
ranking, search control prompts with live progress and a stop button, and see the control
prompt found and how it moved the next-token distribution."""

from __future__ import annotations

import html
import threading
from typing import Any

import ipywidgets as w
import plotly.graph_objects as go

from promptscope.viz.style import apply_style
from promptscope.widgets._figure import FigureBox
from promptscope.widgets._status import shows_errors


class ReachWidget(w.VBox):
    """Search control prompts interactively (``promptscope.reachability`` underneath).

    Args:
        model: a loaded local model.
        x0: the initial state to start with.
        k_max, method, steps: the search settings shown in the controls.

    Example:
        >>> from promptscope.widgets import ReachWidget
        >>> ReachWidget(promptscope.load_model("organism"), "tike lara")    # doctest: +SKIP
    """

    def __init__(self, model: Any, x0: str = "", *, k_max: int = 3, method: str = "gcg",
                 steps: int = 16) -> None:
        self.model = model
        self.result: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.x0 = w.Text(value=x0, description="x0", placeholder="initial state text",
                         layout=w.Layout(width="60%"))
        self.rank_button = w.Button(description="Rank next tokens", icon="list",
                                    layout=w.Layout(width="auto"))
        self.targets = w.SelectMultiple(options=[], rows=10, description="targets",
                                        layout=w.Layout(width="60%"))
        self.k = w.IntSlider(value=k_max, min=1, max=10, description="k max")
        self.method = w.Dropdown(options=["gcg", "greedy", "both"], value=method,
                                 description="method")
        self.steps = w.IntSlider(value=steps, min=1, max=128, description="GCG steps")
        self.start_button = w.Button(description="Start", button_style="primary", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop",
                                    disabled=True)
        self.progress = w.IntProgress(value=0, min=0, max=1, description="pairs")
        self.status = w.HTML()
        self.table = w.HTML()
        self.pick = w.Dropdown(options=[], description="show")
        self.dist = FigureBox()
        self.rank_button.on_click(shows_errors(self.status, lambda _: self.rank()))
        self.start_button.on_click(shows_errors(self.status, lambda _: self.start()))
        self.stop_button.on_click(lambda _: self.stop())
        self.pick.observe(shows_errors(self.status, lambda _: self.show_distribution()),
                          names="value")
        super().__init__([
            w.HBox([self.x0, self.rank_button]), self.targets,
            w.HBox([self.k, self.method, self.steps]),
            w.HBox([self.start_button, self.stop_button, self.progress]), self.status,
            self.table, self.pick, self.dist])
        if x0:
            self.rank()

    # ------------------------------------------------------------------ actions
    def rank(self, top: int = 40, bottom: int = 10) -> None:
        """Fill the target list with the next-token ranking after x0 (top and least likely)."""
        from promptscope.analyses.reachability import next_tokens

        dist = next_tokens(self.model, self.x0.value)
        shown = list(dist.head(top).itertuples()) + list(dist.tail(bottom).itertuples())
        self.targets.options = [
            (f"#{r.rank}  {r.token!r}  p={r.prob:.2g}", int(r.token_id)) for r in shown]
        self.targets.value = tuple(int(r.token_id) for r in shown[1:4])
        self.status.value = (f"Ranked {len(dist)} next tokens after "
                             f"<code>{html.escape(self.x0.value)}</code>; pick targets.")

    def start(self, wait: bool = False) -> None:
        """Run the search on the picked targets in a background thread (``wait``: block)."""
        if self._thread is not None and self._thread.is_alive():
            return
        targets = list(self.targets.value)
        if not targets:
            self.status.value = "<b>Pick at least one target.</b>"
            return
        self._stop.clear()
        self.result = None  # never show the previous run's pairs under this run's outcome
        self.pick.options = []
        self.table.value = _table([])
        self.dist.clear()
        self.rows: list[dict[str, Any]] = []
        self.progress.max, self.progress.value = len(targets), 0
        self.start_button.disabled, self.stop_button.disabled = True, False
        self.status.value = "Searching…"
        self._thread = threading.Thread(target=self._run, args=(targets,), daemon=True)
        self._thread.start()
        if wait:
            self._thread.join()

    def stop(self) -> None:
        """Ask the running search to stop; what it found is kept."""
        self._stop.set()

    def _run(self, targets: list[int]) -> None:
        from promptscope.analyses.reachability import reachability

        try:
            self.result = reachability(
                self.model, [self.x0.value], targets, k_max=self.k.value,
                method=self.method.value, steps=self.steps.value, progress=False,
                bound=False, on_pair=self._on_pair, should_stop=self._stop.is_set)
            self.status.value = f"Done: session <code>{self.result.session_id}</code>."
        except KeyboardInterrupt as exc:
            self.result = getattr(exc, "partial_result", None)
            self.status.value = "Stopped; every pair is kept (unfinished ones: not reached yet)."
        except Exception as exc:  # shown in the widget: a thread has nowhere else to report
            self.result = getattr(exc, "partial_result", None)
            self.status.value = f"<b>Error:</b> {html.escape(str(exc))}"
        finally:
            self.start_button.disabled, self.stop_button.disabled = False, True
        if self.result is not None and len(self.result.df):
            # every pair the run kept (on_pair reports only those finished on the way)
            df = self.result.df.drop_duplicates("pair")  # a pair two target sets share
            self.table.value = _table(df.to_dict("records"))
            self.progress.value = int(df["complete"].sum()) if "complete" in df else len(df)
            self.pick.options = [
                (f"{r.target!r} ({f'k={int(r.k)}' if r.reached else 'not reached'})",
                 int(r.pair)) for r in df.itertuples()]
            self.pick.value = int(df["pair"].iloc[0])

    def _on_pair(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self.progress.value = len(self.rows)
        self.table.value = _table(self.rows)

    def show_distribution(self) -> None:
        """Next-token probabilities before and after the picked pair's control prompt."""
        if self.result is None or self.pick.value is None:
            return
        from promptscope.analyses.reachability import next_tokens

        row = self.result.df.drop_duplicates("pair").set_index("pair").loc[self.pick.value]
        before = next_tokens(self.model, row["x0"])
        after = next_tokens(self.model, row["x0"], list(row["control_ids"]))
        self.dist.show(distribution_figure(before, after, int(row["target_id"]),
                                           row["control"]))


def distribution_figure(before: Any, after: Any, target_id: int, control: str,
                        top: int = 12) -> Any:
    """Bars of the next-token probabilities without and with the control prompt: the tokens
    most likely in either, and the target."""
    ids = list(dict.fromkeys([*before["token_id"].head(top // 2), *after["token_id"].head(top // 2),
                              target_id]))
    b, a = before.set_index("token_id"), after.set_index("token_id")
    # (byte tokens all decode to '�': the id keeps each its own bar)
    labels = [f"{b.loc[i, 'token']!r} #{i}" + (" ★" if i == target_id else "") for i in ids]
    fig = go.Figure([go.Bar(name="x0 alone", x=labels, y=[b.loc[i, "prob"] for i in ids]),
                     go.Bar(name=f"{control!r} + x0", x=labels, y=[a.loc[i, "prob"] for i in ids])])
    fig.update_yaxes(title_text="next-token probability")
    fig.update_layout(barmode="group")
    return apply_style(fig, f"How the control prompt moved the distribution (★ target: rank "
                            f"{int(b.loc[target_id, 'rank'])} → {int(a.loc[target_id, 'rank'])})")


def _table(rows: list[dict[str, Any]]) -> str:
    cells = "".join(
        f"<tr><td>{html.escape(repr(r['target']))}</td><td>{'✓' if r['reached'] else '✗'}</td>"
        f"<td>{'' if not r['reached'] else int(r['k'])}</td>"
        f"<td><code>{html.escape(repr(r['control']))}</code></td>"
        f"<td>{r['base_rank']} → {r['rank']}</td><td>{r['prob']:.3f}</td></tr>" for r in rows)
    return ("<table><tr><th>target</th><th>reached</th><th>k</th><th>control prompt</th>"
            "<th>rank</th><th>prob</th></tr>" + cells + "</table>")
