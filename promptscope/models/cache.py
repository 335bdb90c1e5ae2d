"""On-disk cache of API responses, so re-running a notebook costs no requests.

Responses are stored in one SQLite file per workspace (beside the session store, see
:func:`promptscope.store.workspace_dir`), keyed by a hash of (endpoint, model, request kind,
request body). The API key is never part of a key or a value. Several kernels may share the file
(WAL mode, busy timeout), and the cache is safe to use from many threads at once.

Example:
    >>> cache = ResponseCache.default()                                    # doctest: +SKIP
    >>> key = cache.key("http://127.0.0.1:8000/v1", "m", "completions",
    ...                 {"prompt": "Hi"})                                  # doctest: +SKIP
    >>> cache.get(key) is None                                             # doctest: +SKIP
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

#: File name of the cache inside the workspace folder.
CACHE_FILE = "api_cache.sqlite"


class ResponseCache:
    """A persistent ``key -> JSON response`` map (thread-safe)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False,
                                     isolation_level=None)
        for attempt in range(50):
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY "
                                   "KEY, value TEXT NOT NULL, created REAL NOT NULL)")
                break
            except sqlite3.OperationalError as exc:
                # Another connection (kernel) switching the new file to WAL at the same moment
                # makes this fail at once, without the busy timeout: wait and try again.
                if "locked" not in str(exc) or attempt == 49:
                    raise
                time.sleep(0.1)

    @classmethod
    def default(cls) -> ResponseCache:
        """The cache of the current workspace (``$PROMPTSCOPE_HOME`` or ``.promptscope/``)."""
        from promptscope.store import workspace_dir

        return cls(workspace_dir() / CACHE_FILE)

    @staticmethod
    def key(endpoint: str, model: str, kind: str, body: dict[str, Any]) -> str:
        """A stable hash of everything that determines a response."""
        text = json.dumps([endpoint.rstrip("/"), model, kind, body], sort_keys=True,
                          ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached response for ``key``, or ``None``."""
        with self._lock:
            row = self._conn.execute("SELECT value FROM responses WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        """Store a response (replacing any earlier one)."""
        text = json.dumps(value, ensure_ascii=False)
        with self._lock:
            self._conn.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?)",
                               (key, text, time.time()))

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def clear(self) -> None:
        """Forget every cached response."""
        with self._lock:
            self._conn.execute("DELETE FROM responses")
