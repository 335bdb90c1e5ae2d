"""Mistakes a notebook user makes in magics: a one-line message that says what to fix, given
before any session is created (so nothing is half-run or lost)."""

from __future__ import annotations

import pandas as pd
import pytest
from IPython.core.error import UsageError

import promptscope
from promptscope.errors import CapabilityError
from promptscope.models.base import Model

CELL = "Is {city} in {{Europe|Asia}}? Answer:"


@pytest.fixture
def loaded(ip, tiny_llama_dir):
    ip.run_line_magic("promptscope", f"model {tiny_llama_dir} --as bad-input-llama")
    return ip


def _refused(ip, line: str, cell: str, match: str) -> None:
    """The magic fails with a short message matching ``match`` and saves no session."""
    before = len(promptscope.sessions())
    with pytest.raises(UsageError, match=match) as err:
        ip.run_cell_magic("prompt", line, cell)
    assert len(str(err.value).splitlines()) <= 3
    assert len(promptscope.sessions()) == before


@pytest.mark.parametrize("value, match", [
    (5, "not int"),
    ("Paris", "not str"),
    (pd.DataFrame(columns=["city"]), "empty DataFrame"),
    ([], "empty list"),
    ({"city": ["Paris", "Tokyo"]}, r"vars\['city'\] holds several values.*pd.DataFrame"),
    ({"city": pd.Series(["Paris", "Tokyo"])}, r"vars\['city'\] holds several values"),
    ([{"city": "Paris"}, "Tokyo"], "row 1 is a str"),
    ((r for r in [{"city": "Paris"}]), r"not generator; pass list\(...\)"),
    (pd.Series(["Paris"]), r"not Series \(a Series: pass series.to_frame\(\)"),
    (pd.DataFrame([{"city": "Paris"}, {"country": "France"}]),
     r"vars row 1 has no value for \['city'\] \(NaN\); fill it"),
])
def test_vars_of_the_wrong_shape(loaded, value, match):
    loaded.user_ns["rows"] = value
    _refused(loaded, '--vars rows --choices " yes| no"', CELL, match)


def test_generation_settings_are_checked_first(loaded):
    loaded.user_ns["rows"] = [{"city": "Paris"}]
    _refused(loaded, "--vars rows --n 0", CELL, r"^Generation: n \(--n\) must be at least 1, "
             r"not 0\.$")
    # only the wrong setting is named, with its flag
    _refused(loaded, "--vars rows --temperature -1", CELL,
             r"^Generation: temperature \(--temperature\) must be >= 0 \(0: greedy\), not -1.0\.$")


def test_a_bare_notebook_name_as_choices_says_to_write_it_in_braces(loaded):
    loaded.user_ns["rows"] = [{"city": "Paris"}]
    loaded.user_ns["answers"] = [" yes", " no"]
    _refused(loaded, "--vars rows --choices answers", CELL,
             r"--choices answers is one answer.*write --choices \{answers\}")
    run = loaded.run_cell_magic("prompt", "--vars rows --choices {answers} --no-save", CELL)
    assert run.params["choices"] == [" yes", " no"]


def test_an_empty_cell_is_refused(loaded):
    _refused(loaded, '--choices " yes| no"', "  \n", "template is empty: write the prompt")


def test_a_trailing_comment_on_a_magic_line_is_ignored(loaded, tiny_llama_dir, capsys):
    loaded.run_line_magic("promptscope", f"model {tiny_llama_dir} --as bad-input-llama  "
                          "# the test model")
    assert "it is now the default model" in capsys.readouterr().out
    run = loaded.run_cell_magic("prompt", '--choices "#1|#2" --no-save  # comment', "Pick:")
    assert run.df["choice"].tolist() == ["#1", "#2"]  # a quoted '#' is text


def test_a_model_loaded_by_name_in_a_call_is_not_the_default(ip, tiny_llama_dir, monkeypatch):
    from promptscope import models

    monkeypatch.setattr(models, "_default", [])
    promptscope.run_prompt("Hi", str(tiny_llama_dir), target=" there", save=False)
    assert not promptscope.list_models()["default"].any()
    with pytest.raises(UsageError, match=r"No default model: .* loaded but not the default\. "
                                         r"Name one \(--model"):
        ip.run_cell_magic("prompt", "--target ' there' --no-save", "Hi")


