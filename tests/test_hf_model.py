from __future__ import annotations

import warnings

import pytest
import torch

import promptscope
from promptscope.errors import CapabilityError, ModelLoadError, PromptscopeError
from promptscope.models.hf import HFModel

PROMPTS = ["Is Paris in Europe? Answer:", "Hi", "The capital of Norway is", "Q: 2 + 2 = ?"]
CONTS = [" yes", " no the answer", " Oslo.", "4"]


def naive_logprob(model: HFModel, prompt: str, cont: str) -> float:
    """One unbatched forward over prompt+continuation, the way one writes it by hand."""
    p, c = model.encode_prompt(prompt), model.encode_continuation(cont)
    with torch.no_grad():
        logits = model.model(torch.tensor([p + c])).logits.log_softmax(-1)[0]
    return sum(logits[len(p) - 1 + k, c[k]].item() for k in range(len(c)))


def test_batched_scores_match_naive_loop(any_tiny_model):
    prompts = [p for p in PROMPTS for _ in CONTS]
    conts = CONTS * len(PROMPTS)
    scores = any_tiny_model.score(prompts, conts)
    for p, c, s in zip(prompts, conts, scores):
        assert s.logprob == pytest.approx(naive_logprob(any_tiny_model, p, c), abs=1e-4)
        assert len(s.token_logprobs) == len(s.tokens) == len(
            any_tiny_model.encode_continuation(c))


def test_scores_do_not_depend_on_batch_size(tiny_llama):
    prompts = [p for p in PROMPTS for _ in CONTS]
    conts = CONTS * len(PROMPTS)
    auto = [s.logprob for s in tiny_llama.score(prompts, conts)]
    tiny_llama.batch_size = 1
    try:
        one = [s.logprob for s in tiny_llama.score(prompts, conts)]
    finally:
        tiny_llama.batch_size = None
    assert one == pytest.approx(auto, abs=1e-4)


def test_many_long_choices_keep_each_pass_within_the_token_budget(tiny_llama, monkeypatch):
    """Every multi-token continuation is a row over its prompt's cache in the second pass, so
    batches count both passes, and a prompt with more such rows than one pass takes is split:
    no forward holds more tokens (rows x keys) than the budget, and the scores do not move."""
    conts = [f" answer number {i} is long" for i in range(30)] + [" yes"]
    prompts = [PROMPTS[0]] * len(conts) + [PROMPTS[2]] * len(conts)
    conts = conts * 2
    whole = [s.logprob for s in tiny_llama.score(prompts, conts)]
    sizes = []
    hook = tiny_llama.model.register_forward_pre_hook(
        lambda m, a, k: sizes.append(k["attention_mask"].numel()), with_kwargs=True)
    monkeypatch.setattr(HFModel, "token_budget", property(lambda self: 120))
    try:
        split = [s.logprob for s in tiny_llama.score(prompts, conts)]
    finally:
        hook.remove()
    assert split == pytest.approx(whole, abs=1e-4)
    assert max(sizes) <= 120 and len(sizes) > 4
    assert split[0] == pytest.approx(naive_logprob(tiny_llama, prompts[0], conts[0]), abs=1e-4)


def test_progress_counts_every_pair(tiny_llama):
    seen = []
    tiny_llama.score(PROMPTS * 2, CONTS * 2, progress=seen.append)
    assert sum(seen) == 8


def test_oom_halves_the_batch_and_still_scores_everything(tiny_llama, monkeypatch):
    real = HFModel._score_batch
    calls = []

    def flaky(self, batch, *args):
        calls.append(len(batch))
        if len(batch) > 1:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(self, batch, *args)

    monkeypatch.setattr(HFModel, "_score_batch", flaky)
    try:
        scores = tiny_llama.score(PROMPTS, CONTS)
    finally:
        tiny_llama.batch_size = None
    assert calls[0] == 4 and calls.count(1) == 4
    for p, c, s in zip(PROMPTS, CONTS, scores):
        assert s.logprob == pytest.approx(naive_logprob(tiny_llama, p, c), abs=1e-4)


