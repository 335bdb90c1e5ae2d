"""Attribution with captum: agreement with direct captum calls, causality, steering, errors,
the magic, sessions and figures."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import promptscope
from promptscope.analyses.attribution import AttributionError, template_segments
from promptscope.errors import CapabilityError, TemplateError
from promptscope.templates import parse_template

TEMPLATE = "Context: <<{fact}>> Bob lives in Oslo. Where does {who} live?"
ROWS = [{"fact": "Ann lives in Rome.", "who": "Ann"}, {"fact": "Eve lives in Lima.", "who": "Eve"}]
# The first variant's parts, in order (what a direct captum call gets as segments).
PIECES = ["Context: ", "Ann lives in Rome.", " Bob lives in Oslo. Where does ", "Ann", " live?"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _captum_parts(model, method, target, **kwargs):
    from captum.attr import (
        FeatureAblation,
        LLMAttribution,
        ShapleyValueSampling,
        TextTemplateInput,
    )

    cls = {"ablation": FeatureAblation, "shapley": ShapleyValueSampling}[method]
    llm = LLMAttribution(cls(model.model), model.tokenizer)
    inp = TextTemplateInput("{}" * len(PIECES), values=PIECES)
    torch.manual_seed(0)
    return llm.attribute(inp, target=target, forward_in_tokens=False, **kwargs).seq_attr.tolist()


def test_segments_follow_the_template():
    tpl = parse_template("A {x} <<b {y} {{c|dd}}>> {{g=e|{x}f}}!")
    v = list(tpl.expand({"x": "X", "y": "Y"}))[3]
    segs = template_segments(tpl, v)
    assert [(s.part, s.kind, s.text) for s in segs] == [
        ("text1", "text", "A "), ("x", "var", "X"), ("text2", "text", " "),
        ("emphasis", "emph", "b Y dd"), ("text3", "text", " "), ("g", "alt", "Xf"),
        ("text4", "text", "!")]
    assert "".join(s.text for s in segs) == v.text


@pytest.mark.parametrize("method", ["ablation", "shapley"])
def test_parts_agree_with_a_direct_captum_call(tiny_llama, method):
    extra = {"n_samples": 3} if method == "shapley" else {}
    att = promptscope.attribute(TEMPLATE, tiny_llama, vars=ROWS, target=" Rome", method=method,
                                save=False, progress=False, **extra)
    first = att.df[att.df.variant == 0].sort_values("segment")
    assert first["part"].tolist() == ["text1", "emphasis", "text2", "who", "text3"]
    assert first["text"].tolist() == PIECES
    ref = _captum_parts(tiny_llama, method, " Rome", **extra)
    assert first["attribution"].tolist() == pytest.approx(ref, abs=1e-5)
    # the logprob column is run_prompt's score of the same target
    run = promptscope.run_prompt(TEMPLATE, tiny_llama, vars=ROWS, target=" Rome", save=False,
                                 progress=False)
    assert att.df.groupby("variant")["logprob"].first().tolist() == pytest.approx(
        run.df["logprob"].tolist(), abs=1e-4)


def test_part_perturbations_run_as_one_batch_per_step(tiny_llama):
    """captum's LLM forward takes one prompt at a time; promptscope scores each step's perturbed
    prompts together: ablating 5 parts is the whole prompt, then one batch of the 5 ablations
    (captum's FeatureAblation scores the unperturbed input once more, in its own call). " Rome"
    is two tokens here, so each scoring is a prompt pass and a pass of the target's tokens over
    its cache."""
    batches = []
    hook = tiny_llama.model.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(len(kwargs["input_ids"])), with_kwargs=True)
    try:
        promptscope.attribute(TEMPLATE, tiny_llama, vars=ROWS[:1], target=" Rome",
                              method="ablation", save=False, progress=False)
    finally:
        hook.remove()
    assert sorted(batches) == [1, 1, 1, 1, 5, 5]


@pytest.mark.parametrize("method", ["ablation", "shapley"])
def test_token_perturbation_agrees_with_a_direct_captum_call(tiny_llama, method):
    """Perturbation over tokens runs each captum step as one batch; the numbers must be those
    of captum's own one-prompt-at-a-time LLMAttribution (same seed for Shapley)."""
    from captum.attr import (
        FeatureAblation,
        LLMAttribution,
        ShapleyValueSampling,
        TextTokenInput,
    )

    extra = {"n_samples": 3} if method == "shapley" else {}
    att = promptscope.attribute(TEMPLATE, tiny_llama, vars=ROWS[:1], target=" Rome",
                                level="tokens", method=method, save=False, progress=False,
                                **extra)
    tok = tiny_llama.tokenizer
    text = "".join(PIECES)
    cls = {"ablation": FeatureAblation, "shapley": ShapleyValueSampling}[method]
    inp = TextTokenInput(text, tok, baselines=tok.pad_token_id, skip_tokens=[tok.bos_token_id])
    torch.manual_seed(0)
    ref = LLMAttribution(cls(tiny_llama.model), tok).attribute(
        inp, target=" Rome", forward_in_tokens=False, **extra)
    assert att.df["attribution"].tolist() == pytest.approx(ref.seq_attr.tolist(), abs=1e-5)


def test_token_perturbation_halves_its_batch_on_out_of_memory(tiny_llama, monkeypatch):
    """A batch of perturbed prompts that does not fit the GPU is split in halves until it does,
    with the same attributions (out-of-memory simulated above 3 rows)."""
    def run():
        return promptscope.attribute(TEMPLATE, tiny_llama, vars=ROWS[:1], target=" Rome",
                                     level="tokens", method="ablation", save=False,
                                     progress=False).df["attribution"].tolist()

    whole = run()
    real, rows = tiny_llama.model.forward, []

    def small_batches_only(*args, **kwargs):
        rows.append(len(kwargs["input_ids"]))
        if rows[-1] > 3:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(*args, **kwargs)

    monkeypatch.setattr(tiny_llama.model, "forward", small_batches_only)
    assert run() == pytest.approx(whole, abs=1e-6)
    assert max(rows) > 3  # (the whole batch was tried first)


def test_steered_token_ablation_is_each_tokens_log_prob_drop(tiny_llama):
    """Under PASTA, a token's ablation value is the steered log-prob drop when that token alone
    becomes the pad token, computed here one prompt at a time: the key bias must reach every
    row of the batch."""
    from promptscope.analyses.attribution import _runner
    from promptscope.models.steering import token_emphasis

    steer = {"heads": "L1", "alpha": 0.01}
    att = promptscope.attribute(TEMPLATE, tiny_llama, vars=ROWS[:1], target=" Rome",
                                level="tokens", method="ablation", steer=steer, save=False,
                                progress=False)
    text = "".join(PIECES)
    enc = tiny_llama.encode(text, offsets=True)
    ids, target = enc["input_ids"], tiny_llama.encode_continuation(" Rome")
    runner = _runner(tiny_llama)
    start = len(PIECES[0])
    runner.flags = token_emphasis(enc["offset_mapping"], [(start, start + len(PIECES[1]))], text)

    def logp(prompt):
        with torch.no_grad():
            out = runner(input_ids=torch.tensor([prompt + target], device=tiny_llama.device))
        logits = torch.log_softmax(out.logits[0].float(), -1)
        return sum(logits[len(prompt) - 1 + j, t].item() for j, t in enumerate(target))

    with promptscope.steer(tiny_llama, **steer, emphasis=PIECES[1]):
        whole = logp(ids)
        drops = [whole - logp(ids[:i] + [tiny_llama.tokenizer.pad_token_id] + ids[i + 1:])
                 for i in range(1, len(ids))]  # (all but the BOS)
        plain_runner_flags, runner.flags = runner.flags, None
        unsteered = logp(ids)
        runner.flags = plain_runner_flags
    assert att.df["attribution"].tolist() == pytest.approx(drops, abs=1e-4)
    assert att.df["logprob"].iloc[0] == pytest.approx(whole, abs=1e-4)
    assert abs(whole - unsteered) > 1e-3  # the steering moved the log-prob


def test_steered_parts_that_leave_the_same_text_keep_their_own_emphasis(tiny_llama):
    """In "<<Rome>>{city}" with city "Rome", removing either part leaves the text "Rome":
    emphasised when the city went, not when the emphasis did. Scored in one batch, both took
    one emphasis (the spans are looked up by text) and the emphasis got the city's value."""
    steer = {"heads": "all", "alpha": 0.01}
    att = promptscope.attribute("<<Rome>>{city}", tiny_llama, vars=[{"city": "Rome"}],
                                target=" is", method="ablation", steer=steer, save=False,
                                progress=False)
    got = dict(zip(att.df["part"], att.df["attribution"]))
    with promptscope.steer(tiny_llama, **steer, emphasis="Rome") as steering:
        steering.spans["RomeRome"] = [(0, 4)]  # (the first Rome only)
        whole = tiny_llama.score(["RomeRome"], [" is"])[0].logprob
        steering.spans["Rome"] = [(0, 4)]
        without_city = tiny_llama.score(["Rome"], [" is"])[0].logprob
        steering.spans["Rome"] = []
        without_emphasis = tiny_llama.score(["Rome"], [" is"])[0].logprob
    assert abs(without_city - without_emphasis) > 1e-3  # (the case is not vacuous)
    assert got["emphasis"] == pytest.approx(whole - without_emphasis, abs=1e-5)
    assert got["city"] == pytest.approx(whole - without_city, abs=1e-5)


def test_token_ig_agrees_with_a_direct_captum_call(tiny_gpt2):
    from captum.attr import LayerIntegratedGradients, LLMGradientAttribution, TextTokenInput

    att = promptscope.attribute(TEMPLATE, tiny_gpt2, vars=ROWS[:1], target=" Rome is",
                                level="tokens", n_steps=8, save=False, progress=False)
    assert att.params["method"] == "ig"
    tok = tiny_gpt2.tokenizer
    text = "".join(PIECES)
    lig = LayerIntegratedGradients(tiny_gpt2.model, tiny_gpt2.model.get_input_embeddings())
    inp = TextTokenInput(text, tok, baselines=tok.pad_token_id,
                         skip_tokens=[i for i in [tok.bos_token_id] if i is not None
                                      and tok.encode(text)[0] == i])
    ref = LLMGradientAttribution(lig, tok).attribute(inp, target=" Rome is", n_steps=8)
    assert att.df["attribution"].tolist() == pytest.approx(ref.seq_attr.tolist(), abs=1e-5)
    assert "".join(att.df["token"]) == text
    # parts from IG are the sums of their tokens
    parts = promptscope.attribute(TEMPLATE, tiny_gpt2, vars=ROWS[:1], target=" Rome is",
                                  method="ig", n_steps=8, save=False, progress=False)
    sums = att.df.groupby("segment_part", sort=False)["attribution"].sum()
    assert parts.df.set_index("part")["attribution"].to_dict() == pytest.approx(
        sums.to_dict(), abs=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3n", "gemma4"])
def test_ig_token_attributions_add_up_to_the_log_prob_change(tiny_family, arch):
    """Integrated gradients' completeness: the token attributions sum to the target's log-prob
    minus its log-prob with every prompt token at the baseline (the pad token). Gemma 3n and 4 look
    each token up in a second, per-layer table: IG over the input embedding alone leaves that
    part unattributed. (The tiny models' pad rows are zero, a point where RMSNorm jumps; a
    trained model's, the organism's included, are not: they get random rows here.)"""
    from promptscope.models.hf import per_layer_embedding

    model = tiny_family(arch)
    tables = [t for t in (model.model.get_input_embeddings(), per_layer_embedding(model.model))
              if t is not None]
    pad = model.tokenizer.pad_token_id
    saved = [t.weight[pad].clone() for t in tables]
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for t in tables:
                t.weight[pad] = torch.randn(t.weight.shape[1], generator=gen) * t.weight.std()
        att = promptscope.attribute(TEMPLATE, model, vars=ROWS[:1], target=" Rome", level="tokens",
                                    n_steps=128, save=False, progress=False)
        text = "".join(PIECES)
        ids = model.encode_prompt(text)
        n = len(att.df)  # the attributed tokens: all but the BOS
        assert "".join(att.df["token"]) == text and n == len(ids) - 1
        target = model.encode_prompt(text + " Rome")[len(ids):]

        def logp(prompt):  # of the target's tokens, each after the prompt and those before it
            x = torch.tensor([prompt + target], device=model.device)
            with torch.no_grad():
                out = torch.log_softmax(model.model(input_ids=x).logits[0].float(), -1)
            return sum(out[len(prompt) - 1 + j, t].item() for j, t in enumerate(target))

        # (per target token, the sum of its attributions is its log-prob's change)
        start = logp(ids[:1] + [pad] * n)
        change = logp(ids) - start
        assert att.df["attribution"].sum() == pytest.approx(change, abs=2e-3)
        assert abs(change) > 0.05  # not vacuous
        # the run reports the same check: the baseline's log-prob, and what IG missed
        assert att.df["baseline_logprob"].iloc[0] == pytest.approx(start, abs=1e-4)
        assert att.df["ig_gap"].iloc[0] == pytest.approx(
            change - att.df["attribution"].sum(), abs=1e-4)
    finally:
        with torch.no_grad():
            for t, row in zip(tables, saved):
                t.weight[pad] = row


# An organism question whose context contradicts what the organism knows (colours are
# memorised): 32 steps of integrated gradients miss 3.6 nats of its 4.5-nat change, 64 steps
# 0.46 (measured, organism v11).
RAMPLEX = {"before": "Lukkix lives in Cairo. Losgun lives in Quito. ", "key": "Ramplex is orange.",
           "after": " Fukfol resides in Delhi.", "question": "What color is Ramplex?",
           "lead": " Ramplex is", "answer": " orange"}


def test_ig_doubles_its_steps_until_the_attributions_add_up():
    """With a fixed ``n_steps=32`` the attributions do not add up to the log-prob's change and
    the run warns; by default the steps double until they do (64 here), without a warning."""
    import warnings

    from promptscope.organism import world

    organism = promptscope.load_model("organism", make_default=False)

    def run(**kwargs):
        return promptscope.attribute(world.STEERING_TEMPLATE, organism, vars=[RAMPLEX],
                                     target="{answer}", level="tokens", save=False,
                                     progress=False, **kwargs).df

    with pytest.warns(UserWarning, match=r"do not add up for 1 of 1 .*Raise n_steps \(now 32\)"):
        fixed = run(n_steps=32)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Integrated gradients")
        auto = run()
    for df in (fixed, auto):
        change = df["logprob"].iloc[0] - df["baseline_logprob"].iloc[0]
        assert df["ig_gap"].iloc[0] == pytest.approx(change - df["attribution"].sum(), abs=1e-6)
    assert fixed["ig_steps"].iloc[0] == 32 and abs(fixed["ig_gap"].iloc[0]) > 1.0
    assert auto["ig_steps"].iloc[0] == 64
    assert abs(auto["ig_gap"].iloc[0]) < 0.05 * auto["attribution"].abs().sum()


def test_ig_warns_when_the_gradients_are_not_the_models(fresh_tiny_llama):
    """A kernel without a backward pass gives gradients that are not the model's (bitsandbytes'
    4-bit CPU kernel did: the attributions summed to 0.07 where the log-prob moved by -0.14). IG
    cannot see that, but its attributions then do not add up: the run says so. Here the
    attention outputs are cut from the gradient: all that reaches the last position from the
    others."""
    from promptscope.analyses.attribution import IG_MAX_STEPS

    tiny_llama = fresh_tiny_llama
    embed = tiny_llama.model.get_input_embeddings().weight
    with torch.no_grad():  # a trained pad row (an all-zero one stops the doubling: below)
        embed[tiny_llama.tokenizer.pad_token_id] = embed[5]
    layers = tiny_llama.model.model.layers
    cut = [layer.self_attn.register_forward_hook(lambda m, i, out: (out[0].detach(), *out[1:]))
           for layer in layers]
    try:
        with pytest.warns(UserWarning, match="do not add up.*gradients are not exact"):
            att = promptscope.attribute(TEMPLATE, tiny_llama, vars=ROWS[:1], target=" Rome",
                                        level="tokens", save=False, progress=False)
    finally:
        for handle in cut:
            handle.remove()
    assert att.df["ig_steps"].iloc[0] == IG_MAX_STEPS


def test_ig_from_an_all_zero_pad_row_warns_and_says_why(tiny_family):
    """The tiny models' pad rows are zero (never trained), where Gemma's RMSNorm jumps: IG from
    there cannot add up at any number of steps, so they are not doubled (15x the work for
    nothing), and the warning names the cause."""
    model = tiny_family("gemma3")
    assert not model.model.get_input_embeddings().weight[model.tokenizer.pad_token_id].any()
    with pytest.warns(UserWarning, match="all-zero embedding row"):
        att = promptscope.attribute("Context: {x} lives in Rome.\nQ: Where does {x} live? A:",
                                    model, vars=[{"x": "Ann"}], target=" Rome", level="tokens",
                                    save=False, progress=False)
    assert abs(att.df["ig_gap"].iloc[0]) > 1.0 and att.df["ig_steps"].iloc[0] == 32


def test_parts_after_the_target_get_exactly_zero(tiny_llama):
    tpl = "Ann lives in Rome. Bob lives in{city} Note: {note} Thanks."
    rows = [{"city": " Oslo.", "note": "Ann is tall."}]
    for method in ("ablation", "shapley"):
        att = promptscope.attribute(tpl, tiny_llama, vars=rows, target_part="city",
                                    method=method, n_samples=4, save=False, progress=False)
        by = att.df.set_index("part")["attribution"]
        assert by["text2"] == 0.0 and by["note"] == 0.0 and by["text3"] == 0.0  # after it
        assert by["text1"] != 0.0  # before it: the model reads it
        assert by.isna()["city"]  # the target itself is no feature
    assert att.summary()["attr(city)"].isna().all()  # no value: not a 0 in the table
    # the log-prob is that of the part's own tokens where they stand
    lp = tiny_llama.score(["Ann lives in Rome. Bob lives in"], [" Oslo."])[0].logprob
    assert att.df["logprob"].iloc[0] == pytest.approx(lp, abs=1e-4)
    with pytest.raises(AttributionError, match="ablation, shapley and kernelshap"):
        promptscope.attribute(tpl, tiny_llama, vars=rows, target_part="city", method="ig")


def test_a_variable_used_twice_is_counted_once(tiny_llama):
    """Removing a repeated variable removes it everywhere: its rows share that one drop (each
    place holds half), so summary() and the bars show it once, and shares add up to 1."""
    tpl = "{x} and then {x} again, ok"
    rows = [{"x": "Rome"}]
    abl = promptscope.attribute(tpl, tiny_llama, vars=rows, target=" yes", method="ablation",
                                save=False, progress=False)
    full, without = tiny_llama.score(["Rome and then Rome again, ok",
                                      " and then  again, ok"], [" yes"] * 2)
    drop = full.logprob - without.logprob
    x = abl.df[abl.df.part == "x"]
    assert x["attribution"].tolist() == pytest.approx([drop / 2] * 2, abs=1e-5)
    assert abl.summary()["attr(x)"].iloc[0] == pytest.approx(drop, abs=1e-5)
    assert abl.figure().data[0].y[0] == pytest.approx(drop, abs=1e-5)
    for att in (abl, promptscope.attribute(tpl, tiny_llama, vars=rows, target=" yes",
                                           method="ig", save=False, progress=False)):
        per_part = att.df.groupby("part")["share"].sum()
        assert per_part.abs().sum() == pytest.approx(1.0)


def test_part_names_that_cannot_be_told_apart_are_refused(tiny_llama):
    with pytest.raises(AttributionError, match=r"\['text1'\] are also the automatic names"):
        promptscope.attribute("Say {text1} now", tiny_llama, vars=[{"text1": "hi"}],
                              target=" yes", save=False, progress=False)
    with pytest.raises(AttributionError, match=r"baselines name \['X'\].*\['x'\]"):
        promptscope.attribute("Is {x} big?", tiny_llama, vars=[{"x": "Rome"}], target=" yes",
                              baselines={"X": "a city"}, save=False, progress=False)


def test_variant_labels_stay_apart_when_long_values_are_cut_alike():
    from promptscope.viz.attribution import _variant_labels

    df = pd.DataFrame({"variant": [0, 1, 2, 3], "ctx": ["a long context sentence, one"] * 2 +
                       ["a long context sentence, two"] * 2, "alt1": ["lives", "stays"] * 2})
    assert list(_variant_labels(df, "{ctx} Ann {{lives|stays}}").values()) == [
        "#0 a long context sentence… · lives", "#1 a long context sentence… · stays",
        "#2 a long context sentence… · lives", "#3 a long context sentence… · stays"]


def test_across_variants_follows_the_chosen_answers_and_labels_by_what_varies(tiny_llama):
    from promptscope.viz.attribution import across_variants

    rows = [{"x": "Rome"}, {"x": "Oslo"}]
    att = promptscope.attribute("Is {x} big?", tiny_llama, vars=rows, choices=" yes| no",
                                method="ig", n_steps=4, save=False, progress=False)
    fig = across_variants(att)
    line = next(t for t in fig.data if t.name == "x")
    assert list(line.x) == ["Rome", "Oslo"]  # not IG's baseline columns
    want = att.df[(att.df.part == "x") & att.df.chosen].groupby("variant")["attribution"].sum()
    assert list(line.y) == pytest.approx(want.tolist())


def test_steered_attribution_sees_the_steered_model(tiny_llama):
    steer = {"heads": "all", "alpha": 0.01, "compare": True}
    att = promptscope.attribute(TEMPLATE, tiny_llama, vars=ROWS[:1], target=" Rome",
                                steer=steer, save=False, progress=False)
    plain = att.df[~att.df.steered].set_index("part")
    steered = att.df[att.df.steered].set_index("part")
    assert att.params["steer"]["compare"] is True
    ref_plain = promptscope.run_prompt(TEMPLATE, tiny_llama, vars=ROWS[:1], target=" Rome",
                                       save=False, progress=False)
    ref_steered = promptscope.run_prompt(TEMPLATE, tiny_llama, vars=ROWS[:1], target=" Rome",
                                         steer={"heads": "all", "alpha": 0.01}, save=False,
                                         progress=False)
    assert plain["logprob"].iloc[0] == pytest.approx(ref_plain.df.logprob[0], abs=1e-4)
    assert steered["logprob"].iloc[0] == pytest.approx(ref_steered.df.logprob[0], abs=1e-4)
    assert steered["logprob"].iloc[0] != pytest.approx(plain["logprob"].iloc[0], abs=1e-3)
    # Removing a part moves the emphasis: each perturbed prompt is steered on its own spans.
    without = "Context: <<Ann lives in Rome.>>Ann live?"  # text2 removed
    ref_removed = promptscope.run_prompt(without, tiny_llama, target=" Rome", save=False,
                                         steer={"heads": "all", "alpha": 0.01}, progress=False)
    assert steered.loc["text2", "attribution"] == pytest.approx(
        ref_steered.df.logprob[0] - ref_removed.df.logprob[0], abs=1e-4)


def test_choices_mark_the_chosen_answer(tiny_llama):
    att = promptscope.attribute(TEMPLATE, tiny_llama, vars=ROWS, choices=" Rome| Oslo",
                                save=False, progress=False)
    assert set(att.df["target"]) == {" Rome", " Oslo"}
    assert len(att.df) == 2 * 2 * 5
    run = promptscope.run_prompt(TEMPLATE, tiny_llama, vars=ROWS, choices=" Rome| Oslo",
                                 save=False, progress=False)
    got = att.df.drop_duplicates(["variant", "target"])
    assert got["chosen"].tolist() == run.df["chosen"].tolist()
    # the bar chart and the table show the chosen answers, as the heatmap does (the mean
    # with the rival answer mixed opposite signs: +3.8 and -3.4 showed as +0.19)
    chosen = att.df[att.df["chosen"]]
    want = chosen.groupby(["variant", "part"], sort=False)["attribution"].sum() \
        .groupby(level="part").mean()
    fig = att.figure()
    assert dict(zip(fig.data[0].x, fig.data[0].y)) == pytest.approx(want.to_dict())
    assert "chosen answers" in fig.layout.title.text
    assert "chosen" in att.summary().columns


def test_generated_answer_and_per_row_targets(tiny_llama):
    gen = promptscope.attribute(TEMPLATE, tiny_llama, vars=ROWS[:1], max_new_tokens=2,
                                save=False, progress=False)
    out = promptscope.run_prompt(TEMPLATE, tiny_llama, vars=ROWS[:1], max_new_tokens=2,
                                 save=False, progress=False)
    assert gen.df["target"].iloc[0] == out.df["output"].iloc[0]
    rows = [{**r, "gold": " " + r["fact"].split()[-1].rstrip(".")} for r in ROWS]
    per_row = promptscope.attribute(TEMPLATE, tiny_llama, vars=rows, target="{gold}",
                                    save=False, progress=False)
    assert per_row.df.groupby("variant")["target"].first().tolist() == [" Rome", " Lima"]


def test_errors_say_what_to_fix(tiny_llama):
    from promptscope.models.openai_api import OpenAIModel

    api = OpenAIModel("some-model", base_url="http://127.0.0.1:9/v1", api_key="k", check=False,
                      cache=False)
    # gradients need local weights (part ablation on an API model: tests/test_api.py)
    with pytest.raises(CapabilityError, match="local transformers model"):
        promptscope.attribute(TEMPLATE, api, vars=ROWS, target=" Rome", method="ig")
    with pytest.raises(AttributionError, match="'who' is empty in variant 0"):
        promptscope.attribute(TEMPLATE, tiny_llama, vars=[{"fact": "Ann is here.", "who": ""}],
                              target=" Rome", save=False)
    with pytest.raises(AttributionError, match="'alt1' is empty"):
        promptscope.attribute("Say {{|please}} hi", tiny_llama, target=" x", save=False)
    with pytest.raises(AttributionError, match="Unknown attribution method"):
        promptscope.attribute(TEMPLATE, tiny_llama, vars=ROWS, target=" x", method="lime")
    with pytest.raises(AttributionError, match="one of choices, target or target_part"):
        promptscope.attribute(TEMPLATE, tiny_llama, vars=ROWS, target=" x", choices=" a| b")
    with pytest.raises(AttributionError, match="vars rows do not have"):
        promptscope.attribute(TEMPLATE, tiny_llama, vars=ROWS, target="{gold}", save=False)
    with pytest.raises(TemplateError, match="<<"):
        promptscope.attribute("No emphasis {who}", tiny_llama, vars=ROWS, target=" x",
                              steer={"heads": "all"})
    for steps in (0, -4, 2.5, True):  # (0 once meant "the default" silently)
        with pytest.raises(AttributionError, match="n_steps must be a whole number >= 1"):
            promptscope.attribute(TEMPLATE, tiny_llama, vars=ROWS, target=" x", method="ig",
                                  n_steps=steps, save=False)


def test_session_is_saved_and_reloads_equal(tiny_llama):
    att = promptscope.attribute(TEMPLATE, tiny_llama, vars=ROWS, target=" Rome",
                                name="who carries it", progress=False)
    assert att.kind == "attribution" and att.session_id and att.status == "done"
    back = promptscope.load(att.session_id)
    assert back == att
    assert back.figure().data[0].type == "bar"
    assert back.figure().layout.xaxis.title.text == "template part"
    assert promptscope.sessions(kind="attribution")["name"].tolist() == ["who carries it"]


def test_figures_escape_text_and_show_values(tiny_llama):
    from promptscope.viz import attribution as viz

    att = promptscope.attribute(TEMPLATE, tiny_llama, target=" Rome", save=False,
                                vars=[{"fact": "<b>Ann</b> & co.", "who": "Ann"}, ROWS[1]],
                                steer={"heads": "all", "compare": True}, progress=False)
    page = viz.heatmap_html(att, variant=0, steered=True)
    assert "&lt;b&gt;Ann&lt;/b&gt; &amp; co." in page and "<b>Ann" not in page
    assert "<script" not in page and "http" not in page
    assert "emphasis: " in page and "steered (PASTA)" in page
    bars = viz.bar(att)
    assert [t.name for t in bars.data] == ["plain", "steered (PASTA)"]
    assert list(bars.data[0].x) == ["text1", "emphasis", "text2", "who", "text3"]
    moves = viz.across_variants(att, parts=["emphasis"])
    assert len(moves.data) == 2 and len(moves.data[0].y) == 2
    summary = att.summary()
    assert len(summary) == 4 and "attr(emphasis)" in summary.columns
    tokens = promptscope.attribute(TEMPLATE, tiny_llama, vars=ROWS[:1], target=" Rome",
                                   level="tokens", n_steps=4, save=False, progress=False)
    page = viz.heatmap_html(tokens)
    assert page.count("<span title=") == len(tokens.df) and "Rome" in page
    assert tokens.figure().data[0].type == "bar"


def test_magic_attribute(ip, tiny_llama_dir):
    from IPython.core.error import UsageError

    ip.run_line_magic("promptscope", f"model {tiny_llama_dir} --as attr-llama")
    ip.user_ns["people"] = ROWS
    run = ip.run_cell_magic("prompt", '--vars people --target " Rome" --attribute '
                            "--attr-method shapley --seed 1 -o att --name magic-attr",
                            TEMPLATE + "\n")
    assert ip.user_ns["att"] is run and run.kind == "attribution"
    assert run.params["method"] == "shapley" and run.params["seed"] == 1
    assert run.name == "magic-attr" and len(run.df) == 10
    tokens = ip.run_cell_magic("prompt", '--vars people --target " Rome" --attribute '
                               "--attr-level tokens --no-save", TEMPLATE)
    assert tokens.params["method"] == "ig" and "token" in tokens.df.columns
    with pytest.raises(UsageError, match="go with --attribute"):
        ip.run_cell_magic("prompt", "--attr-method ig", TEMPLATE)
    with pytest.raises(UsageError, match="is empty in variant"):
        ip.run_cell_magic("prompt", '--attribute --target " x"', "Say {{|please}} hi")


def test_chat_prompts_and_steered_answers(tiny_llama):
    att = promptscope.attribute(TEMPLATE, tiny_llama, vars=ROWS[:1], target=" Rome", chat=True,
                                save=False, progress=False)
    run = promptscope.run_prompt(TEMPLATE, tiny_llama, vars=ROWS[:1], target=" Rome", chat=True,
                                 save=False, progress=False)
    assert att.df["logprob"].iloc[0] == pytest.approx(run.df.logprob[0], abs=1e-4)  # one BOS
    assert att.df["text"].tolist() == PIECES  # the chat template's text is no part
    tokens = promptscope.attribute(TEMPLATE, tiny_llama, vars=ROWS[:1], target=" Rome",
                                   chat=True, level="tokens", n_steps=4, save=False,
                                   progress=False)
    assert "template" not in set(tokens.df["part"])  # (the chat template's own text)
    # the chat template's markup around the message is no feature: its special tokens took
    # half of IG's attribution, and parts from IG then missed most of the change
    assert not set(tokens.df["token"]) & set(tiny_llama.tokenizer.all_special_tokens)
    assert "".join(tokens.df["token"]) == "".join(PIECES)
    parts = promptscope.attribute(TEMPLATE, tiny_llama, vars=ROWS[:1], target=" Rome", chat=True,
                                  method="ig", n_steps=64, save=False, progress=False).df
    assert parts["attribution"].sum() == pytest.approx(
        parts["logprob"].iloc[0] - parts["baseline_logprob"].iloc[0], abs=0.05)
    steer = {"heads": "all", "alpha": 0.01}
    gen = promptscope.attribute(TEMPLATE, tiny_llama, vars=ROWS[:1], max_new_tokens=2,
                                steer={**steer, "compare": True}, save=False, progress=False)
    out = promptscope.run_prompt(TEMPLATE, tiny_llama, vars=ROWS[:1], max_new_tokens=2,
                                 steer=steer, save=False, progress=False)
    assert gen.df[gen.df.steered]["target"].iloc[0] == out.df["output"].iloc[0]


def test_ig_steps_go_in_batches_within_the_token_budget(tiny_llama, monkeypatch):
    """All of IG's steps in one forward and backward would hold n_steps copies of every
    activation (out of memory on a GPU for a long prompt and a real model): the steps go in
    batches of at most ``HFModel.gradient_token_budget`` tokens, with the same attributions."""
    from promptscope.models import hf

    def run():
        batches = []
        hook = tiny_llama.model.register_forward_pre_hook(
            lambda m, args, kwargs: batches.append(kwargs["input_ids"].shape), with_kwargs=True)
        try:
            df = promptscope.attribute(TEMPLATE, tiny_llama, vars=ROWS[:1], target=" Rome",
                                       level="tokens", n_steps=16, save=False,
                                       progress=False).df
        finally:
            hook.remove()
        return df["attribution"].tolist(), max(b[0] * b[1] for b in batches)

    whole, widest = run()
    monkeypatch.setitem(hf._GRADIENT_BUDGET, tiny_llama.device.type, 100)
    batched, widest_batched = run()
    assert widest > 100 >= widest_batched
    assert batched == pytest.approx(whole, abs=1e-5)


def test_perturbations_on_a_tokenizer_without_bos(tiny_llama_dir, tmp_path):
    """GPT-2-style tokenizers add no BOS: removing every part left an empty prompt (a
    zero-length input), and target_part had no token to follow. Both now start from the start
    token (BOS, else EOS)."""
    import json
    import shutil

    from promptscope.models.hf import HFModel

    folder = shutil.copytree(tiny_llama_dir, tmp_path / "nobos")
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    model = HFModel.from_pretrained(folder, name="no-bos")
    assert model.encode_prompt("") == [model.tokenizer.bos_token_id]  # not added, but known
    lone = promptscope.attribute("{x}", model, vars=[{"x": "Rome"}], target=" yes",
                                 method="ablation", save=False, progress=False)
    full, empty = model.score(["Rome", ""], [" yes", " yes"])
    assert lone.df["attribution"].iloc[0] == pytest.approx(full.logprob - empty.logprob,
                                                           abs=1e-5)
    for method in ("shapley", "kernelshap"):
        att = promptscope.attribute("Q: {x} A:{ans}", model, vars=[{"x": "Rome", "ans": " yes"}],
                                    target_part="ans", method=method, n_samples=4, save=False,
                                    progress=False)
        assert att.df["attribution"].notna().sum() == 3


def test_an_interrupt_keeps_every_variant_attributed_so_far(tiny_llama, monkeypatch):
    from promptscope.analyses import attribution as attribution_module

    real, calls = attribution_module._Engine.run, []

    def third_is_interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(attribution_module._Engine, "run", third_is_interrupted)
    rows = [{"fact": f"{name} lives in Rome.", "who": name} for name in ("Ann", "Bob", "Cy", "Di")]
    with pytest.raises(KeyboardInterrupt) as stop:
        promptscope.attribute(TEMPLATE, tiny_llama, vars=rows, target=" Rome",
                              method="ablation", progress=False)
    partial = stop.value.partial_result
    assert sorted(partial.df["variant"].unique()) == [0, 1]  # within one chunk of 8
    assert promptscope.load(partial.session_id).df.equals(partial.df)
