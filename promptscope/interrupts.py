"""Telling a block that is still running from one a Ctrl-C cut off.

CPython raises a pending KeyboardInterrupt at the next check between bytecodes, and one such
check is the entry of any Python function, ``__exit__`` methods included. A Ctrl-C that lands
as a ``with`` block is left, at the entry of a Python ``__exit__`` (contextlib's generator and
ExitStack exits among them), skips that block's clean-up, and the traceback (which IPython keeps
until the next error) keeps what it held alive. The recorder and ``steer`` note the frame whose
code runs their block, and find such blocks later by that frame no longer running.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from types import FrameType


def with_frame() -> FrameType | None:
    """The frame of the ``with`` statement (or the call) that entered the calling context
    manager: the first frame up the stack that is neither contextlib's nor a generator's (a
    ``@contextmanager`` body, or a generator that holds the block)."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename == contextlib.__file__
                                 or frame.f_code.co_flags & inspect.CO_GENERATOR):
        frame = frame.f_back
    return frame


def running_frames() -> set[int]:
    """The ids of the frames on some thread's stack now."""
    ids = set()
    for top in sys._current_frames().values():
        frame: FrameType | None = top
        while frame is not None:
            ids.add(id(frame))
            frame = frame.f_back
    return ids
