"""Head profiling for attention steering (PASTA's model profiling).

Each (layer, head) is steered alone on a small labelled set, and scored by how much it improves
the task: accuracy over the row's choices and the mean log-prob of the right answer, against the
unsteered model. The best heads are then steered together (``heads="top:8"`` or
``heads="profile:NAME"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from promptscope.analyses._recorder import Recorder
from promptscope.errors import PromptscopeError
from promptscope.models import resolve_model
from promptscope.models.base import Model
from promptscope.result import Result
from promptscope.store import Store
from promptscope.templates import Template, parse_template, spans_by_text

KIND = "head_profile"


def profile_heads(
    template: str | Template,
    data: Any,
    model: Model | str | None = None,
    *,
    answer: str = "answer",
    choices: str | Sequence[str] | None = "choices",
    alpha: float = 0.01,
    layers: Sequence[int] | None = None,
    top_k: int = 8,
    name: str = "",
    save: bool = True,
    store: Store | None = None,
    progress: bool = True,
) -> Result:
    """Score every (layer, head) by the task gain when steering that head alone.

    Args:
        template: a template with ``<<emphasis>>``, filled from each row of ``data``.
        data: a DataFrame or list of dicts: the template's variables, the right ``answer`` and,
            optionally, the row's candidate answers (column ``choices``: a list, or a fixed list
            for every row).
        answer: the column with the right continuation (e.g. ``" Rome"``).
        choices: a column of per-row candidate lists, a fixed list, or ``None`` (then the metric
            is the answer's log-prob only).
        alpha: PASTA's alpha for each single-head run.
        layers: restrict profiling to these layers (default all).
        top_k: how many heads ``heads="profile:NAME"`` steers by default.

    Returns:
        A Result of kind ``head_profile``: one row per head with ``accuracy``, ``logprob`` and
        their gains over the unsteered model (``d_accuracy``, ``d_logprob``); ``summary()``
        ranks them; the unsteered numbers are in ``params["baseline"]``.

    Example:
        >>> prof = promptscope.profile_heads("<<{context}>> {question}", df,
        ...                                  name="ctx")                    # doctest: +SKIP
        >>> with promptscope.steer(model, heads="profile:ctx"): ...     # doctest: +SKIP
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from promptscope.analyses.attention import pick_indices
    from promptscope.models.steering import check_attention_layers, steer

    tpl = template if isinstance(template, Template) else parse_template(template)
    tpl.require_one_prompt("Head profiling")
    if not tpl.has_emphasis:
        raise PromptscopeError("Head profiling steers toward the <<emphasised>> part of the "
                               "template; mark it with <<...>>.")
    mdl = resolve_model(model)
    mdl.require("attention", "Head profiling")
    rows = data.to_dict("records") if hasattr(data, "to_dict") else list(data)
    if not rows:
        raise PromptscopeError("Head profiling needs at least one labelled row.")
    if any(answer not in r for r in rows):
        raise PromptscopeError(f"Every row needs an '{answer}' column (the right answer).")
    cands = [_row_choices(r, choices, answer) for r in rows]
    variants = [replace(next(tpl.expand(r)), index=i) for i, r in enumerate(rows)]
    prompts = [v.text for v in variants]
    spans = spans_by_text(variants)
    pairs = [(i, c) for i, cs in enumerate(cands) for c in cs]
    cfg = mdl.text_config  # type: ignore[attr-defined]
    attended = mdl.attention_layers  # type: ignore[attr-defined]
    layer_ids = pick_indices(layers, cfg.num_hidden_layers, "layer") if layers is not None \
        else list(attended)
    check_attention_layers(layer_ids, attended)
    heads = [(layer, h) for layer in layer_ids for h in range(cfg.num_attention_heads)]

    def evaluate() -> tuple[float, float]:
        scores = mdl.score([prompts[i] for i, _ in pairs], [c for _, c in pairs])
        by_row: dict[int, dict[str, float]] = {}
        for (i, c), s in zip(pairs, scores):
            by_row.setdefault(i, {})[c] = s.logprob
        right = [by_row[i][rows[i][answer]] for i in range(len(rows))]
        acc = sum(max(d, key=d.get) == rows[i][answer] for i, d in by_row.items()) / len(rows)
        return acc, sum(right) / len(right)

    base_acc, base_lp = evaluate()
    params = {"template": tpl.source, "alpha": alpha, "top_k": top_k, "n_rows": len(rows),
              "layers": layer_ids, "baseline": {"accuracy": base_acc, "logprob": base_lp}}
    bar = tqdm(total=len(heads), disable=not progress, desc="profiling heads", unit="head",
               leave=False)
    with Recorder(KIND, name=name, model=mdl, params=params, source=tpl.source, save=save,
                  store=store) as rec:
        try:
            for layer, h in heads:
                with steer(mdl, heads={layer: [h]}, alpha=alpha) as steering:
                    steering.spans.update(spans)
                    acc, lp = evaluate()
                rec.add(pd.DataFrame([{"layer": layer, "head": h, "accuracy": acc,
                                       "logprob": lp, "d_accuracy": acc - base_acc,
                                       "d_logprob": lp - base_lp}]))
                bar.update(1)
        finally:
            bar.close()
    return rec.result()


def rank(df: Any) -> Any:
    """Heads best first: by accuracy gain, then log-prob gain."""
    return df.sort_values(["d_accuracy", "d_logprob"], ascending=False,
                          kind="stable").reset_index(drop=True)


def _row_choices(row: Mapping[str, Any], choices: Any, answer: str) -> list[str]:
    """The row's candidates: its ``choices`` column or ``choices`` itself (a list, or
    ``" red| blue"``); ``None`` (or a column the rows lack) scores the answer alone."""
    from promptscope.analyses.prompt import parse_choices

    if isinstance(choices, str) and choices in row:
        picks = parse_choices(row[choices]) or []
    elif choices is None or (isinstance(choices, str) and "|" not in choices):
        picks = [row[answer]]
    else:
        picks = parse_choices(choices) or []
    if row[answer] not in picks:
        raise PromptscopeError(f"The answer {row[answer]!r} is not among the row's choices "
                               f"{picks}.")
    return picks


def top_heads(df: Any, k: int) -> dict[int, list[int]]:
    """The ``k`` best heads of a profile as ``{layer: [heads]}`` (only heads that helped)."""
    best = rank(df)
    best = best[(best["d_accuracy"] > 0) | ((best["d_accuracy"] == 0) & (best["d_logprob"] > 0))]
    out: dict[int, list[int]] = {}
    for layer, h in best.head(k)[["layer", "head"]].itertuples(index=False):
        out.setdefault(int(layer), []).append(int(h))
    if not out:
        raise PromptscopeError("No head improved the task when steered alone; try another "
                               "alpha, more rows, or pick heads by hand.")
    return {layer: sorted(hs) for layer, hs in sorted(out.items())}


def resolve_profile_heads(spec: str, model_name: str,
                          store: Store | None = None) -> dict[int, list[int]]:
    """``"top:K"`` (the newest profile of this model) or ``"profile:NAME[:K]"`` -> heads."""
    import promptscope

    store = store or Store.default()
    kind, _, rest = spec.partition(":")
    if kind == "top":
        records = [r for r in store.list(kind=KIND, model=model_name) if r.status == "done"]
        if not records:
            raise PromptscopeError(f"heads='{spec}' needs a head profile of model "
                                   f"'{model_name}'; run promptscope.profile_heads(...) first.")
        record, k = records[0], _int(rest, spec)
    else:
        name, _, k_text = rest.partition(":")
        named = [r for r in store.list(kind=KIND, search=name) if r.name == name]
        records = [r for r in named if r.status == "done" and r.model == model_name]
        if not records:
            other = sorted({r.model for r in named if r.status == "done"} - {model_name})
            why = (f" finished for model '{model_name}' (only for {other}: a profile's heads "
                   "belong to its model)" if other else " that finished" if named else "")
            raise PromptscopeError(f"No head profile named '{name}'{why}. promptscope."
                                   f"sessions(kind='{KIND}') lists the saved profiles.")
        record = records[0]
        k = _int(k_text, spec) if k_text else int(record.params.get("top_k", 8))
    return top_heads(promptscope.load(record.id, store=store).df, k)


def _int(text: str, spec: str) -> int:
    try:
        k = int(text)
    except ValueError:
        raise PromptscopeError(f"Cannot read '{spec}': write top:8 or profile:NAME:8.") from None
    if k < 1:
        raise PromptscopeError(f"'{spec}': the number of heads must be at least 1.")
    return k
