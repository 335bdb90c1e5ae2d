"""A grammar of meaning-preserving prompt formats for few-shot classification (FormatSpread).

Following Sclar et al. (2023), "Quantifying Language Models' Sensitivity to Spurious Features in
Prompt Design": a prompt is a sequence of examples, each a sequence of fields ``descriptor +
separator + value``; what may change without changing the task is the descriptors' casing, the
descriptor-to-value separator, the space between fields and between examples, how examples are
enumerated, and (optionally) the answer descriptor's wording. The data and the label set never
change. A :class:`PromptFormat` is one choice of all of these: a frozen, hashable value whose
``str()`` is the exact text it produces (with ``{field}`` placeholders).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from promptscope.errors import PromptscopeError

#: Grammar features, in the order they appear in a format.
FEATURES = ("casing", "separator", "field_joiner", "example_joiner", "enumeration", "answer_name")

_ROMAN = ("I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII", "XIII",
          "XIV", "XV", "XVI", "XVII", "XVIII", "XIX", "XX")


def _casing(text: str, casing: str) -> str:
    if casing == "title":
        return text.title()
    if casing == "lower":
        return text.lower()
    if casing == "upper":
        return text.upper()
    if casing == "asis":
        return text
    raise PromptscopeError(f"Unknown casing {casing!r}: use title, lower, upper or asis.")


def _enumerate(pattern: str, i: int) -> str:
    """``pattern`` with ``{i}`` (1, 2...), ``{a}`` (a, b...), ``{A}`` or ``{I}`` (roman)."""
    if not pattern:
        return ""
    letter = "abcdefghijklmnopqrstuvwxyz"[(i - 1) % 26]
    roman = _ROMAN[(i - 1) % len(_ROMAN)]
    return pattern.format(i=i, a=letter, A=letter.upper(), I=roman)


@dataclass(frozen=True)
class PromptFormat:
    """One surface format: how every example of a few-shot prompt is written.

    An example renders as ``enumeration + field_joiner.join(fields + [answer])`` where each field
    is ``Descriptor + separator + value``; examples are joined by ``example_joiner``. The query
    example stops after the answer descriptor; the separator's trailing whitespace then goes to
    the scored continuation (``"Answer:"`` + ``" yes"``), so every label is scored as the same
    tokens whatever the format (the lm-evaluation-harness convention).

    Attributes:
        casing: descriptor casing: ``"title"``, ``"lower"``, ``"upper"`` or ``"asis"``.
        separator: between a descriptor and its value, e.g. ``": "`` or ``" - "``.
        field_joiner: between the fields of one example, e.g. ``"\\n"`` or ``", "``.
        example_joiner: between examples, e.g. ``"\\n\\n"``.
        enumeration: a prefix per example with ``{i}`` (1, 2...), ``{a}``/``{A}`` (letters) or
            ``{I}`` (roman numerals), or ``""``.
        answer_name: the descriptor of the label field.

    Example:
        >>> fmt = PromptFormat(casing="upper", separator=" - ")
        >>> print(fmt.pattern(["review"]))
        REVIEW - {review}
        ANSWER - {label}
        <BLANKLINE>
        REVIEW - {review}
        ANSWER -
    """

    casing: str = "title"
    separator: str = ": "
    field_joiner: str = "\n"
    example_joiner: str = "\n\n"
    enumeration: str = ""
    answer_name: str = "answer"

    def features(self) -> dict[str, str]:
        """The format's grammar choices, feature -> value."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def key(self) -> str:
        """A short, unique, one-line name (used as the format's id in tables)."""
        return " ".join(f"{k}={v!r}" for k, v in self.features().items())

    def descriptor(self, name: str) -> str:
        """A field or answer name written in this format's casing."""
        return _casing(name, self.casing)

    def example(self, values: Mapping[str, Any], inputs: Sequence[str], index: int,
                label: Any = None) -> str:
        """One example (``index`` counts from 1); without ``label`` it ends with the answer
        descriptor and the separator stripped of trailing whitespace."""
        parts = [f"{self.descriptor(f)}{self.separator}{values[f]}" for f in inputs]
        answer = f"{self.descriptor(self.answer_name)}{self.separator}"
        parts.append(answer + str(label) if label is not None else answer.rstrip())
        return _enumerate(self.enumeration, index) + self.field_joiner.join(parts)

    def render(self, demos: Sequence[Mapping[str, Any]], query: Mapping[str, Any],
               inputs: Sequence[str], label: str = "label", instruction: str = "") -> str:
        """The few-shot prompt: labelled ``demos`` then ``query`` waiting for its label."""
        shots = [self.example(d, inputs, i + 1, d[label]) for i, d in enumerate(demos)]
        shots.append(self.example(query, inputs, len(shots) + 1))
        text = self.example_joiner.join(shots)
        return f"{instruction}{self.example_joiner}{text}" if instruction else text

    def delimiter(self) -> str:
        """What precedes each label in the scored continuation (the separator's trailing
        whitespace): ``" "`` for ``": "``, ``""`` for ``":"``."""
        return self.separator[len(self.separator.rstrip()):]

    def pattern(self, inputs: Sequence[str], shots: int = 1, label: str = "label") -> str:
        """The exact text this format produces, with ``{field}`` placeholders."""
        demo = {f: "{" + f + "}" for f in inputs} | {label: "{" + label + "}"}
        return self.render([demo] * shots, demo, inputs, label)

    def __str__(self) -> str:
        return self.pattern(["input"])

    @classmethod
    def from_organism(cls, fmt: Any) -> PromptFormat:
        """The same format as the organism's training-time ``classify.Format``.

        The organism writes ``Name{separator} value``; here the separator carries the space.
        """
        return cls(casing=fmt.casing, separator=fmt.separator + " ",
                   field_joiner=fmt.field_joiner, example_joiner=fmt.example_joiner,
                   enumeration=fmt.enumeration, answer_name=fmt.answer_name)


