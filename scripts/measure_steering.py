"""Measure vector steering on the model organism (the numbers in docs/steering.md).

1. Context vs prior (conflicting contexts, 0-5 distractors, colour and city questions):
   a contrastive vector (CAA) from the model's own behaviour on 200 training questions (the
   questions it answered from the context vs from memory, last prompt token), swept over layers
   and strengths on 200 held-out questions; control: 100 questions without context (the prior
   is right). An ICV from demonstrations (x = question, y = question + context answer).
2. ICV vs few-shot prompting: the same held-out conflicts zero-shot, with 1 and 3 demonstrations
   answered from the context, and zero-shot + ICV; prompt lengths in tokens.
3. ICV vs few-shot on the organism's classification task (a training format and unseen ones).

    python scripts/measure_steering.py          # about 10 minutes on 2 shared CPU cores
"""

from __future__ import annotations

import random

import torch

import promptscope
from promptscope.organism.classify import classification_dataset, plausible_formats
from promptscope.organism.world import ATTRIBUTES, qa_example


def conflicts(n: int, seed: int, max_distractors: int = 5) -> list:
    rng = random.Random(seed)
    return [qa_example(rng, kind="conflict", n_distractors=rng.randint(0, max_distractors))
            for _ in range(n)]


def main() -> None:
    torch.set_num_threads(2)
    m = promptscope.load_model("organism")

    def answers(prompts: list[str], exs: list) -> list[str]:
        ps, conts = [], []
        for p, ex in zip(prompts, exs):
            for v in ATTRIBUTES[ex.attribute]:
                ps.append(p)
                conts.append(" " + v)
        scores = m.score(ps, conts)
        out, k = [], 0
        for ex in exs:
            vals = ATTRIBUTES[ex.attribute]
            lps = [s.logprob for s in scores[k:k + len(vals)]]
            k += len(vals)
            out.append(vals[max(range(len(vals)), key=lambda i: lps[i])])
        return out

    def rate(prompts: list[str], exs: list, field: str = "context_value") -> float:
        got = answers(prompts, exs)
        return sum(a == getattr(e, field) for a, e in zip(got, exs)) / len(exs)

    train, test = conflicts(200, 101), conflicts(200, 202)
    rng = random.Random(303)
    control = [qa_example(rng, kind="none") for _ in range(100)]
    tp = [e.prompt for e in test]

    def evaluate() -> tuple[float, float]:
        return rate(tp, test), rate([e.prompt for e in control], control, "prior")

    print("1. context vs prior: (context-following on 200 held-out, control accuracy)")
    print("   unsteered", evaluate(), flush=True)
    got = answers([e.prompt for e in train], train)
    pos = [e.prompt for a, e in zip(got, train) if a == e.context_value]
    neg = [e.prompt for a, e in zip(got, train) if a == e.prior]
    caa = promptscope.contrastive_vector(pos, neg, m)
    print(f"   CAA from {len(pos)} context-following and {len(neg)} prior answers; norms "
          f"{ {k: round(v) for k, v in caa.norms().items()} }")
    for layers in ([1], [2], [3], [0, 1, 2, 3]):
        for s in (1, 2, 3, 4):
            with promptscope.steer(m, vector=caa, strength=s, layers=layers):
                print(f"   CAA layers {layers} strength {s}", evaluate(), flush=True)
    icv = promptscope.in_context_vector(
        [(e.prompt, e.prompt + " " + e.context_value) for e in train[:64]], m)
    print("2. ICV vs few-shot (context-following on the same 200; mean prompt tokens)")
    ntok = sum(len(m.encode_prompt(p)) for p in tp) / len(tp)
    print(f"   zero-shot {rate(tp, test):.3f} ({ntok:.0f} tokens)")
    pool = conflicts(64, 909, max_distractors=2)
    rng = random.Random(1)
    for k in (1, 3):
        ps = ["\n\n".join(d.prompt + " " + d.context_value for d in rng.sample(pool, k))
              + "\n\n" + e.prompt for e in test]
        ntok = sum(len(m.encode_prompt(p)) for p in ps) / len(ps)
        print(f"   {k}-shot {rate(ps, test):.3f} ({ntok:.0f} tokens)", flush=True)
    for lam in (0.05, 0.1, 0.2, 0.4):
        with promptscope.steer(m, vector=icv, strength=lam):
            print(f"   zero-shot + ICV lambda {lam}: {rate(tp, test):.3f}", flush=True)

    print("3. ICV vs few-shot on classification (accuracy on 100 queries)")
    queries, pool_df = classification_dataset(100, seed=7), classification_dataset(64, seed=8)
    gold = list(queries["label"])

    def acc(prompts: list[str]) -> float:
        sc = m.score([p for p in prompts for _ in (0, 1)], [" yes", " no"] * len(prompts))
        pred = ["yes" if sc[2 * i].logprob > sc[2 * i + 1].logprob else "no"
                for i in range(len(prompts))]
        return sum(p == g for p, g in zip(pred, gold)) / len(gold)

    fmts = plausible_formats(8)
    for fi, fmt in enumerate(fmts[:1] + fmts[3:6]):
        zero = [fmt.render_prompt(pool_df.iloc[:0], q) for _, q in queries.iterrows()]
        r = random.Random(fi)
        few = [fmt.render_prompt(pool_df.iloc[r.sample(range(len(pool_df)), 3)], q)
               for _, q in queries.iterrows()]
        pairs = [(fmt.render_example(row, 0, with_label=False), fmt.render_example(row, 0))
                 for _, row in pool_df.iloc[:32].iterrows()]
        vec = promptscope.in_context_vector(pairs, m)
        row = {"format": "training" if fi == 0 else f"unseen {fi}", "zero-shot": acc(zero),
               "3-shot": acc(few),
               "tokens": (sum(len(m.encode_prompt(p)) for p in zero) // len(zero),
                          sum(len(m.encode_prompt(p)) for p in few) // len(few))}
        for lam in (0.05, 0.1, 0.2, 0.4):
            with promptscope.steer(m, vector=vec, strength=lam):
                row[f"ICV {lam}"] = acc(zero)
        print("  ", row, flush=True)


if __name__ == "__main__":
    main()
