"""Write notebooks/03_sensitivity.ipynb (no outputs; CI executes it).

    python scripts/make_sensitivity_notebook.py            # write
    python scripts/make_sensitivity_notebook.py --execute /tmp/03.ipynb  # and run a copy
"""

from __future__ import annotations

import argparse
import time

import nbformat
from notebook_cells import NOTEBOOKS, Cells

PATH = NOTEBOOKS / "03_sensitivity.ipynb"

CELLS: list[tuple[str, str]] = [
    ("md", """# Prompt sensitivity: FormatSpread, POSIX and label-free prompt selection

*"My model scores 71 % with this prompt — how much of that is the prompt's surface form, and which
form should I report or ship?"*

This notebook asks that of the bundled **model organism**, a 1.25 M-parameter llama trained on a
few-shot classification task in only three surface formats (see `docs/organism.md`), so a real
format sensitivity exists by construction. Everything runs on CPU in under a minute:

1. **FormatSpread** — accuracy across plausible, meaning-preserving formats; the interval and the
   spread; a Thompson-sampling search that finds the best and worst formats on a budget; which
   atomic change matters.
2. **POSIX** — the prompt sensitivity index by variant type (spelling noise, templates,
   paraphrases).
3. **Label-free prompt selection** — mutual information with calibration by marginalisation,
   compared with the oracle."""),
    ("code", """import promptscope
from promptscope.analyses.sensitivity.formats import FormatGrammar, PromptFormat
from promptscope.organism.classify import TRAIN_FORMATS, classification_dataset, plausible_formats

%load_ext promptscope
model = promptscope.load_model("organism")"""),
    ("md", """## 1. FormatSpread

The task: each example has an `item` and a `color`; the label is `yes`/`no` by a hidden rule.
Every query gets three labelled demonstrations (the same ones in every format). A format is a
value — casing of the descriptors, separator, field and example joiners, enumeration, answer
name — and prints as the exact text it produces. The organism's own training-time formats are
expressible in the grammar exactly (`PromptFormat.from_organism`)."""),
    ("code", """data = classification_dataset(48, seed=7)
formats = [PromptFormat.from_organism(f) for f in plausible_formats(12)]  # 3 seen + 9 unseen
print(formats[4])          # the exact text, with placeholders
print("---")
print(formats[4].pattern(["item", "color"], shots=2))"""),
    ("md", """Every format on every query (exhaustive, 12 × 48 = 576 evaluations), choices scored by
log-probability, all prompts of a round in one batched backend call:"""),
    ("code", """spread = promptscope.format_spread(data, model, formats=formats, shots=3,
                                   name="organism spread")
p = spread.params
print(f"accuracy interval {p['interval'][0]:.2f} .. {p['interval'][1]:.2f}: "
      f"spread {p['spread'] * 100:.0f} points over {p['n_formats']} formats "
      f"({p['evaluations']} evaluations)")
spread.figure()"""),
    ("code", """spread.summary().head(6)"""),
    ("md", """The three training formats (ids 0-2) sit at the top; unseen formats fall to about
chance. **Reporting a single format's accuracy would be anywhere in that interval.**

### Finding the extremes on a budget

The Thompson-sampling search spends at most a quarter of the exhaustive budget on the formats
that may still be the best or the worst (top-two Thompson sampling on each format's accuracy over
all examples; formats whose bounds rule them out are set aside; formats compared on the same
examples), and stops early once both sides are settled:"""),
    ("code", """search = promptscope.format_spread(data, model, formats=formats, shots=3,
                                   budget=0.25, batch=12, name="organism spread, bandit")
truth = spread.tables["formats"]["accuracy"]
q = search.params
print(f"bandit: {q['evaluations']} of {q['exhaustive_evaluations']} evaluations "
      f"({q['fraction_of_exhaustive']:.0%})")
print(f"named best  #{q['best']['format']} (true accuracy {truth[q['best']['format']]:.2f}; "
      f"true best {truth.max():.2f})")
print(f"named worst #{q['worst']['format']} (true accuracy {truth[q['worst']['format']]:.2f}; "
      f"true worst {truth.min():.2f})")
from promptscope.viz.format_spread import convergence, features_figure
convergence(search)"""),
    ("md", """### Which atomic change matters

Mean accuracy of the formats with each feature value, against the mean format (from the
exhaustive run):"""),
    ("code", """features_figure(spread)"""),
    ("md", """Sampled formats seldom differ in one feature alone, so for the atomic changes
themselves take a training format and every format one change away from it
(`FormatGrammar.neighbours`). `atomic` then averages the accuracy change over each pair of
formats that differs in that feature alone (`pairs` of them):"""),
    ("code", """import pandas as pd
center = formats[0]
near = FormatGrammar.organism().neighbours(center, inputs=["item", "color"])
atomic = promptscope.format_spread(data, model, formats=[center, *near], shots=3,
                                   name="organism atomic changes")
print(f"{center.key()} and its {len(near)} neighbours")
pd.DataFrame(atomic.params["atomic"]).T.round(3)"""),
    ("md", """The same from the magic, sampling formats from the organism's grammar (the magic
is a thin parser over `format_spread`):"""),
    ("code", "%promptscope spread data --grammar organism --formats 8 --budget 0.3 -o magic "
             "--no-save\n"
             'print(magic.params["interval"], magic.params["evaluations"])'),
    ("md", """## 2. POSIX by variant type

For each entity, an intent-preserving set of prompts per variant type; the responses are the
model's own greedy answers; POSIX is the mean over ordered pairs of the per-token change in a
response's log-likelihood when its prompt is replaced by another of the set."""),
    ("code", """from promptscope.organism.world import ENTITIES, FACTS

entities = [{"entity": e} for e in ENTITIES if e in FACTS][:6]
sens = promptscope.posix(
    entities, model, template="Question: What color is {entity}?\\nAnswer:",
    templates=["Q: What color is {entity}?\\nA:", "What color is {entity}?\\nAnswer:",
               "QUESTION: What color is {entity}?\\nANSWER:"],
    paraphrases=["Question: Which color does {entity} have?\\nAnswer:",
                 "Question: What is the color of {entity}?\\nAnswer:",
                 "Question: Tell me the color of {entity}.\\nAnswer:"],
    n_variants=4, max_new_tokens=4, name="organism POSIX")
for kind, value in sens.params["posix"].items():
    print(f"POSIX {kind:<10} {value:.3f}")
sens.figure()"""),
    ("code", """from promptscope.viz.posix import heatmap
heatmap(sens, "template")"""),
    ("code", """v = sens.tables["variants"]
v[v["item"] == 0][["type", "prompt", "response"]]"""),
    ("md", """## 3. Label-free prompt selection

Rank eight candidate formats by the mutual information between input and output — no labels —
with CBM calibration; the labels are used only to compare the pick with the oracle."""),
    ("code", """pool = classification_dataset(32, seed=21)
candidates = formats[:8]
pick = promptscope.select_prompt(candidates, pool, model, choices=["yes", "no"], label="label",
                                 name="organism selection")
s = pick.params
print(f"selected #{s['selected']} (accuracy {s['accuracy_selected']:.2f}); oracle "
      f"#{s['oracle']} ({s['accuracy_oracle']:.2f}); effectiveness {s['effectiveness']:.2f}; "
      f"rank correlation of MI with accuracy {s['rank_correlation']:.2f}")
pick.figure()"""),
    ("md", """## Watch the search converge

The widget runs the same search with the budget, number of formats and model you pick, and
redraws the per-format estimates and the best/worst trace after every round."""),
    ("code", """from promptscope.widgets import SpreadWidget

widget = SpreadWidget(data.head(16), models=[model], budget=0.3, n_formats=5, shots=3, batch=8,
                      grammar=FormatGrammar.organism(), save=False)
widget.run()
widget"""),
    ("md", """Every run above is a saved session (`%promptscope sessions`, or the sessions
panel):"""),
    ("code", """promptscope.sessions(limit=5)[["name", "kind", "status", "n_rows"]]"""),
]


def build() -> nbformat.NotebookNode:
    return Cells.of(CELLS).notebook()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--execute", metavar="OUT", help="also run a copy with nbclient and save the "
                    "executed copy here (the committed notebook has no outputs)")
    args = ap.parse_args()
    nb = build()
    nbformat.write(nb, PATH)
    print(f"wrote {PATH}")
    if args.execute:
        import tempfile

        from nbclient import NotebookClient

        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            NotebookClient(nb, timeout=600, kernel_name="python3",
                           resources={"metadata": {"path": tmp}}).execute()
        print(f"executed in {time.perf_counter() - t0:.0f} s")
        for cell in nb.cells:
            for out in cell.get("outputs", []):
                if out.get("output_type") == "stream" and out.get("name") == "stdout":
                    print(out["text"], end="")
        nbformat.write(nb, args.execute)


if __name__ == "__main__":
    main()
