"""Measure the three built-in effects of the model organism (the numbers in docs/organism.md).

Usage::

    python scripts/measure_organism.py                       # the shipped model
    python scripts/measure_organism.py --model /tmp/organism --json /tmp/organism.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from promptscope.organism import MODEL_DIR  # noqa: E402
from promptscope.organism.measure import (  # noqa: E402
    answer_choices,
    conflict_examples,
    context_following,
    format_accuracies,
    grammar_accuracy,
    profile_heads,
    reachable_targets,
)
from promptscope.organism.world import qa_example  # noqa: E402

PROFILE_SEED, HELDOUT_SEED = 101, 202


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL_DIR)
    parser.add_argument("--n-profile", type=int, default=200)
    parser.add_argument("--n-heldout", type=int, default=1000)
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    start = time.time()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    res: dict = {}

    # Effect 1: context vs prior, and PASTA head steering.
    rng = random.Random(HELDOUT_SEED + 1)
    for kind in ("none", "distractors", "agree"):
        exs = [qa_example(rng, kind=kind) for _ in range(300)]
        answers = answer_choices(model, tok, exs)
        res[f"qa_{kind}_accuracy"] = sum(a == e.target for a, e in
                                         zip(answers, exs, strict=True)) / len(exs)
    profile = conflict_examples(args.n_profile, PROFILE_SEED)
    heldout = conflict_examples(args.n_heldout, HELDOUT_SEED)
    res["conflict_unsteered_profile"] = context_following(model, tok, profile)["context"]
    base = context_following(model, tok, heldout)
    res["conflict_unsteered"] = base
    by_n = {}
    answers = answer_choices(model, tok, heldout)
    for n in range(6):
        sel = [(a, e) for a, e in zip(answers, heldout, strict=True) if e.n_distractors == n]
        by_n[n] = round(sum(a == e.context_value for a, e in sel) / max(1, len(sel)), 3)
    res["conflict_unsteered_by_distractors"] = by_n
    heads = profile_heads(model, tok, profile, args.alpha)
    res["head_profile"] = heads.to_dict("records")
    ranked = [(int(r.layer), int(r.head)) for r in heads.itertuples()]
    best_k, best = 1, -1.0
    for k in range(1, 6):
        rate = context_following(model, tok, profile, ranked[:k], args.alpha)["context"]
        if rate > best:
            best_k, best = k, rate
    chosen = ranked[:best_k]
    steered = context_following(model, tok, heldout, chosen, args.alpha)
    res["steering"] = {"heads": chosen, "alpha": args.alpha, "profile_context": best,
                       "heldout": steered,
                       "gain_points": round(100 * (steered["context"] - base["context"]), 1)}
    # The same on the easier regime of 0-1 distractors (profiled and measured on it).
    profile_easy = conflict_examples(args.n_profile, PROFILE_SEED, max_distractors=1)
    heldout_easy = conflict_examples(args.n_heldout, HELDOUT_SEED, max_distractors=1)
    ranked_easy = [(int(r.layer), int(r.head)) for r in
                   profile_heads(model, tok, profile_easy, args.alpha).itertuples()]
    base_easy = context_following(model, tok, heldout_easy)
    res["easy_0_1_distractors"] = {
        "unsteered": base_easy,
        "steered": {k: context_following(model, tok, heldout_easy, ranked_easy[:k],
                                          args.alpha)["context"] for k in (1, 2, 3, 4)},
        "ranked_heads": ranked_easy[:4]}
    rng = random.Random(HELDOUT_SEED + 2)
    novel = [qa_example(rng, kind="novel") for _ in range(300)]
    res["novel_accuracy"] = sum(a == e.target for a, e in
                                zip(answer_choices(model, tok, novel), novel, strict=True)) / 300
    res["novel_accuracy_steered_layer0"] = sum(
        a == e.target for a, e in zip(answer_choices(model, tok, novel, [(0, h) for h in range(
            model.config.num_attention_heads)], args.alpha), novel, strict=True)) / 300
    all_heads = [(layer, h) for layer in range(model.config.num_hidden_layers)
                 for h in range(model.config.num_attention_heads)]
    res["steering_all_heads"] = context_following(model, tok, heldout, all_heads, args.alpha)

    # Effect 2: format spread.
    fmts = format_accuracies(model, tok, n_queries=100, seed=7)
    res["formats"] = fmts.to_dict("records")
    res["format_spread_points"] = round(100 * (fmts.accuracy.max() - fmts.accuracy.min()), 1)

    # Effect 3: controllability of the language.
    res["grammar"] = grammar_accuracy(model, tok, n_texts=100, seed=5)
    from promptscope.organism import grammar

    grng = random.Random(9)
    reach = []
    for _ in range(5):
        words = grammar.words_of(grammar.text(grng, 1))
        reach.append({"state": words[2:4], **reachable_targets(model, tok, words[2:4])})
    res["reachability"] = reach

    # Chat template.
    msgs = [{"role": "user", "content": "What color is Brafu?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    res["chat_example"] = tok.decode(out[0, ids["input_ids"].shape[1]:])
    res["seconds"] = round(time.time() - start, 1)
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