@dataclass(frozen=True)
class FormatGrammar:
    """The options of each feature; formats are drawn from their product.

    The defaults follow the paper's grammar (casings, separators, field spaces, item
    enumerations); ``answer_names`` keeps the single descriptor ``"answer"`` unless you give
    synonyms. :meth:`organism` is the space the bundled model organism's formats come from.

    Example:
        >>> g = FormatGrammar(separators=(": ", " - "))
        >>> len(g.sample(3, seed=1)), g.size > 3
        (3, True)
    """

    casings: tuple[str, ...] = ("title", "lower", "upper", "asis")
    separators: tuple[str, ...] = (": ", ":: ", " : ", " - ", " -> ", " = ", " | ", ":\n",
                                   "\t", " ~ ")
    field_joiners: tuple[str, ...] = ("\n", ", ", " | ", "; ", " ", "\t", " || ", "\n\t")
    example_joiners: tuple[str, ...] = ("\n\n", "\n", "\n\n\n", " || ", "\n--\n", "\n###\n")
    enumerations: tuple[str, ...] = ("", "{i}. ", "({i}) ", "[{i}] ", "{A}) ", "{I}. ",
                                     "Example {i}:\n")
    answer_names: tuple[str, ...] = ("answer",)

    def __post_init__(self) -> None:
        for name in ("casings", "separators", "field_joiners", "example_joiners",
                     "enumerations", "answer_names"):
            opts = tuple(getattr(self, name))
            object.__setattr__(self, name, opts)
            if not opts:
                raise PromptscopeError(f"FormatGrammar.{name} needs at least one option.")
        for c in self.casings:
            _casing("x", c)
        for sep in self.separators:
            if not sep:
                raise PromptscopeError("A separator cannot be empty (the descriptor would run "
                                       "into the value); use e.g. ' ' or ': '.")
        for e in self.enumerations:
            try:
                _enumerate(e, 1)
            except (KeyError, IndexError, ValueError):
                raise PromptscopeError(f"Enumeration {e!r}: use {{i}}, {{a}}, {{A}} or {{I}} "
                                       "as the number.") from None

    def _options(self) -> list[tuple[str, ...]]:
        return [self.casings, self.separators, self.field_joiners, self.example_joiners,
                self.enumerations, self.answer_names]

    @property
    def size(self) -> int:
        """How many distinct formats the grammar can produce."""
        return math.prod(len(o) for o in self._options())

    def __iter__(self) -> Iterator[PromptFormat]:
        for combo in itertools.product(*self._options()):
            yield PromptFormat(*combo)

    def format_at(self, index: int) -> PromptFormat:
        """The ``index``-th format of the product (mixed radix), without listing the space."""
        combo = []
        for opts in reversed(self._options()):
            index, r = divmod(index, len(opts))
            combo.append(opts[r])
        return PromptFormat(*reversed(combo))

    def sample(self, n: int, seed: int = 0, include: Sequence[PromptFormat] = (),
               inputs: Sequence[str] = ("input",), shots: int = 1) -> list[PromptFormat]:
        """``n`` distinct formats: ``include`` first, then uniform draws without replacement
        (the same ``seed`` gives the same formats). Distinct as text for these ``inputs`` and
        ``shots``: casing ``asis`` writes lower-case field names as ``lower`` does, and
        without demonstrations the example joiner is never written."""
        if n < 1:
            raise PromptscopeError("Sample at least one format.")
        out: list[PromptFormat] = []
        seen: set[str] = set()
        for fmt in include:
            if len(out) < n and _add(fmt, inputs, seen, shots):
                out.append(fmt)
        rng = random.Random(seed)
        # rng.sample over a range never materialises the product space; formats that write
        # the same text as one drawn before are skipped, and more are drawn after them.
        first = rng.sample(range(self.size), min(self.size, n + len(out)))
        tried = set(first)
        more = (i for i in _shuffled(self.size, rng) if i not in tried)
        for idx in itertools.chain(first, more):
            if len(out) >= n:
                break
            fmt = self.format_at(idx)
            if _add(fmt, inputs, seen, shots):
                out.append(fmt)
        return out

    def neighbours(self, fmt: PromptFormat, feature: str | None = None,
                   inputs: Sequence[str] = ("input",)) -> list[PromptFormat]:
        """Formats one atomic change away from ``fmt`` (in ``feature``, or in any feature)
        whose text for ``inputs`` differs from ``fmt``'s (and from each other's)."""
        opts = dict(zip(FEATURES, self._options()))
        chosen = [feature] if feature else list(FEATURES)
        bad = [f for f in chosen if f not in opts]
        if bad:
            raise PromptscopeError(f"Unknown format feature {bad[0]!r}; features: {FEATURES}.")
        seen = {fmt.pattern(inputs)}
        return [other for f in chosen for v in opts[f] if v != getattr(fmt, f)
                if _add(other := replace(fmt, **{f: v}), inputs, seen)]

    @classmethod
    def organism(cls) -> FormatGrammar:
        """The option space of the organism's ``classify.plausible_formats``."""
        from promptscope.organism import classify

        return cls(casings=classify._CASINGS,
                   separators=tuple(s + " " for s in classify._SEPARATORS),
                   field_joiners=classify._FIELD_JOINERS,
                   example_joiners=classify._EXAMPLE_JOINERS,
                   enumerations=classify._ENUMERATIONS, answer_names=classify._ANSWER_NAMES)


