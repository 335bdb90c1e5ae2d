"""promptscope: a Jupyter-native workbench for studying how prompts drive language models.

In a notebook::

    %load_ext promptscope
    %promptscope model organism
    %%prompt --choices " yes| no"
    Is {city} in {{Europe|Asia}}? Answer:

The same from Python::

    import promptscope
    model = promptscope.load_model("organism")
    run = promptscope.run_prompt("Is {city} in {{Europe|Asia}}? Answer:",
                                 vars=[{"city": "Paris"}], choices=" yes| no")
    run.df, run.figure(), promptscope.load(run.session_id)

Importing promptscope does not import torch or transformers; they load with the first model.
"""

from __future__ import annotations

from typing import Any

from promptscope.analyses.attention import attention
from promptscope.analyses.attribution import attribute
from promptscope.analyses.compare_steering import compare_steering
from promptscope.analyses.heads import profile_heads
from promptscope.analyses.knob import find_knob, intent_patching, knob_sweep
from promptscope.analyses.prompt import run_prompt
from promptscope.analyses.reachability import reachability
from promptscope.analyses.sensitivity import format_spread, posix, select_prompt
from promptscope.analyses.steering_vectors import contrastive_vector, in_context_vector
from promptscope.errors import PromptscopeError
from promptscope.models import default_model, load_model, loaded_models
from promptscope.result import Result
from promptscope.store import Store
from promptscope.templates import parse_template

__version__ = "0.1.0"
__all__ = [
    # running prompts, attention and steering
    "run_prompt", "attention", "profile_heads", "steer",
    "contrastive_vector", "in_context_vector", "load_vector", "compare_steering",
    "find_knob", "knob_sweep", "intent_patching",
    # analyses
    "format_spread", "posix", "select_prompt", "reachability", "attribute",
    # models, sessions, templates
    "load_model", "list_models", "load", "sessions", "parse_template",
    "Result", "Store", "PromptscopeError", "__version__",
]


def steer(model: Any, **kwargs: Any) -> Any:
    """Steer a model inside a ``with`` block: PASTA (``method="pasta"``, the default), a
    steering vector (``method="vector"``, ``vector=``, ``strength=``, ``layers=``) or both
    (``"pasta+vector"``); see :func:`promptscope.models.steering.steer` (imported lazily).

    Example:
        >>> with promptscope.steer(model, heads="all", alpha=0.01, emphasis="Ann lives in Rome."):
        ...     run = promptscope.run_prompt(...)                       # doctest: +SKIP
        >>> with promptscope.steer(model, method="vector", vector=v, strength=4):
        ...     run = promptscope.run_prompt(...)                       # doctest: +SKIP
    """
    from promptscope.models.steering import steer as _steer

    return _steer(model, **kwargs)


def load_vector(name_or_id: str, *, store: Store | None = None) -> Any:
    """A saved steering vector by name or session id; see
    :func:`promptscope.models.vectors.load_vector` (imported lazily: it needs torch).

    Example:
        >>> v = promptscope.load_vector("context-caa")                 # doctest: +SKIP
    """
    from promptscope.models.vectors import load_vector as _load_vector

    return _load_vector(name_or_id, store=store)


def load(session_id: str, *, store: Store | None = None) -> Result:
    """Bring back a saved run as the Result it returned (partial for interrupted runs).

    Example:
        >>> run = promptscope.load("20261125-101500-1a2b3c")   # doctest: +SKIP
    """
    store = store or Store.default()
    rec = store.get(session_id)
    tables = {name: store.table(session_id, name) for name in store.table_names(session_id)}
    import pandas as pd

    df = tables.pop("rows", pd.DataFrame())
    return Result(kind=rec.kind, df=df, params=rec.params, session_id=rec.id,
                  model=rec.model_info, source=rec.source, name=rec.name, status=rec.status,
                  tables=tables)


def sessions(*, kind: str | None = None, model: str | None = None, search: str | None = None,
             limit: int | None = None, store: Store | None = None) -> Any:
    """Saved sessions of this workspace as a DataFrame, newest first.

    Example:
        >>> promptscope.sessions(kind="prompt", search="capital")   # doctest: +SKIP
    """
    import pandas as pd

    records = (store or Store.default()).list(kind=kind, model=model, search=search, limit=limit)
    if kind and not records:
        _check_kind(kind)
    cols = ["id", "name", "kind", "model", "status", "n_rows", "created"]
    df = pd.DataFrame([{c: getattr(r, c) for c in cols} for r in records], columns=cols)
    df["created"] = pd.to_datetime(df["created"], unit="s").dt.floor("s").dt.tz_localize("UTC")
    return df


def _check_kind(kind: str) -> None:
    """A session kind is the name of its figure module in ``promptscope.viz``; a typo there
    would otherwise just list nothing."""
    import difflib
    import pkgutil

    import promptscope.viz

    kinds = sorted(m.name for m in pkgutil.iter_modules(promptscope.viz.__path__)
                   if m.name not in ("style",) and not m.name.startswith("_"))
    if kind not in kinds:
        close = difflib.get_close_matches(kind, kinds, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise PromptscopeError(f"Unknown session kind '{kind}'.{hint} Kinds: {', '.join(kinds)}.")


def list_models() -> Any:
    """Models loaded in this kernel, oldest first, as a DataFrame; ``default`` marks the one a
    call without ``model=`` (a ``%%prompt`` cell without ``--model``) uses.

    Example:
        >>> promptscope.list_models()[["name", "backend", "default"]]    # doctest: +SKIP
    """
    import pandas as pd

    default = default_model()
    rows = [{**m.describe(), "default": m is default} for m in loaded_models()]
    return pd.DataFrame(rows, columns=None if rows else ["name", "backend", "default"])


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext promptscope``: register ``%promptscope`` and ``%%prompt``."""
    from promptscope.magics import register

    register(ipython)
