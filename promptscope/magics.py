"""IPython magics: ``%promptscope`` (models, sessions, help) and ``%%prompt`` (run a template).

Each magic parses its arguments and calls the public Python API; nothing here computes. Errors a
user can fix (a :class:`~promptscope.errors.PromptscopeError`, bad arguments) become a short
``UsageError`` message instead of a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import re
import shlex
from collections.abc import Callable
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class, no_var_expand

from promptscope.errors import PromptscopeError, describe


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as a UsageError (short message in the notebook)."""

    def error(self, message: str) -> NoReturn:
        hint = ""
        if message.startswith("unrecognized arguments:"):
            options = [o for a in self._actions for o in a.option_strings]
            first = message.split(":", 1)[1].split()[0]
            close = difflib.get_close_matches(first.split("=")[0], options, n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
        raise UsageError(f"{self.prog}: {message}.{hint} See `{self.prog} --help`.")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if args is not None:
            args = self._dash_values(list(args))
        return super().parse_known_args(args, namespace)

    def _dash_values(self, args: list[str]) -> list[str]:
        """``--choices "-1|-2"``: argparse reads a value that starts with '-' as an option and
        says the option lacks its value, so such a value is joined to its option (``--x=-1``)
        first. (Subcommands' parsers do the same with what is passed on to them.)"""
        out: list[str] = []
        i = 0
        while i < len(args):
            option, value = args[i], args[i + 1] if i + 1 < len(args) else None
            actions = self._actions_named(option)
            action = actions.pop() if len(actions) == 1 else None
            if (action is not None and action.nargs is None and value is not None
                    and value.startswith("-") and value != "--"
                    and not self._actions_named(value.split("=", 1)[0])):
                out.append(f"{option}={value}" if option.startswith("--") else option + value)
                i += 2
            else:
                out.append(option)
                i += 1
        return out

    def _actions_named(self, name: str) -> set[Any]:
        """The options argparse may take ``name`` for: its own, else every long option it
        abbreviates (``--cho`` for ``--choices``; several: ambiguous)."""
        if name in self._option_string_actions:
            return {self._option_string_actions[name]}
        if not (name.startswith("--") and self.allow_abbrev):
            return set()
        return {a for o, a in self._option_string_actions.items() if o.startswith(name)}

    def print_help(self, file: Any = None) -> None:
        """Nothing: ``exit`` hands the help text to the magic, which prints it once."""

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise _HelpShown(self.format_help())


class _HelpShown(Exception):
    """--help was asked for; carries the help text."""


def _prompt_parser() -> _Parser:
    p = _Parser(prog="%%prompt", description=(
        "Run every variant of the template in the cell body on a model. Template syntax: "
        "{name} variables, {{a|b}} alternatives (cartesian product), {{group=a|b}} named "
        "alternatives, <<text>> emphasis. Default: generate; --choices ranks answers; --target "
        "scores one continuation."), add_help=True)
    p.add_argument("--model", help="a loaded model's name, 'organism' or a model folder "
                   "(default: the last model loaded)")
    p.add_argument("--vars", metavar="NAME", help="notebook variable holding a dict, a list of "
                   "dicts or a DataFrame: one run per row")
    p.add_argument("--choices", metavar="'A|B'", help="answers to rank by log-probability, "
                   "separated by '|' (quote them to keep leading spaces: \" yes| no\"; \\| is "
                   "a literal bar), or {name} of a notebook list")
    p.add_argument("--target", metavar="TEXT", help="one continuation to score")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=1, help="samples per variant")
    p.add_argument("--chat", action="store_true", help="wrap each variant in the model's chat "
                   "template")
    p.add_argument("--attention", action="store_true", help="capture attention instead of "
                   "scoring: explorer widget, mass on each template part per layer and head")
    p.add_argument("--layers", default="all", help="with --attention: layers to capture, e.g. "
                   "'0,3' (default: all)")
    p.add_argument("--attribute", action="store_true", help="attribute the log-prob of the "
                   "target (--choices, --target, else the greedy answer) to the template's parts "
                   "or tokens with captum: prompt heatmap, bar per part")
    p.add_argument("--attr-method", default=None, choices=["ablation", "shapley", "kernelshap",
                   "ig"], help="with --attribute: ablation (default for parts), shapley, "
                   "kernelshap, or ig (integrated gradients; default for tokens)")
    p.add_argument("--attr-level", default="parts", choices=["parts", "tokens"],
                   help="with --attribute: one value per template part (default) or per token")
    p.add_argument("--steer", nargs="?", const="pasta", default=None, metavar="METHOD",
                   help="steer: alone or 'pasta', attention to the <<emphasised>> spans (PASTA); "
                   "'vector' adds --vector to the residual stream; 'pasta+vector' does both")
    p.add_argument("--vector", metavar="NAME", help="with --steer vector: a notebook variable "
                   "holding a SteeringVector, or the name of a saved one")
    p.add_argument("--strength", type=float, default=1.0, help="with --steer vector: the "
                   "vector's multiplier (ICV: lambda; default 1)")
    p.add_argument("--steer-layers", default=None, metavar="'2,3'", help="with --steer vector: "
                   "the layers to steer (default: all the vector has)")
    p.add_argument("--steer-start", default="0", metavar="POS", help="with --steer vector: "
                   "steer each prompt's tokens from this position on, or 'last' (its last "
                   "token and what follows: where a knob is read and set; default 0)")
    p.add_argument("--heads", default="all", help="heads to steer: 'all', '3.1,4.0' "
                   "(layer.head), 'L3' (every head of layer 3), or from a saved head profile "
                   "(promptscope.profile_heads): 'top:8' (this model's newest) or "
                   "'profile:NAME[:8]' (default: all)")
    p.add_argument("--alpha", type=float, default=0.01, help="PASTA's scaling of the "
                   "non-emphasised tokens, in (0, 1] (default 0.01)")
    p.add_argument("--steer-mode", default="exclude", choices=["exclude", "include"],
                   help="with --steer: PASTA scales the attention to the non-emphasised tokens "
                   "by --alpha (exclude), or to the emphasised ones (include; alpha > 1 "
                   "up-weights them)")
    p.add_argument("--kernel", default="sdpa", choices=["sdpa", "flex"], help="with --steer: "
                   "PASTA's attention kernel (flex: flex_attention, no dense bias mask; fused "
                   "on CUDA)")
    p.add_argument("--auto-emphasis", action="store_true", help="with --steer: AutoPASTA, the "
                   "model names the key sentence inside <<...>> (or the prompt) to steer")
    p.add_argument("--compare", action="store_true", help="with --steer: run each variant "
                   "unsteered and steered")
    p.add_argument("--spread", metavar="LABEL", help="with --choices and --vars: FormatSpread "
                   "over the template's own {{a|b}} alternatives, against the LABEL column "
                   "(the cell then shows the spread; -o gets it)")
    p.add_argument("--posix", nargs="?", const="", metavar="TYPES", help="POSIX prompt "
                   "sensitivity of each --vars row: how much the log-likelihood of its answers "
                   "moves across the template's own {{a|b}} alternatives ('template') and seeded "
                   "typos ('spelling'); TYPES picks, e.g. 'template' (default: both). Answers: "
                   "greedy (--max-new-tokens), or --target")
    p.add_argument("--select", nargs="?", const="", metavar="LABEL", help="with --choices: "
                   "pick the combination of the template's {{a|b}} alternatives without labels "
                   "(mutual information after calibration); LABEL, a gold column of --vars, adds "
                   "each one's accuracy and the oracle")
    p.add_argument("--name", default="", help="session name")
    p.add_argument("-o", "--out", metavar="VAR", help="store the Result in this variable")
    p.add_argument("--no-save", action="store_true", help="do not save a session")
    return p


