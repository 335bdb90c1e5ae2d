from __future__ import annotations

import json

import pytest
import torch

import promptscope
from promptscope.errors import PromptscopeError

TEMPLATE = "Context: <<{name} lives in {city}.>> Bob lives in Oslo. Where does {name} live?"
ROWS = [{"name": "Ann", "city": "Rome"}, {"name": "Eve", "city": "Lima"}]


def _eager_attentions(model, text):
    """What transformers' eager attention reports with output_attentions=True."""
    model.model.set_attn_implementation("eager")
    try:
        ids = torch.tensor([model.encode_prompt(text)])
        with torch.no_grad():
            return model.model(ids, output_attentions=True).attentions
    finally:
        model.model.set_attn_implementation("sdpa")


def test_captured_weights_equal_eager_attention(tiny_model):
    """Every layer with attention weights (a hybrid model's others have none), in a batch of
    two prompts of different lengths (left padding). Gemma 4's layers that reuse earlier keys
    computed the last query only when asked for the last logits."""
    layers = tiny_model.attention_layers
    rows = [*ROWS, {"name": "Maximilian", "city": "Rome"}]
    att = promptscope.attention(TEMPLATE, tiny_model, vars=rows,
                                layers=",".join(map(str, layers)), heads=[0, 2], progress=False)
    eager = _eager_attentions(tiny_model, "Context: Eve lives in Lima. Bob lives in Oslo. "
                                          "Where does Eve live?")
    w = att.tables["weights"]
    for i, layer in enumerate(layers):
        one = w[(w.variant == 1) & (w.layer == layer) & (w["head"] == 2)]
        ref = eager[i][0, 2]
        got = torch.zeros_like(ref)
        q, k = one["query"].to_numpy().copy(), one["key"].to_numpy().copy()
        got[q, k] = torch.tensor(one["weight"].to_numpy().copy())
        assert torch.allclose(got, ref, atol=1e-5), f"layer {layer}"
    assert set(w["layer"]) == set(layers) and set(w["head"]) == {0, 2}


def test_span_mass_sums_to_one_and_parts_follow_the_template(tiny_llama):
    att = promptscope.attention(TEMPLATE, tiny_llama, vars=ROWS, progress=False)
    df = att.df
    totals = df.groupby(["variant", "layer", "head"])["mass"].sum()
    assert totals.to_numpy() == pytest.approx(1.0, abs=1e-5)
    assert {"emphasis", "name", "text", "special"} <= set(df["part"])
    tokens = att.tables["tokens"]
    first = tokens[tokens.variant == 0]
    emphasised = "".join(first[first.part == "emphasis"]["token"]).replace("Ġ", " ")
    assert emphasised.strip() == "Ann lives in Rome."
    fig = att.figure()
    assert fig.data[0].type == "heatmap" and "emphasis" in fig.layout.title.text
    assert len(att.summary()) == 2


def test_capture_does_not_change_the_model_output(tiny_llama):
    text = "Context: Ann lives in Rome. Where does Ann live?"
    before = tiny_llama.score([text], [" Rome"])[0].logprob
    seen = []
    tiny_llama.forward_with_attention([text], [0, 1], lambda *a: seen.append(a[1]))
    assert sorted(seen) == [0, 1]
    assert tiny_llama.score([text], [" Rome"])[0].logprob == pytest.approx(before, abs=1e-6)


def test_steering_moves_attention_to_the_emphasis(tiny_llama):
    plain = promptscope.attention(TEMPLATE, tiny_llama, vars=ROWS[:1], matrices=False,
                                  progress=False)
    steered = promptscope.attention(TEMPLATE, tiny_llama, vars=ROWS[:1], matrices=False,
                                    steer={"heads": "1.0", "alpha": 0.01}, progress=False)
    assert "weights" not in plain.tables and steered.params["steer"]["heads"] == {"1": [0]}

    def mass(r, layer, head):
        d = r.df
        return d[(d.layer == layer) & (d["head"] == head) & (d.part == "emphasis")]["mass"].item()

    assert mass(steered, 1, 0) > 0.9 > mass(plain, 1, 0)  # PASTA at work on the steered head
    assert mass(steered, 1, 1) == pytest.approx(mass(plain, 1, 1), abs=1e-5)  # others untouched



def test_vector_steering_changes_attention_only_after_its_layer(tiny_llama):
    """A vector added to layer 0's output leaves layer 0's attention as it was and moves the
    attention of the layers after it (no emphasis needed)."""
    from promptscope.models.vectors import SteeringVector

    size = tiny_llama.model.config.hidden_size
    v = SteeringVector({0: torch.randn(size, generator=torch.Generator().manual_seed(0))}, size)
    unmarked = TEMPLATE.replace("<<", "").replace(">>", "")
    plain = promptscope.attention(unmarked, tiny_llama, vars=ROWS[:1], progress=False)
    steered = promptscope.attention(unmarked, tiny_llama, vars=ROWS[:1], progress=False,
                                    steer={"vector": v, "strength": 4.0})
    assert steered.params["steer"]["method"] == "vector"
    w0, w1 = (r.tables["weights"] for r in (plain, steered))
    before, after = (w0.layer == 0), (w0.layer == 1)
    assert w1[before]["weight"].to_numpy() == pytest.approx(w0[before]["weight"].to_numpy(),
                                                            abs=1e-6)
    assert abs(w1[after]["weight"].to_numpy() - w0[after]["weight"].to_numpy()).max() > 1e-2
    assert tiny_llama.vector_steering is None  # hooks gone after the block
    # Without emphasis or variables the figure leads with the prompt's text, not the BOS sink.
    bare = promptscope.attention("Ann lives in Rome. Where does Ann live?", tiny_llama,
                                 steer={"vector": v}, progress=False)
    assert "'text'" in bare.figure().layout.title.text

