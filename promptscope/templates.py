"""Prompt templates: variables, inline alternatives and emphasis marks.

Syntax of a ``%%prompt`` cell body (also :func:`parse_template`)::

    {city}                a variable, filled from ``vars`` rows or the notebook namespace
    {{Europe|Asia}}       alternatives: one variant per option (labelled ``alt1``, ``alt2``, ...)
    {{region=Europe|Asia}} named alternatives: the label column is ``region``
    {{|please }}          an option may be empty
    <<some text>>         emphasis: stripped from the prompt, recorded as a character span
                          (attention steering uses it); may contain variables and alternatives
    \\{  \\}  \\<  \\>  \\|  \\=  \\\\   a literal character

A single ``{`` that does not start ``{name}`` is literal text, so ``{"a": 1}`` needs no escape;
``{{``, ``}}``, ``<<`` and ``>>`` always have their meaning; ``\\{{``, ``\\}}``, ``\\<<`` and
``\\>>`` are the literal pairs.

The run is the cartesian product of the variable rows and every alternatives group. Expansion is
lazy, so a template with 10^5 variants does not sit in memory.

Example:
    >>> t = parse_template("Is {city} in {{Europe|Asia}}?")
    >>> [v.text for v in t.expand([{"city": "Paris"}, {"city": "Oslo"}])]
    ['Is Paris in Europe?', 'Is Paris in Asia?', 'Is Oslo in Europe?', 'Is Oslo in Asia?']
"""

from __future__ import annotations

import difflib
import itertools
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from promptscope.errors import TemplateError

# Names are Python identifiers ({città} too): a notebook variable can fill them.
IDENT = re.compile(r"\{\s*([^\W\d]\w*)\s*\}")
_GROUP_NAME = re.compile(r"([^\W\d]\w*)=")
_ESCAPABLE = set("{}<>|=\\")


@dataclass(frozen=True)
class Text:
    """Literal text."""

    text: str


@dataclass(frozen=True)
class Var:
    """A ``{name}`` variable."""

    name: str


@dataclass(frozen=True)
class Alt:
    """A ``{{a|b}}`` alternatives group; each option is a sequence of Text/Var parts."""

    name: str
    options: tuple[tuple[Union[Text, Var], ...], ...]


@dataclass(frozen=True)
class Emphasis:
    """A ``<<...>>`` emphasised region."""

    parts: tuple[Union[Text, Var, Alt], ...]


Part = Union[Text, Var, Alt, Emphasis]


@dataclass(frozen=True)
class Span:
    """Where a template part landed in a rendered prompt (``text[start:end]``).

    ``kind`` is ``"text"``, ``"var"``, ``"alt"`` or ``"emph"``; ``name`` is the variable or group
    name (``""`` for text and emphasis).
    """

    kind: str
    name: str
    start: int
    end: int


@dataclass(frozen=True)
class Variant:
    """One expanded prompt.

    ``labels`` says what this variant chose: ``row`` (when rows were given), each variable's
    value and each alternatives group's option. ``spans`` locate every part in ``text``;
    ``emphasis`` lists the emphasised character ranges.
    """

    index: int
    text: str
    labels: dict[str, Any]
    spans: tuple[Span, ...] = field(default=())

    @property
    def emphasis(self) -> list[tuple[int, int]]:
        """Character ranges marked with ``<<...>>``."""
        return [(s.start, s.end) for s in self.spans if s.kind == "emph"]

    def emphasis_in(self, text: str) -> list[tuple[int, int]]:
        """The emphasised character ranges, placed inside ``text`` (itself, or it wrapped in a
        chat template; see :func:`place_spans`)."""
        return place_spans(self.emphasis, self.text, text)


def place_spans(spans: Iterable[tuple[int, int]], message: str, text: str
                ) -> list[tuple[int, int]]:
    """Character ranges of ``message`` placed inside ``text`` (:func:`locate_message`); what a
    chat template trimmed away is dropped from them."""
    offset, start, end = locate_message(message, text)
    placed = [(max(a + offset, start), min(b + offset, end)) for a, b in spans]
    return [(a, b) for a, b in placed if b > a]


