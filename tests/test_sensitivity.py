"""FormatSpread (grammar, bandit, spread), POSIX and label-free prompt selection."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from IPython.core.error import UsageError

import promptscope
from promptscope.analyses.sensitivity.bandit import SpreadBandit, run_bandit, wilson_interval
from promptscope.analyses.sensitivity.formats import (
    FEATURES,
    FormatGrammar,
    PromptFormat,
    sample_formats,
)
from promptscope.analyses.sensitivity.posix import posix_index, spelling_noise
from promptscope.analyses.sensitivity.selection import cbm, mutual_information
from promptscope.analyses.sensitivity.spread import FewShotTask, feature_effects, format_table
from promptscope.errors import PromptscopeError
from promptscope.models.base import Generation, Model, Score

# ----------------------------------------------------------------------------- a fake model


class RuleModel(Model):
    """Answers the query right, and confidently, iff its format's separator has a colon; else
    (unsure) right on even query ids only: a model whose format sensitivity is known exactly.
    Counts backend calls."""

    name = "rule"
    capabilities = frozenset({"score", "generate"})

    def __init__(self, gold: dict[str, str], invert: bool = False) -> None:
        self.gold, self.calls, self.invert = gold, [], invert

    def score(self, prompts, continuations, progress=None):
        self.calls.append(len(prompts))
        out = []
        for p, c in zip(prompts, continuations):
            qid = re.findall(r"q\d+", p)[-1]
            right = (":" in p.rsplit(qid, 1)[1]) != self.invert or int(qid[1:]) % 2 == 0
            want = self.gold[qid] if right else ("no" if self.gold[qid] == "yes" else "yes")
            sure = (":" in p.rsplit(qid, 1)[1]) != self.invert  # sure in formats it "knows"
            lp = (0.0 if c.strip() == want else -2.0) if sure else \
                (-0.5 if c.strip() == want else -0.8)
            out.append(Score(lp, [lp], ["x"], 1))
        return out

    def generate(self, prompts, **kw):
        return [[Generation(" ok", ["ok"], -1.0, 1)] for _ in prompts]


def _qdata(n=40):
    rows = [{"text": f"q{i}", "label": "yes" if i % 3 else "no"} for i in range(n)]
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the grammar

def test_organism_formats_are_expressible_exactly():
    from promptscope.organism.classify import (
        classification_dataset,
        plausible_formats,
    )

    df = classification_dataset(4, seed=3)
    grammar = FormatGrammar.organism()
    for ofmt in plausible_formats(24):
        fmt = PromptFormat.from_organism(ofmt)
        assert fmt in set(grammar)  # inside the organism grammar's space
        text = fmt.render(df.iloc[:3].to_dict("records"), df.iloc[3].to_dict(), ["item", "color"])
        assert text == ofmt.render_prompt(df.iloc[:3], df.iloc[3])
        assert fmt.delimiter() == " "  # labels scored as " yes" / " no", as in training


def test_formats_are_values_sampled_reproducibly():
    g = FormatGrammar()
    a, b, c = g.sample(30, seed=1), g.sample(30, seed=1), g.sample(30, seed=2)
    assert a == b and a != c and len(set(a)) == 30
    assert hash(a[0]) == hash(PromptFormat(**a[0].features()))
    assert g.format_at(0) == next(iter(g)) and g.size == len(list(g))
    fmt = PromptFormat("upper", " - ", " | ", "\n", "{i}. ")
    assert str(fmt) == "1. INPUT - {input} | ANSWER - {label}\n2. INPUT - {input} | ANSWER -"
    near = g.neighbours(PromptFormat(), "separator")
    assert len(near) == len(g.separators) - 1
    assert all(sum(getattr(n, f) != getattr(PromptFormat(), f) for f in FEATURES) == 1
               for n in near)


_VALUE = st.text(alphabet="abcdefgh XYZ0123", min_size=1, max_size=8).map(lambda s: f"<{s}>")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(idx=st.integers(0, FormatGrammar().size - 1),
       rows=st.lists(st.tuples(_VALUE, _VALUE, st.sampled_from(["pos", "neg", "neu"])),
                     min_size=2, max_size=6))
def test_every_format_keeps_data_and_labels_intact(idx, rows):
    """Meaning-preserving: values appear verbatim and in order, each demo's label right after its
    own answer descriptor, the query's label never; the label set and the frame are unchanged."""
    fmt = FormatGrammar().format_at(idx)
    df = pd.DataFrame([{"a": a, "b": b, "label": y} for a, b, y in rows])
    before = df.copy()
    task = FewShotTask(df, shots=len(rows) - 1, seed=idx, choices=["neg", "neu", "pos"])
    assert task.choices == ["neg", "neu", "pos"]
    assert [r["label"] for r in task.rows] == df["label"].tolist()
    pd.testing.assert_frame_equal(df, before)
    for i in range(len(df)):
        text = task.prompt(fmt, i)
        pos = 0
        for demo in task.demos[i]:
            for f in ("a", "b"):
                pos = text.index(fmt.descriptor(f) + fmt.separator + demo[f], pos)
            answer = fmt.descriptor("answer") + fmt.separator + demo["label"]
            pos = text.index(answer, pos) + len(answer)
        query = task.rows[i]
        for f in ("a", "b"):
            pos = text.index(fmt.descriptor(f) + fmt.separator + query[f], pos)
        assert text.endswith(fmt.descriptor("answer") + fmt.separator.rstrip())
        assert all(c.startswith(fmt.delimiter()) for c in task.continuations(fmt))


# ----------------------------------------------------------------------------- the bandit

def test_bandit_finds_true_best_and_worst_on_synthetic_tables():
    """Given a synthetic correctness table, the search names the exhaustive best and worst
    formats with a quarter of the exhaustive budget in most seeds."""
    n_formats, n_examples, hits = 20, 300, 0
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        acc = rng.permutation(np.r_[0.25, np.linspace(0.4, 0.75, n_formats - 2), 0.9])
        table = rng.random((n_formats, n_examples)) < acc[:, None]
        exact = table.mean(axis=1)

        def evaluate(pulls, table=table):
            return [table[p.format, list(p.examples)] for p in pulls]

        b = run_bandit(evaluate, n_formats, n_examples, budget=n_formats * n_examples // 4,
                       batch=10, seed=seed)
        assert b.spent <= n_formats * n_examples // 4
        hits += b.best() == exact.argmax() and b.worst() == exact.argmin()
    assert hits >= 16, hits