def test_a_misspelt_model_name_gets_a_suggestion(ip):
    with pytest.raises(UsageError, match="No model 'organsim': did you mean 'organism'?"):
        ip.run_line_magic("promptscope", "model organsim")


def test_one_choice_is_not_a_ranking(loaded):
    loaded.user_ns["rows"] = [{"city": "Paris"}]
    _refused(loaded, '--vars rows --choices " yes, no"', CELL, "at least two choices.*--target")


def test_spread_labels_checked_before_the_run(loaded):
    loaded.user_ns["rows"] = [{"city": "Paris", "label": "yes"}, {"city": "Tokyo", "label": "no"}]
    _refused(loaded, '--vars rows --choices " Yes| No" --spread label', CELL,
             r"label\(s\) \['no', 'yes'\] are not among the choices")
    _refused(loaded, '--vars rows --choices " yes| no" --spread answer', CELL,
             "no 'answer' column.*city, label")


def test_attention_layers_that_cannot_be_read(loaded):
    loaded.user_ns["rows"] = [{"city": "Paris"}]
    _refused(loaded, "--vars rows --attention --layers first", CELL,
             "Cannot read layers 'first'")


def test_vector_variable_of_the_wrong_type(loaded):
    loaded.user_ns["vv"] = [0.1, 0.2]
    _refused(loaded, "--steer vector --vector vv", "Ann is red.", "is a list, not a SteeringVector")


def test_misspelled_option_gets_a_suggestion(loaded):
    _refused(loaded, '--choises " yes| no"', CELL, "Did you mean --choices")


def test_reach_set_spec_with_a_bad_count(loaded):
    with pytest.raises(UsageError, match="top:N.*whole number"):
        loaded.run_cell_magic("reach", "--targets top:abc --k 1", "Ann is\n")


def test_session_kind_typo(loaded):
    with pytest.raises(UsageError, match="Did you mean 'prompt'"):
        loaded.run_line_magic("promptscope", "sessions --kind promt")
    assert promptscope.sessions(kind="posix").empty  # a real kind with no sessions is fine


def test_api_model_steering_refused_before_any_request():
    class APIModel(Model):
        name = "api"
        capabilities = frozenset({"score", "generate"})

        def begin_run(self, mode, chat):
            raise AssertionError("no request may be sent before the capability check")

        def score(self, prompts, continuations, progress=None):
            raise AssertionError

        def generate(self, prompts, **kw):
            raise AssertionError

    with pytest.raises(CapabilityError, match="Attention steering"):
        promptscope.run_prompt("<<Ann is red.>> Ann is", APIModel(), steer={}, save=False)


@pytest.mark.parametrize("line, match", [
    ("--attention --choices ' a| b' --n 4", r"--choices, --n: not used by --attention"),
    ("--attention --steer --compare --auto-emphasis",
     r"--compare, --auto-emphasis: not used by --attention"),
    ("--attribute --target ' a' --steer --auto-emphasis",
     r"--auto-emphasis: not used by --attribute.*<<...>>"),
    ("--attribute --n 3", r"--n: not used by --attribute \(it explains greedy answers\)\.$"),
    ("--target ' a' --max-new-tokens 5", r"--max-new-tokens: only when the answers are "
                                         "generated"),
    ("--steer vector --vector v --alpha 0.1 --heads 1.0",
     r"--heads, --alpha: steer attention: only with --steer pasta"),
    ("--choices ' a| b' --alpha 0.1", r"--alpha: only with --steer"),
    ("--choices ' a| b' --layers 2", r"--layers: only with --attention"),
    # PASTA alone ran, and said nothing of the vector
    ("--choices ' a| b' --steer --vector v --strength 8 --steer-layers 1",
     r"--vector, --strength, --steer-layers: a vector's options: only with --steer vector"),
    ("--choices ' a| b' --steer pasta --steer-start last", r"--steer-start: a vector's"),
    ("--choices ' a| b' --steer vector --vector v --steer-start two",
     r"--steer-start two: give a token position"),
])
def test_options_the_analysis_would_ignore_are_refused(loaded, line, match):
    _refused(loaded, line, "Context: <<Ann is in Rome.>> Where is Ann?", match)