def locate_message(message: str, text: str) -> tuple[int, int, int]:
    """Where ``message`` stands inside ``text``, the prompt a chat template made of it:
    ``(offset, start, end)`` with ``message[i] == text[i + offset]`` wherever ``i + offset`` is
    in ``[start, end)``.

    Chat templates that trim the message (Llama 3's ``| trim``) keep only its inner text; the
    offset is then where the untrimmed message would start, and ``[start, end)`` covers what is
    left of it.

    >>> locate_message(" hi ", "<user>hi</user>")
    (5, 6, 8)
    """
    if text == message:
        return 0, 0, len(text)
    at = text.rfind(message)  # the last: the message comes after any system prompt
    if at >= 0:
        return at, at, at + len(message)
    core = message.strip()
    at = text.find(core) if core else -1
    if at < 0:
        raise TemplateError("Cannot find the prompt inside its chat-templated text to place the "
                            "emphasis; the chat template changes the message. Drop --chat.")
    if text.find(core, at + 1) >= 0:  # a short prompt, say "a", also inside "assistant"
        raise TemplateError(f"The chat template trims the prompt, and {core!r} occurs more "
                            "than once in the chat text, so its place is ambiguous; make it "
                            "longer, or drop the spaces around it, or drop --chat.")
    lead = len(message) - len(message.lstrip())
    return at - lead, at, at + len(core)


@dataclass(frozen=True)
class Template:
    """A parsed template. Build it with :func:`parse_template`."""

    source: str
    parts: tuple[Part, ...]

    @property
    def variables(self) -> list[str]:
        """Variable names in order of first appearance."""
        seen: dict[str, None] = {}
        for part in _walk(self.parts):
            if isinstance(part, Var):
                seen.setdefault(part.name, None)
        return list(seen)

    @property
    def groups(self) -> list[Alt]:
        """Alternatives groups in order of appearance."""
        return [p for p in _walk(self.parts) if isinstance(p, Alt)]

    def require_one_prompt(self, what: str) -> None:
        """Refuse ``{{a|b}}`` where ``what`` takes one prompt per row (it would silently use
        the first option)."""
        if self.groups:
            names = ", ".join(g.name for g in self.groups)
            raise TemplateError(f"{what} takes one prompt per row; this template has "
                                f"alternatives ({names}). Pick one option, or run once per "
                                "option.")

    @property
    def has_emphasis(self) -> bool:
        return any(isinstance(p, Emphasis) for p in self.parts)

    def combinations(self) -> list[tuple[dict[str, str], str]]:
        """One ``(choice, text)`` per combination of the ``{{a|b}}`` groups, in :meth:`expand`'s
        order (its inner loop): ``choice`` maps each group to its option as written, and ``text``
        is the whole template with that choice, variables left as ``{name}`` and emphasis marks
        dropped. A template without groups has one combination.

        Example:
            >>> parse_template("{{Q|Question}}: {x}?").combinations()
            [({'alt1': 'Q'}, 'Q: {x}?'), ({'alt1': 'Question'}, 'Question: {x}?')]
        """
        placeholders = {v: f"{{{v}}}" for v in self.variables}
        groups = self.groups
        out = []
        for choice in itertools.product(*(range(len(g.options)) for g in groups)):
            picks = {g.name: i for g, i in zip(groups, choice)}
            chosen = {g.name: _render(g.options[picks[g.name]], placeholders, picks)[0]
                      for g in groups}
            out.append((chosen, _render(self.parts, placeholders, picks)[0]))
        return out

    def n_variants(self, n_rows: int = 1) -> int:
        """How many variants :meth:`expand` yields for ``n_rows`` variable rows."""
        return n_rows * math.prod(len(g.options) for g in self.groups)

    def expand(
        self,
        rows: Any = None,
        namespace: Mapping[str, Any] | None = None,
        carry: Iterable[str] | None = None,
    ) -> Iterator[Variant]:
        """Yield every variant lazily: rows (outer) x alternatives (inner, in template order).

        Args:
            rows: ``None`` (one row), a dict (one row), a list of dicts or a DataFrame (one run
                per row). Row values take precedence over ``namespace``.
            namespace: fallback values for variables (the notebook namespace in ``%%prompt``).
            carry: also copy these other row columns into the labels (scalar values only), so
                gold answers and metadata travel with each variant.
        """
        namespace = namespace or {}
        row_iter, labelled = _iter_rows(rows)
        groups = self.groups
        index = 0
        for row_label, row in row_iter:
            values = {}
            for name in self.variables:
                if name in row:
                    values[name] = row[name]
                elif name in namespace:
                    values[name] = namespace[name]
                else:
                    raise TemplateError(_missing_message(name, row, labelled, row_label))
            for choice in itertools.product(*(range(len(g.options)) for g in groups)):
                picks = {g.name: i for g, i in zip(groups, choice)}
                text, spans = _render(self.parts, values, picks)
                labels: dict[str, Any] = {"row": row_label} if labelled else {}
                labels.update({k: _label_value(v) for k, v in values.items()})
                for g in groups:
                    labels[g.name] = _render(g.options[picks[g.name]], values, picks)[0]
                for k in carry or ():  # (by name: a DataFrame's column 0 is carried as "0")
                    key = k if k in row else next((c for c in row if str(c) == k), k)
                    if key in row and k not in labels and _is_scalar(row[key]):
                        labels[k] = _label_value(row[key])
                yield Variant(index=index, text=text, labels=labels, spans=tuple(spans))
                index += 1