def test_bandit_bounds_are_exact_once_a_format_has_seen_every_example():
    b = SpreadBandit(3, 40, batch=10, seed=0)
    for f, (s, n) in enumerate([(30, 40), (12, 20), (0, 0)]):
        b.successes[f], b.trials[f] = s, n
    mean, lo, hi = b.bounds()
    assert lo[0] == hi[0] == mean[0] == 0.75          # all 40 seen: exact
    assert lo[1] < 0.6 < hi[1] and hi[1] - lo[1] < 0.5  # half seen: a finite interval
    assert lo[2] == -np.inf and hi[2] == np.inf        # unseen: anything goes


def test_bandit_sets_aside_clear_losers_and_stops_when_both_sides_are_settled():
    """Two formats far apart from the rest: the search names them, evaluates the middle
    formats only briefly, and stops well before its budget."""
    rng = np.random.default_rng(3)
    acc = np.r_[0.95, np.full(8, 0.5), 0.05]
    table = rng.random((10, 200)) < acc[:, None]
    b = run_bandit(lambda pulls: [table[p.format, list(p.examples)] for p in pulls], 10, 200,
                   budget=1000, batch=10, seed=0)
    assert (b.best(), b.worst()) == (0, 9)
    assert b.spent <= 400  # measured: 280
    assert b.trials[1:9].mean() < b.trials[[0, 9]].mean()


def test_bandit_is_exhaustive_with_a_full_budget_and_never_repeats_examples():
    table = np.random.default_rng(0).random((5, 23)) < 0.5
    seen: dict[int, list[int]] = {}

    def evaluate(pulls):
        for p in pulls:
            seen.setdefault(p.format, []).extend(p.examples)
        return [table[p.format, list(p.examples)] for p in pulls]

    b = run_bandit(evaluate, 5, 23, budget=10_000, batch=4)
    assert b.spent == 5 * 23 and (b.trials == 23).all()
    assert all(sorted(v) == list(range(23)) for v in seen.values())
    assert b.best() == table.mean(1).argmax() or table.mean(1)[b.best()] == table.mean(1).max()
    b2 = SpreadBandit(5, 23, batch=4, seed=0)
    assert b2.best() == -1  # nothing evaluated yet


def test_wilson_interval():
    lo, hi = wilson_interval([8], [10])
    assert lo[0] == pytest.approx(0.4902, abs=1e-3) and hi[0] == pytest.approx(0.9433, abs=1e-3)


# ----------------------------------------------------------------------------- spread, fake model

def test_spread_on_a_model_with_known_format_sensitivity():
    df = _qdata(40)
    gold = dict(zip(df["text"], df["label"]))
    model = RuleModel(gold)
    fmts = [PromptFormat(separator=": "), PromptFormat(separator=" - "),
            PromptFormat(separator=" = ", casing="upper"), PromptFormat(separator=":: ")]
    run = promptscope.format_spread(df, model, formats=fmts, shots=2, progress=False)
    t = run.tables["formats"]
    assert t["accuracy"].tolist() == [1.0, 0.5, 0.5, 1.0]
    assert run.params["interval"] == [0.5, 1.0] and run.params["spread"] == 0.5
    assert run.params["evaluations"] == run.params["exhaustive_evaluations"] == 160
    assert t["best"].sum() == 1 and t.loc[t["best"], "accuracy"].item() == 1.0
    # batched: several formats x examples per backend call, never one prompt per call
    assert len(model.calls) < 10 and min(model.calls) >= 2 * 40
    sep = run.tables["features"].query("feature == 'separator'").set_index("value")["effect"]
    assert sep[": "] == pytest.approx(0.25) and sep[" - "] == pytest.approx(-0.25)
    # formats 0, 1, 3 differ only in the separator: |1 - .5|, |1 - 1|, |.5 - 1|
    assert run.params["atomic"]["separator"]["pairs"] == 3
    assert run.params["atomic"]["separator"]["mean_abs_change"] == pytest.approx(1 / 3)
    again = promptscope.load(run.session_id)
    assert again == run and again.figure() is not None
    other = promptscope.format_spread(df, RuleModel(gold, invert=True), formats=fmts[::-1],
                                      shots=2, progress=False, save=False)
    from promptscope.viz.format_spread import scatter

    fig = scatter(run, other)  # formats matched by value, not by their position in the run
    assert sorted(fig.data[0].x) == [0.5, 0.5, 1.0, 1.0]
    assert list(fig.data[0].y) == [1 - a + 0.5 for a in fig.data[0].x]
    assert "Pearson -1.00" in fig.layout.title.text


def test_spread_bandit_respects_budget_and_streams_rows():
    df = _qdata(60)
    model = RuleModel(dict(zip(df["text"], df["label"])))
    rounds = []
    run = promptscope.format_spread(df, model, formats=8, budget=0.25, batch=6, seed=3,
                                    progress=False, on_round=lambda b: rounds.append(b.spent))
    assert run.params["evaluations"] == rounds[-1] <= round(0.25 * 8 * 60)
    assert rounds == sorted(rounds) and len(run.tables["trace"]) == len(rounds)
    search = run.df[run.df["side"] != "report"]
    assert len(search) == rounds[-1] and set(search["side"]) == {"best", "worst"}
    acc = run.tables["formats"].set_index("format")["accuracy"]
    best = run.params["best"]["format"]
    assert acc[best] == acc.max()


