"""Run every variant of a template: rank choices, score a target, or generate.

This is what ``%%prompt`` calls; it works the same from plain Python.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from promptscope.analyses._recorder import Recorder
from promptscope.errors import PromptscopeError, TemplateError
from promptscope.models import resolve_model
from promptscope.models.base import Model, check_generation
from promptscope.result import Result
from promptscope.store import Store
from promptscope.templates import (
    Template,
    Variant,
    check_rows,
    chunks,
    count_rows,
    parse_template,
)

#: Variants per step: each step's rows are saved before the next step starts.
CHUNK_SIZE = 256

#: Columns every prompt run has; template variables and groups may not reuse these names.
RESERVED = {"variant", "steered", "prompt", "choice", "logprob", "prob", "rank", "chosen",
            "n_tokens", "tokens", "time_ms", "target", "logprob_per_token", "sample", "output",
            "finish_reason", "error", "key_sentence", "key_similarity"}


def parse_choices(choices: str | Sequence[str] | None) -> list[str] | None:
    """``" yes| no"`` or ``[" yes", " no"]`` -> ``[" yes", " no"]``; rejects empty choices.
    In the string form ``\\|`` is a literal ``|`` (``" a\\|b| c"`` -> ``[" a|b", " c"]``)."""
    if choices is None:
        return None
    items = ([c.replace("\\|", "|") for c in re.split(r"(?<!\\)\|", choices)]
             if isinstance(choices, str) else list(choices))
    if len(items) < 1 or any(not isinstance(c, str) or c == "" for c in items):
        raise PromptscopeError(
            f"--choices needs non-empty answers separated by '|', e.g. ' yes| no' "
            f"(got {choices!r})."
        )
    if len(set(items)) != len(items):
        raise PromptscopeError(f"--choices has a duplicate answer: {items}.")
    return items


def _warn_if_rows_unused(tpl: Template, rows: Any, target: str | None) -> None:
    """Several rows that neither the template nor the target reads give the same prompt, run
    once per row: most likely a placeholder written wrong (``{city in`` is plain text)."""
    if count_rows(rows) < 2:
        return
    columns = ({str(c) for c in rows.columns} if hasattr(rows, "columns")
               else {str(k) for r in rows if isinstance(r, Mapping) for k in r})
    read = set(tpl.variables) | set(re.findall(r"\{(\w+)\}", target or ""))
    if columns and not columns & read:
        warnings.warn(f"The template uses none of vars' columns ({', '.join(sorted(columns))}), "
                      f"so its {count_rows(rows)} rows give the same prompt. A variable is "
                      "written {name}.", stacklevel=3)


def run_prompt(
    template: str | Template,
    model: Model | str | None = None,
    *,
    vars: Any = None,
    namespace: Mapping[str, Any] | None = None,
    choices: str | Sequence[str] | None = None,
    target: str | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    n: int = 1,
    seed: int | None = 0,
    chat: bool = False,
    name: str = "",
    save: bool = True,
    store: Store | None = None,
    progress: bool = True,
    chunk_size: int | None = None,
    steer: dict[str, Any] | None = None,
) -> Result:
    """Expand ``template`` into variants and run them all on ``model``.

    One of three modes: ``choices`` ranks fixed answers by log-probability, ``target`` scores
    one continuation, otherwise each variant is completed by generation.

    Args:
        template: template text (see :mod:`promptscope.templates`) or a parsed Template.
        model: a loaded model, a name to load, or ``None`` for the last model loaded.
        vars: a dict, list of dicts or DataFrame: one run per row. Columns the template does not
            use (gold answers, ids) are carried into the result's rows.
        namespace: fallback values for variables (the notebook namespace in ``%%prompt``).
        choices: answers to rank, as ``" yes| no"`` or a list.
        target: one continuation to score.
        max_new_tokens, temperature, top_p, n, seed: generation settings (``n`` samples each).
        chat: wrap each variant in the model's chat template.
        name: session name.
        save: save the run as a session (default) in ``store`` (default: the workspace store).
        progress: show a progress bar.
        chunk_size: variants per step (default :data:`CHUNK_SIZE`); each step's rows are saved
            before the next starts, so an interrupt loses at most one step.
        steer: attention steering (PASTA) of the ``<<emphasised>>`` spans: the keyword arguments
            of :func:`promptscope.steer` (``heads``, ``alpha``, ``mode``), plus
            ``compare=True`` to run every variant unsteered and steered (column ``steered``),
            and ``auto=True`` for AutoPASTA: the model names the key sentence inside the
            ``<<region>>`` (or the whole prompt) and that sentence is steered (columns
            ``key_sentence``, ``key_similarity``; ``question`` overrides how it is asked).
            ``method="vector"`` with ``vector=`` (a SteeringVector or a saved one's name),
            ``strength=``, ``layers=`` steers the residual stream instead (no ``<<...>>``
            needed); ``method="pasta+vector"`` does both.

    Returns:
        A :class:`~promptscope.result.Result` whose ``df`` has one row per variant x choice
        (choices), per variant (target) or per variant x sample (generation).

    Example:
        >>> import promptscope
        >>> run = promptscope.run_prompt("Is {city} in {{Europe|Asia}}? Answer:",
        ...     vars=[{"city": "Paris"}, {"city": "Tokyo"}], choices=" yes| no")  # doctest: +SKIP
        >>> run.summary()                                                        # doctest: +SKIP
    """
    tpl = template if isinstance(template, Template) else parse_template(template)
    picks = parse_choices(choices)
    if picks is not None and target is not None:
        raise PromptscopeError("Give either choices or a target (--choices / --target), not "
                               "both.")
    if picks is not None and len(picks) < 2:
        raise PromptscopeError(f"Ranking needs at least two choices, got {picks}: separate them "
                               "with '|' (\" yes| no\"); to score one continuation give it as "
                               "the target (--target).")
    if target == "":
        raise PromptscopeError("The target (--target) is empty; give the continuation to score.")
    clash = RESERVED & (set(tpl.variables) | {g.name for g in tpl.groups})
    if clash:
        raise TemplateError(f"Template name(s) {sorted(clash)} clash with result columns; "
                            "rename the variable or group.")
    mdl = resolve_model(model)
    if chat:
        mdl.chat_prompt("")  # fails early, with a clear message, when there is no chat template
    mode = "choices" if picks is not None else "target" if target is not None else "generate"
    if mode == "generate":
        check_generation(max_new_tokens, n, temperature, top_p)
    check_rows(tpl, vars, namespace)  # a missing variable fails before a session exists
    _warn_if_rows_unused(tpl, vars, target)
    total = tpl.n_variants(count_rows(vars))
    variants = tpl.expand(vars, namespace, carry=extra_columns(vars, tpl))
    chunk_size = chunk_size or CHUNK_SIZE
    params: dict[str, Any] = {"mode": mode, "template": tpl.source, "n_variants": total,
                              "chat": chat}
    if mode == "choices":
        params["choices"] = picks
    elif mode == "target":
        params["target"] = target
    else:
        params.update(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      n=n, seed=seed)
    conditions: list[bool] = [False]
    auto = False
    if steer is not None:
        steer = dict(steer)
        compare = steer.pop("compare", False)
        auto = steer.pop("auto", False)
        question = steer.pop("question", None)
        pasta = "pasta" in _method(steer)
        if auto and not pasta:
            raise PromptscopeError("AutoPASTA (auto=True) steers attention; use method='pasta' "
                                   "or 'pasta+vector'.")
        if pasta and not auto and not tpl.has_emphasis and not steer.get("emphasis"):
            raise TemplateError("Steering needs something to emphasise: mark it in the template "
                                "with <<...>> (e.g. <<the key sentence>>).")
        conditions = [False, True] if compare else [True]
        from promptscope.models.steering import require_steerable

        require_steerable(mdl, _method(steer))  # an API model: say so before any request
        if pasta and steer.get("emphasis") and not auto and not tpl.has_emphasis:
            variants = _check_emphasis_found(variants, steer["emphasis"], chunk_size)
    mdl.begin_run(mode, chat)  # an API model settles how it scores, or says it cannot
    bar = _progress_bar(total * len(conditions), progress, mode)
    with contextlib.ExitStack() as stack:
        steering = attn = None
        if steer is not None:  # validated (heads, alpha, vector) before a session exists
            steering = stack.enter_context(_steering(mdl, steer))
            attn = _attention_part(steering)
            params["steer"] = {**steering.to_json(), "compare": len(conditions) == 2,
                               "auto": auto}
        elif getattr(mdl, "steering", None) is not None and tpl.has_emphasis:
            # inside the user's own steer() block: its PASTA emphasises the <<...>> marks too
            attn = mdl.steering
            params["steer"] = {**attn.to_json(), "by": "an enclosing steer() block"}
        rec = Recorder("prompt", name=name, model=mdl, params=params,
                       source=tpl.source, save=save, store=store).enter(stack)
        unsteered = 0  # variants in which PASTA found nothing to emphasise
        marked: list[str] = []  # this chunk's texts whose <<...>> spans attn holds
        try:
            for chunk in chunks(variants, chunk_size, steered=attn is not None):
                texts = [mdl.chat_prompt(v.text) if chat else v.text for v in chunk]
                keys = None
                if attn is not None:
                    for v, text in zip(chunk, texts):
                        if v.emphasis:  # else steer={"emphasis": ...} strings still apply
                            attn.spans[text] = v.emphasis_in(text)
                            marked.append(text)
                        elif not auto and not attn.spans_for(text):
                            unsteered += 1
                    if auto:  # AutoPASTA: the model picks the sentence inside the <<region>>
                        keys = _auto_spans(mdl, texts, attn.spans, question)
                for steered in conditions:
                    if steering is not None:
                        _set_steered(mdl, steering, steered)
                    refused = None
                    try:
                        rows = _run_chunk(mdl, mode, chunk, texts, picks, target, bar,
                                          dict(max_new_tokens=max_new_tokens,
                                               temperature=temperature, top_p=top_p, n=n,
                                               seed=seed))
                    except (PromptscopeError, KeyboardInterrupt) as exc:
                        # the rows an API run answered (and billed) before a refusal or a
                        # Ctrl-C are kept
                        rows, refused = getattr(exc, "partial_rows", None), exc
                        if rows is None:
                            raise
                    if steer is not None:
                        rows.insert(1, "steered", steered)
                    if keys is not None:
                        sentence = {v.index: k.sentence for v, k in zip(chunk, keys)}
                        similarity = {v.index: k.similarity for v, k in zip(chunk, keys)}
                        rows["key_sentence"] = rows["variant"].map(sentence)
                        rows["key_similarity"] = rows["variant"].map(similarity)
                    rec.add(rows)
                    if refused is not None:
                        raise refused
                if attn is not None:  # keep memory flat over long runs
                    while marked:
                        attn.spans.pop(marked.pop(), None)
                if steering is not None:
                    _set_steered(mdl, steering, True)
        finally:
            bar.close()
            while attn is not None and marked:  # (an enclosing block outlives the run)
                attn.spans.pop(marked.pop(), None)
            if unsteered:
                rec.params["unsteered_variants"] = unsteered
                warnings.warn(f"{unsteered} of the variants contain none of the emphasis "
                              f"strings {attn.emphasis}, so PASTA left them as they were "
                              "(params['unsteered_variants']).", stacklevel=3)
            rec.save_run_info(mdl, verbose=progress)
    return rec.result()


def _check_emphasis_found(variants: Any, emphasis: str | Sequence[str], size: int) -> Any:
    """``variants`` again, after refusing ``emphasis=`` strings that occur in none of the
    first ``size`` prompts (a typo, another wording): PASTA would steer nothing, silently."""
    import itertools

    subs = [emphasis] if isinstance(emphasis, str) else list(emphasis)
    first = list(itertools.islice(variants, size))
    if first and not any(sub and sub in v.text for v in first for sub in subs):
        where = f"the first {size} prompts" if len(first) == size else "the prompts"
        raise PromptscopeError(
            f"The emphasis {subs} occurs in none of {where}, so steering would change nothing. "
            "It is matched exactly (case, spaces and punctuation included); or mark the text "
            "with <<...>> in the template.")
    return itertools.chain(first, variants)


def _run_chunk(mdl: Model, mode: str, chunk: list[Variant], texts: list[str],
               picks: list[str] | None, target: str | None, bar: Any,
               gen: dict[str, Any]) -> Any:
    """Score or generate one chunk of variants; returns its rows."""
    t0 = time.perf_counter()
    conts = picks if picks is not None else [target]

    def rows_of(got: list[Any]) -> Any:  # generations or scores
        elapsed = time.perf_counter() - t0
        if mode == "generate":
            return _generation_rows(chunk, got, elapsed, mdl.per_request_errors)
        if picks is not None:
            return _choice_rows(chunk, picks, got, elapsed, mdl.per_request_errors)
        return _target_rows(chunk, target, got, elapsed, mdl.per_request_errors)

    try:
        if mode == "generate":
            got = mdl.generate(texts, progress=bar.update, **gen)
        else:
            got = mdl.score([t for t in texts for _ in conts], conts * len(texts),
                            progress=_every(len(conts), bar.update))
    except (PromptscopeError, KeyboardInterrupt) as exc:
        # an API run refused or stopped part way: the rows of what it had finished (and was
        # billed for) ride on the exception, so the session keeps them
        if getattr(exc, "partial", None) is not None:
            exc.partial_rows = rows_of(exc.partial)  # type: ignore[attr-defined]
        raise
    return rows_of(got)


def extra_columns(rows: Any, tpl: Template) -> list[str]:
    """Row columns the template does not use, carried into the results (gold answers, ids...);
    those named like a result column are left out."""
    if hasattr(rows, "columns"):
        names = [str(c) for c in rows.columns]
    elif isinstance(rows, (list, tuple)) and rows and isinstance(rows[0], Mapping):
        names = list(dict.fromkeys(k for r in rows if isinstance(r, Mapping) for k in r))
    else:
        return []
    used = set(tpl.variables) | {g.name for g in tpl.groups} | RESERVED | {"row"}
    return [n for n in names if n not in used]


def _auto_spans(mdl: Model, texts: list[str], spans: dict[str, list[tuple[int, int]]],
                question: str | None) -> list[Any]:
    """Replace each text's emphasis by the key sentence the model names (AutoPASTA)."""
    from promptscope.analyses.autopasta import DEFAULT_QUESTION, key_sentences

    regions = [spans[t][0] if spans.get(t) else None for t in texts]
    keys = key_sentences(mdl, texts, regions, question or DEFAULT_QUESTION)
    for t, k in zip(texts, keys):
        spans[t] = [k.span]
    return keys


def _steering(mdl: Model, options: dict[str, Any]) -> Any:
    from promptscope.models.steering import steer

    return steer(mdl, **options)


def _method(options: Mapping[str, Any]) -> str:
    """The steering method of ``steer=`` options (``"pasta"`` unless a vector is named)."""
    from promptscope.models.steering import parse_method

    return parse_method(options.get("method"), options.get("vector"))


def _attention_part(steering: Any) -> Any:
    from promptscope.models.steering import attention_part

    return attention_part(steering)


def _set_steered(mdl: Model, steering: Any, on: bool) -> None:
    from promptscope.models.steering import set_steered

    set_steered(mdl, steering, on)


def _progress_bar(total: int, enabled: bool, mode: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled or total < 2, desc=f"prompt ({mode})",
                unit="variant", leave=False)


def _every(k: int, update: Any) -> Any:
    """Turn a progress count of scored pairs into a count of variants (``k`` pairs each)."""
    state = {"pairs": 0}

    def step(done: int) -> None:
        before = state["pairs"] // k
        state["pairs"] += done
        update(state["pairs"] // k - before)

    return step


def _base(v: Variant) -> dict[str, Any]:
    return {"variant": v.index, **v.labels, "prompt": v.text}


def _choice_rows(chunk: list[Variant], choices: list[str], scores: list[Any],
                 elapsed: float, errors: bool = False) -> Any:
    import pandas as pd

    rows = []
    per = round(elapsed * 1000 / max(1, len(chunk)), 2)  # a share of its chunk's time
    for j, v in enumerate(chunk):
        mine = scores[j * len(choices):(j + 1) * len(choices)]
        lps = [s.logprob for s in mine]
        failed = next((s.error for s in mine if getattr(s, "error", None)), None)
        if failed is None and not any(math.isfinite(lp) for lp in lps):
            failed = "no choice has a finite log-prob"
        if failed is not None:  # a variant with a failed score has no probabilities
            for c, s in zip(choices, mine):
                rows.append({**_base(v), "choice": c, "logprob": s.logprob, "prob": math.nan,
                             "rank": math.nan, "chosen": False, "n_tokens": len(s.tokens),
                             "tokens": s.tokens, "time_ms": per, "error": failed})
            continue
        top = max(lps)
        z = math.log(math.fsum(math.exp(lp - top) for lp in lps)) + top
        order = sorted(range(len(lps)), key=lambda i: -lps[i])
        rank = {i: r + 1 for r, i in enumerate(order)}
        for i, (c, s) in enumerate(zip(choices, mine)):
            row = {**_base(v), "choice": c, "logprob": s.logprob,
                   "prob": math.exp(s.logprob - z), "rank": rank[i], "chosen": rank[i] == 1,
                   "n_tokens": len(s.tokens), "tokens": s.tokens, "time_ms": per}
            if errors:
                row["error"] = None
            rows.append(row)
    return pd.DataFrame(rows)


def _target_rows(chunk: list[Variant], target: str | None, scores: list[Any],
                 elapsed: float, errors: bool = False) -> Any:
    import pandas as pd

    per = round(elapsed * 1000 / max(1, len(chunk)), 2)  # a share of its chunk's time
    return pd.DataFrame([
        {**_base(v), "target": target, "logprob": s.logprob,
         "logprob_per_token": s.logprob / len(s.tokens) if s.tokens else math.nan,
         "n_tokens": len(s.tokens), "tokens": s.tokens, "time_ms": per,
         **({"error": s.error} if errors else {})}
        for v, s in zip(chunk, scores)
    ])


def _generation_rows(chunk: list[Variant], gens: list[Any], elapsed: float,
                     errors: bool = False) -> Any:
    import pandas as pd

    per = round(elapsed * 1000 / max(1, len(chunk)), 2)  # a share of its chunk's time
    return pd.DataFrame([
        {**_base(v), "sample": k, "output": g.text, "logprob": g.logprob,
         "n_tokens": len(g.tokens), "finish_reason": g.finish_reason, "time_ms": per,
         **({"error": g.error} if errors else {})}
        for v, samples in zip(chunk, gens) for k, g in enumerate(samples)
    ])
