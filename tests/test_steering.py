"""PASTA as a key bias inside the attention interface == PASTA's eager post-softmax scaling."""

from __future__ import annotations

import math

import pytest
import torch

import promptscope
from promptscope.errors import CapabilityError, PromptscopeError
from promptscope.models.steering import (
    AttentionSteering,
    parse_heads,
    token_emphasis,
    use_promptscope_attention,
)

PROMPTS = [
    "Context: Ann lives in Rome. Bob lives in Oslo. Question: where does Ann live? Answer:",
    "Is Paris in Europe? Answer:",
    "The cat sat on the mat. The dog ran in the park. Where is the cat?",
]
EMPHASIS = ["Ann lives in Rome.", "Paris", "The cat sat on the mat."]
HEADS = {0: [1, 3], 1: [0]}


def _heads(model):
    """HEADS on the model's first two layers that have attention (a hybrid model's others
    have none)."""
    first, second = model.attention_layers[:2]
    return {first: HEADS[0], second: HEADS[1]}
ALPHA = 0.01


# ------------------------------------------------------------- the reference implementation
_REF: dict = {}


def pasta_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    position_bias=None, **kwargs):
    """PASTA as its paper writes it: eager softmax, then on the steered heads multiply the
    attention to non-emphasised prompt tokens by alpha and renormalise. A relative-position
    bias (models that pass ``position_bias``) is added to the scores as their eager code does."""
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, groups), repeat_kv(value, groups)
    scores = torch.matmul(query, k.transpose(2, 3)) * (scaling or query.shape[-1] ** -0.5)
    if position_bias is not None:
        scores = scores + position_bias
    lq, lk = query.shape[2], key.shape[2]
    if attention_mask is None:
        at = {"device": scores.device}
        causal = torch.arange(lq, **at)[:, None] + (lk - lq) >= torch.arange(lk, **at)[None, :]
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + attention_mask
    weights = torch.softmax(scores.float(), dim=-1)
    heads = _REF["heads"].get(module.layer_idx, [])
    if heads:
        down = _REF["down"]  # bool [B, L_prompt]: prompt keys to scale by alpha
        scale = torch.ones(weights.shape[0], lk, device=weights.device)
        scale[:, : down.shape[1]] = torch.where(down, _REF["alpha"], 1.0)
        for h in heads:
            w = weights[:, h] * scale[:, None, :]
            weights[:, h] = w / w.sum(-1, keepdim=True)
    out = torch.matmul(weights.to(v.dtype), v).transpose(1, 2).contiguous()
    return out, None


def _register_reference():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("pasta_reference", pasta_reference)
    AttentionMaskInterface.register("pasta_reference", sdpa_mask)


def _batch(model, prompts, emphasis):
    """Left-padded ids, mask, positions, and the keys PASTA down-weights."""
    encs = [model.encode(p, offsets=True) for p in prompts]
    width = max(len(e["input_ids"]) for e in encs)
    ids = torch.full((len(prompts), width), model.tokenizer.pad_token_id)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    down = torch.zeros((len(prompts), width), dtype=torch.bool)
    for r, (p, e, sub) in enumerate(zip(prompts, encs, emphasis)):
        n = len(e["input_ids"])
        ids[r, width - n:] = torch.tensor(e["input_ids"])
        mask[r, width - n:] = 1
        start = p.index(sub)
        for i, (a, b) in enumerate(e["offset_mapping"]):
            inside = b > a and a < start + len(sub) and b > start
            down[r, width - n + i] = not inside
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return tuple(t.to(model.device) for t in (ids, mask, pos, down))


def _logits(model, impl, ids, mask, pos, padded=True):
    model.model.set_attn_implementation(impl)
    with torch.no_grad():
        kwargs = {"attention_mask": mask, "position_ids": pos} if padded else {}
        return model.model(input_ids=ids, **kwargs).logits.float()