def test_greedy_generation_matches_unbatched_generate(any_tiny_model):
    tiny_model = any_tiny_model
    gens = tiny_model.generate(PROMPTS, max_new_tokens=6)
    tok = tiny_model.tokenizer
    for prompt, (g,) in zip(PROMPTS, gens):
        ids = torch.tensor([tiny_model.encode_prompt(prompt)])
        ref = tiny_model.model.generate(ids, max_new_tokens=6, do_sample=False,
                                        pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
        eos = tok.eos_token_id
        ref = ref.tolist()
        ref = ref[: ref.index(eos)] if eos in ref else ref
        assert g.text == tok.decode(ref, skip_special_tokens=True)
        assert g.logprob < 0
        assert g.finish_reason in ("stop", "length")


def test_a_checkpoints_generation_processors_do_not_change_greedy_decoding(tiny_llama):
    """A checkpoint's generation_config may ask for a repetition penalty and the like; greedy
    decoding still picks the model's argmax at each step."""
    plain = tiny_llama.generate(PROMPTS, max_new_tokens=8)
    config = tiny_llama.model.generation_config
    config.repetition_penalty, config.no_repeat_ngram_size = 50.0, 1
    try:
        penalised = tiny_llama.generate(PROMPTS, max_new_tokens=8)
    finally:
        config.repetition_penalty, config.no_repeat_ngram_size = 1.0, 0
    assert [g[0].text for g in penalised] == [g[0].text for g in plain]


def test_sampling_is_seeded_and_n_samples(tiny_llama):
    a = tiny_llama.generate(PROMPTS[:2], max_new_tokens=8, temperature=1.0, n=3, seed=7)
    b = tiny_llama.generate(PROMPTS[:2], max_new_tokens=8, temperature=1.0, n=3, seed=7)
    assert [[g.text for g in s] for s in a] == [[g.text for g in s] for s in b]
    assert all(len(s) == 3 for s in a)
    assert len({g.text for g in a[0]}) > 1  # random weights + temperature 1: samples differ


def test_generation_logprob_is_the_models_own(tiny_llama):
    (g,), = tiny_llama.generate(["Hi"], max_new_tokens=4)
    assert g.finish_reason == "length"
    assert g.logprob == pytest.approx(naive_logprob(tiny_llama, "Hi", g.text), abs=1e-3)


def test_chat_prompt_uses_the_template(tiny_llama):
    text = tiny_llama.chat_prompt("hello")
    assert text.startswith("<s><|user|>\nhello</s>") and text.endswith("<|assistant|>\n")
    # The chat text carries its own BOS: encoding must not add a second one.
    ids = tiny_llama.encode_prompt(text)
    assert ids.count(tiny_llama.tokenizer.bos_token_id) == 1


def test_chat_prompt_without_template_is_a_clear_error(tiny_gpt2_dir):
    m = HFModel.from_pretrained(tiny_gpt2_dir)
    m.tokenizer.chat_template = None
    with pytest.raises(CapabilityError, match="no chat template"):
        m.chat_prompt("hi")


def test_empty_continuation_rejected(tiny_llama):
    with pytest.raises(PromptscopeError, match="empty"):
        tiny_llama.score(["a"], [""])


def test_describe_reports_device_and_dtype(tiny_llama):
    d = tiny_llama.describe()
    assert d["device"] == "cpu" and d["dtype"] == "float32"
    assert d["architecture"] == "LlamaForCausalLM" and d["layers"] == 2


def test_dtype_override(tiny_llama_dir):
    m = HFModel.from_pretrained(tiny_llama_dir, dtype="bf16")
    assert m.describe()["dtype"] == "bfloat16"
    with pytest.raises(PromptscopeError, match="Unknown dtype"):
        HFModel.from_pretrained(tiny_llama_dir, dtype="fp7")


def test_a_model_folder_given_as_a_path(tiny_llama_dir):
    from pathlib import Path

    model = promptscope.load_model(Path(tiny_llama_dir), alias="path-llama", make_default=False)
    assert model.name == "path-llama" and model.score(["Hi"], [" there"])[0].tokens
    with pytest.raises(ModelLoadError, match=r"not a list \(\"\['Ann lives in'\]\"\); check "
                                             r"the order"):
        promptscope.reachability(["Ann lives in"], model, save=False, progress=False)


def test_load_errors_name_what_was_tried(tmp_path):
    with pytest.raises(ModelLoadError, match="No model folder at './missing-model'"):
        HFModel.from_pretrained("./missing-model")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match="no config.json"):
        HFModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="Could not load a causal LM from folder"):
        HFModel.from_pretrained(tmp_path)


def test_unreachable_hub_fails_fast_with_a_clear_message(monkeypatch):
    import time

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="'some-org/some-model' is not a local folder.*cannot "
                                             "be reached"):
        HFModel.from_pretrained("some-org/some-model")
    assert time.perf_counter() - t0 < 10