def test_a_budgeted_spread_reports_the_named_formats_exact_accuracies():
    """The search names the extremes from partial samples, which run wide (a format that looked
    extreme on a few examples is the one named); as in the paper's code, the two named formats
    are then evaluated on every example, outside the budget, and the interval is theirs."""
    df = _qdata(90)
    gold = dict(zip(df["text"], df["label"]))
    fmts = sample_formats(12, seed=1, inputs=["text"])
    whole = promptscope.format_spread(df, RuleModel(gold), formats=fmts, shots=0,
                                      progress=False, save=False)
    exact = whole.tables["formats"].set_index("format")["accuracy"]
    widened = 0
    for seed in range(4):
        kwargs = dict(formats=fmts, shots=0, budget=0.2, batch=5, seed=seed, progress=False,
                      save=False)
        model = RuleModel(gold)
        run = promptscope.format_spread(df, model, **kwargs)
        assert max(model.calls) <= 2 * 5 * 2  # report calls no larger than a search round's
        p = run.params
        b, w = p["best"]["format"], p["worst"]["format"]
        assert p["interval"] == [exact[w], exact[b]]  # measured on every example
        assert p["best"]["evaluations"] == p["worst"]["evaluations"] == 90
        assert p["evaluations"] <= round(0.2 * 12 * 90)  # the budget is the search's
        report = run.df[run.df["side"] == "report"]
        assert len(report) == p["report_evaluations"] > 0
        assert set(report["format"]) <= {b, w}
        assert len(run.df) == p["evaluations"] + p["report_evaluations"]
        estimate = promptscope.format_spread(df, RuleModel(gold), exact_interval=False,
                                             **kwargs)
        q = estimate.params
        assert q["report_evaluations"] == 0 and "report" not in set(estimate.df["side"])
        assert (q["best"]["format"], q["worst"]["format"]) == (b, w)  # the same search
        widened += q["spread"] > p["spread"]
    assert widened  # the partial-sample estimate overstates the spread in some seeds

    class StopsInTheReport(RuleModel):  # a Ctrl-C in the 3rd call after the search
        def score(self, prompts, continuations, progress=None):
            if len(self.calls) == stop_at:
                raise KeyboardInterrupt
            return super().score(prompts, continuations)

    stop_at = len(run.tables["trace"]) + 2  # (one score call per search round)
    with pytest.raises(KeyboardInterrupt) as info:
        promptscope.format_spread(df, StopsInTheReport(gold), **kwargs)
    kept = (info.value.partial_result.df["side"] == "report").sum()
    assert 0 < kept < p["report_evaluations"]  # the report pieces done before it are kept


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"label": "gold"}, "no label column 'gold'"),
    ({"choices": ["yes", "maybe"]}, r"Label\(s\) \['no'\] .* not among the choices"),
    ({"budget": 5}, "cannot evaluate two formats"),
    ({"budget": -3}, "budget must be"),
    ({"formats": 1}, "at least two formats"),
    ({"inputs": ["nope"]}, "not in the data"),
])
def test_spread_errors_say_what_to_fix(kwargs, fragment):
    df = _qdata(20)
    with pytest.raises(PromptscopeError, match=fragment):
        promptscope.format_spread(df, RuleModel({}), **{"formats": 4, **kwargs})


def test_feature_effects_from_a_table():
    fmts = [PromptFormat(casing=c, separator=s) for c in ("title", "lower")
            for s in (": ", " - ")]
    t = format_table(fmts, [9, 5, 7, 3], [10, 10, 10, 10], ["x"])
    eff, atomic = feature_effects(t)
    sep = eff[eff["feature"] == "separator"].set_index("value")["accuracy"]
    assert sep[": "] == pytest.approx(0.8) and sep[" - "] == pytest.approx(0.4)
    assert atomic["separator"]["mean_abs_change"] == pytest.approx(0.4)
    assert atomic["casing"]["mean_abs_change"] == pytest.approx(0.2)
    assert atomic["field_joiner"]["pairs"] == 0


# ----------------------------------------------------------------------------- POSIX formula

def test_posix_of_identical_variants_is_zero():
    # identical prompts give every response the same likelihood after each of them
    row = [-1.3, -4.0, -2.2]
    assert posix_index([row, row, row], [2, 5, 3]) == 0.0


def test_posix_hand_computed():
    ll = [[-1.0, -6.0, -2.0],
          [-3.0, -4.0, -5.0],
          [-2.0, -2.0, -3.0]]
    lengths = [1, 2, 4]
    # pairs (i, j), j's own = ll[j][j]: |ll[i][j] - ll[j][j]| / L_j
    terms = [abs(-3 + 1) / 1, abs(-2 + 1) / 1,      # j = 0
             abs(-6 + 4) / 2, abs(-2 + 4) / 2,      # j = 1
             abs(-2 + 3) / 4, abs(-5 + 3) / 4]      # j = 2
    assert posix_index(ll, lengths) == pytest.approx(sum(terms) / 6) == pytest.approx(23 / 24)
    with pytest.raises(PromptscopeError):
        posix_index([[0.0]], [1])


def test_spelling_noise_is_seeded_and_spares_protected_spans():
    text = "Question: What color is Brafu?\nAnswer:"
    span = (text.index("Brafu"), text.index("Brafu") + 5)
    a = spelling_noise(text, 0.2, seed=4, protect=[span])
    assert a == spelling_noise(text, 0.2, seed=4, protect=[span]) and a != text
    assert "Brafu" in a and a != spelling_noise(text, 0.2, seed=5, protect=[span])


def test_posix_end_to_end_matches_direct_scores(tiny_llama):
    rows = [{"city": "Paris"}, {"city": "Rome"}]
    run = promptscope.posix(rows, tiny_llama, template="Where is {city}? It is in",
                            templates=["{city} is in", "Q: where is {city}?\nA: it is in"],
                            n_variants=3, max_new_tokens=3, progress=False)
    assert set(run.params["posix"]) == {"spelling", "template"}
    v = run.tables["variants"]
    assert (v.groupby(["item", "type"]).size() == 3).all()
    assert "Paris" in v[(v["item"] == 0) & (v["type"] == "spelling")]["prompt"].iloc[2]
    # recompute one set's matrix with direct single scores and the formula
    part = v[(v["item"] == 1) & (v["type"] == "template")]
    prompts, resp = part["prompt"].tolist(), part["response"].tolist()
    ll = [[tiny_llama.score([p], [r])[0].logprob for r in resp] for p in prompts]
    lengths = [len(tiny_llama.score([p], [r])[0].tokens) for p, r in zip(prompts, resp)]
    items = run.tables["items"].set_index(["item", "type"])["posix"]
    assert items[(1, "template")] == pytest.approx(posix_index(ll, lengths), rel=1e-4)
    assert run.figure() is not None
    from promptscope.viz.posix import heatmap

    assert heatmap(run, "template").data[0].z.shape == (3, 3)


