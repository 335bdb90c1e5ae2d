"""Arguments of ``%promptscope spread`` (the magic in :mod:`promptscope.magics` adds them and
calls :func:`run_spread_command`); a thin parser over :func:`format_spread`."""

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
        budget = value if 0 < value < 1 else int(value) if value.is_integer() else value
    return format_spread(
        ns[args.data], args.model, label=args.label,
        inputs=[c.strip() for c in args.inputs.split(",")] if args.inputs else None,
        choices=args.choices.split("|") if args.choices else None, formats=args.formats,
        grammar=FormatGrammar.organism() if args.grammar == "organism" else None,
        budget=budget, batch=args.batch, shots=args.shots, seed=args.seed, name=args.name,
        save=not args.no_save)
