"""Compare steering methods on one labelled task: accuracy gained against its cost.

Each method (PASTA, AutoPASTA, a contrastive vector, an ICV, or PASTA + a vector) is swept over
its strength (PASTA's ``alpha``, a vector's ``strength``). At every setting three things are
measured against the unsteered model:

* the task: accuracy over each row's choices (and the mean log-prob of the right answer);
* a control task the steering should not touch (same columns, its own template);
* unrelated text: the mean log-prob per token (a fluency proxy).

Picking each method's best strength and reporting its gain on the same rows overstates it
(the maximum of several noisy gains). So the rows are split once, at random: ``summary()``
picks each method's setting on the tuning rows and reports its gain on the test rows, with a
95 % interval for a paired difference (:func:`paired_gain_interval`). It also cross-fits
(:func:`crossfit`): the halves swap roles, so every row is a test row once, which narrows the
interval.

The result (kind ``steering_comparison``) has one row per (method, setting); its figure plots
the accuracy gain against strength and against the side-effect cost.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from statistics import fmean
from typing import Any

from promptscope.analyses._recorder import Recorder
from promptscope.errors import PromptscopeError
from promptscope.models import resolve_model
from promptscope.models.base import Model
from promptscope.result import Result
from promptscope.store import Store
from promptscope.templates import Template, parse_template, spans_by_text

KIND = "steering_comparison"


class _Task:
    """Prompts, candidate answers and right answers of one labelled task."""

    def __init__(self, template: str | Template, data: Any, answer: str, choices: Any,
                 what: str = "A steering comparison", emphasis: bool = True) -> None:
        """``emphasis=False``: no attention steering will look for the ``<<...>>`` marks."""
        self.tpl = template if isinstance(template, Template) else parse_template(template)
        self.tpl.require_one_prompt(what)
        rows = data.to_dict("records") if hasattr(data, "to_dict") else list(data)
        if not rows:
            raise PromptscopeError("The comparison needs at least one labelled row.")
        if any(answer not in r for r in rows):
            raise PromptscopeError(f"Every row needs an '{answer}' column (the right answer).")
        self.answers = [r[answer] for r in rows]
        self.cands = [_row_choices(r, choices, answer, i) for i, r in enumerate(rows)]
        self.variants = [replace(next(self.tpl.expand(r)), index=i) for i, r in enumerate(rows)]
        self.prompts = [v.text for v in self.variants]
        # only marked prompts: the others keep a method's emphasis= strings
        self.spans = spans_by_text(self.variants) if emphasis else {}

    def _logprobs(self, mdl: Model) -> list[dict[str, float]]:
        """Per row, candidate -> log-prob."""
        pairs = [(i, c) for i, cs in enumerate(self.cands) for c in cs]
        scores = mdl.score([self.prompts[i] for i, _ in pairs], [c for _, c in pairs])
        by_row: list[dict[str, float]] = [{} for _ in self.prompts]
        for (i, c), s in zip(pairs, scores):
            by_row[i][c] = s.logprob
        return by_row

    def predict(self, mdl: Model) -> list[str]:
        """Each row's most likely candidate."""
        return [max(d, key=d.get) for d in self._logprobs(mdl)]

    def evaluate(self, mdl: Model) -> tuple[list[bool], list[float]]:
        """Per row: is the most likely candidate the right one, and the right one's log-prob."""
        by_row = self._logprobs(mdl)
        return ([max(d, key=d.get) == a for d, a in zip(by_row, self.answers)],
                [d[a] for d, a in zip(by_row, self.answers)])


def _split(n: int, tune_share: float, seed: int) -> tuple[list[int], list[int]]:
    """Row indices (tuning, test), a seeded random split; ``tune_share=0``: both are all rows."""
    import random

    if not (_is_number(tune_share) and 0 <= tune_share < 1):
        raise PromptscopeError(f"tune_share must be a number in [0, 1), not {tune_share!r}.")
    if tune_share == 0:
        return list(range(n)), list(range(n))
    if n < 2:
        raise PromptscopeError("One labelled row cannot be split into tuning and test rows; "
                               "give more rows, or tune_share=0 to pick and report on the "
                               "same rows.")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = min(max(round(n * tune_share), 1), n - 1)
    return sorted(order[:k]), sorted(order[k:])