def test_posix_scores_a_response_with_the_stop_token_that_ended_it():
    """As POSIX's reference code scores the generated ids: y_j is the response and its stop
    token, so log P(y_j | x_i) includes the choice to stop there and L_{y_j} counts it; a
    response that is only the stop token is one token, not dropped."""
    model = promptscope.load_model("organism")
    eos = model.tokenizer.eos_token
    rows = [{"entity": "Brafu"}]
    kwargs = dict(template="Question: What color is {entity}?\nAnswer:", n_variants=3,
                  max_new_tokens=6, progress=False, save=False)
    run = promptscope.posix(rows, model, **kwargs)
    v = run.tables["variants"]
    assert (v["stop"] == eos).sum() >= 2  # the organism's answers end at its stop token
    for (item, kind), part in v.groupby(["item", "type"]):
        ys = [r + s for r, s in zip(part["response"], part["stop"])]
        scores = [[model.score([p], [y])[0] for y in ys] for p in part["prompt"]]
        lengths = [len(scores[j][j].tokens) for j in range(len(ys))]
        assert lengths == [len(model.encode_continuation(r)) + (s == eos)
                           for r, s in zip(part["response"], part["stop"])]
        ll = [[s.logprob for s in row] for row in scores]
        assert run.tables["items"].set_index(["item", "type"]).loc[(item, kind), "posix"] == \
            pytest.approx(posix_index(ll, lengths), rel=1e-4)
    text_only = promptscope.posix(rows, model, include_stop=False, **kwargs)
    assert (text_only.tables["variants"]["stop"] == "").all()
    assert text_only.params["posix"]["spelling"] != pytest.approx(run.params["posix"]["spelling"])
    # a response that is only the stop token (here scripted) is scored as that one token
    lp = {(p, eos): -1.0 - k for k, p in enumerate("AB")}

    class Stops(ScriptedModel):
        def generate(self, prompts, **kw):
            return [[Generation("", [], -1.0, 1, "stop", extra={"stop": eos})] for _ in prompts]

    only = promptscope.posix([{"x": "A"}], Stops(lp, {}), template="{{A|B}}", types=["template"],
                             progress=False, save=False)
    assert only.params["dropped_empty_responses"] == 0
    # (|-2 + 1| + |-1 + 2|) / 2 pairs / 2 tokens (the scripted scores have two)
    assert only.params["posix"]["template"] == pytest.approx(0.5)


def test_posix_given_responses_and_errors(tiny_llama):
    run = promptscope.posix(["Say hi:"], tiny_llama, responses=[" hi"], n_variants=2,
                            progress=False, save=False)
    assert (run.tables["variants"]["response"] == " hi").all()
    with pytest.raises(PromptscopeError, match="needs other templates"):
        promptscope.posix(["x"], tiny_llama, types=["template"], save=False)
    with pytest.raises(PromptscopeError, match="Unknown variant type"):
        promptscope.posix(["x"], tiny_llama, types=["typo"], save=False)


def test_posix_over_the_templates_own_alternatives(tiny_llama):
    """A template's {{a|b}} combinations are its 'template' variants: the same numbers as the
    combinations given one by one in templates=[...]."""
    rows = [{"city": "Paris"}, {"city": "Rome"}]
    own = promptscope.posix(rows, tiny_llama, template="{{Where is {city}? It|{city}|Q: {city}}}"
                            " is in", max_new_tokens=3, progress=False, save=False)
    assert list(own.params["posix"]) == ["spelling", "template"]  # template: the default now
    given = promptscope.posix(rows, tiny_llama, template="Where is {city}? It is in",
                              templates=["{city} is in", "Q: {city} is in"], types=["template"],
                              max_new_tokens=3, progress=False, save=False)
    v = own.tables["variants"]
    assert v[v["type"] == "template"]["prompt"].tolist() == \
        given.tables["variants"]["prompt"].tolist()
    assert own.params["posix"]["template"] == pytest.approx(given.params["posix"]["template"])
    # the base prompt of the spelling set is the first combination
    assert v[v["type"] == "spelling"]["prompt"].iloc[0] == "Where is Paris? It is in"


class ScriptedModel(Model):
    """Scores and answers from tables: ``lp[(prompt, response)]`` (a missing pair fails as an
    API request does), ``answers[prompt]``; ``fail_score`` makes every score call raise."""

    name = "scripted"
    capabilities = frozenset({"score", "generate"})
    per_request_errors = True

    def __init__(self, lp, answers, fail_score=False):
        self.lp, self.answers, self.fail_score = lp, answers, fail_score

    def score(self, prompts, continuations, progress=None):
        if self.fail_score:
            raise RuntimeError("server went away")
        return [Score(self.lp[(p, c)], [self.lp[(p, c)]], ["t", "t"], 1) if (p, c) in self.lp
                else Score(math.nan, [], [], 0, error="HTTP 500") for p, c in zip(prompts,
                                                                                   continuations)]

    def generate(self, prompts, **kw):
        return [[Generation(self.answers[p], ["t"], -1.0, 1)] for p in prompts]


def test_posix_keeps_every_prompt_and_drops_what_cannot_be_scored():
    """An empty response drops out as a column only (its prompt still counts as an x_i); a
    failed pair drops out alone, is counted and warned about; responses have two tokens."""
    answers = {"A": "", "B": " b", "C": " c"}
    lp = {("A", " b"): -3.0, ("B", " b"): -1.0, ("C", " b"): -2.0,
          ("B", " c"): -4.0, ("C", " c"): -0.5}  # ("A", " c") fails
    model = ScriptedModel(lp, answers)
    with pytest.warns(UserWarning, match="1 \\(prompt, response\\) pairs could not be scored"):
        run = promptscope.posix([{"x": "A"}], model, template="{{A|B|C}}", types=["template"],
                                progress=False, save=False)
    item = run.tables["items"].iloc[0]
    assert (item["n_prompts"], item["n_responses"], item["failed_pairs"]) == (3, 2, 1)
    kept = [abs(-3.0 + 1.0) / 2, abs(-2.0 + 1.0) / 2, abs(-4.0 + 0.5) / 2]  # (A,b) (C,b) (B,c)
    assert item["posix"] == pytest.approx(sum(kept) / 3)
    assert run.params["dropped_empty_responses"] == 1 and run.params["failed_pairs"] == 1
    failed = run.df[(run.df["i"] == 0) & (run.df["j"] == 2)].iloc[0]
    assert math.isnan(failed["change"]) and failed["error"] == "HTTP 500"
    # nothing dropped: the same number as the paper's formula
    full = {**lp, ("A", " a"): -1.0, ("B", " a"): -2.0, ("C", " a"): -5.0, ("A", " c"): -1.0}
    run = promptscope.posix([{"x": "A"}], ScriptedModel(full, {**answers, "A": " a"}),
                            template="{{A|B|C}}", types=["template"], progress=False, save=False)
    ll = [[full[(p, r)] for r in (" a", " b", " c")] for p in "ABC"]
    assert run.params["posix"]["template"] == pytest.approx(posix_index(ll, [2, 2, 2]))


