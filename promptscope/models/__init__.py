"""Model loading and the per-kernel model cache.

``load_model`` is the one way to get a :class:`~promptscope.models.base.Model`; it remembers what
it loaded, so a notebook that re-runs a cell does not load the weights twice, and the last model
loaded is the default for ``%%prompt`` and ``run_prompt``.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from promptscope.errors import ModelLoadError
from promptscope.models.base import Generation, Model, Score

__all__ = ["Model", "Score", "Generation", "load_model", "loaded_models", "default_model",
           "resolve_model", "ORGANISM_NAME"]

ORGANISM_NAME = "organism"
#: Prefix of API model names: ``"openai:MODEL"`` (OpenAI, vLLM, llama.cpp server...).
API_PREFIX = "openai:"
_loaded: dict[str, Model] = {}
_default: list[Model] = []


def organism_path() -> Path:
    """Folder of the bundled model organism (shipped inside the package)."""
    return Path(__file__).resolve().parent.parent / "organism" / "model"


def load_model(
    name: str | os.PathLike,
    *,
    device: str | None = None,
    dtype: str | None = None,
    reload: bool = False,
    alias: str | None = None,
    make_default: bool = True,
    base_url: str | None = None,
    api_key: str | None = None,
    **kwargs: Any,
) -> Model:
    """Load a model (cached per kernel) and make it the default for later runs.

    Args:
        name: ``"organism"`` (the bundled model organism), a local model folder, a hub name, or
            ``"openai:MODEL"`` for a model behind an OpenAI-compatible API (OpenAI, vLLM,
            llama.cpp server; see :class:`~promptscope.models.openai_api.OpenAIModel`).
        device: ``"cuda"``, ``"mps"``, ``"cpu"``...; default: the best available.
        dtype: ``"bf16"``, ``"fp16"``, ``"fp32"``; default: bf16 on capable GPUs, else fp32.
        reload: load again even if this name is cached.
        alias: the name to show in tables and sessions (default: derived from ``name``).
        make_default: make it the model that later runs use when they name none.
        base_url: API models only: the server's API root, e.g. ``http://localhost:8000/v1``.
        api_key: API models only: the key (default: ``$OPENAI_API_KEY`` for OpenAI).
        kwargs: passed to ``AutoModelForCausalLM.from_pretrained``, or for API models to
            ``OpenAIModel`` (``max_concurrency``, ``timeout``, ``cache``, ``prices``...).

    Example:
        >>> import promptscope
        >>> model = promptscope.load_model("organism")   # doctest: +SKIP
        >>> api = promptscope.load_model("openai:gpt-4o-mini")   # doctest: +SKIP
    """
    name = os.fspath(name)  # a pathlib.Path to a model folder, too
    if name.startswith(API_PREFIX):
        return _load_api_model(name, base_url=base_url, api_key=api_key, alias=alias,
                               reload=reload, make_default=make_default, **kwargs)
    if base_url is not None or api_key is not None:
        raise ModelLoadError("base_url and api_key are for API models: name them "
                             "'openai:MODEL' (e.g. 'openai:gpt-4o-mini').")
    key = f"{name}|{device}|{dtype}|{alias}"
    if key in _loaded and not reload:
        model = _loaded[key]
    else:
        from promptscope.models.hf import HFModel

        if name == ORGANISM_NAME:
            path = organism_path()
            if not (path / "config.json").exists():
                raise ModelLoadError(
                    f"The bundled model organism is missing from this install ({path}). "
                    "Reinstall promptscope, or train it with scripts/train_organism.py."
                )
            model = HFModel.from_pretrained(path, device=device, dtype=dtype,
                                            name=alias or ORGANISM_NAME, **kwargs)
        else:
            try:
                model = HFModel.from_pretrained(name, device=device, dtype=dtype, name=alias,
                                                **kwargs)
            except ModelLoadError as exc:  # a typo of a name this kernel knows?
                known = [ORGANISM_NAME, *(m.name for m in loaded_models())]
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
                if close and not os.path.exists(name):
                    raise ModelLoadError(f"No model '{name}': did you mean '{close[0]}'? "
                                         f"({exc})") from None
                raise
        _loaded[key] = model
    if make_default:
        _default[:] = [model]
    return model


def _load_api_model(name: str, *, base_url: str | None, api_key: str | None,
                    alias: str | None, reload: bool, make_default: bool, **kwargs: Any) -> Model:
    """``load_model`` for ``openai:MODEL`` names (cached per kernel like local models)."""
    import hashlib

    from promptscope.models.openai_api import OpenAIModel

    # The cache key holds a hash of the key, never the key (a changed key loads afresh).
    secret = hashlib.sha256((api_key or "").encode()).hexdigest()[:12]
    key = f"{name}|{base_url}|{secret}|{alias}|{sorted(kwargs.items())!r}"
    if key in _loaded and not reload:
        model = _loaded[key]
    else:
        model = OpenAIModel(name[len(API_PREFIX):], base_url=base_url, api_key=api_key,
                            name=alias, **kwargs)
        _loaded[key] = model
    if make_default:
        _default[:] = [model]
    return model


#: How to load a model, for the messages that find none.
HOW_TO_LOAD = ("`%promptscope model organism` (the bundled model; or a model folder, or "
               "openai:MODEL) in a notebook, or promptscope.load_model('organism') in Python.")


def loaded_models() -> list[Model]:
    """Models loaded in this kernel, oldest first."""
    return list(dict.fromkeys(_loaded.values()))


def default_model() -> Model | None:
    """The model loaded last, or ``None``."""
    return _default[0] if _default else None


def resolve_model(model: Model | str | os.PathLike | None) -> Model:
    """A ``Model`` from an instance, a name to load, or ``None`` (the default model)."""
    if isinstance(model, Model):
        return model
    if isinstance(model, (str, os.PathLike)):
        for m in loaded_models():
            if m.name == model:
                return m
        return load_model(model, make_default=False)
    if model is not None:  # e.g. arguments in another order: say what was given
        raise ModelLoadError(f"model must be a loaded model, its name or a model folder, not "
                             f"a {type(model).__name__} ({str(model)[:60]!r}); check the "
                             "order of the arguments.")
    if _default:
        return _default[0]
    names = [m.name for m in loaded_models()]
    if names:  # loaded by name inside a call (model="..."), which picks no default
        raise ModelLoadError(
            f"No default model: {', '.join(names)} {'is' if len(names) == 1 else 'are'} loaded "
            f"but not the default. Name one (--model {names[-1]} / model={names[-1]!r}) or "
            f"make it the default: `%promptscope model {names[-1]}` / "
            f"promptscope.load_model({names[-1]!r}).")
    raise ModelLoadError(f"No model loaded. Load one first: {HOW_TO_LOAD}")
