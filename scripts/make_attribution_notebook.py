"""Write notebooks/05_attribution.ipynb (attribution on the model organism).

Run ``python scripts/make_attribution_notebook.py`` to regenerate it, then execute it once
(``jupyter nbconvert --execute --inplace``, or the notebook test) to check it.
"""

from __future__ import annotations

from nbformat.v4 import new_code_cell, new_markdown_cell
from notebook_cells import NOTEBOOKS, Cells

OUT = NOTEBOOKS / "05_attribution.ipynb"

CELLS = [
    new_markdown_cell("""\
# Attribution: which parts of the prompt carry the answer

`promptscope.attribute` (and `%%prompt --attribute`) asks captum how much each part of a template
adds to the log-probability of an answer: every `{variable}`, alternatives group, `<<emphasised>>`
span and the fixed text between them (`level="parts"`, by ablation, Shapley sampling or
KernelSHAP), or every token (`level="tokens"`, integrated gradients on the embeddings).

We use the bundled model organism, which answers questions about made-up people from a context of
a few sentences. Two kinds of question matter here:

* **novel** people: the model has never seen them, so only the one relevant context sentence
  holds the answer;
* **conflict**: the context contradicts what the model memorised (its prior).

The question of this notebook: when PASTA steers attention to the relevant sentence, does the
attribution move to that sentence?"""),
    new_code_cell("""\
%load_ext promptscope
import random
import promptscope
from promptscope.organism import world
from promptscope.viz import attribution as viz

%promptscope model organism"""),
    new_markdown_cell("""\
## One question, part by part

`world.template_rows` splits each context around its relevant sentence (`before`, `key`,
`after`). Attribution needs every part to hold text (an empty part has nothing to attribute, and
promptscope says so), so we keep questions whose relevant sentence sits between distractors.
The target `{answer}` is filled from each row: the value the context states."""),
    new_code_cell("""\
def questions(kind, n, seed):
    rng = random.Random(seed)
    rows = world.template_rows([world.qa_example(rng, kind=kind, attribute="color")
                                for _ in range(6 * n)])
    return rows[(rows.before != "") & (rows.after != "")].head(n).reset_index(drop=True)

novel, conflict = questions("novel", 30, seed=3), questions("conflict", 30, seed=4)
TEMPLATE = world.STEERING_TEMPLATE
one = novel.head(1)
print(TEMPLATE)
one"""),
    new_code_cell("""\
%%prompt --attribute --vars one --target "{answer}" -o first --name "one question"
Context: {before}<<{key}>>{after}
Question: {question}
Answer:"""),
    new_markdown_cell("""\
Red parts raise the log-probability of the answer, blue parts lower it (hover for the values,
in log-prob units: how much removing the part would lower it). Removing `\\nAnswer:` breaks the
question format, so the fixed text at the end always carries a large share.

## Three methods, and tokens

Ablation removes one part at a time; Shapley sampling averages a part's effect over random
orders of the other parts; integrated gradients (`ig`) integrates the gradient from the pad
token's embedding to each token's embedding, here summed per part."""),
    new_code_cell("""\
import pandas as pd

methods = {m: promptscope.attribute(TEMPLATE, vars=one, target="{answer}", method=m, progress=False,
                                    save=False, **({"n_samples": 10} if m == "shapley" else {}))
           for m in ("ablation", "shapley", "ig")}
pd.DataFrame({m: r.df.set_index("part")["attribution"] for m, r in methods.items()}).round(3)"""),
    new_code_cell("""\
tokens = promptscope.attribute(TEMPLATE, vars=one, target="{answer}", level="tokens",
                               progress=False, name="one question, tokens")
viz.heatmap(tokens)"""),
    new_markdown_cell("""\
## Does attribution follow PASTA?

Attribute the context's answer on 30 novel and 30 conflicting questions, each plain and under
PASTA (`steer={..., "compare": True}`) on the five heads that a profile on 48 other conflicting
questions ranks best, at alpha 1e-4 (the setting that moves this organism's answers on
conflicts most, `docs/organism.md`)."""),
    new_code_cell("""\
colors = [f" {c}" for c in world.ATTRIBUTES["color"]]
promptscope.profile_heads(TEMPLATE, questions("conflict", 48, seed=5), choices=colors,
                          alpha=1e-4, name="conflict heads", progress=False)
STEER = {"heads": "profile:conflict heads:5", "alpha": 1e-4, "compare": True}
runs = {kind: promptscope.attribute(TEMPLATE, vars=rows, target="{answer}", steer=STEER,
                                    name=f"attribution {kind} plain vs PASTA")
        for kind, rows in [("novel", novel), ("conflict", conflict)]}

def table(run):
    df = run.df
    parts = df.pivot_table(index="part", columns="steered", values="attribution", sort=False)
    parts.columns = ["plain", "PASTA"]
    return parts

pd.concat({kind: table(run) for kind, run in runs.items()}, axis=1).round(3)"""),
    new_code_cell("""\
for kind, run in runs.items():
    df = run.df
    emph = df[df.part == "emphasis"].pivot_table(index="variant", columns="steered",
                                                 values="attribution")
    context = df[df.part.isin(["before", "after"])]
    other = context.groupby(["steered", "variant"])["attribution"].sum()
    lp = df.groupby("steered")["logprob"].mean()
    up = (emph[True] > emph[False]).mean()
    print(f"{kind:8s} key sentence: plain {emph[False].mean():+.3f}, PASTA "
          f"{emph[True].mean():+.3f} (higher under PASTA for {up:.0%} of {len(emph)}); "
          f"distractors: {other[False].mean():+.3f} -> {other[True].mean():+.3f}; "
          f"log-prob of the context answer {lp[False]:.2f} -> {lp[True]:.2f}")"""),
    new_code_cell("""\
runs["novel"].figure()"""),
    new_code_cell("""\
viz.across_variants(runs["novel"], parts=["emphasis", "before", "after"])"""),
    new_code_cell("""\
viz.heatmap(runs["novel"], variant=0, steered=False)"""),
    new_code_cell("""\
viz.heatmap(runs["novel"], variant=0, steered=True)"""),
    new_markdown_cell("""\
**What the numbers say** (the line printed above; `docs/attribution.md` records a run). In this
organism the relevant sentence carries most of the attribution of the context's answer in every
condition (about +4.5 log-prob units for novel people, +5.4 on conflicts): removing it is what
loses the answer. PASTA on the profiled heads raises that sentence's attribution further (for
83 % of the novel questions and every conflict in the run we recorded; +5.375 -> +6.952 on
conflicts), takes away most of the harm the distractor sentences did (-1.05 -> -0.08 on
conflicts), and makes the context's answer near certain (log-prob -1.65 -> -0.07 on conflicts,
-0.55 -> -0.02 on novel people): the answer now depends more on the sentence PASTA emphasised,
as it should.

## Mistakes get a short message"""),
    new_code_cell("""\
%%prompt --attribute --target " red"
Say {{|please }}hello to Ann""", metadata={"tags": ["raises-exception"]}),
]


def main() -> None:
    Cells(CELLS).write(OUT)


if __name__ == "__main__":
    main()
