"""Measure the three built-in effects of the model organism (the numbers in docs/organism.md).

Usage::

    python scripts/measure_organism.py                       # the shipped model
    python scripts/measure_organism.py --model /tmp/organism --json /tmp/organism.json
    python scripts/measure_organism.py --only context        # effect 1 only (faster)

Attention steering is promptscope's own PASTA: heads profiled with
:func:`promptscope.profile_heads` on one held-out set, steered with :func:`promptscope.steer` on
another, disjoint one.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from promptscope.organism import MODEL_DIR  # noqa: E402
from promptscope.organism.measure import (  # noqa: E402
    accuracy,
    as_promptscope_model,
    conflict_examples,
    context_following,
    format_accuracies,
    grammar_accuracy,
    pasta_heads,
    reachable_targets,
)
from promptscope.organism.world import (  # noqa: E402
    ATTRIBUTES,
    ENTITIES,
    FACTS,
    INSTRUCTED_TEMPLATE,
    INSTRUCTIONS,
    qa_example,
    template_rows,
)

PROFILE_SEED, HELDOUT_SEED = 101, 202


def measure_context(model: Any, tok: Any, args: argparse.Namespace) -> dict:
    """Effect 1: prior, retrieval, conflicts (uninstructed / instructed) and PASTA gain."""
    res: dict = {}
    rng = random.Random(HELDOUT_SEED + 1)
    for kind in ("none", "distractors", "agree"):
        res[f"qa_{kind}_accuracy"] = accuracy(model, tok, [qa_example(rng, kind=kind)
                                                           for _ in range(300)])
    rng = random.Random(HELDOUT_SEED + 2)
    novel = [qa_example(rng, kind="novel") for _ in range(300)]
    res["novel_accuracy"] = accuracy(model, tok, novel)

    heldout = conflict_examples(args.n_heldout, HELDOUT_SEED)
    res["conflict_unsteered"] = context_following(model, tok, heldout)
    res["conflict_unsteered_0_1"] = context_following(
        model, tok, conflict_examples(300, HELDOUT_SEED + 3, max_distractors=1))

    # Instructions: each intent, each phrasing, on conflicting contexts (0-5 distractors).
    instructed: dict = {}
    for i, intent in enumerate(INSTRUCTIONS):
        exs = conflict_examples(args.n_heldout // 2, HELDOUT_SEED + 10 + i, intent=intent)
        follow = context_following(model, tok, exs)
        phrasing = {}
        for text in INSTRUCTIONS[intent]:
            sel = [e for e in exs if e.instruction == text]
            phrasing[text] = accuracy(model, tok, sel)
        instructed[intent] = {"follows_instruction": follow[intent], **follow,
                              "by_phrasing": phrasing}
    res["instructed_conflicts"] = instructed
    res["knob"] = measure_knob(model, tok)

    # PASTA with promptscope: profile on one set, choose k there, measure on the held-out set.
    profile = conflict_examples(args.n_profile, PROFILE_SEED)
    t = time.time()
    chosen = pasta_heads(model, tok, profile, max_heads=args.max_heads, alpha=args.alpha)
    res["pasta_profile_seconds"] = round(time.time() - t, 1)
    res["head_profile"] = chosen["profile"].round(4).to_dict("records")
    res["pasta_profile_context_by_k"] = chosen["context_by_k"]
    steered = context_following(model, tok, heldout, chosen["heads"], args.alpha)
    base = res["conflict_unsteered"]
    res["pasta"] = {"heads": chosen["heads"], "alpha": args.alpha,
                    "profile_unsteered": context_following(model, tok, profile)["context"],
                    "heldout": steered,
                    "gain_points": round(100 * (steered["context"] - base["context"]), 1)}
    res["pasta_novel_accuracy"] = accuracy(model, tok, novel, chosen["heads"], args.alpha)
    return res


def measure_knob(model: Any, tok: Any) -> dict:
    """The context-sensitivity knob on the paper's task shape (one context sentence that
    contradicts the memorised value): found from the two intents on the same 100 questions,
    then set at each layer (9 values) on 200 uninstructed held-out questions, and at the layer
    that moves them most on 100 questions with each instruction (does it override them?)."""
    from promptscope import find_knob, knob_sweep

    hf = as_promptscope_model(model, tok)
    prompts = {i: [e.prompt for e in conflict_examples(100, HELDOUT_SEED + 20, max_distractors=0,
                                                       intent=i)]
               for i in INSTRUCTIONS}
    knob = find_knob(prompts["context"], prompts["prior"], hf)

    def sweep(n: int, seed: int, intent: str | None = None, layers: Any = None) -> Any:
        exs = conflict_examples(n, seed, max_distractors=0, intent=intent)
        rows = template_rows(exs).assign(choices=[[f" {v}" for v in ATTRIBUTES[e.attribute]]
                                                  for e in exs])
        return knob_sweep(INSTRUCTED_TEMPLATE, rows, knob, hf, layers=layers, save=False,
                          progress=False)

    plain = sweep(200, HELDOUT_SEED + 21)
    layer = int(plain.summary().layer[0])
    told = {i: sweep(100, HELDOUT_SEED + 22 + k, i, [layer])
            for k, i in enumerate(INSTRUCTIONS)}
    return {"layers": knob.meta["layers"], "baseline": plain.params["baseline"],
            "summary": plain.summary().round(3).to_dict("records"),
            "sweep": plain.df.round(3).to_dict("records"),
            "instructed": {i: {"layer": layer, "baseline": s.params["baseline"],
                               "sweep": s.df.round(3).to_dict("records")}
                           for i, s in told.items()}}


def measure_other(model: Any, tok: Any) -> dict:
    """Effects 2 and 3, and the chat template."""
    res: dict = {}
    fmts = format_accuracies(model, tok, n_queries=100, seed=7)
    res["formats"] = fmts.to_dict("records")
    res["format_train_accuracy"] = fmts[fmts.seen].accuracy.tolist()
    res["format_spread_points"] = round(100 * (fmts.accuracy.max() - fmts.accuracy.min()), 1)

    res["grammar"] = grammar_accuracy(model, tok, n_texts=100, seed=5)
    from promptscope.organism import grammar

    grng = random.Random(9)
    reach = []
    for _ in range(5):
        words = grammar.words_of(grammar.text(grng, 1))
        reach.append({"state": words[2:4], **reachable_targets(model, tok, words[2:4])})
    res["reachability"] = reach

    exact, total = 0, 0
    for entity in ENTITIES[:12]:
        for question, answer in [
            (f"What color is {entity}?", f"{entity} is {FACTS[entity]['color']}."),
            (f"Where does {entity} live?", f"{entity} lives in {FACTS[entity]['city']}."),
        ]:
            ids = tok.apply_chat_template([{"role": "user", "content": question}],
                                          add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)
            out = model.generate(**ids, max_new_tokens=16, do_sample=False)
            reply = tok.decode(out[0, ids["input_ids"].shape[1]:])
            exact += reply == answer + "<|end|>"
            total += 1
            if total == 1:
                res["chat_example"] = reply
    res["chat_exact"] = exact / total
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL_DIR)
    parser.add_argument("--n-profile", type=int, default=150)
    parser.add_argument("--n-heldout", type=int, default=600)
    parser.add_argument("--max-heads", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.01)
    parser.add_argument("--only", choices=("context", "other"), default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    start = time.time()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    res: dict = {"model": str(args.model)}
    if args.only in (None, "context"):
        res.update(measure_context(model, tok, args))
    if args.only in (None, "other"):
        res.update(measure_other(model, tok))
    res["seconds"] = round(time.time() - start, 1)
    text = json.dumps(res, indent=1, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
