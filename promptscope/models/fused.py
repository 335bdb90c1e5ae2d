"""Functions compiled into fused kernels on CUDA, and run as they are elsewhere.

Used for steering's ``flex_attention`` path, whose eager form materialises the full score
matrix. On the CPU, compiling costs more than it saves in a notebook, so the plain function runs
there (it computes the same numbers). Compiling is not free on a GPU either: each call pays
dynamo's guards, so a few small elementwise ops (the ICV's shift, measured on an H200) run
faster uncompiled.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch


def fused_on_cuda(fn: Callable[..., Any], what: str, *, eager: Callable[..., Any] | None = None
                  ) -> Callable[..., Any]:
    """``fn`` compiled with ``torch.compile`` when its first argument is a CUDA tensor.

    ``eager`` (default ``fn``) runs on other devices and, with one warning, for good if
    compiling fails (a missing compiler, an unsupported GPU): the same numbers, unfused.

    Example:
        >>> import torch
        >>> double = fused_on_cuda(lambda x: x * 2, "doubling")
        >>> double(torch.ones(2)).tolist()  # on the CPU: the plain function
        [2.0, 2.0]
    """
    eager = eager or fn
    state: dict[str, Any] = {}

    def call(*args: Any, **kwargs: Any) -> Any:
        if args[0].device.type == "cuda" and "broken" not in state:
            try:
                if "fn" not in state:
                    state["fn"] = torch.compile(fn)
                return state["fn"](*args, **kwargs)
            except Exception as exc:  # a compiler failure: the eager form gives the same numbers
                state["broken"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                warnings.warn(f"{what} could not be compiled here ({state['broken']}); it runs "
                              "unfused.", stacklevel=2)
        return eager(*args, **kwargs)

    call.state = state  # type: ignore[attr-defined]  # for tests and diagnostics
    return call
