"""The sensitivity analyses behind the magics, as thin layers over the Python functions:
``%promptscope spread`` (:func:`format_spread`; :mod:`promptscope.magics` adds its arguments and
calls :func:`run_spread_command`) and ``%%prompt --posix`` / ``--select`` over a cell template's
own ``{{a|b}}`` alternatives (:func:`posix`, :func:`select_prompt`)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from promptscope.errors import PromptscopeError


def add_spread_parser(sub: Any) -> None:
    """Register the ``spread`` subcommand on an argparse subparsers object."""
    s = sub.add_parser("spread", help="FormatSpread: accuracy of a labelled DataFrame across "
                       "plausible prompt formats (best, worst, spread)")
    s.add_argument("data", help="notebook variable holding a DataFrame (input columns + label)")
    s.add_argument("--label", default="label", help="the label column (default: label)")
    s.add_argument("--inputs", metavar="'a,b'", help="input columns in prompt order (default: "
                   "all other columns)")
    s.add_argument("--choices", metavar="'A|B'", help="the label set (default: labels in data)")
    s.add_argument("--model", help="a loaded model's name (default: the last model loaded)")
    s.add_argument("--formats", type=int, default=24, help="formats to sample (default 24)")
    s.add_argument("--grammar", default="default", choices=["default", "organism"],
                   help="format grammar: the paper-style default, or the organism's space")
    s.add_argument("--budget", default=None, help="evaluations to spend (an int, or a fraction "
                   "like 0.25 of exhaustive); default: exhaustive")
    s.add_argument("--batch", type=int, default=10, help="examples per bandit pull")
    s.add_argument("--shots", type=int, default=3, help="demonstrations per query")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--name", default="", help="session name")
    s.add_argument("-o", "--out", metavar="VAR", help="store the Result in this variable")
    s.add_argument("--no-save", action="store_true", help="do not save a session")


def run_spread_command(args: argparse.Namespace, ns: Mapping[str, Any]) -> Any:
    """Run ``%promptscope spread`` with parsed ``args`` and the notebook namespace ``ns``."""
    from promptscope.analyses.prompt import parse_choices
    from promptscope.analyses.sensitivity.formats import FormatGrammar
    from promptscope.analyses.sensitivity.spread import format_spread

    if args.data not in ns:
        raise PromptscopeError(f"spread {args.data}: no variable named {args.data!r} in the "
                               "notebook; define a DataFrame with input columns and a label.")
    budget: int | float | None = None
    if args.budget is not None:
        try:
            value = float(args.budget)
        except ValueError:
            raise PromptscopeError(f"--budget {args.budget!r}: give a number of evaluations "
                                   "(600) or a fraction of exhaustive (0.25).") from None
        # as in Python: a fraction written with a point ("1.0": exhaustive), else a count
        fraction = "." in args.budget and 0 < value <= 1
        budget = value if fraction or 0 < value < 1 else \
            int(value) if value.is_integer() else value
    return format_spread(
        ns[args.data], args.model, label=args.label,
        inputs=[c.strip() for c in args.inputs.split(",")] if args.inputs else None,
        choices=parse_choices(args.choices) if args.choices else None, formats=args.formats,
        grammar=FormatGrammar.organism() if args.grammar == "organism" else None,
        budget=budget, batch=args.batch, shots=args.shots, seed=args.seed, name=args.name,
        save=not args.no_save)


def cell_rows(template: str, rows: Any, ns: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A ``%%prompt`` cell's ``--vars`` rows as dicts (one ``{}`` row without ``--vars``), each
    completed from the notebook namespace for template variables it lacks (as
    :func:`~promptscope.analyses.prompt.run_prompt` fills them)."""
    from promptscope.templates import check_rows, parse_template

    tpl = parse_template(template)
    check_rows(tpl, rows, ns)
    if rows is None or isinstance(rows, Mapping):
        records = [dict(rows or {})]
    elif hasattr(rows, "to_dict") and hasattr(rows, "columns"):
        records = rows.to_dict("records")
    else:
        records = [dict(r) for r in rows]
    return [{**{v: ns[v] for v in tpl.variables if v in ns}, **r} for r in records]


def run_posix_cell(args: argparse.Namespace, template: str, rows: Any,
                   ns: Mapping[str, Any]) -> Any:
    """``%%prompt --posix [TYPES]``: POSIX of each row over the template's own ``{{a|b}}``
    alternatives (type ``template``) and seeded typos (``spelling``)."""
    from promptscope.analyses.sensitivity.posix import posix
    from promptscope.templates import parse_template

    records = cell_rows(template, rows, ns)
    types = [t.strip() for t in args.posix.split(",") if t.strip()] or None
    responses = None
    if args.target is not None:  # one given response per row; {column} filled from the row
        target = parse_template(args.target)
        responses = [next(target.expand([r])).text for r in records]
    return posix(records, args.model, template=template, types=types, responses=responses,
                 chat=args.chat, max_new_tokens=args.max_new_tokens, seed=args.seed,
                 name=args.name, save=not args.no_save)


def run_select_cell(args: argparse.Namespace, template: str, rows: Any,
                    ns: Mapping[str, Any]) -> Any:
    """``%%prompt --select [LABEL]``: rank the combinations of the template's ``{{a|b}}``
    alternatives without labels (mutual information after CBM); LABEL adds the oracle."""
    from promptscope.analyses.sensitivity.selection import select_prompt

    return select_prompt(template, cell_rows(template, rows, ns), args.model,
                         choices=args.choices, label=args.select or None, chat=args.chat,
                         seed=args.seed, name=args.name, save=not args.no_save)
