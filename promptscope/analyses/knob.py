"""The context-sensitivity knob: one direction in one layer that decides context vs prior.

After "Controllable Context Sensitivity and the Knob Behind It" (Minder et al.): the same
context-vs-prior questions are asked with two intents ("use the context" / "use what you
know"); the residual stream at the last prompt token is read at every layer, and the unit
difference of the two intents' means is that layer's candidate knob. The check is causal: the
coordinate of the latent along the direction is *set* to a value (``h + (value - h.u) u``, the
vector mode ``"set"``) at one layer, at the last prompt token, and the share of answers that
follow the context and the prior is measured as the value is swept. Where one layer's sweep
moves the answers from prior to context, the knob lives there.

* :func:`find_knob` -> a :class:`~promptscope.models.vectors.SteeringVector` (mode ``"set"``)
  whose ``meta`` holds each intent's mean and spread along the direction, per layer;
* :func:`knob_sweep` -> a Result (kind ``knob_sweep``) with one row per (layer, value); its
  figure plots context- and prior-following against the knob's value, one panel per layer.

The knob is a steering value like any other: ``promptscope.steer(model, method="vector",
vector=knob, strength=value, layers=[1], start="last")``, saved with ``knob.save()``, and usable
in :func:`promptscope.compare_steering`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from promptscope.analyses._recorder import Recorder
from promptscope.errors import PromptscopeError
from promptscope.models import resolve_model
from promptscope.models.base import Model
from promptscope.result import Result
from promptscope.store import Store
from promptscope.templates import Template

KIND = "knob_sweep"


def find_knob(
    positive: Any,
    negative: Any,
    model: Model | str | None = None,
    *,
    layers: Sequence[int] | int | str | None = None,
    name: str = "",
) -> Any:
    """The candidate knob at each layer: the unit direction from ``negative`` to ``positive``.

    Args:
        positive, negative: the two intents' prompts (e.g. the questions with "Use the
            context." and the same questions with "Use what you know."): lists of strings,
            DataFrames with a ``prompt`` column, or ``%%prompt`` Results. Read at the last
            prompt token.
        model: a loaded white-box model (default: the last loaded).
        layers: layers to look at (default: all).
        name: the knob's name (``save()`` uses it).

    Returns:
        A :class:`~promptscope.models.vectors.SteeringVector` with ``mode="set"`` and
        ``method="knob"``: unit directions per layer; ``meta["layers"][layer]`` gives
        ``positive``/``negative`` (mean coordinate of each intent along the direction),
        ``spread`` (their pooled standard deviation) and ``separation`` (the gap in units of
        ``spread``; the paper finds models that separate the intents well follow them well).

    Example:
        >>> knob = promptscope.find_knob(context_prompts, prior_prompts, model)  # doctest: +SKIP
        >>> with promptscope.steer(model, vector=knob, strength=30, layers=[1], start="last"):
        ...     model.score([question], [" red"])                                # doctest: +SKIP
    """
    import torch

    from promptscope.analyses.steering_vectors import _prompts
    from promptscope.models.vectors import SteeringVector, check_layers, collect_states, hidden_size

    mdl = resolve_model(model)
    mdl.require("hidden_states", "Finding a knob")
    pos, neg = _prompts(positive), _prompts(negative)
    if len(pos) < 2 or len(neg) < 2:
        raise PromptscopeError(f"A knob needs at least two prompts per intent (got {len(pos)} "
                               f"and {len(neg)}).")
    n_layers = int(mdl.text_config.num_hidden_layers)  # type: ignore[attr-defined]
    chosen = check_layers(layers, n_layers) or list(range(n_layers))
    hp = collect_states(mdl, pos, chosen, "last")
    hn = collect_states(mdl, neg, chosen, "last")
    vectors, facts = {}, {}
    for j, layer in enumerate(chosen):
        u = torch.nn.functional.normalize(hp[:, j].mean(0) - hn[:, j].mean(0), dim=0)
        cp, cn = hp[:, j] @ u, hn[:, j] @ u
        spread = float(((cp.var() + cn.var()) / 2).sqrt())
        gap = float(cp.mean() - cn.mean())
        vectors[layer] = u
        facts[str(layer)] = {"positive": float(cp.mean()), "negative": float(cn.mean()),
                             "spread": spread, "separation": gap / max(spread, 1e-9)}
    return SteeringVector(vectors, hidden_size(mdl.model), "set", "knob",  # type: ignore[attr-defined]
                          mdl.name, {"n_positive": len(pos), "n_negative": len(neg),
                                     "position": "last", "layers": facts}, name)


def knob_values(knob: Any, layer: int, n: int = 9, margin: float = 1.0) -> list[float]:
    """``n`` knob values around the two intents' means at ``layer``: from the negative mean to
    the positive one, widened by ``margin`` times their gap on each side."""
    facts = _layer_facts(knob, layer)
    lo, hi = sorted((facts["negative"], facts["positive"]))
    pad = margin * (hi - lo)
    return [lo - pad + (hi - lo + 2 * pad) * i / (n - 1) for i in range(n)]


def _layer_facts(knob: Any, layer: int) -> dict[str, float]:
    facts = knob.meta.get("layers", {}).get(str(layer))
    if facts is None:
        raise PromptscopeError(f"The knob has no measurements for layer {layer}; make it with "
                               "promptscope.find_knob (it has layers "
                               f"{sorted(knob.meta.get('layers', {}))}).")
    return facts


def knob_sweep(
    template: str | Template,
    data: Any,
    knob: Any,
    model: Model | str | None = None,
    *,
    values: Sequence[float] | Mapping[int, Sequence[float]] | None = None,
    layers: Sequence[int] | None = None,
    answers: Mapping[str, str] | None = None,
    choices: str | Sequence[str] | None = "choices",
    start: int | str = "last",
    name: str = "",
    save: bool = True,
    store: Store | None = None,
    progress: bool = True,
) -> Result:
    """Set the knob to each value at each layer; measure which source the answers follow.

    Args:
        template: the questions' template (uninstructed, or with either instruction).
        data: rows with the template's variables, the candidates (``choices``) and one column
            per source in ``answers``.
        knob: from :func:`find_knob` (or its saved name).
        model: a loaded white-box model (default: the last loaded).
        values: knob values for every layer, or ``{layer: values}`` (default: 9 values around
            the two intents' means at that layer, :func:`knob_values`).
        layers: layers to sweep (default: every layer of the knob), one at a time.
        answers: source -> column of the answer that follows it (default ``{"context":
            "answer", "prior": "prior"}``).
        choices: each row's candidates: a column name or one list for all rows.
        start: where the value is set (``"last"``: the last prompt token, as the knob is read).

    Returns:
        A Result of kind ``knob_sweep``: one row per (layer, value) with the share of answers
        that follow each source (``context``, ``prior``, ...) and the unsteered shares in
        ``params["baseline"]``. ``figure()`` draws one panel per layer.

    Example:
        >>> sweep = promptscope.knob_sweep(STEERING_TEMPLATE, rows, knob,
        ...                                choices=[" red", " blue", " green"])  # doctest: +SKIP
        >>> sweep.figure(); sweep.summary()                                   # doctest: +SKIP
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from promptscope.analyses.compare_steering import _numbers, _Task
    from promptscope.models.steering import steer
    from promptscope.models.vectors import resolve_vector

    mdl = resolve_model(model)
    mdl.require("hidden_states", "A knob sweep")
    knob = resolve_vector(knob, store)
    if knob.mode != "set":
        raise PromptscopeError("knob_sweep needs a knob (mode 'set', from promptscope.find_knob),"
                               f" not a '{knob.mode}' vector; sweep that with compare_steering.")
    answers = dict(answers or {"context": "answer", "prior": "prior"})
    rows = data.to_dict("records") if hasattr(data, "to_dict") else list(data)
    for source, col in answers.items():
        if any(col not in r for r in rows):
            raise PromptscopeError(f"Every row needs a '{col}' column (the answer that follows "
                                   f"the {source}).")
    gold = {source: [r[col] for r in rows] for source, col in answers.items()}
    layers = list(layers if layers is not None else knob.layers)
    facts = {str(k): _layer_facts(knob, k) for k in layers}  # an unknown layer fails here
    what = "values (a list, or {layer: list})"
    if isinstance(values, Mapping):
        grid = {layer: _numbers(values.get(layer, ()), what) for layer in layers}
    else:
        fixed = _numbers(values, what) if values is not None else None
        grid = {layer: fixed if fixed is not None else knob_values(knob, layer)
                for layer in layers}
    for layer in layers:
        if not grid[layer]:
            raise PromptscopeError(f"No knob values to sweep at layer {layer}.")
    task = _Task(template, data, next(iter(answers.values())), choices, what="The knob sweep",
                 emphasis=False)
    for source, col in answers.items():  # an answer outside the choices would read 0 always
        bad = next((i for i, (r, cs) in enumerate(zip(rows, task.cands)) if r[col] not in cs),
                   None)
        if bad is not None:
            raise PromptscopeError(f"Row {bad}: its {source} answer {rows[bad][col]!r} is not "
                                   f"among its choices {task.cands[bad]}.")

    def shares() -> dict[str, float]:
        picked = task.predict(mdl)
        return {s: sum(p == a for p, a in zip(picked, g)) / len(g) for s, g in gold.items()}

    base = shares()
    params = {"template": task.tpl.source, "n_rows": len(rows), "baseline": base,
              "answers": answers, "start": start, "knob": knob.describe(),
              "layers": facts}
    bar = tqdm(total=sum(len(v) for v in grid.values()), disable=not progress,
               desc="knob sweep", unit="setting", leave=False)
    with Recorder(KIND, name=name, model=mdl, params=params, source=task.tpl.source, save=save,
                  store=store) as rec:
        try:
            for layer in layers:
                for value in grid[layer]:
                    with steer(mdl, method="vector", vector=knob, strength=float(value),
                               layers=[layer], start=start):
                        got = shares()
                    rec.add(pd.DataFrame([{"layer": layer, "value": float(value), **got}]))
                    bar.update(1)
        finally:
            bar.close()
    return rec.result()


PATCHING_KIND = "intent_patching"


def _next_token_logprobs(mdl: Any, prompts: Sequence[str], layer: int | None = None,
                         source: Any = None, basis: Any = None) -> Any:
    """Log-probabilities of the next token after each prompt, ``[N, vocab]``. With ``layer``:
    the last prompt token's residual stream after that layer is patched toward ``source[i]``
    (``[N, H]``), in the span of ``basis`` (``[k, H]``, orthonormal rows) or wholly (None)."""
    import torch

    from promptscope.models.vectors import (
        block_state,
        decoder_layers,
        residual_stream,
        with_block_state,
    )

    stream = residual_stream(mdl.model)
    ids = [mdl.encode_prompt(p) for p in prompts]
    rows: dict[int, torch.Tensor] = {}  # sized by the logits: a config may pad its vocabulary
    for batch in mdl._batches([len(x) for x in ids]):
        width = max(len(ids[u]) for u in batch)
        input_ids, mask = mdl._left_pad([ids[u] for u in batch], width)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)

        def patch(module: Any, args: Any, output: Any, batch: list[int] = batch) -> Any:
            h = block_state(output, stream)
            last = h[:, -1].float()  # left padding: the last column is every prompt's last token
            delta = source[batch].to(last) - last
            if basis is not None:
                b = basis.to(last)
                delta = (delta @ b.T) @ b
            h = h.clone()
            h[:, -1] = (last + delta).to(h.dtype)
            return with_block_state(output, h, stream)

        handle = (decoder_layers(mdl.model)[layer].register_forward_hook(patch)
                  if layer is not None else None)
        try:
            with torch.no_grad():
                logits = mdl.model(input_ids=input_ids, attention_mask=mask,
                                   position_ids=positions, use_cache=False,
                                   **mdl.keep_logits).logits[:, -1]
        finally:
            if handle is not None:
                handle.remove()
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        rows.update(zip(batch, logp))
    return torch.stack([rows[i] for i in range(len(prompts))])


