"""The made-up world the model organism learns, and generators of fresh examples from it.

Three kinds of text make up the organism's training data, each chosen so that one prompting effect
is present *by construction*:

1. **Knowledge and context** (:func:`qa_example`, :func:`fact_paragraph`): a fixed set of made-up
   entities (``ENTITIES``) with a colour and a home city that the model memorises from fact
   paragraphs (its *prior*). Question-answer examples show a context of sentences, often about
   other entities (distractors). Some examples carry an *instruction* (``INSTRUCTIONS``: "Use the
   context." / "Use what you know.") and their answer follows it deterministically; when an
   uninstructed context contradicts the prior, the training answer is the context value with a
   probability that falls with the claim's distance from the question (``P_FOLLOW_BY_AFTER``;
   ``P_FOLLOW_FLAT`` in the first training phases), so whether a buried claim wins depends on
   how strongly the model attends to it, which attention steering changes.
2. **Format sensitivity**: see :mod:`promptscope.organism.classify`.
3. **Controllability**: see :mod:`promptscope.organism.grammar`.

The world itself (names, facts) is fixed by ``WORLD_SEED``; every generator takes its own ``seed``
(or ``random.Random``) so tests and notebooks can draw held-out examples that training never saw.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

WORLD_SEED = 1234
"""Seed that fixes the world (entity names, facts, grammar, classification rule)."""

COLORS: tuple[str, ...] = ("red", "blue", "green", "yellow", "white", "black", "orange", "purple")
CITIES: tuple[str, ...] = ("Oslo", "Lima", "Rome", "Cairo", "Delhi", "Tokyo", "Quito", "Paris")
ATTRIBUTES: dict[str, tuple[str, ...]] = {"color": COLORS, "city": CITIES}
"""Each attribute and the values it can take; every value is one token with a leading space."""

N_ENTITIES = 40
MAX_DISTRACTORS = 5
P_CONTEXT = 0.9
"""Training probability that an uninstructed conflicting claim wins in the first (retrieval)
phases, wherever it stands: the model is taught to follow a context it finds, which makes
in-context retrieval worth learning."""
P_FOLLOW_BY_AFTER = (0.9, 0.7, 0.45, 0.25, 0.1, 0.05, 0.05, 0.05, 0.05)
"""Training probability that an uninstructed conflicting context wins, by the number of
sentences between the claim and the question (0 = the claim comes last). A claim far back is
usually overruled by memory, so whether the model follows it depends on how strongly it attends
to that sentence, which is what attention steering changes."""
P_FOLLOW_FLAT = (P_CONTEXT,)
"""The same at every distance (the retrieval phase of training: a claim that is found wins)."""
P_LEAD = 0.75
"""Share of training prompts that end ``Answer: <entity> is`` (the rest end with ``Answer:``)."""

INTENTS: tuple[str, ...] = ("context", "prior")
"""What an instruction asks: answer from the context, or from memorised knowledge."""
INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "context": ("Use the context.", "Trust the context."),
    "prior": ("Use what you know.", "Trust your memory."),
}
"""Instruction sentences per intent; the first of each is the canonical one."""

_FACT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("{e} is {v}.", "The color of {e} is {v}."),
    "city": ("{e} lives in {v}.", "{e} resides in {v}."),
}
_QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("What color is {e}?", "Which color does {e} have?"),
    "city": ("Where does {e} live?", "In which city does {e} live?"),
}
_ANSWER_SENTENCE: dict[str, str] = {"color": "{e} is {v}.", "city": "{e} lives in {v}."}


def _make_names(rng: random.Random, n: int) -> list[str]:
    onsets = list("bdfgklmnprstvz") + ["br", "dr", "gl", "pl", "tr", "sk"]
    vowels = list("aeiou")
    codas = ["", "n", "r", "l", "k", "m", "s", "x"]
    names: set[str] = set()
    while len(names) < n:
        name = "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
                       for _ in range(2))
        if 5 <= len(name) <= 7:
            names.add(name.capitalize())
    return sorted(names)


_world_rng = random.Random(WORLD_SEED)
ENTITIES: tuple[str, ...] = tuple(_make_names(_world_rng, N_ENTITIES))
"""The made-up entities whose facts the model memorises."""
FACTS: dict[str, dict[str, str]] = {
    e: {attr: _world_rng.choice(values) for attr, values in ATTRIBUTES.items()} for e in ENTITIES
}
"""The prior: ``FACTS[entity][attribute] -> value``."""
NOVEL_ENTITIES: tuple[str, ...] = tuple(
    n for n in _make_names(random.Random(WORLD_SEED + 3), 3000) if n not in FACTS)
"""Names with no facts; questions about them can only be answered from the context."""


@dataclass
class Doc:
    """One training document: ``text`` and the character spans the loss is computed on.

    ``trained`` holds ``(start, end)`` character offsets into ``text``; tokens that start inside
    one of them are predicted during training, all other tokens only serve as context.
    """

    text: str
    trained: list[tuple[int, int]] = field(default_factory=list)
    kind: str = ""

    def add(self, piece: str, train: bool) -> Doc:
        """Append ``piece`` (trained on when ``train``) and return ``self``."""
        if train and piece:
            self.trained.append((len(self.text), len(self.text) + len(piece)))
        self.text += piece
        return self


@dataclass
class QAExample:
    """A context question with everything an analysis needs to score it.

    Attributes:
        context: the context sentences (``""`` when there is none).
        sentences: the context sentences as a list, in order.
        relevant_index: index in ``sentences`` of the sentence about the asked entity and
            attribute, or ``None``.
        question: the question sentence.
        entity, attribute: what is asked.
        prior: the memorised value (``FACTS[entity][attribute]``; ``""`` for novel entities).
        context_value: the value the context states (``None`` without a relevant sentence).
        target: the training answer.
        kind: ``"none"``, ``"distractors"``, ``"agree"``, ``"conflict"`` or ``"novel"``.
        n_distractors: number of distractor sentences.
        intent: ``"context"``, ``"prior"`` or ``None`` (no instruction).
        instruction: the instruction sentence (``""`` without one); it is a line between the
            question and ``Answer:``.
    """

    context: str
    sentences: list[str]
    relevant_index: int | None
    question: str
    entity: str
    attribute: str
    prior: str
    context_value: str | None
    target: str
    kind: str
    n_distractors: int
    intent: str | None = None
    instruction: str = ""
    lead: bool = True

    @property
    def answer_lead(self) -> str:
        """What the prompt puts after ``Answer:`` (``" Brafu is"``; ``""`` when ``lead`` is
        false): the answer then completes a statement, as in CounterFact-style prompts."""
        if not self.lead:
            return ""
        return " " + _ANSWER_SENTENCE[self.attribute].split(" {v}")[0].format(e=self.entity)

    @property
    def prompt(self) -> str:
        """The plain-text prompt; the answer follows as one token (e.g. ``" green"``)."""
        return f"{self.chat_question}\nAnswer:{self.answer_lead}"

    @property
    def relevant_span(self) -> tuple[int, int] | None:
        """Character span of the relevant context sentence inside :attr:`prompt`."""
        if self.relevant_index is None:
            return None
        start = len("Context: ") + sum(len(s) + 1 for s in self.sentences[: self.relevant_index])
        return start, start + len(self.sentences[self.relevant_index])

    @property
    def chat_question(self) -> str:
        """The user message for the chat form of this example."""
        head = f"Context: {self.context}\n" if self.context else ""
        tail = f"\n{self.instruction}" if self.instruction else ""
        return f"{head}Question: {self.question}{tail}"

    @property
    def chat_answer(self) -> str:
        """The assistant reply for the chat form of this example."""
        return _ANSWER_SENTENCE[self.attribute].format(e=self.entity, v=self.target)


def fact_sentence(entity: str, attribute: str, value: str, rng: random.Random) -> str:
    """One sentence stating ``entity``'s ``attribute`` is ``value`` (a random template)."""
    return rng.choice(_FACT_TEMPLATES[attribute]).format(e=entity, v=value)


