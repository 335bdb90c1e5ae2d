"""The shipped model organism: loading, chat template, and the three effects built into it."""

from __future__ import annotations

import random

import pytest
import torch

from promptscope.organism import MODEL_DIR, load_organism
from promptscope.organism import grammar as gr
from promptscope.organism.classify import (
    TRAIN_FORMATS,
    classification_dataset,
    label_of,
    plausible_formats,
)
from promptscope.organism.data import sample_documents
from promptscope.organism.measure import (
    _queries_with_demos,
    accuracy,
    answer_choices,
    conflict_examples,
    context_following,
    format_accuracies,
    grammar_accuracy,
    last_logits,
)
from promptscope.organism.world import (
    ATTRIBUTES,
    ENTITIES,
    FACTS,
    INSTRUCTIONS,
    qa_example,
    template_rows,
)

# Thresholds, tolerant around the measured numbers of docs/organism.md.
CONFLICT_RANGE = (0.3, 0.8)  # measured 42 % (600 held-out)
# Each instruction over uninstructed: measured +43 (context), +47 (prior) on 300 / 600 held-out
# (v11; v10's test 150 gave +23 for the context, which retrieval bounds: docs/organism.md).
INSTRUCTION_GAIN = 0.2
INSTRUCTION_FOLLOWED = {"context": 0.7, "prior": 0.9}  # measured 85 % and 100 % (300 each)
PASTA_HEADS = 5
PASTA_ALPHA = 0.01  # PASTA's usual coefficient
PASTA_CONFLICT_GAIN = 0.15  # the target; measured +41 (600 held-out, top 5 heads)
NOVEL_UNSTEERED = 0.6  # measured 83.7 % (chance 12.5 %): the narrow model misses some sentences
NOVEL_STEERED = 0.95  # measured 99 % at alpha 0.01 (100 % at 1e-4): it finds the value
CHAT_EXACT_MIN = 0.8  # replies that are exactly the right sentence: measured 100 %


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
    right = 0
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
            right += reply == answer + "<|end|>"
    assert right >= CHAT_EXACT_MIN * 2 * len(entities)


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
    """Uninstructed conflicts are followed part of the time (trained: less often the farther
    the claim stands from the question), and less with more sentences after the claim."""
    full = context_following(*organism, conflict_examples(200, seed=77))
    assert CONFLICT_RANGE[0] <= full["context"] <= CONFLICT_RANGE[1]
    assert full["context"] + full["prior"] >= 0.85  # measured 0.95 (600): the rest another value
    by = full["by_distractors"]
    assert by[0] > by[5] + 0.3
    rand = context_following(*random_organism, conflict_examples(200, seed=77))
    assert rand["context"] + rand["prior"] < 0.6


def test_instruction_moves_the_source(organism, random_organism):
    """Each instruction is rendered as trained and moves the answer toward its source."""
    plain = context_following(*organism, conflict_examples(150, seed=78))
    told = {intent: conflict_examples(150, seed=79, intent=intent) for intent in INSTRUCTIONS}
    for intent, exs in told.items():
        assert {e.instruction for e in exs} == set(INSTRUCTIONS[intent])
        assert all(e.prompt.endswith(f"\n{e.instruction}\nAnswer:{e.answer_lead}") for e in exs)
        assert all(e.answer_lead == f" {e.entity} is" if e.attribute == "color"
                   else e.answer_lead == f" {e.entity} lives in" for e in exs)
        assert accuracy(*random_organism, exs) < 0.5
    for intent, exs in told.items():
        assert context_following(*organism, exs)[intent] >= plain[intent] + INSTRUCTION_GAIN


@pytest.mark.parametrize("intent", INSTRUCTIONS)
def test_instruction_decides_the_source(organism, intent):
    exs = conflict_examples(120, seed=78, intent=intent)
    assert accuracy(*organism, exs) >= INSTRUCTION_FOLLOWED[intent]


def test_template_rows_carry_the_instruction():
    from promptscope.organism.world import INSTRUCTED_TEMPLATE, STEERING_TEMPLATE
    from promptscope.templates import parse_template

    plain = conflict_examples(5, seed=1)
    told = conflict_examples(5, seed=1, intent="context")
    for exs, tpl in ((plain, STEERING_TEMPLATE), (told, INSTRUCTED_TEMPLATE)):
        rows = template_rows(exs).to_dict("records")
        texts = [next(parse_template(tpl).expand(r)).text for r in rows]
        assert texts == [e.prompt for e in exs]
    assert set(template_rows(plain).intent) == {""}
    assert set(template_rows(told).intent) == {"context"}
    with pytest.raises(ValueError):
        qa_example(random.Random(0), kind="novel", intent="prior")