@pytest.mark.parametrize("kernel", ["sdpa", "sdpa-head-split", "flex"])
@pytest.mark.parametrize("padded", [True, False], ids=["batch-with-padding", "unpadded-mask-none"])
def test_key_bias_equals_eager_pasta(tiny_model, padded, kernel, monkeypatch):
    """Each kernel: SDPA with a dense all-head bias, SDPA on the steered heads only (what
    HFModel uses when at most half a layer's heads are steered), flex attention."""
    from promptscope.models import steering

    _register_reference()
    flex_calls = []
    real_flex = steering._flex_function
    monkeypatch.setattr(steering, "_flex_function",
                        lambda *a, **k: flex_calls.append(a[0].device) or real_flex(*a, **k))
    sdpa_heads = []  # the `heads` each steered SDPA call got (None: all heads at once)
    real_sdpa = steering._steered_sdpa
    monkeypatch.setattr(steering, "_steered_sdpa",
                        lambda *a, **k: sdpa_heads.append(a[6]) or real_sdpa(*a, **k))
    prompts, emphasis = (PROMPTS, EMPHASIS) if padded else (PROMPTS[:1], EMPHASIS[:1])
    ids, mask, pos, down = _batch(tiny_model, prompts, emphasis)
    heads = _heads(tiny_model)
    _REF.update(heads=heads, alpha=ALPHA, down=down)
    try:
        reference = _logits(tiny_model, "pasta_reference", ids, mask, pos, padded)
        plain = _logits(tiny_model, "sdpa", ids, mask, pos, padded)
        with promptscope.steer(tiny_model, heads=heads, alpha=ALPHA, emphasis=EMPHASIS):
            from promptscope.models.steering import _Forward, forward_context, key_bias

            bias = key_bias(tiny_model.steering, ~down & mask.bool(), mask.bool(),
                            tiny_model.text_config.num_attention_heads)
            split = {layer: torch.tensor(h, device=tiny_model.device)
                     for layer, h in heads.items()} if kernel == "sdpa-head-split" else {}
            state = _Forward(key_bias=bias, kernel=kernel.removesuffix("-head-split"),
                             heads=split)
            with forward_context(state):
                ours = _logits(tiny_model, "promptscope_sdpa", ids, mask, pos, padded)
    finally:
        tiny_model.model.set_attn_implementation("sdpa")
    real = mask.bool()
    # (fp32 sums in another order: up to 1.1e-4 apart on the 4-layer Gemma 4, logits ~5)
    assert torch.allclose(ours[real], reference[real], atol=2e-4)
    # ...and steering changes the model's output (the check above is not vacuous).
    assert (ours[real] - plain[real]).abs().max() > 1e-2
    assert len(flex_calls) == (len(heads) if kernel == "flex" else 0)  # steered layers only
    if kernel == "flex":
        assert sdpa_heads == []
    else:  # one call per steered layer, split only when asked
        assert len(sdpa_heads) == len(heads)
        assert all((h is not None) == (kernel == "sdpa-head-split") for h in sdpa_heads)


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
def test_steered_scores_match_reference_through_the_backend(tiny_llama, kernel):
    """HFModel.score under steer(): batched, padded, multi-token continuations over the cache."""
    _check_scores(tiny_llama, kernel)


def _check_scores(tiny_llama, kernel):
    _register_reference()
    conts = [" Rome and more", " yes", " on the mat"]
    heads = _heads(tiny_llama)
    with promptscope.steer(tiny_llama, heads=heads, alpha=ALPHA, emphasis=EMPHASIS,
                           kernel=kernel):
        steered = tiny_llama.score(PROMPTS, conts)
    for prompt, sub, cont, s in zip(PROMPTS, EMPHASIS, conts, steered):
        ids, mask, pos, down = _batch(tiny_llama, [prompt], [sub])
        c = tiny_llama.encode_continuation(cont)
        full = torch.cat([ids, torch.tensor([c], device=ids.device)], dim=1)
        _REF.update(heads=heads, alpha=ALPHA, down=down)  # continuation keys are not scaled
        try:
            logits = _logits(tiny_llama, "pasta_reference", full, None, None, padded=False)
        finally:
            tiny_llama.model.set_attn_implementation("sdpa")
        logp = logits[0].log_softmax(-1)
        n = ids.shape[1]
        expected = sum(logp[n - 1 + k, t].item() for k, t in enumerate(c))
        assert s.logprob == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
@pytest.mark.parametrize("n_prompts", [1, 2], ids=["unpadded", "padded"])
def test_steered_generation_with_kv_cache_matches_reference(tiny_model, kernel, n_prompts):
    """Greedy generation: cached steps (queries of generated tokens steered, their keys not)
    equal a full recompute with the eager reference at every step (one prompt: no mask, the
    bias folded into the dot product; two: padding, an explicit mask)."""
    _check_generation(tiny_model, kernel, n_prompts)


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
def test_sliding_window_layers_steer_the_keys_their_cache_keeps(tiny_sliding, kernel):
    """Past the window a sliding layer's cache hands attention only its last keys; the bias
    must follow them (it was applied to the first keys' columns before session 27): scoring
    over the prompt's cache and generation, unpadded and padded."""
    _check_scores(tiny_sliding, kernel)
    for n_prompts in (1, 2):
        _check_generation(tiny_sliding, kernel, n_prompts)


def _check_generation(tiny_model, kernel, n_prompts):
    _register_reference()
    prompts, emphasis = PROMPTS[:n_prompts], EMPHASIS[:n_prompts]
    heads = _heads(tiny_model)
    with promptscope.steer(tiny_model, heads=heads, alpha=ALPHA, emphasis=emphasis,
                           kernel=kernel):
        gens = tiny_model.generate(prompts, max_new_tokens=5)
    unsteered = tiny_model.generate(prompts, max_new_tokens=5)
    for prompt, sub, (g,) in zip(prompts, emphasis, gens):
        ids, _, _, down = _batch(tiny_model, [prompt], [sub])
        _REF.update(heads=heads, alpha=ALPHA, down=down)
        seq = ids
        try:
            for _ in range(5):
                logits = _logits(tiny_model, "pasta_reference", seq, None, None, padded=False)
                seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        finally:
            tiny_model.model.set_attn_implementation("sdpa")
        new = seq[0, ids.shape[1]:].tolist()
        eos = tiny_model.tokenizer.eos_token_id
        new = new[: new.index(eos)] if eos in new else new
        assert g.text == tiny_model.tokenizer.decode(new, skip_special_tokens=True)
    moved = [abs(a[0].logprob - b[0].logprob) for a, b in zip(gens, unsteered)]
    assert max(moved) > 1e-3  # steering did change the generation's probabilities


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
def test_steering_with_a_static_cache_equals_the_dynamic_cache(tiny_llama, kernel):
    """A checkpoint may ask for a static cache: its prefill hands the attention function no
    mask and more (empty) key slots than queries, which transformers means as upper-left
    causal alignment. Steered generation must not see those slots or later prompt tokens."""
    def generate():
        with promptscope.steer(tiny_llama, heads=HEADS, alpha=ALPHA, emphasis=EMPHASIS[:1],
                               kernel=kernel):
            return tiny_llama.generate(PROMPTS[:1], max_new_tokens=4)[0][0]

    config = tiny_llama.model.generation_config
    dynamic = generate()
    config.cache_implementation = "static"
    try:
        static = generate()
    finally:
        config.cache_implementation = None
    assert static.text == dynamic.text
    assert static.logprob == pytest.approx(dynamic.logprob, abs=1e-4)


