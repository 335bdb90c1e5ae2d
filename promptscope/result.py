"""The value every analysis returns: tidy tables, parameters, and where it is saved."""

from __future__ import annotations

import html
import importlib
from dataclasses import dataclass, field
from typing import Any


def _viz(kind: str) -> Any:
    """``promptscope.viz.<kind>``, with optional ``figure(result)`` and ``summary(result)``."""
    try:
        return importlib.import_module(f"promptscope.viz.{kind}")
    except ModuleNotFoundError:
        return None


@dataclass(eq=False)
class Result:
    """Result of one run.

    Attributes:
        kind: the analysis (``"prompt"``, ...).
        df: tidy table, one row per observation (for ``prompt``: variant x choice / sample).
        params: JSON-friendly parameters of the run.
        session_id: the saved session (``promptscope.load(session_id)`` brings it back).
        model: facts about the model (name, backend, device, dtype...).
        source: the template or cell source.
        status: ``done``, ``interrupted``, ``failed`` or ``running``.
        tables: further named tables some analyses add.

    Example:
        >>> run = promptscope.run_prompt("2+2={{3|4}}", target="!")  # doctest: +SKIP
        >>> run.df[["alt1", "logprob"]]                              # doctest: +SKIP
    """

    kind: str
    df: Any
    params: dict[str, Any] = field(default_factory=dict)
    session_id: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    name: str = ""
    status: str = "done"
    tables: dict[str, Any] = field(default_factory=dict)

    def figure(self) -> Any:
        """The analysis' plotly figure (``None`` when it has none for this run)."""
        make = getattr(_viz(self.kind), "figure", None)
        return make(self) if make and len(self.df) else None

    def summary(self) -> Any:
        """The compact table the notebook shows (one row per variant for ``prompt`` runs)."""
        make = getattr(_viz(self.kind), "summary", None)
        return make(self) if make and len(self.df) else self.df

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Result):
            return NotImplemented
        same_tables = self.tables.keys() == other.tables.keys() and all(
            _frames_equal(self.tables[k], other.tables[k]) for k in self.tables)
        fields = ("kind", "status", "params", "model", "session_id", "source", "name")
        return all(getattr(self, f) == getattr(other, f) for f in fields) \
            and _frames_equal(self.df, other.df) and same_tables

    def _header(self) -> str:
        model = self.model.get("name", "")
        status = "" if self.status == "done" else f" · <b>{html.escape(self.status)}</b>"
        sid = f" · session <code>{html.escape(self.session_id)}</code>" if self.session_id else ""
        return (f"<div><b>{html.escape(self.kind)}</b> · {html.escape(model)} · "
                f"{len(self.df)} rows{status}{sid}</div>")

    def _repr_html_(self) -> str:
        table = self.summary()
        body = table.to_html(max_rows=40, max_cols=20, escape=True) if len(table) else ""
        return self._header() + body

    def _ipython_display_(self) -> None:
        from IPython.display import HTML, display

        display(HTML(self._repr_html_()))
        make_widget = getattr(_viz(self.kind), "widget", None)
        shown = make_widget(self) if make_widget and len(self.df) else None
        if shown is None:
            shown = self.figure()
        if shown is not None:
            display(shown)

    def __repr__(self) -> str:
        return (f"<Result {self.kind} rows={len(self.df)} status={self.status} "
                f"session={self.session_id}>")


def _frames_equal(a: Any, b: Any) -> bool:
    import pandas as pd

    try:
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True),
                                      check_dtype=False)
    except AssertionError:
        return False
    return True
