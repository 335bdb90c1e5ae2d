"""Write notebooks/02_attention_steering.ipynb (no outputs; CI executes it).

    python scripts/make_attention_notebook.py
"""

from notebook_cells import NOTEBOOKS, Cells

cells = Cells()
md, code = cells.md, cells.code


md("""
# Attention: look, then steer (PASTA and AutoPASTA)

The bundled model organism memorised a colour and a home city for each of its made-up people
(its *prior*), and learned to answer questions from a context of several sentences, most of them
about other people (distractors). When the context contradicts the prior, the model was taught to
follow it when the claim stands close to the question and to trust its memory when the claim is
buried further back, so whether it follows the context depends on how strongly it attends to
that one sentence. Here we look at where it
attends, find the heads that matter, and steer them toward the relevant sentence (PASTA, "Tell
Your Model Where to Attend"), then measure the gain on held-out questions.
""")
code("""
%load_ext promptscope
import random
import plotly.express as px
import promptscope
from promptscope.organism import world

%promptscope model organism
""")
md("""
## Questions as template rows

`world.template_rows` splits each context around its relevant sentence; the template marks that
sentence with `<<...>>`, which is stripped from the prompt and recorded as the span to steer
toward. The `answer` (the context's value) and `prior` (the memorised one) columns travel with each
variant into the results.
""")
code("""
def questions(n, seed):
    rng = random.Random(seed)
    return world.template_rows([world.qa_example(rng, kind="conflict", attribute="color")
                                for _ in range(n)])

profile_set, held_out = questions(48, seed=1), questions(200, seed=2)
colors = [f" {c}" for c in world.ATTRIBUTES["color"]]
TEMPLATE = world.STEERING_TEMPLATE
print(TEMPLATE)
held_out.head(3)
""")
md("""
## Where does it attend?
The explorer shows two variants side by side; the lower map is the attention mass the last token
puts on the emphasised sentence, per layer and head.
""")
code("""
att = promptscope.attention(TEMPLATE, vars=held_out.head(2), name="organism attention")
att
""")
md("""
## Profile heads
Steer each head alone on a small labelled set and rank the heads by the accuracy they add.
`ALPHA` scales the attention every steered head puts outside the emphasised sentence; PASTA's
usual 0.01 is enough here: on 600 held-out questions it moves this organism's answers by about
41 points, near-hard emphasis (1e-4) by about 49 (`docs/organism.md`).
""")
code("""
ALPHA = 0.01
profile = promptscope.profile_heads(TEMPLATE, profile_set, choices=colors, alpha=ALPHA,
                                    name="context heads")
profile.figure()
""")
code("""
profile.summary().head(6)
""")
md("""
## Steer the best heads on held-out questions
`compare` runs every question plain and steered.
""")
code("""
steered = promptscope.run_prompt(TEMPLATE, vars=held_out, choices=colors, name="steer top heads",
                                 steer={"heads": "profile:context heads:5", "alpha": ALPHA,
                                        "compare": True})
chosen = steered.df[steered.df.chosen].assign(context=lambda d: d.choice == d.answer,
                                              prior=lambda d: d.choice == d.prior)
table = chosen.groupby("steered")[["context", "prior"]].mean().rename(
    index={False: "plain", True: "PASTA"})
table
""")
code("""
by_distractors = chosen.groupby(["distractors", "steered"])["context"].mean().reset_index()
by_distractors["steering"] = by_distractors["steered"].map({False: "plain", True: "PASTA"})
px.bar(by_distractors, x="distractors", y="context", color="steering", barmode="group",
       title="Answers that follow the context, by number of distractor sentences",
       labels={"context": "follows the context"})
""")
code("""
gain = table.loc["PASTA", "context"] - table.loc["plain", "context"]
print(f"PASTA on the five best heads: the context is followed "
      f"{table.loc['plain', 'context']:.0%} -> {table.loc['PASTA', 'context']:.0%} ({gain:+.0%}) "
      f"of {len(held_out)} held-out conflicting contexts")
""")
md("""
## Try it yourself
The steering widget re-runs plain and steered as you move alpha or pick another head set.
""")
code("""
from promptscope.widgets import SteeringWidget
SteeringWidget(TEMPLATE, promptscope.load_model("organism"), choices=colors, vars=held_out.head(4),
               alpha=ALPHA)
""")
md("""
## AutoPASTA
Mark the whole context with `<<...>>` and let the model pick the key sentence itself
(`--auto-emphasis` in a `%%prompt` cell); `key_sentence` shows what it picked.
""")
code("""
AUTO = "Context: <<{before}{key}{after}>>\\nQuestion: {question}\\nAnswer:{lead}"
auto = promptscope.run_prompt(AUTO, vars=held_out.head(40), choices=colors, progress=False,
                              steer={"heads": "profile:context heads:5", "alpha": ALPHA,
                                     "auto": True})
picked = auto.df[auto.df.chosen]
found = (picked.key == picked.key_sentence).mean()
print(f"AutoPASTA picked the relevant sentence for {found:.0%} of the questions; "
      f"the context is followed {(picked.choice == picked.answer).mean():.0%}")
picked[["key", "key_sentence", "choice", "answer", "prior"]].head()
""")
cells.write(NOTEBOOKS / "02_attention_steering.ipynb")
