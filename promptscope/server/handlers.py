"""REST handlers under ``/promptscope/api/``: list, get, rename, delete, figures, exports.

Every handler is ``@tornado.web.authenticated`` and ``@authorized`` (resource ``promptscope``),
so a request needs the server's token or login cookie and passes the server's authorizer like
any other Jupyter API. SQLite calls run in a thread pool: a kernel holding the write lock for a
moment never stalls the server's event loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from promptscope.errors import PromptscopeError
from promptscope.server.reader import (
    NoSessionsYet,
    StoreReader,
    StoreUnavailable,
    json_safe,
    session_html,
    valid_name,
)
from promptscope.store import Store, StoreUnwritable, plain_json

T = TypeVar("T")
# A few threads are plenty: requests are short and SQLite serialises writers anyway.
_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="promptscope")
# Summaries, figures and exports of large sessions take seconds: their own threads, so the
# list (and rename, delete) never waits behind them.
_HEAVY = ThreadPoolExecutor(max_workers=2, thread_name_prefix="promptscope-heavy")
MAX_NAME = 200


class _Base(APIHandler):
    """Shared plumbing: the store path, id checks, thread-pool calls, JSON errors."""

    auth_resource = "promptscope"

    @property
    def store_path(self) -> Any:
        return self.settings["promptscope_store_path"]

    def reader(self) -> StoreReader:
        return StoreReader(self.store_path)

    def check_name(self, value: str, what: str = "session id") -> str:
        if not valid_name(value):
            raise web.HTTPError(400, f"Invalid {what}.")
        return value

    async def call(self, fn: Callable[..., T], *args: Any, heavy: bool = False,
                   **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(_HEAVY if heavy else _POOL,
                                              lambda: fn(*args, **kwargs))
        except StoreUnwritable as exc:  # a read-only folder, a full disk
            raise web.HTTPError(503, str(exc)) from exc
        except (PromptscopeError, NoSessionsYet) as exc:  # unknown id
            raise web.HTTPError(404, str(exc)) from exc
        except StoreUnavailable as exc:
            raise web.HTTPError(503, str(exc)) from exc

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        # APIHandler already answers JSON {"message": ...}; keep its shape, drop tracebacks.
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = getattr(exc, "log_message", None) or self._reason
        self.finish(json.dumps({"message": message, "reason": self._reason}))


class SessionsHandler(_Base):
    """``GET /promptscope/api/sessions``: one page of the list, newest first."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        arg = self.get_query_argument
        try:
            limit = int(arg("limit", "50"))
            offset = int(arg("offset", "0"))
        except ValueError as exc:
            raise web.HTTPError(400, "limit and offset must be integers.") from exc
        query = {"kind": arg("kind", "") or None, "model": arg("model", "") or None,
                 "status": arg("status", "") or None, "search": arg("search", "") or None,
                 "limit": limit, "offset": offset}
        reader = self.reader()
        body: dict[str, Any] = {"store": str(self.store_path), "error": ""}
        try:
            body.update(await asyncio.get_running_loop().run_in_executor(
                _POOL, lambda: reader.page(**query)))
        except ValueError as exc:
            raise web.HTTPError(400, str(exc)) from exc
        except StoreUnavailable as exc:
            # An empty list with a message: the panel shows it instead of breaking.
            missing = not reader.path.is_file()
            body.update({"sessions": [], "total": 0, "limit": limit, "offset": offset,
                         "kinds": [], "models": [], "error": "" if missing else str(exc)})
        self.finish(json.dumps(body))


