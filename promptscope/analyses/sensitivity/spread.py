"""FormatSpread: how much of a model's few-shot accuracy is the prompt's surface format.

Sclar et al. (2023) sample plausible, meaning-preserving formats (see :mod:`.formats`), evaluate
the task in each, and report the interval of accuracies (min, max) instead of one number; a
Thompson-sampling bandit (:mod:`.bandit`) finds the best and the worst formats without evaluating
every format on every example.
"""

from __future__ import annotations

import itertools
import math
import numbers
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from promptscope.analyses._recorder import Recorder
from promptscope.analyses.sensitivity.formats import (
    FEATURES,
    FormatGrammar,
    PromptFormat,
    format_from_features,
)
from promptscope.errors import PromptscopeError
from promptscope.models import resolve_model
from promptscope.models.base import Model
from promptscope.result import Result
from promptscope.store import Store

if TYPE_CHECKING:  # the search imports numpy; `import promptscope` stays light
    from promptscope.analyses.sensitivity.bandit import Pull, SpreadBandit

KIND = "format_spread"


class FewShotTask:
    """A labelled data set ready to be rendered in any format: queries, their fixed
    demonstrations, the label column and the answer choices.

    Every query keeps the same demonstrations in every format, so formats are compared on
    identical content (meaning-preserving by construction).
    """

    def __init__(self, data: Any, *, label: str = "label", inputs: Sequence[str] | None = None,
                 choices: Sequence[Any] | None = None, shots: int = 3, demos: Any = None,
                 instruction: str = "", seed: int = 0) -> None:
        rows = _records(data, "data")
        if not rows:
            raise PromptscopeError("The data has no rows; give a DataFrame with input columns "
                                   "and a label column.")
        columns = list(dict.fromkeys(k for r in rows for k in r))
        if label not in columns:
            raise PromptscopeError(f"The data has no label column {label!r} (columns: "
                                   f"{columns}); name it with label=... (--label).")
        self.inputs = list(inputs) if inputs is not None else [c for c in columns if c != label]
        missing = [c for c in self.inputs if c not in columns]
        if missing or not self.inputs:
            raise PromptscopeError(f"Input column(s) {missing or '(none)'} not in the data "
                                   f"(columns: {columns}); name them with inputs=[...].")
        if label in self.inputs:
            raise PromptscopeError(f"The label column {label!r} cannot also be an input.")
        self.label = label
        # A format writes the space before the answer itself (its delimiter), so labels and
        # choices are compared and rendered without surrounding spaces (" yes" is "yes").
        labels = [str(r[label]).strip() for r in rows]
        self.choices = ([str(c).strip() for c in choices] if choices is not None
                        else sorted(dict.fromkeys(labels)))
        if len(set(self.choices)) != len(self.choices) or len(self.choices) < 2:
            raise PromptscopeError(f"choices must be at least two distinct labels (got "
                                   f"{self.choices}).")
        stray = sorted(set(labels) - set(self.choices))
        if stray:
            raise PromptscopeError(f"Label(s) {stray} in column {label!r} are not among the "
                                   f"choices {self.choices}; add them to choices or fix the data.")
        # Copies of plain values: the caller's frame is never touched.
        self.rows = [{**{f: r[f] for f in self.inputs}, label: y} for r, y in zip(rows, labels)]
        self.instruction = instruction
        rng = random.Random(seed)
        if demos is not None:
            given = _records(demos, "demos")
            lacking = sorted({c for d in given for c in [*self.inputs, label] if c not in d})
            if lacking or not given:
                what = f"they lack {lacking}" if lacking else "none were given"
                raise PromptscopeError(f"demos need the columns {[*self.inputs, label]}; {what}.")
            fixed = [{**{f: d[f] for f in self.inputs}, label: str(d[label]).strip()}
                     for d in given]
            stray = sorted({d[label] for d in fixed} - set(self.choices))
            if stray:
                raise PromptscopeError(f"Demonstration label(s) {stray} are not among the choices "
                                       f"{self.choices}.")
            self.demos = [fixed] * len(self.rows)
            self.shots = len(fixed)
        else:
            if shots < 0 or (shots > 0 and len(self.rows) <= shots):
                raise PromptscopeError(f"{shots} demonstrations per query need more than {shots} "
                                       f"rows (got {len(self.rows)}); lower shots or add rows.")
            # a demonstration never shows the query itself (nor a duplicate row of it: its
            # label would be in the prompt)
            keys = [tuple(str(r[f]) for f in self.inputs) for r in self.rows]
            self.demos, repeated = [], 0
            for i in range(len(self.rows)):
                pool = [k for k in range(len(self.rows)) if keys[k] != keys[i]]
                if len(pool) < shots:  # too few other rows: its copies, but never itself
                    pool, repeated = [k for k in range(len(self.rows)) if k != i], repeated + 1
                self.demos.append([self.rows[j] for j in rng.sample(pool, shots)])
            if repeated:
                warnings.warn(f"{repeated} queries have fewer than {shots} rows different from "
                              "them: their demonstrations may repeat the query with its label.",
                              stacklevel=3)
            self.shots = shots

    def __len__(self) -> int:
        return len(self.rows)

    def prompt(self, fmt: PromptFormat, i: int) -> str:
        """Query ``i`` rendered in ``fmt`` (ends with the answer descriptor)."""
        return fmt.render(self.demos[i], self.rows[i], self.inputs, self.label, self.instruction)

    def continuations(self, fmt: PromptFormat) -> list[str]:
        """The scored answer texts in ``fmt`` (the separator's trailing space + label)."""
        return [fmt.delimiter() + c for c in self.choices]

    def gold(self, i: int) -> int:
        return self.choices.index(self.rows[i][self.label])