def _promptscope_parser() -> _Parser:
    p = _Parser(prog="%promptscope", description="Models and sessions of promptscope.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    m = sub.add_parser("model", help="load a model (cached) and make it the default")
    m.add_argument("name", help="'organism', a model folder, a hub name, or openai:MODEL for a "
                   "model behind an OpenAI-compatible API (OpenAI, vLLM, llama.cpp server)")
    m.add_argument("--device", help="cuda, mps, cpu (default: best available)")
    m.add_argument("--dtype", help="bf16, fp16, fp32 (default: bf16 on capable GPUs)")
    m.add_argument("--as", dest="alias", metavar="ALIAS", help="name shown in tables")
    m.add_argument("--reload", action="store_true", help="load again even if cached")
    m.add_argument("--base-url", metavar="URL", help="openai:MODEL only: the API root, e.g. "
                   "http://localhost:8000/v1 (default: OpenAI)")
    m.add_argument("--api-key-env", metavar="VAR", help="openai:MODEL only: the environment "
                   "variable holding the API key (default OPENAI_API_KEY, sent only to OpenAI); "
                   "keys are never typed into a notebook")
    m.add_argument("--max-concurrency", type=int, metavar="N", help="openai:MODEL only: "
                   "requests in flight at once (default 16)")
    m.add_argument("--timeout", type=float, metavar="S", help="openai:MODEL only: seconds per "
                   "request (default 60)")
    m.add_argument("--no-cache", action="store_true", help="openai:MODEL only: do not cache "
                   "responses on disk")
    m.add_argument("--tokenizer", metavar="PATH", help="openai:MODEL only: the served model's "
                   "tokenizer (folder or hub id) for %%%%reach (default: the root vLLM reports)")
    sub.add_parser("models", help="list the models loaded in this kernel")
    s = sub.add_parser("sessions", help="list saved sessions, newest first")
    s.add_argument("--kind")
    s.add_argument("--model")
    s.add_argument("--search", metavar="TEXT", help="in name, source, model")
    s.add_argument("--limit", type=int, default=20)
    ld = sub.add_parser("load", help="show a saved session")
    ld.add_argument("session_id")
    ld.add_argument("-o", "--out", metavar="VAR", help="store the Result in this variable")
    from promptscope.analyses.sensitivity.cli import add_spread_parser

    add_spread_parser(sub)  # %promptscope spread DATA ... (FormatSpread)
    st = sub.add_parser("store", help="where this workspace's sessions are saved")
    st.add_argument("--compact", action="store_true", help="give the space of deleted sessions "
                    "back to the disk")
    sub.add_parser("help", help="show this help and the %%%%prompt and %%%%reach options")
    for sp in sub.choices.values():
        sp.__class__ = _Parser
    return p


def _usage() -> str:
    return (_promptscope_parser().format_help() + "\n" + _prompt_parser().format_help()
            + "\n" + _reach_parser().format_help())


def _without_comment(line: str) -> str:
    """``line`` without a trailing ``# comment``: a ``#`` that starts a word outside quotes (as
    in a shell; ``--choices "#1|#2"``, ``a#b`` and ``run\\ #2`` keep theirs)."""
    quote, word_start, i = None, True, 0
    while i < len(line):
        c = line[i]
        if c == "\\" and quote != "'":
            i += 2  # an escaped character, whatever it is, is part of a word
            word_start = False
            continue
        if quote:
            quote = None if c == quote else quote
        elif c in "\"'":
            quote, word_start = c, False
        elif c.isspace():
            word_start = True
        elif c == "#" and word_start:
            return line[:i]
        else:
            word_start = False
        i += 1
    return line


@magics_class
class PromptscopeMagics(Magics):
    """The promptscope magics; ``%promptscope help`` lists everything."""

    def _parse(self, parser: _Parser, line: str) -> argparse.Namespace | None:
        try:
            return parser.parse_args(shlex.split(_without_comment(line)))
        except ValueError as exc:  # unbalanced quotes
            raise UsageError(f"Could not read the arguments ({exc}); check the quotes.") from None
        except _HelpShown as shown:
            print(shown.args[0])
            return None

    @line_magic
    def promptscope(self, line: str) -> Any:
        args = self._parse(_promptscope_parser(), line)
        if args is None:
            return None
        if args.command in (None, "help"):
            print(_usage())
            return None
        return _friendly(lambda: self._command(args))

    def _command(self, args: argparse.Namespace) -> Any:
        import promptscope

        if args.command == "model":
            api = {k: v for k, v in [("base_url", args.base_url),
                                     ("api_key_env", args.api_key_env),
                                     ("max_concurrency", args.max_concurrency),
                                     ("timeout", args.timeout),
                                     ("cache", False if args.no_cache else None),
                                     ("tokenizer", args.tokenizer)]
                   if v is not None}
            if api and not args.name.startswith("openai:"):
                raise UsageError("--base-url, --api-key-env, --max-concurrency, --timeout, "
                                 "--no-cache and --tokenizer are for API models: name them "
                                 "openai:MODEL.")
            model = promptscope.load_model(args.name, device=args.device, dtype=args.dtype,
                                           alias=args.alias, reload=args.reload, **api)
            print(f"Loaded {model!r}; it is now the default model.")
            return None
        if args.command == "models":
            if not promptscope.loaded_models():
                from promptscope.models import HOW_TO_LOAD

                print(f"No model loaded yet: {HOW_TO_LOAD}")
                return None
            return promptscope.list_models()
        if args.command == "sessions":
            return promptscope.sessions(kind=args.kind, model=args.model, search=args.search,
                                        limit=args.limit)
        if args.command == "spread":
            from promptscope.analyses.sensitivity.cli import run_spread_command

            result = run_spread_command(args, self.shell.user_ns)
            if args.out:
                self.shell.user_ns[args.out] = result
            return result
        if args.command == "store":
            store = promptscope.Store.default()
            if args.compact:
                print(f"Freed {store.compact() / 2**20:.1f} MB.")
            return str(store.path)
        result = promptscope.load(args.session_id)  # "load"
        if args.out:
            self.shell.user_ns[args.out] = result
        return result

    @cell_magic
    @no_var_expand  # {name} in options is filled by _fill_options: row columns come first
    def prompt(self, line: str, cell: str) -> Any:
        parser = _prompt_parser()
        args = self._parse(parser, line)
        if args is None:
            return None
        _check_ignored_options(args, parser)
        from promptscope.analyses.prompt import run_prompt

        ns = self.shell.user_ns
        rows = None
        if args.vars:
            if args.vars not in ns:
                raise UsageError(f"--vars {args.vars}: no variable named '{args.vars}' in the "
                                 "notebook. Define it first (a dict, list of dicts or DataFrame).")
            rows = ns[args.vars]
        _fill_options(args, ns, rows)

        steer = None
        if args.steer and args.steer not in ("pasta", "vector", "pasta+vector"):
            raise UsageError(f"--steer {args.steer}: the methods are pasta (the default), vector "
                             "and pasta+vector.")
        if args.steer:
            steer = {"heads": args.heads, "alpha": args.alpha, "mode": args.steer_mode,
                     "compare": args.compare, "auto": args.auto_emphasis}
            if args.kernel != "sdpa":
                steer["kernel"] = args.kernel
            if args.steer == "vector":  # PASTA's options do not apply
                steer = {"compare": args.compare, "auto": args.auto_emphasis,
                         **_vector_options(args, ns)}
            elif args.steer != "pasta":
                steer.update(_vector_options(args, ns))
        elif args.vector:
            raise UsageError("--vector goes with --steer vector (or --steer pasta+vector).")
        elif args.compare or args.auto_emphasis:
            raise UsageError("--compare and --auto-emphasis go with --steer.")

        if (args.attr_method or args.attr_level != "parts") and not args.attribute:
            raise UsageError("--attr-method and --attr-level go with --attribute.")
        if args.attribute and args.attention:
            raise UsageError("Use --attribute or --attention, not both.")
        if args.spread and (args.attribute or args.attention or not args.choices
                            or not args.vars):
            raise UsageError("--spread LABEL needs --choices and --vars (rows with a LABEL "
                             "column), and goes without --attribute/--attention.")
        _check_sensitivity_options(args)
        if args.spread:  # before the run: a wrong label column would waste all of it
            from promptscope.analyses.sensitivity.spread import check_spread_labels

            _friendly(lambda: check_spread_labels(rows, args.spread, args.choices))

        def run() -> Any:
            if args.posix is not None or args.select is not None:
                from promptscope.analyses.sensitivity.cli import run_posix_cell, run_select_cell

                go = run_posix_cell if args.posix is not None else run_select_cell
                return go(args, cell.rstrip("\n"), rows, ns)
            if args.attribute:
                from promptscope.analyses.attribution import attribute

                return attribute(cell.rstrip("\n"), args.model, vars=rows, namespace=ns,
                                 choices=args.choices, target=args.target,
                                 method=args.attr_method, level=args.attr_level,
                                 max_new_tokens=args.max_new_tokens, chat=args.chat,
                                 steer={k: v for k, v in (steer or {}).items() if k != "auto"}
                                 or None, seed=args.seed, name=args.name,
                                 save=not args.no_save)
            if args.attention:
                from promptscope.analyses.attention import attention

                return attention(cell.rstrip("\n"), args.model, vars=rows, namespace=ns,
                                 layers=args.layers, chat=args.chat, name=args.name,
                                 save=not args.no_save,
                                 steer={k: v for k, v in (steer or {}).items()
                                        if k not in ("compare", "auto")} or None)
            result = run_prompt(
                cell.rstrip("\n"), args.model, vars=rows, namespace=ns, choices=args.choices,
                target=args.target, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_p=args.top_p, n=args.n, seed=args.seed,
                chat=args.chat, name=args.name, save=not args.no_save, steer=steer)
            if args.spread:
                from promptscope.analyses.sensitivity import alternatives_spread

                return alternatives_spread(result, args.spread, save=not args.no_save)
            return result

        return _run_into(ns, args.out, run)

    @cell_magic
    def reach(self, line: str, cell: str) -> Any:
        args = self._parse(_reach_parser(), line)
        if args is None:
            return None
        x0s: list[Any] = []
        for text in cell.splitlines():
            if not text.strip():
                continue
            body, sep, nxt = text.rpartition("||")
            x0s.append((body, nxt) if sep else text)
        if not x0s:
            raise UsageError("%%reach needs initial states: put one x0 per line in the cell body.")
        from promptscope.analyses.reachability import reachability

        return _run_into(self.shell.user_ns, args.out, lambda: reachability(
            args.model, x0s, args.targets, k_max=args.k, method=args.method, steps=args.steps,
            search_width=args.width, top_k=args.top_k, seed=args.seed, bound=not args.no_bound,
            name=args.name, save=not args.no_save))


_NOTEBOOK_NAME = re.compile(r"\{\s*([^\W\d]\w*)\s*\}|\$([^\W\d]\w*)")


def _fill_options(args: argparse.Namespace, ns: dict[str, Any], rows: Any) -> None:
    """``{name}`` and ``$name`` in --choices, --target and --name from the notebook, as
    IPython would fill them, except the names of --vars columns: ``--target "{answer}"`` is
    each row's own answer (attribution, POSIX), even where the notebook also has an
    ``answer``. A whole ``--choices "{colors}"`` may be a list."""
    columns = _row_columns(rows)

    def known(m: Any) -> str | None:
        name = m.group(1) or m.group(2)
        return name if name in ns and name not in columns else None

    def fill(m: Any) -> str:
        name = m.group(1) or m.group(2)
        if name in columns:  # the row fills it: its {name} form, which the analyses read
            return "{" + name + "}"
        return str(ns[name]) if known(m) else m.group(0)

    for opt in ("choices", "target", "name"):
        value = getattr(args, opt)
        if not isinstance(value, str):
            continue
        whole = _NOTEBOOK_NAME.fullmatch(value.strip())
        if opt == "choices" and whole and known(whole):
            picked = ns[known(whole)]  # a list of choices, or "a|b"
            if not (isinstance(picked, str) or (isinstance(picked, (list, tuple)) and all(
                    isinstance(c, str) for c in picked))):
                raise UsageError(f"--choices {value}: the notebook's {known(whole)} is a "
                                 f"{type(picked).__name__}; give a list of strings or ' a| b'.")
            setattr(args, opt, picked)
        elif (opt == "choices" and value.isidentifier() and value in ns
              and not isinstance(ns[value], str)):  # `--choices answers` meant the list
            raise UsageError(f"--choices {value} is one answer, the text '{value}'. For the "
                             f"notebook's {value}, write --choices {{{value}}}.")
        else:
            setattr(args, opt, _NOTEBOOK_NAME.sub(fill, value))


def _row_columns(rows: Any) -> set[str]:
    if rows is None:
        return set()
    if hasattr(rows, "columns"):
        return {str(c) for c in rows.columns}
    if isinstance(rows, dict):
        return set(rows)
    if isinstance(rows, (list, tuple)):
        return {str(k) for r in rows if isinstance(r, dict) for k in r}
    return set()


_PASTA_OPTIONS = ("heads", "alpha", "steer_mode", "kernel", "auto_emphasis")
_SAMPLING = ("temperature", "top_p", "n")


def _check_ignored_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse options given where the cell's analysis would ignore them (a run without them
    looks like a run with them)."""
    given = {k for k, v in vars(args).items() if v != parser.get_default(k)}
    steer = args.steer
    rules = [  # (options, where, why they do not apply)
        (("layers",), not args.attention, "only with --attention (a vector's layers: "
                                           "--steer-layers)"),
        (("choices", "target", "max_new_tokens", "seed", "compare", "auto_emphasis", *_SAMPLING),
         args.attention, "not used by --attention (it reads the prompt, with no answer)"),
        (_SAMPLING, args.attribute, "not used by --attribute (it explains greedy answers)"),
        (("auto_emphasis",), args.attribute,
         "not used by --attribute (mark the key sentence with <<...>> instead of AutoPASTA)"),
        (("max_new_tokens",), args.target is not None or bool(args.choices),
         "only when the answers are generated (not with --target or --choices)"),
        (_PASTA_OPTIONS, steer == "vector",
         "steer attention: only with --steer pasta or --steer pasta+vector"),
        ((*_PASTA_OPTIONS, "strength", "steer_layers", "steer_start"), steer is None,
         "only with --steer"),
        (("vector", "strength", "steer_layers", "steer_start"), steer == "pasta",
         "a vector's options: only with --steer vector or --steer pasta+vector"),
    ]
    for options, applies, why in rules:
        clash = [f"--{o.replace('_', '-')}" for o in options if o in given]
        if applies and clash:
            raise UsageError(f"{', '.join(clash)}: {why}.")


def _check_sensitivity_options(args: argparse.Namespace) -> None:
    """--posix and --select run their own analysis: refuse the options they would ignore."""
    for flag, value, needs_choices in (("--posix", args.posix, False),
                                       ("--select", args.select, True)):
        if value is None:
            continue
        others = {"--attribute": args.attribute, "--attention": args.attention,
                  "--spread": args.spread, "--steer": args.steer, "--n": args.n != 1,
                  "--temperature": args.temperature != 0.0, "--top-p": args.top_p != 1.0,
                  "--posix": flag != "--posix" and args.posix is not None,
                  "--select": flag != "--select" and args.select is not None,
                  "--choices": not needs_choices and args.choices,
                  "--target": needs_choices and args.target is not None}
        clash = [name for name, used in others.items() if used]
        if clash:
            raise UsageError(f"{flag} runs its own analysis; drop {', '.join(clash)}.")
        if needs_choices and not (args.choices and args.vars):
            raise UsageError(f"{flag} needs --choices (the answers to rank, e.g. ' yes| no') "
                             "and --vars (the inputs whose answers it compares; no labels "
                             "needed).")


def _vector_options(args: argparse.Namespace, ns: dict[str, Any]) -> dict[str, Any]:
    """``steer=`` options for ``--steer vector`` / ``--steer pasta+vector``."""
    if not args.vector:
        raise UsageError(f"--steer {args.steer} needs --vector NAME (a SteeringVector variable "
                         "or a saved vector's name).")
    vector = ns.get(args.vector, args.vector)  # a notebook variable, else a saved name
    if not isinstance(vector, str) and type(vector).__name__ != "SteeringVector":
        raise UsageError(f"--vector {args.vector}: the notebook variable is a "
                         f"{type(vector).__name__}, not a SteeringVector (make one with "
                         "promptscope.contrastive_vector, in_context_vector or find_knob).")
    start = args.steer_start.strip()
    if start != "last" and not start.isdigit():
        raise UsageError(f"--steer-start {args.steer_start}: give a token position (0, 5) or "
                         "'last'.")
    return {"method": args.steer, "vector": vector, "strength": args.strength,
            "layers": args.steer_layers, "start": start if start == "last" else int(start)}


def _reach_parser() -> _Parser:
    p = _Parser(prog="%%reach", description=(
        "Controllability: search control prompts u (at most --k tokens, prepended) that make "
        "each target the most likely next token after each x0 in the cell body (one x0 per "
        "line; 'text||next' gives the true next token for --targets true)."))
    p.add_argument("--k", type=int, default=4, metavar="K", help="longest control prompt "
                   "(>= 1; default 4)")
    p.add_argument("--targets", default="top:10", help="true, top:N, random:N, bottom:N, "
                   "several joined by ',' (top:5,random:5), or token texts joined by '|' "
                   "(default top:10)")
    p.add_argument("--method", choices=["gcg", "greedy", "both"],
                   help="default: gcg on a local model, greedy on an API model")
    p.add_argument("--steps", type=int, default=32, help="GCG iterations per length")
    p.add_argument("--width", type=int, default=128, help="GCG candidates per step")
    p.add_argument("--top-k", type=int, default=64, help="GCG tokens per position")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="a loaded model's name, 'organism' or a model folder")
    p.add_argument("--no-bound", action="store_true", help="skip the singular-value bound")
    p.add_argument("--name", default="", help="session name")
    p.add_argument("-o", "--out", metavar="VAR", help="store the Result in this variable")
    p.add_argument("--no-save", action="store_true", help="do not save a session")
    return p


def _run_into(ns: dict[str, Any], out: str | None, fn: Callable[[], Any]) -> Any:
    """Run an analysis for a magic; ``-o VAR`` gets its result, or the partial result of an
    interrupted or failed run (the rows computed so far)."""
    try:
        result = _friendly(fn)
    except BaseException as exc:  # an interrupt, our error, or any other failure mid-run
        partial = getattr(exc, "partial_result", None)
        if partial is not None and out:
            ns[out] = partial
        raise
    if out:
        ns[out] = result
    return result


def _friendly(fn: Callable[[], Any]) -> Any:
    """Run ``fn``; a PromptscopeError becomes a UsageError that keeps any partial result."""
    try:
        return fn()
    except PromptscopeError as exc:
        err = UsageError(describe(exc))
        err.partial_result = getattr(exc, "partial_result", None)  # type: ignore[attr-defined]
        raise err from None


def register(ipython: Any) -> None:
    """Register the magics with an IPython shell."""
    PromptscopeMagics.prompt.__doc__ = _prompt_parser().format_help()
    PromptscopeMagics.promptscope.__doc__ = _usage()
    PromptscopeMagics.reach.__doc__ = _reach_parser().format_help()
    ipython.register_magics(PromptscopeMagics)