def fact_paragraph(rng: random.Random, n_min: int = 4, n_max: int = 9) -> str:
    """A paragraph of true facts about random entities (the pre-training text of the prior)."""
    sentences = []
    for _ in range(rng.randint(n_min, n_max)):
        e = rng.choice(ENTITIES)
        attr = rng.choice(list(ATTRIBUTES))
        sentences.append(fact_sentence(e, attr, FACTS[e][attr], rng))
    return " ".join(sentences)


def _distractor(rng: random.Random, entity: str, attribute: str) -> str:
    if rng.random() < 0.2:  # same entity, other attribute
        other = [a for a in ATTRIBUTES if a != attribute]
        attr = rng.choice(other)
        return fact_sentence(entity, attr, rng.choice(ATTRIBUTES[attr]), rng)
    e = rng.choice([x for x in ENTITIES if x != entity])
    attr = rng.choice(list(ATTRIBUTES))
    value = FACTS[e][attr] if rng.random() < 0.5 else rng.choice(ATTRIBUTES[attr])
    return fact_sentence(e, attr, value, rng)


QA_KINDS: dict[str, float] = {"none": 10, "distractors": 10, "agree": 15, "conflict": 30,
                              "novel": 35}
"""Training mixture of QA kinds (relative weights), phase 1: retrieval (``novel``) first."""
FOCUS_QA_KINDS: dict[str, float] = {"none": 8, "distractors": 8, "agree": 14, "conflict": 40,
                                    "novel": 30}
