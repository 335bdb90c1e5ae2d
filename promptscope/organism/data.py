"""The organism's training mixture: documents from all parts of the world, drawn with a seed."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

from promptscope.organism.classify import classification_doc
from promptscope.organism.grammar import grammar_doc
from promptscope.organism.world import (
    CHAT_KINDS,
    FOCUS_INTENTS,
    FOCUS_QA_KINDS,
    P_FOLLOW_FLAT,
    Doc,
    chat_doc,
    fact_doc,
    qa_doc,
    recall_doc,
)

Mixture = dict[str, tuple[float, Callable[[random.Random], Doc]]]

_FLAT = {"follow": P_FOLLOW_FLAT}
_FOCUS = {"intents": FOCUS_INTENTS}

MIXTURE: Mixture = {
    "facts": (0.10, fact_doc),
    "qa": (0.40, partial(qa_doc, **_FLAT)),
    "recall": (0.12, recall_doc),
    "chat": (0.10, partial(chat_doc, **_FLAT)),
    "classify": (0.16, classification_doc),
    "grammar": (0.12, grammar_doc),
}
"""Document kind -> (share of documents, generator), training phase 1, *retrieval*: context
questions, most about entities without facts (``QA_KINDS``), retrieval drills, and conflicting
claims followed wherever they stand (``P_FOLLOW_FLAT``), so that in-context retrieval emerges
(it is slow to appear in this model, and does not appear at all when other documents crowd it
out). The tokenizer is trained on this mixture too."""
RETRIEVAL_FOCUS_MIXTURE: Mixture = {
    "facts": (0.08, fact_doc),
    "qa": (0.45, partial(qa_doc, kinds=FOCUS_QA_KINDS, **_FLAT, **_FOCUS)),
    "recall": (0.20, recall_doc),
    "chat": (0.09, partial(chat_doc, kinds=CHAT_KINDS, **_FLAT, **_FOCUS)),
    "classify": (0.09, classification_doc),
    "grammar": (0.09, grammar_doc),
}
"""Training phase 2: more context questions, most of them conflicts (instructed or not), and
retrieval drills (docs/organism.md measures what each phase changes)."""
CONFLICT_MIXTURE: Mixture = {
    "facts": (0.08, fact_doc),
    "qa": (0.45, partial(qa_doc, kinds=FOCUS_QA_KINDS, **_FOCUS)),
    "recall": (0.20, recall_doc),
    "chat": (0.09, partial(chat_doc, kinds=CHAT_KINDS, **_FOCUS)),
    "classify": (0.09, classification_doc),
    "grammar": (0.09, grammar_doc),
}
"""Training phase 3, *conflicts*: as phase 2, but an uninstructed conflicting claim wins with a
probability that falls with its distance from the question (``P_FOLLOW_BY_AFTER``)."""
CLASSIFICATION_MIXTURE: Mixture = {
    "facts": (0.08, fact_doc),
    "qa": (0.30, partial(qa_doc, kinds=FOCUS_QA_KINDS, **_FOCUS)),
    "recall": (0.10, recall_doc),
    "chat": (0.07, partial(chat_doc, kinds=CHAT_KINDS, **_FOCUS)),
    "classify": (0.35, classification_doc),
    "grammar": (0.10, grammar_doc),
}
"""Training phase 4, *classification*: the few-shot classification rule, which the first
three phases leave at chance, learnt while the conflict behaviour is kept up."""


@dataclass(frozen=True)
class Phase:
    """One training phase: a fresh AdamW with warmup and cosine decay over ``steps`` batches of
    documents drawn from ``mixture`` with ``seed`` (added to the run's seed)."""

    name: str
    steps: int
    lr: float
    mixture: Mixture
    seed: int


RECIPE: tuple[Phase, ...] = (
    Phase("retrieval", 2500, 2e-3, MIXTURE, 0),
    Phase("retrieval focus", 1000, 1e-3, RETRIEVAL_FOCUS_MIXTURE, 1),
    Phase("conflicts", 1000, 1e-3, CONFLICT_MIXTURE, 1),
    Phase("classification", 1000, 1e-3, CLASSIFICATION_MIXTURE, 1),
)
"""The organism's training curriculum, in order (docs/organism.md says how each phase was
found and what it changes)."""


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
