from __future__ import annotations

import math
from typing import Any

import pandas as pd
import pytest

import promptscope
from promptscope.errors import ModelLoadError, PromptscopeError, TemplateError
from promptscope.models.hf import HFModel

TEMPLATE = "Is {city} in {{Europe|Asia}}? Answer:"
CITIES = [{"city": "Paris"}, {"city": "Tokyo"}, {"city": "Oslo"}]


def test_choices_mode_rows_probabilities_and_labels(tiny_llama):
    run = promptscope.run_prompt(TEMPLATE, tiny_llama, vars=CITIES, choices=" yes| no",
                                 progress=False)
    df = run.df
    assert len(df) == 3 * 2 * 2
    assert set(df.columns) >= {"variant", "row", "city", "alt1", "prompt", "choice", "logprob",
                               "prob", "rank", "chosen", "tokens", "time_ms"}
    sums = df.groupby("variant")["prob"].sum()
    assert sums.tolist() == pytest.approx([1.0] * 6)
    assert (df.groupby("variant")["chosen"].sum() == 1).all()
    first = df[df.variant == 1]
    assert first["prompt"].iloc[0] == "Is Paris in Asia? Answer:"
    assert first["alt1"].iloc[0] == "Asia"
    # The log-probs are the backend's scores of exactly these texts.
    direct = tiny_llama.score(["Is Paris in Asia? Answer:"] * 2, [" yes", " no"])
    assert first["logprob"].tolist() == pytest.approx([s.logprob for s in direct], abs=1e-5)
    summary = run.summary()
    assert len(summary) == 6
    assert {"top_choice", "p(top_choice)", "p(' yes')"} <= set(summary.columns)
    fig = run.figure()
    assert [t.name for t in fig.data] == ["' yes'", "' no'"]
    assert fig.layout.xaxis.title.text == "variant"
    assert list(fig.data[0].x[:2]) == ["Paris · Europe", "Paris · Asia"]  # row number left out
    assert math.isclose(sum(fig.data[0].y) + sum(fig.data[1].y), 6.0, rel_tol=1e-6)


def test_target_and_generate_modes(tiny_llama):
    run = promptscope.run_prompt("{{Hi|Hello}} there", tiny_llama, target=" friend",
                                 progress=False)
    assert run.df["target"].tolist() == [" friend"] * 2
    assert (run.df["logprob"] < 0).all()
    assert run.figure() is not None
    gen = promptscope.run_prompt("{{Hi|Hello}} there", tiny_llama, max_new_tokens=3, n=2,
                                 temperature=0.9, progress=False)
    assert len(gen.df) == 4 and gen.df["sample"].tolist() == [0, 1, 0, 1]
    assert gen.params["temperature"] == 0.9


def test_chat_mode_scores_the_chat_formatted_prompt(tiny_llama):
    run = promptscope.run_prompt("Hi", tiny_llama, target=" yes", chat=True, progress=False)
    direct = tiny_llama.score([tiny_llama.chat_prompt("Hi")], [" yes"])[0]
    assert run.df["logprob"].iloc[0] == pytest.approx(direct.logprob, abs=1e-5)


def test_session_is_saved_and_loads_back_equal(tiny_llama):
    run = promptscope.run_prompt(TEMPLATE, tiny_llama, vars=pd.DataFrame(CITIES),
                                 choices=[" yes", " no"], name="capitals", progress=False)
    back = promptscope.load(run.session_id)
    assert back == run
    assert back.status == "done" and back.name == "capitals"
    assert back.model["name"] == "tiny-llama"
    listed = promptscope.sessions()
    assert listed["id"].tolist() == [run.session_id]
    assert listed["n_rows"].iloc[0] == len(run.df)
    saved = promptscope.Store.default().figures(run.session_id)
    assert "main" in saved and '"type":"bar"' in saved["main"].replace(" ", "")