def test_explorer_widget_follows_its_controls(tiny_llama):
    from promptscope.widgets import AttentionExplorer

    att = promptscope.attention(TEMPLATE, tiny_llama, vars=ROWS, progress=False)
    ex = AttentionExplorer(att)
    assert ex.head.label == "mean"  # shown as chosen (a None value showed as nothing)
    assert len(ex.tokens.children) == 2  # two variants side by side
    z0 = ex.tokens.children[0].figure.data[0].z
    ex.layer.value = 1
    ex.head.value = 3
    assert not (ex.tokens.children[0].figure.data[0].z == z0).all()
    assert "head 3" in ex.tokens.children[0].figure.layout.title.text
    ex.head.value = ex.head.options[0][1]
    assert ex.head.label == "mean" and "mean" in ex.tokens.children[0].figure.layout.title.text
    ex.variants.value = (1,)
    assert len(ex.tokens.children) == 1
    ex.part.value = "name"
    assert "'name'" in ex.mass.figure.layout.title.text


def test_bad_layers_and_heads(tiny_llama):
    with pytest.raises(PromptscopeError, match="layer.*out of range"):
        promptscope.attention("hi", tiny_llama, layers=[7], progress=False)
    with pytest.raises(PromptscopeError, match="head.*out of range"):
        promptscope.attention("hi", tiny_llama, heads="9", progress=False)


def test_prompt_magic_attention(ip, tiny_llama_dir):
    ip.run_line_magic("promptscope", f"model {tiny_llama_dir} --as att-llama")
    att = ip.run_cell_magic("prompt", "--attention --layers 0", "Say <<{{hi|yo}}>> now")
    assert att.kind == "attention" and set(att.df["layer"]) == {0}
    assert att.df["variant"].nunique() == 2
    steered = ip.run_cell_magic("prompt", "--attention --steer --heads 0.1", "Say <<hi>> now")
    assert steered.params["steer"]["heads"] == {"0": [1]}
    from promptscope.models.vectors import SteeringVector

    size = json.loads((tiny_llama_dir / "config.json").read_text())["hidden_size"]
    ip.user_ns["v"] = SteeringVector({0: torch.ones(size)}, size)
    moved = ip.run_cell_magic("prompt", "--attention --steer vector --vector v --strength 2",
                              "Say hi now")
    assert moved.params["steer"]["method"] == "vector" and moved.params["steer"]["strength"] == 2


def test_matrices_are_kept_while_they_fit(tiny_llama, monkeypatch):
    """By default the token x token weights are kept while the run holds at most
    ``MATRIX_WEIGHTS`` of them (an 8 B model's matrices of a few long prompts are gigabytes);
    beyond, the run keeps the per-part summary and warns. The count is exact: the limit set to
    the rows a run keeps still keeps them, one less does not. ``matrices=True`` keeps them
    whatever their number."""
    from promptscope.analyses import attention as module

    def run(**kwargs):
        return promptscope.attention(TEMPLATE, tiny_llama, vars=ROWS, layers="0,1", heads=[1],
                                     save=False, progress=False, **kwargs)

    rows = len(run(matrices=True).tables["weights"])
    monkeypatch.setattr(module, "MATRIX_WEIGHTS", rows)
    kept = run()
    assert len(kept.tables["weights"]) == rows and kept.params["matrices"] is True
    monkeypatch.setattr(module, "MATRIX_WEIGHTS", rows - 1)
    with pytest.warns(UserWarning, match=r"only the per-part summary.*matrices=True"):
        summary = run()
    assert "weights" not in summary.tables and summary.params["matrices"] is False
    assert summary.df.equals(kept.df)  # the summary is the same
    assert len(run(matrices=True).tables["weights"]) == rows


def test_tokens_read_as_text_and_bos_is_special_with_or_without_chat(tiny_llama):
    """Byte-level token names garbled non-ASCII ('Ã', '«' for ë); a chat template that spells
    out BOS made it 'template' text, moving the attention sink's mass to another part."""
    template = "Context: <<Zoë lives in Zürich.>> Where does Zoë live?"
    for chat in (False, True):
        att = promptscope.attention(template, tiny_llama, chat=chat, matrices=False,
                                    save=False, progress=False)
        tokens = att.tables["tokens"]
        assert tokens[tokens.token == "<s>"]["part"].tolist() == ["special"]
        marked = tokens[tokens.part == "emphasis"]["token"].tolist()
        assert "…" in marked  # ë and ü are two byte tokens each: the second shows "…"
        assert "".join(t for t in marked if t != "…").strip() == "Zoë lives in Zürich."


def test_attribution_tokens_read_as_text(tiny_llama):
    att = promptscope.attribute("Is {x} big?", tiny_llama, vars=[{"x": "Zürich"}],
                                target=" yes", level="tokens", save=False, progress=False)
    shown = [t for t in att.df.sort_values("position")["token"] if t != "…"]
    assert "".join(shown) == "Is Zürich big?"
