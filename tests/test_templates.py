from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from promptscope.errors import TemplateError
from promptscope.templates import chunks, locate_message, parse_template


def test_cartesian_product_of_rows_and_groups_with_labels():
    t = parse_template("Is {city} in {{Europe|Asia}}{{q=?|!}}")
    rows = pd.DataFrame({"city": ["Paris", "Oslo", "Lima"]})
    variants = list(t.expand(rows))
    assert t.n_variants(3) == len(variants) == 12
    assert [v.index for v in variants] == list(range(12))
    assert variants[0].text == "Is Paris in Europe?"
    assert variants[3].text == "Is Paris in Asia!"
    assert variants[3].labels == {"row": 0, "city": "Paris", "alt1": "Asia", "q": "!"}
    assert variants[-1].labels["city"] == "Lima"


def test_dataframe_rows_keep_their_column_types():
    """An all-number frame: iterrows would make one float Series per row (3 -> "3.0")."""
    t = parse_template("{qty} apples at ${price}")
    (v,) = t.expand(pd.DataFrame({"qty": [3], "price": [0.5]}, index=["a"]))
    assert v.text == "3 apples at $0.5" and v.labels == {"row": "a", "qty": 3, "price": 0.5}


def test_columns_named_by_numbers_are_carried_by_name():
    from promptscope.analyses.prompt import extra_columns

    rows = pd.DataFrame({"x": ["a"], 0: ["gold"]})
    t = parse_template("{x}?")
    (v,) = t.expand(rows, carry=extra_columns(rows, t))
    assert v.labels == {"row": 0, "x": "a", "0": "gold"}


def test_emphasis_is_stripped_and_recorded_as_span():
    t = parse_template("Context: <<{fact}>> Question: who?")
    (v,) = t.expand({"fact": "Ann lives in Rome."})
    assert v.text == "Context: Ann lives in Rome. Question: who?"
    (start, end), = v.emphasis
    assert v.text[start:end] == "Ann lives in Rome."


def test_namespace_fallback_and_row_precedence():
    t = parse_template("{a}-{b}")
    (v,) = t.expand({"a": 1}, namespace={"a": 9, "b": 2})
    assert v.text == "1-2"


def test_single_brace_json_is_literal_and_escapes_work():
    t = parse_template('{"k": 1} \\{{x\\}} a\\|b')
    (v,) = t.expand()
    assert v.text == '{"k": 1} {{x}} a|b'


def test_escaped_pairs_and_one_option_groups():
    """\\{{ is a literal {{ (it was { followed by a variable), and {{name}} (a Jinja or
    Mustache habit) is refused instead of rendering the word "name"."""
    (v,) = parse_template("Use \\{{name\\}} and \\<<b\\>>").expand({"name": "Ann"})
    assert v.text == "Use {{name}} and <<b>>" and not v.emphasis
    with pytest.raises(TemplateError, match="closes no"):
        parse_template("Use \\{{name}} in Jinja")
    with pytest.raises(TemplateError, match=r"'\{\{name\}\}' at line 1, column 7 has one "
                                            r"option. Write \{name\} for a variable"):
        parse_template("Hello {{name}}")


def test_names_are_python_identifiers_unicode_too():
    v, _ = parse_template("{città} è {{tipo=bella|grande}}").expand({"città": "Roma"})
    assert v.text == "Roma è bella" and v.labels == {"città": "Roma", "tipo": "bella"}


def test_empty_option_allowed():
    t = parse_template("{{|please }}help")
    assert [v.text for v in t.expand()] == ["help", "please help"]


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("a {{b|c", "never closed"),
        ("a }} b", "closes no"),
        ("a {{x|{{y|z}}}}", "Nested"),
        ("<<a <<b>> >>", "Nested '<<'"),
        ("a >> b", "closes no '<<'"),
        ("{{}}", "Empty alternatives"),
        ("{{g=a|b}} {{g=c|d}}", "named 'g'"),
        ("{x} {{x=a|b}}", "both a variable"),
        ("{row}", "reserved"),
    ],
)
def test_bad_templates_give_clear_errors(source, fragment):
    with pytest.raises(TemplateError, match=fragment):
        parse_template(source)