def chunks(variants: Iterable[Variant], size: int, *, steered: bool = False
           ) -> Iterator[list[Variant]]:
    """The variants in lists of at most ``size``, in order. ``steered``: attention steering
    looks emphasis up by prompt text, so two variants with the same text and other
    ``<<...>>`` marks never share a list (a list ends before the second)."""
    it = iter(variants)
    while chunk := list(itertools.islice(it, size)):
        if not steered:
            yield chunk
            continue
        marks: dict[str, tuple[Any, ...]] = {}
        start = 0
        for i, v in enumerate(chunk):  # cut where a text would come back with other marks
            if marks.setdefault(v.text, tuple(v.emphasis)) != tuple(v.emphasis):
                yield chunk[start:i]
                start, marks = i, {v.text: tuple(v.emphasis)}
        yield chunk[start:]


def emphasis_groups(prompts: list[tuple[str, tuple[Any, ...]]]) -> list[list[int]]:
    """Indices of ``prompts`` (text, emphasised spans) in groups, in order, where no text has
    two different sets of spans."""
    groups: list[tuple[dict[str, Any], list[int]]] = []
    for i, (text, spans) in enumerate(prompts):
        group = next((g for g in groups if g[0].get(text, spans) == spans), None)
        if group is None:
            group = ({}, [])
            groups.append(group)
        group[0][text] = spans
        group[1].append(i)
    return [rows for _, rows in groups]


def spans_by_text(variants: Iterable[Variant]) -> dict[str, list[tuple[int, int]]]:
    """Prompt text -> its ``<<...>>`` spans, for steering a whole task at once; two variants
    with the same text and other marks are refused (steering finds marks by text)."""
    marks: dict[str, list[tuple[int, int]]] = {}  # every text, unmarked ones too
    first: dict[str, int] = {}
    for v in variants:
        if marks.setdefault(v.text, v.emphasis) != v.emphasis:
            raise TemplateError(
                f"Variants {first[v.text]} and {v.index} make the same prompt with other "
                f"<<...>> marks; steering finds the marks by prompt text, so it cannot steer "
                f"both here. Drop one of those rows.")
        first.setdefault(v.text, v.index)
    return {text: spans for text, spans in marks.items() if spans}