def test_rows_without_emphasis_are_not_steered(tiny_llama):
    base = tiny_llama.score(PROMPTS[1:], [" yes", " no"])
    with promptscope.steer(tiny_llama, heads="all", alpha=ALPHA, emphasis="Ann lives"):
        mixed = tiny_llama.score(PROMPTS, [" Rome", " yes", " no"])
    assert [s.logprob for s in mixed[1:]] == pytest.approx([s.logprob for s in base], abs=1e-5)


def test_alpha_one_changes_nothing_and_include_mode_upweights(tiny_llama):
    base = tiny_llama.score(PROMPTS[:1], [" Rome"])[0].logprob
    with promptscope.steer(tiny_llama, heads="all", alpha=1.0, emphasis=EMPHASIS[0]):
        same = tiny_llama.score(PROMPTS[:1], [" Rome"])[0].logprob
    assert same == pytest.approx(base, abs=1e-5)
    with promptscope.steer(tiny_llama, heads="all", alpha=100.0, mode="include",
                           emphasis=EMPHASIS[0]):
        up = tiny_llama.score(PROMPTS[:1], [" Rome"])[0].logprob
    assert abs(up - base) > 1e-3


def test_token_emphasis_at_span_edges(tiny_llama):
    text = "Ann lives in Rome."
    enc = tiny_llama.encode(text, offsets=True)
    # A span that cuts a token in half still emphasises that whole token.
    cut = text.index("Rome") + 2
    flags = token_emphasis(enc["offset_mapping"], [(cut, len(text))], text)
    tok_of_cut = next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a <= cut < b)
    assert flags[tok_of_cut] and not flags[0]  # BOS (a special token) is never emphasised
    with pytest.raises(PromptscopeError, match="covers no token"):
        token_emphasis(enc["offset_mapping"], [(3, 3)], text)


def test_emphasis_in_a_chat_template(tiny_llama):
    chat = tiny_llama.chat_prompt(PROMPTS[0])
    with promptscope.steer(tiny_llama, heads="all", emphasis=EMPHASIS[0]):
        (flags,) = tiny_llama._emphasis_flags([chat])
    enc = tiny_llama.encode(chat, offsets=True)
    marked = "".join(chat[a:b] for (a, b), f in zip(enc["offset_mapping"], flags) if f)
    assert marked.strip() == EMPHASIS[0]


def test_parse_heads_forms_and_errors():
    assert parse_heads("all", 2, 3) == {0: [0, 1, 2], 1: [0, 1, 2]}
    assert parse_heads("1.2, 0.1,1.0", 2, 3) == {0: [1], 1: [0, 2]}
    assert parse_heads("L1", 2, 3) == {1: [0, 1, 2]}
    assert parse_heads({"0": [2]}, 2, 3) == {0: [2]}
    assert parse_heads([(1, 1)], 2, 3) == {1: [1]}
    with pytest.raises(PromptscopeError, match="Layer 5 is out of range"):
        parse_heads("5.0", 2, 3)
    with pytest.raises(PromptscopeError, match="Head 1.7 is out of range"):
        parse_heads("1.7", 2, 3)
    with pytest.raises(PromptscopeError, match="Cannot read head"):
        parse_heads("one.two", 2, 3)


def test_hybrid_models_steer_and_capture_their_attention_layers_only(tiny_family):
    """A hybrid (Qwen3.5: linear-attention layers, a full-attention layer after each) has
    attention weights in some layers only. "all" means those; naming another layer is an
    error that lists them (steering it would silently do nothing)."""
    model = tiny_family("qwen3_5")
    assert model.attention_layers == [1, 3]
    assert parse_heads("all", 4, 2, [1, 3]) == {1: [0, 1], 3: [0, 1]}
    with promptscope.steer(model, heads="all", alpha=ALPHA, emphasis=EMPHASIS[0]) as steering:
        assert sorted(steering.heads) == [1, 3]
    for heads in ("0.1", "L2", {"0": [1], "1": [0]}):
        with pytest.raises(PromptscopeError, match="has no attention weights.*are 1, 3"):
            with promptscope.steer(model, heads=heads, alpha=ALPHA, emphasis=EMPHASIS[0]):
                pass
    tpl = "Context: <<Ann lives in Rome.>> Where does Ann live?"
    att = promptscope.attention(tpl, model, progress=False)
    assert set(att.df["layer"]) == {1, 3}
    with pytest.raises(PromptscopeError, match="Layers 0, 2 of this model have no attention"):
        promptscope.attention(tpl, model, layers="0,1,2", progress=False)
    rows = [{"answer": " Rome", "choices": [" Rome", " Oslo"]}]
    profile = promptscope.profile_heads(tpl, rows, model, save=False, progress=False)
    assert set(profile.df["layer"]) == {1, 3}
    with pytest.raises(PromptscopeError, match="Layer 2 of this model has no attention"):
        promptscope.profile_heads(tpl, rows, model, layers=[2, 3], save=False, progress=False)


