"""Measure attribution on the model organism (the numbers in docs/attribution.md).

    python scripts/measure_attribution.py [--n 100] [--json out.json]

1. Does attribution follow PASTA? Novel-entity and conflicting-context colour questions, the
   context's answer attributed to the template parts by ablation, plain and with PASTA on the
   five heads a profile on 48 other conflicting questions ranks best (alpha 1e-4).
2. Time per variant of each method (10 novel questions).
3. captum's default token-by-token forward with a KV cache vs one teacher-forced pass.
4. Does integrated gradients add up? The completeness gap (``ig_gap``) on 20 novel and 20
   conflicting questions at fixed 16, 32 and 64 steps and with the default doubling.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import warnings

import torch

import promptscope
from promptscope.analyses.heads import top_heads
from promptscope.organism import world


def questions(kind: str, n: int, seed: int):  # noqa: ANN201
    rng = random.Random(seed)
    rows = world.template_rows([world.qa_example(rng, kind=kind, attribute="color")
                                for _ in range(6 * n)])
    return rows[(rows.before != "") & (rows.after != "")].head(n).reset_index(drop=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--json")
    args = ap.parse_args()
    model = promptscope.load_model("organism")
    tpl = world.STEERING_TEMPLATE
    out: dict = {"n": args.n, "threads": torch.get_num_threads()}
    colors = [f" {c}" for c in world.ATTRIBUTES["color"]]
    profile = promptscope.profile_heads(tpl, questions("conflict", 48, 15), model, choices=colors,
                                        alpha=1e-4, save=False, progress=False)
    heads = top_heads(profile.df, 5)
    out["heads"] = {str(layer): hs for layer, hs in heads.items()}

    for kind, seed in (("novel", 13), ("conflict", 14)):
        rows = questions(kind, args.n, seed)
        t0 = time.perf_counter()
        run = promptscope.attribute(tpl, model, vars=rows, target="{answer}", save=False,
                                    steer={"heads": heads, "alpha": 1e-4, "compare": True},
                                    progress=False)
        took = time.perf_counter() - t0
        df = run.df
        emph = df[df.part == "emphasis"].pivot_table(index="variant", columns="steered",
                                                     values="attribution")
        ctx = df[df.part.isin(["before", "after"])].groupby(["steered", "variant"])[
            "attribution"].sum()
        share = df[df.part == "emphasis"].groupby("steered")["share"].mean()
        lp = df.groupby("steered")["logprob"].mean()
        res = {"questions": len(rows), "seconds": round(took, 1),
               "key_plain": emph[False].mean(), "key_pasta": emph[True].mean(),
               "key_higher_under_pasta": (emph[True] > emph[False]).mean(),
               "key_share_plain": share[False], "key_share_pasta": share[True],
               "distractors_plain": ctx[False].mean(), "distractors_pasta": ctx[True].mean(),
               "logprob_plain": lp[False], "logprob_pasta": lp[True]}
        out[kind] = res
        print(kind, json.dumps({k: round(v, 3) for k, v in res.items()}))

    rows = questions("novel", 10, 23)
    timing = {}
    for method, level, extra in (("ablation", "parts", {}), ("shapley", "parts", {}),
                                 ("kernelshap", "parts", {}), ("ig", "parts", {}),
                                 ("ig", "tokens", {}), ("ablation", "tokens", {})):
        t0 = time.perf_counter()
        promptscope.attribute(tpl, model, vars=rows, target="{answer}", method=method,
                              level=level, save=False, progress=False, **extra)
        timing[f"{method}/{level}"] = round((time.perf_counter() - t0) / len(rows), 3)
    out["seconds_per_variant"] = timing
    print("seconds per variant", timing)

    from captum.attr import FeatureAblation, LLMAttribution, TextTemplateInput

    llm = LLMAttribution(FeatureAblation(model.model), model.tokenizer)
    r = rows.iloc[0]
    inp = TextTemplateInput("Context: {}{}{}\nQuestion: {}\nAnswer:",
                            values=[r.before, r.key, r.after, r.question])
    target = torch.tensor(model.encode_continuation(r.answer + " is"))
    cached = llm._forward_func(None, inp, target, True, None, True)[0, 0].item()
    one_pass = llm._forward_func(None, inp, target, False, None, False)[0, 0].item()
    prompt = f"Context: {r.before}{r.key}{r.after}\nQuestion: {r.question}\nAnswer:"
    scored = model.score([prompt], [r.answer + " is"])[0].logprob
    out["captum_forward"] = {"token_by_token_cached": cached, "one_pass": one_pass,
                             "promptscope_score": scored}
    print("captum forward (2-token target):", out["captum_forward"])

    import pandas as pd

    rows = pd.concat([questions("novel", 20, 33), questions("conflict", 20, 34)],
                     ignore_index=True)
    completeness = {}
    for steps in (16, 32, 64, None):
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the table below says what it would)
            df = promptscope.attribute(tpl, model, vars=rows, target="{answer}", method="ig",
                                       level="tokens", n_steps=steps, save=False,
                                       progress=False).df
        per = df.groupby("variant").agg(gap=("ig_gap", "first"), steps=("ig_steps", "first"),
                                        size=("attribution", lambda a: a.abs().sum()),
                                        lp=("logprob", "first"), start=("baseline_logprob",
                                                                        "first"))
        gap = per["gap"].abs()
        scale = per["size"].combine((per["lp"] - per["start"]).abs(), max)
        completeness[str(steps or "auto")] = {
            "seconds_per_variant": round((time.perf_counter() - t0) / len(rows), 3),
            "gap_median": round(gap.median(), 4), "gap_max": round(gap.max(), 3),
            "over_5pct": int((gap > 0.05 * scale + 1e-4).sum()),
            "steps": {int(k): int(v) for k, v in per["steps"].value_counts().items()}}
    out["ig_completeness"] = completeness
    print("IG completeness (40 questions):", json.dumps(completeness))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
