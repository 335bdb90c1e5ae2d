"""The context-sensitivity knob: a "set" direction, read and written at the last prompt token."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import promptscope
from promptscope.analyses.knob import knob_values
from promptscope.errors import PromptscopeError
from promptscope.models.vectors import SteeringVector, _Hooks, collect_states

CONTEXT = [f"Context: {n} is red.\nQuestion: What color is {n}?\nUse the context.\nAnswer:"
           for n in ("Ann", "Bob", "Cid", "Dan")]
PRIOR = [p.replace("Use the context.", "Use what you know.") for p in CONTEXT]
LAYER = 1


def _unit(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = model.model.config.hidden_size
    return SteeringVector({LAYER: torch.randn(size, generator=g)}, size, mode="set")


def test_set_mode_sets_the_coordinate_at_the_last_token_only(tiny_llama):
    knob = _unit(tiny_llama)
    u = torch.nn.functional.normalize(knob.vectors[LAYER], dim=0)
    n = len(tiny_llama.encode_prompt(CONTEXT[0]))
    plain = collect_states(tiny_llama, CONTEXT[:2], [LAYER], position="mean")
    firsts = [collect_states(tiny_llama, CONTEXT[:2], [LAYER], position=i) for i in range(n - 1)]
    with promptscope.steer(tiny_llama, vector=knob, strength=7.5, start="last"):
        last = collect_states(tiny_llama, CONTEXT[:2], [LAYER], position="last")
        early = [collect_states(tiny_llama, CONTEXT[:2], [LAYER], position=i)
                 for i in range(n - 1)]
        everything = collect_states(tiny_llama, CONTEXT[:2], [LAYER], position="mean")
    assert torch.allclose(last[:, 0] @ u, torch.full((2,), 7.5), atol=1e-4)
    for got, ref in zip(early, firsts):
        assert torch.equal(got, ref)  # earlier tokens untouched
    assert not torch.allclose(everything, plain)


def test_set_mode_on_every_token_and_zero_change_at_own_value(tiny_llama):
    knob = _unit(tiny_llama, seed=1)
    u = torch.nn.functional.normalize(knob.vectors[LAYER], dim=0)
    with promptscope.steer(tiny_llama, vector=knob, strength=-3.0):
        for i in range(4):
            h = collect_states(tiny_llama, CONTEXT[:1], [LAYER], position=i)[0, 0]
            assert abs(float(h @ u) + 3.0) < 1e-4
    own = float(collect_states(tiny_llama, CONTEXT[:1], [LAYER])[0, 0] @ u)
    base = tiny_llama.score(CONTEXT[:1], [" red"])[0].logprob
    with promptscope.steer(tiny_llama, vector=knob, strength=own, start="last"):
        same = tiny_llama.score(CONTEXT[:1], [" red"])[0].logprob
    assert abs(same - base) < 1e-4  # setting the coordinate to its own value changes nothing


def test_last_gate_prompt_pass_and_continuation_pass():
    from promptscope.models.vectors import VectorSteering

    hooks = _Hooks(VectorSteering(SteeringVector({0: torch.ones(4)}, 4, mode="set"),
                                  start="last"))
    ids = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    hooks.pre(None, (), {"input_ids": ids, "attention_mask": mask})
    assert hooks.gate[..., 0].tolist() == [[False] * 4 + [True]] * 2
    cont = torch.zeros(2, 3, dtype=torch.long)  # after a cached 5-token prompt, right-padded
    mask2 = torch.cat([mask, torch.tensor([[1, 1, 0], [1, 1, 1]])], dim=1)
    hooks.pre(None, (), {"input_ids": cont, "attention_mask": mask2})
    assert hooks.gate[..., 0].tolist() == [[True, True, False], [True, True, True]]


def test_last_gate_in_one_pass_over_prompt_and_continuation(tiny_llama):
    """An attention-free model scores a continuation in one pass over prompt + continuation;
    start="last" must steer there from the prompt's last token on, as the cached path does
    (it steered only the final position). Compared on the same model, both paths."""
    import copy

    from promptscope.models.hf import HFModel

    u = torch.nn.functional.normalize(torch.randn(tiny_llama.model.config.hidden_size,
                                                  generator=torch.Generator().manual_seed(3)),
                                      dim=0)
    knob = SteeringVector({0: u, 1: u}, u.numel(), mode="set")
    prompts = ["Is Paris in Europe? Answer:", "The cat"]
    conts = [" yes it is in Europe and always was", " sat on the mat"]
    full = HFModel(copy.deepcopy(tiny_llama.model), tiny_llama.tokenizer, name="full")
    full._attention_free = True  # the one-pass path that attention-free models take
    got = {}
    for model in (tiny_llama, full):
        with promptscope.steer(model, method="vector", vector=knob, strength=5.0, start="last"):
            got[model.name] = [s.token_logprobs for s in model.score(prompts, conts)]
    plain = [s.token_logprobs for s in tiny_llama.score(prompts, conts)]
    for cached, one_pass, unsteered in zip(got[tiny_llama.name], got["full"], plain):
        assert one_pass == pytest.approx(cached, abs=1e-4)
        assert cached[1:] != pytest.approx(unsteered[1:], abs=1e-3)  # (steering matters)


def test_find_knob_directions_and_intent_coordinates(tiny_llama):
    knob = promptscope.find_knob(CONTEXT, PRIOR, tiny_llama, name="ctx knob")
    assert knob.mode == "set" and knob.method == "knob"
    layers = tiny_llama.model.config.num_hidden_layers
    assert knob.layers == list(range(layers))
    hc = collect_states(tiny_llama, CONTEXT, knob.layers)
    hp = collect_states(tiny_llama, PRIOR, knob.layers)
    for j, layer in enumerate(knob.layers):
        u = knob.vectors[layer]
        assert abs(float(u.norm()) - 1) < 1e-5
        diff = hc[:, j].mean(0) - hp[:, j].mean(0)
        assert torch.allclose(u, diff / diff.norm(), atol=1e-5)
        facts = knob.meta["layers"][str(layer)]
        assert facts["positive"] == pytest.approx(float((hc[:, j] @ u).mean()), abs=1e-4)
        assert facts["positive"] > facts["negative"]
    with pytest.raises(PromptscopeError, match="at least two"):
        promptscope.find_knob(CONTEXT[:1], PRIOR, tiny_llama)
    # -knob points the other way: the intents' values flip sign, the sweep grid mirrors
    flipped = -knob
    layer = knob.layers[0]
    assert flipped.meta["layers"][str(layer)]["positive"] == pytest.approx(
        -knob.meta["layers"][str(layer)]["positive"])
    hc_flipped = float((hc[:, 0] @ flipped.vectors[layer]).mean())
    assert flipped.meta["layers"][str(layer)]["positive"] == pytest.approx(hc_flipped, abs=1e-4)
    mirrored = [-v for v in knob_values(knob, layer)][::-1]
    assert knob_values(flipped, layer) == pytest.approx(mirrored)
    with pytest.raises(PromptscopeError, match="strength sets its value"):
        _ = 2 * knob


def test_knob_sweep_rows_equal_direct_steering(tiny_llama):
    rows = pd.DataFrame({"name": ["Ann", "Bob", "Cid"], "answer": [" red"] * 3,
                         "prior": [" blue"] * 3})
    template = "Context: {name} is red.\nQuestion: What color is {name}?\nAnswer:"
    knob = promptscope.find_knob(CONTEXT, PRIOR, tiny_llama)
    sweep = promptscope.knob_sweep(template, rows, knob, tiny_llama, values=[-50.0, 50.0],
                                   layers=[0, LAYER], choices=[" red", " blue", " green"],
                                   save=False, progress=False)
    assert sweep.kind == "knob_sweep"
    assert list(zip(sweep.df.layer, sweep.df.value)) == [(0, -50.0), (0, 50.0), (LAYER, -50.0),
                                                          (LAYER, 50.0)]
    prompts = [template.format(name=n) for n in rows.name]
    for r in sweep.df.itertuples():
        with promptscope.steer(tiny_llama, vector=knob, strength=r.value, layers=[r.layer],
                               start="last"):
            scores = tiny_llama.score([p for p in prompts for _ in range(3)],
                                      [" red", " blue", " green"] * 3)
        cands = [" red", " blue", " green"]
        picks = [cands[max(range(3), key=lambda k, i=i: scores[3 * i + k].logprob)]
                 for i in range(3)]
        assert r.context == pytest.approx(sum(p == " red" for p in picks) / 3)
        assert r.prior == pytest.approx(sum(p == " blue" for p in picks) / 3)
    assert set(sweep.params["baseline"]) == {"context", "prior"}
    fig = sweep.figure()
    assert len(fig.data) == 4  # two sources x two layer panels
    assert set(sweep.summary().layer) == {0, LAYER}


def test_knob_sweep_checks_every_answer_and_finds_a_saved_knob_in_its_store(tiny_llama,
                                                                            tmp_path):
    from promptscope.store import Store

    rows = pd.DataFrame({"name": ["Ann"], "answer": [" red"], "prior": [" green"]})
    knob = promptscope.find_knob(CONTEXT, PRIOR, tiny_llama, layers=[LAYER])
    opts = dict(choices=[" red", " blue"], values=[0.0], save=False, progress=False)
    with pytest.raises(PromptscopeError, match=r"Row 0: its prior answer ' green' is not "
                                               r"among its choices"):  # it read 0 at every value
        promptscope.knob_sweep("{name}", rows, knob, tiny_llama, **opts)
    own = Store(tmp_path / "own.sqlite")
    knob.save("my knob", store=own)
    sweep = promptscope.knob_sweep("{name}", rows.assign(prior=" blue"), "my knob", tiny_llama,
                                   store=own, **opts)
    assert sweep.params["knob"] == knob.describe()


def test_knob_sweep_errors(tiny_llama):
    rows = pd.DataFrame({"name": ["Ann"], "answer": [" red"]})
    knob = promptscope.find_knob(CONTEXT, PRIOR, tiny_llama, layers=[LAYER])
    add = SteeringVector({LAYER: torch.ones(tiny_llama.model.config.hidden_size)},
                         tiny_llama.model.config.hidden_size)
    with pytest.raises(PromptscopeError, match="needs a knob"):
        promptscope.knob_sweep("{name}", rows, add, tiny_llama, save=False, progress=False)
    with pytest.raises(PromptscopeError, match="'prior' column"):
        promptscope.knob_sweep("{name}", rows, knob, tiny_llama, choices=[" red"], save=False,
                               progress=False)
    with pytest.raises(PromptscopeError, match="no measurements for layer 0"):
        promptscope.knob_sweep("{name}", rows.assign(prior=" blue"), knob, tiny_llama, layers=[0],
                               choices=[" red"], save=False, progress=False)
    with pytest.raises(PromptscopeError, match="'last'"):
        with promptscope.steer(tiny_llama, vector=knob, start="first"):
            pass


# ----------------------------------------------------------------------------- intent patching

NAMES = ("Ann", "Bob", "Cid", "Dan", "Eve", "Fay", "Gus", "Hal")
PAIRS_POS = [f"Context: {n} is red.\nQuestion: What color is {n}?\nUse the context.\nAnswer:"
             for n in NAMES]
PAIRS_NEG = [p.replace("Use the context.", "Use what you know.") for p in PAIRS_POS]


def test_patching_the_whole_state_after_the_last_layer_gives_the_positive_prediction(tiny_llama):
    from promptscope.analyses.knob import _next_token_logprobs

    last = tiny_llama.model.config.num_hidden_layers - 1
    hp = collect_states(tiny_llama, PAIRS_POS, [last])[:, 0]
    size = hp.shape[-1]
    want = _next_token_logprobs(tiny_llama, PAIRS_POS)
    plain = _next_token_logprobs(tiny_llama, PAIRS_NEG)
    full = _next_token_logprobs(tiny_llama, PAIRS_NEG, last, hp)
    whole_basis = _next_token_logprobs(tiny_llama, PAIRS_NEG, last, hp, torch.eye(size))
    assert not torch.allclose(plain, want, atol=1e-4)
    assert torch.allclose(full, want, atol=1e-4)
    assert torch.allclose(whole_basis, want, atol=1e-4)
    # A direction orthogonal to every pair's difference changes nothing.
    diff = hp - collect_states(tiny_llama, PAIRS_NEG, [last])[:, 0]
    u = torch.randn(size, generator=torch.Generator().manual_seed(0))
    q, _ = torch.linalg.qr(torch.cat([diff.T, u[:, None]], dim=1))
    ortho = q[:, -1][None]  # the part of u orthogonal to the differences
    assert torch.allclose(_next_token_logprobs(tiny_llama, PAIRS_NEG, last, hp, ortho), plain,
                          atol=1e-4)


def test_intent_patching_result(tiny_llama):
    r = promptscope.intent_patching(PAIRS_POS, PAIRS_NEG, tiny_llama, answers=[" red"] * 8,
                                    choices=[" red", " blue"], ranks=(1, 2, 99), save=False,
                                    progress=False)
    layers = tiny_llama.model.config.num_hidden_layers
    assert r.kind == "intent_patching" and r.params["n_fit"] == 4 and r.params["n_test"] == 4
    assert r.params["ranks"] == [1, 2]  # a rank above the fitted pairs is dropped
    assert len(r.df) == layers * 4  # knob, top 1, top 2, full per layer
    last = r.df[(r.df.layer == layers - 1) & (r.df.patch == "full")].followed.item()
    assert last == r.params["baseline"]["positive"]
    assert set(r.summary().columns) >= {"layer", "full", "knob", "dims_for_90%"}
    assert len(r.figure().data) == layers


def test_intent_patching_errors(tiny_llama):
    run = promptscope.intent_patching
    with pytest.raises(PromptscopeError, match="equal lists"):
        run(PAIRS_POS, PAIRS_NEG[:5], tiny_llama, answers=[" red"] * 8, choices=[" red", " b"])
    with pytest.raises(PromptscopeError, match="at least 4 pairs"):
        run(PAIRS_POS[:3], PAIRS_NEG[:3], tiny_llama, answers=[" red"] * 3, choices=[" red"])
    with pytest.raises(PromptscopeError, match="not among its choices"):
        run(PAIRS_POS, PAIRS_NEG, tiny_llama, answers=[" green"] * 8, choices=[" red", " blue"])
    with pytest.raises(PromptscopeError, match="share a first token"):
        run(PAIRS_POS, PAIRS_NEG, tiny_llama, answers=[" red"] * 8, choices=[" red", " red!"])


def test_organism_carries_the_instruction_in_one_direction_from_layer_1():
    """The organism's knob phase trains the intent into one direction of layer 1's output
    (interchange intervention). Measured on v11 (these 120 pairs, 60 of them tested): patching
    only the knob's direction (or the top principal direction) after layer 1 switches 63 % of
    the "Use what you know." answers to the context's, the whole state 77 % (v10: one direction
    0 %); after layer 0 nothing switches (0 %): the instruction reaches the last token in
    layer 1."""
    import random

    from promptscope.organism import world

    model = promptscope.load_model("organism")
    rng = random.Random(7)
    exs = [world.qa_example(rng, kind="conflict", intent="context",
                            n_distractors=rng.randint(0, 5)) for _ in range(120)]
    swap = dict(zip(world.INSTRUCTIONS["context"], world.INSTRUCTIONS["prior"]))
    prior = [e.prompt.replace(e.instruction, swap[e.instruction]) for e in exs]
    r = promptscope.intent_patching(
        [e.prompt for e in exs], prior, model, answers=[f" {e.context_value}" for e in exs],
        choices=[[f" {v}" for v in world.ATTRIBUTES[e.attribute]] for e in exs], layers=[0, 1],
        ranks=(1,), save=False, progress=False)
    share = {(k.layer, k.patch): k.followed for k in r.df.itertuples()}
    assert r.params["baseline"]["negative"] <= 0.1 and r.params["baseline"]["positive"] >= 0.6
    assert share[1, "full"] >= 0.6
    assert share[1, "knob"] >= 0.75 * share[1, "full"]  # v10: 0 % of 77 %
    assert share[1, "top 1"] >= 0.5
    assert share[0, "full"] <= 0.2


def _organism_rows(exs):
    from promptscope.organism import world

    return world.template_rows(exs).assign(
        choices=[[f" {v}" for v in world.ATTRIBUTES[e.attribute]] for e in exs])


def test_organism_knob_is_the_trained_direction_and_overrides_either_instruction():
    """The paper's task shape: one context sentence that contradicts the memorised value.
    Measured on v11 (this knob, these questions): the knob found at layer 1 is the direction
    the knob phase trained (cosine 0.984). Set at layer 1 to either intent's mean it decides the
    answer whatever the prompt says: uninstructed 92 % context unsteered -> 100 % prior / 100 %
    context; "Use the context." -> 97 % prior; "Use what you know." -> 100 % context. At layer 0
    the "use what you know" mean gives 12 % prior (unsteered 8 %)."""
    import json

    from promptscope.organism import MODEL_DIR, world
    from promptscope.organism.measure import conflict_examples

    model = promptscope.load_model("organism")
    told = {i: [e.prompt for e in conflict_examples(60, 501, max_distractors=0, intent=i)]
            for i in ("context", "prior")}
    knob = promptscope.find_knob(told["context"], told["prior"], model, layers=[0, 1])
    trained = json.loads((MODEL_DIR / "training_info.json").read_text())["knob"]
    assert trained["layer"] == 1
    assert float(knob.vectors[1] @ torch.tensor(trained["direction"])) >= 0.9

    # Each intent's own mean along the direction: "answer as if told the other instruction".
    grid = {k: [knob.meta["layers"][str(k)][i] for i in ("negative", "positive")]
            for k in (0, 1)}
    shares = {}
    for intent in (None, "context", "prior"):
        rows = _organism_rows(conflict_examples(60, 202, max_distractors=0, intent=intent))
        sweep = promptscope.knob_sweep(world.INSTRUCTED_TEMPLATE, rows, knob, model,
                                       values=grid, layers=[0, 1] if intent is None else [1],
                                       save=False, progress=False)
        shares[intent] = sweep
    plain = shares[None]
    low, high = (plain.df[plain.df.layer == 1].sort_values("value").iloc[i] for i in (0, 1))
    assert plain.params["baseline"]["context"] >= 0.8
    assert low.prior >= 0.9 and high.context >= 0.9
    layer0 = plain.df[plain.df.layer == 0].sort_values("value").iloc[0]
    assert layer0.prior <= 0.5
    assert plain.summary().layer[0] == 1
    for intent, source in (("context", "prior"), ("prior", "context")):
        sweep = shares[intent]
        assert sweep.params["baseline"][source] <= 0.05  # the instruction is followed
        end = sweep.df.sort_values("value").iloc[0 if source == "prior" else 1]
        assert end[source] >= 0.85  # ... and the knob overrides it
