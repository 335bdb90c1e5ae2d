"""Organism v5 experiment: conflict following by the claim's distance from the question, and
PASTA's gain (profiled heads, alpha 0.01 / 0.001 / 1e-4, all heads, per layer).

    python scripts/measure_v5.py            # the model in promptscope/organism/model
"""
import random, sys, time
import torch
import promptscope
from promptscope.organism.world import qa_example, template_rows, STEERING_TEMPLATE, COLORS
torch.set_num_threads(2)
path = sys.argv[1] if len(sys.argv) > 1 else "organism"
m = promptscope.load_model(path, alias="org5")
CH = [f" {c}" for c in COLORS]

def conflicts(n, seed):
    rng = random.Random(seed)
    return [qa_example(rng, kind="conflict", attribute="color") for _ in range(n)]

def table(exs):
    rows = template_rows(exs)
    rows["pos"] = [e.n_distractors - e.relevant_index for e in exs]
    return rows

def follow(rows, steer=None):
    run = promptscope.run_prompt(STEERING_TEMPLATE, m, vars=rows, choices=CH, steer=steer,
                                 save=False, progress=False)
    top = run.df[run.df["chosen"]].sort_values("variant")
    hit = (top["choice"].values == rows["answer"].values)
    prior = (top["choice"].values == rows["prior"].values)
    return hit, prior

test = table(conflicts(400, 202))
t0 = time.time()
hit, prior = follow(test)
print(f"unsteered: context {hit.mean():.3f}  prior {prior.mean():.3f}  ({time.time()-t0:.0f}s)")
for p in range(6):
    sel = (test["pos"] == p).values
    print(f"  claim {p} sentences before the question: context {hit[sel].mean():.2f} (n={sel.sum()})")
prof_rows = table(conflicts(64, 101))
prof = promptscope.profile_heads(STEERING_TEMPLATE, prof_rows, m, answer="answer", choices=CH,
                                 save=False, progress=False)
ranked = prof.df.sort_values(["d_accuracy", "d_logprob"], ascending=False)
print(ranked.head(8)[["layer", "head", "d_accuracy", "d_logprob"]].to_string())
for k in (1, 2, 4, 8):
    heads = [(int(r.layer), int(r.head)) for r in ranked.head(k).itertuples()]
    for alpha in (0.01,):
        h, _ = follow(test, {"heads": heads, "alpha": alpha})
        far = (test["pos"] >= 2).values
        print(f"PASTA top-{k} alpha {alpha}: context {h.mean():.3f} ({(h.mean()-hit.mean())*100:+.1f}), far claims {h[far].mean():.2f} vs {hit[far].mean():.2f}", flush=True)
h, _ = follow(test, {"heads": "all", "alpha": 0.01})
print(f"PASTA all heads: {h.mean():.3f} ({(h.mean()-hit.mean())*100:+.1f})")
for layer in range(4):
    h, _ = follow(test, {"heads": f"L{layer}", "alpha": 0.01})
    print(f"PASTA layer {layer}: {h.mean():.3f} ({(h.mean()-hit.mean())*100:+.1f})", flush=True)

# strong alpha (near hard masking of the other tokens), and a fresh held-out draw
prof_rows = table(conflicts(200, 101))  # a larger profile set
prof = promptscope.profile_heads(STEERING_TEMPLATE, prof_rows, m, answer="answer", choices=CH, save=False, progress=False)
ranked = prof.df.sort_values(["d_accuracy", "d_logprob"], ascending=False)
far = (test["pos"] >= 2).values
for k in (4, 6, 8):
    heads = [(int(r.layer), int(r.head)) for r in ranked.head(k).itertuples()]
    for alpha in (1e-4, 1e-6):
        h, _ = follow(test, {"heads": heads, "alpha": alpha})
        print(f"top-{k} alpha {alpha}: {h.mean():.3f} ({(h.mean()-hit.mean())*100:+.1f}); far {h[far].mean():.2f} vs {hit[far].mean():.2f}", flush=True)
for alpha in (1e-3, 1e-4):
    h, _ = follow(test, {"heads": "all", "alpha": alpha})
    print(f"all heads alpha {alpha}: {h.mean():.3f} ({(h.mean()-hit.mean())*100:+.1f})", flush=True)
    h, _ = follow(test, {"heads": "L2", "alpha": alpha})
    print(f"layer 2 alpha {alpha}: {h.mean():.3f} ({(h.mean()-hit.mean())*100:+.1f})", flush=True)
# held-out on a fresh draw to avoid selection on the test set
test2 = table(conflicts(400, 303))
hit2, _ = follow(test2)
heads = [(int(r.layer), int(r.head)) for r in ranked.head(6).itertuples()]
h2, _ = follow(test2, {"heads": heads, "alpha": 1e-4})
print(f"fresh 400: unsteered {hit2.mean():.3f}, top-6 alpha 1e-4 {h2.mean():.3f} ({(h2.mean()-hit2.mean())*100:+.1f})")