def test_a_model_without_attention_is_refused_clearly_and_vectors_still_steer(tiny_family):
    """A state-space model (Mamba) has no attention: PASTA, capture and head profiling say so
    (they failed with AttributeError), and vector steering works on its residual stream."""
    model = tiny_family("mamba")
    tpl = "Context: <<Ann lives in Rome.>> Where does Ann live?"
    with pytest.raises(CapabilityError, match="has no attention layers"):
        with promptscope.steer(model, heads="all", alpha=ALPHA, emphasis="Ann lives in Rome."):
            pass
    with pytest.raises(CapabilityError, match="has no attention layers"):
        promptscope.attention(tpl, model, progress=False)
    with pytest.raises(CapabilityError, match="has no attention layers"):
        promptscope.profile_heads(tpl, [{"answer": " Rome", "choices": [" Rome", " Oslo"]}],
                                  model, save=False, progress=False)
    vector = promptscope.contrastive_vector(["Ann lives in Rome."], ["Bob lives in Oslo."],
                                            model, layers=[1])
    plain = model.score([tpl], [" Rome"])[0].logprob
    with promptscope.steer(model, vector=vector, strength=4.0):
        steered = model.score([tpl], [" Rome"])[0].logprob
    assert abs(steered - plain) > 1e-3


@pytest.mark.parametrize("alpha", [0.0, -1.0, 1.5])
def test_alpha_outside_range_is_refused(alpha):
    with pytest.raises(PromptscopeError, match=r"outside \(0, 1\]"):
        AttentionSteering({0: [0]}, alpha=alpha)


def test_head_config_json_round_trip():
    s = AttentionSteering({3: [1, 2], 0: [4]}, alpha=0.05)
    assert s.to_json() == {"heads": {"0": [4], "3": [1, 2]}, "alpha": 0.05, "mode": "exclude"}
    assert parse_heads(s.to_json()["heads"], 4, 8) == {0: [4], 3: [1, 2]}
    assert math.isclose(s.alpha, 0.05)


def test_model_without_attention_interface_is_refused():
    class Legacy(torch.nn.Module):
        def _can_set_attn_implementation(self):
            return False

        config = type("C", (), {"_attn_implementation": "eager"})()

    with pytest.raises(CapabilityError, match="AttentionInterface"):
        use_promptscope_attention(Legacy())


def test_model_whose_attention_sdpa_cannot_run_is_refused(fresh_tiny_llama):
    """Models transformers runs eager only (gpt-oss: attention sinks) get promptscope's reason,
    not transformers' advice to load them eager."""
    fresh_tiny_llama.model._supports_sdpa = False
    with pytest.raises(CapabilityError, match="cannot steer or capture its attention"):
        with promptscope.steer(fresh_tiny_llama, heads="0.0", emphasis="Ann"):
            pass
    assert fresh_tiny_llama.model.config._attn_implementation == "sdpa"  # left as it was


def test_nested_steering_is_refused(tiny_llama):
    with promptscope.steer(tiny_llama, heads="0.0", emphasis="x"):
        with pytest.raises(PromptscopeError, match="already being steered"):
            with promptscope.steer(tiny_llama, heads="0.1", emphasis="y"):
                pass
    assert tiny_llama.steering is None


def test_run_prompt_compare_steered_and_plain(tiny_llama):
    template = "Context: <<Ann lives in {city}.>> Bob lives in Oslo. Where does Ann live?"
    run = promptscope.run_prompt(template, tiny_llama, vars=[{"city": "Rome"}, {"city": "Lima"}],
                                 choices=" Rome| Oslo| Lima", progress=False,
                                 steer={"heads": "0.1,1.0", "alpha": 0.05, "compare": True})
    df = run.df
    assert sorted(df["steered"].unique()) == [False, True] and len(df) == 2 * 2 * 3
    assert run.params["steer"] == {"heads": {"0": [1], "1": [0]}, "alpha": 0.05,
                                   "mode": "exclude", "compare": True, "auto": False}
    prompt = "Context: Ann lives in Rome. Bob lives in Oslo. Where does Ann live?"
    plain = tiny_llama.score([prompt] * 3, [" Rome", " Oslo", " Lima"])
    with promptscope.steer(tiny_llama, heads="0.1,1.0", alpha=0.05,
                           emphasis="Ann lives in Rome."):
        steered = tiny_llama.score([prompt] * 3, [" Rome", " Oslo", " Lima"])
    got = df[df["city"] == "Rome"]
    assert got[~got.steered]["logprob"].tolist() == pytest.approx([s.logprob for s in plain],
                                                                  abs=1e-5)
    assert got[got.steered]["logprob"].tolist() == pytest.approx([s.logprob for s in steered],
                                                                 abs=1e-5)
    summary = run.summary()
    assert len(summary) == 4 and set(summary["steered"]) == {False, True}
    assert any("steered" in str(x) for x in run.figure().data[0].x)
    assert promptscope.load(run.session_id) == run


def test_steering_without_emphasis_is_a_clear_error(tiny_llama):
    from promptscope.errors import TemplateError

    with pytest.raises(TemplateError, match="<<...>>"):
        promptscope.run_prompt("No marks here", tiny_llama, target="!", progress=False,
                               steer={"heads": "all"})


