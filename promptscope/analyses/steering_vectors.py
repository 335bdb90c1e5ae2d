"""Building steering vectors: contrastive activation addition (CAA) and in-context vectors (ICV).

* :func:`contrastive_vector`: the mean residual stream of the positive prompts minus that of the
  negative prompts, at chosen layers and token positions (the last token by default). Applied as
  ``h + strength * v``.
* :func:`in_context_vector` (ICV paper): for demonstration pairs ``(x, y)``, the latent states
  of ``x`` and ``y`` (last token, every layer); per layer, the ICV is the first principal
  direction of the differences ``h(y) - h(x)``. Applied with the paper's norm-preserving shift:
  ``h <- normalize(h / |h| + lambda * icv) * |h|``.

Both return a :class:`~promptscope.models.vectors.SteeringVector` (a value: save, load, add,
scale), used with ``promptscope.steer(model, method="vector", vector=v, strength=...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from promptscope.errors import PromptscopeError
from promptscope.models import resolve_model
from promptscope.models.base import Model

#: ICV: the fewest demonstration pairs from which a principal direction is estimated.
MIN_ICV_PAIRS = 2


def _prompts(side: Any, column: str = "prompt") -> list[str]:
    """Prompts from a list of strings, a DataFrame (``prompt`` column, one per variant) or a
    Result of ``%%prompt`` (its distinct prompts, in order)."""
    if hasattr(side, "df") and hasattr(side, "kind"):  # a Result
        side = side.df
    if hasattr(side, "columns"):
        if column not in side.columns:
            raise PromptscopeError(f"The DataFrame has no '{column}' column; give a %%prompt "
                                   "result or a list of prompt texts.")
        return list(dict.fromkeys(str(x) for x in side[column]))
    if isinstance(side, str):
        return [side]
    return [str(x) for x in side]


def contrastive_vector(
    positive: Any,
    negative: Any,
    model: Model | str | None = None,
    *,
    layers: Sequence[int] | int | str | None = None,
    position: int | str = "last",
    name: str = "",
) -> Any:
    """A contrastive steering vector: mean residual stream of ``positive`` minus ``negative``.

    Args:
        positive, negative: prompts (lists of strings), DataFrames with a ``prompt`` column, or
            two ``%%prompt`` Results (e.g. the variants that answer from the context and those
            that answer from memory). They need not be paired; each side needs at least one.
        model: a loaded white-box model (default: the last loaded).
        layers: layers to take the difference at (default: all).
        position: ``"last"`` token (default), ``"mean"`` over the prompt, or a token index.
        name: the vector's name (``save()`` uses it).

    Returns:
        A :class:`~promptscope.models.vectors.SteeringVector` with ``mode="add"``.

    Example:
        >>> v = promptscope.contrastive_vector(["...Answer: Rome"], ["...Answer: Oslo"],
        ...                                    model, layers=[1, 2])           # doctest: +SKIP
        >>> with promptscope.steer(model, method="vector", vector=v,
        ...                        strength=4): ...                           # doctest: +SKIP
    """
    from promptscope.models.vectors import SteeringVector, check_layers, collect_states, hidden_size

    mdl = resolve_model(model)
    mdl.require("hidden_states", "Contrastive steering vectors")
    pos, neg = _prompts(positive), _prompts(negative)
    if not pos or not neg:
        raise PromptscopeError(f"A contrastive vector needs at least one positive and one "
                               f"negative prompt (got {len(pos)} and {len(neg)}).")
    if sorted(pos) == sorted(neg):  # (a run's df split by choice without .chosen: both sides)
        raise PromptscopeError("The positive and negative prompts are the same, so their "
                               "difference is zero and steering with it would do nothing; "
                               "give two different sets (from a run's df, filter by "
                               "df.chosen too).")
    n_layers = int(mdl.text_config.num_hidden_layers)  # type: ignore[attr-defined]
    chosen = check_layers(layers, n_layers) or list(range(n_layers))
    hp = collect_states(mdl, pos, chosen, position)
    hn = collect_states(mdl, neg, chosen, position)
    diff = hp.mean(0) - hn.mean(0)  # [layers, H]
    return SteeringVector({layer: diff[j] for j, layer in enumerate(chosen)},
                          hidden_size(mdl.model), "add", "caa", mdl.name,  # type: ignore[attr-defined]
                          {"n_positive": len(pos), "n_negative": len(neg),
                           "position": position}, name)


def in_context_vector(
    demos: Any,
    model: Model | str | None = None,
    *,
    x: str = "x",
    y: str = "y",
    layers: Sequence[int] | int | str | None = None,
    name: str = "",
) -> Any:
    """An in-context vector (ICV) from demonstration pairs, as the ICV paper defines it.

    For each pair, the latent states of ``x`` and of ``y`` (the last token's residual stream
    after every layer); per layer, the ICV is the first principal direction of the differences
    ``h(y_i) - h(x_i)``: the unit vector ``u`` that maximises ``sum_i (u . d_i)^2`` (the top
    right singular vector of the stacked differences), signed to agree with their mean.

    Args:
        demos: pairs ``[(x, y), ...]`` or a DataFrame with columns ``x`` and ``y``.
        model: a loaded white-box model (default: the last loaded).
        x, y: the DataFrame columns of the query and of the demonstrated target.
        layers: layers to keep (default: all; the paper steers every layer).
        name: the vector's name.

    Returns:
        A :class:`~promptscope.models.vectors.SteeringVector` with ``mode="icv"`` (unit
        directions); ``meta["explained"]`` is, per layer, the share of the differences' squared
        norm along the direction.

    Example:
        >>> icv = promptscope.in_context_vector([("Item: apple\\nAnswer:",
        ...                                       "Item: apple\\nAnswer: yes"), ...],
        ...                                      model)                      # doctest: +SKIP
        >>> with promptscope.steer(model, method="vector", vector=icv,
        ...                        strength=0.1): ...                         # doctest: +SKIP
    """
    import torch

    from promptscope.models.vectors import SteeringVector, check_layers, collect_states, hidden_size

    mdl = resolve_model(model)
    mdl.require("hidden_states", "In-context vectors")
    if hasattr(demos, "columns"):
        for col in (x, y):
            if col not in demos.columns:
                raise PromptscopeError(f"The demonstrations have no '{col}' column (columns: "
                                       f"{list(demos.columns)}); pass x=COLUMN, y=COLUMN for "
                                       "the query and the target.")
        pairs = list(zip(demos[x].astype(str), demos[y].astype(str)))
    else:
        pairs = [(str(a), str(b)) for a, b in demos]
    if len(pairs) < MIN_ICV_PAIRS:
        raise PromptscopeError(f"An in-context vector needs at least {MIN_ICV_PAIRS} "
                               f"demonstration pairs to estimate a direction (got {len(pairs)}).")
    n_layers = int(mdl.text_config.num_hidden_layers)  # type: ignore[attr-defined]
    chosen = check_layers(layers, n_layers) or list(range(n_layers))
    hx = collect_states(mdl, [a for a, _ in pairs], chosen)
    hy = collect_states(mdl, [b for _, b in pairs], chosen)
    diffs = hy - hx  # [N, layers, H]
    vectors, explained = {}, []
    for j, layer in enumerate(chosen):
        d = diffs[:, j].double()
        _, s, vh = torch.linalg.svd(d, full_matrices=False)
        u = vh[0]
        if float(u @ d.mean(0)) < 0:  # a principal direction has no sign; take the mean's
            u = -u
        vectors[layer] = u.float()
        explained.append(float(s[0] ** 2 / (s ** 2).sum()) if float(s.sum()) > 0 else 0.0)
    return SteeringVector(vectors, hidden_size(mdl.model), "icv", "icv",  # type: ignore[attr-defined]
                          mdl.name, {"n_pairs": len(pairs), "explained": explained}, name)
