"""The shipped model organism: loading, chat template, and the three effects built into it."""

from __future__ import annotations

import random

import pytest
import torch

from promptscope.organism import MODEL_DIR, load_organism
from promptscope.organism import grammar as gr
from promptscope.organism._steering import emphasize
from promptscope.organism.classify import (
    TRAIN_FORMATS,
    classification_dataset,
    label_of,
    plausible_formats,
)
from promptscope.organism.data import sample_documents
from promptscope.organism.measure import (
    answer_choices,
    conflict_examples,
    context_following,
    format_accuracies,
    grammar_accuracy,
    last_logits,
)
from promptscope.organism.world import ATTRIBUTES, ENTITIES, FACTS, qa_example


@pytest.fixture(scope="module")
def organism():
    torch.set_num_threads(2)
    return load_organism()


@pytest.fixture(scope="module")
def random_organism(organism):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(organism[0].config).eval()
    return model, organism[1]


def test_shipped_folder_and_architecture(organism):
    model, tok = organism
    size = sum(p.stat().st_size for p in MODEL_DIR.iterdir())
    assert size < 20e6
    assert (MODEL_DIR / "model.safetensors").exists()
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert cfg.head_dim == 64
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert tok.bos_token and tok.eos_token and tok.pad_token


def test_tokenizer(organism):
    _, tok = organism
    for word in ["yes", "no", *ATTRIBUTES["color"], *ATTRIBUTES["city"]]:
        assert len(tok(" " + word, add_special_tokens=False).input_ids) == 1
    text = "Any text, even ünïcödé ✓ and 数字 42!"
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_generates(organism):
    model, tok = organism
    ids = tok("Question: What color is Brafu?\nAnswer:", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    reply = tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    assert reply.strip() == FACTS["Brafu"]["color"]


def test_chat_template(organism):
    model, tok = organism
    exact = 0
    entities = ENTITIES[:12]
    for entity in entities:
        for question, answer in [
            (f"What color is {entity}?", f"{entity} is {FACTS[entity]['color']}."),
            (f"Where does {entity} live?", f"{entity} lives in {FACTS[entity]['city']}."),
        ]:
            msgs = [{"role": "user", "content": question}]
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)
            assert tok.decode(ids["input_ids"][0]).endswith("<|assistant|>\n")
            out = model.generate(**ids, max_new_tokens=16, do_sample=False)
            reply = tok.decode(out[0, ids["input_ids"].shape[1]:])
            assert reply.endswith("<|end|>")  # the turn is closed, generation stops
            exact += reply == answer + "<|end|>"
    assert exact >= 0.55 * 2 * len(entities)


def test_prior_and_context(organism, random_organism):
    rng = random.Random(31)
    no_context = [qa_example(rng, kind="none") for _ in range(80)]
    agree = [qa_example(rng, kind="agree") for _ in range(80)]
    for exs in (no_context, agree):
        answers = answer_choices(*organism, exs)
        assert sum(a == e.target for a, e in zip(answers, exs, strict=True)) / len(exs) >= 0.9
        answers = answer_choices(*random_organism, exs)
        assert sum(a == e.target for a, e in zip(answers, exs, strict=True)) / len(exs) < 0.5


def test_conflicting_context_followed_part_of_the_time(organism, random_organism):
    easy = context_following(*organism, conflict_examples(200, seed=77, max_distractors=1))
    assert 0.25 <= easy["context"] <= 0.85
    assert easy["context"] + easy["prior"] >= 0.9
    # More distractors -> the prior wins more often (as trained).
    full = context_following(*organism, conflict_examples(200, seed=77))
    assert full["context"] < easy["context"] - 0.1
    rand = context_following(*random_organism, conflict_examples(200, seed=77, max_distractors=1))
    assert rand["context"] + rand["prior"] < 0.6