def test_prompt_magic_steer_flags(ip, tiny_llama_dir, device_flags):
    from IPython.core.error import UsageError

    ip.run_line_magic("promptscope", f"model {tiny_llama_dir} --as steer-llama{device_flags}")
    run = ip.run_cell_magic("prompt", '--steer --compare --heads 1.0 --alpha 0.1 --target " x"',
                            "Say <<{{hi|yo}}>> now")
    assert len(run.df) == 4 and run.params["steer"]["heads"] == {"1": [0]}
    flex = ip.run_cell_magic("prompt", '--steer --compare --heads 1.0 --alpha 0.1 --target " x" '
                             "--kernel flex", "Say <<{{hi|yo}}>> now")
    assert flex.params["steer"]["kernel"] == "flex"
    assert flex.df["logprob"].tolist() == pytest.approx(run.df["logprob"].tolist(), abs=1e-4)
    with pytest.raises(UsageError, match="out of range"):
        ip.run_cell_magic("prompt", "--steer --heads 9.0 --target x", "<<a>> b")
    with pytest.raises(UsageError, match=r"outside \(0, 1\]"):
        ip.run_cell_magic("prompt", "--steer --alpha 2 --target x", "<<a>> b")
    with pytest.raises(UsageError, match="go with --steer"):
        ip.run_cell_magic("prompt", "--compare --target x", "<<a>> b")


def _profile_data():
    return [{"name": n, "city": c, "answer": f" {c}", "choices": [f" {c}", " Oslo"]}
            for n, c in [("Ann", "Rome"), ("Eve", "Lima"), ("Max", "Kyiv")]]


def test_profile_heads_scores_each_head_alone(tiny_llama):
    template = "Context: <<{name} lives in {city}.>> Bob lives in Oslo. Where does {name} live?"
    prof = promptscope.profile_heads(template, _profile_data(), tiny_llama, layers=[1],
                                     name="ctx-profile", progress=False)
    df = prof.df
    assert len(df) == 4 and set(df["layer"]) == {1}
    # Each row is exactly the metric under steer() of that head alone.
    row = df[df["head"] == 2].iloc[0]
    prompts = [f"Context: {d['name']} lives in {d['city']}. Bob lives in Oslo. Where does "
               f"{d['name']} live?" for d in _profile_data()]
    with promptscope.steer(tiny_llama, heads="1.2", alpha=0.01,
                           emphasis=[f"{d['name']} lives in {d['city']}." for d in
                                     _profile_data()]):
        right = tiny_llama.score(prompts, [d["answer"] for d in _profile_data()])
    assert row["logprob"] == pytest.approx(sum(s.logprob for s in right) / 3, abs=1e-5)
    assert row["d_logprob"] == pytest.approx(row["logprob"] - prof.params["baseline"]["logprob"])
    ranked = prof.summary()
    assert ranked["d_accuracy"].is_monotonic_decreasing or ranked["d_accuracy"].nunique() == 1
    fig = prof.figure()
    assert fig.data[0].type == "heatmap" and fig.layout.yaxis.title.text == "layer"
    assert fig.layout.xaxis.title.text == "head" and "gain" in fig.data[0].colorbar.title.text
    assert promptscope.load(prof.session_id) == prof


def test_heads_from_a_saved_profile(tiny_llama):
    from promptscope.analyses.heads import top_heads

    template = "Context: <<{name} lives in {city}.>> Where does {name} live?"
    prof = promptscope.profile_heads(template, _profile_data(), tiny_llama, layers=[0, 1],
                                     top_k=3, name="my-profile", progress=False)
    helpful = prof.df[(prof.df.d_accuracy > 0) |
                      ((prof.df.d_accuracy == 0) & (prof.df.d_logprob > 0))]
    assert not helpful.empty  # seeded tiny model: some heads do help
    expected = top_heads(prof.df, 3)
    with promptscope.steer(tiny_llama, heads="profile:my-profile", emphasis="x") as s:
        assert s.heads == expected
    with promptscope.steer(tiny_llama, heads="top:1", emphasis="x") as s:
        assert s.n_heads() == 1
    with pytest.raises(PromptscopeError, match="No head profile named 'nope'"):
        with promptscope.steer(tiny_llama, heads="profile:nope", emphasis="x"):
            pass
    # a newer profile of the same name that was interrupted, or made on another model, is not
    # the one meant: it was taken before (its 2 heads, or another model's heads)
    from promptscope.analyses.heads import KIND, resolve_profile_heads
    from promptscope.store import Store

    store = Store.default()
    for model, status in (("tiny-llama", "interrupted"), ("other-model", "done")):
        sid = store.create(KIND, name="my-profile", model=model)
        store.append(sid, "rows", prof.df.head(2).assign(d_accuracy=1.0))
        store.finish(sid, status)
    assert resolve_profile_heads("profile:my-profile", tiny_llama.name) == expected
    with pytest.raises(PromptscopeError, match=r"finished for model 'third'.*\['other-model', "
                                               r"'tiny-llama'\]"):
        resolve_profile_heads("profile:my-profile", "third")


