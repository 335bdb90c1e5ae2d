"""Write notebooks/04_reachability.ipynb (no outputs; CI executes it).

    python scripts/make_reachability_notebook.py
"""

from __future__ import annotations

from notebook_cells import NOTEBOOKS, Cells

OUT = NOTEBOOKS / "04_reachability.ipynb"

CELLS = [
    ("md", """# Controllability: how far can a few prompt tokens move the model?

"What's the Magic Word? A Control Theory of LLM Prompting" (Bhargava et al.) treats a prompt as a
control input: for an initial state `x0` (text) and a target next token `y`, is there a control
prompt `u` of at most `k` tokens such that `y` becomes the model's most likely next token after
`u + x0`? The paper finds the true next Wikitext token reachable over 97 % of the time with
`k <= 10` on 7B-40B models, the top-75 most likely next tokens at least 85 % of the time, and even
some least likely tokens made most likely.

Here we ask the same of the bundled model organism, a 4-layer llama trained on a small synthetic
language whose topic markers make it controllable by construction (`docs/organism.md`).
`promptscope.reachability` searches control prompts with greedy back-generation and greedy
coordinate gradient (GCG), and re-verifies every success with a plain forward pass."""),
    ("code", """%load_ext promptscope
import random
import promptscope
from promptscope.analyses.reachability import heldout_states, k_epsilon, next_tokens
from promptscope.analyses.reach_bound import attention_bound, layer_summary, nothing_new_reachable
from promptscope.organism import grammar
from promptscope.viz.reachability import rank_figure

%promptscope model organism
model = promptscope.loaded_models()[-1]"""),
    ("md", """## Initial states and target sets

Held-out text of the organism's language, cut at random token boundaries: each cut gives an
initial state `x0` and its true next token. For each `x0` we ask for four target sets, as in
the paper: the true next token, the model's top 4, 2 uniformly random tokens and the 2 least
likely."""),
    ("code", """texts = [grammar.text(random.Random(9000 + i)) for i in range(40)]
states = heldout_states(model, texts, n=3, min_tokens=3, max_tokens=6, seed=1)
for x0, nxt in states:
    print(f"{x0!r:45} true next: {model.tokenizer.decode([nxt])!r}")"""),
    ("md", """## Search

`k = 1` is searched exhaustively (one pass over the vocabulary per `x0` serves all its targets);
`k = 2` by GCG (gradients through the one-hot control tokens, 32 single-token swaps among the
top 32 tokens per position, 5 steps), warm-started from the best single token. The run is saved
as a session; an interrupt keeps the pairs already finished."""),
    ("code", """run = promptscope.reachability(model, states, "true,top:4,random:2,bottom:2",
                               k_max=2, method="gcg", steps=5, search_width=32, top_k=32,
                               name="organism k-epsilon", progress=False)
table = k_epsilon(run.df, 2)
print(f"{run.df['pair'].nunique()} pairs searched in {run.params['time_s']:.0f} s "
      f"({len(run.df)} rows: a pair in two target sets has a row in each); "
      f"unverified claims: {run.params['unverified_claims']}")
print(table.pivot(index="target_set", columns="k", values="reached").round(2))
run.summary()"""),
    ("md", """Every reached row was checked by an independent forward pass. The k-epsilon curve
shows the fraction of targets reached with at most `k` control tokens per target set, beside
the paper's headline (dashed); the right panel is the analytic bound discussed below."""),
    ("code", """run.figure()"""),
    ("md", """How the rank of each target moved over the search steps (rank 1 = argmax):"""),
    ("code", """rank_figure(run, max_pairs=12)"""),
    ("md", """## A least likely answer made the most likely

The least likely tokens of the whole vocabulary are fragments the organism never predicts; the
`bottom` rows above barely move, and longer searches (see `docs/reachability.md`) move them up
many ranks but not to the top within a few tokens. Its own answers are another matter: after
`"Badrok lives in"` (a person the model knows nothing about) it bets on one city and ranks
another last of its eight. A control prompt of at most two tokens makes that least likely city
the most likely next token:"""),
    ("code", """x0 = "Badrok lives in"
dist = next_tokens(model, x0)
cities = [model.tokenizer(" " + c, add_special_tokens=False).input_ids[0]
          for c in ("Oslo", "Lima", "Rome", "Cairo", "Delhi", "Tokyo", "Quito", "Paris")]
least = int(dist[dist.token_id.isin(cities)].token_id.iloc[-1])
low = promptscope.reachability(model, [x0], [least], k_max=2, method="gcg", steps=8,
                               search_width=64, top_k=32, bound=False, progress=False,
                               name="least likely city")
row = low.df.iloc[0]
print(f"target {row.target!r}: rank {row.base_rank} (p = {row.base_prob:.1e}) without control "
      f"-> rank {row['rank']} (p = {row.prob:.2f}) after {row.control!r} "
      f"(k = {len(row.control_ids)}, reached: {row.reached})")
after = next_tokens(model, x0, list(row.control_ids), top=4)
print("top 4 without control:", list(dist.token[:4]))
print("top 4 with control:   ", list(after.token))"""),
    ("md", """## The analytic bound

For the query at the last token of `x0`, a head's output with `k` control tokens is a convex mix
of what it attends to in `x0` and in `u`; the share the control can take is at most
`beta = k e^alpha / (g + k e^alpha)` with `alpha = sigma_q sigma_k M_u M_x / sqrt(d)` from the
largest singular values of the query and key matrices and the largest token norms, and what the
control can add is at most `beta * sigma_v * M_u` (the paper's theorem). Through the output
projection this bounds how far the layer's output can move (`shift_bound`). For the organism:"""),
    ("code", """bound = run.tables["bound"]
summ = layer_summary(bound)
print(summ[summ.k == 2][["layer", "sigma_q", "sigma_k", "sigma_v", "sigma_o", "beta_max",
                         "shift_bound", "resid_norm"]].round(3).to_string(index=False))"""),
    ("md", """`beta` is close to 1 in every layer: with control tokens as large as RMSNorm allows,
the bound permits the control to take nearly all of the last token's attention, so it rules
nothing out here - consistent with the targets the search reached. The bound bites when the
weights leave the control no path. Zeroing every attention output (and MLP output) leaves the last
position's residual stream a function of its own token only; the bound then is exactly zero,
and the search agrees that nothing beyond the current argmax is reachable:"""),
    ("code", """import copy
import torch
from promptscope.models.hf import HFModel

zeroed = HFModel(copy.deepcopy(model.model), model.tokenizer, name="organism-zeroed")
with torch.no_grad():
    for layer in zeroed.model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
x0 = states[0][0]
print("bound says nothing new is reachable:",
      nothing_new_reachable(attention_bound(zeroed, [x0], k=[1, 4])))
flat = promptscope.reachability(zeroed, [x0], "top:3,random:2", k_max=1, bound=False,
                                save=False, progress=False)
print(flat.df[["target", "base_rank", "reached", "k", "rank"]].to_string(index=False))"""),
    ("md", """## The magic and the widget

`%%reach` runs the same search on the lines of the cell (one `x0` per line); `-o` keeps the
result. Here `x0` is two words from the middle of a sentence, without the topic marker that
opened it, so the next word's topic is open: one control token makes each of the other top
words the most likely next word (`rugu` is one of `tisa`'s successors in the `tike` topic; the
search reports the control it found, not necessarily a topic marker). The widget lets you type
`x0`, pick targets from the model's ranking, and start or stop a search."""),
    ("code", """%%reach --k 1 --targets top:4 --no-bound -o quick
molu tisa"""),
    ("code", """quick.df[["x0", "target", "base_rank", "reached", "k", "control"]]"""),
    ("code", """from promptscope.widgets import ReachWidget

ReachWidget(model, "molu tisa", k_max=2)"""),
]


def main() -> None:
    Cells.of(CELLS).write(OUT)


if __name__ == "__main__":
    main()