def paired_gain_interval(steered: Sequence[bool], plain: Sequence[bool]
                         ) -> tuple[float, float]:
    """95 % interval of the accuracy gain ``mean(steered) - mean(plain)`` on the same rows:
    Agresti and Min's adjusted Wald interval for paired proportions (half a row added to each
    of the four cells: right both ways, gained, lost, wrong both ways), within [-1, 1]. Unlike
    a bootstrap of the rows, or Newcombe's score interval at 50 % accuracy, it does not shrink
    to a point when no row changes, or every row changes alike (30 rows, none changed: about
    -0.06 to +0.06; 3 rows all gained: 0.02 to 1).

    Example:
        >>> [round(x, 2) for x in paired_gain_interval([1, 1, 1], [0, 0, 0])]
        [0.02, 1.0]
    """
    import numpy as np

    s, p = np.asarray(steered, dtype=bool), np.asarray(plain, dtype=bool)
    if not len(s):
        return math.nan, math.nan
    n = len(s) + 2.0  # four half rows
    gained, lost = (int((s & ~p).sum()) + 0.5) / n, (int((~s & p).sum()) + 0.5) / n
    gain = gained - lost
    half = 1.959964 * math.sqrt((gained + lost - gain ** 2) / n)
    return max(-1.0, gain - half), min(1.0, gain + half)


