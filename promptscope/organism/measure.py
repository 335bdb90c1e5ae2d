"""Measurements of the three effects built into the organism (used by docs, script and tests).

* :func:`answer_choices`, :func:`context_following`, :func:`accuracy` - effect 1, context vs
  prior (with or without an instruction), optionally under PASTA attention steering done by
  promptscope itself (:func:`promptscope.steer`); :func:`pasta_heads` profiles heads with
  :func:`promptscope.profile_heads` and picks the best set;
* :func:`format_accuracies` - effect 2, accuracy of the few-shot task across prompt formats;
* :func:`grammar_accuracy` and :func:`reachable_targets` - effect 3, next-token prediction on the
  synthetic language and which next words a one-token control prompt can force.

All functions take a transformers causal LM and its tokenizer and run without gradients.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd
import torch

from promptscope.organism import grammar
from promptscope.organism.classify import (
    LABELS,
    Format,
    classification_dataset,
    plausible_formats,
)
from promptscope.organism.world import (
    ATTRIBUTES,
    MAX_DISTRACTORS,
    STEERING_TEMPLATE,
    QAExample,
    qa_example,
    template_rows,
)


@torch.no_grad()
def last_logits(model: Any, ids: Sequence[Sequence[int]], batch_size: int = 64) -> torch.Tensor:
    """Next-token logits [N, vocab] after each token sequence (right-padded batches)."""
    out = []
    for b in range(0, len(ids), batch_size):
        chunk = ids[b:b + batch_size]
        width = max(len(x) for x in chunk)
        batch = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, x in enumerate(chunk):
            batch[i, :len(x)] = torch.tensor(x)
        logits = model(input_ids=batch).logits
        last = torch.tensor([len(x) - 1 for x in chunk])
        out.append(logits[torch.arange(len(chunk)), last].float())
    return torch.cat(out)


def word_ids(tokenizer: Any, words: Iterable[str]) -> list[int]:
    """Token ids of ``" " + word`` for each word (each must be a single token)."""
    ids = []
    for w in words:
        tok = tokenizer(" " + w, add_special_tokens=False).input_ids
        if len(tok) != 1:
            raise ValueError(f"{w!r} is not a single token")
        ids.append(tok[0])
    return ids


def conflict_examples(n: int, seed: int, max_distractors: int | None = None,
                      intent: str | None = None, attribute: str | None = None
                      ) -> list[QAExample]:
    """``n`` held-out conflicting-context questions.

    The number of distractor sentences is uniform in 0..``max_distractors`` (default: the
    training range, 0..``MAX_DISTRACTORS``); ``intent`` adds an instruction (default: none).
    """
    rng = random.Random(seed)
    top = MAX_DISTRACTORS if max_distractors is None else max_distractors
    return [qa_example(rng, kind="conflict", n_distractors=rng.randint(0, top), intent=intent,
                       attribute=attribute) for _ in range(n)]


def as_promptscope_model(model: Any, tokenizer: Any, name: str = "organism") -> Any:
    """``model`` wrapped as a promptscope :class:`~promptscope.models.hf.HFModel` (cached on it).

    An :class:`HFModel` is returned as is.
    """
    from promptscope.models.hf import HFModel

    if isinstance(model, HFModel):
        return model
    wrapped = getattr(model, "_promptscope_model", None)
    if wrapped is None or wrapped.tokenizer is not tokenizer:
        wrapped = HFModel(model, tokenizer, name)
        model._promptscope_model = wrapped
    return wrapped


def answer_choices(model: Any, tokenizer: Any, examples: Sequence[QAExample],
                   heads: Iterable[tuple[int, int]] = (), alpha: float = 0.01) -> list[str]:
    """The model's answer to each example: the most likely of the asked attribute's values.

    With ``heads``, those (layer, head)s are steered toward each example's relevant context
    sentence with promptscope's PASTA (:func:`promptscope.steer`, coefficient ``alpha``);
    examples without a relevant sentence are not steered.
    """
    from promptscope.models.steering import steer

    heads = list(heads)
    hf = as_promptscope_model(model, tokenizer)
    prompts = [ex.prompt for ex in examples for _ in ATTRIBUTES[ex.attribute]]
    conts = [f" {v}" for ex in examples for v in ATTRIBUTES[ex.attribute]]
    if heads:
        with steer(hf, heads=heads, alpha=alpha) as steering:
            steering.spans.update({ex.prompt: [ex.relevant_span] for ex in examples
                                   if ex.relevant_span is not None})
            scores = hf.score(prompts, conts)
    else:
        scores = hf.score(prompts, conts)
    answers, i = [], 0
    for ex in examples:
        values = ATTRIBUTES[ex.attribute]
        lps = [s.logprob for s in scores[i:i + len(values)]]
        answers.append(values[max(range(len(values)), key=lps.__getitem__)])
        i += len(values)
    return answers


def accuracy(model: Any, tokenizer: Any, examples: Sequence[QAExample],
             heads: Iterable[tuple[int, int]] = (), alpha: float = 0.01) -> float:
    """Share of examples answered with their ``target`` (e.g. what the instruction asks)."""
    answers = answer_choices(model, tokenizer, examples, heads, alpha)
    return sum(a == ex.target for a, ex in zip(answers, examples, strict=True)) / len(examples)


def context_following(model: Any, tokenizer: Any, examples: Sequence[QAExample],
                      heads: Iterable[tuple[int, int]] = (), alpha: float = 0.01) -> dict:
    """Share of conflicting-context examples answered with the context / the prior value.

    ``by_distractors`` gives the context share per number of distractor sentences.
    """
    answers = answer_choices(model, tokenizer, examples, heads, alpha)
    n = len(examples)
    ctx = [a == ex.context_value for a, ex in zip(answers, examples, strict=True)]
    by_n: dict[int, list[bool]] = {}
    for hit, ex in zip(ctx, examples, strict=True):
        by_n.setdefault(ex.n_distractors, []).append(hit)
    return {"context": sum(ctx) / n,
            "prior": sum(a == ex.prior for a, ex in zip(answers, examples, strict=True)) / n,
            "n": n,
            "by_distractors": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_n.items())}}


def pasta_heads(model: Any, tokenizer: Any, examples: Sequence[QAExample],
                max_heads: int = 5, alpha: float = 0.01) -> dict:
    """Choose PASTA heads for context following with promptscope's head profiling.

    Profiles every (layer, head) alone on ``examples`` (uninstructed; target: the context value)
    with :func:`promptscope.profile_heads` (not saved), then steers the best 1..``max_heads``
    heads together on the same examples and keeps the best count.

    Returns:
        ``heads`` (list of (layer, head)), ``profile`` (the profile DataFrame, best first),
        ``context_by_k`` (context following on ``examples`` with the top k heads).
    """
    from promptscope.analyses.heads import profile_heads, rank

    hf = as_promptscope_model(model, tokenizer)
    rows = template_rows(list(examples))
    rows["choices"] = [[f" {v}" for v in ATTRIBUTES[ex.attribute]] for ex in examples]
    prof = profile_heads(STEERING_TEMPLATE, rows, hf, alpha=alpha, save=False, progress=False)
    ranked = rank(prof.df)
    order = [(int(r.layer), int(r.head)) for r in ranked.itertuples()]
    by_k = {k: context_following(model, tokenizer, examples, order[:k], alpha)["context"]
            for k in range(1, max_heads + 1)}
    best = max(by_k, key=lambda k: (by_k[k], -k))
    return {"heads": order[:best], "profile": ranked, "context_by_k": by_k}


@torch.no_grad()
def format_accuracies(model: Any, tokenizer: Any, formats: Sequence[Format] | None = None,
                      n_queries: int = 60, n_shots: int = 3, seed: int = 0) -> pd.DataFrame:
    """Few-shot accuracy of the classification task in each format (same queries and demos).

    Returns a DataFrame with one row per format: ``format`` (its repr), ``seen`` (a training
    format) and ``accuracy`` (label chosen by the higher log-probability of ``" yes"``/``" no"``).
    """
    from promptscope.organism.classify import TRAIN_FORMATS

    formats = list(formats or plausible_formats(24))
    queries, demos = _queries_with_demos(n_queries, n_shots, seed)
    label_ids = word_ids(tokenizer, LABELS)
    rows = []
    for fmt in formats:
        prompts = [fmt.render_prompt(d, q) for q, d in zip(queries, demos, strict=True)]
        gold = [LABELS.index(q["label"]) for q in queries]
        logits = last_logits(model, [tokenizer(p).input_ids for p in prompts])
        pred = logits[:, label_ids].argmax(-1)
        acc = (pred == torch.tensor(gold)).float().mean().item()
        rows.append({"format": repr(fmt), "seen": fmt in TRAIN_FORMATS, "accuracy": acc})
    return pd.DataFrame(rows)


def _queries_with_demos(n_queries: int, n_shots: int, seed: int
                        ) -> tuple[list[pd.Series], list[pd.DataFrame]]:
    """``n_queries`` classification queries, each with ``n_shots`` demonstrations that never
    repeat it (an equal item and color would show its label). Each query takes the rows of its
    own block; a demo equal to the query is replaced by the next spare row that differs."""
    block = n_shots + 1
    data = classification_dataset(n_queries * block + 4 * n_queries, seed=seed)
    spare = iter(range(n_queries * block, len(data)))
    queries, demos = [], []
    for q in range(n_queries):
        query = data.iloc[q * block + n_shots]
        picked = []
        for k in range(q * block, q * block + n_shots):
            while (data.iloc[k][["item", "color"]] == query[["item", "color"]]).all():
                k = next(spare)
            picked.append(k)
        queries.append(query)
        demos.append(data.iloc[picked])
    return queries, demos


@torch.no_grad()
def grammar_accuracy(model: Any, tokenizer: Any, n_texts: int = 20, seed: int = 0) -> dict:
    """Top-1 next-word accuracy on held-out language text, with chance and optimal levels.

    Every word after the first of each text is predicted (each word and ``"."`` is one token).
    ``optimal`` is the accuracy of the Bayes-optimal predictor on the same positions;
    ``chance`` is one over the number of distinct words.
    """
    rng = random.Random(seed)
    correct = optimal = total = 0
    for _ in range(n_texts):
        txt = grammar.text(rng)
        words = grammar.words_of(txt)
        ids = tokenizer(txt).input_ids  # bos, the first word, then one token per word
        first = len(ids) - len(words)  # index of the first word's last token
        if first < 1:
            raise ValueError("language words must be single tokens")
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        pred = logits.argmax(-1)
        for i in range(1, len(words)):
            total += 1
            correct += int(pred[first + i - 1] == ids[first + i])
            dist = grammar.next_word_distribution(words[:i])
            optimal += int(max(dist, key=dist.get) == words[i])
    n_types = len(grammar.WORDS) + len(grammar.MARKERS) + 1
    return {"accuracy": correct / total, "optimal": optimal / total, "chance": 1 / n_types,
            "positions": total}


@torch.no_grad()
def reachable_targets(model: Any, tokenizer: Any, state: Sequence[str]) -> dict:
    """Which next words a one-token control prompt ``u`` can force after ``state``.

    Tries every vocabulary token ``u`` in ``<bos> u state`` and records the argmax next token.
    Returns ``reachable`` (language words forced by some ``u``), ``by_construction`` (words that
    follow ``state`` under some topic) and ``unforced`` (the argmax with no control prompt).
    """
    body = tokenizer(" " + " ".join(state), add_special_tokens=False).input_ids
    bos = tokenizer.bos_token_id
    vocab = len(tokenizer)
    logits = last_logits(model, [[bos, u, *body] for u in range(vocab)], batch_size=256)
    top = set(logits.argmax(-1).tolist())
    words = {w: i for w, i in zip(grammar.WORDS, word_ids(tokenizer, grammar.WORDS),
                                  strict=True)}
    reachable = sorted(w for w, i in words.items() if i in top)
    possible = {w for m in grammar.MARKERS for w in grammar.successors(list(state), m)}
    unforced = last_logits(model, [[bos, *body]]).argmax(-1).item()
    return {"reachable": reachable, "by_construction": sorted(possible),
            "unforced": tokenizer.decode([unforced]).strip()}