def check_rows(template: Template, rows: Any, namespace: Mapping[str, Any] | None = None) -> None:
    """Raise the :class:`TemplateError` that :meth:`Template.expand` would raise on rows of the
    wrong type or a row that lacks a variable, before any work starts; also refuse rows that
    would run nothing (none at all) or run something unintended (a dict of lists, which would
    put each whole list into one prompt, or the text "nan" for a missing value)."""
    namespace = namespace or {}
    if rows is None or isinstance(rows, Mapping):
        rows_list: list[Mapping[str, Any]] = [rows or {}]
        lists = sorted(k for k in template.variables if _is_many((rows or {}).get(k)))
        if lists:
            raise TemplateError(
                f"vars['{lists[0]}'] holds several values, which would go whole into one "
                "prompt. For one run per value pass a DataFrame (pd.DataFrame(vars)) or a list "
                "of dicts.")
    elif hasattr(rows, "columns") and hasattr(rows, "iterrows"):
        rows_list = [dict.fromkeys(rows.columns)]  # every row has every column
        if len(rows) == 0:
            raise TemplateError("vars is an empty DataFrame: there is nothing to run.")
        used = [i for i, c in enumerate(rows.columns) if c in template.variables]
        missing = rows.iloc[:, used].isna().to_numpy() if used else None
        if missing is not None and missing.any():  # by position: the index may repeat
            pos = int(missing.any(axis=1).argmax())
            cols = [str(rows.columns[used[j]]) for j in missing[pos].nonzero()[0]]
            raise TemplateError(f"vars row {_label_value(rows.index[pos])!r} has no value for "
                                f"{cols} (NaN); fill it (df.fillna(...)) or drop the row "
                                "(df.dropna()).")
    elif isinstance(rows, (list, tuple)):
        rows_list = rows
        if not rows_list:
            raise TemplateError("vars is an empty list: there is nothing to run.")
    else:  # a Series, a generator, a string...
        hint = (" (a Series: pass series.to_frame(), or a dict)" if hasattr(rows, "index")
                else "; pass list(...) of an iterator" if isinstance(rows, Iterable)
                and not isinstance(rows, (str, bytes)) else "")
        raise TemplateError(f"vars must be a dict, a list of dicts or a DataFrame, not "
                            f"{type(rows).__name__}{hint}.")
    labelled = not (rows is None or isinstance(rows, Mapping))
    for i, row in enumerate(rows_list):
        if not isinstance(row, Mapping):
            raise TemplateError(f"vars row {i} is a {type(row).__name__}, not a dict; pass a "
                                "list of dicts (one per run) or a DataFrame.")
        for name in template.variables:
            if name not in row and name not in namespace:
                raise TemplateError(_missing_message(name, row, labelled, i))


def parse_template(source: str) -> Template:
    """Parse a template; raise :class:`TemplateError` with line/column on bad syntax.

    Example:
        >>> parse_template("Say {{hi|hello}} to <<{name}>>").variables
        ['name']
    """
    if not isinstance(source, str):
        several = ""
        if isinstance(source, (list, tuple)):
            several = (" For several prompts, write one template with {{a|b}} alternatives, or "
                       "'{prompt}' with vars=[{'prompt': ...}, ...].")
        raise TemplateError(f"A template is a string (the prompt, with {{variables}} and "
                            f"{{{{a|b}}}} alternatives); got {type(source).__name__}.{several}")
    if not source.strip():
        raise TemplateError("The template is empty: write the prompt (in a notebook, on the "
                            "lines below %%prompt).")
    parser = _Parser(source)
    parts = parser.parse_sequence(stop=())
    template = Template(source=source, parts=tuple(parts))
    clash = set(template.variables) & {g.name for g in template.groups}
    if clash:
        name = sorted(clash)[0]
        raise TemplateError(
            f"'{name}' is both a variable and an alternatives group name; rename the group "
            f"({{{{other={name}...}}}})."
        )
    if "row" in template.variables or "row" in {g.name for g in template.groups}:
        raise TemplateError("'row' is reserved for the row label; use another variable name.")
    return template


