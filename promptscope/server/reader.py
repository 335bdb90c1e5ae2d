"""Read-only, schema-safe access to a workspace's session store for the Jupyter server.

The server reads the same SQLite file that kernels write while they run. Three things differ
from :class:`promptscope.store.Store`, which a kernel uses:

- Opening never creates, migrates or locks the file (``mode=rw`` URI, plain ``SELECT``s), so a
  listing neither leaves a stray database behind nor waits on a kernel that is writing. In WAL
  mode readers see the last committed state: a session whose run is half written shows as
  ``running`` with the rows committed so far.
- A missing, empty, corrupt or too-new file is reported as a :class:`StoreUnavailable` with a
  message the panel shows, never as a traceback.
- Listing returns a total count and the kinds / models present, which the panel needs for
  paging and its filter menus.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from promptscope.errors import PromptscopeError
from promptscope.store import (
    SCHEMA_VERSION,
    STATUSES,
    Store,
    orphaned,
    search_clauses,
    with_casefold,
)

_T = TypeVar("_T")

# Ids are made by Store.create ("20261125-101500-1a2b3c"); allowing only this alphabet rules out
# path tricks in URLs and code injection when the panel writes an id into a notebook cell.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
LIST_FIELDS = ("id", "name", "kind", "model", "status", "created", "updated", "n_rows")
MAX_LIMIT = 500
#: Rows of a summary table the server keeps and sends (the panel shows 200; the HTML report
#: this many; the CSV export has every row).
SUMMARY_ROWS = 1000


@dataclass
class _Summary:
    """A session's summary table as last computed: its first rows and how many there are."""

    updated: float  # the session's ``updated`` it was computed at
    at: float  # when (time.monotonic())
    cost: float  # seconds it took
    head: Any  # DataFrame of the first SUMMARY_ROWS rows, or None (no summary)
    total: int


# (store file, session id) -> its summary: a 500 k-row session took 6 s to summarise, and the
# panel asks again after each chunk a running session writes.
_SUMMARIES: OrderedDict[tuple[str, str], _Summary] = OrderedDict()
_SUMMARIES_LOCK = threading.Lock()


class StoreUnavailable(Exception):
    """The store cannot be read; ``str(exc)`` is a message for the user."""


class NoSessionsYet(StoreUnavailable):
    """No kernel has saved a session yet: every id is unknown (404, not 503)."""


def valid_name(value: str) -> bool:
    """Whether ``value`` is a safe session id, table name or figure name."""
    return bool(NAME_RE.match(value)) and ".." not in value


