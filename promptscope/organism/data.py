"""The organism's training mixture: documents from all parts of the world, drawn with a seed."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from functools import partial

from promptscope.organism.classify import classification_doc
from promptscope.organism.grammar import grammar_doc
from promptscope.organism.world import (
    FOCUS_QA_KINDS,
    Doc,
    chat_doc,
    fact_doc,
    qa_doc,
    recall_doc,
)

Mixture = dict[str, tuple[float, Callable[[random.Random], Doc]]]

MIXTURE: Mixture = {
    "facts": (0.10, fact_doc),
    "qa": (0.40, qa_doc),
    "recall": (0.12, recall_doc),
    "chat": (0.10, chat_doc),
    "classify": (0.16, classification_doc),
    "grammar": (0.12, grammar_doc),
}
"""Document kind -> (share of documents, generator), training phase 1 (QA mostly retrieval of
novel entities, see ``QA_KINDS``)."""
FOCUS_MIXTURE: Mixture = {
    "facts": (0.08, fact_doc),
    "qa": (0.45, partial(qa_doc, kinds=FOCUS_QA_KINDS)),
    "recall": (0.20, recall_doc),
    "chat": (0.09, partial(chat_doc, kinds=FOCUS_QA_KINDS)),
    "classify": (0.09, classification_doc),
    "grammar": (0.09, grammar_doc),
}
"""Training phase 2: more context questions, most of them conflicts (instructed or not), and
retrieval drills."""


REPAIR_MIXTURE: Mixture = {
    "facts": (0.08, fact_doc),
    "qa": (0.30, partial(qa_doc, kinds=FOCUS_QA_KINDS)),
    "recall": (0.10, recall_doc),
    "chat": (0.07, partial(chat_doc, kinds=FOCUS_QA_KINDS)),
    "classify": (0.35, classification_doc),
    "grammar": (0.10, grammar_doc),
}
"""v5 repair: phase 2 with the few-shot classification documents v4 under-weighted."""


def training_documents(seed: int, mixture: Mixture = MIXTURE) -> Iterator[Doc]:
    """An endless, deterministic stream of training documents drawn from ``mixture``."""
    rng = random.Random(seed)
    kinds = list(mixture)
    weights = [mixture[k][0] for k in kinds]
    while True:
        kind = rng.choices(kinds, weights)[0]
        yield mixture[kind][1](rng)


def sample_documents(n: int, seed: int, mixture: Mixture = MIXTURE) -> list[Doc]:
    """The first ``n`` documents of :func:`training_documents` for ``seed``."""
    stream = training_documents(seed, mixture)
    return [next(stream) for _ in range(n)]
