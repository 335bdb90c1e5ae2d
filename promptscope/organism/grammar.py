"""A small synthetic language: topic-dependent Markov chains over made-up words.

Text is a stream of sentences. Each sentence starts with one of four *topic markers*
(``MARKERS``); the words that follow come from that topic's own sparse Markov chain (each word has
three possible successors with probabilities 0.6 / 0.3 / 0.1), and the sentence ends with ``"."``
after 3-8 words. Predicting a word therefore needs the previous word *and* the topic marker at the
start of the sentence, which is what makes the stream controllable: prepending a marker (a short
control prompt) steers the next word to that topic's successors (easy targets), while words that
follow the current word under no topic are hard targets. :func:`next_word_distribution` gives the
exact (Bayes-optimal) distribution for any prefix.
"""

from __future__ import annotations

import random

from promptscope.organism.world import WORLD_SEED, Doc

N_WORDS = 48
N_SUCCESSORS = 3
SUCCESSOR_PROBS: tuple[float, ...] = (0.6, 0.3, 0.1)


def _make_words(rng: random.Random, n: int) -> list[str]:
    consonants, vowels = "bdfghklmnprstvwz", "aeiou"
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(2)))
    return sorted(words)


_rng = random.Random(WORLD_SEED + 2)
_all = _make_words(_rng, N_WORDS + 4)
_rng.shuffle(_all)
MARKERS: tuple[str, ...] = tuple(sorted(_all[:4]))
"""The topic markers that open every sentence."""
WORDS: tuple[str, ...] = tuple(sorted(_all[4:]))
"""The content words of the language."""
STARTS: dict[str, tuple[str, ...]] = {m: tuple(_rng.sample(WORDS, N_SUCCESSORS)) for m in MARKERS}
"""First word after each marker (weighted by ``SUCCESSOR_PROBS``)."""
CHAINS: dict[str, dict[str, tuple[str, ...]]] = {
    m: {w: tuple(_rng.sample(WORDS, N_SUCCESSORS)) for w in WORDS} for m in MARKERS
}
"""``CHAINS[marker][word]`` -> that topic's successors of ``word`` (weighted by
``SUCCESSOR_PROBS``)."""
MIN_LEN, MAX_LEN = 3, 8


def sentence(rng: random.Random, marker: str | None = None) -> list[str]:
    """One sentence as a list of words: marker, 3-8 content words, ``"."``."""
    marker = marker or rng.choice(MARKERS)
    words = [marker, rng.choices(STARTS[marker], SUCCESSOR_PROBS)[0]]
    for _ in range(rng.randint(MIN_LEN, MAX_LEN) - 1):
        words.append(rng.choices(CHAINS[marker][words[-1]], SUCCESSOR_PROBS)[0])
    return [*words, "."]


def text(rng: random.Random, n_sentences: int | None = None) -> str:
    """A held-out stretch of the language (default: 4-8 sentences)."""
    n = n_sentences or rng.randint(4, 8)
    return " ".join(" ".join(sentence(rng)) for _ in range(n)).replace(" .", ".")


def words_of(txt: str) -> list[str]:
    """Split language text into words and ``"."``."""
    return txt.replace(".", " .").split()


def next_word_distribution(prefix: list[str]) -> dict[str, float]:
    """The true next-word distribution after ``prefix`` (words as in :func:`words_of`).

    Marker and sentence length are the only hidden state; the sentence end ``"."`` gets the
    probability that the sentence stops at this length. An empty or finished prefix gives the
    uniform distribution over markers. A prefix that starts mid-sentence without a marker is
    scored as a mixture over the topics, weighted by how likely each makes the words seen after
    the first (where the chain is entered is unknown); its sentence length is then taken to be
    the words seen, a lower bound.
    """
    i = len(prefix)
    while i > 0 and prefix[i - 1] != "." and prefix[i - 1] not in MARKERS:
        i -= 1
    if not prefix or prefix[-1] == ".":
        return {m: 1 / len(MARKERS) for m in MARKERS}
    markers = [prefix[i - 1]] if i > 0 and prefix[i - 1] in MARKERS else list(MARKERS)
    body = prefix[i:]
    dist: dict[str, float] = {}
    weighted: list[tuple[str, str | None, float]] = []
    entered = len(markers) > 1  # no marker seen: the chain is entered at body[0]
    for m in markers:
        if entered and body[0] not in CHAINS[m]:
            continue
        prev, weight = (body[0], 1.0) if entered else (None, 1.0)
        for w in body[1:] if entered else body:
            nxt = STARTS[m] if prev is None else CHAINS[m][prev]
            weight *= SUCCESSOR_PROBS[nxt.index(w)] if w in nxt else 0.0
            prev = w
        if weight > 0:
            weighted.append((m, prev, weight))
    total = sum(w for _, _, w in weighted)
    if not total:
        return {}
    n_body = len(body)
    remaining = MAX_LEN - n_body + 1  # sentence length is uniform in [MIN_LEN, MAX_LEN]
    p_stop = 1 / remaining if n_body >= MIN_LEN and remaining > 0 else 0.0
    for m, prev, weight in weighted:
        nxt = STARTS[m] if prev is None else CHAINS[m][prev]
        for w, p in zip(nxt, SUCCESSOR_PROBS, strict=True):
            dist[w] = dist.get(w, 0.0) + (1 - p_stop) * p * weight / total
    if p_stop:
        dist["."] = p_stop
    return dist


def successors(state: list[str], marker: str) -> tuple[str, ...]:
    """Words that can follow the mid-sentence ``state`` under ``marker``'s topic (``()`` if the
    state is impossible under that topic)."""
    for prev, word in zip(state, state[1:], strict=False):
        if word not in CHAINS[marker][prev]:
            return ()
    return CHAINS[marker][state[-1]]


def grammar_doc(rng: random.Random) -> Doc:
    """A training document of language text (loss on everything)."""
    return Doc("<|bos|>", kind="grammar").add(text(rng) + "<|eos|>", True)