def _crossfit_interval(right: Any, logprob: Any, plain: Any, tune: Sequence[int],
                       test: Sequence[int], seed: int, draws: int = 2000
                       ) -> tuple[float, float]:
    """95 % bootstrap interval of the cross-fitted gain, the choice of setting included: each
    draw resamples both halves, picks a setting on each resampled half (accuracy, then the
    right answers' mean log-prob, NaN lowest; ties to the first) and scores the other half
    with it. (Holding the picks fixed would leave out how much the choice itself varies.)

    ``right`` and ``logprob`` are ``[settings, rows]``; ``plain`` the unsteered rows' rightness.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    lp = np.where(np.isnan(logprob), -np.inf, logprob)
    t_idx = rng.choice(np.asarray(tune), size=(draws, len(tune)))
    s_idx = rng.choice(np.asarray(test), size=(draws, len(test)))

    def picks(idx: Any) -> Any:  # [draws, m] rows -> [draws] the setting picked on them
        acc, mean_lp = right[:, idx].mean(-1), lp[:, idx].mean(-1)  # [settings, draws]
        best = acc == acc.max(0)
        score = np.where(best, mean_lp, -np.inf)
        return np.where(score.max(0) > -np.inf, score.argmax(0), best.argmax(0))

    scored = np.concatenate([right[picks(s_idx)[:, None], t_idx],  # tuning rows: test pick
                             right[picks(t_idx)[:, None], s_idx]], axis=1)
    gains = scored.mean(1) - np.asarray(plain, dtype=float)[
        np.concatenate([t_idx, s_idx], axis=1)].mean(1)
    low, high = np.quantile(gains, [0.025, 0.975])
    return float(low), float(high)


def _row_choices(row: Mapping[str, Any], choices: Any, answer: str, i: int) -> list[str]:
    """Row ``i``'s candidates (parsed as a head profile's are), at least two: a comparison
    with one candidate would score every method 100 %."""
    from promptscope.analyses.heads import _row_choices as parse_row

    if choices is None or (isinstance(choices, str) and choices not in row
                           and "|" not in choices):
        what = ("Give the candidate answers" if choices is None
                else f"The rows have no '{choices}' column")
        raise PromptscopeError(f"{what}; pass choices=[' red', ' blue'] (for every row) or the "
                               "column that lists each row's.")
    try:
        picks = parse_row(row, choices, answer)
    except TypeError:
        raise PromptscopeError(f"Row {i}: choices must be a list of answers or ' red| blue', "
                               f"not {row.get(choices, choices)!r}.") from None
    if len(picks) < 2:
        raise PromptscopeError(f"Row {i} has choices {picks}; give at least two candidate "
                               "answers (accuracy over one is always 1).")
    return picks


def _numbers(values: Any, what: str) -> list[float]:
    """``values`` (a number or an iterable of numbers) as floats; anything else is refused."""
    many = isinstance(values, Iterable) and not isinstance(values, (str, Mapping))
    items = list(values) if many else [values]
    if not all(_is_number(v) and math.isfinite(v) for v in items):
        raise PromptscopeError(f"{what} must be a list of numbers, not {values!r}.")
    return [float(v) for v in items]


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _text_logprob(mdl: Model, texts: Sequence[str]) -> float:
    """Mean log-prob per token of each text after its first word."""
    heads, tails = [], []
    for t in texts:
        first, _, rest = t.strip().partition(" ")
        if not rest:
            raise PromptscopeError("Each unrelated text needs at least two words.")
        heads.append(first)
        tails.append(" " + rest)
    scores = mdl.score(heads, tails)
    return sum(s.logprob for s in scores) / sum(len(s.tokens) for s in scores)


def _sweep(label: str, spec: Mapping[str, Any]) -> tuple[str, list[float], dict[str, Any]]:
    """(swept key, its values, the other steer options) of one method's spec."""
    from promptscope.models.steering import parse_method

    opts = dict(spec)
    method = parse_method(opts.get("method"), opts.get("vector"))
    opts["method"] = method
    key = "strength" if "vector" in method else "alpha"
    values = _numbers(opts.pop(key, [1.0] if key == "strength" else [0.01]),
                      f"Method '{label}': {key}")
    if not values:
        raise PromptscopeError(f"No {key} values to sweep.")
    other = "alpha" if key == "strength" else "strength"
    if isinstance(opts.get(other), (list, tuple)):  # pasta+vector sweeps the strength only
        raise PromptscopeError(f"Method '{label}': only {key} is swept for {method}; give "
                               f"{other} one value (or one method per {other}).")
    return key, values, opts


def _check_method(mdl: Model, label: str, opts: dict[str, Any], key: str,
                  values: Sequence[float]) -> None:
    """Refuse a method whose options ``steer`` would refuse, before any sweep runs (an error
    in the last method came after the others' sweeps), naming the method."""
    import inspect

    from promptscope.models.steering import steer

    known = set(inspect.signature(steer).parameters) - {"model"} | {"auto", "question",
                                                                     "template"}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise PromptscopeError(f"Method '{label}': unknown option(s) {unknown}; steer options "
                               f"are {sorted(known - {key})} and {key} (the values swept).")
    checked = {o: v for o, v in opts.items() if o not in ("auto", "question")}
    for value in values:
        try:
            with steer(mdl, **checked, **{key: value}):
                pass
        except PromptscopeError as exc:
            raise type(exc)(f"Method '{label}': {exc}") from None