def score_pulls(mdl: Model, task: FewShotTask, formats: Sequence[PromptFormat],
                pulls: Sequence[Pull]) -> list[dict[str, Any]]:
    """Every (format, example) of ``pulls`` scored in one backend call; one row each."""
    k = len(task.choices)
    prompts, conts, keys = [], [], []
    for p in pulls:
        fmt = formats[p.format]
        answers = task.continuations(fmt)
        for i in p.examples:
            text = task.prompt(fmt, i)
            prompts.extend([text] * k)
            conts.extend(answers)
            keys.append((p, i))
    scores = mdl.score(prompts, conts)
    rows = []
    for j, (p, i) in enumerate(keys):
        lps = [s.logprob for s in scores[j * k:(j + 1) * k]]
        # a choice that could not be scored (NaN: an API request that failed for good) leaves
        # no answer, as NaN would win every max(); -inf is a score (an API's "not in its top
        # tokens", or a chat model's other choices)
        failed = any(math.isnan(lp) for lp in lps)
        finite = [lp for lp in lps if math.isfinite(lp)]
        top = max(finite) if finite else 0.0
        z = math.log(math.fsum(math.exp(lp - top) for lp in finite)) + top if finite else 0.0
        pred = max(range(k), key=lambda c: lps[c]) if finite and not failed else -1
        gold = task.gold(i)
        rows.append({"format": p.format, "example": i, "side": p.side,
                     "label": task.choices[gold],
                     "pred": task.choices[pred] if pred >= 0 else None,
                     "correct": pred == gold, "failed": failed, "logprob_gold": lps[gold],
                     "p_gold": math.exp(lps[gold] - z) if finite and not failed
                     else math.nan})
    return rows