def intent_patching(
    positive: Any,
    negative: Any,
    model: Model | str | None = None,
    *,
    answers: Sequence[str],
    choices: Sequence[str] | Sequence[Sequence[str]],
    layers: Sequence[int] | None = None,
    ranks: Sequence[int] = (1, 2, 4, 8, 16),
    name: str = "",
    save: bool = True,
    store: Store | None = None,
    progress: bool = True,
) -> Result:
    """Where, and in how many dimensions, does an intent decide the answer?

    Activation patching at the last prompt token (the paper's first step, before it looks for
    the knob): the same questions under two intents, e.g. "Use the context." (``positive``) and
    "Use what you know." (``negative``), paired by position. The first half of the pairs fits
    the directions: per layer, the knob's direction (the unit mean difference of the two
    intents, as :func:`find_knob`) and the top principal directions of the per-pair
    differences. On the second half, each negative prompt's last-token state after one layer is
    moved to its positive twin's, within the knob's direction, within the top ``k`` principal
    directions (``ranks``), or wholly ("full"), and the share of answers that become the
    positive intent's answer is recorded. A knob exists where the knob's direction (or one
    principal direction) does what the full patch does; if the full patch works and one
    direction does not, the intent is carried there, but spread over several directions.

    Args:
        positive, negative: the two intents' prompts, pair ``i`` being the same question (lists
            of strings, DataFrames with a ``prompt`` column or ``%%prompt`` Results), at least
            four pairs.
        model: a loaded white-box model (default: the last loaded).
        answers: for each pair, the answer the positive intent asks for (e.g. the context's).
        choices: each pair's candidate answers (or one list for all); they are told apart by
            their first token, so the first tokens must differ.
        layers: layers to patch (default: all).
        ranks: numbers of principal directions to patch.

    Returns:
        A Result of kind ``intent_patching``: one row per (layer, patch) with ``dims`` and
        ``followed`` (share of the tested negative prompts answered with the positive intent's
        answer); ``params["baseline"]`` holds the unpatched shares of both intents.
        ``figure()`` plots ``followed`` against the patched dimensions, one line per layer.

    Example:
        >>> r = promptscope.intent_patching(context_prompts, prior_prompts, model,
        ...     answers=context_answers, choices=colors)                    # doctest: +SKIP
        >>> r.figure(); r.summary()                                         # doctest: +SKIP
    """
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    from promptscope.analyses.steering_vectors import _prompts
    from promptscope.models.vectors import check_layers, collect_states

    mdl = resolve_model(model)
    mdl.require("hidden_states", "Intent patching")
    pos, neg = _prompts(positive), _prompts(negative)
    if len(pos) != len(neg):
        raise PromptscopeError(f"Intent patching pairs prompts by position: got {len(pos)} "
                               f"positive and {len(neg)} negative prompts; give equal lists.")
    if len(pos) < 4:
        raise PromptscopeError(f"Intent patching needs at least 4 pairs (half fit the "
                               f"directions, half test them); got {len(pos)}.")
    if len(answers) != len(pos):
        raise PromptscopeError(f"Give one answer per pair ({len(pos)}), not {len(answers)}.")
    per_row = [list(choices)] * len(pos) if choices and isinstance(choices[0], str) else \
        [list(c) for c in choices]
    if len(per_row) != len(pos):
        raise PromptscopeError(f"Give one list of choices per pair ({len(pos)}) or one list "
                               "for all.")
    first: list[list[int]] = []
    for cands, answer in zip(per_row, answers):
        if answer not in cands:
            raise PromptscopeError(f"The answer {answer!r} is not among its choices {cands}.")
        toks = [mdl.encode_continuation(c)[0] for c in cands]
        if len(set(toks)) < len(toks):
            raise PromptscopeError(f"The choices {cands} share a first token; intent patching "
                                   "tells choices apart by their first token.")
        first.append(toks)
    target = [cands.index(a) for cands, a in zip(per_row, answers)]

    n_layers = int(mdl.text_config.num_hidden_layers)  # type: ignore[attr-defined]
    chosen = check_layers(layers, n_layers) or list(range(n_layers))
    half = len(pos) // 2
    fit, test = slice(0, half), slice(half, len(pos))
    test_first, test_target = first[fit.stop:], target[fit.stop:]

    def followed(logprobs: Any) -> float:
        picks = [int(torch.argmax(row[toks])) for row, toks in zip(logprobs, test_first)]
        return sum(p == t for p, t in zip(picks, test_target)) / len(picks)

    hp = collect_states(mdl, pos, chosen, "last")
    hn = collect_states(mdl, neg, chosen, "last")
    baseline = {"positive": followed(_next_token_logprobs(mdl, pos[test])),
                "negative": followed(_next_token_logprobs(mdl, neg[test]))}
    usable = sorted({k for k in ranks if 0 < k <= half})
    params = {"n_fit": half, "n_test": len(pos) - half, "layers": chosen, "ranks": usable,
              "baseline": baseline}
    bar = tqdm(total=len(chosen) * (len(usable) + 2), disable=not progress,
               desc="intent patching", unit="patch", leave=False)
    with Recorder(PATCHING_KIND, name=name, model=mdl, params=params, save=save,
                  store=store) as rec:
        try:
            for j, layer in enumerate(chosen):
                diff = hp[fit, j] - hn[fit, j]
                knob = torch.nn.functional.normalize(diff.mean(0), dim=0)[None]
                _, _, vh = torch.linalg.svd(diff, full_matrices=False)
                patches = [("knob", knob)] + [(f"top {k}", vh[:k]) for k in usable]
                patches.append(("full", None))
                for label, basis in patches:
                    got = followed(_next_token_logprobs(mdl, neg[test], layer, hp[test, j],
                                                        basis))
                    dims = basis.shape[0] if basis is not None else hp.shape[-1]
                    rec.add(pd.DataFrame([{"layer": layer, "patch": label, "dims": int(dims),
                                           "followed": got}]))
                    bar.update(1)
        finally:
            bar.close()
    return rec.result()