def test_missing_variable_names_the_columns():
    t = parse_template("{city} {country}")
    with pytest.raises(TemplateError, match=r"\{country\}.*row 0 has the columns city\)\. "
                                            r"Define `country`"):
        list(t.expand([{"city": "Paris"}]))
    with pytest.raises(TemplateError, match=r"\{cty\} has no value \(row 'a' has the columns "
                                            r"city\)\. Did you mean \{city\}\?"):
        list(parse_template("{cty}").expand(pd.DataFrame({"city": ["Paris"]}, index=["a"])))


def test_bad_rows_type():
    with pytest.raises(TemplateError, match="list of dicts"):
        list(parse_template("{a}").expand("abc"))
    with pytest.raises(TemplateError, match="row 1"):
        list(parse_template("{a}").expand([{"a": 1}, 5]))


def test_an_empty_template_or_a_list_of_prompts_is_refused_with_what_to_write():
    with pytest.raises(TemplateError, match="empty: write the prompt"):
        parse_template(" \n ")
    with pytest.raises(TemplateError, match=r"got list\. For several prompts"):
        parse_template(["Is Paris in Europe?", "Is Tokyo in Europe?"])


def test_expansion_is_lazy():
    t = parse_template("{{a|b|c|d|e|f|g|h|i|j}}" * 5)  # 10^5 variants
    gen = t.expand()
    first = next(gen)
    assert t.n_variants() == 100_000
    assert first.text == "aaaaa"


_plain = st.text(alphabet=st.characters(blacklist_characters="{}<>|=\\"), max_size=20)


_options = st.lists(_plain, min_size=2, max_size=3)


@given(st.lists(st.tuples(_plain, _options), max_size=4), _plain)
def test_fuzz_spans_locate_every_choice(pieces, tail):
    source = "".join(text + "{{" + "|".join(opts) + "}}" for text, opts in pieces) + tail
    if not source.strip():
        with pytest.raises(TemplateError, match="empty"):
            parse_template(source)
        return
    t = parse_template(source)
    for v in t.expand():
        for span in v.spans:
            if span.kind == "alt":
                assert v.text[span.start:span.end] == v.labels[span.name]
        assert v.text.endswith(tail)


@given(_plain)
def test_fuzz_plain_text_is_unchanged(text):
    if not text.strip():
        with pytest.raises(TemplateError, match="empty"):
            parse_template(text)
        return
    (v,) = parse_template(text).expand()
    assert v.text == text


def test_chunks_keep_the_order_and_part_same_text_with_other_marks():
    t = parse_template("{a}<<{b}>>{c}")
    rows = [{"a": "x ", "b": "y", "c": ""}, {"a": "", "b": "x", "c": " y"},
            {"a": "p", "b": "q", "c": "r"}, {"a": "x ", "b": "y", "c": ""}]
    got = [[v.index for v in c] for c in chunks(t.expand(rows), 8, steered=True)]
    assert got == [[0], [1, 2], [3]]  # 0 and 1 read "x y" with other marks; order kept
    assert [[v.index for v in c] for c in chunks(t.expand(rows), 3)] == [[0, 1, 2], [3]]


def test_locate_message_in_trimming_and_plain_chat_texts():
    assert locate_message("hi there", "<u>hi there</u><a>") == (3, 3, 11)
    assert locate_message("  hi there\n", "<u>hi there</u><a>") == (1, 3, 11)
    with pytest.raises(TemplateError, match="occurs more than once"):
        locate_message(" a ", "<user>a</user><assistant>")
    with pytest.raises(TemplateError, match="changes the message"):
        locate_message("hello", "<u>HELLO</u>")


def test_nan_check_names_the_row_when_the_index_repeats():
    rows = pd.DataFrame({"x": ["a", "b"], "y": [float("nan"), "c"]}, index=[5, 5])
    with pytest.raises(TemplateError, match=r"vars row 5 has no value for \['y'\]"):
        from promptscope.templates import check_rows

        check_rows(parse_template("{x} {y}"), rows)