def _add(fmt: PromptFormat, inputs: Sequence[str], seen: set[str], shots: int = 1) -> bool:
    """Whether ``fmt``'s text for ``inputs`` and ``shots`` is new (then noted in ``seen``)."""
    text = fmt.pattern(inputs, shots=shots)
    if text in seen:
        return False
    seen.add(text)
    return True


def _shuffled(n: int, rng: random.Random) -> Iterator[int]:
    """``range(n)`` in a seeded random order, drawn lazily (a Fisher-Yates walk kept in a dict
    of the swapped positions only)."""
    swapped: dict[int, int] = {}
    for i in range(n):
        j = rng.randrange(i, n)
        yield swapped.get(j, j)
        swapped[j] = swapped.get(i, i)


def sample_formats(n: int = 24, seed: int = 0, grammar: FormatGrammar | None = None,
                   include: Sequence[PromptFormat] = (),
                   inputs: Sequence[str] = ("input",)) -> list[PromptFormat]:
    """``n`` distinct plausible formats from ``grammar`` (default: the paper-style grammar),
    distinct as text for the task's ``inputs``.

    Example:
        >>> fmts = sample_formats(8, seed=0)
        >>> fmts == sample_formats(8, seed=0) and len(set(fmts)) == 8
        True
    """
    return (grammar or FormatGrammar()).sample(n, seed=seed, include=include, inputs=inputs)


def format_from_features(features: Mapping[str, str]) -> PromptFormat:
    """Rebuild a format from a saved table row (its feature columns)."""
    return PromptFormat(**{f: features[f] for f in FEATURES})
