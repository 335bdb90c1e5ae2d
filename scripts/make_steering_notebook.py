"""Write notebooks/06_steering_compared.ipynb (no outputs; CI executes it).

    python scripts/make_steering_notebook.py
"""

from notebook_cells import NOTEBOOKS, Cells

cells = Cells()
md, code = cells.md, cells.code


md("""
# Steering compared: PASTA, AutoPASTA, a contrastive vector, an in-context vector and the knob

The model organism follows a context that contradicts what it memorised ("Context: Brafu is
red. ... What color is Brafu?") only about half the time, less often the farther the claim
stands from the question; otherwise it answers its prior colour. Which kind of steering makes
it follow the context, how strongly, and at what cost to everything else? Each method is built
on training questions, swept over its strength on held-out questions, and measured against two side
effects: the log-likelihood of unrelated text (a fluency proxy) and a control task it should
not touch (questions without a context, answered from memory). Every number is measured in this
run; `docs/steering.md` discusses them.
""")
code("""
%load_ext promptscope
import json
import random
import pandas as pd
import torch
import promptscope
from promptscope.organism import MODEL_DIR, grammar, world

model = promptscope.load_model("organism")
values = {a: [f" {v}" for v in vs] for a, vs in world.ATTRIBUTES.items()}  # colours, cities

def conflicts(n, seed, distractors=5):
    \"\"\"Questions whose context contradicts the memorised value (0-5 distractors).\"\"\"
    rng = random.Random(seed)
    exs = [world.qa_example(rng, kind="conflict", n_distractors=rng.randint(0, distractors))
           for _ in range(n)]
    rows = world.template_rows(exs)
    rows["attribute"] = [ex.attribute for ex in exs]
    rows["choices"] = [values[ex.attribute] for ex in exs]  # each row's candidate answers
    return rows

train, held_out = conflicts(160, seed=101), conflicts(100, seed=202)
TEMPLATE = world.STEERING_TEMPLATE  # <<the relevant sentence>>: what PASTA emphasises
print(TEMPLATE)
held_out.head(3)
""")
md("""
## A contrastive steering vector from two groups of `%%prompt` variants

Run the training questions once and split the variants by what the model did: answered from the
context, or from memory. The contrastive vector is the mean difference of the residual stream
at the last prompt token between the two groups (contrastive activation addition).
""")
code("""
runs = [promptscope.run_prompt(TEMPLATE, vars=train[train.attribute == a], choices=values[a],
                               name=f"conflicts (train, {a})", progress=False)
        for a in values]
chosen = pd.concat([r.df[r.df.chosen] for r in runs])
follows = chosen[chosen.choice == chosen.answer]     # answered from the context
ignores = chosen[chosen.choice == chosen.prior]      # answered from memory
caa = promptscope.contrastive_vector(follows, ignores, name="follow the context")
caa.save()
print(f"{len(follows)} variants follow the context, {len(ignores)} answer from memory; "
      f"vector norms per layer: { {k: round(v) for k, v in caa.norms().items()} }")
""")
md("""
## An in-context vector from demonstrations

ICV: for demonstration pairs (x = the question, y = the question answered from the context), the
latent states of x and y at every layer; per layer the ICV is the first principal direction of
their differences, and steering shifts each latent along it with strength lambda, then rescales
it to its own norm.
""")
code("""
demos = [(p, p + a) for p, a in follows[["prompt", "answer"]].itertuples(index=False)]
demos += [(p, p + a) for p, a in ignores[["prompt", "answer"]].head(24).itertuples(index=False)]
icv = promptscope.in_context_vector(demos, name="context ICV")
icv.save()
print(f"{len(demos)} pairs; share of the differences along the ICV per layer: "
      f"{[round(x, 2) for x in icv.meta['explained']]}")
""")
md("""
## The context-sensitivity knob

The organism was also trained with instructions: "Use the context." or "Use what you know." after
the question ("Controllable Context Sensitivity and the Knob Behind It"). Its last training
phase made the intent one variable: an interchange intervention taught it to carry the intent
along a single direction of layer 1's output at the last prompt token (docs/organism.md), so
there is a known knob to find. As in the paper, the task here has one context sentence that
contradicts the memorised value (with distractor sentences, following the context is also
limited by finding the right sentence). Read the residual stream at the last prompt token for
the same questions under the two intents: the unit difference of their means, per layer, is a
candidate knob. Then check it causally: *set* the latent's coordinate along it to a value, one
layer at a time, on uninstructed held-out questions, and watch which source the answers follow.
The layer where the sweep moves the answers most is where the knob lives.
""")
code("""
def instructed(n, seed, intent):
    rng = random.Random(seed)  # same seed: the same questions under either instruction
    return [world.qa_example(rng, kind="conflict", intent=intent, n_distractors=0).prompt
            for _ in range(n)]

knob = promptscope.find_knob(instructed(80, 501, "context"), instructed(80, 501, "prior"),
                             name="context knob")
knob.save()
one_fact = conflicts(100, seed=212, distractors=0)
sweep = promptscope.knob_sweep(TEMPLATE, one_fact, knob, name="knob sweep (organism)",
                               progress=False)
sweep.figure()
""")
code("""
where = sweep.summary()
KNOB_LAYER = int(where.layer[0])
where
""")
md("""
Is it the direction training put there? `training_info.json` records it.
""")
code("""
trained = json.loads((MODEL_DIR / "training_info.json").read_text())["knob"]
found = knob.vectors[trained["layer"]]
cosine = float(found @ torch.tensor(trained["direction"]))
print(f"trained at layer {trained['layer']}; the knob found there: cosine {cosine:.3f}")
""")
md("""
Does the knob override an instruction? Set it at its layer to the lowest value swept ("knob
low") and to the "Use the context." intent's own value ("knob high") on one-fact questions that
carry either instruction, and count the answers that follow the context.
""")
code("""
facts = knob.meta["layers"][str(KNOB_LAYER)]
ends = [sweep.df[sweep.df.layer == KNOB_LAYER].value.min(), facts["positive"]]
rng = random.Random(212)
rows = []
for intent, says in (("context", "Use / Trust the context."),
                     ("prior", "Use what you know. / Trust your memory.")):
    exs = [world.qa_example(rng, kind="conflict", intent=intent, n_distractors=0)
           for _ in range(60)]
    told = world.template_rows(exs).assign(choices=[values[e.attribute] for e in exs])
    r = promptscope.knob_sweep(world.INSTRUCTED_TEMPLATE, told, knob, layers=[KNOB_LAYER],
                               values=ends, save=False, progress=False)
    rows.append({"instruction": says, "follows the context": r.params["baseline"]["context"],
                 "knob low": r.df.context.iloc[0], "knob high": r.df.context.iloc[1]})
pd.DataFrame(rows).round(2)
""")
md("""
Does one direction carry the instruction at all? Activation patching answers it (the paper's
first step): move the last prompt token's state of each "Use what you know." question to that of
its "Use the context." twin after one layer, wholly or only within a few directions fitted on
other pairs (the knob's, or the top principal directions of the differences), and count the
answers that switch to the context's.
""")
code("""
def twins(n, seed):
    rng = random.Random(seed)
    exs = [world.qa_example(rng, kind="conflict", intent="context",
                            n_distractors=rng.randint(0, 5)) for _ in range(n)]
    swap = dict(zip(world.INSTRUCTIONS["context"], world.INSTRUCTIONS["prior"]))
    return exs, [e.prompt.replace(e.instruction, swap[e.instruction]) for e in exs]

exs, told_prior = twins(200, seed=7)
patching = promptscope.intent_patching(
    [e.prompt for e in exs], told_prior, answers=[f" {e.context_value}" for e in exs],
    choices=[values[e.attribute] for e in exs], name="intent patching (organism)",
    progress=False)
patching.figure()
""")
code("""
patching.summary()
""")
md("""
## The comparison

PASTA steers the heads a head profile on the training questions ranks best toward the relevant
sentence; AutoPASTA lets the model name the key sentence inside the whole context first. The
vectors are swept over their strength, the knob over its value at its layer; one method steers
attention and adds the vector at once. The control task is questions without a context (the
prior is the right answer), and the unrelated text comes from the organism's synthetic language.

The curves are measured on all held-out questions. The best point of a noisy curve overstates
its method's gain, so the comparison splits the questions once at random: each method's setting
(the open circle) is picked on half of them, and the summary reports its gain on the other half,
with a 95 % interval for a paired difference of proportions. It also cross-fits: the halves
swap roles, so every question is scored once by a setting picked without it (`d_crossfit`,
over all questions; `value_on_test_rows` is the other half's pick). Its interval redoes the
picks in every bootstrap draw, so it also holds how much the choice of setting itself varies.
""")
code("""
promptscope.profile_heads(TEMPLATE, train.head(64), name="conflict heads", alpha=1e-4,
                          progress=False)
HEADS = "profile:conflict heads:5"
AUTO = "Context: <<{before}{key}{after}>>\\nQuestion: {question}\\nAnswer:{lead}"
rng = random.Random(303)
control = [world.qa_example(rng, kind="none") for _ in range(50)]
control_rows = [{"question": ex.question, "lead": ex.answer_lead, "answer": f" {ex.prior}",
                 "choices": values[ex.attribute]} for ex in control]
gap = facts["positive"] - facts["negative"]
knob_values = [facts["positive"] + k * gap for k in (0.0, 0.5, 1.0)]
texts = [grammar.text(random.Random(400 + i)) for i in range(10)]

cmp = promptscope.compare_steering(
    TEMPLATE, held_out, name="steering compared (organism)",
    control=("Question: {question}\\nAnswer:{lead}", control_rows), text=texts, progress=False,
    methods={
        "PASTA": {"heads": HEADS, "alpha": [0.1, 0.01, 1e-4]},
        "AutoPASTA": {"heads": HEADS, "alpha": [0.01, 1e-4], "auto": True, "template": AUTO},
        "CAA (layer 3)": {"vector": caa, "layers": [3], "strength": [1, 2, 4, 8]},
        "ICV": {"vector": icv, "strength": [0.05, 0.1]},
        "PASTA + CAA": {"method": "pasta+vector", "heads": HEADS, "alpha": 0.01,
                        "vector": caa, "layers": [3], "strength": [2]},
        f"knob (layer {KNOB_LAYER})": {"vector": knob, "layers": [KNOB_LAYER], "start": "last",
                                       "strength": knob_values},
    })
cmp.figure()
""")
code("""
cmp.summary()
""")
code("""
base = cmp.params["baseline"]
n_tune, n_test = len(cmp.params["tune_rows"]), len(cmp.params["test_rows"])
best = cmp.summary().set_index("method")
print(f"Unsteered: {base['accuracy']:.0%} of {len(held_out)} held-out conflicting contexts "
      f"followed ({base['test_accuracy']:.0%} of the {n_test} test questions); control "
      f"{base['control_accuracy']:.0%}. Settings picked on the other {n_tune}.")
for method, row in best.iterrows():
    print(f"{method:>14}: {row.test_accuracy:.0%} ({row.d_test:+.0%}, 95 % "
          f"{row.d_test_low:+.0%} to {row.d_test_high:+.0%}) at {row.setting} {row.value:g}; "
          f"cross-fitted {row.d_crossfit:+.0%} ({row.d_crossfit_low:+.0%} to "
          f"{row.d_crossfit_high:+.0%}); control {row.d_control:+.0%}, "
          f"text log-prob/token {row.d_text:+.3f}")
""")
md("""
## On your own labelled DataFrame

`compare_steering` takes any template and labelled rows. Here the rows are a small yes/no task
(the organism's few-shot classification data, standing in for your own DataFrame) in a prompt
format the model never saw, where it leans to "no": PASTA emphasises the colour field, and a
contrastive vector is built from the training rows the model gets right against those it gets
wrong; both are measured on the other rows.
""")
code("""
from promptscope.organism.classify import classification_dataset

mine = classification_dataset(120, seed=7)           # columns: item, color, label
mine["answer"] = " " + mine["label"]
# your own prompt format (upper-case fields: one the organism never saw in training)
DEMO = "ITEM: apple\\nCOLOR: red\\nANSWER: yes\\n\\nITEM: stone\\nCOLOR: blue\\nANSWER: no\\n\\n"
MY_TEMPLATE = DEMO + "ITEM: {item}\\n<<COLOR: {color}>>\\nANSWER:"
first = promptscope.run_prompt(MY_TEMPLATE, vars=mine.head(60), choices=[" yes", " no"],
                               name="my task (train)", progress=False)
picked = first.df[first.df.chosen]
right, wrong = picked[picked.choice == picked.answer], picked[picked.choice != picked.answer]
mine_vec = promptscope.contrastive_vector(right, wrong, layers=[2], name="my task vector")
mine_cmp = promptscope.compare_steering(
    MY_TEMPLATE, mine.tail(60), choices=[" yes", " no"], name="steering compared (my data)",
    text=texts, progress=False,
    methods={"PASTA (all heads)": {"heads": "all", "alpha": [0.1, 0.01]},
             "CAA (layer 2)": {"vector": mine_vec, "strength": [1, 2, 4]}})
print(f"{len(right)} right / {len(wrong)} wrong training rows; unsteered accuracy "
      f"{mine_cmp.params['baseline']['accuracy']:.0%} on the other {len(mine.tail(60))} "
      f"({mine_cmp.params['baseline']['test_accuracy']:.0%} on the "
      f"{len(mine_cmp.params['test_rows'])} test rows among them)")
mine_cmp.summary()
""")
code("""
mine_cmp.figure()
""")
md("""
## In a `%%prompt` cell

`--steer vector` adds a saved (or notebook) vector while the cell runs; `--steer` alone is PASTA.
""")
code("""
q = held_out[held_out.attribute == "city"].head(4)
""")
MAGIC = ('%%prompt --vars q --choices " Oslo| Lima| Rome| Cairo| Delhi| Tokyo| Quito| Paris" '
         "--steer vector --vector caa --strength 2 --steer-layers 3 --compare -o steered")
code(MAGIC + """
Context: {before}{key}{after}
Question: {question}
Answer:{lead}""")
code("""
picked = steered.df[steered.df.chosen]
table = picked.pivot_table(index="variant", columns="steered", values="choice",
                           aggfunc="first")
table.join(q[["answer", "prior"]].reset_index(drop=True))
""")
md("""
## The steering lab

Pick a method, move its strength (and, for vectors, the layers): the answer probabilities of
the variants are re-measured plain and steered; the curve is the comparison above.
""")
code("""
from promptscope.widgets import SteeringLab

SteeringLab(TEMPLATE, model, choices=values["city"], vars=q, heads=HEADS,
            vectors={"CAA (layer 3)": caa, "ICV": icv}, comparison=cmp)
""")
cells.write(NOTEBOOKS / "06_steering_compared.ipynb")