def test_same_prompt_with_other_marks_is_refused_where_a_task_is_steered_at_once(tiny_llama):
    template = "Context: {before}<<{key}>>{after} Where does Ann live?"
    rows = [{"before": "Bob is in Oslo. ", "key": "Ann is in Rome.", "after": "",
             "answer": " Rome", "choices": [" Rome", " Oslo"]},
            {"before": "", "key": "Bob is in Oslo.", "after": " Ann is in Rome.",
             "answer": " Rome", "choices": [" Rome", " Oslo"]}]
    with pytest.raises(PromptscopeError, match="Variants 0 and 1 make the same prompt"):
        promptscope.profile_heads(template, rows, tiny_llama, progress=False, save=False)
    with pytest.raises(PromptscopeError, match="Variants 0 and 1 make the same prompt"):
        promptscope.compare_steering(template, rows, tiny_llama, save=False, progress=False,
                                     methods={"PASTA": {"heads": "all", "alpha": [0.01]}})


def test_profile_errors(tiny_llama):
    with pytest.raises(PromptscopeError, match=r"one prompt per row.*alternatives \(alt1\)"):
        promptscope.profile_heads("<<{name}>> {{is|was}} {city}", _profile_data(), tiny_llama,
                                  progress=False)
    with pytest.raises(PromptscopeError, match="<<...>>"):
        promptscope.profile_heads("{name}", _profile_data(), tiny_llama, progress=False)
    bad = [{"name": "Ann", "city": "Rome", "answer": " Paris", "choices": [" Rome"]}]
    with pytest.raises(PromptscopeError, match="not among"):
        promptscope.profile_heads("<<{name}>> {city}", bad, tiny_llama, progress=False)


def test_autopasta_sentence_matching():
    from promptscope.analyses.autopasta import match_sentence, sentences

    text = "Intro. Context: Ann lives in Rome. Bob lives in Oslo. Question: where is Ann?"
    region = (text.index("Context"), text.index(" Question"))
    spans = sentences(text, *region)
    assert [text[a:b] for a, b in spans] == ["Context: Ann lives in Rome.", "Bob lives in Oslo."]
    (a, b), score = match_sentence("bob lives in oslo\nmore text", text, spans)
    assert text[a:b] == "Bob lives in Oslo." and score > 0.9
    (a, b), score = match_sentence("Ann, who lives in Rome", text, spans)  # paraphrase
    assert text[a:b] == "Context: Ann lives in Rome." and score < 0.9


def test_autopasta_run_emphasises_the_sentence_the_model_names(tiny_llama):
    from promptscope.analyses.autopasta import DEFAULT_QUESTION, key_sentences

    template = "<<Ann lives in Rome. Bob lives in Oslo. Eve lives in Lima.>> Where is Ann?"
    run = promptscope.run_prompt(template, tiny_llama, target=" Rome", progress=False,
                                 steer={"heads": "all", "auto": True, "compare": True})
    prompt = "Ann lives in Rome. Bob lives in Oslo. Eve lives in Lima. Where is Ann?"
    (key,) = key_sentences(tiny_llama, [prompt], [(0, prompt.index(" Where"))],
                           DEFAULT_QUESTION)
    assert set(run.df["key_sentence"]) == {key.sentence}
    assert key.sentence in {"Ann lives in Rome.", "Bob lives in Oslo.", "Eve lives in Lima."}
    with promptscope.steer(tiny_llama, heads="all", emphasis=key.sentence):
        expected = tiny_llama.score([prompt], [" Rome"])[0].logprob
    steered = run.df[run.df.steered]["logprob"].item()
    assert steered == pytest.approx(expected, abs=1e-5)
    assert run.params["steer"]["auto"] is True


def test_steering_widget_reruns_on_its_controls(tiny_llama):
    from promptscope.widgets import SteeringWidget

    template = "Context: <<{name} lives in {city}.>> Bob lives in Oslo. Where does {name} live?"
    rows = [{"name": "Ann", "city": "Rome"}, {"name": "Eve", "city": "Lima"}]
    wid = SteeringWidget(template, tiny_llama, choices=" Rome| Oslo| Lima", vars=rows)
    first = wid.last
    assert len(wid.answers.figure.data) == 6 and len(wid.attention.figure.data) == 2
    plain_mass = wid.attention.figure.data[0].y
    steered_mass = wid.attention.figure.data[1].y
    assert all(s > p for s, p in zip(steered_mass, plain_mass))  # steering all heads, alpha .01
    wid.alpha.value = 1.0  # alpha 1 is no steering at all
    plain_mass, steered_mass = (trace.y for trace in wid.attention.figure.data)
    assert steered_mass == pytest.approx(plain_mass, abs=1e-5)
    same = wid.last.df.groupby("steered")["prob"].apply(list)
    assert same[True] == pytest.approx(same[False], abs=1e-5)
    assert not first.df.equals(wid.last.df)
    assert "steered" in wid.status.value
    wid.heads.options = ["all", "1.0"]
    wid.alpha.value = 0.01
    wid.heads.value = "1.0"  # one head: the bars show it, not a mean diluted by the others
    fig = wid.attention.figure
    assert list(fig.data[0].x) == ["L1"] and "the 1 steered head)" in fig.layout.title.text
    assert fig.data[1].y[0] > 0.9 > fig.data[0].y[0]