def compare_steering(
    template: str | Template,
    data: Any,
    model: Model | str | None = None,
    *,
    methods: Mapping[str, Mapping[str, Any]],
    answer: str = "answer",
    choices: str | Sequence[str] | None = "choices",
    control: tuple[str | Template, Any] | None = None,
    text: Sequence[str] | None = None,
    tune_share: float = 0.5,
    seed: int = 0,
    name: str = "",
    save: bool = True,
    store: Store | None = None,
    progress: bool = True,
) -> Result:
    """Sweep each steering method's strength; measure the task gain and the side effects.

    Args:
        template: the task's template (``<<...>>`` marks what PASTA emphasises; AutoPASTA
            looks for the key sentence inside it).
        data: labelled rows (DataFrame or list of dicts): the template's variables, ``answer``
            and, optionally, per-row ``choices``.
        model: a loaded white-box model (default: the last loaded).
        methods: label -> ``promptscope.steer`` options, with the swept value as a list:
            ``{"PASTA": {"heads": "top:2", "alpha": [0.1, 0.01]}, "AutoPASTA": {"heads": ...,
            "auto": True, "alpha": [0.01]}, "CAA": {"method": "vector", "vector": v,
            "layers": [3], "strength": [1, 2, 4]}}``. A method may bring its own
            ``"template"`` giving the same prompts with other ``<<...>>`` marks (AutoPASTA
            searches the whole context for the key sentence).
        answer, choices: the columns of the right answer and of the candidates (as in
            :func:`promptscope.profile_heads`).
        control: ``(template, rows)`` of a task the steering should leave alone (same columns).
        text: unrelated texts whose log-likelihood per token is the fluency proxy.
        tune_share: the share of rows (drawn at random with ``seed``) on which ``summary()``
            picks each method's setting; it reports the gain on the other rows. ``0``: pick
            and report on all rows (an optimistic gain).

    Returns:
        A Result of kind ``steering_comparison``: one row per (method, setting) with
        ``accuracy``, ``d_accuracy``, ``logprob``, ``control_accuracy``, ``d_control``,
        ``text_logprob``, ``d_text`` over all rows; ``tune_accuracy`` and ``tune_logprob``
        over the tuning rows; ``test_accuracy``, ``d_test`` and its 95 % interval
        ``d_test_low``/``d_test_high`` over the test rows (Agresti-Min paired interval). The
        unsteered numbers are in ``params["baseline"]``, the split in
        ``params["tune_rows"]``/``["test_rows"]`` as row positions in ``data``
        (``data.iloc[...]``, not its index labels), as is ``tables["row_outcomes"].row``.

    Example:
        >>> cmp = promptscope.compare_steering(STEERING_TEMPLATE, rows, model,
        ...     methods={"CAA": {"vector": v, "strength": [1, 2, 4]}},
        ...     choices=[" red", " blue", " green"],
        ...     text=["some unrelated text"])                                # doctest: +SKIP
        >>> cmp.figure(); cmp.summary()                                        # doctest: +SKIP
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from promptscope.models.steering import attention_part, steer

    example = "e.g. methods={'PASTA': {'heads': 'all', 'alpha': [0.1, 0.01]}}"
    if not isinstance(methods, Mapping) or not all(isinstance(s, Mapping)
                                                   for s in methods.values()):
        raise PromptscopeError(f"methods must be a dict of label -> steer options, {example}.")
    if not methods:
        raise PromptscopeError(f"Give at least one method to compare, {example}.")
    mdl = resolve_model(model)
    mdl.require("hidden_states", "Steering comparison")
    task = _Task(template, data, answer, choices)
    ctrl = None
    if control is not None:
        try:
            ctrl = _Task(control[0], control[1], answer, choices)
        except PromptscopeError as exc:  # (its rows and template, not the task's)
            raise type(exc)(f"The control task (control=(template, rows)): {exc}") from None
    texts = list(text or [])
    tune_rows, test_rows = _split(len(task.prompts), tune_share, seed)
    sweeps = {label: _sweep(label, spec) for label, spec in methods.items()}
    for label, (key, values, opts) in sweeps.items():  # every method's options, before any
        _check_method(mdl, label, {o: v for o, v in opts.items() if o != "template"},
                      key, values)
    tasks = {}  # a method's own template: same rows, other <<emphasis>>
    for label, (_, _, opts) in sweeps.items():
        own = opts.get("template")
        tasks[label] = _Task(own, data, answer, choices) if own is not None else task
        if tasks[label].prompts != task.prompts:
            raise PromptscopeError(f"Method '{label}': its template must give the same prompts "
                                   "as the task's (only <<...>> may differ).")

    def measure(on: _Task = task) -> tuple[dict[str, float], Any]:
        """The numbers of one setting, and per row: answered right?, the answer's log-prob."""
        right, lp = on.evaluate(mdl)
        out = {"accuracy": fmean(right), "logprob": fmean(lp),
               "tune_accuracy": fmean([right[i] for i in tune_rows]),
               "tune_logprob": fmean([lp[i] for i in tune_rows]),
               "test_accuracy": fmean([right[i] for i in test_rows])}
        if ctrl is not None:
            out["control_accuracy"] = fmean(ctrl.evaluate(mdl)[0])
        if texts:
            out["text_logprob"] = _text_logprob(mdl, texts)
        per_row = pd.DataFrame({"row": range(len(right)), "right": right, "logprob": lp})
        return out, per_row

    base, base_rows = measure()
    params = {"template": task.tpl.source, "n_rows": len(task.prompts), "baseline": base,
              "tune_share": tune_share, "seed": seed, "tune_rows": tune_rows,
              "test_rows": test_rows,
              "methods": {k: {"swept": key, "values": vals,
                              **{o: _jsonable(v) for o, v in opts.items()}}
                          for k, (key, vals, opts) in sweeps.items()},
              "control": control[0] if control is not None and isinstance(control[0], str)
              else None, "n_texts": len(texts)}
    total = sum(len(v) for _, v, _ in sweeps.values())
    bar = tqdm(total=total, disable=not progress, desc="steering sweep", unit="setting",
               leave=False)
    with Recorder(KIND, name=name, model=mdl, params=params, source=task.tpl.source, save=save,
                  store=store) as rec:
        # each setting's per-row outcomes (setting -1: unsteered), for cross-fitting
        rec.add(base_rows.assign(setting_index=-1), "row_outcomes")
        base_right = base_rows["right"].tolist()
        setting_index = 0  # each setting's row in the result's df
        try:
            for label, (key, values, opts) in sweeps.items():
                opts = dict(opts)
                auto = opts.pop("auto", False)
                question = opts.pop("question", None)  # AutoPASTA's question to the model
                opts.pop("template", None)
                on = tasks[label]
                # AutoPASTA: the model is asked once per method, before its sweep
                spans = _auto_spans(mdl, on, question) if auto else on.spans
                for value in values:
                    with steer(mdl, **opts, **{key: value}) as steering:
                        attn = attention_part(steering)
                        if attn is not None:  # the control task's <<...>> are steered too
                            attn.spans.update({**(ctrl.spans if ctrl is not None else {}),
                                               **spans})
                        got, per_row = measure(on)
                    right = per_row["right"].tolist()
                    low, high = paired_gain_interval([right[i] for i in test_rows],
                                                     [base_right[i] for i in test_rows])
                    # strength grows with the effect: PASTA's exclude mode scales the rest
                    # down by alpha (1/alpha), its include mode the emphasis up (alpha)
                    include = key == "alpha" and opts.get("mode") == "include"
                    row = {"method": label, "setting": key, "value": value,
                           "strength": 1 / value if key == "alpha" and not include else value,
                           **got,
                           "d_accuracy": got["accuracy"] - base["accuracy"],
                           "d_logprob": got["logprob"] - base["logprob"],
                           "d_test": got["test_accuracy"] - base["test_accuracy"],
                           "d_test_low": low, "d_test_high": high}
                    if ctrl is not None:
                        row["d_control"] = got["control_accuracy"] - base["control_accuracy"]
                    if texts:
                        row["d_text"] = got["text_logprob"] - base["text_logprob"]
                    rec.add(per_row.assign(setting_index=setting_index), "row_outcomes")
                    rec.add(pd.DataFrame([row]))
                    setting_index += 1
                    bar.update(1)
        finally:
            bar.close()
    return rec.result()


