"""Run every variant of a template: rank choices, score a target, or generate.

This is what ``%%prompt`` calls; it works the same from plain Python.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from promptscope.analyses._recorder import Recorder
from promptscope.errors import PromptscopeError, TemplateError
from promptscope.models import resolve_model
from promptscope.models.base import Model
from promptscope.result import Result
from promptscope.store import Store
from promptscope.templates import Template, Variant, check_rows, count_rows, parse_template

#: Variants per step: each step's rows are saved before the next step starts.
CHUNK_SIZE = 256

#: Columns every prompt run has; template variables and groups may not reuse these names.
RESERVED = {"variant", "prompt", "choice", "logprob", "prob", "rank", "chosen", "n_tokens",
            "tokens", "time_ms", "target", "logprob_per_token", "sample", "output",
            "finish_reason"}


def parse_choices(choices: str | Sequence[str] | None) -> list[str] | None:
    """``" yes| no"`` or ``[" yes", " no"]`` -> ``[" yes", " no"]``; rejects empty choices."""
    if choices is None:
        return None
    items = choices.split("|") if isinstance(choices, str) else list(choices)
    if len(items) < 1 or any(not isinstance(c, str) or c == "" for c in items):
        raise PromptscopeError(
            f"--choices needs non-empty answers separated by '|', e.g. ' yes| no' "
            f"(got {choices!r})."
        )
    if len(set(items)) != len(items):
        raise PromptscopeError(f"--choices has a duplicate answer: {items}.")
    return items


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
) -> Result:
    """Expand ``template`` into variants and run them all on ``model``.

    One of three modes: ``choices`` ranks fixed answers by log-probability, ``target`` scores
    one continuation, otherwise each variant is completed by generation.

    Args:
        template: template text (see :mod:`promptscope.templates`) or a parsed Template.
        model: a loaded model, a name to load, or ``None`` for the last model loaded.
        vars: a dict, list of dicts or DataFrame: one run per row.
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
        raise PromptscopeError("Give either --choices or --target, not both.")
    if target == "":
        raise PromptscopeError("--target is empty; give the continuation to score.")
    clash = RESERVED & (set(tpl.variables) | {g.name for g in tpl.groups})
    if clash:
        raise TemplateError(f"Template name(s) {sorted(clash)} clash with result columns; "
                            "rename the variable or group.")
    mdl = resolve_model(model)
    if chat:
        mdl.chat_prompt("")  # fails early, with a clear message, when there is no chat template
    mode = "choices" if picks is not None else "target" if target is not None else "generate"
    check_rows(tpl, vars, namespace)  # a missing variable fails before a session exists
    total = tpl.n_variants(count_rows(vars))
    variants = tpl.expand(vars, namespace)
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
    bar = _progress_bar(total, progress, mode)
    with Recorder("prompt", name=name, model=mdl, params=params, source=tpl.source,
                  save=save, store=store) as rec:
        try:
            while chunk := list(itertools.islice(variants, chunk_size)):
                texts = [mdl.chat_prompt(v.text) if chat else v.text for v in chunk]
                t0 = time.perf_counter()
                if mode == "generate":
                    gens = mdl.generate(texts, max_new_tokens=max_new_tokens,
                                        temperature=temperature, top_p=top_p, n=n, seed=seed,
                                        progress=bar.update)
                    rows = _generation_rows(chunk, gens, time.perf_counter() - t0)
                else:
                    conts = picks if picks is not None else [target]
                    scores = mdl.score([t for t in texts for _ in conts], conts * len(texts),
                                       progress=_every(len(conts), bar.update))
                    elapsed = time.perf_counter() - t0
                    rows = (_choice_rows(chunk, picks, scores, elapsed) if picks is not None
                            else _target_rows(chunk, target, scores, elapsed))
                rec.add(rows)
        finally:
            bar.close()
    return rec.result()


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
                 elapsed: float) -> Any:
    import pandas as pd

    rows = []
    per = elapsed * 1000 / max(1, len(chunk))
    for j, v in enumerate(chunk):
        mine = scores[j * len(choices):(j + 1) * len(choices)]
        lps = [s.logprob for s in mine]
        top = max(lps)
        z = math.log(math.fsum(math.exp(lp - top) for lp in lps)) + top
        order = sorted(range(len(lps)), key=lambda i: -lps[i])
        rank = {i: r + 1 for r, i in enumerate(order)}
        for i, (c, s) in enumerate(zip(choices, mine)):
            rows.append({**_base(v), "choice": c, "logprob": s.logprob,
                         "prob": math.exp(s.logprob - z), "rank": rank[i], "chosen": rank[i] == 1,
                         "n_tokens": len(s.tokens), "tokens": s.tokens, "time_ms": per})
    return pd.DataFrame(rows)


def _target_rows(chunk: list[Variant], target: str | None, scores: list[Any],
                 elapsed: float) -> Any:
    import pandas as pd

    per = elapsed * 1000 / max(1, len(chunk))
    return pd.DataFrame([
        {**_base(v), "target": target, "logprob": s.logprob,
         "logprob_per_token": s.logprob / len(s.tokens), "n_tokens": len(s.tokens),
         "tokens": s.tokens, "time_ms": per}
        for v, s in zip(chunk, scores)
    ])


def _generation_rows(chunk: list[Variant], gens: list[Any], elapsed: float) -> Any:
    import pandas as pd

    per = elapsed * 1000 / max(1, len(chunk))
    return pd.DataFrame([
        {**_base(v), "sample": k, "output": g.text, "logprob": g.logprob,
         "n_tokens": len(g.tokens), "finish_reason": g.finish_reason, "time_ms": per}
        for v, samples in zip(chunk, gens) for k, g in enumerate(samples)
    ])