class SessionHandler(_Base):
    """``GET / PATCH / DELETE /promptscope/api/sessions/<id>``."""

    @web.authenticated
    @authorized
    async def get(self, session_id: str) -> None:
        self.check_name(session_id)
        reader = self.reader()
        detail = await self.call(reader.detail, session_id, heavy=True)
        self.finish(json.dumps(json_safe(detail), default=str, allow_nan=False))

    @web.authenticated
    @authorized
    async def patch(self, session_id: str) -> None:
        self.check_name(session_id)
        body = self.get_json_body() or {}
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name.strip():
            raise web.HTTPError(400, "Give a non-empty 'name'.")
        name = name.strip()
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: SQLite cannot store it
            raise web.HTTPError(400, "The name is not valid text (a lone surrogate).") from None
        if len(name) > MAX_NAME:
            raise web.HTTPError(400, f"A name has at most {MAX_NAME} characters.")
        await self.call(self.reader().get, session_id)  # 404 / 503 before writing
        await self.call(Store(self.store_path).rename, session_id, name)
        record = await self.call(self.reader().get, session_id)
        self.finish(json.dumps({"id": record.id, "name": record.name}))

    @web.authenticated
    @authorized
    async def delete(self, session_id: str) -> None:
        self.check_name(session_id)
        record = await self.call(self.reader().get, session_id)  # 404 before touching anything
        if record.status == "running":  # its kernel is alive and still writing to it
            raise web.HTTPError(409, "This session is still running in a kernel; interrupt the "
                                "kernel or wait for the run to end, then delete it.")
        await self.call(Store(self.store_path).delete, session_id)
        self.set_status(204)
        self.finish()


class FigureHandler(_Base):
    """``GET /promptscope/api/sessions/<id>/figures/<name>``: the plotly JSON."""

    @web.authenticated
    @authorized
    async def get(self, session_id: str, name: str) -> None:
        self.check_name(session_id)
        self.check_name(name, "figure name")
        spec = await self.call(self.reader().figure, session_id, name, heavy=True)
        if spec is None:
            raise web.HTTPError(404, f"Session {session_id} has no figure {name!r}.")
        self.finish(spec)


class ExportHandler(_Base):
    """``GET /promptscope/api/sessions/<id>/export/(csv|html)``: a download.

    ``csv`` takes ``?table=rows`` (default) and gives that table; ``html`` a standalone report.
    """

    @web.authenticated
    @authorized
    async def get(self, session_id: str, fmt: str) -> None:
        self.check_name(session_id)
        reader = self.reader()
        await self.call(reader.get, session_id)
        if fmt == "csv":
            table = self.check_name(self.get_query_argument("table", "rows"), "table name")
            names = await self.call(reader.table_names, session_id)
            if table not in names:
                raise web.HTTPError(404, f"Session {session_id} has no table {table!r}.")
            body = await self.call(table_csv, reader, session_id, table, heavy=True)
            ctype = "text/csv; charset=utf-8"
            filename = f"{session_id}-{table}.csv"
        elif fmt == "html":
            body = await self.call(session_html, reader, session_id, heavy=True)
            ctype = "text/html; charset=utf-8"
            filename = f"{session_id}.html"
        else:
            raise web.HTTPError(404, "Export formats: csv, html.")
        # The id and table name are validated, so the file name needs no quoting tricks.
        self.set_header("Content-Disposition", f'attachment; filename="{filename}"')
        self.set_header("X-Content-Type-Options", "nosniff")
        self.finish(body, set_content_type=ctype)


def table_csv(reader: StoreReader, session_id: str, table: str) -> str:
    """One table as CSV text, its list and dict cells as JSON (not Python's repr), bytes
    decoded (undecodable ones replaced)."""
    df = reader.table(session_id, table)
    for col in df.columns:
        if df[col].dtype == object:
            df[col] = df[col].map(_csv_cell)
    return df.to_csv(index=False)


def _csv_cell(value: Any) -> Any:
    if isinstance(value, bytes):
        return plain_json(value)
    if isinstance(value, (list, tuple, dict)) or hasattr(value, "tolist"):
        return json.dumps(value, ensure_ascii=False, default=plain_json)
    return value


def handlers(base_url: str) -> list[tuple[str, type]]:
    """The URL table, under the server's base URL."""
    api = url_path_join(base_url, "promptscope", "api")
    seg = r"([^/]+)"
    return [
        (url_path_join(api, "sessions"), SessionsHandler),
        (url_path_join(api, "sessions", seg), SessionHandler),
        (url_path_join(api, "sessions", seg, "figures", seg), FigureHandler),
        (url_path_join(api, "sessions", seg, "export", r"(csv|html)"), ExportHandler),
    ]
