"""Sessions: every run saved in one SQLite database per workspace.

Where the database lives (first that applies):

1. ``$PROMPTSCOPE_HOME/sessions.sqlite`` when ``PROMPTSCOPE_HOME`` is set;
2. ``.promptscope/sessions.sqlite`` in the nearest folder, from the current directory up, that
   already has a ``.promptscope/`` folder (so notebooks in sub-folders share one workspace, the way
   git finds its repository);
3. ``.promptscope/sessions.sqlite`` in the current directory (created on first write).

The database is in WAL mode with a busy timeout, so several kernels can write at once. Result
tables are appended as Parquet chunks while a run goes, so an interrupted or failed run keeps the
rows it finished. The schema version is SQLite's ``user_version``; :data:`_MIGRATIONS` brings an
older file up to date when it is opened.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import socket
import sqlite3
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from promptscope.errors import PromptscopeError

_T = TypeVar("_T")

STATUSES = ("running", "done", "interrupted", "failed")


class StoreUnwritable(PromptscopeError):
    """The session store's file or folder cannot be written (read-only, a full disk)."""

# Each entry upgrades the schema by one version; never edit an entry once released.
_MIGRATIONS: list[str] = [
    """
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        model TEXT NOT NULL DEFAULT '',
        model_info TEXT NOT NULL DEFAULT '{}',
        params TEXT NOT NULL DEFAULT '{}',
        source TEXT NOT NULL DEFAULT '',
        status TEXT NOT NULL DEFAULT 'running',
        error TEXT NOT NULL DEFAULT '',
        summary TEXT NOT NULL DEFAULT '{}',
        n_rows INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE INDEX sessions_created ON sessions(created);
    CREATE TABLE chunks (
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        seq INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (session_id, name, seq)
    );
    CREATE TABLE figures (
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        spec TEXT NOT NULL,
        PRIMARY KEY (session_id, name)
    );
    """,
    # 2: which process runs a session ("host:pid"), so a run whose kernel died can be told apart
    # from one still going.
    "ALTER TABLE sessions ADD COLUMN owner TEXT NOT NULL DEFAULT ''",
]
SCHEMA_VERSION = len(_MIGRATIONS)


def workspace_dir(start: str | os.PathLike | None = None) -> Path:
    """The ``.promptscope`` folder for ``start`` (default: the current directory): the nearest
    one from ``start`` upwards, else ``start/.promptscope``.

    Like git's ceiling directories, the walk up does not look into (or above) the system temp
    folder, the folder holding the home directory, or any folder in ``$PROMPTSCOPE_CEILING_DIRS``
    (``os.pathsep``-separated), so a stray ``/tmp/.promptscope`` does not capture every
    temporary workspace. ``$PROMPTSCOPE_HOME`` overrides all of this.
    """
    env = os.environ.get("PROMPTSCOPE_HOME")
    if env:
        return Path(env).expanduser()
    here = Path(start or os.getcwd()).resolve()
    ceilings = _ceiling_dirs()
    for folder in (here, *here.parents):
        if folder != here and folder in ceilings:
            break
        if (folder / ".promptscope").is_dir():
            return folder / ".promptscope"
        if folder in ceilings:  # started at a ceiling: nothing above it either
            break
    return here / ".promptscope"


def _ceiling_dirs() -> set[Path]:
    import tempfile

    dirs = {Path(tempfile.gettempdir()), Path.home().parent}
    dirs.update(Path(d) for d in os.environ.get("PROMPTSCOPE_CEILING_DIRS", "").split(os.pathsep)
                if d)
    return {d.expanduser().resolve() for d in dirs}


@dataclass
class SessionRecord:
    """One session's metadata (no tables)."""

    id: str
    name: str
    kind: str
    model: str
    status: str
    created: float
    updated: float
    n_rows: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    model_info: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    error: str = ""
    owner: str = ""


