"""Streams an analysis' rows into its session as they are computed.

Every analysis runs inside a :class:`Recorder`: rows go to the store chunk by chunk, so a run
stopped by an interrupt or an error keeps what it finished (status ``interrupted`` / ``failed``),
``promptscope.load(id)`` brings the partial result back, and the exception that stopped the run
carries it as ``exc.partial_result``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from typing import Any

from promptscope.errors import PromptscopeError
from promptscope.interrupts import running_frames
from promptscope.result import Result
from promptscope.store import Store, default_session_name, new_session_id


class Recorder:
    """Context manager that owns one session while an analysis runs."""

    #: This process's sessions whose run has not finished, and the frame of the function that
    #: runs each. One whose frame is no longer running lost its clean-up to a Ctrl-C (it landed
    #: as a ``with`` block was left, before any ``__exit__`` code ran): the next run marks it
    #: interrupted.
    unfinished: dict[str, Any] = {}

    @classmethod
    def stranded(cls) -> list[str]:
        """The unfinished sessions whose run no longer goes on on any thread (no longer
        counted as unfinished once returned)."""
        running = running_frames()
        gone = [sid for sid, frame in cls.unfinished.items() if id(frame) not in running]
        for sid in gone:
            cls.unfinished.pop(sid, None)
        return gone

    def __init__(self, kind: str, *, name: str = "", model: Any = None,
                 params: dict[str, Any] | None = None, source: str = "", save: bool = True,
                 store: Store | None = None) -> None:
        self.kind = kind
        self.name = name
        # a loaded model, or the description of the one a saved result came from
        self.model_info = model.describe() if hasattr(model, "describe") else dict(model or {})
        self.params = dict(params or {})
        self.source = source
        self.store = (store or Store.default()) if save else None
        self.session_id: str | None = None
        self.frames: dict[str, list[Any]] = {}
        # chunks kept here but not (yet) in the store: (table, number in the table, rows)
        self.unsaved: list[tuple[str, int, Any]] = []
        self.figure: Any = None
        self.finished = False  # the session's final status is written

    def __enter__(self) -> Recorder:
        if self.store is not None:
            # The id is known before the session is written, so a Ctrl-C that lands as the
            # write returns cannot leave a session no one marks as interrupted.
            self.session_id = new_session_id()
            self.name = self.name or default_session_name(self.kind, self.source,
                                                          self.session_id)
            Recorder.unfinished[self.session_id] = sys._getframe(1)  # the analysis' frame
            try:
                self.store.create(
                    self.kind, name=self.name, model=self.model_info.get("name", ""),
                    model_info=self.model_info, params=self.params, source=self.source,
                    session_id=self.session_id, stranded=Recorder.stranded())
            except BaseException:
                with contextlib.suppress(Exception):  # it may or may not have been written
                    self.store.finish(self.session_id, "interrupted")
                Recorder.unfinished.pop(self.session_id, None)
                self.session_id = None
                raise
        return self

    def enter(self, stack: contextlib.ExitStack) -> Recorder:
        """``stack.enter_context(self)`` without its gap: the exit is registered first, so a
        Ctrl-C that lands just after the session is created still finishes it."""
        stack.push(self.__exit__)
        self.__enter__()
        if self.session_id:
            Recorder.unfinished[self.session_id] = sys._getframe(1)
        return self

    def add(self, df: Any, table: str = "rows") -> None:
        """Keep ``df`` and append it to the session's ``table`` right away. (Kept in memory
        first: a store that cannot be written, or an interrupt during the write, loses no row;
        the chunk is written again when the run ends.)"""
        self.frames.setdefault(table, []).append(df)
        if self.store is not None and self.session_id:
            self.unsaved.append((table, len(self.frames[table]) - 1, df))
            self._save_chunks()

    def _save_chunks(self) -> None:
        while self.unsaved:
            table, seq, df = self.unsaved[0]
            # numbered: one written just before an interrupt is not written twice
            self.store.append(self.session_id, table, df, seq=seq)  # type: ignore[union-attr]
            self.unsaved.pop(0)

    def result(self, status: str = "done") -> Result:
        import pandas as pd

        tables = {k: pd.concat(v, ignore_index=True) for k, v in self.frames.items()}
        df = tables.pop("rows", pd.DataFrame())
        return Result(kind=self.kind, df=df, params=self.params, session_id=self.session_id,
                      model=self.model_info, source=self.source, name=self.name, status=status,
                      tables=tables)

    def save_run_info(self, model: Any, verbose: bool = False) -> None:
        """Save the backend's per-run facts (API requests, failures, cache hits, tokens, cost)
        as ``params["api"]``; print a line on them when ``verbose`` or when requests failed."""
        info = model.run_info()
        if not info:
            return
        self.params["api"] = info  # (saved with the other params when the run ends)
        if verbose or info.get("failed"):
            print(api_note(info), file=sys.stderr)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        status = ("done" if exc_type is None else
                  "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed")
        try:
            self._exit(status, exc_type, exc)
        except KeyboardInterrupt as stop:  # (another) Ctrl-C while finishing
            stop.partial_result = self.result("interrupted")  # type: ignore[attr-defined]
            if self.store is not None and self.session_id and not self.finished:
                self._write_status("interrupted")
            raise

    def _exit(self, status: str, exc_type: Any, exc: Any) -> None:
        result = self.result(status)
        if exc_type is not None:
            # Hand what was computed to the caller: ``exc.partial_result`` (the magics show it).
            try:
                exc.partial_result = result
            except AttributeError:  # an exception type that refuses attributes
                pass
        if self.store is None or not self.session_id:
            return
        try:
            self._finish(status, result, exc_type, exc)
        except Exception as failed:  # e.g. a full disk: the run's rows must still reach the user
            print(f"The session store could not record the end of the run ({failed}); all "
                  f"{len(result.df)} rows are in the "
                  f"{'result' if exc_type is None else 'exception: exc.partial_result'}.",
                  file=sys.stderr)
            if exc_type is None:  # a run that was not saved must not pass for saved
                err = PromptscopeError(
                    f"The run finished and all its rows are in session {self.session_id}, but "
                    f"the store could not record the rest ({failed}); the session may show as "
                    "running until this kernel ends. The whole result is in "
                    "exc.partial_result." if not self.unsaved else
                    f"The run finished, but its session {self.session_id} could not be saved: "
                    f"{failed}")
                err.partial_result = self.result("failed")  # type: ignore[attr-defined]
                raise err from None
            return
        if status == "interrupted":
            print(f"Interrupted: {len(result.df)} rows kept in session {self.session_id} "
                  f"(status interrupted); promptscope.load('{self.session_id}') brings them back.",
                  file=sys.stderr)

    def _write_status(self, status: str, error: str = "") -> None:
        """The session's final status, with the number of its rows in the store."""
        assert self.store is not None and self.session_id is not None
        saved = sum(len(df) for df in self.frames.get("rows", [])) - sum(
            len(df) for table, _, df in self.unsaved if table == "rows")
        self.store.finish(self.session_id, status, error=error, summary={"rows": saved})
        self.finished = True
        Recorder.unfinished.pop(self.session_id, None)

    def _finish(self, status: str, result: Result, exc_type: Any, exc: Any) -> None:
        """Write what the store still lacks (chunks, the params as they ended, the figure),
        then the final status, also when interrupted meanwhile; raises the first write that
        failed, after the status."""
        assert self.store is not None and self.session_id is not None
        error = "" if exc_type is None or status == "interrupted" else f"{exc_type.__name__}: {exc}"
        failed: Exception | None = None
        try:
            for write in (self._save_chunks,
                          lambda: self.store.update_params(self.session_id, self.params)):
                try:
                    write()
                except Exception as err:  # noqa: PERF203 (each write is tried)
                    failed = failed or err
            if failed is not None and status == "done":
                status, error = "failed", f"the session store could not be written: {failed}"
            if status == "done":
                try:  # a figure that cannot be drawn must not cost the finished run
                    fig = result.figure()
                    if fig is not None:
                        self.store.save_figure(self.session_id, "main", fig)
                except Exception as err:  # any plotting error
                    print(f"The run is saved, but its figure could not be: "
                          f"{type(err).__name__}: {err}", file=sys.stderr)
        except BaseException:  # an interrupt while finishing: the session must not stay running
            status, error = "interrupted", ""
            raise
        finally:
            self._write_status(status, error)
        if failed is not None:
            raise failed


def api_note(info: Mapping[str, Any]) -> str:
    """One line on an API run: requests, failures, cache hits, tokens, cost, scoring method."""
    parts = [f"{info['requests']} requests"]
    if info.get("cached"):
        parts.append("all from the cache (no cost)" if info["cached"] == info["requests"]
                     else f"{info['cached']} from the cache")
    if info.get("failed"):
        parts.append(f"{info['failed']} FAILED after retries (see the 'error' column)")
    if info.get("retries"):
        parts.append(f"{info['retries']} retries")
    parts.append(f"{info.get('prompt_tokens', 0)} prompt + {info.get('completion_tokens', 0)} "
                 "completion tokens")
    if "cost_usd" in info:
        parts.append(f"${info['cost_usd']:.4f}")
    if info.get("scoring"):
        parts.append(f"choices scored by {info['scoring']}")
    return "API: " + ", ".join(parts) + "."
