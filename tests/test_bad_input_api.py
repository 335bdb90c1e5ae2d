"""Bad input to the Python API: a short PromptscopeError before any work starts."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import promptscope
from promptscope.errors import PromptscopeError
from promptscope.models.vectors import SteeringVector

TEMPLATE = "Context: <<{name} lives in {city}.>> Bob lives in Oslo. Where does {name} live?"
ROWS = [{"name": n, "city": c, "answer": f" {c}", "choices": f" {c}| Oslo"}
        for n, c in [("Ann", "Rome"), ("Eve", "Lima")]]
LISTED = [{**r, "choices": r["choices"].split("|")} for r in ROWS]
CONTEXT = [f"Context: {n} is red.\nQuestion: What color is {n}?\nUse the context.\nAnswer:"
           for n in ("Ann", "Bob", "Cid")]
PRIOR = [p.replace("Use the context.", "Use what you know.") for p in CONTEXT]


def _vector(model, layer=1):
    size = model.model.config.hidden_size
    return SteeringVector({layer: torch.randn(size, generator=torch.Generator().manual_seed(0))},
                          size)


@pytest.fixture
def no_work(tiny_llama, monkeypatch):
    """The model refuses to score: an error must come before any measurement."""
    def boom(*args, **kwargs):
        raise AssertionError("the model was run before the input was checked")

    monkeypatch.setattr(tiny_llama, "score", boom)
    return tiny_llama


def _compare(model, rows, **kw):
    kw.setdefault("methods", {"CAA": {"vector": _vector(model), "strength": [0.0]}})
    return promptscope.compare_steering(TEMPLATE, rows, model, save=False, progress=False, **kw)


def test_row_choices_string_is_split_on_bar(tiny_llama):
    got, ref = _compare(tiny_llama, ROWS), _compare(tiny_llama, LISTED)
    assert got.params["baseline"] == ref.params["baseline"]
    knob = promptscope.find_knob(CONTEXT, PRIOR, tiny_llama, layers=[1])
    rows = pd.DataFrame({"name": ["Ann", "Bob"], "answer": [" red"] * 2, "prior": [" blue"] * 2,
                         "choices": [" red| blue| green"] * 2})
    got, ref = (promptscope.knob_sweep("Context: {name} is red.\nAnswer:", r, knob, tiny_llama,
                                       values=[0.0, 9.0], save=False, progress=False)
                for r in (rows, rows.assign(choices=[[" red", " blue", " green"]] * 2)))
    assert got.params["baseline"] == ref.params["baseline"]
    assert got.df.equals(ref.df)


def test_rows_without_choices_are_refused(no_work):
    bare = [{k: v for k, v in r.items() if k != "choices"} for r in ROWS]
    with pytest.raises(PromptscopeError, match="no 'choices' column; pass choices="):
        _compare(no_work, bare)
    with pytest.raises(PromptscopeError, match="Give the candidate answers"):
        _compare(no_work, bare, choices=None)
    with pytest.raises(PromptscopeError, match="at least two candidate"):
        _compare(no_work, [{**r, "choices": r["answer"]} for r in ROWS])


def test_methods_must_be_a_dict_of_options(no_work):
    with pytest.raises(PromptscopeError, match="methods must be a dict of label -> steer opt"):
        _compare(no_work, LISTED, methods=["pasta"])
    with pytest.raises(PromptscopeError, match="alpha must be a list of numbers"):
        _compare(no_work, LISTED, methods={"PASTA": {"heads": "all", "alpha": ["low"]}})


def test_knob_values_must_be_numbers(no_work):
    knob = promptscope.find_knob(CONTEXT, PRIOR, no_work, layers=[1])  # reads states, no score
    rows = pd.DataFrame({"name": ["Ann"], "answer": [" red"], "prior": [" blue"]})
    for values in (["low", "high"], {1: ["low"]}, "high"):
        with pytest.raises(PromptscopeError, match="must be a list of numbers"):
            promptscope.knob_sweep("{name}", rows, knob, no_work, values=values,
                                   choices=[" red", " blue"], save=False, progress=False)


def test_vector_strength_must_be_a_number(tiny_llama):
    v = _vector(tiny_llama)
    for strength, shown in (("3", "'3'"), (True, "True"), (float("inf"), "inf")):
        with pytest.raises(PromptscopeError, match=f"strength must be a number, not {shown}"):
            with promptscope.steer(tiny_llama, method="vector", vector=v, strength=strength):
                pass
    assert getattr(tiny_llama, "vector_steering", None) is None


def test_select_prompt_refuses_one_string_without_alternatives(no_work):
    rows = [{"item": "apple", "color": "red"}, {"item": "sky", "color": "blue"}]
    with pytest.raises(PromptscopeError, match="or one template with \\{\\{a\\|b\\}\\} alt"):
        promptscope.select_prompt("Is {item} {color}? Answer:", rows, no_work,
                                  choices=" yes| no", save=False, progress=False)


def test_icv_names_the_columns_present(tiny_llama):
    demos = pd.DataFrame({"input": ["a b", "c d"], "output": ["a b c", "c d e"]})
    with pytest.raises(PromptscopeError,
                       match=r"no 'x' column \(columns: \['input', 'output'\]\); pass x="):
        promptscope.in_context_vector(demos, tiny_llama)


def test_profile_heads_reads_choices_written_as_a_string(tiny_llama):
    """" Rome| Oslo" in a choices column is two candidates, as everywhere else (it was split
    into characters, and the answer was then 'not among the choices')."""
    run = [promptscope.profile_heads(TEMPLATE, rows, tiny_llama, layers=[1], save=False,
                                     progress=False).df for rows in (ROWS, LISTED)]
    pd.testing.assert_frame_equal(run[0], run[1])


def test_ipython_shows_the_message_not_promptscopes_frames(ip, capsys, monkeypatch):
    """In a notebook a Python API call with bad input shows the one message that says what to
    change, as the magics do; ``promptscope.errors.full_tracebacks`` brings the frames back."""
    from promptscope import errors

    cell = "import promptscope\npromptscope.parse_template('Say {{hi|hello')"
    ip.run_cell(cell)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and "TemplateError" in lines[0]
    assert "is never closed" in lines[0] and "templates.py" not in out
    monkeypatch.setattr(errors, "full_tracebacks", True)
    ip.run_cell(cell)
    out = capsys.readouterr().out
    assert "templates.py" in out and "is never closed" in out



def test_an_emphasis_found_in_no_prompt_is_refused(no_work, tmp_path):
    """An emphasis= string with a typo steered nothing, silently, in a run saved as steered."""
    store = promptscope.Store(tmp_path / "s.db")
    prompt = "Context: Ann lives in Rome. Bob lives in Oslo. Where does Ann live? Answer:"
    with pytest.raises(PromptscopeError, match=r"emphasis \['Ann lives in Paris.'\] occurs in "
                       "none of the prompts"):
        promptscope.run_prompt(prompt, no_work, choices=" Rome| Oslo", store=store,
                               steer={"heads": "all", "emphasis": "Ann lives in Paris."})
    assert store.list() == []  # refused before a session existed
    # (the template's own <<...>> marks steer: an unmatched extra string is no mistake there)
    marked = prompt.replace("Ann lives in Rome.", "<<Ann lives in Rome.>>")
    with pytest.raises(AssertionError, match="before the input was checked"):
        promptscope.run_prompt(marked, no_work, choices=" Rome| Oslo", save=False,
                               steer={"heads": "all", "emphasis": "Ann lives in Paris."})


def test_variants_an_emphasis_misses_are_counted_and_the_emphasis_saved(tiny_llama, tmp_path):
    rows = [{"who": "Ann"}, {"who": "Eve"}]
    with pytest.warns(UserWarning, match="1 of the variants contain none of the emphasis"):
        run = promptscope.run_prompt("Context: {who} lives in Rome. Where? Answer:", tiny_llama,
                                     vars=rows, choices=" Rome| Oslo", progress=False,
                                     store=promptscope.Store(tmp_path / "s.db"),
                                     steer={"heads": "all", "emphasis": "Ann lives in Rome."})
    assert run.params["unsteered_variants"] == 1
    assert run.params["steer"]["emphasis"] == ["Ann lives in Rome."]


@pytest.mark.parametrize("spec, match", [
    ({"vector": "v", "strenght": [1.0]}, r"Method 'bad': unknown option\(s\) \['strenght'\]"),
    ({"vector": "v", "strength": [1.0], "layers": [9]}, r"Method 'bad': Layer 9 is out of range"),
    ({"heads": "7.0", "alpha": [0.1]}, r"Method 'bad': Layer 7 is out of range"),
])
def test_every_compared_method_is_checked_before_any_sweep(no_work, spec, match):
    """A bad last method failed after the other methods' sweeps had run, without its name."""
    spec = {k: (_vector(no_work) if v == "v" else v) for k, v in spec.items()}
    methods = {"PASTA": {"heads": "all", "alpha": [0.1]}, "bad": spec}
    with pytest.raises(PromptscopeError, match=match):
        _compare(no_work, ROWS, methods=methods)


def test_a_control_task_error_says_it_is_the_control_tasks(no_work):
    rows = [{k: v for k, v in r.items() if k != "answer"} for r in ROWS]
    with pytest.raises(PromptscopeError, match=r"^The control task \(control=\(template, rows\)"
                                               r"\): Every row needs an 'answer' column"):
        _compare(no_work, ROWS, control=(TEMPLATE, rows))