def test_interrupt_keeps_finished_chunks(tiny_llama, monkeypatch):
    calls = {"n": 0}
    real = HFModel.score

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HFModel, "score", interrupted)
    with pytest.raises(KeyboardInterrupt) as info:
        promptscope.run_prompt(TEMPLATE, tiny_llama, vars=CITIES, choices=" yes| no",
                               chunk_size=2, progress=False)
    partial = info.value.partial_result
    assert partial.status == "interrupted" and len(partial.df) == 2 * 2 * 2
    back = promptscope.load(partial.session_id)
    assert back.status == "interrupted" and back == partial


def test_missing_variable_in_any_row_fails_before_the_run(tiny_llama):
    rows = [{"city": "Paris"}, {"town": "Oslo"}]  # row 1 lacks the variable
    with pytest.raises(TemplateError, match=r"\{city\}.*row 1"):
        promptscope.run_prompt(TEMPLATE, tiny_llama, vars=rows, choices=" yes| no",
                               progress=False)
    assert promptscope.sessions().empty


def test_failure_mid_run_keeps_rows_and_earlier_sessions(tiny_llama, monkeypatch):
    ok = promptscope.run_prompt("Hi {{a|b}}", tiny_llama, target="!", progress=False)
    real, calls = HFModel.score, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HFModel, "score", failing)
    with pytest.raises(RuntimeError, match="device lost") as info:
        promptscope.run_prompt(TEMPLATE, tiny_llama, vars=CITIES, choices=" yes| no",
                               chunk_size=1, progress=False)
    failed = promptscope.load(info.value.partial_result.session_id)
    assert failed.status == "failed" and len(failed.df) == 2
    assert promptscope.Store.default().get(failed.session_id).error == "RuntimeError: device lost"
    assert promptscope.load(ok.session_id) == ok


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"choices": ""}, PromptscopeError, "non-empty answers"),
        ({"choices": " yes|"}, PromptscopeError, "non-empty answers"),
        ({"choices": "a", "target": "b"}, PromptscopeError, "not both"),
        ({"target": ""}, PromptscopeError, "empty"),
    ],
)
def test_bad_arguments(tiny_llama, kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        promptscope.run_prompt("Hi", tiny_llama, progress=False, **kwargs)
    assert promptscope.sessions().empty  # nothing half-made was saved


def test_template_names_may_not_shadow_result_columns(tiny_llama):
    with pytest.raises(TemplateError, match="clash"):
        promptscope.run_prompt("{prompt}", tiny_llama, vars={"prompt": "x"}, progress=False)


def test_no_model_loaded_is_a_clear_error(monkeypatch):
    import promptscope.models as models

    monkeypatch.setattr(models, "_default", [])
    monkeypatch.setattr(models, "_loaded", {})
    with pytest.raises(ModelLoadError, match="No model loaded"):
        promptscope.run_prompt("Hi", progress=False)


def test_load_model_caches_and_sets_default(tiny_llama_dir):
    a = promptscope.load_model(str(tiny_llama_dir), alias="cached")
    b = promptscope.load_model(str(tiny_llama_dir), alias="cached")
    assert a is b
    from promptscope.models import default_model

    assert default_model() is a
    listed = promptscope.list_models().set_index("name")
    assert listed.loc["cached", "default"] and listed["default"].sum() == 1


def test_row_columns_travel_with_their_variants(tiny_llama):
    rows = pd.DataFrame({"city": ["Paris", "Tokyo"], "gold": [" yes", " no"],
                         "options": [[1], [2]], "prompt": ["x", "y"]})
    run = promptscope.run_prompt(TEMPLATE, tiny_llama, vars=rows, choices=" yes| no",
                                 progress=False)
    assert run.df.groupby("variant")["gold"].first().tolist() == [" yes", " yes", " no", " no"]
    assert "options" not in run.df.columns  # not a scalar
    assert run.df["prompt"].iloc[0] == "Is Paris in Europe? Answer:"  # the result column wins


def test_summary_keeps_a_variant_whose_scoring_failed(tiny_llama, monkeypatch):
    real = HFModel.score

    def tokyo_fails(self, prompts, continuations, progress=None):
        scores = real(self, prompts, continuations, progress)
        for p, s in zip(prompts, scores):
            if "Tokyo" in p:
                s.error = "the backend gave up"
        return scores

    monkeypatch.setattr(HFModel, "score", tokyo_fails)
    run = promptscope.run_prompt("Is {city} big?", tiny_llama, vars=CITIES, choices=" yes| no",
                                 save=False, progress=False)
    summary = run.summary()
    assert summary["city"].tolist() == ["Paris", "Tokyo", "Oslo"]
    failed = summary[summary.city == "Tokyo"].iloc[0]
    assert pd.isna(failed["top_choice"]) and failed["error"] == "the backend gave up"
    assert summary[summary.city == "Paris"]["top_choice"].iloc[0] in (" yes", " no")


def test_variant_labels_stay_apart_when_cut_alike():
    from promptscope.viz.prompt import variant_labels

    df = pd.DataFrame({"variant": [0, 1], "alt1": ["Answer the following question briefly.",
                                                   "Answer the following question in detail."]})
    assert variant_labels(df).tolist() == ["#0 Answer the following qu…",
                                           "#1 Answer the following qu…"]
    df = pd.DataFrame({"variant": [0, 1], "alt1": ["short", "other"]})
    assert variant_labels(df).tolist() == ["short", "other"]


def test_variant_labels_show_the_templates_own_choices_not_carried_columns():
    from promptscope.viz.prompt import variant_labels

    df = pd.DataFrame({"variant": [0, 1, 2, 3], "row": [0, 0, 1, 1],
                       "city": ["Paris", "Paris", "Tokyo", "Tokyo"],
                       "answer": ["Europe", "Europe", "Asia", "Asia"],  # carried from the rows
                       "alt1": ["", "please ", "", "please "]})
    template = "{{|please }}Is {city} in Europe?"
    assert variant_labels(df, template).tolist() == ["Paris · ∅", "Paris · please ",
                                                     "Tokyo · ∅", "Tokyo · please "]
    # the row label only where nothing else tells variants apart
    same = df.assign(city="Paris")
    assert variant_labels(same, template).tolist() == ["0 · ∅", "0 · please ", "1 · ∅",
                                                       "1 · please "]
    # without the template every varying label column counts
    assert variant_labels(df).tolist()[0] == "Paris · Europe · ∅"
    # many long values: a label stays near 60 characters
    wide = pd.DataFrame({"variant": [0, 1], **{f"v{i}": [f"{'x' * 30}{i}a", f"{'y' * 30}{i}b"]
                                                 for i in range(6)}})
    labels = variant_labels(wide, " ".join(f"{{v{i}}}" for i in range(6)))
    assert labels.str.len().max() <= 6 * 10 + 5 * 3


def test_a_choice_may_hold_an_escaped_bar():
    from promptscope.analyses.prompt import parse_choices

    assert parse_choices(" a\\|b| c") == [" a|b", " c"]
    assert parse_choices([" a|b", " c"]) == [" a|b", " c"]


def test_figures_show_a_prompts_markup_as_text(tiny_llama):
    """Plotly reads <b>, <br>, <s>... in labels as markup: a Llama prompt's "<s>Paris" came out
    struck through. Variants, choices, names and titles are shown as typed."""
    import plotly.graph_objects as go

    from promptscope.viz.style import apply_style

    run = promptscope.run_prompt("Is {{<s>Paris|<b>Rome</b>|a<br>b & c}} big?", tiny_llama,
                                 choices=" <yes>| no", save=False, progress=False)
    fig = run.figure()
    assert list(fig.data[0].x) == ["&lt;s&gt;Paris", "&lt;b&gt;Rome&lt;/b&gt;",
                                   "a&lt;br&gt;b &amp; c"]
    assert fig.data[0].name == "' &lt;yes&gt;'"
    assert "&lt;yes&gt;" in fig.data[0].hovertemplate  # the <extra> box names the choice
    heat = apply_style(go.Figure(go.Heatmap(z=[[1, 2]], x=["<s>", "<|bos|>"], y=[0])), "<i>t")
    assert list(heat.data[0].x) == ["&lt;s&gt;", "&lt;|bos|&gt;"] and list(heat.data[0].y) == [0]
    assert heat.layout.title.text == "&lt;i&gt;t"
    gap = apply_style(go.Figure(go.Bar(x=pd.array(["a<b", pd.NA], dtype="string"), y=[1, 2])),
                      "t")  # a "string" column's gap stays a gap
    assert list(gap.data[0].x) == ["a&lt;b", None]
    target = promptscope.run_prompt("Is {{Paris|Rome}} big?", tiny_llama, target=" <b>yes</b>",
                                    save=False, progress=False)
    assert "&lt;b&gt;" in target.figure().layout.yaxis.title.text


def test_figures_of_runs_with_gaps_and_failures():
    """A label column with a missing value (pandas 3 keeps NaN through astype(str)), and the
    heatmap form (over 40 variants) with a failed variant or every variant failed."""
    import numpy as np

    from promptscope.result import Result
    from promptscope.viz.prompt import variant_labels

    gaps = pd.DataFrame({"variant": [0, 1], "gold": ["A", None]})
    assert variant_labels(gaps).tolist() == ["A", "nan"]
    rows = [{"variant": v, "x": f"v{v}", "prompt": "p", "choice": c, "logprob": -1.0,
             "prob": np.nan if v == 3 else 0.5, "rank": 1, "chosen": c == " a" and v != 3,
             "n_tokens": 1, "tokens": ["a"], "time_ms": 1.0}
            for v in range(45) for c in (" a", " b")]
    params = {"mode": "choices", "choices": [" a", " b"]}
    fig = Result("prompt", pd.DataFrame(rows), params=params).figure()
    assert fig.data[0].type == "heatmap" and len(fig.data[0].y) == 45
    failed = pd.DataFrame(rows).assign(prob=np.nan, chosen=False)
    assert len(Result("prompt", failed, params=params).figure().data[0].y) == 45


def test_a_huge_runs_figure_shows_its_first_variants_and_says_so(monkeypatch):
    """A 250 k-variant run drew a 17 MB heatmap that froze JupyterLab for seconds."""
    from promptscope.result import Result
    from promptscope.viz import prompt as viz

    monkeypatch.setattr(viz, "MAX_VARIANTS_SHOWN", 50)
    rows = [{"variant": v, "x": f"v{v}", "prompt": "p", "choice": c, "logprob": -1.0,
             "prob": 0.5, "rank": 1, "chosen": c == " a", "n_tokens": 1, "tokens": ["a"],
             "time_ms": 1.0} for v in range(120) for c in (" a", " b")]
    fig = Result("prompt", pd.DataFrame(rows),
                 params={"mode": "choices", "choices": [" a", " b"]}).figure()
    assert len(fig.data[0].y) == 50 and fig.data[0].y[0] == "v0"
    assert "the first 50 of 120 variants" in fig.layout.title.text
    target = pd.DataFrame([{**r, "target": " a"} for r in rows if r["choice"] == " a"])
    fig = Result("prompt", target, params={"mode": "target", "target": " a"}).figure()
    assert len(fig.data[0].x) == 50 and "of 120 variants" in fig.layout.title.text


def test_widget_status_escapes_the_users_text():
    from promptscope.result import Result
    from promptscope.widgets.steering import answers_status

    df = pd.DataFrame({"steered": [False, True], "choice": [" <b>", " <img onerror=x>"],
                       "chosen": [True, True]})
    status = answers_status("<i>mine</i>", Result("prompt", df, params={}))
    assert "<i>" not in status and "&lt;img" in status and "<b>&lt;i&gt;" in status


def test_rows_the_template_never_reads_give_a_warning(tiny_llama):
    rows = [{"city": "Paris"}, {"city": "Tokyo"}]
    with pytest.warns(UserWarning, match=r"uses none of vars' columns \(city\), so its 2 rows "
                                         r"give the same prompt"):
        run = promptscope.run_prompt("Is {city in Europe?", tiny_llama, vars=rows,
                                     choices=" yes| no", progress=False, save=False)
    assert run.df["prompt"].unique().tolist() == ["Is {city in Europe?"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a column read by the target alone counts as read
        promptscope.run_prompt("Is it in Europe?", tiny_llama, vars=rows, target=" {city}",
                               progress=False, save=False)


def test_a_result_shows_as_text_too_and_counts_its_summary(tiny_llama, monkeypatch):
    import IPython.display

    run = promptscope.run_prompt(TEMPLATE, tiny_llama, vars=CITIES, choices=" yes| no",
                                 progress=False)
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *a, **k: shown.append((a, k)))
    run._ipython_display_()
    (bundle,), raw = shown[0]
    assert raw == {"raw": True} and bundle["text/plain"] == run._repr_text()
    assert bundle["text/html"] == run._repr_html_()
    text = run._repr_text()
    head = text.splitlines()[0]
    assert head.startswith("prompt · ") and "12 rows (the summary below: 6; all in .df)" in head
    assert run.session_id in head and "Is Paris in Asia? Answer:" in text
    assert "12 rows (the summary below: 6; all in .df)" in run._repr_html_()
    # an unnamed session is named after its template, not its id again
    assert promptscope.sessions()["name"].iloc[0] == f"prompt: {TEMPLATE}"


def test_a_ctrl_c_anywhere_in_recording_leaves_no_session_running(tiny_llama):
    """Wherever a Ctrl-C lands in the recorder, the store or the run's context managers
    (creating the session, writing a chunk, finishing, a second Ctrl-C while finishing), the
    exception carries the rows, the store holds exactly them, and no session stays "running":
    one whose clean-up the Ctrl-C cut off at its very start is marked interrupted by the next
    run."""
    from ctrl_c import CtrlCAt

    from promptscope.analyses._recorder import Recorder
    from promptscope.interrupts import running_frames
    from promptscope.store import Store

    files = ("analyses/_recorder.py", "promptscope/store/__init__.py", "contextlib.py")
    rows = [{"x": f"item{i}"} for i in range(4)]

    def run() -> Any:
        return promptscope.run_prompt("Is {x} big? A:", tiny_llama, vars=rows,
                                      choices=" yes| no", chunk_size=2, progress=False)

    store, k, stranded = Store.default(), 1, 0
    while True:
        before = {r.id for r in store.list()}
        with CtrlCAt(k, files) as ctrl_c:
            try:
                run()
            except KeyboardInterrupt as exc:
                stopped = exc
        if not ctrl_c.fired:
            break
        partial = getattr(stopped, "partial_result", None)
        for r in (r for r in store.list() if r.id not in before):
            stored = promptscope.load(r.id).df
            assert r.n_rows == len(stored) and not stored.duplicated(["variant", "choice"]).any()
            if r.status == "running":  # its clean-up never started: the next run marks it
                assert id(Recorder.unfinished[r.id]) not in running_frames(), ctrl_c.where
                stranded += 1
            elif r.status == "interrupted" and partial is not None:
                assert len(partial.df) == len(stored), ctrl_c.where
        k += 1
    assert k > 50 and stranded < k / 10  # every call was tried; most finish on their own
    run()
    assert all(r.status != "running" for r in store.list())


def test_a_session_made_by_hand_is_not_taken_for_a_stranded_run(tiny_llama):
    from promptscope.store import Store

    store = Store.default()
    sid = store.create("prompt", name="by hand")  # create -> append -> finish, as documented
    promptscope.run_prompt("Hi", tiny_llama, target=" there", progress=False)
    assert store.get(sid).status == "running"
