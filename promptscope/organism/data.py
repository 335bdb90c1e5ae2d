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
    INTENTS,
    P_FOLLOW_FLAT,
    P_LEAD,
    Doc,
    QAExample,
    chat_doc,
    fact_doc,
    qa_doc,
    qa_example,
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
    interchange: int = 0
    """Question pairs per step for interchange-intervention training of the intent knob at
    :data:`KNOB_LAYER` (0: documents only); see :func:`intent_pair`."""


KNOB_LAYER = 1
"""The layer whose output, at the last prompt token, carries the intent as one direction after
the *knob* phase: the layer where, before it, setting the intent direction moved answers most
and the instruction first reached the last token (docs/organism.md, docs/steering.md)."""

RECIPE: tuple[Phase, ...] = (
    Phase("retrieval", 2500, 2e-3, MIXTURE, 0),
    Phase("retrieval focus", 1000, 1e-3, RETRIEVAL_FOCUS_MIXTURE, 1),
    Phase("conflicts", 1000, 1e-3, CONFLICT_MIXTURE, 1),
    Phase("classification", 1000, 1e-3, CLASSIFICATION_MIXTURE, 1),
    Phase("knob", 300, 5e-4, CONFLICT_MIXTURE, 2, interchange=16),
)
"""The organism's training curriculum, in order (docs/organism.md says how each phase was
found and what it changes)."""


KNOB_BASE_KINDS: dict[str, float] = {"conflict": 0.6, "agree": 0.2, "distractors": 0.2}
"""Kinds of the knob phase's base questions: conflicts, where the intent decides the answer,
and contexts that agree or say nothing about the question, where it must not change it."""


def intent_pair(rng: random.Random) -> tuple[QAExample, QAExample, str]:
    """One example of the knob phase's interchange intervention (Geiger et al., 2022).

    ``base`` is a context question (:data:`KNOB_BASE_KINDS`; instructed, except that a context
    without the answer is uninstructed or told to use what the model knows), ``source`` an
    unrelated instructed conflict. Training copies the source's value along the knob direction
    into the base's state at :data:`KNOB_LAYER` and asks for ``answer``: the base's context
    value if the *source* says to use the context and the base's context has one, else the
    base's prior. Every other part of the base state stays the base's own, so the answer can
    only follow the source's intent if that one direction carries it.
    """
    kind = rng.choices(list(KNOB_BASE_KINDS), list(KNOB_BASE_KINDS.values()))[0]
    intents = (None, "prior") if kind == "distractors" else INTENTS
    base = qa_example(rng, kind=kind, intent=rng.choice(intents), lead=rng.random() < P_LEAD)
    source = qa_example(rng, kind="conflict", intent=rng.choice(INTENTS),
                        lead=rng.random() < P_LEAD)
    use_context = source.intent == "context" and base.context_value is not None
    return base, source, base.context_value if use_context else base.prior


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