def _pasta_accuracy(kind: str, seed: int, n_heads: int, alpha: float) -> tuple[float, float]:
    """Held-out colour accuracy (answer = the context's value) unsteered and steered (PASTA
    with ``alpha``) on the best ``n_heads`` heads of a promptscope head profile."""
    import promptscope
    from promptscope.organism.world import STEERING_TEMPLATE

    model = promptscope.load_model("organism")
    colors = [f" {c}" for c in ATTRIBUTES["color"]]

    def rows(n, seed):
        rng = random.Random(seed)
        return template_rows([qa_example(rng, kind=kind, attribute="color")
                              for _ in range(n)])

    profile = rows(48, seed)
    promptscope.profile_heads(STEERING_TEMPLATE, profile.assign(choices=[colors] * 48), model,
                              name=f"{kind} heads", alpha=alpha, progress=False)
    run = promptscope.run_prompt(STEERING_TEMPLATE, model, vars=rows(200, seed + 1),
                                 choices=colors, progress=False,
                                 steer={"heads": f"profile:{kind} heads:{n_heads}",
                                        "alpha": alpha, "compare": True})
    chosen = run.df[run.df.chosen]
    acc = (chosen["choice"] == chosen["answer"]).groupby(chosen["steered"]).mean()
    return acc[False], acc[True]


def test_promptscope_pasta_raises_context_following():
    """Issue 5's effect 1 with the real feature: profile heads on conflicting contexts, steer
    the best toward the claim, measure on held-out conflicts."""
    before, after = _pasta_accuracy("conflict", 1, PASTA_HEADS, PASTA_ALPHA)
    assert after - before >= PASTA_CONFLICT_GAIN


def test_retrieval_of_novel_entities_works_and_steering_sharpens_it():
    before, after = _pasta_accuracy("novel", 1, PASTA_HEADS, PASTA_ALPHA)
    assert before >= NOVEL_UNSTEERED and after >= NOVEL_STEERED


def test_steering_is_identity_at_alpha_one_and_removed_after(organism):
    model, tok = organism
    exs = conflict_examples(8, seed=5)
    ids = [tok(e.prompt).input_ids for e in exs]
    plain = last_logits(model, ids)
    assert answer_choices(model, tok, exs, [(0, 0), (1, 1)], alpha=1.0) == answer_choices(
        model, tok, exs)
    answer_choices(model, tok, exs, [(0, 0), (1, 1)], alpha=0.01)
    assert torch.allclose(plain, last_logits(model, ids), atol=1e-5)


def test_format_spread(organism):
    acc = format_accuracies(*organism, plausible_formats(24), n_queries=24, seed=3)
    assert len(acc) == 24
    assert acc[acc.seen].accuracy.mean() >= 0.85
    assert acc.accuracy.max() - acc.accuracy.min() >= 0.2


def test_format_accuracy_demonstrations_never_show_the_query():
    # seed 3's blocks of 4 rows hold 4 queries whose own item and color (so label) is a demo
    queries, demos = _queries_with_demos(100, 3, seed=3)
    assert len(queries) == len(demos) == 100 and all(len(d) == 3 for d in demos)
    for q, d in zip(queries, demos, strict=True):
        assert not ((d["item"] == q["item"]) & (d["color"] == q["color"])).any()


def test_grammar_next_token(organism, random_organism):
    res = grammar_accuracy(*organism, n_texts=20, seed=11)
    assert res["accuracy"] >= 0.4 and res["accuracy"] >= 0.8 * res["optimal"]
    assert grammar_accuracy(*random_organism, n_texts=5, seed=11)["accuracy"] < 0.15


def test_generators_are_deterministic():
    first = [d.text for d in sample_documents(50, seed=3)]
    assert first == [d.text for d in sample_documents(50, seed=3)]
    assert first != [d.text for d in sample_documents(50, seed=4)]
    assert {d.kind for d in sample_documents(200, seed=3)} == {
        "facts", "qa", "recall", "chat", "classify", "grammar"}
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
    # a prefix that starts mid-sentence (no marker seen): the topics that allow its words
    # (it gave {} whenever its first word was not a sentence start)
    for _ in range(20):
        words = gr.words_of(gr.text(rng, 1))[:-1]  # one sentence, its "." dropped
        for cut in range(2, len(words) - 1):
            tail = words[cut:-1]
            dist = gr.next_word_distribution(tail)
            assert words[-1] in dist and abs(sum(dist.values()) - 1) < 1e-9