def test_generation_stops_at_any_end_token_of_the_generation_config(tiny_llama_dir):
    m = HFModel.from_pretrained(tiny_llama_dir)
    (free,), = m.generate(["Hi"], max_new_tokens=4)
    second = m.tokenizer.convert_tokens_to_ids(free.tokens[1])  # make the 2nd token an end token
    m.model.generation_config.eos_token_id = [m.tokenizer.eos_token_id, second]
    (g,), = m.generate(["Hi"], max_new_tokens=4)
    assert g.finish_reason == "stop"
    assert g.tokens == free.tokens[: free.tokens.index(free.tokens[1])]


def test_a_model_placed_by_accelerate_loads_scores_and_steers(tiny_llama, tiny_llama_dir,
                                                             tmp_path):
    """``device_map=...`` (a large model spread over devices, or partly offloaded) is placed
    by accelerate; moving it afterwards failed ("You can't move a model that has some modules
    offloaded"). Here layer 1 lives on disk: scores, PASTA and vector steering must equal the
    plain model's."""
    from promptscope.models.vectors import SteeringVector

    placement = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                 "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    placed = HFModel.from_pretrained(tiny_llama_dir, name="placed", device_map=placement,
                                     offload_folder=str(tmp_path / "offload"))
    assert placed.model.hf_device_map["model.layers.1"] == "disk"
    assert placed.device == torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    size = tiny_llama.text_config.hidden_size
    vector = SteeringVector({1: torch.randn(size, generator=g)}, size)
    prompts, conts = ["Is Paris in Europe? Answer:", "Paris is the capital of"], [" yes", " France"]
    got, want = [], []
    for model, out in ((placed, got), (tiny_llama, want)):
        out.append([s.logprob for s in model.score(prompts, conts)])
        with promptscope.steer(model, heads="all", alpha=0.01, emphasis="Paris"):
            out.append([s.logprob for s in model.score(prompts, conts)])
        with promptscope.steer(model, vector=vector, strength=2.0):
            out.append([g[0].text for g in model.generate(prompts, max_new_tokens=4)])
    for a, b in zip(got[:2], want[:2]):
        assert a == pytest.approx(b, abs=1e-5)
    assert got[2] == want[2]
    assert got[1] != pytest.approx(got[0], abs=1e-3)  # the steering moved the scores


def test_prompts_past_a_learned_position_table_are_refused(tiny_gpt2, tiny_llama,
                                                           fresh_tiny_llama):
    """GPT-2 reads at most 512 positions here (its ``wpe`` table); a longer input failed deep
    in the forward with a bare "IndexError: index out of range in self". Now each way in says
    which prompt and by how much, and up to the limit still runs. Rotary positions (llama) have
    no hard limit."""
    assert tiny_gpt2.max_positions == 512 and tiny_llama.max_positions is None
    word = tiny_gpt2.encode_continuation(" cat")
    assert len(word) == 1
    fits = "cat" + " cat" * 499
    n = len(tiny_gpt2.encode_prompt(fits))
    assert 490 < n < 504
    # (a continuation's last token, and the last new token, are never read: 513 - n fit)
    (score,) = tiny_gpt2.score([fits], [" cat" * (513 - n)])
    assert score.logprob < 0
    with pytest.raises(PromptscopeError, match=r"is 513 tokens with its continuation; .* at "
                                               r"most 512"):
        tiny_gpt2.score([fits], [" cat" * (514 - n)])
    (g,), = tiny_gpt2.generate([fits], max_new_tokens=513 - n)
    with pytest.raises(PromptscopeError, match=rf"is 513 tokens with the {513 - n} new tokens "
                                               rf".*lower max_new_tokens \(now {514 - n}\)"):
        tiny_gpt2.generate([fits], max_new_tokens=514 - n)
    too_long = fits + " cat" * 20
    with pytest.raises(PromptscopeError, match="learned position table"):
        promptscope.attention("{x}", tiny_gpt2, vars=[{"x": too_long}], save=False,
                              progress=False)
    with pytest.raises(PromptscopeError, match="with its target"):
        promptscope.attribute("{x}", tiny_gpt2, vars=[{"x": fits}], target=" cat" * (514 - n),
                              level="tokens", save=False, progress=False)
    with pytest.raises(PromptscopeError, match=rf"is {n + 40} tokens with 40 control tokens; "
                                               r".* lower k_max or shorten x0"):
        promptscope.reachability(tiny_gpt2, [fits], "bottom:1", k_max=40, method="greedy",
                                 save=False, progress=False, bound=False)
    # Rotary positions have no hard limit: past the trained context (512 here) the model runs,
    # with one warning per model.
    llama = fresh_tiny_llama  # (warned once per model: one of its own)
    with pytest.warns(UserWarning, match=r"trained on at most 512 \(max_position_embeddings\)"):
        (g,), = llama.generate([too_long], max_new_tokens=2)
    assert len(g.tokens) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llama.score([too_long], [" cat"])