class Store:
    """A workspace's session database.

    Example:
        >>> store = Store(tmp_path / "sessions.sqlite")           # doctest: +SKIP
        >>> sid = store.create("prompt", name="capitals",
        ...                    params={"choices": [" yes", " no"]})  # doctest: +SKIP
        >>> store.append(sid, "rows", df); store.finish(sid, "done")  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._ready = False

    @classmethod
    def default(cls) -> Store:
        """The store of the current workspace (see the module docstring)."""
        return cls(workspace_dir() / "sessions.sqlite")

    def _run(self, work: Callable[[sqlite3.Connection], _T]) -> _T:
        """``work(conn)`` as one transaction: committed when it returns; rolled back (the
        connection closed uncommitted) when it raises.

        One function frame rather than a ``with`` over a generator: a Ctrl-C that lands as such
        a block is left skips the generator's clean-up for as long as the traceback lives (in
        IPython, until the next error), and the open transaction would keep the store's write
        lock from every kernel.
        """
        try:
            if not self._ready:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30.0)
        except (OSError, sqlite3.Error) as exc:
            raise self._unwritable(exc) from exc
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA busy_timeout = 30000")
            with_casefold(conn)
            if not self._ready:
                self._migrate(conn)
                self._ready = True
            result = work(conn)
            conn.commit()
            return result
        except sqlite3.OperationalError as exc:
            text = str(exc).lower()
            if "readonly" in text or "unable to open" in text or "disk i/o" in text \
                    or "disk is full" in text:
                raise self._unwritable(exc) from exc
            raise
        finally:
            conn.close()

    def _unwritable(self, exc: BaseException) -> StoreUnwritable:
        return StoreUnwritable(
            f"The session store {self.path} cannot be written ({exc}): a read-only folder, a "
            "full disk? Set PROMPTSCOPE_HOME to a writable folder, or run without saving "
            "(save=False; in a magic, --no-save).")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if version == SCHEMA_VERSION and mode == "wal":
            return  # nothing to write: a read-only copy of a store can still be read
        for attempt in range(300):
            try:  # (a new file switching to WAL ignores the busy timeout: wait here instead)
                conn.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 299:
                    raise
                time.sleep(0.1)
        conn.execute("BEGIN IMMEDIATE")  # one kernel migrates; others wait, then see it done
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise PromptscopeError(
                    f"{self.path} was written by a newer promptscope (schema {version} > "
                    f"{SCHEMA_VERSION}); upgrade promptscope to open it."
                )
            for v in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[v].split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ writing
    def create(self, kind: str, *, name: str = "", model: str = "",
               model_info: dict[str, Any] | None = None, params: dict[str, Any] | None = None,
               source: str = "", session_id: str | None = None,
               stranded: Collection[str] = ()) -> str:
        """Start a session in status ``running``; returns its id (sortable by time; give one
        from :func:`new_session_id` to know it even if this call is interrupted).

        Sessions left ``running`` by a process of this machine that no longer exists (a kernel
        that died or was restarted mid-run) are marked ``interrupted`` first; their rows stay.
        So are the ``stranded`` ones still ``running``: runs of this process whose clean-up a
        Ctrl-C cut off before it began.
        """
        now = time.time()
        sid = session_id or new_session_id(now)
        row = (sid, name or default_session_name(kind, source, sid), kind, model,
               _dumps(model_info or {}), _dumps(params or {}), source, now, now, _owner())

        def insert(conn: sqlite3.Connection) -> None:
            self._reap_orphans(conn, stranded)
            conn.execute(
                "INSERT INTO sessions (id, name, kind, model, model_info, params, source, "
                "status, created, updated, owner) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?)", row)

        self._run(insert)
        return sid

    @staticmethod
    def _reap_orphans(conn: sqlite3.Connection, stranded: Collection[str] = ()) -> None:
        running = conn.execute("SELECT id, owner, updated FROM sessions WHERE status='running'")
        dead = [(STRANDED_ERROR if sid in stranded else ORPHAN_ERROR, sid)
                for sid, owner, updated in running
                if sid in stranded or orphaned("running", owner, updated)]
        conn.executemany("UPDATE sessions SET status='interrupted', error=?, updated=? WHERE id=?",
                         [(error, time.time(), sid) for error, sid in dead])

    def append(self, session_id: str, table: str, df: Any, seq: int | None = None) -> None:
        """Append rows (a DataFrame) to one of the session's tables. A table's first chunk is
        kept even when it has no rows: it carries the columns of a run that produced none.

        ``seq`` numbers the chunk (0, 1, ...; default: the next); writing a numbered chunk that
        is already there does nothing, so a write retried after an interrupt is not doubled.
        """
        blob = _to_parquet(df)

        def write(conn: sqlite3.Connection) -> None:
            number = seq
            if number is None:
                number = conn.execute(
                    "SELECT COALESCE(MAX(seq), -1) + 1 FROM chunks WHERE session_id=? AND name=?",
                    (session_id, table),
                ).fetchone()[0]
            if len(df) == 0 and number > 0:
                return
            if not conn.execute("INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?)",
                                (session_id, table, number, blob)).rowcount:
                return  # written before
            conn.execute("UPDATE sessions SET n_rows = n_rows + ?, updated = ? WHERE id = ?",
                         (len(df) if table == "rows" else 0, time.time(), session_id))

        self._run(write)

    def save_figure(self, session_id: str, name: str, figure: Any) -> None:
        """Save a plotly figure (or its JSON string) under ``name``."""
        spec = figure if isinstance(figure, str) else figure.to_json()
        self._run(lambda conn: conn.execute("INSERT OR REPLACE INTO figures VALUES (?, ?, ?)",
                                            (session_id, name, spec)))

    def finish(self, session_id: str, status: str, *, error: str = "",
               summary: dict[str, Any] | None = None) -> None:
        """Set the final status (``done``, ``interrupted`` or ``failed``)."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")
        values = (status, error, _dumps(summary or {}), time.time(), session_id)
        self._run(lambda conn: conn.execute(
            "UPDATE sessions SET status=?, error=?, summary=?, updated=? WHERE id=?", values))

    def update_params(self, session_id: str, params: dict[str, Any]) -> None:
        values = (_dumps(params), time.time(), session_id)
        self._run(lambda conn: conn.execute(
            "UPDATE sessions SET params=?, updated=? WHERE id=?", values))

    def rename(self, session_id: str, name: str) -> None:
        self.get(session_id)
        values = (name, time.time(), session_id)
        self._run(lambda conn: conn.execute(
            "UPDATE sessions SET name=?, updated=? WHERE id=?", values))

    def delete(self, session_id: str, *, force: bool = False) -> None:
        """Delete a session and its tables. A session still running in a live kernel is kept
        (that kernel's next rows would fail) unless ``force``."""
        rec = self.get(session_id)
        if rec.status == "running" and not force:
            raise PromptscopeError(
                f"Session '{session_id}' is still running (in "
                f"{rec.owner.partition('/')[0] or 'another kernel'}); "
                "stop it first, or delete it with force=True.")
        self._run(lambda conn: conn.execute("DELETE FROM sessions WHERE id=?", (session_id,)))

    def compact(self) -> int:
        """Give the space of deleted sessions back to the disk (SQLite keeps it inside the
        file otherwise); returns the bytes freed. It rewrites the file, so it waits for
        kernels that are writing (and they for it).

        Example:
            >>> promptscope.Store.default().compact()                        # doctest: +SKIP
            73400320
        """
        def size() -> int:  # the file and its write-ahead log
            return sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal"))
                       if p.exists())

        before = size()

        def vacuum(conn: sqlite3.Connection) -> None:
            conn.commit()  # (VACUUM runs outside a transaction)
            conn.execute("VACUUM")

        def shrink(conn: sqlite3.Connection) -> bool:
            # The file shrinks once no other connection reads an older state; wait for that
            # briefly, not the 30 s a write would.
            conn.execute("PRAGMA busy_timeout = 2000")
            return bool(conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0])

        self._run(vacuum)
        if self._run(shrink):
            import warnings

            warnings.warn("Another kernel (or the panel) is reading the store: the file "
                          "shrinks when the last connection to it closes.", stacklevel=2)
        return max(0, before - size())

    # ------------------------------------------------------------------ reading
    def get(self, session_id: str) -> SessionRecord:
        def read(conn: sqlite3.Connection) -> Any:
            conn.row_factory = sqlite3.Row
            return conn.execute("SELECT * FROM sessions WHERE id=?", (session_id,)).fetchone()

        row = self._run(read)
        if row is None:
            raise PromptscopeError(
                f"No session '{session_id}' in {self.path}. promptscope.sessions() lists them."
            )
        return _record(row)

    def table(self, session_id: str, name: str = "rows") -> Any:
        """All chunks of one table, concatenated in the order they were written."""
        import pandas as pd

        blobs = self._run(lambda conn: [b for (b,) in conn.execute(
            "SELECT data FROM chunks WHERE session_id=? AND name=? ORDER BY seq",
            (session_id, name))])
        if not blobs:
            return pd.DataFrame()
        frames = [_from_parquet(b) for b in blobs]
        filled = [f for f in frames if len(f)]  # an empty first chunk only carries columns
        return pd.concat(filled or frames[:1], ignore_index=True)

    def table_names(self, session_id: str) -> list[str]:
        return self._run(lambda conn: [n for (n,) in conn.execute(
            "SELECT DISTINCT name FROM chunks WHERE session_id=? ORDER BY name", (session_id,))])

    def figures(self, session_id: str) -> dict[str, str]:
        """Figure name -> plotly JSON."""
        return self._run(lambda conn: dict(conn.execute(
            "SELECT name, spec FROM figures WHERE session_id=? ORDER BY name", (session_id,))))

    def list(self, *, kind: str | None = None, model: str | None = None,
             search: str | None = None, limit: int | None = None,
             offset: int = 0) -> list[SessionRecord]:
        """Sessions, newest first, filtered by kind / model / a text search."""
        where, args = [], []
        if kind:
            where.append("kind = ?")
            args.append(kind)
        if model:
            where.append("model = ?")
            args.append(model)
        clauses, words = search_clauses(search)
        where += clauses
        args += words
        sql = "SELECT * FROM sessions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created DESC, id DESC LIMIT ? OFFSET ?"
        args += [-1 if limit is None else limit, offset]
        if not self.path.exists():
            return []
        def read(conn: sqlite3.Connection) -> list[SessionRecord]:
            conn.row_factory = sqlite3.Row
            return [_record(r) for r in conn.execute(sql, args)]

        return self._run(read)