def format_spread(
    data: Any,
    model: Model | str | None = None,
    *,
    label: str = "label",
    inputs: Sequence[str] | None = None,
    choices: Sequence[Any] | None = None,
    formats: int | Sequence[PromptFormat] = 24,
    grammar: FormatGrammar | None = None,
    budget: int | float | None = None,
    batch: int = 10,
    shots: int = 3,
    demos: Any = None,
    instruction: str = "",
    seed: int = 0,
    exact_interval: bool = True,
    name: str = "",
    save: bool = True,
    store: Store | None = None,
    progress: bool = True,
    on_round: Callable[[SpreadBandit], None] | None = None,
) -> Result:
    """Accuracy of a few-shot classification task across plausible prompt formats.

    Each query of ``data`` is rendered with ``shots`` labelled demonstrations (the same ones in
    every format) in each format; the label is the choice with the highest log-probability
    (``model.score``; API models score by their probed method). With a ``budget`` below
    exhaustive evaluation, a Thompson-sampling bandit spends it on the formats that may still be
    the best or the worst, and stops early once both are settled (``params["evaluations"]``);
    then the two formats it named are evaluated on every example (``exact_interval``).

    Args:
        data: DataFrame or list of dicts: input columns and the ``label`` column.
        model: a loaded model, a name to load, or ``None`` for the last model loaded.
        label: the label column.
        inputs: the input columns, in prompt order (default: every other column).
        choices: the label set (default: the labels in the data, sorted).
        formats: how many formats to sample from ``grammar`` (seeded), or the formats.
        grammar: the format grammar (default :class:`FormatGrammar`).
        budget: evaluations (format x example) to spend; a float in (0, 1) is a fraction of
            exhaustive; ``None`` evaluates every format on every example.
        batch: examples per bandit pull.
        shots: demonstrations per query, drawn (seeded) from the other rows of ``data``.
        demos: a DataFrame of demonstrations to use for every query instead.
        instruction: fixed text before the examples.
        seed: seeds format sampling, demonstrations and the bandit.
        exact_interval: after a budgeted search, evaluate the two formats it named best and
            worst on the examples they have not seen, outside the budget
            (``params["report_evaluations"]``), so ``interval`` and ``spread`` are their exact
            accuracies, as the paper's code reports them. ``False`` reports the search's
            estimates, which run wide: the format named is the one that looked most extreme,
            often on a small sample.
        on_round: called with the :class:`SpreadBandit` after each round (live plots).

    Returns:
        A Result of kind ``format_spread``: ``df`` has one row per evaluation (format,
        example, predicted label, correct, gold probability); ``tables["formats"]`` one row per
        format (pattern, features, evaluations, accuracy, 95 % Wilson interval, best/worst);
        ``tables["trace"]`` the search after each round; ``tables["features"]`` the accuracy by
        feature value. ``params`` holds ``interval``, ``spread``, ``best``, ``worst``,
        ``evaluations`` (the budget's), ``report_evaluations`` (the named formats' exact
        measurement) and ``exhaustive_evaluations``.

    Example:
        >>> from promptscope.organism.classify import classification_dataset
        >>> run = promptscope.format_spread(classification_dataset(60), "organism",
        ...                                 formats=12, budget=0.25)      # doctest: +SKIP
        >>> run.params["interval"], run.params["spread"]                   # doctest: +SKIP
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from promptscope.analyses.sensitivity.bandit import Pull, check_budget, run_bandit

    task = FewShotTask(data, label=label, inputs=inputs, choices=choices, shots=shots,
                       demos=demos, instruction=instruction, seed=seed)
    gram = grammar or FormatGrammar()
    if isinstance(formats, numbers.Integral):
        if formats < 2:
            raise PromptscopeError("A spread needs at least two formats (formats >= 2).")
        fmts = gram.sample(int(formats), seed=seed, inputs=task.inputs, shots=task.shots)
    else:
        fmts = list(dict.fromkeys(formats))
    exhaustive = len(fmts) * len(task)
    spend = _budget(budget, exhaustive)
    check_budget(spend, len(fmts), len(task), batch)
    mdl = resolve_model(model)
    mdl.begin_run("choices", False)
    params: dict[str, Any] = {
        "label": task.label, "inputs": task.inputs, "choices": task.choices,
        "n_formats": len(fmts), "n_examples": len(task), "shots": task.shots, "batch": batch,
        "seed": seed, "budget": spend, "exhaustive_evaluations": exhaustive,
        "instruction": instruction,
    }
    bar = tqdm(total=min(spend, exhaustive), disable=not progress, desc="format spread",
               unit="eval", leave=False)
    source = f"{len(fmts)} formats x {len(task)} examples; format 0:\n" + \
        fmts[0].pattern(task.inputs, shots=task.shots, label=task.label)
    with Recorder(KIND, name=name, model=mdl, params=params, source=source, save=save,
                  store=store) as rec:
        # what each format is, saved first: a stopped search reloads with its formats named
        rec.add(pd.DataFrame([{"format": k, "key": f.key(), "pattern": f.pattern(task.inputs),
                               **f.features()} for k, f in enumerate(fmts)]), "format_defs")

        def evaluate(pulls: list[Pull]) -> list[list[bool]]:
            rows = score_pulls(mdl, task, fmts, pulls)
            frame = pd.DataFrame(rows)
            rec.add(frame)  # streamed: an interrupted search keeps its evaluations
            bar.update(len(rows))
            # a failed evaluation is no evidence either way (None to the search)
            it = iter(None if f else c for c, f in zip(frame["correct"], frame["failed"]))
            return [list(itertools.islice(it, len(p.examples))) for p in pulls]

        def after(b: SpreadBandit, pulls: Any, outcomes: Any) -> None:
            if on_round is not None:
                on_round(b)

        try:
            bandit = run_bandit(evaluate, len(fmts), len(task), spend, batch=batch, seed=seed,
                                on_round=after)
            named = bandit.best(), bandit.worst()
            if named[0] < 0:
                raise PromptscopeError(
                    f"FormatSpread: none of the {bandit.spent} evaluations could be scored "
                    "(see the rows' failed column, kept in the session); check the model or "
                    "endpoint and run again.")
            # A budgeted search names the extremes from partial samples; the paper's code
            # then measures the two on every example, outside the budget, before reporting.
            report = bandit.rest_of(named) if exact_interval else []
            bar.total += sum(len(p.examples) for p in report)
            for p in report:  # in pieces the size of a search round, each saved as it ends
                for k in range(0, len(p.examples), 2 * batch):
                    piece = Pull(p.format, p.examples[k:k + 2 * batch], "report")
                    bandit.update(piece, evaluate([piece])[0])
        finally:
            bar.close()
        table = format_table(fmts, bandit.successes, bandit.scored, task.inputs,
                             best=named[0], worst=named[1], failed=bandit.failed)
        rec.add(table, "formats")
        rec.add(pd.DataFrame(bandit.trace), "trace")
        effects, atomic = feature_effects(table)
        rec.add(effects, "features")
        best, worst = table.loc[named[0]], table.loc[named[1]]
        rec.params.update({
            "evaluations": int(bandit.spent),
            "report_evaluations": int(bandit.reported),
            "fraction_of_exhaustive": bandit.spent / exhaustive,
            "interval": [float(worst["accuracy"]), float(best["accuracy"])],
            "spread": float(best["accuracy"] - worst["accuracy"]),
            "best": _fmt_summary(best), "worst": _fmt_summary(worst),
            "atomic": atomic,
        })
        failures = int(pd.concat(rec.frames["rows"])["failed"].sum())
        if failures:
            rec.params["failed_evaluations"] = failures
            warnings.warn(f"FormatSpread: {failures} evaluations could not be scored (their "
                          "rows say failed=True); each format's accuracy is over the rest "
                          "(the formats table's 'failed' column).", stacklevel=2)
        rec.save_run_info(mdl)
    return rec.result()


def _budget(budget: int | float | None, exhaustive: int) -> int:
    if budget is None:
        return exhaustive
    if isinstance(budget, float) and 0 < budget <= 1:
        return max(1, round(budget * exhaustive))
    if isinstance(budget, bool) or not float(budget).is_integer() or budget < 1:
        raise PromptscopeError(f"budget must be a number of evaluations (>= 1), a fraction in "
                               f"(0, 1], or None for exhaustive (got {budget!r}).")
    return int(budget)


def _fmt_summary(row: Any) -> dict[str, Any]:
    return {"format": int(row["format"]), "key": row["key"], "accuracy": float(row["accuracy"]),
            "ci": [float(row["ci_low"]), float(row["ci_high"])],
            "evaluations": int(row["evaluations"])}


def format_table(formats: Sequence[PromptFormat], successes: Any, trials: Any,
                 inputs: Sequence[str], best: int = -1, worst: int = -1,
                 failed: Any = None) -> Any:
    """One row per format: id, key, exact pattern, features, evaluations (scored ones),
    accuracy over them and its 95 % Wilson interval, the evaluations that ``failed`` (could not
    be scored; not in the accuracy), and which formats the search named best and worst."""
    import numpy as np
    import pandas as pd

    from promptscope.analyses.sensitivity.bandit import wilson_interval

    s, n = np.asarray(successes), np.asarray(trials)
    bad = np.zeros_like(n) if failed is None else np.asarray(failed)
    lo, hi = wilson_interval(s, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = s / n
    return pd.DataFrame([
        {"format": k, "key": f.key(), "pattern": f.pattern(inputs), **f.features(),
         "evaluations": int(n[k]), "correct": int(s[k]), "accuracy": float(acc[k]),
         "ci_low": float(lo[k]), "ci_high": float(hi[k]), "failed": int(bad[k]),
         "best": k == best,
         "worst": k == worst}
        for k, f in enumerate(formats)
    ])


def feature_effects(table: Any, features: Sequence[str] = FEATURES
                    ) -> tuple[Any, dict[str, Any]]:
    """Which atomic change matters: accuracy by feature value, and between formats that differ
    in that feature only.

    Returns ``(effects, atomic)``: ``effects`` has one row per (feature, value) with the number
    of evaluated formats, their mean accuracy and its difference from the mean of all formats;
    ``atomic`` maps each feature to the mean absolute accuracy change over pairs of evaluated
    formats that differ in that feature alone (``pairs`` = how many such pairs there were).
    """
    import pandas as pd

    seen = table[table["evaluations"] > 0]
    overall = float(seen["accuracy"].mean()) if len(seen) else math.nan
    rows = []
    for feat in features:
        for value, part in seen.groupby(feat, sort=False):
            rows.append({"feature": feat, "value": value, "n_formats": len(part),
                         "accuracy": float(part["accuracy"].mean()),
                         "effect": float(part["accuracy"].mean()) - overall})
    effects = pd.DataFrame(rows, columns=["feature", "value", "n_formats", "accuracy", "effect"])
    atomic: dict[str, Any] = {}
    recs = seen.to_dict("records")
    for feat in features:
        deltas = [abs(a["accuracy"] - b["accuracy"]) for a, b in itertools.combinations(recs, 2)
                  if a[feat] != b[feat] and all(a[g] == b[g] for g in features if g != feat)]
        span = effects[effects["feature"] == feat]["accuracy"]
        atomic[feat] = {"pairs": len(deltas),
                        "mean_abs_change": float(sum(deltas) / len(deltas)) if deltas else None,
                        "range_of_value_means": float(span.max() - span.min())
                        if len(span) > 1 else 0.0}
    return effects, atomic


def check_spread_labels(rows: Any, label: str, choices: str | Sequence[str]) -> None:
    """Before a ``%%prompt --spread LABEL`` run: every row has the label column and every
    label is one of the choices (compared without surrounding spaces, as the spread is)."""
    from promptscope.analyses.prompt import parse_choices

    recs = (rows.to_dict("records") if hasattr(rows, "columns")
            else [rows] if isinstance(rows, Mapping) else list(rows))
    columns = list(dict.fromkeys(k for r in recs for k in r))
    if any(label not in r for r in recs):
        raise PromptscopeError(f"--spread {label}: the --vars rows have no '{label}' column "
                               f"(columns: {', '.join(map(str, columns))}).")
    picks = [c.strip() for c in parse_choices(choices) or []]
    stray = sorted({str(r[label]).strip() for r in recs} - set(picks))
    if stray:
        raise PromptscopeError(f"--spread {label}: label(s) {stray} are not among the choices "
                               f"{picks} (compared without surrounding spaces), so every format "
                               "would score 0; fix --choices or the labels.")


def alternatives_spread(run: Result, label: str, *, name: str = "", save: bool = True,
                        store: Store | None = None) -> Result:
    """FormatSpread over a ``%%prompt`` run's own alternatives (``%%prompt --spread LABEL``).

    Each combination of the template's ``{{a|b}}`` groups is one "format"; its accuracy is the
    share of the run's rows whose chosen answer equals the row's ``label`` column (compared
    without surrounding spaces). The result has the kind and tables of :func:`format_spread`
    (exhaustive: every combination on every row), so the same figure, summary and feature
    effects (one "feature" per alternatives group) apply.

    Example:
        >>> run = promptscope.run_prompt("{{Q|Question}}: is {x} big?{{sep=\\n|  }}Answer:",
        ...                              vars=df, choices=[" yes", " no"])  # doctest: +SKIP
        >>> alternatives_spread(run, "label").figure()                      # doctest: +SKIP
    """
    import pandas as pd

    from promptscope.analyses.sensitivity.bandit import wilson_interval
    from promptscope.templates import parse_template

    df = run.df
    if "chosen" not in df.columns:
        raise PromptscopeError("A spread needs answers to compare with the labels: run the cell "
                               "with --choices.")
    if label not in df.columns:
        raise PromptscopeError(f"--spread {label}: the rows have no '{label}' column; give the "
                               f"label column of --vars (columns: {', '.join(df.columns[:12])}).")
    groups = [g.name for g in parse_template(run.source).groups]
    if not groups:
        raise PromptscopeError("The template has no {{a|b}} alternatives, so there is nothing "
                               "to spread over; write the formats to compare as alternatives.")
    chosen = df[df["chosen"]].copy()
    chosen["correct"] = [str(c).strip() == str(g).strip()
                         for c, g in zip(chosen["choice"], chosen[label])]
    combos = chosen.groupby(groups, sort=False)["correct"].agg(["sum", "count"]).reset_index()
    lo, hi = wilson_interval(combos["sum"], combos["count"])
    table = pd.DataFrame({
        "format": range(len(combos)),
        "key": [" · ".join(f"{g}={r[g]!r}" for g in groups) for _, r in combos.iterrows()],
        **{g: combos[g] for g in groups},
        "evaluations": combos["count"].astype(int), "correct": combos["sum"].astype(int),
        "accuracy": combos["sum"] / combos["count"], "ci_low": lo, "ci_high": hi})
    table["pattern"] = table["key"]
    best, worst = int(table["accuracy"].idxmax()), int(table["accuracy"].idxmin())
    table["best"], table["worst"] = table.index == best, table.index == worst
    fmt_of = {tuple(r[g] for g in groups): k for k, r in combos.iterrows()}
    rows = chosen.assign(format=[fmt_of[tuple(r[g] for g in groups)]
                                 for _, r in chosen.iterrows()])
    effects, atomic = feature_effects(table, groups)
    n = int(table["evaluations"].sum())
    params = {"source": "template alternatives", "label": label, "groups": groups,
              "run_session": run.session_id, "n_formats": len(table), "evaluations": n,
              "exhaustive_evaluations": n, "fraction_of_exhaustive": 1.0,
              "interval": [float(table.loc[worst, "accuracy"]), float(table.loc[best, "accuracy"])],
              "spread": float(table.loc[best, "accuracy"] - table.loc[worst, "accuracy"]),
              "best": {"format": best, "pattern": table.loc[best, "pattern"]},
              "worst": {"format": worst, "pattern": table.loc[worst, "pattern"]},
              "atomic": atomic}
    with Recorder(KIND, name=name or f"spread of {run.name or 'run'}", model=run.model,
                  params=params, source=run.source, save=save, store=store) as rec:
        rec.add(rows.reset_index(drop=True))
        rec.add(table, "formats")
        rec.add(effects, "features")
    return rec.result()


def formats_of(result: Result) -> list[PromptFormat]:
    """The formats of a saved spread, in id order."""
    table = result.tables["formats"].sort_values("format")
    return [format_from_features(r) for r in table.to_dict("records")]


def _records(data: Any, what: str) -> list[Mapping[str, Any]]:
    if hasattr(data, "to_dict"):
        return data.to_dict("records")
    if isinstance(data, Sequence) and all(isinstance(r, Mapping) for r in data):
        return list(data)
    raise PromptscopeError(f"{what} must be a DataFrame or a list of dicts (got "
                           f"{type(data).__name__}).")