def test_forwards_compute_logits_at_the_last_position_only(tiny_llama):
    """Scoring's prompt pass reads the last position's logits only, and attention capture and
    hidden-state collection none; the head over every position is [rows, length, vocabulary]
    (65 k tokens x a 262 k vocabulary is 34 GB in bf16). Measured on the CPU, scoring 8 k tokens
    with a 65 k vocabulary: peak RSS 2458 -> 442 MB, 1.84 -> 0.11 s."""
    from promptscope.models.vectors import collect_states

    seen = []
    hook = tiny_llama.model.lm_head.register_forward_hook(
        lambda module, args, out: seen.append(tuple(args[0].shape[:2])))
    prompts = ["Is Paris in Europe? Answer:", "Hi"]
    try:
        scores = tiny_llama.score(prompts, [" yes", " no"])
        tiny_llama.forward_with_attention(prompts, [0], lambda *args: None)
        collect_states(tiny_llama, prompts, layers=[1])
    finally:
        hook.remove()
    assert seen == [(2, 1)] * 3
    assert all(s.logprob < 0 for s in scores)


@pytest.mark.parametrize("family", ["jamba", "recurrent_gemma"])
def test_a_cache_that_cannot_continue_several_tokens_is_scored_in_one_pass(family, tmp_path):
    """Jamba's CPU path continues its cache over several tokens with other numbers than one
    pass gives, and RecurrentGemma's output has no cache at all (it failed with a bare
    AttributeError): a check on the first multi-token score sends both to the full pass."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from promptscope.testing import train_tokenizer

    tok = train_tokenizer(512)
    shape = dict(vocab_size=len(tok), hidden_size=64, num_attention_heads=4,
                 intermediate_size=128, initializer_range=0.2, bos_token_id=tok.bos_token_id,
                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if family == "jamba":
        shape.update(num_hidden_layers=2, num_key_value_heads=2, num_experts=2,
                     num_experts_per_tok=1, attn_layer_period=2, attn_layer_offset=1,
                     expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8,
                     use_mamba_kernels=False)
    else:
        shape.update(num_hidden_layers=3, num_key_value_heads=1, lru_width=64,
                     attention_window_size=8, block_types=["recurrent", "attention"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **shape)).save_pretrained(
        tmp_path)
    tok.save_pretrained(tmp_path)
    model = HFModel.from_pretrained(tmp_path)
    prompts = ["Is Paris in Europe? Answer:", "The cat sat on the mat. A dog"]
    conts = [" yes it is in Europe", " ran in the park"]
    got = model.score(prompts, conts)
    assert not model.continues_cache_exactly()
    for p, c, s in zip(prompts, conts, got):
        pi, ci = model.encode_prompt(p), model.encode_continuation(c)
        with torch.no_grad():
            lp = model.model(input_ids=torch.tensor([pi + ci])).logits[0].float().log_softmax(-1)
        assert s.logprob == pytest.approx(
            sum(lp[len(pi) - 1 + k, t].item() for k, t in enumerate(ci)), abs=1e-4)


def test_attention_models_continue_the_prompts_cache(tiny_llama):
    assert tiny_llama.continues_cache_exactly()  # (their continuations reuse the prompt pass)


def test_a_shared_attention_block_is_refused_for_what_it_is(tmp_path):
    """Zamba2's one attention block serves several layers (layer index -1): it was refused as
    "no attention layers (e.g. a state-space model)"."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from promptscope.testing import train_tokenizer

    tok = train_tokenizer(512)
    cfg = AutoConfig.for_model(
        "zamba2", vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, mamba_d_state=8,
        mamba_headdim=16, mamba_ngroups=1, n_mamba_heads=8, hybrid_layer_ids=[1],
        num_mem_blocks=1, layers_block_type=["mamba", "hybrid"], adapter_rank=8,
        use_mem_rope=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = HFModel.from_pretrained(tmp_path)
    with pytest.raises(CapabilityError, match="has attention heads, but no decoder layer calls "
                                              "attention as its own layer"):
        promptscope.attention("Context: <<Ann lives in Rome.>> Where?", model, save=False,
                              progress=False)
