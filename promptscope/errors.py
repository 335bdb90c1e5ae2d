"""User-facing errors.

Every error a user can fix by changing their input is a :class:`PromptscopeError`. The magics
turn it into a short IPython ``UsageError`` (no traceback); in IPython and Jupyter a Python API
call that raises one shows the same short message (``_render_traceback_``, IPython's hook for
exceptions that draw themselves); plain Python gets the usual traceback.
"""

from __future__ import annotations

import traceback

#: Show promptscope's own frames under a PromptscopeError in IPython and Jupyter (for debugging
#: promptscope itself); by default only the message, which says what to change.
full_tracebacks = False


class PromptscopeError(ValueError):
    """Bad input: the message says what to change."""

    def _render_traceback_(self) -> list[str]:
        if full_tracebacks:
            return "".join(traceback.format_exception(self)).splitlines()
        return [f"\x1b[0;31m{type(self).__name__}\x1b[0m: {describe(self)}"]


def describe(exc: BaseException) -> str:
    """The error's message, and where the rows computed before it are kept, if any."""
    message = str(exc)
    partial = getattr(exc, "partial_result", None)
    if partial is not None and partial.session_id:
        message += (f"\n(The {len(partial.df)} rows computed before this are saved in session "
                    f"{partial.session_id}.)")
    return message


class TemplateError(PromptscopeError):
    """A ``%%prompt`` template that cannot be parsed or filled."""


class ModelLoadError(PromptscopeError):
    """A model name or folder that does not load."""


class CapabilityError(PromptscopeError):
    """An analysis asked a backend for something it cannot do (e.g. attention on an API model)."""
