"""Errors of widget callbacks, shown where the user looks.

An exception raised in an ipywidgets callback goes to JupyterLab's log console, behind a
badge in the status bar: the widget looks as if nothing happened (a run "Running…" forever).
"""

from __future__ import annotations

import functools
import html
from collections.abc import Callable
from typing import Any

import ipywidgets as w

from promptscope.errors import describe


def shows_errors(status: w.HTML, callback: Callable[..., Any]) -> Callable[..., Any]:
    """``callback`` for a widget event: an error it raises (a bad setting, a failed run) is
    written into ``status`` in one line instead.

    Example:
        >>> button.on_click(shows_errors(self.status, lambda _: self.run()))  # doctest: +SKIP
    """
    @functools.wraps(callback)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except Exception as exc:  # any: the user must see it
            status.value = (f"<b>Error:</b> {html.escape(type(exc).__name__)}: "
                            f"{html.escape(describe(exc))}")
            return None
    return call