class _Parser:
    """Recursive-descent scanner over the template source."""

    def __init__(self, source: str) -> None:
        self.src = source
        self.i = 0
        self.n_groups = 0
        self.group_names: set[str] = set()

    def where(self, pos: int) -> str:
        line = self.src.count("\n", 0, pos) + 1
        col = pos - (self.src.rfind("\n", 0, pos) + 1) + 1
        return f"line {line}, column {col}"

    def parse_sequence(self, stop: tuple[str, ...], in_group: bool = False,
                       in_emph: bool = False) -> list[Part]:
        parts: list[Part] = []
        buf: list[str] = []

        def flush() -> None:
            if buf:
                parts.append(Text("".join(buf)))
                buf.clear()

        src = self.src
        while self.i < len(src):
            if any(src.startswith(s, self.i) for s in stop):
                flush()
                return parts
            c = src[self.i]
            if c == "\\" and src[self.i + 1:self.i + 3] in ("{{", "}}", "<<", ">>"):
                buf.append(src[self.i + 1:self.i + 3])  # \{{ is a literal {{
                self.i += 3
            elif c == "\\" and self.i + 1 < len(src) and src[self.i + 1] in _ESCAPABLE:
                buf.append(src[self.i + 1])
                self.i += 2
            elif src.startswith("{{", self.i):
                if in_group:
                    raise TemplateError(
                        f"Nested '{{{{' at {self.where(self.i)}: alternatives cannot contain "
                        "alternatives. Split them into two groups side by side."
                    )
                flush()
                parts.append(self.parse_group())
            elif src.startswith("}}", self.i):
                raise TemplateError(
                    f"'}}}}' at {self.where(self.i)} closes no '{{{{'. Alternatives look like "
                    "{{a|b}}; write \\}} for a literal brace."
                )
            elif src.startswith("<<", self.i):
                if in_group:
                    raise TemplateError(
                        f"'<<' at {self.where(self.i)} is inside alternatives; put the emphasis "
                        "around the whole group instead: <<{{a|b}}>>."
                    )
                if in_emph:
                    raise TemplateError(f"Nested '<<' at {self.where(self.i)}: close the "
                                        "first emphasis with '>>' before opening another.")
                flush()
                parts.append(self.parse_emphasis())
            elif src.startswith(">>", self.i):
                raise TemplateError(
                    f"'>>' at {self.where(self.i)} closes no '<<'. Emphasis looks like "
                    "<<text>>; write \\>> for a literal '>>'."
                )
            elif c == "{" and (m := IDENT.match(src, self.i)):
                flush()
                parts.append(Var(m.group(1)))
                self.i = m.end()
            else:
                buf.append(c)
                self.i += 1
        flush()
        return parts

    def parse_group(self) -> Alt:
        start = self.i
        self.i += 2
        self.n_groups += 1
        name = f"alt{self.n_groups}"
        if m := _GROUP_NAME.match(self.src, self.i):
            name = m.group(1)
            self.i = m.end()
        if name in self.group_names:
            raise TemplateError(f"Two alternatives groups are named '{name}' "
                                f"(second at {self.where(start)}); give each a unique name.")
        self.group_names.add(name)
        options: list[tuple[Union[Text, Var], ...]] = []
        while True:
            opt = self.parse_sequence(stop=("|", "}}"), in_group=True)
            options.append(tuple(opt))  # type: ignore[arg-type]
            if self.i >= len(self.src):
                raise TemplateError(
                    f"'{{{{' at {self.where(start)} is never closed: alternatives look like "
                    "{{a|b}}. Add the closing '}}' (or write \\{{ for literal braces)."
                )
            if self.src.startswith("}}", self.i):
                self.i += 2
                break
            self.i += 1  # the '|'
        if len(options) == 1 and not options[0]:
            raise TemplateError(f"Empty alternatives '{{{{}}}}' at {self.where(start)}: "
                                "list options like {{a|b}}.")
        if len(options) == 1:  # {{name}}: Jinja/Mustache habit, not a choice between options
            raise TemplateError(
                f"'{self.src[start:self.i]}' at {self.where(start)} has one option. Write "
                "{name} for a variable, {{a|b}} for alternatives, or \\{{...\\}} for "
                "literal braces.")
        return Alt(name=name, options=tuple(options))

    def parse_emphasis(self) -> Emphasis:
        start = self.i
        self.i += 2
        inner = self.parse_sequence(stop=(">>",), in_emph=True)
        if self.i >= len(self.src):
            raise TemplateError(
                f"'<<' at {self.where(start)} is never closed: emphasis looks like <<text>>. "
                "Add '>>' (or write \\<< for a literal '<<')."
            )
        self.i += 2
        return Emphasis(parts=tuple(inner))


