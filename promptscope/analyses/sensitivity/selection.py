"""Label-free prompt selection: pick the template whose outputs carry the most information
about the inputs (Yang et al., 2023, "Improving Probability-based Prompt Selection Through
Unified Evaluation and Analysis").

For a candidate template :math:`t`, inputs :math:`X` (no labels) and the answer choices
:math:`Y`, let :math:`p(y \\mid x, t)` be the model's probability of each choice, normalised over
the choices. The mutual information between input and output is estimated as

    MI(t) = H( (1/|X|) sum_x p(. | x, t) ) - (1/|X|) sum_x H( p(. | x, t) )

(entropy of the mean prediction minus mean entropy of the predictions): high when the template
makes the model confident on each input *and* spread over the choices across inputs.

Calibration by marginalisation (CBM) divides each choice's probability by its mean over the
inputs and renormalises over the choices,

    q(y | x, t) = [p(y | x, t) / p̄(y | t)] / sum_y' [p(y' | x, t) / p̄(y' | t)],
    p̄(y | t) = (1/|X|) sum_x' p(y | x', t),

which removes the template's prior bias toward some answers. With ``calibration="cbm"`` the
selection score is the MI of the calibrated probabilities and predictions use them too.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from promptscope.analyses._recorder import Recorder
from promptscope.analyses.sensitivity.formats import PromptFormat
from promptscope.errors import PromptscopeError
from promptscope.models import resolve_model
from promptscope.models.base import Model
from promptscope.result import Result
from promptscope.store import Store
from promptscope.templates import Template, check_rows, parse_template

KIND = "prompt_selection"
#: Columns of the candidates table (a template's group names must differ from them).
_CANDIDATE_COLUMNS = {"candidate", "prompt", "mi", "mi_cbm", "failed_inputs", "score",
                      "accuracy", "accuracy_cbm", "accuracy_used", "selected", "oracle"}


def mutual_information(probs: Any) -> float:
    """MI estimate from an ``[n_inputs, n_choices]`` matrix of choice probabilities (nats).

    Example:
        >>> round(mutual_information([[1.0, 0.0], [0.0, 1.0]]), 4)   # confident and balanced
        0.6931
        >>> mutual_information([[0.5, 0.5], [0.5, 0.5]])             # no information
        0.0
    """
    import numpy as np

    p = np.asarray(probs, dtype=float)
    mean = p.mean(axis=0)
    return float(_entropy(mean) - np.mean([_entropy(row) for row in p]))


def _entropy(p: Any) -> float:
    import numpy as np

    p = np.asarray(p, dtype=float)
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


def cbm(probs: Any) -> Any:
    """Calibration by marginalisation of an ``[n_inputs, n_choices]`` probability matrix.

    Example:
        >>> cbm([[0.9, 0.1], [0.7, 0.3]]).round(3).tolist()   # a bias toward choice 0 removed
        [[0.692, 0.308], [0.368, 0.632]]
    """
    import numpy as np

    p = np.asarray(probs, dtype=float)
    ratio = p / np.clip(p.mean(axis=0, keepdims=True), 1e-300, None)
    return ratio / ratio.sum(axis=1, keepdims=True)


def select_prompt(
    candidates: Sequence[str | PromptFormat | Callable[[Mapping[str, Any]], str]],
    data: Any,
    model: Model | str | None = None,
    *,
    choices: str | Sequence[str] | None = None,
    label: str | None = None,
    calibration: str | None = "cbm",
    demos: Any = None,
    shots: int = 3,
    chat: bool = False,
    seed: int = 0,
    name: str = "",
    save: bool = True,
    store: Store | None = None,
    progress: bool = True,
) -> Result:
    """Rank candidate prompts without labels by mutual information (MI), optionally after CBM
    calibration, and compare the pick with the oracle (the most accurate candidate) when
    ``label`` names a column of gold answers.

    Args:
        candidates: templates (promptscope syntax over the data's columns; ``choices`` are their
            continuations), :class:`PromptFormat` s of a few-shot task (``choices`` are label
            values; demonstrations from ``demos`` or, with ``label``, ``shots`` other rows), or
            functions ``row -> prompt``; or one template whose ``{{a|b}}`` combinations are the
            candidates (the candidates table then has a column per group: the option chosen).
        data: the unlabelled inputs (DataFrame or list of dicts).
        choices: the answers, as ``" yes| no"`` or a list.
        label: optional gold column: it reports each candidate's accuracy and the oracle; and
            for format candidates without ``demos`` it labels the demonstrations drawn from
            ``data`` (the selection is then not label-free).

        calibration: ``"cbm"`` (default) or ``None`` (raw probabilities).

    Returns:
        A Result of kind ``prompt_selection``: ``df`` one row per candidate x input with the
        choice probabilities (raw and calibrated) and predictions; ``tables["candidates"]`` one
        row per candidate with ``mi``, ``mi_cbm``, the selection ``score``, accuracies when
        labelled, and ``selected`` / ``oracle``; ``params`` has ``selected``, ``oracle`` and
        ``effectiveness`` = accuracy(selected) / accuracy(oracle).

    Example:
        >>> sel = promptscope.select_prompt(["Review: {text}\\nSentiment:",
        ...                                  "{text} It was"], reviews,
        ...                                 choices=" good| bad", label="gold")  # doctest: +SKIP
        >>> sel.params["selected"], sel.params["effectiveness"]                   # doctest: +SKIP
    """
    import numpy as np
    import pandas as pd
    from tqdm.auto import tqdm

    from promptscope.analyses.prompt import parse_choices
    from promptscope.analyses.sensitivity.spread import FewShotTask, _records

    if calibration not in (None, "cbm"):
        raise PromptscopeError(f"calibration must be 'cbm' or None (got {calibration!r}).")
    groups: list[dict[str, str]] = []
    if isinstance(candidates, str):  # one template: its {{a|b}} combinations are the candidates
        tpl = parse_template(candidates)
        taken = sorted({g.name for g in tpl.groups} & _CANDIDATE_COLUMNS)
        if taken:  # the candidates table gets a column per group
            raise PromptscopeError(f"Rename the alternatives group(s) {taken}: the candidates "
                                   "table has columns of that name ({{other=a|b}}).")
        groups = [choice for choice, _ in tpl.combinations()]
        candidates = [_Combination(tpl, i, text) for i, (_, text) in
                      enumerate(tpl.combinations())]
    if len(candidates) < 2:
        raise PromptscopeError("Prompt selection needs at least two candidate prompts: a list "
                               "of templates, or one template with {{a|b}} alternatives.")
    rows = _records(data, "data")
    if not rows:
        raise PromptscopeError("Prompt selection needs at least one input row.")
    for cand in candidates:
        if isinstance(cand, (str, _Combination)):  # a missing column fails now, not mid-run
            check_rows(cand.template if isinstance(cand, _Combination)
                       else parse_template(cand), rows)
    picks = parse_choices(choices) if choices is not None else None
    if label is not None and any(label not in r for r in rows):
        raise PromptscopeError(f"label={label!r}: no such column in the data.")
    formats = [c for c in candidates if isinstance(c, PromptFormat)]
    if picks is None and len(formats) < len(candidates):
        raise PromptscopeError("Give choices=' A| B' (the continuations that template "
                               "candidates are scored on).")
    if picks is not None and len(picks) < 2:
        raise PromptscopeError(f"Selection ranks at least two choices (got {picks}); with one "
                               "answer there is no information to measure.")
    task = None
    if formats:
        if picks is None and label is None:
            raise PromptscopeError("Format candidates need choices=[...] (the label values).")
        if demos is None and label is None:
            raise PromptscopeError("Format candidates need labelled demonstrations: pass "
                                   "demos=DataFrame (or label=COLUMN to draw them from data).")
        # Without gold labels the queries get a placeholder label (never rendered: a query
        # stops at its answer descriptor); the demos carry theirs in column `label` or "label".
        lab = label or "label"
        filled = rows if label else [{**r, lab: (picks or [""])[0].strip()} for r in rows]
        task = FewShotTask(filled, label=lab, inputs=[k for k in rows[0] if k != lab],
                           choices=[c.strip() for c in picks] if picks else None, shots=shots,
                           demos=demos, seed=seed)
    answers = task.choices if task is not None else [c.strip() for c in picks]
    mdl = resolve_model(model)
    mdl.begin_run("choices", chat)
    gold = None
    if label is not None:
        gold = [_match(r[label], picks or answers) for r in rows]
    params: dict[str, Any] = {"calibration": calibration, "choices": answers,
                              "n_candidates": len(candidates), "n_inputs": len(rows),
                              "label": label, "chat": chat,
                              "candidates": [_describe(c, task) for c in candidates]}
    bar = tqdm(total=len(candidates), disable=not progress, desc="prompt selection",
               unit="prompt", leave=False)
    with Recorder(KIND, name=name, model=mdl, params=params, save=save, store=store) as rec:
        summary = []
        try:
            for ci, cand in enumerate(candidates):
                texts, conts = _prompts(cand, rows, task, picks)
                if chat:
                    texts = [mdl.chat_prompt(t) for t in texts]
                k = len(conts)
                scores = mdl.score([t for t in texts for _ in conts], conts * len(texts))
                lps = np.array([s.logprob for s in scores], dtype=float).reshape(len(texts), k)
                # An input whose choices could not all be scored (a failed request: NaN; or no
                # finite choice) is left out of this candidate's MI, calibration and accuracy.
                ok = ~np.isnan(lps).any(axis=1) & np.isfinite(lps).any(axis=1)
                probs, cal = np.full(lps.shape, np.nan), np.full(lps.shape, np.nan)
                if ok.any():
                    good = lps[ok]
                    p = np.exp(good - good.max(axis=1, keepdims=True))
                    probs[ok] = p / p.sum(axis=1, keepdims=True)
                    cal[ok] = cbm(probs[ok])
                use = cal if calibration == "cbm" else probs
                frame = pd.DataFrame({"candidate": ci, "input": range(len(rows)),
                                      "prompt": texts, "probs": probs.tolist(),
                                      "probs_cbm": cal.tolist(),
                                      "pred": _predictions(probs, ok, answers),
                                      "pred_cbm": _predictions(cal, ok, answers)})
                entry = {"candidate": ci, "prompt": params["candidates"][ci],
                         "mi": mutual_information(probs[ok]) if ok.any() else math.nan,
                         "mi_cbm": mutual_information(cal[ok]) if ok.any() else math.nan,
                         "failed_inputs": int((~ok).sum())}
                entry["score"] = entry["mi_cbm"] if calibration == "cbm" else entry["mi"]
                if gold is not None:
                    frame["label"] = [answers[g] for g in gold]
                    right = np.asarray(gold)[ok]
                    for key, pr in (("accuracy", probs), ("accuracy_cbm", cal),
                                    ("accuracy_used", use)):
                        entry[key] = float(np.mean(pr[ok].argmax(1) == right)) if ok.any() \
                            else math.nan
                rec.add(frame)
                summary.append(entry)
                bar.update(1)
        finally:
            bar.close()
        table = pd.DataFrame(summary)
        if table["score"].isna().all():
            raise PromptscopeError("No candidate could be scored on any input (every score "
                                   "failed or was not finite); see the rows' probabilities.")
        failed = int(table["failed_inputs"].sum())
        if failed:
            warnings.warn(f"Prompt selection: {failed} (candidate, input) pairs could not be "
                          "scored and are left out of their candidate's MI and accuracy.",
                          stacklevel=2)
        for k, group in enumerate(groups[0] if groups else ()):  # each candidate's options
            table.insert(2 + k, group, [g[group] for g in groups])
        if groups:  # the figure names candidates by their options
            rec.params["groups"] = list(groups[0])
        chosen = int(table["score"].idxmax())
        table["selected"] = table.index == chosen
        rec.params["selected"] = chosen
        rec.params["selected_prompt"] = params["candidates"][chosen]
        if gold is not None:
            oracle = int(table["accuracy_used"].idxmax())
            table["oracle"] = table.index == oracle
            best = table.loc[oracle, "accuracy_used"]
            rec.params.update({
                "oracle": oracle,
                "accuracy_selected": float(table.loc[chosen, "accuracy_used"]),
                "accuracy_oracle": float(best),
                "effectiveness": float(table.loc[chosen, "accuracy_used"] / best)
                if best > 0 else math.nan,
                # Spearman = Pearson on ranks (pandas' method="spearman" needs scipy)
                "rank_correlation": float(table["score"].rank().corr(
                    table["accuracy_used"].rank())),
            })
        rec.add(table, "candidates")
    return rec.result()


def _match(value: Any, choices: Sequence[str]) -> int:
    """Index of the choice a gold label names (exactly, or up to surrounding spaces)."""
    text = str(value)
    for i, c in enumerate(choices):
        if text == c or text.strip() == c.strip():
            return i
    raise PromptscopeError(f"The label {text!r} is not among the choices {list(choices)}.")


@dataclass(frozen=True)
class _Combination:
    """One combination of a template's ``{{a|b}}`` groups, as a candidate: ``row -> prompt``."""

    template: Template
    index: int  # in Template.expand's order
    text: str  # the template with this combination, for tables

    def __call__(self, row: Mapping[str, Any]) -> str:
        return next(itertools.islice(self.template.expand([dict(row)]), self.index, None)).text