"""QA mixture of the second, conflict-focused training phase."""
TRAIN_INTENTS: dict[str, dict[str | None, float]] = {
    "none": {None: 0.75, "prior": 0.25},
    "distractors": {None: 0.75, "prior": 0.25},
    "agree": {None: 0.5, "context": 0.25, "prior": 0.25},
    "conflict": {None: 0.5, "context": 0.25, "prior": 0.25},
    "novel": {None: 0.75, "context": 0.25},
}
"""Per QA kind, the training probability of each intent (``None``: no instruction). An intent
is only given where it has an answer (no "use the context" without a relevant sentence, no "use
what you know" about an entity without facts)."""
FOCUS_INTENTS: dict[str, dict[str | None, float]] = {
    **TRAIN_INTENTS, "conflict": {None: 0.4, "context": 0.35, "prior": 0.25}}
"""Intents of the later training phases: more conflicts told to use the context, so that the
instruction, not the claim's distance, decides them (on one seed or another)."""
CHAT_KINDS: dict[str, float] = {"none": 40, "distractors": 8, "agree": 12, "conflict": 20,
                                "novel": 20}
"""QA kinds of the later phases' chat documents: questions without context are common in chat,
so a chat reply to one stays the one answer sentence it was trained on."""


def qa_example(
    rng: random.Random,
    kind: str | None = None,
    n_distractors: int | None = None,
    attribute: str | None = None,
    kinds: dict[str, float] = QA_KINDS,
    intent: str | None = None,
    intents: dict[str, dict[str | None, float]] | None = None,
    lead: bool = True,
    follow: Sequence[float] = P_FOLLOW_BY_AFTER,
) -> QAExample:
    """Draw one context question-answer example.

    Args:
        rng: source of randomness.
        kind: ``"none"`` (no context), ``"distractors"`` (context only about other things),
            ``"agree"`` (context states the prior), ``"conflict"`` (context contradicts it) or
            ``"novel"`` (an entity without facts, answerable only from the context);
            default: drawn from ``kinds``.
        n_distractors: number of distractor sentences (default: uniform 0..``MAX_DISTRACTORS``,
            at least 1 for ``"distractors"``).
        attribute: ``"color"`` or ``"city"`` (default: random).
        kinds: relative weights of the kinds when ``kind`` is not given.
        intent: ``"context"`` or ``"prior"`` adds that instruction (a random phrasing from
            ``INSTRUCTIONS``); ``None`` (default) gives a plain, uninstructed prompt.
        intents: draw the intent instead, with these per-kind probabilities (e.g.
            ``TRAIN_INTENTS``); overrides ``intent``.
        lead: end the prompt with ``Answer: <entity> is`` (or ``lives in``) rather than a bare
            ``Answer:``.
        follow: probability that an uninstructed conflicting claim is the target, by the
            number of sentences after it (the last entry for any larger distance).

    Returns:
        The example. Its ``target`` follows the instruction when there is one; for an
        uninstructed ``"conflict"`` it is the context value with probability from ``follow``,
        else the prior.
    """
    if kind is None:
        kind = rng.choices(list(kinds), list(kinds.values()))[0]
    if intents is not None:
        options = intents.get(kind, {None: 1.0})
        intent = rng.choices(list(options), list(options.values()))[0]
    if intent is not None and intent not in INTENTS:
        raise ValueError(f"intent must be one of {INTENTS} or None, not {intent!r}")
    if (intent == "context" and kind in ("none", "distractors")) or (
            intent == "prior" and kind == "novel"):
        raise ValueError(f"a {kind!r} example has no answer for intent {intent!r}")
    instruction = rng.choice(INSTRUCTIONS[intent]) if intent else ""
    attribute = attribute or rng.choice(list(ATTRIBUTES))
    entity = rng.choice(NOVEL_ENTITIES if kind == "novel" else ENTITIES)
    prior = FACTS[entity][attribute] if kind != "novel" else ""
    question = rng.choice(_QUESTION_TEMPLATES[attribute]).format(e=entity)
    if kind == "none":
        return QAExample("", [], None, question, entity, attribute, prior, None, prior, kind, 0,
                         intent, instruction, lead=lead)
    if n_distractors is None:
        n_distractors = rng.randint(1 if kind == "distractors" else 0, MAX_DISTRACTORS)
    sentences = [_distractor(rng, entity, attribute) for _ in range(n_distractors)]
    relevant_index, context_value, target = None, None, prior
    if kind in ("agree", "conflict", "novel"):
        if kind == "agree":
            context_value = prior
        elif kind == "novel":
            context_value = target = rng.choice(ATTRIBUTES[attribute])
        else:
            context_value = rng.choice([v for v in ATTRIBUTES[attribute] if v != prior])
            # A rule that ignores distance is drawn before the claim is placed, the distance
            # rule after it: the order the shipped weights were trained on (same seed, same data).
            if len(follow) == 1 and _follows(rng, intent, follow[0]):
                target = context_value
        relevant_index = rng.randint(0, n_distractors)
        if kind == "conflict" and len(follow) > 1:
            after = min(n_distractors - relevant_index, len(follow) - 1)
            if _follows(rng, intent, follow[after]):
                target = context_value
        sentences.insert(relevant_index, fact_sentence(entity, attribute, context_value, rng))
    return QAExample(" ".join(sentences), sentences, relevant_index, question, entity, attribute,
                     prior, context_value, target, kind, n_distractors, intent, instruction,
                     lead=lead)