class StoreReader(Store):
    """A :class:`Store` whose connections only read (see the module docstring)."""

    def __init__(self, path: str | Path, *, timeout: float = 10.0) -> None:
        super().__init__(path)
        self.timeout = timeout

    def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """The inherited readers (``get``, ``table``...) on a reading connection. (The server
        takes no Ctrl-C, so a generator context manager is safe here.)"""
        with self._connect() as conn:
            return work(conn)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        if not self.path.is_file():
            raise NoSessionsYet(f"No sessions yet: {self.path} does not exist.")
        try:
            # mode=rw: never create the file (mode=ro cannot open a WAL file nobody has open).
            conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=rw", uri=True,
                                   timeout=self.timeout, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"Cannot open the session store {self.path}: {exc}.") from exc
        try:
            with_casefold(conn)
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
            except sqlite3.OperationalError as exc:  # not the file: its folder, its rights
                hint = (": SQLite needs to write beside it (its -wal and -shm files), so its "
                        "folder must be writable for the Jupyter server's user"
                        if "readonly" in str(exc) or "unable to open" in str(exc) else "")
                raise StoreUnavailable(f"The session store {self.path} cannot be opened here "
                                       f"({exc}){hint}.") from exc
            except sqlite3.DatabaseError as exc:
                raise StoreUnavailable(
                    f"The session store {self.path} is damaged or not a promptscope store "
                    f"({exc}). Move it aside; the next run starts a new one.") from exc
            if version > SCHEMA_VERSION:
                raise StoreUnavailable(
                    f"{self.path} was written by a newer promptscope (schema {version} > "
                    f"{SCHEMA_VERSION}); upgrade promptscope in the Jupyter server's "
                    f"environment to browse it.")
            if version < SCHEMA_VERSION:
                if version == 0:  # created but not set up yet: a kernel is about to
                    raise NoSessionsYet(f"No sessions yet in {self.path}.")
                try:  # an older schema: upgrade it as a kernel would
                    Store(self.path).list(limit=0)
                except (sqlite3.Error, PromptscopeError) as exc:  # a foreign file, read-only...
                    raise StoreUnavailable(
                        f"The session store {self.path} has an older layout that could not "
                        f"be upgraded ({exc}). Move it aside; the next run starts a new one."
                    ) from exc
            try:
                yield conn
            except sqlite3.DatabaseError as exc:
                raise StoreUnavailable(
                    f"The session store {self.path} could not be read ({exc}).") from exc
        finally:
            conn.close()

    # ------------------------------------------------------------------ queries
    @staticmethod
    def _where(kind: str | None, model: str | None, status: str | None,
               search: str | None, dead: list[str]) -> tuple[str, list[Any]]:
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("kind", kind), ("model", model)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        if status:  # `dead`: running in the file, but their kernel is gone (interrupted)
            marks = ", ".join("?" * len(dead))
            if status == "interrupted" and dead:
                where.append(f"(status = ? OR id IN ({marks}))")
            elif status == "running" and dead:
                where.append(f"(status = ? AND id NOT IN ({marks}))")
            else:
                where.append("status = ?")
            args += [status, *(dead if status in ("interrupted", "running") else [])]
        clauses, words = search_clauses(search)  # every word must match somewhere
        where += clauses
        args += words
        return (" WHERE " + " AND ".join(where)) if where else "", args

    def page(self, *, kind: str | None = None, model: str | None = None,
             status: str | None = None, search: str | None = None, limit: int = 50,
             offset: int = 0) -> dict[str, Any]:
        """One page of sessions, newest first, with the total and the filter choices."""
        if status and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}")
        limit = max(0, min(int(limit), MAX_LIMIT))
        offset = max(0, min(int(offset), 2**62))  # SQLite integers are 64-bit
        cols = ", ".join((*LIST_FIELDS, "owner"))
        with self._connect() as conn:
            conn.execute("BEGIN")  # one snapshot: the page and its total agree
            # A run whose kernel died is listed as interrupted, so it is filtered as one too.
            dead = [sid for sid, owner, updated in conn.execute(
                "SELECT id, owner, updated FROM sessions WHERE status='running'")
                if orphaned("running", owner, updated)]
            where, args = self._where(kind, model, status, search, dead)
            rows = conn.execute(
                f"SELECT {cols} FROM sessions{where} ORDER BY created DESC, id DESC "
                "LIMIT ? OFFSET ?", [*args, limit, offset]).fetchall()
            total = conn.execute(f"SELECT COUNT(*) FROM sessions{where}", args).fetchone()[0]
            kinds = [k for (k,) in conn.execute("SELECT DISTINCT kind FROM sessions ORDER BY kind")]
            models = [m for (m,) in conn.execute(
                "SELECT DISTINCT model FROM sessions WHERE model != '' ORDER BY model")]
        sessions = []
        for *values, owner in rows:
            item = dict(zip(LIST_FIELDS, values))
            if orphaned(item["status"], owner, item["updated"]):
                item["status"] = "interrupted"
            sessions.append(item)
        return {"sessions": sessions, "total": total, "limit": limit, "offset": offset,
                "max_limit": MAX_LIMIT, "kinds": kinds, "models": models}

    def table_sizes(self, session_id: str) -> dict[str, int]:
        """Table name -> number of chunks (a cheap 'is there anything' check)."""
        with self._connect() as conn:
            return dict(conn.execute(
                "SELECT name, COUNT(*) FROM chunks WHERE session_id=? GROUP BY name ORDER BY name",
                (session_id,)))

    def figure_names(self, session_id: str) -> list[str]:
        with self._connect() as conn:
            return [n for (n,) in conn.execute(
                "SELECT name FROM figures WHERE session_id=? ORDER BY name", (session_id,))]

    def figure(self, session_id: str, name: str) -> str | None:
        """One figure's plotly JSON, or None."""
        with self._connect() as conn:
            row = conn.execute("SELECT spec FROM figures WHERE session_id=? AND name=?",
                               (session_id, name)).fetchone()
        return row[0] if row else None

    # ------------------------------------------------------------------ views
    def detail(self, session_id: str, *, max_rows: int = 200) -> dict[str, Any]:
        """Everything the panel's detail view shows, as JSON-ready values."""
        record = self.get(session_id)
        out = asdict(record)
        out["tables"] = list(self.table_sizes(session_id))
        out["figures"] = self.figure_names(session_id)
        out["summary_table"] = None
        out["summary_error"] = ""
        try:
            summary = self.summary(session_id)
            if summary.head is not None and len(summary.head.columns):
                out["summary_table"] = frame_to_json(summary.head, max_rows=max_rows,
                                                     total=summary.total)
        except StoreUnavailable:
            raise
        except Exception as exc:  # a plot module that cannot summarise a partial run, cells
            out["summary_error"] = f"{type(exc).__name__}: {exc}"  # JSON cannot hold...
        return out

    def summary_frame(self, session_id: str) -> Any:
        """The session's summary table (what its Result shows), or None."""
        import promptscope

        if not self.table_sizes(session_id):
            return None
        return promptscope.load(session_id, store=self).summary()

    def summary(self, session_id: str) -> _Summary:
        """The session's summary table, computed again only when the session changed, and
        for a running one at most every five times what computing it cost (each chunk a
        long run writes would otherwise load every row again)."""
        record = self.get(session_id)
        key = (str(self.path), session_id)
        with _SUMMARIES_LOCK:
            kept = _SUMMARIES.get(key)
        if kept is not None and (kept.updated == record.updated or (
                record.status == "running" and time.monotonic() - kept.at < 5 * kept.cost)):
            return kept
        start = time.monotonic()
        table = self.summary_frame(session_id)
        now = time.monotonic()
        made = _Summary(record.updated, now, now - start,
                        None if table is None else table.head(SUMMARY_ROWS),
                        0 if table is None else len(table))
        with _SUMMARIES_LOCK:
            _SUMMARIES[key] = made
            _SUMMARIES.move_to_end(key)
            while len(_SUMMARIES) > 32:
                _SUMMARIES.popitem(last=False)
        return made


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None`` (JSON has no such numbers, and the
    panel's ``JSON.parse`` refuses Python's ``NaN``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def frame_to_json(df: Any, *, max_rows: int = 200, total: int | None = None
                  ) -> dict[str, Any]:
    """A DataFrame as ``{columns, rows, total}``: cells JSON-safe, at most ``max_rows`` rows
    (``total``: the whole table's length, when ``df`` is its head)."""
    import pandas as pd

    if not isinstance(df.index, pd.RangeIndex):
        df = df.reset_index()
    head = df.head(max_rows)
    data = json.loads(head.to_json(orient="split", date_format="iso", default_handler=str,
                                   index=False))
    return {"columns": [str(c) for c in data["columns"]], "rows": data["data"],
            "total": int(len(df) if total is None else total)}


def session_html(reader: StoreReader, session_id: str) -> str:
    """A standalone HTML report of one session: metadata, summary and figures, plotly.js inline.

    Every user-supplied string (name, source, params) is escaped; tables go through
    ``DataFrame.to_html`` which escapes cells.
    """
    import html

    import plotly.io as pio

    rec = reader.get(session_id)
    e = html.escape
    parts = [
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{e(rec.name)} - promptscope</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2rem;max-width:1100px}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
        "padding:2px 6px;text-align:left}pre{background:#f6f6f6;padding:8px;overflow:auto}"
        "dt{font-weight:600}</style></head><body>",
        f"<h1>{e(rec.name)}</h1><dl>",
    ]
    for label, value in (("Session", rec.id), ("Kind", rec.kind), ("Model", rec.model),
                         ("Status", rec.status), ("Rows", rec.n_rows),
                         ("Created", _iso(rec.created))):
        parts.append(f"<dt>{e(label)}</dt><dd>{e(str(value))}</dd>")
    parts.append("</dl>")
    if rec.error:
        parts.append(f"<h2>Error</h2><pre>{e(rec.error)}</pre>")
    if rec.source:
        parts.append(f"<h2>Source</h2><pre>{e(rec.source)}</pre>")
    parts.append("<h2>Parameters</h2><pre>"
                 f"{e(json.dumps(rec.params, indent=2, default=str, ensure_ascii=False))}</pre>")
    first = True
    for name, spec in reader.figures(session_id).items():
        fig = pio.from_json(spec, skip_invalid=True)
        parts.append(f"<h2>Figure: {e(name)}</h2>")
        # plotly.js goes in once, inline: the report must open with no network.
        parts.append(pio.to_html(fig, include_plotlyjs=first, full_html=False))
        first = False
    try:
        summary = reader.summary(session_id)
    except Exception:  # the report still has the figures and raw tables
        summary = None
    if summary is not None and summary.head is not None and len(summary.head.columns):
        shown = len(summary.head)
        note = (f"<p>The first {shown:,} of {summary.total:,} rows; the CSV export has every "
                "row.</p>" if shown < summary.total else "")
        parts.append("<h2>Summary</h2>" + note +
                     summary.head.to_html(index=False, escape=True, border=0))
    parts.append("</body></html>")
    return "\n".join(parts)


def _iso(ts: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).isoformat(timespec="seconds")
