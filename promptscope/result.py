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

    def _header(self, table: Any, markup: bool) -> str:
        """kind · model · row count (and the summary's, where it differs) · status · session,
        as HTML or as text."""
        def tag(name: str, text: str) -> str:
            return f"<{name}>{html.escape(text)}</{name}>" if markup else text

        rows = f"{len(self.df)} rows"
        if len(table) != len(self.df):  # the summary groups them (e.g. one row per variant)
            rows += f" (the summary below: {len(table)}; all in .df)"
        esc = html.escape if markup else str
        parts = [tag("b", self.kind), esc(self.model.get("name", "")), esc(rows),
                 tag("b", self.status) if self.status != "done" else "",
                 "session " + tag("code", self.session_id) if self.session_id else ""]
        return " · ".join(p for p in parts if p)

    def _repr_html_(self) -> str:
        table = self.summary()
        body = table.to_html(max_rows=40, max_cols=20, escape=True) if len(table) else ""
        return f"<div>{self._header(table, markup=True)}</div>" + body

    def _repr_text(self) -> str:
        """What a terminal or a text export shows: the header line and the summary table."""
        table = self.summary()
        body = "\n" + table.to_string(max_rows=40, max_cols=20) if len(table) else ""
        return self._header(table, markup=False) + body

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display({"text/html": self._repr_html_(), "text/plain": self._repr_text()}, raw=True)
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