def test_posix_stopped_while_scoring_keeps_the_prompts_and_responses(tmp_path):
    store = promptscope.Store(tmp_path / "store")
    model = ScriptedModel({}, {"A": " a", "B": " b"}, fail_score=True)
    with pytest.raises(RuntimeError) as info:
        promptscope.posix([{"x": "A"}], model, template="{{A|B}}", types=["template"],
                          progress=False, store=store)
    partial = info.value.partial_result
    assert partial.tables["variants"]["response"].tolist() == [" a", " b"]
    again = promptscope.load(partial.session_id, store=store)
    assert again.status == "failed" and len(again.tables["variants"]) == 2


def test_posix_interrupted_keeps_the_responses_and_scores_so_far(tmp_path):
    """Responses are generated a chunk of 16 sets at a time, each chunk saved with its
    scores: a Ctrl-C in the second chunk's generation keeps the first's."""
    store = promptscope.Store(tmp_path / "store")
    model = ScriptedModel({}, {})
    calls = []

    def generate(prompts, **kw):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return [[Generation(" " + p[0].lower(), ["t"], -1.0, 1)] for p in prompts]

    model.generate = generate
    rows = [{"y": str(i % 10) * (1 + i // 10)} for i in range(20)]  # 20 items: 2 chunks
    with pytest.raises(KeyboardInterrupt) as info:
        promptscope.posix(rows, model, template="{{A|B}}{y}", types=["template"],
                          progress=False, store=store)
    partial = info.value.partial_result
    assert calls == [32, 8] and len(partial.tables["variants"]) == 32
    assert len(partial.tables["items"]) == 16
    again = promptscope.load(partial.session_id, store=store)
    assert again.status == "interrupted" and len(again.tables["variants"]) == 32


def test_posix_variant_sources_and_paraphrase_forms():
    """Each prompt says where it came from (a duplicate is left out, so ids are places in the
    set); a column of single texts is one paraphrase per row; a list of plain texts for several
    rows is refused (it would give every intent the same prompts)."""
    answers = {t: " a" for t in ["Q x", "Q y", "P x", "P y", "R x"]}
    model = ScriptedModel({(p, " a"): -1.0 for p in answers}, answers)
    run = promptscope.posix([{"w": "x"}], model, template="{{Q|Q|P}} {w}",
                            templates=["R {w}"], types=["template"], progress=False,
                            save=False)
    v = run.tables["variants"]
    assert v["source"].tolist() == ["base", "alternative 2", "templates[0]"]
    assert v["variant"].tolist() == [0, 1, 2] and v["prompt"].tolist() == ["Q x", "P x", "R x"]
    rows = [{"w": "x", "alt": "P x"}, {"w": "y", "alt": "P y"}]
    run = promptscope.posix(rows, model, template="Q {w}", types=["paraphrase"],
                            paraphrases="alt", progress=False, save=False)
    assert run.tables["variants"]["prompt"].tolist() == ["Q x", "P x", "Q y", "P y"]
    with pytest.raises(PromptscopeError, match="one list per row"):
        promptscope.posix(rows, model, template="Q {w}", types=["paraphrase"],
                          paraphrases=["P x", "P y"], save=False)


# ----------------------------------------------------------------------------- selection

def test_mutual_information_and_cbm_formulas():
    p = np.array([[0.9, 0.1], [0.6, 0.4]])
    mean = p.mean(0)
    h = lambda q: -(q * np.log(q)).sum()  # noqa: E731
    assert mutual_information(p) == pytest.approx(h(mean) - (h(p[0]) + h(p[1])) / 2)
    q = cbm(p)
    expect = (p / mean) / (p / mean).sum(1, keepdims=True)
    assert np.allclose(q, expect) and np.allclose(q.sum(1), 1)
    assert np.allclose(cbm(q), q, atol=0.05)  # roughly idempotent once balanced


def test_select_prompt_against_the_oracle():
    df = _qdata(30)
    model = RuleModel(dict(zip(df["text"], df["label"])))
    demos = _qdata(3).assign(text=["q100", "q102", "q104"])
    model.gold.update(dict(zip(demos["text"], demos["label"])))
    cands = [PromptFormat(separator=" - "), PromptFormat(separator=": "),
             PromptFormat(separator=" = ")]
    sel = promptscope.select_prompt(cands, df[["text"]], model, choices=["yes", "no"],
                                    demos=demos, progress=False)
    assert sel.params["selected"] == 1  # the only format the model is sure and right in
    lab = promptscope.select_prompt(cands, df, model, choices=["yes", "no"], label="label",
                                    calibration=None, progress=False)
    assert lab.params["oracle"] == 1 and lab.params["effectiveness"] == 1.0
    t = lab.tables["candidates"]
    assert t.loc[1, "accuracy"] == 1.0 and t.loc[0, "accuracy"] == 0.5
    assert lab.figure() is not None and promptscope.load(lab.session_id) == lab


def test_select_prompt_templates_on_tiny_model(tiny_llama):
    data = [{"city": "Paris", "gold": " yes"}, {"city": "Tokyo", "gold": " no"}]
    sel = promptscope.select_prompt(["Is {city} in Europe?", "{city} is in Europe:"], data,
                                    tiny_llama, choices=" yes| no", label="gold",
                                    progress=False, save=False)
    t = sel.tables["candidates"]
    assert len(sel.df) == 4 and t["mi_cbm"].between(0, math.log(2) + 1e-9).all()
    assert 0 <= sel.params["effectiveness"] <= 1
    with pytest.raises(PromptscopeError, match="not among the choices"):
        promptscope.select_prompt(["{city}?", "{city}!"], data, tiny_llama, choices=" a| b",
                                  label="gold", save=False)


def test_select_prompt_over_one_templates_alternatives(tiny_llama):
    """One template: its combinations are the candidates, each as if given as its own template,
    with a column per group naming the option chosen."""
    data = [{"city": "Paris", "gold": " yes"}, {"city": "Tokyo", "gold": " no"},
            {"city": "Lima", "gold": " no"}]
    one = promptscope.select_prompt("{{q=Is|Q: is}} {city} in Europe?{{sep=\n| }}A:", data,
                                    tiny_llama, choices=" yes| no", label="gold",
                                    progress=False, save=False)
    listed = promptscope.select_prompt(
        ["Is {city} in Europe?\nA:", "Is {city} in Europe? A:", "Q: is {city} in Europe?\nA:",
         "Q: is {city} in Europe? A:"], data, tiny_llama, choices=" yes| no", label="gold",
        progress=False, save=False)
    a, b = one.tables["candidates"], listed.tables["candidates"]
    assert a["prompt"].tolist() == b["prompt"].tolist()
    assert np.allclose(a["mi_cbm"], b["mi_cbm"]) and one.params["selected"] == \
        listed.params["selected"]
    assert a["q"].tolist() == ["Is", "Is", "Q: is", "Q: is"]
    assert a["sep"].tolist() == ["\n", " ", "\n", " "]
    # the figure names each bar by its options, the title the pick's
    bars = one.figure().data[0].x
    assert one.figure().layout.xaxis.title.text.startswith("candidate prompt")
    assert [b.rstrip(" ★") for b in bars] == ["#0 Is · ⏎", "#1 Is · ␣", "#2 Q: is · ⏎",
                                              "#3 Q: is · ␣"]
    assert bars[one.params["selected"]].endswith("★") and one.params["groups"] == ["q", "sep"]
    assert listed.figure().data[0].x[1].rstrip(" ★") == "#1 Is {city} in Europe? A:"
    with pytest.raises(PromptscopeError, match="at least two candidate prompts"):
        promptscope.select_prompt("Is {city} big?", data, tiny_llama, choices=" yes| no",
                                  save=False)
    with pytest.raises(PromptscopeError, match="Rename the alternatives group.*'score'"):
        promptscope.select_prompt("{{score=Is|Q:}} {city}?", data, tiny_llama,
                                  choices=" yes| no", save=False)
    with pytest.raises(PromptscopeError, match="no value"):  # before any scoring
        promptscope.select_prompt("{{Is|Q:}} {town}?", data, tiny_llama, choices=" yes| no",
                                  save=False)


def test_select_prompt_leaves_out_inputs_it_could_not_score():
    """A failed score (NaN) drops that input from its candidate's MI and accuracy, with a
    warning; the other candidate keeps all inputs."""
    lp = {}
    for cand in ("A", "B"):
        for x, good in (("p", " y"), ("q", " n"), ("r", " y")):
            for c in (" y", " n"):
                lp[(f"{cand} {x}", c)] = -0.2 if c == good else -2.0
    del lp[("A r", " n")]  # candidate 0, input 2: its request failed
    data = [{"x": "p", "g": "y"}, {"x": "q", "g": "n"}, {"x": "r", "g": "y"}]
    with pytest.warns(UserWarning, match="1 \\(candidate, input\\) pairs could not be scored"):
        sel = promptscope.select_prompt(["A {x}", "B {x}"], data, ScriptedModel(lp, {}),
                                        choices=" y| n", label="g", calibration=None,
                                        progress=False, save=False)
    t = sel.tables["candidates"]
    assert t["failed_inputs"].tolist() == [1, 0]
    two = np.exp([[-0.2, -2.0], [-2.0, -0.2]])
    two /= two.sum(1, keepdims=True)
    assert t.loc[0, "mi"] == pytest.approx(mutual_information(two))
    assert t.loc[0, "accuracy"] == 1.0 and t.loc[1, "accuracy"] == 1.0
    preds = sel.df[sel.df["candidate"] == 0]["pred"].tolist()
    assert preds[:2] == ["y", "n"] and pd.isna(preds[2])


def test_selection_and_spread_input_errors():
    df = _qdata(6)
    model = RuleModel(dict(zip(df["text"], df["label"])))
    with pytest.raises(PromptscopeError, match="at least two choices"):
        promptscope.select_prompt(["{text}?", "{text}!"], df, model, choices=" yes", save=False)
    with pytest.raises(PromptscopeError, match="template candidates"):
        promptscope.select_prompt([PromptFormat(), "{text}?"], df, model, label="label",
                                  save=False)
    # labels and choices are compared without surrounding spaces
    task = FewShotTask(df.assign(label=" " + df["label"]), choices=[" yes", " no"], shots=1)
    assert task.choices == ["yes", "no"] and {r["label"] for r in task.rows} == {"yes", "no"}
    with pytest.raises(PromptscopeError, match="demos need the columns"):
        FewShotTask(df, demos=[{"text": "q9"}])
    with pytest.raises(PromptscopeError, match="Demonstration label"):
        FewShotTask(df, demos=[{"text": "q9", "label": "maybe"}])


# ----------------------------------------------------------------------------- real model, magic

def test_spread_end_to_end_on_tiny_model(tiny_llama):
    df = pd.DataFrame({"city": ["Paris", "Rome", "Tokyo", "Lima", "Oslo", "Cairo"],
                       "label": ["yes", "yes", "no", "no", "yes", "no"]})
    run = promptscope.format_spread(df, tiny_llama, formats=3, shots=1, progress=False)
    fmt = PromptFormat(**{f: run.tables["formats"].loc[0, f] for f in FEATURES})
    task = FewShotTask(df, shots=1, seed=0)
    scores = [tiny_llama.score([task.prompt(fmt, i)] * 2, task.continuations(fmt))
              for i in range(len(df))]
    preds = ["no" if s[0].logprob > s[1].logprob else "yes" for s in scores]  # choices sorted
    assert run.tables["formats"].loc[0, "accuracy"] == pytest.approx(
        np.mean([p == y for p, y in zip(preds, df["label"])]))


def test_spread_magic(ip, tiny_llama_dir):
    ip.run_line_magic("promptscope", f"model {tiny_llama_dir} --as spread-llama")
    ip.user_ns["cities"] = pd.DataFrame({"city": ["Paris", "Rome", "Tokyo", "Lima"],
                                         "label": ["yes", "yes", "no", "no"]})
    run = ip.run_line_magic("promptscope", "spread cities --formats 3 --shots 1 --budget 6 "
                            "--batch 2 -o sp --name magic-spread")
    assert ip.user_ns["sp"] is run and run.name == "magic-spread"
    assert run.params["evaluations"] <= 6 and run.kind == "format_spread"
    with pytest.raises(UsageError, match="no label column 'gold'"):
        ip.run_line_magic("promptscope", "spread cities --label gold")
    with pytest.raises(UsageError, match="no variable named 'nothing'"):
        ip.run_line_magic("promptscope", "spread nothing")
    with pytest.raises(UsageError, match="--budget"):
        ip.run_line_magic("promptscope", "spread cities --budget lots")
    whole = ip.run_line_magic("promptscope", "spread cities --formats 2 --shots 1 --budget 1.0 "
                              "--no-save")  # a fraction, as budget=1.0 is in Python
    assert whole.params["evaluations"] == whole.params["exhaustive_evaluations"] == 8


def test_prompt_magic_spread_over_alternatives(ip, tiny_llama_dir):
    """%%prompt --spread: each combination of the template's alternatives is a format; its
    accuracy is recomputed here from a plain run of the same cell."""
    ip.run_line_magic("promptscope", f"model {tiny_llama_dir} --as alt-spread-llama")
    ip.user_ns["cities"] = pd.DataFrame({"city": ["Paris", "Rome", "Tokyo", "Lima", "Oslo"],
                                         "label": ["yes", "yes", "no", "no", "yes"]})
    cell = "{{q=Is|Q: is}} {city} big?{{sep=\n| }}Answer:"
    spread = ip.run_cell_magic("prompt", "--vars cities --choices ' yes| no' --spread label "
                               "-o sp --no-save", cell)
    assert ip.user_ns["sp"] is spread and spread.kind == "format_spread"
    table = spread.tables["formats"]
    assert len(table) == 4 and set(table["evaluations"]) == {5}
    plain = ip.run_cell_magic("prompt", "--vars cities --choices ' yes| no' --no-save", cell)
    picked = plain.df[plain.df.chosen]
    for r in table.itertuples():
        part = picked[(picked.q == r.q) & (picked.sep == r.sep)]
        assert r.accuracy == pytest.approx((part.choice.str.strip() == part.label).mean())
    lo, hi = spread.params["interval"]
    assert (lo, hi) == (table.accuracy.min(), table.accuracy.max())
    assert set(spread.tables["features"]["feature"]) == {"q", "sep"}
    assert "spread" in spread.figure().layout.title.text
    with pytest.raises(UsageError, match="needs --choices and --vars"):
        ip.run_cell_magic("prompt", "--vars cities --spread label", cell)
    with pytest.raises(UsageError, match="no 'gold' column"):
        ip.run_cell_magic("prompt", "--vars cities --choices ' yes| no' --spread gold "
                          "--no-save", cell)
    with pytest.raises(UsageError, match="no \\{\\{a\\|b\\}\\} alternatives"):
        ip.run_cell_magic("prompt", "--vars cities --choices ' yes| no' --spread label "
                          "--no-save", "Is {city} big? Answer:")


def test_prompt_magic_posix_and_select(ip, tiny_llama_dir):
    """%%prompt --posix / --select run the Python functions on the cell's template and rows,
    with namespace variables filled in as a plain run fills them."""
    ip.run_line_magic("promptscope", f"model {tiny_llama_dir} --as sens-magic-llama")
    ip.user_ns["cities"] = pd.DataFrame({"city": ["Paris", "Rome", "Tokyo"],
                                         "gold": [" yes", " yes", " no"]})
    ip.user_ns["place"] = "Europe"
    cell = "{{Is|Q: is}} {city} in {place}?{{\n| }}Answer:"
    run = ip.run_cell_magic("prompt", "--vars cities --posix template --max-new-tokens 3 "
                            "-o px --no-save", cell)
    assert ip.user_ns["px"] is run and run.kind == "posix"
    rows = [{"city": c, "place": "Europe"} for c in ["Paris", "Rome", "Tokyo"]]
    direct = promptscope.posix(rows, "sens-magic-llama", template=cell, types=["template"],
                               max_new_tokens=3, progress=False, save=False)
    assert run.params["posix"] == pytest.approx(direct.params["posix"])
    given = ip.run_cell_magic("prompt", "--vars cities --posix --target '{gold}' --no-save",
                              cell)
    assert set(given.params["posix"]) == {"spelling", "template"}
    assert (given.tables["variants"]["response"] == given.tables["variants"]["item"].map(
        dict(enumerate(ip.user_ns["cities"]["gold"])))).all()
    sel = ip.run_cell_magic("prompt", "--vars cities --choices ' yes| no' --select gold "
                            "--no-save", cell)
    alone = promptscope.select_prompt(cell, rows, "sens-magic-llama", choices=" yes| no",
                                      label=None, progress=False, save=False)
    assert sel.kind == "prompt_selection" and "accuracy_selected" in sel.params
    assert np.allclose(sel.tables["candidates"]["mi_cbm"], alone.tables["candidates"]["mi_cbm"])
    for line, fragment in [("--vars cities --posix --choices ' yes| no'", "drop --choices"),
                           ("--vars cities --posix --steer", "drop --steer"),
                           ("--vars cities --select", "needs --choices"),
                           ("--select --choices ' yes| no'", "and --vars"),
                           ("--vars cities --posix --select", "drop --select")]:
        with pytest.raises(UsageError, match=fragment):
            ip.run_cell_magic("prompt", f"{line} --no-save", cell)


def test_spread_widget_runs_and_redraws():
    from promptscope.widgets import SpreadWidget

    df = _qdata(30)
    model = RuleModel(dict(zip(df["text"], df["label"])))
    widget = SpreadWidget(df, models=[model], budget=0.3, n_formats=6, shots=1, batch=5)
    widget.n_formats.value = 5
    assert widget.budget.value == 30  # percent, as typed into its readout
    run = widget.run()
    assert run is widget.result and run.params["n_formats"] == 5
    assert run.params["evaluations"] <= round(0.3 * 5 * 30)
    bars = widget.accuracy.figure.data[0]
    assert len(bars.x) == 5 and list(widget.trace.figure.data[0].x)[-1] == run.params[
        "evaluations"]
    assert "spread" in widget.status.value and "session" in widget.status.value
    # an error of a button's run shows in the widget, not in the log console
    bad = SpreadWidget(df, models=[model], n_formats=4, shots=40, save=False)
    bad.run_button.click()
    assert bad.status.value.startswith("<b>Error:</b> PromptscopeError: 40 demonstrations")
    quiet = SpreadWidget(df, models=[model], n_formats=4, shots=1, batch=5, save=False)
    quiet.run()
    assert "session" not in quiet.status.value  # none was saved


# ----------------------------------------------------------------------------- review fixes

def test_a_failed_choice_is_no_prediction_and_is_counted():
    """A NaN score won every max() comparison: it was predicted, and counted right when gold."""
    gold = {f"q{i}": ("yes" if i % 3 else "no") for i in range(6)}

    class Failing(RuleModel):
        def score(self, prompts, continuations, progress=None):
            out = super().score(prompts, continuations)
            for i, (p, c) in enumerate(zip(prompts, continuations)):
                qid = re.findall(r"q\d+", p)[-1]
                if c.strip() == "no" and qid == "q0":
                    out[i] = Score(math.nan, [], [], 0, error="HTTP 500")
                if c.strip() == "no" and qid == "q1":  # an API's "not among its top tokens"
                    out[i] = Score(-math.inf, [], [], 0)
            return out

    fmts = sample_formats(2, seed=0, inputs=["text"])
    with pytest.warns(UserWarning, match="could not be scored"):
        run = promptscope.format_spread(_qdata(6), Failing(gold), formats=fmts, shots=0,
                                        progress=False, save=False)
    q0 = run.df[run.df.example == 0]
    assert q0["failed"].all() and not q0["correct"].any() and q0["pred"].isna().all()
    assert run.params["failed_evaluations"] == len(q0)
    q1 = run.df[run.df.example == 1]  # gold "yes"; "no" at -inf is a score, not a failure
    assert not q1["failed"].any() and q1["correct"].all() and (q1["p_gold"] == 1.0).all()
    # ...and a failure is no wrong answer: each format's accuracy is over its scored rows
    table = run.tables["formats"].set_index("format")
    for k, rows in run.df.groupby("format"):
        scored = rows[~rows["failed"]]
        assert table.loc[k, "failed"] == rows["failed"].sum() == 1
        assert table.loc[k, "evaluations"] == len(scored)
        assert table.loc[k, "accuracy"] == pytest.approx(scored["correct"].mean())


def _stopped_spread(model, **kwargs):
    """A spread on 40 queries stopped (KeyboardInterrupt) after its first round, reloaded."""
    def stop(bandit):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as stopped:
        promptscope.format_spread(_qdata(), model, budget=0.5, on_round=stop, progress=False,
                                  **kwargs)
    return promptscope.load(stopped.value.partial_result.session_id)


class _HalfFailing(RuleModel):
    """RuleModel whose odd queries cannot be scored (an API that fails on them for good)."""

    def score(self, prompts, continuations, progress=None):
        out = super().score(prompts, continuations)
        return [Score(math.nan, [], [], 0, error="HTTP 500")
                if int(re.findall(r"q\d+", p)[-1][1:]) % 2 else s
                for p, s in zip(prompts, out)]


def test_failures_stay_out_of_a_reloaded_stopped_spread_and_the_live_widget():
    from promptscope.widgets import SpreadWidget

    gold = {f"q{i}": ("yes" if i % 3 else "no") for i in range(40)}
    run = _stopped_spread(_HalfFailing(gold), formats=4, batch=8, shots=0)
    assert "formats" not in run.tables  # rebuilt from the rows
    table = run.summary().set_index("format")
    for k, rows in run.df.groupby("format"):
        scored = rows[~rows["failed"]]
        assert table.loc[k, "evaluations"] == len(scored) > 0
        assert table.loc[k, "accuracy"] == pytest.approx(scored["correct"].mean())
    # the live bars: intervals around each format's accuracy over its scored evaluations
    widget = SpreadWidget(_qdata(), models=[_HalfFailing(gold)], budget=0.5, n_formats=4,
                          shots=0, batch=8)
    with pytest.warns(UserWarning, match="could not be scored"):
        widget.run()
    bar = widget.accuracy.figure.data[0]
    assert min(bar.error_y.array) >= 0 and min(bar.error_y.arrayminus) >= 0


def test_a_spread_with_nothing_scored_says_so_and_keeps_its_rows():
    class Down(RuleModel):
        def score(self, prompts, continuations, progress=None):
            return [Score(math.nan, [], [], 0, error="HTTP 503") for _ in prompts]

    gold = {f"q{i}": "yes" for i in range(12)}
    with pytest.raises(PromptscopeError, match="none of the .* evaluations could be scored"):
        promptscope.format_spread(_qdata(12), Down(gold), formats=3, shots=0, progress=False)
    (saved,) = promptscope.sessions().itertuples()
    assert len(promptscope.load(saved.id).df) == 3 * 12


def test_failed_evaluations_leave_the_search_rather_than_count_as_wrong():
    """Format 0 is right on every example it could be scored on, but half of its evaluations
    failed; format 1 is right on 80 %. Counting failures as wrong named format 0 the worst."""
    n = 40
    right = np.ones((2, n), bool)
    right[1, ::5] = False
    fails = np.zeros((2, n), bool)
    fails[0, ::2] = True

    def evaluate(pulls):
        return [[None if fails[p.format, i] else bool(right[p.format, i]) for i in p.examples]
                for p in pulls]

    b = run_bandit(evaluate, 2, n, budget=2 * n, batch=10, seed=0)  # exhaustive
    assert b.failed.tolist() == [n // 2, 0] and b.scored.tolist() == [n // 2, n]
    assert b.best() == 0 and b.worst() == 1
    mean, lo, hi = b.bounds()
    assert lo[0] == hi[0] == 1.0 and lo[1] == hi[1] == 0.8  # exact: all scoreable seen
    # a format none of whose examples can be scored is nobody's contender
    dead = run_bandit(lambda pulls: [[None if p.format == 0 else True for _ in p.examples]
                                     for p in pulls], 2, n, budget=2 * n, batch=10, seed=0)
    assert dead.best() == dead.worst() == 1 and list(dead.contenders(+1)) == [1]


def test_best_and_worst_are_two_formats():
    table = np.ones((2, 60), bool)
    table[1, ::5] = False
    b = run_bandit(lambda pulls: [table[p.format, list(p.examples)] for p in pulls], 2, 60,
                   budget=30, batch=10, seed=0)
    assert b.best() == 0 and b.worst() == 1  # format 0 also had the lowest upper bound


def test_formats_are_distinct_as_text_and_demos_never_show_the_query():
    from promptscope.organism.classify import classification_dataset

    fmts = sample_formats(24, seed=2, inputs=["text"])  # "asis" writes "text" as "lower" does
    assert len({f.pattern(["text"]) for f in fmts}) == 24
    same = FormatGrammar().neighbours(PromptFormat(casing="lower"), "casing", inputs=["text"])
    assert "asis" not in {f.casing for f in same}
    task = FewShotTask(classification_dataset(100, seed=0), shots=3)  # 41 duplicate rows
    assert not any(all(d[f] == task.rows[i][f] for f in task.inputs)
                   for i in range(len(task)) for d in task.demos[i])


def test_a_stopped_spread_reloads_with_its_formats_named():
    from promptscope.viz.format_spread import convergence, features_figure

    gold = {f"q{i}": ("yes" if i % 3 else "no") for i in range(40)}
    run = _stopped_spread(RuleModel(gold), formats=6, batch=6, shots=2)
    table = run.summary()
    assert not table["pattern"].str.startswith("format ").any()
    assert len(features_figure(run).data) >= 1
    assert features_figure(run).layout.xaxis.title.text == "feature = value"
    with pytest.raises(PromptscopeError, match="stopped before its search trace"):
        convergence(run)
    assert run.source.count("{text}") == 3  # shots=2: two demonstrations and the query