def _predictions(probs: Any, ok: Any, answers: Sequence[str]) -> list[str | None]:
    """The most likely answer per input (``None`` where the input could not be scored)."""
    return [answers[int(p.argmax())] if good else None for p, good in zip(probs, ok)]


def _describe(cand: Any, task: Any) -> str:
    if isinstance(cand, _Combination):
        return cand.text
    if isinstance(cand, PromptFormat):
        return cand.pattern(task.inputs if task is not None else ["input"])
    if isinstance(cand, str):
        return cand
    return getattr(cand, "__name__", repr(cand))


def _prompts(cand: Any, rows: list[Mapping[str, Any]], task: Any,
             picks: list[str] | None) -> tuple[list[str], list[str]]:
    if isinstance(cand, PromptFormat):
        return [task.prompt(cand, i) for i in range(len(rows))], task.continuations(cand)
    if isinstance(cand, str):
        tpl = parse_template(cand)
        if tpl.groups:
            raise PromptscopeError("A candidate in a list cannot have {{a|b}} alternatives; give "
                                   "each as its own candidate, or pass the one template alone "
                                   "(its combinations are then the candidates).")
        return [next(tpl.expand([dict(r)])).text for r in rows], list(picks or [])
    return [cand(r) for r in rows], list(picks or [])