def test_fused_on_cuda_compiles_only_for_cuda_and_falls_back_once(monkeypatch):
    """CPU tensors run the plain function; a CUDA call whose compile fails warns once and runs
    the eager form from then on (a compiler failure must not break steering)."""
    from types import SimpleNamespace

    from promptscope.models.fused import fused_on_cuda

    compiled = []

    def failing_compile(fn, **kwargs):
        compiled.append(fn)
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", failing_compile)
    add_one = fused_on_cuda(lambda x: x + 1, "adding one", eager=lambda x: x + 1)
    assert add_one(torch.zeros(2)).tolist() == [1.0, 1.0] and compiled == []
    on_gpu = SimpleNamespace(device=SimpleNamespace(type="cuda"))
    seen = fused_on_cuda(lambda x: "compiled", "a stand-in", eager=lambda x: "eager")
    with pytest.warns(UserWarning, match="a stand-in could not be compiled.*no compiler here"):
        assert seen(on_gpu) == "eager"
    assert seen(on_gpu) == "eager" and len(compiled) == 1  # no second try, no second warning
    assert "RuntimeError" in seen.state["broken"]


def test_pasta_generation_on_sliding_layers_when_transformers_compiles_the_decoding_step(
        tmp_path):
    """transformers compiles the decoding step with a static cache on a GPU (forced here on the
    CPU with the eager backend); a static cache's sliding layers keep only the window, so the
    bias columns must still follow the keys through the compiled step."""
    from transformers import CompileConfig

    from promptscope.models.hf import HFModel
    from promptscope.testing import make_tiny_model

    model = HFModel.from_pretrained(make_tiny_model(tmp_path / "mistral", arch="mistral"),
                                    name="sliding-compiled")

    def run():
        with promptscope.steer(model, heads=HEADS, alpha=ALPHA, emphasis=EMPHASIS[:1]):
            return model.generate(PROMPTS[:1], max_new_tokens=6)[0][0]

    want = run()
    config = model.model.generation_config
    config.cache_implementation = "static"
    config.compile_config = CompileConfig(backend="eager")
    config.compile_config._compile_all_devices = True  # transformers compiles on a GPU only
    model.generate(PROMPTS[:1], max_new_tokens=6)  # plain: compiles the decoding step
    assert getattr(model.model, "_compiled_call", None) is not None
    got = run()
    assert got.text == want.text
    assert got.logprob == pytest.approx(want.logprob, abs=1e-4)


def test_emphasis_strings_steer_a_template_without_marks(tiny_llama):
    """steer={"emphasis": ...} in place of <<...>> steers the prompt (it was registered with no
    spans, which silently turned PASTA off)."""
    prompt = "Ann lives in Rome. Bob lives in Oslo. Where does Ann live?"
    key = "Ann lives in Rome."
    run = promptscope.run_prompt(prompt, tiny_llama, choices=" Rome| Oslo", progress=False,
                                 save=False, steer={"heads": "all", "emphasis": key,
                                                    "compare": True})
    with promptscope.steer(tiny_llama, heads="all", emphasis=key):
        expected = [s.logprob for s in tiny_llama.score([prompt] * 2, [" Rome", " Oslo"])]
    steered = run.df[run.df.steered]["logprob"].tolist()
    assert steered == pytest.approx(expected, abs=1e-5)
    assert steered != pytest.approx(run.df[~run.df.steered]["logprob"].tolist(), abs=1e-4)


def test_autopasta_asks_for_the_key_sentence_with_the_vector_off(tiny_llama, monkeypatch):
    """Under pasta+vector the model names the key sentence unsteered: neither PASTA nor the
    vector is on while it answers, and both are back on afterwards."""
    import torch

    from promptscope.analyses.autopasta import key_sentences
    from promptscope.models.vectors import SteeringVector

    size = tiny_llama.model.config.hidden_size
    vector = SteeringVector({1: torch.ones(size)}, size)
    seen = []
    plain_generate = type(tiny_llama).generate

    def spy(self, *args, **kwargs):
        seen.append((self.steering, self.vector_steering.enabled))
        return plain_generate(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_llama), "generate", spy)
    text = "Ann lives in Rome. Bob lives in Oslo. Where is Ann?"
    with promptscope.steer(tiny_llama, method="pasta+vector", heads="all", vector=vector,
                           emphasis="Ann"):
        key_sentences(tiny_llama, [text], [None], max_new_tokens=2)
        assert tiny_llama.vector_steering.enabled and tiny_llama.steering is not None
    assert seen == [(None, False)]