def _owner() -> str:
    """``host:pid``, with ``/start`` (the process's start time, where the OS tells it) so that
    a later process given the same id is not taken for the one that ran the session."""
    pid = os.getpid()  # at call time: a forked child is not us
    start = process_start(pid)
    return f"{socket.gethostname()}:{pid}" + (f"/{start}" if start else "")


def process_start(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, Linux's ``/proc``), or ``""``."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            # fields after the command name (which may hold spaces), from the 3rd on
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


STRANDED_ERROR = ("A Ctrl-C stopped it as its run was being finished, before its status was "
                  "written; the rows saved until then are kept.")
ORPHAN_ERROR = ("The process that ran it ended before it finished (kernel restarted or died); "
                "the rows saved until then are kept.")


def search_clauses(search: str | None) -> tuple[list[str], list[str]]:
    """SQL conditions (and their arguments) for a text search: every word must occur in the
    name, source, model or id, ignoring case in any script, as typed (no wildcards). The
    connection needs :func:`with_casefold`."""
    clauses, args = [], []
    for word in (search or "").split():  # casefold(): SQL's LIKE folds ASCII letters only
        clauses.append("(instr(casefold(name), ?) OR instr(casefold(source), ?) "
                       "OR instr(casefold(model), ?) OR instr(casefold(id), ?))")
        args += [word.casefold()] * 4
    return clauses, args


def with_casefold(conn: sqlite3.Connection) -> None:
    """Give ``conn`` the SQL function ``casefold(text)`` that :func:`search_clauses` uses."""
    conn.create_function("casefold", 1, lambda v: v.casefold() if isinstance(v, str) else v,
                         deterministic=True)


#: A ``running`` session without a recorded owner (schema 1) that has written nothing for
#: this long is taken for dead: a live run appends its rows much more often.
STALE_WITHOUT_OWNER_S = 3600.0


def orphaned(status: str, owner: str, updated: float | None = None) -> bool:
    """Whether a session is ``running`` for a process of this machine that no longer exists,
    or, from before owners were recorded (schema 1), has not written for an hour."""
    if status == "running" and not owner:
        return updated is not None and time.time() - updated > STALE_WITHOUT_OWNER_S
    host, _, proc = owner.rpartition(":")
    pid, _, start = proc.partition("/")
    if status != "running" or host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except OSError:
        return False  # exists but is someone else's (or the platform cannot tell)
    # alive: the same process, or a later one that was given its id (a restarted container)
    return bool(start) and process_start(int(pid)) not in ("", start)


def _record(row: sqlite3.Row) -> SessionRecord:
    d = dict(row)
    for key in ("params", "model_info", "summary"):
        d[key] = json.loads(d[key])
    if orphaned(d["status"], d.get("owner", ""), d["updated"]):  # shown as what it is
        d["status"], d["error"] = "interrupted", ORPHAN_ERROR
    return SessionRecord(**d)


def _dumps(obj: Any) -> str:
    return json.dumps(_plain_keys(obj), default=plain_json, ensure_ascii=False)


def _plain_keys(obj: Any) -> Any:
    """``obj`` with dict keys JSON can write: a numpy number as the number, another key (a
    tuple, say) as its text. (Keys come back as text: JSON has no other.)"""
    if isinstance(obj, dict):
        return {(k if isinstance(k, (str, int, float, bool)) or k is None
                 else k.item() if hasattr(k, "item") else str(k)): _plain_keys(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain_keys(v) for v in obj]
    return obj


def plain_json(value: Any) -> Any:
    """JSON for what ``json`` cannot write (its ``default=``): numpy scalars and arrays as
    numbers and lists (``np.float32(0.5)`` stays 0.5, not "0.5"), bytes as text (undecodable
    ones replaced), pandas' missing values (``pd.NA``, ``pd.NaT``) as null, sets as lists;
    anything else as its text."""
    if hasattr(value, "tolist") and hasattr(value, "dtype"):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if type(value).__name__ in ("NAType", "NaTType"):
        return None
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return str(value)


_JSON_COLUMNS = b"promptscope.json_columns"  # Parquet metadata: columns saved as JSON text


def _to_parquet(df: Any) -> bytes:
    """Parquet bytes. Object columns that Parquet would change are saved as JSON text and
    named in the file's metadata: dicts (Parquet structs give every row the union of the keys)
    and mixed scalars (Parquet has one type per column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    df = df.reset_index(drop=True)
    names = df.columns.map(str)  # Parquet names are text: 0 and "0" would clash
    if names.duplicated().any():
        dup = sorted(set(names[names.duplicated()]))
        raise ValueError(f"A table to save has duplicate column names {dup}; rename them.")
    as_json = [col for col in df.columns if df[col].dtype == object and _needs_json(df[col])]
    if as_json:
        df = df.copy()
        for col in as_json:
            df[col] = df[col].map(lambda v: None if v is None else _dumps(v))
    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = {**(table.schema.metadata or {}),
            _JSON_COLUMNS: json.dumps([str(c) for c in as_json]).encode()}
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), buf)
    return buf.getvalue()


def _needs_json(column: Any) -> bool:
    """Whether Parquet would not give ``column``'s values back as they are."""
    import pyarrow as pa

    if column.map(_has_dict).any():
        return True
    try:
        pa.array(column, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
        return True  # e.g. ints and strings in one column, or an int past 64 bits
    return False


def _has_dict(value: Any) -> bool:
    return isinstance(value, dict) or (
        isinstance(value, (list, tuple)) and any(_has_dict(v) for v in value))


def _from_parquet(blob: bytes) -> Any:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(blob))
    as_json = json.loads((table.schema.metadata or {}).get(_JSON_COLUMNS, b"[]"))
    df = table.to_pandas()
    for col in df.columns:
        if str(col) in as_json:
            df[col] = df[col].map(lambda v: json.loads(v) if isinstance(v, str) else None)
        elif df[col].dtype == object and df[col].map(_has_array).any():
            df[col] = df[col].map(_lists)  # list cells come back as numpy arrays
    return df


def _has_array(value: Any) -> bool:
    import numpy as np

    return isinstance(value, np.ndarray) or (
        isinstance(value, dict) and any(_has_array(v) for v in value.values()))


def _lists(value: Any) -> Any:
    """``value`` with every numpy array in it, at any depth, turned back into a list."""
    import numpy as np

    if isinstance(value, np.ndarray):  # numbers: plain Python ones; objects: look inside
        return value.tolist() if value.dtype != object else [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


def new_session_id(now: float | None = None) -> str:
    """A new session id: the local time to the second and 6 random hex digits."""
    now = time.time() if now is None else now
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + "-" + secrets.token_hex(3)


def default_session_name(kind: str, source: str, sid: str) -> str:
    """An unnamed session's name: its kind and the start of its source (the template), which
    says more in a list of sessions than the id beside it; the id where there is no source."""
    first = next((line.strip() for line in source.splitlines() if line.strip()), "")
    if not first:
        return f"{kind} {sid}"
    return f"{kind}: {first if len(first) <= 60 else first[:59] + '…'}"
