"""User-facing errors.

Every error a user can fix by changing their input is a :class:`PromptscopeError`. The magics
turn it into a short IPython ``UsageError`` (no traceback); plain Python callers get the same
one-paragraph message.
"""

from __future__ import annotations


class PromptscopeError(ValueError):
    """Bad input: the message says what to change."""


class TemplateError(PromptscopeError):
    """A ``%%prompt`` template that cannot be parsed or filled."""


class ModelLoadError(PromptscopeError):
    """A model name or folder that does not load."""


class CapabilityError(PromptscopeError):
    """An analysis asked a backend for something it cannot do (e.g. attention on an API model)."""