def _walk(parts: Iterable[Any]) -> Iterator[Any]:
    for p in parts:
        yield p
        if isinstance(p, Alt):
            for opt in p.options:
                yield from _walk(opt)
        elif isinstance(p, Emphasis):
            yield from _walk(p.parts)


def _render(parts: Iterable[Any], values: Mapping[str, Any], picks: Mapping[str, int],
            offset: int = 0) -> tuple[str, list[Span]]:
    out: list[str] = []
    spans: list[Span] = []
    pos = offset
    for p in parts:
        if isinstance(p, Text):
            piece, inner = p.text, [Span("text", "", pos, pos + len(p.text))]
        elif isinstance(p, Var):
            piece = str(values[p.name])
            inner = [Span("var", p.name, pos, pos + len(piece))]
        elif isinstance(p, Alt):
            piece, inner = _render(p.options[picks[p.name]], values, picks, pos)
            inner = [Span("alt", p.name, pos, pos + len(piece))] + inner
        else:  # Emphasis
            piece, inner = _render(p.parts, values, picks, pos)
            inner = [Span("emph", "", pos, pos + len(piece))] + inner
        out.append(piece)
        spans.extend(inner)
        pos += len(piece)
    return "".join(out), spans


def _iter_rows(rows: Any) -> tuple[Iterator[tuple[Any, Mapping[str, Any]]], bool]:
    """Normalise ``rows`` to (label, mapping) pairs; the flag says whether rows were given."""
    if rows is None:
        return iter([(0, {})]), False
    if isinstance(rows, Mapping):
        return iter([(0, rows)]), False
    if hasattr(rows, "iterrows") and hasattr(rows, "columns"):  # a pandas DataFrame
        # records keep each column's type (iterrows makes one Series per row: 3 -> 3.0)
        return ((_label_value(i), r) for i, r in zip(rows.index, rows.to_dict("records"))), True
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Iterable):
        raise TemplateError(
            f"vars must be a dict, a list of dicts or a DataFrame, not {type(rows).__name__}."
        )

    def gen() -> Iterator[tuple[Any, Mapping[str, Any]]]:
        for i, r in enumerate(rows):
            if not isinstance(r, Mapping):
                raise TemplateError(
                    f"vars row {i} is a {type(r).__name__}, not a dict; pass a list of dicts "
                    "(one per run) or a DataFrame."
                )
            yield i, r

    return gen(), True


def count_rows(rows: Any) -> int:
    """Number of variable rows ``rows`` stands for (1 for None or a dict)."""
    if rows is None or isinstance(rows, Mapping):
        return 1
    return len(rows)


def _is_many(v: Any) -> bool:
    """A list, tuple, Series or array: several values, not one."""
    return isinstance(v, (list, tuple)) or getattr(v, "ndim", 0) > 0


def _is_scalar(v: Any) -> bool:
    return not isinstance(v, (list, tuple, dict, set)) and getattr(v, "ndim", 0) == 0


def _label_value(v: Any) -> Any:
    """Keep labels JSON-friendly: numpy scalars become Python scalars, others stay or str()."""
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if hasattr(v, "item"):
        try:
            return v.item()
        except (ValueError, TypeError):
            pass
    return str(v)


def _missing_message(name: str, row: Mapping[str, Any], labelled: bool, label: Any) -> str:
    have = ", ".join(sorted(map(str, row))) or "none"
    where = f" (row {label!r} has the columns {have})" if labelled else ""
    close = difflib.get_close_matches(name, [str(k) for k in row], n=1)
    hint = f"Did you mean {{{close[0]}}}? Else define" if close else "Define"
    return (
        f"Template variable {{{name}}} has no value{where}. {hint} `{name}` in the notebook, "
        f"or pass rows with a '{name}' column via --vars / vars=."
    )