def test_promptscope_pasta_raises_retrieval_among_distractors():
    """The real feature on the organism: profile heads, steer the best, held-out gain."""
    import promptscope
    from promptscope.organism.world import STEERING_TEMPLATE, template_rows

    model = promptscope.load_model("organism")
    colors = [f" {c}" for c in ATTRIBUTES["color"]]

    def rows(n, seed):
        rng = random.Random(seed)
        return template_rows([qa_example(rng, kind="novel", attribute="color")
                              for _ in range(n)])

    profile = rows(48, 1)
    promptscope.profile_heads(STEERING_TEMPLATE, profile.assign(choices=[colors] * 48), model,
                              name="novel heads", progress=False)
    run = promptscope.run_prompt(STEERING_TEMPLATE, model, vars=rows(200, 2), choices=colors,
                                 progress=False, steer={"heads": "profile:novel heads:2",
                                                        "compare": True})
    chosen = run.df[run.df.chosen]
    accuracy = (chosen["choice"] == chosen["answer"]).groupby(chosen["steered"]).mean()
    assert accuracy[True] - accuracy[False] >= 0.08  # measured: 0.65 -> 0.81


def test_steering_helps_retrieval_without_prior(organism):
    rng = random.Random(8)
    novel = [qa_example(rng, kind="novel", n_distractors=5) for _ in range(120)]
    layer0 = [(0, h) for h in range(organism[0].config.num_attention_heads)]

    def accuracy(heads):
        answers = answer_choices(*organism, novel, heads)
        return sum(a == e.target for a, e in zip(answers, novel, strict=True)) / len(novel)

    assert accuracy(layer0) - accuracy([]) >= 0.05


def test_steering_helper_is_identity_without_effect(organism):
    model, tok = organism
    ex = conflict_examples(1, seed=5)[0]
    ids = tok(ex.prompt).input_ids
    plain = last_logits(model, [ids])
    keep = torch.zeros(1, len(ids), dtype=torch.bool)
    keep[0, 3:8] = True
    with emphasize(model, [(0, 0), (1, 1)], keep, alpha=1.0):
        same = last_logits(model, [ids])
    with emphasize(model, [(0, 0), (1, 1)], keep, alpha=0.01):
        steered = last_logits(model, [ids])
    assert torch.allclose(plain, same, atol=1e-5)
    assert not torch.allclose(plain, steered, atol=1e-3)
    assert model.config._attn_implementation == "sdpa"


def test_format_spread(organism):
    acc = format_accuracies(*organism, plausible_formats(24), n_queries=24, seed=3)
    assert len(acc) == 24
    assert acc[acc.seen].accuracy.mean() >= 0.85
    assert acc.accuracy.max() - acc.accuracy.min() >= 0.2


def test_grammar_next_token(organism, random_organism):
    res = grammar_accuracy(*organism, n_texts=20, seed=11)
    assert res["accuracy"] >= 0.4 and res["accuracy"] >= 0.8 * res["optimal"]
    assert grammar_accuracy(*random_organism, n_texts=5, seed=11)["accuracy"] < 0.15


def test_generators_are_deterministic():
    first = [d.text for d in sample_documents(50, seed=3)]
    assert first == [d.text for d in sample_documents(50, seed=3)]
    assert first != [d.text for d in sample_documents(50, seed=4)]
    assert {d.kind for d in sample_documents(200, seed=3)} == {
        "facts", "qa", "chat", "classify", "grammar"}
    df = classification_dataset(40, seed=1)
    assert df.equals(classification_dataset(40, seed=1))
    assert not df.equals(classification_dataset(40, seed=2))
    assert all(label_of(r.item, r.color) == r.label for r in df.itertuples())
    assert set(df.label) == {"yes", "no"}
    assert gr.text(random.Random(1)) == gr.text(random.Random(1))
    assert len(set(plausible_formats(24))) == 24 and plausible_formats(24)[:3] == list(
        TRAIN_FORMATS)


def test_grammar_distribution_is_consistent():
    rng = random.Random(0)
    for _ in range(20):
        words = gr.words_of(gr.text(rng, 1))
        for i in range(1, len(words)):
            dist = gr.next_word_distribution(words[:i])
            assert words[i] in dist and abs(sum(dist.values()) - 1) < 1e-9
