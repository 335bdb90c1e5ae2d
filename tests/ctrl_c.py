"""A Ctrl-C at a chosen point of a run, for sweeping every point where one can land.

CPython acts on a pending SIGINT between bytecodes, at a function's entry among other places;
:class:`CtrlCAt` raises KeyboardInterrupt at the ``k``-th trace event in the named files.
"""

from __future__ import annotations

import sys
from typing import Any


class CtrlCAt:
    """``with CtrlCAt(k, files, events):`` raises KeyboardInterrupt at the ``k``-th of
    ``events`` ("call", "line") in a file whose path ends with one of ``files``; ``fired`` says
    whether it did (``k`` past the last event: the run went through)."""

    def __init__(self, k: int, files: tuple[str, ...], events: tuple[str, ...] = ("call",)
                 ) -> None:
        self.k, self.files, self.events = k, files, events
        self.n, self.fired, self.where = 0, False, ""

    def _event(self, frame: Any, event: str, arg: Any) -> Any:
        if event in self.events and not self.fired:
            self.n += 1
            if self.n == self.k:
                self.fired = True
                caller = frame.f_back
                self.where = (f"{frame.f_code.co_name} ({frame.f_code.co_filename}:"
                              f"{frame.f_lineno}), from {caller.f_code.co_name if caller else ''}")
                raise KeyboardInterrupt(f"Ctrl-C at {self.where}")
        return self._event if "line" in self.events else None

    def _global(self, frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename.endswith(self.files):
            return self._event(frame, event, arg)
        return None

    def __enter__(self) -> CtrlCAt:
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.settrace(None)