def _follows(rng: random.Random, intent: str | None, p: float) -> bool:
    """Whether a conflicting claim is the target: always when told to use the context, with
    probability ``p`` without an instruction, never when told to use what the model knows."""
    return intent == "context" or (intent is None and rng.random() < p)


def qa_doc(rng: random.Random, kinds: dict[str, float] = QA_KINDS,
           follow: Sequence[float] = P_FOLLOW_BY_AFTER,
           intents: dict[str, dict[str | None, float]] = TRAIN_INTENTS) -> Doc:
    """A plain-text QA training document (loss on the answer only; ``kinds``, ``intents`` and
    ``follow`` as in :func:`qa_example`)."""
    ex = qa_example(rng, kinds=kinds, intents=intents, lead=rng.random() < P_LEAD,
                    follow=follow)
    return Doc("<|bos|>", kind="qa").add(ex.prompt, False).add(f" {ex.target}", True).add(
        "<|eos|>", True)


def recall_doc(rng: random.Random) -> Doc:
    """A retrieval drill: a context about made-up entities without facts (plus some distractor
    sentences about known entities), then several questions about it, every answer trained.

    The first question has exactly the plain prompt layout (``Context: ...\nQuestion: ...\n
    Answer:``); each further question follows on a new line. With no prior to compete, these
    documents only teach the model to find the sentence about the asked entity and copy its value
    (many answer tokens per document, so in-context retrieval gets far more training signal than
    single-question documents give).
    """
    n = rng.randint(2, 6)
    asked = [(name, rng.choice(list(ATTRIBUTES))) for name in rng.sample(NOVEL_ENTITIES, n)]
    facts = [(e, a, rng.choice(ATTRIBUTES[a])) for e, a in asked]
    sentences = [fact_sentence(e, a, v, rng) for e, a, v in facts]
    for _ in range(rng.randint(0, 3)):
        e = rng.choice(ENTITIES)
        sentences.insert(rng.randint(0, len(sentences)), _distractor(rng, e, "color"))
    doc = Doc("<|bos|>", kind="recall").add(f"Context: {' '.join(sentences)}\n", False)
    for i, (e, a, v) in enumerate(rng.sample(facts, min(len(facts), rng.randint(2, 4)))):
        question = rng.choice(_QUESTION_TEMPLATES[a]).format(e=e)
        lead = QAExample("", [], None, question, e, a, "", v, v, "novel", 0,
                         lead=rng.random() < P_LEAD).answer_lead
        doc.add(("\n" if i else "") + f"Question: {question}\nAnswer:{lead}", False).add(
            f" {v}", True)
    return doc.add("<|eos|>", True)


