from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from IPython.core.error import UsageError

import promptscope


def test_load_ext_is_fast_and_imports_no_torch():
    code = textwrap.dedent("""
        import sys, time
        from IPython.testing.globalipapp import start_ipython
        ip = start_ipython()
        t = time.perf_counter()
        ip.run_line_magic("load_ext", "promptscope")
        took = time.perf_counter() - t
        heavy = [m for m in ("torch", "transformers", "pandas", "plotly") if m in sys.modules]
        print(took, heavy)
        assert "prompt" in ip.magics_manager.magics["cell"]
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    took, heavy = out.stdout.strip().split(" ", 1)
    assert heavy == "[]"
    assert float(took) < 0.5


def test_prompt_cell_with_vars_choices_and_out(ip, tiny_llama_dir, capsys):
    ip.run_line_magic("promptscope", f"model {tiny_llama_dir} --as magic-llama")
    assert "it is now the default model" in capsys.readouterr().out
    ip.user_ns["cities"] = [{"city": "Paris"}, {"city": "Tokyo"}]
    result = ip.run_cell_magic("prompt", '--vars cities --choices " yes| no" -o run --name caps',
                               "Is {city} in {{Europe|Asia}}? Answer:\n")
    run = ip.user_ns["run"]
    assert run is result and len(run.df) == 8 and run.name == "caps"
    assert run.model["name"] == "magic-llama"
    assert run.df["prompt"].iloc[0] == "Is Paris in Europe? Answer:"  # trailing newline dropped
    html = run._repr_html_()
    assert "Is Tokyo in Asia? Answer:" in html and run.session_id in html


def test_option_values_that_start_with_a_dash(ip, tiny_llama_dir):
    """argparse reads "-1|-2" as an option; the magics join it to its option instead."""
    ip.run_line_magic("promptscope", f"model {tiny_llama_dir} --as magic-llama")
    run = ip.run_cell_magic("prompt", '--choices "-1|-2" --name -neg --no-save', "2 - 3 =")
    assert run.df["choice"].tolist() == ["-1", "-2"] and run.name == "-neg"
    run = ip.run_cell_magic("prompt", "--targ -1 --no-save", "2 - 3 =")  # abbreviated
    assert run.df["target"].tolist() == ["-1"]
    with pytest.raises(UsageError, match="--choices: expected one argument"):
        ip.run_cell_magic("prompt", "--choices --no-save", "2 - 3 =")  # an option stays one


def test_namespace_variables_and_generation_options(ip, tiny_llama_dir):
    ip.run_line_magic("promptscope", f"model {tiny_llama_dir} --as magic-llama")
    ip.user_ns["who"] = "<b>Ann</b>"
    run = ip.run_cell_magic("prompt", "--max-new-tokens 3 --n 2 --temperature 0.7 --seed 3 "
                            "--no-save", "Hello {who}")
    assert run.session_id is None and len(run.df) == 2
    assert run.params["seed"] == 3 and run.params["max_new_tokens"] == 3
    assert "&lt;b&gt;Ann&lt;/b&gt;" in run._repr_html_()  # prompt text is escaped


@pytest.mark.parametrize(
    ("line", "cell", "fragment"),
    [
        ('--choices ""', "Hi", "non-empty answers"),
        ("--vars nowhere", "Hi {x}", "no variable named 'nowhere'"),
        ("--bogus", "Hi", "unrecognized arguments: --bogus"),
        ("--n two", "Hi", "invalid int value"),
        ('--choices "a', "Hi", "check the quotes"),
        ("", "Hi {{a|b", "never closed"),
        ("", "Hi {undefined_thing}", "Define `undefined_thing`"),
        ("--model ./no/such/folder", "Hi", "No model folder"),
    ],
)
def test_bad_input_is_a_short_usage_error(ip, tiny_llama_dir, line, cell, fragment):
    ip.run_line_magic("promptscope", f"model {tiny_llama_dir} --as magic-llama")
    before = promptscope.sessions()
    with pytest.raises(UsageError, match=fragment):
        ip.run_cell_magic("prompt", line, cell)
    assert len(promptscope.sessions()) == len(before)


def test_failed_run_hands_back_partial_rows(ip, tiny_llama_dir, monkeypatch):
    from promptscope.analyses import prompt
    from promptscope.errors import PromptscopeError
    from promptscope.models.hf import HFModel

    ip.run_line_magic("promptscope", f"model {tiny_llama_dir} --as magic-llama")
    real, calls = HFModel.score, []

    def failing_second_time(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise PromptscopeError("the backend gave up")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(HFModel, "score", failing_second_time)
    monkeypatch.setattr(prompt, "CHUNK_SIZE", 1)
    with pytest.raises(UsageError, match=r"gave up\n\(The 1 rows computed before this are saved"):
        ip.run_cell_magic("prompt", "--target ! -o partial", "Hi {{1|2}}")
    partial = ip.user_ns["partial"]
    assert partial.status == "failed" and len(partial.df) == 1
    assert promptscope.load(partial.session_id) == partial

    def crashing_second_time(self, *args, **kwargs):  # not our error: a bug, a CUDA fault...
        calls.append(1)
        if len(calls) % 2 == 0:
            raise RuntimeError("device-side assert")
        return real(self, *args, **kwargs)

    calls.clear()
    monkeypatch.setattr(HFModel, "score", crashing_second_time)
    with pytest.raises(RuntimeError, match="device-side assert"):
        ip.run_cell_magic("prompt", "--target ! -o crashed", "Hi {{1|2}}")
    assert ip.user_ns["crashed"].status == "failed" and len(ip.user_ns["crashed"].df) == 1


def test_promptscope_commands(ip, tiny_llama_dir, capsys):
    ip.run_line_magic("promptscope", "help")
    out = capsys.readouterr().out
    assert "model" in out and "sessions" in out and "--choices" in out
    assert "the %%prompt and %%reach options" in out
    ip.run_cell_magic("prompt", "--help", "Hi")
    assert capsys.readouterr().out.count("usage: %%prompt") == 1  # printed once
    ip.run_line_magic("promptscope", "--help")
    assert "COMMAND" in capsys.readouterr().out
    ip.run_line_magic("promptscope", f"model {tiny_llama_dir} --as magic-llama")
    run = ip.run_cell_magic("prompt", "--target !", "Hi {{a|b}}")
    listed = ip.run_line_magic("promptscope", "sessions --kind prompt")
    assert listed["id"].iloc[0] == run.session_id
    back = ip.run_line_magic("promptscope", f"load {run.session_id} -o again")
    assert back == run and ip.user_ns["again"] == run
    models = ip.run_line_magic("promptscope", "models")
    assert "magic-llama" in models["name"].tolist()
    assert ip.run_line_magic("promptscope", "store").endswith("sessions.sqlite")
    capsys.readouterr()
    assert ip.run_line_magic("promptscope", "store --compact").endswith("sessions.sqlite")
    assert capsys.readouterr().out.startswith("Freed ")
    assert promptscope.load(run.session_id) == run  # (the store still holds it)
    with pytest.raises(UsageError, match="invalid choice"):
        ip.run_line_magic("promptscope", "frobnicate")
    with pytest.raises(UsageError, match="No session"):
        ip.run_line_magic("promptscope", "load 1234")


def test_notebook_variables_fill_options_but_row_columns_come_first(ip, tiny_llama_dir,
                                                                    monkeypatch):
    """'{answer}' is a per-row target and '$5' a choice: IPython's own {name}/$name expansion
    of magic lines replaced them with notebook variables. promptscope fills {name} itself,
    leaving --vars columns to the rows."""
    ip.run_line_magic("promptscope", f"model {tiny_llama_dir} --as magic-llama")
    names = {"answer": "GLOBAL", "rows": [{"x": "Rome", "answer": " yes"},
                                          {"x": "Oslo", "answer": " no"}],
             "colors": " red| blue", "listed": [" big", " small"], "word": "yes",
             "unset_choices": None}
    for name, value in names.items():  # (the shell is shared by every test of the session)
        monkeypatch.setitem(ip.user_ns, name, value)
    run = ip.run_cell_magic("prompt", '--vars rows --target " {answer}"', "Is {x} big?")
    assert run.df["target"].tolist() == [" {answer}"] * 2  # the text given, not "GLOBAL"
    priced = ip.run_cell_magic("prompt", '--choices " $5| $10"', "It costs")
    assert set(priced.df["choice"]) == {" $5", " $10"}
    for option, want in (('"{colors}"', {" red", " blue"}), ("{listed}", {" big", " small"}),
                         ('"$colors"', {" red", " blue"})):
        run = ip.run_cell_magic("prompt", f"--vars rows --choices {option}", "Is {x} big?")
        assert set(run.df["choice"]) == want
    run = ip.run_cell_magic("prompt", '--target " {word}" --name "{word} run"', "Is it?")
    assert run.df["target"].tolist() == [" yes"] and run.name == "yes run"
    run = ip.run_cell_magic("prompt", '--vars rows --target " $answer"', "Is {x} big?")
    assert run.df["target"].tolist() == [" {answer}"] * 2  # a column: left to the rows
    with pytest.raises(UsageError, match="the notebook's unset_choices is a NoneType"):
        ip.run_cell_magic("prompt", '--choices "$unset_choices"', "Is it?")


def test_models_listing_with_nothing_loaded_says_how_to_load(ip, capsys, monkeypatch):
    from promptscope import models

    monkeypatch.setattr(models, "_loaded", {})
    monkeypatch.setattr(models, "_default", [])
    assert ip.run_line_magic("promptscope", "models") is None
    assert "No model loaded yet: `%promptscope model organism`" in capsys.readouterr().out