def crossfit(result: Result) -> Any:
    """Per method, the cross-fitted gain: the setting picked on the tuning rows is scored on
    the test rows, the one picked on the test rows on the tuning rows, so each row is scored by
    a setting chosen without it; the gain over unsteered is the mean over all rows, with a 95 %
    bootstrap interval that redoes the picks in every draw (:func:`_crossfit_interval`),
    widened to at least the paired interval of those outcomes (:func:`paired_gain_interval`:
    a bootstrap collapses to a point when the rows all agree). Picks
    go by accuracy, then the right answers' log-prob; ties to the first swept. None for
    sessions without per-row outcomes or without a split.

    Columns: ``method``, ``value`` (picked on the tuning rows), ``value_on_test_rows``,
    ``d_crossfit``, ``d_crossfit_low``, ``d_crossfit_high``.

    Example:
        >>> crossfit(cmp)                                                    # doctest: +SKIP
    """
    import numpy as np
    import pandas as pd

    per = result.tables.get("row_outcomes")
    p = result.params
    if per is None or not len(result.df) or not p.get("tune_share"):
        return None
    tune, test = p["tune_rows"], p["test_rows"]
    outcome = {k: g.sort_values("row") for k, g in per.groupby("setting_index")}
    if -1 not in outcome:
        return None
    base = outcome[-1]["right"].to_numpy(dtype=float)

    def rank(accuracy: float, logprob: float) -> tuple[float, float]:
        """Sort key of a setting; NaN (a log-prob that overflowed) ranks lowest."""
        return tuple(-math.inf if math.isnan(x) else float(x)  # type: ignore[return-value]
                     for x in (accuracy, logprob))

    def on_test_rows(k: int) -> tuple[float, float]:
        o = outcome[k].iloc[test]
        return rank(o["right"].mean(), o["logprob"].mean(skipna=False))

    def on_tune_rows(k: int) -> tuple[float, float]:  # the columns summary() picks by
        return rank(result.df.loc[k, "tune_accuracy"], result.df.loc[k, "tune_logprob"])

    out = []
    for method, group in result.df.groupby("method", sort=False):
        settings = [k for k in group.index if k in outcome]
        if not settings:
            continue
        # max keeps the first of equal keys, as summary()'s stable sort does
        on_tune, on_test = max(settings, key=on_tune_rows), max(settings, key=on_test_rows)
        right = outcome[on_tune]["right"].to_numpy(dtype=float)  # test rows: the tuning pick
        right[tune] = outcome[on_test]["right"].to_numpy(dtype=float)[tune]
        low, high = _crossfit_interval(
            np.stack([outcome[k]["right"].to_numpy(dtype=float) for k in settings]),
            np.stack([outcome[k]["logprob"].to_numpy(dtype=float) for k in settings]),
            base, tune, test, p.get("seed", 0))
        # The bootstrap has the picks' variation but collapses to a point when the rows all
        # agree; the paired interval of these outcomes does not: the wider of the two.
        fixed = paired_gain_interval(right.astype(bool), base.astype(bool))
        low, high = min(low, fixed[0]), max(high, fixed[1])
        out.append({"method": method, "value": result.df.loc[on_tune, "value"],
                    "value_on_test_rows": result.df.loc[on_test, "value"],
                    "d_crossfit": float(right.mean() - base.mean()),
                    "d_crossfit_low": low, "d_crossfit_high": high})
    return pd.DataFrame(out)


def _auto_spans(mdl: Model, task: _Task, question: str | None = None
                ) -> dict[str, list[tuple[int, int]]]:
    from promptscope.analyses.autopasta import DEFAULT_QUESTION, key_sentences

    regions = [task.spans[p][0] if task.spans.get(p) else None for p in task.prompts]
    keys = key_sentences(mdl, task.prompts, regions, question or DEFAULT_QUESTION)
    return {p: [k.span] for p, k in zip(task.prompts, keys)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value if not (isinstance(value, float) and math.isnan(value)) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    describe = getattr(value, "describe", None)
    return describe() if callable(describe) else repr(value)
