"""A small few-shot classification task and the prompt formats it can be rendered in.

Each example has two input fields, an ``item`` (an object word) and a ``color``; the label is
``"yes"`` when the item's hidden class bit equals the colour's (a fixed XOR-style rule, balanced
50/50), else ``"no"``. The model learns the rule from few-shot prompts rendered in only the
``TRAIN_FORMATS``; :func:`plausible_formats` yields other meaning-preserving formats (descriptor
casing, separators, field and example joiners, enumeration) that it never saw, which is what a
FormatSpread analysis measures. Choices are scored by the log-probability of the label words
``" yes"`` / ``" no"`` (single tokens) after the final answer descriptor.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pandas as pd

from promptscope.organism.world import COLORS, WORLD_SEED, Doc

ITEMS: tuple[str, ...] = ("apple", "stone", "river", "chair", "cloud", "horse", "lamp", "bread",
                          "shoe", "tree", "coin", "boat")
LABELS: tuple[str, str] = ("yes", "no")
FIELDS: tuple[str, str] = ("item", "color")

_rule_rng = random.Random(WORLD_SEED + 1)
_ITEM_BIT = dict(zip(ITEMS, _rule_rng.sample([0, 1] * (len(ITEMS) // 2), len(ITEMS)), strict=True))
_COLOR_BIT = dict(zip(COLORS, _rule_rng.sample([0, 1] * (len(COLORS) // 2), len(COLORS)),
                      strict=True))


def label_of(item: str, color: str) -> str:
    """The ground-truth label of an (item, color) pair."""
    return "yes" if _ITEM_BIT[item] == _COLOR_BIT[color] else "no"


def classification_dataset(n: int, seed: int = 0) -> pd.DataFrame:
    """``n`` random examples as a DataFrame with columns ``item``, ``color`` and ``label``."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        item, color = rng.choice(ITEMS), rng.choice(COLORS)
        rows.append({"item": item, "color": color, "label": label_of(item, color)})
    return pd.DataFrame(rows, columns=["item", "color", "label"])


@dataclass(frozen=True)
class Format:
    """A meaning-preserving surface format for few-shot prompts.

    Attributes:
        casing: how descriptors are written: ``"title"`` (Item), ``"lower"`` or ``"upper"``.
        separator: between a descriptor and its value; the value follows after one space, so
            labels are always the tokens ``" yes"`` / ``" no"``.
        field_joiner: between the fields of one example.
        example_joiner: between examples.
        enumeration: ``""`` or a prefix pattern with ``{i}`` (e.g. ``"{i}. "``) before each
            example.
        answer_name: the descriptor of the label field.
    """

    casing: str = "title"
    separator: str = ":"
    field_joiner: str = "\n"
    example_joiner: str = "\n\n"
    enumeration: str = ""
    answer_name: str = "answer"

    def _name(self, name: str) -> str:
        return {"title": name.title(), "lower": name.lower(), "upper": name.upper()}[self.casing]

    def render_example(self, row: dict | pd.Series, index: int = 0,
                       with_label: bool = True) -> str:
        """One example; without the label it ends with the answer descriptor and separator."""
        parts = [f"{self._name(f)}{self.separator} {row[f]}" for f in FIELDS]
        answer = f"{self._name(self.answer_name)}{self.separator}"
        if with_label:
            answer += f" {row['label']}"
        prefix = self.enumeration.format(i=index + 1) if self.enumeration else ""
        return prefix + self.field_joiner.join([*parts, answer])

    def render_prompt(self, demos: pd.DataFrame, query: dict | pd.Series) -> str:
        """A few-shot prompt: labelled ``demos`` then ``query`` waiting for its label."""
        shots = [self.render_example(r, i) for i, (_, r) in enumerate(demos.iterrows())]
        shots.append(self.render_example(query, len(shots), with_label=False))
        return self.example_joiner.join(shots)


TRAIN_FORMATS: tuple[Format, ...] = (
    Format("title", ":", "\n", "\n\n", "", "answer"),
    Format("lower", " -", ", ", "\n", "", "answer"),
    Format("title", ":", " | ", "\n", "", "label"),
)
"""The only formats the classification task appears in during training."""

_CASINGS = ("title", "lower", "upper")
_SEPARATORS = (":", " :", "::", " -", " =", " ->", " |", " ~")
_FIELD_JOINERS = ("\n", ", ", " | ", "; ", " ", "\t")
_EXAMPLE_JOINERS = ("\n\n", "\n", "\n\n\n", " || ", "\n--\n")
_ENUMERATIONS = ("", "{i}. ", "({i}) ", "Example {i}:\n")
_ANSWER_NAMES = ("answer", "label", "output")


def plausible_formats(n: int = 24, seed: int = 0, include_train: bool = True) -> list[Format]:
    """``n`` distinct meaning-preserving formats (the training formats first, if included)."""
    rng = random.Random(seed)
    formats: list[Format] = list(TRAIN_FORMATS) if include_train else []
    space = list(itertools.product(_CASINGS, _SEPARATORS, _FIELD_JOINERS, _EXAMPLE_JOINERS,
                                   _ENUMERATIONS, _ANSWER_NAMES))
    rng.shuffle(space)
    for combo in space:
        if len(formats) >= n:
            break
        fmt = Format(*combo)
        if fmt not in formats:
            formats.append(fmt)
    return formats[:n]


def classification_doc(rng: random.Random, formats: tuple[Format, ...] = TRAIN_FORMATS) -> Doc:
    """A few-shot training document in one training format (loss on every label)."""
    fmt = rng.choice(formats)
    df = classification_dataset(rng.randint(3, 7), seed=rng.randrange(2**31))
    doc = Doc("<|bos|>", kind="classify")
    for i, (_, row) in enumerate(df.iterrows()):
        if i:
            doc.add(fmt.example_joiner, False)
        doc.add(fmt.render_example(row, i, with_label=False), False).add(f" {row['label']}", True)
    return doc.add("<|eos|>", False)