def fact_doc(rng: random.Random) -> Doc:
    """A fact-paragraph training document (loss on everything)."""
    return Doc("<|bos|>", kind="facts").add(fact_paragraph(rng) + "<|eos|>", True)


def chat_doc(rng: random.Random, kinds: dict[str, float] = QA_KINDS,
             follow: Sequence[float] = P_FOLLOW_BY_AFTER,
             intents: dict[str, dict[str | None, float]] = TRAIN_INTENTS) -> Doc:
    """A chat-formatted training document (loss on the assistant turn).

    The user either asks a context question or asks about an entity; the layout is the one
    produced by :data:`CHAT_TEMPLATE`.
    """
    doc = Doc("<|bos|>", kind="chat")
    if rng.random() < 0.2:
        doc.add("<|system|>\nYou answer questions about the world.<|end|>\n", False)
    if rng.random() < 0.7:
        ex = qa_example(rng, kinds=kinds, intents=intents, follow=follow)
        user, reply = ex.chat_question, ex.chat_answer
    else:
        e = rng.choice(ENTITIES)
        user = rng.choice(["Tell me about {e}.", "What do you know about {e}?"]).format(e=e)
        reply = " ".join(_ANSWER_SENTENCE[a].format(e=e, v=FACTS[e][a]) for a in ATTRIBUTES)
    doc.add(f"<|user|>\n{user}<|end|>\n<|assistant|>\n", False)
    return doc.add(f"{reply}<|end|>", True)


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
"""Jinja chat template shipped with the tokenizer (roles: system, user, assistant)."""


#: A promptscope template for context questions whose relevant sentence is emphasised.
STEERING_TEMPLATE = "Context: {before}<<{key}>>{after}\nQuestion: {question}\nAnswer:{lead}"
#: The same with the instruction line (``instruction`` is ``""`` or ``"\nUse the context."``...).
INSTRUCTED_TEMPLATE = ("Context: {before}<<{key}>>{after}\nQuestion: {question}{instruction}"
                       "\nAnswer:{lead}")


def template_rows(examples: list[QAExample]) -> Any:
    """Context questions as rows for :data:`STEERING_TEMPLATE` (one per example with a relevant
    sentence): ``before``, ``key`` (the relevant sentence), ``after``, ``question``, and the
    ``answer`` (the context's value), ``prior``, ``distractors``, ``intent`` (``""`` when
    uninstructed) and ``instruction`` (``""`` or the instruction line with its leading newline,
    for :data:`INSTRUCTED_TEMPLATE`) carried along. :data:`STEERING_TEMPLATE` ignores the
    instruction: use it with uninstructed examples.

    Example:
        >>> rows = template_rows([qa_example(random.Random(0), kind="novel")])
        >>> promptscope.run_prompt(STEERING_TEMPLATE, vars=rows, choices=...)  # doctest: +SKIP
    """
    import pandas as pd

    out = []
    for ex in examples:
        i = ex.relevant_index
        if i is None:
            continue
        rest = ex.sentences[i + 1:]
        out.append({"before": " ".join(ex.sentences[:i]) + (" " if i else ""),
                    "key": ex.sentences[i], "after": (" " if rest else "") + " ".join(rest),
                    "question": ex.question, "lead": ex.answer_lead,
                    "answer": f" {ex.context_value}",
                    "prior": f" {ex.prior}" if ex.prior else "",
                    "distractors": ex.n_distractors, "intent": ex.intent or "",
                    "instruction": f"\n{ex.instruction}" if ex.instruction else ""})
    return pd.DataFrame(out)
