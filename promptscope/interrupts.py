"""Telling a block that is still running from one a Ctrl-C cut off.

CPython raises a pending KeyboardInterrupt at the next check between bytecodes, and one such
check is the entry of any Python function, ``__exit__`` methods included. A Ctrl-C that lands
as a ``with`` block is left, at the entry of a Python ``__exit__`` (contextlib's generator and
ExitStack exits among them), skips that block's clean-up, and the traceback (which IPython keeps
until the next error) keeps what it held alive. The recorder and ``steer`` note the frame whose
code runs their block, and find such blocks later by that frame no longer running. (A block
entered another way, by a wrapper's ``__enter__`` call or in a generator, is left alone.)
"""

from __future__ import annotations

import contextlib
import dis
import inspect
import sys
from types import FrameType

_WITH_OPS = {dis.opmap[name] for name in ("BEFORE_WITH", "SETUP_WITH") if name in dis.opmap}


def with_frame() -> FrameType | None:
    """The frame whose ``with`` statement entered the calling context manager (directly, or
    through an ``ExitStack`` it holds), or None where it was entered otherwise: by a call of
    ``__enter__`` (a wrapper class) or inside a generator (a fixture, a ``@contextmanager``
    body), whose block may well outlive the frame, or go on while it is suspended."""
    frame = sys._getframe(2)  # past the calling context manager's own frame
    via_stack = False
    while frame is not None and frame.f_code.co_filename == contextlib.__file__:
        via_stack = via_stack or frame.f_code.co_name == "enter_context"
        frame = frame.f_back
    if frame is None or frame.f_code.co_flags & inspect.CO_GENERATOR:
        return None
    at_with = frame.f_code.co_code[frame.f_lasti] in _WITH_OPS
    return frame if at_with or via_stack else None


def running_frames() -> set[int]:
    """The ids of the frames on some thread's stack now."""
    ids = set()
    for top in sys._current_frames().values():
        frame: FrameType | None = top
        while frame is not None:
            ids.add(id(frame))
            frame = frame.f_back
    return ids
