"""AutoPASTA: the model names the key sentence of the context itself, and that sentence is steered.

For each prompt the model is first asked (greedy generation) which sentence of the context
matters; its answer is matched back to the context's sentences (character similarity, so a
paraphrased or truncated answer still finds its sentence), and that sentence becomes the
emphasised span for PASTA. In a template, ``<<...>>`` marks the region to search (the context);
without it the whole prompt is searched.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from promptscope.errors import PromptscopeError

#: How the model is asked for the key sentence; ``{prompt}`` is the full prompt.
DEFAULT_QUESTION = "{prompt}\nThe most relevant sentence of the context is:"

_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")


@dataclass(frozen=True)
class KeySentence:
    """What AutoPASTA picked for one prompt."""

    span: tuple[int, int]
    sentence: str
    generated: str
    similarity: float


def sentences(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Character spans of the sentences of ``text[start:end]`` (stripped of spaces)."""
    end = len(text) if end is None else end
    spans = []
    for m in _SENTENCE.finditer(text, start, end):
        a, b = m.start(), m.end()
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if b > a:
            spans.append((a, b))
    return spans


def match_sentence(generated: str, text: str, candidates: Sequence[tuple[int, int]]
                   ) -> tuple[tuple[int, int], float]:
    """The candidate span most similar to ``generated`` (difflib ratio, case-insensitive)."""
    if not candidates:
        raise PromptscopeError("AutoPASTA found no sentence to emphasise in the context.")
    wanted = generated.strip().splitlines()[0].strip().lower() if generated.strip() else ""
    best = max(candidates, key=lambda s: difflib.SequenceMatcher(
        None, wanted, text[s[0]:s[1]].lower()).ratio())
    return best, difflib.SequenceMatcher(None, wanted, text[best[0]:best[1]].lower()).ratio()


def key_sentences(model: Any, texts: Sequence[str], regions: Sequence[tuple[int, int] | None],
                  question: str = DEFAULT_QUESTION, max_new_tokens: int = 32) -> list[KeySentence]:
    """Ask ``model`` for the key sentence of each text, within its region (``None``: all of it).

    Example:
        >>> key_sentences(model, ["Ann lives in Rome. Bob lives in Oslo. Where is Ann?"],
        ...               [(0, 37)])[0].sentence                          # doctest: +SKIP
        'Ann lives in Rome.'
    """
    if "{prompt}" not in question:
        raise PromptscopeError("The AutoPASTA question must contain {prompt}.")
    asks = [question.replace("{prompt}", t) for t in texts]
    # Ask the model unsteered: no PASTA, and a steering vector (pasta+vector) switched off.
    steering, model.steering = getattr(model, "steering", None), None
    vector = getattr(model, "vector_steering", None)
    was_on = vector is not None and vector.enabled
    if vector is not None:
        vector.enabled = False
    try:
        gens = model.generate(asks, max_new_tokens=max_new_tokens)
    finally:
        model.steering = steering
        if vector is not None:
            vector.enabled = was_on
    out = []
    for text, region, (g,) in zip(texts, regions, gens):
        a, b = region if region is not None else (0, len(text))
        span, score = match_sentence(g.text, text, sentences(text, a, b))
        out.append(KeySentence(span, text[span[0]:span[1]], g.text, score))
    return out