def test_emphasis_survives_a_chat_template_that_trims_the_message(fresh_tiny_llama):
    """Llama 3's template trims the message: a prompt ending in a newline is no longer found
    whole in the chat text, and its <<...>> must still land on the same words (it failed with
    "the chat template changes the message")."""
    from promptscope.models.steering import attention_part
    from promptscope.templates import parse_template

    model = fresh_tiny_llama
    model.tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}"
        "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    template = "  Context: <<Ann lives in Rome.>> Bob lives in Oslo. Where does Ann live?\n"
    variant = next(parse_template(template).expand())
    chat = model.chat_prompt(variant.text)
    assert variant.text not in chat
    assert [chat[a:b] for a, b in variant.emphasis_in(chat)] == ["Ann lives in Rome."]
    edge = next(parse_template("<< Ann>> lives here.\n").expand())  # trimmed space: not marked
    assert [model.chat_prompt(edge.text)[a:b]
            for a, b in edge.emphasis_in(model.chat_prompt(edge.text))] == ["Ann"]
    seen = []
    real = type(model).score

    def spy(self, prompts, continuations, progress=None):
        if self.steering is not None and attention_part(self.steering) is not None:
            seen.extend(attention_part(self.steering).spans_for(p) for p in prompts)
        return real(self, prompts, continuations, progress)

    type(model).score = spy
    try:
        run = promptscope.run_prompt(template, model, chat=True, choices=[" Rome", " Oslo"],
                                     steer={"heads": "all", "alpha": 0.01, "compare": True},
                                     save=False, progress=False)
    finally:
        type(model).score = real
    assert seen and all(chat[a:b] == "Ann lives in Rome." for spans in seen for a, b in spans)
    plain, steered = (run.df[run.df.steered == s]["logprob"].tolist() for s in (False, True))
    assert plain != pytest.approx(steered, abs=1e-6)
    att = promptscope.attention(template, model, chat=True, save=False, progress=False)
    tokens = att.tables["tokens"]
    marked = tokens[tokens.part == "emphasis"]["token"].str.replace("Ġ", " ")
    assert "".join(marked).strip() == "Ann lives in Rome."
    # the chat markup before the trimmed prompt (its "\n" included) is not the prompt's text
    before = tokens.iloc[:tokens.index[tokens.token == "C"][0]]
    assert set(before["part"]) <= {"special", "template"} and "\n" in set(before["token"])


def test_same_text_with_other_emphasis_is_steered_by_its_own_marks(tiny_llama):
    """Steering looks emphasis up by prompt text: two rows that make the same text with other
    <<...>> marks went into one batch, and the second row's marks steered both."""
    template = "Context: {before}<<{key}>>{after} Where does Ann live? Answer:"
    rows = [{"before": "Bob lives in Oslo. ", "key": "Ann lives in Rome.", "after": ""},
            {"before": "", "key": "Bob lives in Oslo.", "after": " Ann lives in Rome."}]
    opts = dict(choices=[" Rome", " Oslo"], steer={"heads": "all", "alpha": 0.01}, save=False,
                progress=False)
    both = promptscope.run_prompt(template, tiny_llama, vars=rows, **opts)
    texts = set(both.df["prompt"])
    assert len(texts) == 1  # one text, two emphases
    for i, row in enumerate(rows):
        alone = promptscope.run_prompt(template, tiny_llama, vars=[row], **opts)
        got = both.df[both.df.variant == i]["logprob"].tolist()
        assert got == pytest.approx(alone.df["logprob"].tolist(), abs=1e-5)
    att = promptscope.attention(template, tiny_llama, vars=rows, steer={"heads": "all"},
                                save=False, progress=False)
    for i, row in enumerate(rows):
        alone = promptscope.attention(template, tiny_llama, vars=[row], steer={"heads": "all"},
                                      save=False, progress=False)
        mine = att.df[att.df.variant == i].sort_values(["layer", "head", "part"])
        assert mine["mass"].tolist() == pytest.approx(
            alone.df.sort_values(["layer", "head", "part"])["mass"].tolist(), abs=1e-5)


def test_run_prompt_inside_a_steer_block_emphasises_its_marks_and_an_empty_block_warns(
        tiny_llama):
    """A steer() block without emphasis= around run_prompt of a <<...>> template steered
    nothing, silently (the docstring said run_prompt adds the marks)."""
    template = "Context: <<Ann lives in Rome.>> Bob lives in Oslo. Where does Ann live?"
    direct = promptscope.run_prompt(template, tiny_llama, choices=" Rome| Oslo", save=False,
                                    progress=False, steer={"heads": "all", "alpha": 0.01})
    plain = promptscope.run_prompt(template, tiny_llama, choices=" Rome| Oslo", save=False,
                                   progress=False)
    with promptscope.steer(tiny_llama, heads="all", alpha=0.01) as attn:
        inside = promptscope.run_prompt(template, tiny_llama, choices=" Rome| Oslo",
                                        save=False, progress=False)
        assert not attn.spans  # its marks leave with the run...
        real = tiny_llama.score
        try:
            tiny_llama.score = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt)
            with pytest.raises(KeyboardInterrupt):
                promptscope.run_prompt(template, tiny_llama, choices=" Rome| Oslo",
                                       save=False, progress=False)
        finally:
            del tiny_llama.score
        assert tiny_llama.score == real and not attn.spans  # ...also when it is stopped
        with pytest.warns(UserWarning, match="PASTA is on but has nothing to emphasise"):
            bare = tiny_llama.score(["Ann lives in Rome. Where?"], [" Rome"])[0].logprob
    for _ in range(2):  # said again by every new block (a notebook showed it once at most)
        with promptscope.steer(tiny_llama, heads="all", alpha=0.01):
            with pytest.warns(UserWarning, match="nothing to emphasise") as said:
                tiny_llama.score(["Ann lives in Rome. Where?"], [" Rome"])
                tiny_llama.score(["Ann lives in Rome. Where?"], [" Rome"])
            assert len(said) == 1 and said[0].filename == __file__  # once, at the user's line
    assert inside.df["logprob"].tolist() == pytest.approx(direct.df["logprob"].tolist(),
                                                          abs=1e-6)
    assert inside.df["logprob"].tolist() != pytest.approx(plain.df["logprob"].tolist(),
                                                          abs=1e-3)
    assert inside.params["steer"]["by"] == "an enclosing steer() block"
    assert bare == pytest.approx(tiny_llama.score(["Ann lives in Rome. Where?"],
                                                  [" Rome"])[0].logprob, abs=1e-6)
