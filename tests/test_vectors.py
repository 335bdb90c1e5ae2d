"""Vector steering (CAA, ICV) with forward hooks == adding the vector to the hidden state."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import promptscope
from promptscope.errors import CapabilityError, PromptscopeError
from promptscope.models import icv_kernel, vectors
from promptscope.models.hf import _output_cache
from promptscope.models.vectors import (
    SteeringVector,
    VectorSteering,
    _Hooks,
    collect_states,
    decoder_layers,
    load_vector,
)

PROMPTS = [
    "Context: Ann lives in Rome. Bob lives in Oslo. Question: where does Ann live? Answer:",
    "Is Paris in Europe? Answer:",
    "The cat sat on the mat. The dog ran in the park. Where is the cat?",
]
LAYER = 1


def _vector(model, layers=(LAYER,), seed=0, scale=1.0, mode="add"):
    g = torch.Generator().manual_seed(seed)
    size = model.text_config.hidden_size
    return SteeringVector({layer: torch.randn(size, generator=g) * scale for layer in layers},
                          size, mode=mode)


def _hidden(out):
    """A block's residual stream. Gemma 3n's blocks pass ``[streams, B, L, D]`` (AltUp), and
    compute stream ``altup_active_idx``, 0 in its configs: the residual stream is that one."""
    h = out[0] if isinstance(out, tuple) else out
    return h[0] if h.dim() == 4 else h


def _with_hidden(out, h):
    full = out[0] if isinstance(out, tuple) else out
    if full.dim() == 4:  # the other AltUp streams kept
        full = full.clone()
        full[0] = h
        h = full
    return (h, *out[1:]) if isinstance(out, tuple) else h


# ------------------------------------------------------------- an independent re-implementation
class AddHook:
    """What vector steering is, written out by hand: a hook on one block that adds
    ``strength * v`` to every position of its output (unpadded, single-prompt inputs only)."""

    def __init__(self, model, layer, v, strength, start=0):
        self.v, self.s, self.start = v, strength, start
        self.handle = decoder_layers(model.model)[layer].register_forward_hook(self)
        self.offset = 0  # tokens already in the cache (for the no-cache reference it stays 0)

    def __call__(self, module, args, out):
        h = _hidden(out).clone()
        pos = torch.arange(h.shape[1], device=h.device) + self.offset
        h[:, pos >= self.start] += self.s * self.v.to(h)
        return _with_hidden(out, h)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _logits(model, text):
    ids = torch.tensor([model.encode_prompt(text)], device=model.device)
    with torch.no_grad():
        return model.model(input_ids=ids).logits[0].float().cpu()


def _ours(hooks):
    """promptscope's steering hooks among a module's hooks (transformers installs its own
    output-capturing hooks for ``output_hidden_states`` and keeps them)."""
    return [h for h in hooks.values() if "_Hooks" in getattr(h, "__qualname__", "")]


def _no_hooks_left(model):
    assert not _ours(model.model._forward_pre_hooks)
    assert all(not _ours(block._forward_hooks) for block in decoder_layers(model.model))
    assert model.vector_steering is None and model.steering is None


# ------------------------------------------------------------- zero strength, equivalence
def test_zero_strength_changes_no_logit(tiny_model):
    base = _logits(tiny_model, PROMPTS[0])
    with promptscope.steer(tiny_model, vector=_vector(tiny_model, layers=(0, 1)), strength=0.0):
        same = _logits(tiny_model, PROMPTS[0])
    assert torch.equal(base, same)
    icv = _vector(tiny_model, layers=(0, 1), mode="icv")
    with promptscope.steer(tiny_model, vector=icv, strength=0.0):
        close = _logits(tiny_model, PROMPTS[0])
    assert torch.allclose(base, close, atol=1e-5)  # normalise-and-rescale is exact up to rounding


def test_steering_equals_adding_the_vector_by_hand(tiny_model):
    v = _vector(tiny_model, scale=0.5)
    plain = _logits(tiny_model, PROMPTS[0])
    with promptscope.steer(tiny_model, method="vector", vector=v, strength=3.0):
        ours = _logits(tiny_model, PROMPTS[0])
    with AddHook(tiny_model, LAYER, v.vectors[LAYER], 3.0):
        reference = _logits(tiny_model, PROMPTS[0])
    assert torch.allclose(ours, reference, atol=1e-5)
    assert (ours - plain).abs().max() > 1e-2  # the comparison above is not vacuous


def test_last_layer_steering_equals_head_of_shifted_state(tiny_llama):
    """A plain forward written out: the last block's output + s*v, through norm and lm_head."""
    m = tiny_llama
    last = m.text_config.num_hidden_layers - 1
    v = _vector(m, layers=(last,), scale=0.3)
    got = {}
    handle = decoder_layers(m.model)[last].register_forward_hook(
        lambda mod, a, out: got.__setitem__("h", _hidden(out)))
    try:
        _logits(m, PROMPTS[1])
    finally:
        handle.remove()
    with torch.no_grad():
        shifted = got["h"] + 2.0 * v.vectors[last].to(got["h"])
        expected = m.model.lm_head(m.model.model.norm(shifted))[0]
    with promptscope.steer(m, vector=v, strength=2.0):
        ours = _logits(m, PROMPTS[1])
    assert torch.allclose(ours, expected.float().cpu(), atol=1e-5)


def test_start_position_leaves_earlier_tokens_alone(tiny_llama):
    v = _vector(tiny_llama, scale=0.5)
    plain = _logits(tiny_llama, PROMPTS[0])
    with promptscope.steer(tiny_llama, vector=v, strength=3.0, start=5):
        ours = _logits(tiny_llama, PROMPTS[0])
    with AddHook(tiny_llama, LAYER, v.vectors[LAYER], 3.0, start=5):
        reference = _logits(tiny_llama, PROMPTS[0])
    assert torch.equal(ours[:5], plain[:5])
    assert torch.allclose(ours, reference, atol=1e-5)
    assert (ours[5:] - plain[5:]).abs().max() > 1e-2


# ------------------------------------------------------------- hooks are removed

def test_start_last_steers_a_cached_continuation_without_a_mask(tiny_llama):
    """start="last" on direct calls (no 2-D mask): the prompt pass steers its last token, a
    pass over a KV cache (transformers 5 passes it as ``cache``) steers all its tokens."""
    m = tiny_llama
    v = _vector(m, scale=0.5)
    ids = torch.tensor([m.encode_prompt(PROMPTS[1])], device=m.device)
    n = ids.shape[1] - 3
    with promptscope.steer(m, vector=v, strength=3.0, start="last"), torch.no_grad():
        first = m.model(input_ids=ids[:, :n], use_cache=True)
        rest = m.model(input_ids=ids[:, n:], use_cache=True,
                       **{m._cache_kwarg: _output_cache(first)}).logits[0].float().cpu()
    with AddHook(m, LAYER, v.vectors[LAYER], 3.0, start=n - 1):
        reference = _logits(m, PROMPTS[1])
    assert torch.allclose(rest, reference[n:], atol=1e-5)
    assert (rest - _logits(m, PROMPTS[1])[n:]).abs().max() > 1e-2

def test_hooks_removed_on_exit_exception_and_interrupt(tiny_model):
    v = _vector(tiny_model)
    base = _logits(tiny_model, PROMPTS[2])
    with promptscope.steer(tiny_model, vector=v, strength=5.0):
        assert not torch.equal(_logits(tiny_model, PROMPTS[2]), base)
    assert torch.equal(_logits(tiny_model, PROMPTS[2]), base)
    _no_hooks_left(tiny_model)
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc):
            with promptscope.steer(tiny_model, vector=v, strength=5.0):
                _logits(tiny_model, PROMPTS[2])
                raise exc("stop")
        assert torch.equal(_logits(tiny_model, PROMPTS[2]), base)
        _no_hooks_left(tiny_model)
    # An interrupt in the middle of a steered forward pass (raised by a hook of the model).
    blocks = decoder_layers(tiny_model.model)

    def interrupt(module, args, out):
        raise KeyboardInterrupt

    handle = blocks[-1].register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            with promptscope.steer(tiny_model, vector=v, strength=5.0):
                tiny_model.score(PROMPTS[:1], [" yes"])
    finally:
        handle.remove()
    assert torch.equal(_logits(tiny_model, PROMPTS[2]), base)
    _no_hooks_left(tiny_model)


def test_a_ctrl_c_anywhere_in_steer_leaves_the_model_unsteered(tiny_llama):
    """A Ctrl-C at any call of steer's set-up, a steered score and the clean-up (PASTA and a
    vector at once) leaves no hook, no steering state and the model's own logits; a block
    whose clean-up was cut off entirely is undone, with a warning, by the model's next use."""
    from ctrl_c import CtrlCAt

    from promptscope.models.steering import _current

    m = tiny_llama
    v = _vector(m)
    base = _logits(m, PROMPTS[2])
    files = ("promptscope/models/steering.py", "promptscope/models/vectors.py",
             "contextlib.py", "torch/utils/hooks.py")
    k = 1
    while True:
        with warnings.catch_warnings(), CtrlCAt(k, files) as ctrl_c:
            warnings.simplefilter("ignore")  # transformers' own, as steering sets attention
            try:
                with promptscope.steer(m, method="pasta+vector", vector=v, strength=5.0,
                                       heads="all", alpha=0.1, emphasis="big"):
                    m.score(["Is it big? A:"], [" yes"])
            except KeyboardInterrupt:
                pass
        if not ctrl_c.fired:
            break
        if m.steered_by is not None:  # cut off entirely: undone at the model's next use
            with pytest.warns(UserWarning, match="left by a Ctrl-C was still steering"):
                m.score(["Is it big? A:"], [" yes"])
        assert m.steering is None and m.vector_steering is None, ctrl_c.where
        assert _current() is None, ctrl_c.where
        assert not [h for h in m.model._forward_pre_hooks.values()
                    if "_Forward" in getattr(h, "__qualname__", "")], ctrl_c.where
        _no_hooks_left(m)
        k += 1
    assert k > 50
    assert torch.equal(_logits(m, PROMPTS[2]), base)


def test_a_steer_block_whose_clean_up_never_ran_is_undone_at_the_next_use(tiny_llama):
    """A Ctrl-C that lands as a ``with steer(...)`` block is left (at the entry of contextlib's
    ``__exit__``) skips its clean-up while the traceback keeps the block: the model's next use
    undoes it, with a warning; a block entered by a wrapper's ``__enter__`` call is not taken
    for one."""
    import contextlib
    import gc
    import sys

    m = tiny_llama
    base = m.score(PROMPTS[:1], [" yes"])[0].logprob

    def ctrl_c_at_exit(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "__exit__" \
                and frame.f_code.co_filename == contextlib.__file__:
            sys.settrace(None)
            raise KeyboardInterrupt

    def cut_off():
        block = promptscope.steer(m, vector=_vector(m), strength=5.0)
        with block:
            assert m.score(PROMPTS[:1], [" yes"])[0].logprob != pytest.approx(base)
            sys.settrace(ctrl_c_at_exit)

    try:
        cut_off()
    except KeyboardInterrupt as exc:
        kept = exc  # as IPython keeps the last traceback, and the block with it
    assert m.vector_steering is not None  # its clean-up did not run
    with pytest.warns(UserWarning, match="left by a Ctrl-C was still steering the model"):
        assert m.score(PROMPTS[:1], [" yes"])[0].logprob == pytest.approx(base, abs=1e-6)
    _no_hooks_left(m)
    with promptscope.steer(m, vector=_vector(m), strength=5.0):  # a new block is accepted
        del kept
        gc.collect()  # the old block's late clean-up must not undo the new one
        assert m.vector_steering is not None
        assert m.score(PROMPTS[:1], [" yes"])[0].logprob != pytest.approx(base)

    class Steered:  # a wrapper: its block outlives the frame that entered steer()
        def __enter__(self):
            self.block = promptscope.steer(m, vector=_vector(m), strength=5.0)
            return self.block.__enter__()

        def __exit__(self, *exc):
            return self.block.__exit__(*exc)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Steered():
            assert m.score(PROMPTS[:1], [" yes"])[0].logprob != pytest.approx(base)
    _no_hooks_left(m)


def test_nested_steering_is_refused(tiny_llama):
    v = _vector(tiny_llama)
    with promptscope.steer(tiny_llama, vector=v):
        with pytest.raises(PromptscopeError, match="already being steered"):
            with promptscope.steer(tiny_llama, heads="0.0", emphasis="x"):
                pass
    _no_hooks_left(tiny_llama)


# ------------------------------------------------------------- batches, cache, generation
def test_left_padding_untouched_and_batched_scores_match_single(tiny_model):
    m = tiny_model
    v = _vector(m, layers=(0, 1), scale=0.5)
    conts = [" Rome and more", " yes", " on the mat"]
    with promptscope.steer(m, vector=v, strength=2.0):
        batched = m.score(PROMPTS, conts)  # one left-padded batch, continuations over the cache
    for prompt, cont, s in zip(PROMPTS, conts, batched):
        c = m.encode_continuation(cont)
        ids = m.encode_prompt(prompt)
        with AddHook(m, 0, v.vectors[0], 2.0), AddHook(m, 1, v.vectors[1], 2.0):
            with torch.no_grad():
                full = torch.tensor([ids + c], device=m.device)
                logits = m.model(input_ids=full).logits[0].float()
        logp = logits.log_softmax(-1)
        expected = sum(logp[len(ids) - 1 + k, t].item() for k, t in enumerate(c))
        assert s.logprob == pytest.approx(expected, abs=1e-4)

    # Padding positions of the hidden state: exactly as unsteered.
    ids = [m.encode_prompt(p) for p in PROMPTS]
    width = max(map(len, ids))
    input_ids, mask = m._left_pad(ids, width)
    seen = []
    handle = decoder_layers(m.model)[1].register_forward_hook(
        lambda mod, a, out: seen.append(_hidden(out).clone()))
    try:
        with torch.no_grad():
            m.model(input_ids=input_ids, attention_mask=mask)
            with promptscope.steer(m, vector=v, strength=2.0):  # its hook runs after ours...
                # ...so read the steered output with a hook registered inside the block.
                h2 = decoder_layers(m.model)[1].register_forward_hook(
                    lambda mod, a, out: seen.append(_hidden(out).clone()))
                m.model(input_ids=input_ids, attention_mask=mask)
                h2.remove()
    finally:
        handle.remove()
    plain, before, steered = seen  # before / steered: layer 1's output around our hook
    pad = mask == 0
    assert pad.any()
    # The hook leaves padding as it finds it (compared within one pass: in some models, e.g.
    # Inkling, padding rows attend to real tokens, so they differ from the plain pass anyway).
    assert torch.equal(steered[pad], before[pad])
    assert not torch.allclose(steered[~pad], before[~pad])
    if m.model.config.model_type in ("llama", "gpt2"):  # padding sees only padding there
        assert torch.equal(steered[pad], plain[pad])


@pytest.mark.parametrize("start", [0, 2, "last"])
def test_generation_with_kv_cache_equals_no_cache_reference(any_tiny_model, start):
    """Batched, left-padded generation with a cache (Mamba's: no mask, a cache that cannot
    tell its length) steers what a full recompute steers at every step."""
    m = any_tiny_model
    v = _vector(m, scale=0.5)
    prompts = PROMPTS[:2]
    with promptscope.steer(m, vector=v, strength=4.0, start=start):
        gens = m.generate(prompts, max_new_tokens=6)  # batched, left-padded, KV cache
    plain = m.generate(prompts, max_new_tokens=6)
    for prompt, (g,) in zip(prompts, gens):
        first = len(m.encode_prompt(prompt)) - 1 if start == "last" else start
        text, logprob = _recomputed_generation(m, prompt, v, 4.0, first, 6)
        assert g.text == text
        # the log-probs too: the same text can come out of steps left unsteered
        assert g.logprob == pytest.approx(logprob, abs=2e-3)
    assert any(abs(a[0].logprob - b[0].logprob) > 1e-3 for a, b in zip(gens, plain))


def _recomputed_generation(m, prompt, v, strength, first, steps):
    """(text, log-prob) of greedy generation with ``v`` added at LAYER from token ``first``
    on, recomputing the whole sequence at each step (no cache, no mask)."""
    eos = set(m.stop_ids)
    seq = torch.tensor([m.encode_prompt(prompt)], device=m.device)
    new, logprob = [], 0.0
    with AddHook(m, LAYER, v.vectors[LAYER], strength, start=first):
        for _ in range(steps):
            with torch.no_grad():
                logits = m.model(input_ids=seq).logits[0, -1].float()
            nxt = logits.argmax().item()
            logprob += torch.log_softmax(logits, -1)[nxt].item()
            new.append(nxt)
            if nxt in eos:
                break
            seq = torch.cat([seq, torch.tensor([[nxt]], device=m.device)], dim=1)
    kept = new[: next((i for i, t in enumerate(new) if t in eos), len(new))]
    return m.tokenizer.decode(kept, skip_special_tokens=True), logprob


def test_unpadded_generation_is_steered_at_every_step_without_a_host_sync(tiny_llama):
    """transformers' generate drops an all-ones mask: the hooks then steer every token and
    ask the device nothing (on a GPU each question is a host sync, every decoding step)."""
    m = tiny_llama
    v = _vector(m, scale=0.5)

    def host_syncs(fn):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = fn()
        return sum(e.count for e in prof.key_averages() if e.key == "aten::_local_scalar_dense"
                   ), out

    plain, _ = host_syncs(lambda: m.generate([PROMPTS[0]], max_new_tokens=6))
    with promptscope.steer(m, vector=v, strength=4.0):
        steered, gens = host_syncs(lambda: m.generate([PROMPTS[0]], max_new_tokens=6))
    assert plain > 0 and steered == plain
    text, logprob = _recomputed_generation(m, PROMPTS[0], v, 4.0, 0, 6)
    assert gens[0][0].text == text and gens[0][0].logprob == pytest.approx(logprob, abs=2e-3)


# ------------------------------------------------------------- ICV
def _states_via_transformers(model, texts, layer):
    """Last-token residual stream after ``layer`` (not the last) from transformers' own
    ``output_hidden_states``."""
    out = []
    for t in texts:
        with torch.no_grad():
            hs = model.model(input_ids=torch.tensor([model.encode_prompt(t)], device=model.device),
                             output_hidden_states=True).hidden_states
        out.append(hs[layer + 1][0, -1].float().cpu())  # [0] is the embeddings
    return torch.stack(out)


DEMOS = [("Is Paris in Europe? Answer:", "Is Paris in Europe? Answer: yes"),
         ("Is Rome in Asia? Answer:", "Is Rome in Asia? Answer: no"),
         ("Where is the cat?", "Where is the cat? On the mat."),
         ("Ann lives in", "Ann lives in Rome.")]


def test_collected_states_are_each_prompts_residual_stream(tiny_model):
    """States read in a left-padded batch (what CAA, ICV and the knob are built from) equal
    transformers' own ``output_hidden_states`` of each prompt alone; on Gemma 3n, of the AltUp
    stream its blocks compute."""
    m = tiny_model
    # every layer but the last (transformers reports the last one after the final norm),
    # Gemma 4's key-sharing ones included
    layers = list(range(len(decoder_layers(m.model)) - 1))
    got = collect_states(m, PROMPTS, layers=layers)
    mean = collect_states(m, PROMPTS, layers=layers, position="mean")
    for i, text in enumerate(PROMPTS):
        with torch.no_grad():
            hs = m.model(input_ids=torch.tensor([m.encode_prompt(text)], device=m.device),
                         output_hidden_states=True).hidden_states
        for j in layers:
            h = _hidden(hs[j + 1])[0].float().cpu()
            assert torch.allclose(got[i, j], h[-1], atol=1e-4), f"layer {j}"
            assert torch.allclose(mean[i, j], h.mean(0), atol=1e-4), f"layer {j}"


def test_icv_is_first_principal_direction_of_differences(tiny_llama):
    icv = promptscope.in_context_vector(DEMOS, tiny_llama, layers=[0])
    d = (_states_via_transformers(tiny_llama, [y for _, y in DEMOS], 0)
         - _states_via_transformers(tiny_llama, [x for x, _ in DEMOS], 0))
    # Independently: the top eigenvector of sum_i d_i d_i^T maximises sum_i (u . d_i)^2.
    _, eigvecs = torch.linalg.eigh(d.double().T @ d.double())
    u = icv.vectors[0]
    assert u.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert abs(float(u.double() @ eigvecs[:, -1])) == pytest.approx(1.0, abs=1e-4)
    assert float(u @ d.mean(0)) > 0  # signed like the mean difference
    assert icv.mode == "icv" and icv.meta["n_pairs"] == 4 and 0 < icv.meta["explained"][0] <= 1


@pytest.fixture(params=["cpu ops", "fused rms_norm ops", "triton kernel"])
def icv_form(request, monkeypatch):
    """Each form of the ICV shift: the aten ops GPUs take (fused rms_norm) on the CPU too, and
    CUDA's Triton kernel, natively on a CUDA test device, else in Triton's interpreter (checked
    to have run, not fallen back). Yields the device to build tensors on."""
    form = request.param
    native = form == "triton kernel" and os.environ.get("PROMPTSCOPE_TEST_DEVICE") == "cuda"
    monkeypatch.setattr(vectors, "fused_rms_norm", lambda t: form == "fused rms_norm ops")
    if not native:
        monkeypatch.setattr(vectors, "icv_kernel_here", lambda t: form == "triton kernel")
    ran: list[bool] = []
    if form == "triton kernel":
        pytest.importorskip("triton")
        if not native and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("runs in a pytest of its own (test_icv_kernel_in_tritons_interpreter)")
        monkeypatch.setattr(icv_kernel, "_STATE", {})
        icv_kernel._kernel.cache_clear()

        def counted(*args, **kwargs):
            out = icv_kernel.icv_shift(*args, **kwargs)
            ran.append(out is not None)
            return out

        monkeypatch.setattr(vectors, "icv_shift", counted)
    yield "cuda" if native else "cpu"
    if form == "triton kernel":
        assert ran and all(ran), "the Triton kernel did not run"


def test_icv_kernel_in_tritons_interpreter():
    """The Triton-kernel cases of the ICV tests, on the CPU in Triton's interpreter. triton.jit
    reads TRITON_INTERPRET when triton is imported, which in this process torch may already
    have done, so they run in a pytest of their own."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this is that pytest")
    if os.environ.get("PROMPTSCOPE_TEST_DEVICE") == "cuda":
        pytest.skip("on a CUDA test device the kernel cases run natively")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "triton"], env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and re.search(r"\b6 passed", run.stdout), run.stdout[-3000:]


def test_icv_shift_preserves_each_latent_norm(tiny_llama, icv_form):
    icv = promptscope.in_context_vector(DEMOS, tiny_llama)
    block = decoder_layers(tiny_llama.model)[1]
    seen = []
    before = block.register_forward_hook(lambda mod, a, out: seen.append(_hidden(out).clone()))
    try:
        with promptscope.steer(tiny_llama, vector=icv, strength=0.5):
            after = block.register_forward_hook(
                lambda mod, a, out: seen.append(_hidden(out).clone()))
            tiny_llama.score(PROMPTS, [" yes"] * 3)
            after.remove()
    finally:
        before.remove()
    pre, post = (x.cpu() for x in seen)
    assert torch.allclose(pre.norm(dim=-1), post.norm(dim=-1), rtol=1e-5)
    cos = torch.nn.functional.cosine_similarity(pre, post, dim=-1)
    assert cos.min() < 0.999  # moved, not just kept
    # ...and it is the paper's formula: normalize(h/|h| + lambda * icv) * |h|.
    n = pre.norm(dim=-1, keepdim=True)
    expected = torch.nn.functional.normalize(pre / n + 0.5 * icv.vectors[1], dim=-1) * n
    lengths = torch.tensor(sorted(len(tiny_llama.encode_prompt(p)) for p in PROMPTS))
    width = pre.shape[1]  # one left-padded batch, rows sorted by length
    real = torch.arange(width)[None, :] >= (width - lengths)[:, None]
    assert torch.allclose(post[real], expected[real], atol=1e-4)
    assert torch.equal(post[~real], pre[~real])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("size", [64, 100])
def test_icv_shift_in_the_models_dtype(icv_form, dtype, size):
    """Every form of the shift gives the paper's formula, computed in fp32, back in the
    model's dtype; padding stays untouched and an all-zero latent stays zero (no NaN)."""
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(size, generator=g), dim=0)
    hooks = _Hooks(VectorSteering(SteeringVector({0: u}, size, mode="icv"), 0.5, [0]))
    h = (torch.randn(2, 3, size, generator=g) * 4).to(dtype)
    h[0, 1] = 0
    hooks.gate = torch.tensor([[True, True, True], [False, True, True]])[..., None]
    out = hooks.layer_hook(0)(None, None, (h.to(icv_form), "other outputs"))
    assert out[1] == "other outputs" and out[0].dtype == dtype
    got, hf = out[0].float().cpu(), h.float()
    n = hf.norm(dim=-1, keepdim=True)
    expected = (torch.nn.functional.normalize(hf / n + 0.5 * u, dim=-1) * n).to(dtype).float()
    real = hooks.gate[..., 0].clone()
    real[0, 1] = False
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got[real], expected[real], rtol=tol, atol=tol)
    assert torch.allclose(got[real].norm(dim=-1), n[real][:, 0], rtol=tol)
    assert torch.equal(got[0, 1], torch.zeros(size))
    assert torch.equal(out[0][1, 0].cpu(), h[1, 0])  # padding


def test_icv_shift_with_a_gate_that_broadcasts_over_the_batch(icv_form):
    """Without a 2-D mask the pre-hook's gate is [1, q, 1] (positions alike in every row):
    every form steers the same positions of every row."""
    g = torch.Generator().manual_seed(1)
    u = torch.nn.functional.normalize(torch.randn(48, generator=g), dim=0)
    hooks = _Hooks(VectorSteering(SteeringVector({0: u}, 48, mode="icv"), 0.5, [0]))
    h = torch.randn(3, 4, 48, generator=g)
    hooks.gate = torch.tensor([[False, False, True, True]])[..., None]
    out = hooks.layer_hook(0)(None, None, h.to(icv_form)).cpu()
    n = h.norm(dim=-1, keepdim=True)
    moved = torch.nn.functional.normalize(h / n + 0.5 * u, dim=-1) * n
    assert torch.allclose(out[:, 2:], moved[:, 2:], atol=1e-5)
    assert torch.equal(out[:, :2], h[:, :2])


def test_icv_kernel_failure_falls_back_to_the_aten_ops(monkeypatch):
    """A kernel that cannot build (an unsupported GPU) warns once, then the aten ops steer."""
    monkeypatch.setattr(icv_kernel, "_STATE", {})
    monkeypatch.setattr(vectors, "icv_kernel_here", lambda t: True)

    def broken():
        raise RuntimeError("no kernel for this GPU")

    monkeypatch.setattr(icv_kernel, "_kernel", broken)
    u = torch.nn.functional.normalize(torch.ones(8), dim=0)
    hooks = _Hooks(VectorSteering(SteeringVector({0: u}, 8, mode="icv"), 0.5, [0]))
    h = torch.arange(16.0).reshape(1, 2, 8)
    with pytest.warns(UserWarning, match="could not run .*no kernel for this GPU"):
        first = hooks.layer_hook(0)(None, None, h)
    n = h.norm(dim=-1, keepdim=True)
    assert torch.allclose(first, torch.nn.functional.normalize(h / n + 0.5 * u, dim=-1) * n)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert torch.equal(hooks.layer_hook(0)(None, None, h), first)


def test_contrastive_vector_is_mean_difference(tiny_llama):
    pos = ["Answer from the context: Ann lives in Rome.", "Use the text: the sky is green."]
    neg = ["Answer from memory: Ann lives in Rome.", "Use what you know: the sky is blue.",
           "Ignore the text."]
    v = promptscope.contrastive_vector(pos, neg, tiny_llama, layers=[0, 1])
    # (transformers' last hidden state has the final norm applied, so check layer 0)
    expected = (_states_via_transformers(tiny_llama, pos, 0).mean(0)
                - _states_via_transformers(tiny_llama, neg, 0).mean(0))
    assert torch.allclose(v.vectors[0], expected, atol=1e-4)
    assert v.mode == "add" and v.method == "caa" and v.layers == [0, 1]
    # Results / DataFrames of %%prompt variants work as the two sides.
    run = promptscope.run_prompt("{{Answer from the context|Use the text}}: x", tiny_llama,
                                 target=" y", progress=False, save=False)
    w = promptscope.contrastive_vector(run, run.df.iloc[:1], tiny_llama, layers=[0])
    assert w.meta["n_positive"] == 2 and w.meta["n_negative"] == 1


# ------------------------------------------------------------- values: arithmetic, store
def test_arithmetic_and_store_round_trip(tiny_llama):
    a, b = _vector(tiny_llama, layers=(0, 1), seed=1), _vector(tiny_llama, layers=(1,), seed=2)
    s = a + 0.5 * b
    assert s.layers == [0, 1]
    assert torch.allclose(s.vectors[1], a.vectors[1] + 0.5 * b.vectors[1])
    assert torch.equal(s.vectors[0], a.vectors[0])
    assert torch.allclose((a - a).vectors[0], torch.zeros_like(a.vectors[0]))
    with pytest.raises(PromptscopeError, match="applied differently"):
        a + _vector(tiny_llama, mode="icv")
    sid = s.save("mix")
    back = load_vector("mix")
    assert back.layers == s.layers and back.name == "mix" and back.hidden_size == s.hidden_size
    assert all(torch.equal(back.vectors[k], s.vectors[k]) for k in s.layers)
    assert promptscope.load_vector(sid).name == "mix"
    assert promptscope.load(sid).figure() is not None
    # Steering by name is steering with the value.
    with promptscope.steer(tiny_llama, vector=s, strength=2.0):
        by_value = _logits(tiny_llama, PROMPTS[1])
    with promptscope.steer(tiny_llama, vector="mix", strength=2.0, layers="0,1"):
        by_name = _logits(tiny_llama, PROMPTS[1])
    assert torch.allclose(by_value, by_name, atol=1e-6)
    # Scaling a vector is the same as scaling the strength.
    with promptscope.steer(tiny_llama, vector=2.0 * s, strength=1.0):
        scaled = _logits(tiny_llama, PROMPTS[1])
    assert torch.allclose(scaled, by_value, atol=1e-5)


def test_pasta_and_vector_at_once(tiny_llama):
    v = _vector(tiny_llama, scale=0.5)
    prompt, key = PROMPTS[0], "Ann lives in Rome."
    with promptscope.steer(tiny_llama, method="pasta+vector", heads="0.1,1.0", emphasis=key,
                           vector=v, strength=3.0) as s:
        both = tiny_llama.score([prompt], [" Rome"])[0].logprob
        assert s.to_json()["method"] == "pasta+vector" and s.to_json()["strength"] == 3.0
    with promptscope.steer(tiny_llama, heads="0.1,1.0", emphasis=key):
        with AddHook(tiny_llama, LAYER, v.vectors[LAYER], 3.0):
            reference = tiny_llama.score([prompt], [" Rome"])[0].logprob
        pasta_only = tiny_llama.score([prompt], [" Rome"])[0].logprob
    assert both == pytest.approx(reference, abs=1e-5)
    assert abs(both - pasta_only) > 1e-3
    _no_hooks_left(tiny_llama)


# ------------------------------------------------------------- run_prompt and %%prompt
def test_run_prompt_vector_compare(tiny_llama):
    v = _vector(tiny_llama, scale=0.5)
    template = "Is {city} in Europe? Answer:"
    rows = [{"city": "Paris"}, {"city": "Tokyo"}]
    run = promptscope.run_prompt(template, tiny_llama, vars=rows, choices=" yes| no",
                                 progress=False, steer={"method": "vector", "vector": v,
                                                        "strength": 3.0, "compare": True})
    df = run.df
    assert sorted(df["steered"].unique()) == [False, True] and len(df) == 2 * 2 * 2
    assert run.params["steer"]["method"] == "vector" and run.params["steer"]["strength"] == 3.0
    prompts = ["Is Paris in Europe? Answer:"] * 2
    plain = tiny_llama.score(prompts, [" yes", " no"])
    with promptscope.steer(tiny_llama, vector=v, strength=3.0):
        steered = tiny_llama.score(prompts, [" yes", " no"])
    got = df[df["city"] == "Paris"]
    assert got[~got.steered]["logprob"].tolist() == pytest.approx([s.logprob for s in plain],
                                                                  abs=1e-5)
    assert got[got.steered]["logprob"].tolist() == pytest.approx([s.logprob for s in steered],
                                                                 abs=1e-5)
    assert promptscope.load(run.session_id) == run
    _no_hooks_left(tiny_llama)


def test_prompt_magic_steer_vector(ip, tiny_llama_dir, device_flags):
    from IPython.core.error import UsageError

    ip.run_line_magic("promptscope", f"model {tiny_llama_dir} --as vec-llama{device_flags}")
    model = promptscope.models.default_model()
    v = _vector(model, layers=(0, 1))
    v.save("magic-vec")
    ip.user_ns["myvec"] = v
    run = ip.run_cell_magic("prompt", '--steer vector --vector magic-vec --strength 2 '
                            '--steer-layers 1 --compare --target " x"', "Say {{hi|yo}} now")
    assert len(run.df) == 4 and run.params["steer"]["layers"] == [1]
    run2 = ip.run_cell_magic("prompt", '--steer vector --vector myvec --strength 2 '
                             '--steer-layers 1 --target " x"', "Say {{hi|yo}} now")
    assert run2.df["logprob"].tolist() == pytest.approx(
        run.df[run.df.steered]["logprob"].tolist(), abs=1e-6)
    last = ip.run_cell_magic("prompt", '--steer vector --vector myvec --strength 2 '
                             '--steer-start last --target " x"', "Say {{hi|yo}} now")
    assert last.params["steer"]["start"] == "last"  # (a knob is set where it was read)
    with promptscope.steer(model, vector=v, strength=2, start="last"):
        want = model.score(["Say hi now"], [" x"])[0].logprob
    assert last.df["logprob"].iloc[0] == pytest.approx(want, abs=1e-6)
    with pytest.raises(UsageError, match="the methods are pasta"):
        ip.run_cell_magic("prompt", "--steer knob --target x", "a b")
    with pytest.raises(UsageError, match="needs --vector"):
        ip.run_cell_magic("prompt", "--steer vector --target x", "a b")
    with pytest.raises(UsageError, match="out of range"):
        ip.run_cell_magic("prompt", "--steer vector --vector myvec --steer-layers 7 --target x",
                          "a b")
    with pytest.raises(UsageError, match="No steering vector named"):
        ip.run_cell_magic("prompt", "--steer vector --vector nope --target x", "a b")
    # --steer alone still means PASTA.
    run3 = ip.run_cell_magic("prompt", '--steer --heads 1.0 --target " x"', "Say <<hi>> now")
    assert run3.params["steer"]["heads"] == {"1": [0]}


# ------------------------------------------------------------- errors
def test_errors(tiny_llama, tiny_gpt2):
    v = _vector(tiny_llama)
    with pytest.raises(PromptscopeError, match="Layer 9 is out of range"):
        with promptscope.steer(tiny_llama, vector=v, layers=[9]):
            pass
    with pytest.raises(PromptscopeError, match="no direction for layer"):
        with promptscope.steer(tiny_llama, vector=v, layers=[0]):
            pass
    other = SteeringVector({0: torch.ones(7)}, 7)
    with pytest.raises(PromptscopeError, match="hidden size 7"):
        with promptscope.steer(tiny_llama, vector=other):
            pass
    with pytest.raises(PromptscopeError, match="at least 2 demonstration pairs"):
        promptscope.in_context_vector(DEMOS[:1], tiny_llama)
    with pytest.raises(PromptscopeError, match="at least one positive"):
        promptscope.contrastive_vector([], ["x"], tiny_llama)
    with pytest.raises(PromptscopeError, match="the same, so their difference is zero"):
        promptscope.contrastive_vector(["a", "b", "a"], ["b", "a", "a"], tiny_llama)
    with pytest.raises(PromptscopeError, match="Unknown steering method"):
        with promptscope.steer(tiny_llama, method="knob", vector=v):
            pass
    with pytest.raises(PromptscopeError, match="needs vector="):
        with promptscope.steer(tiny_llama, method="vector"):
            pass
    with pytest.raises(PromptscopeError, match="Layer 5 is out of range"):
        promptscope.contrastive_vector(["a"], ["b"], tiny_gpt2, layers=[5])
    _no_hooks_left(tiny_llama)


def test_api_model_is_refused():
    from promptscope.models.base import Model

    class APIModel(Model):
        name = "api"
        capabilities = frozenset({"score", "generate"})

        def score(self, prompts, continuations, progress=None):
            raise AssertionError

        def generate(self, prompts, **kw):
            raise AssertionError

    api = APIModel()
    with pytest.raises(CapabilityError, match="hidden states and activation steering"):
        with promptscope.steer(api, method="vector", vector=SteeringVector({0: [1.0]}, 1)):
            pass
    with pytest.raises(CapabilityError):
        promptscope.contrastive_vector(["a"], ["b"], api)
    with pytest.raises(CapabilityError):
        promptscope.in_context_vector(DEMOS, api)


# ------------------------------------------------------------- the comparison
def test_compare_steering_rows_equal_direct_measurements(tiny_llama):
    template = "Context: <<{name} lives in {city}.>> Bob lives in Oslo. Where does {name} live?"
    rows = [{"name": n, "city": c, "answer": f" {c}", "choices": [f" {c}", " Oslo"]}
            for n, c in [("Ann", "Rome"), ("Eve", "Lima"), ("Max", "Kyiv")]]
    control = ("Where does {name} live?", rows[:2])
    v = _vector(tiny_llama, scale=0.5)
    text = ["The cat sat on the mat.", "Bob reads a book in the park."]
    cmp = promptscope.compare_steering(
        template, rows, tiny_llama, control=control, text=text, progress=False,
        methods={"PASTA": {"heads": "0.1,1.0", "alpha": [0.1, 0.01]},
                 "CAA": {"method": "vector", "vector": v, "strength": [0.0, 3.0]}})
    df = cmp.df
    assert list(df["method"]) == ["PASTA", "PASTA", "CAA", "CAA"]
    assert list(df["strength"]) == pytest.approx([10, 100, 0, 3])
    zero = df[(df.method == "CAA") & (df.value == 0)].iloc[0]  # strength 0 == unsteered
    assert zero["d_accuracy"] == 0 and zero["d_text"] == pytest.approx(0, abs=1e-6)
    assert zero["d_control"] == 0
    # PASTA has nothing to emphasise in unrelated text: no cost there, by construction (exactly
    # 0 on the CPU; on CUDA the steered layers' other kernels may round differently).
    assert df[df.method == "PASTA"]["d_text"].abs().max() == pytest.approx(0, abs=1e-5)
    # A row is the direct measurement under steer().
    prompts = [f"Context: {r['name']} lives in {r['city']}. Bob lives in Oslo. Where does "
               f"{r['name']} live?" for r in rows]
    with promptscope.steer(tiny_llama, vector=v, strength=3.0):
        right = tiny_llama.score(prompts, [r["answer"] for r in rows])
        heads = [t.split(" ", 1) for t in text]
        lp = tiny_llama.score([h for h, _ in heads], [" " + t for _, t in heads])
    row = df[(df.method == "CAA") & (df.value == 3.0)].iloc[0]
    assert row["logprob"] == pytest.approx(sum(s.logprob for s in right) / 3, abs=1e-5)
    assert row["text_logprob"] == pytest.approx(
        sum(s.logprob for s in lp) / sum(len(s.tokens) for s in lp), abs=1e-5)
    # the default split: 2 tuning rows, 1 test row, drawn once for every setting
    tune, test = cmp.params["tune_rows"], cmp.params["test_rows"]
    assert sorted(tune + test) == [0, 1, 2] and len(tune) == 2
    assert row["tune_logprob"] == pytest.approx(
        sum(right[i].logprob for i in tune) / 2, abs=1e-5)
    # no change on one test row: a wide interval around 0, not the point (0, 0)
    assert zero["d_test"] == 0 and zero["d_test_low"] == pytest.approx(-zero["d_test_high"])
    assert zero["d_test_high"] > 0.5
    # per-row outcomes of each setting (-1: unsteered), the direct measurement's too
    per = cmp.tables["row_outcomes"]
    assert sorted(per["setting_index"].unique()) == [-1, 0, 1, 2, 3]
    mine = per[per.setting_index == int(row.name)].sort_values("row")
    assert mine["logprob"].tolist() == pytest.approx([s.logprob for s in right], abs=1e-5)
    summary = cmp.summary()
    assert len(summary) == 2 and {"d_crossfit", "value_on_test_rows"} <= set(summary.columns)
    fig = cmp.figure()  # 2 methods x 3 panels (strength, text cost, control cost) + chosen
    assert len(fig.data) == 7 and fig.layout.xaxis3.title.text == "drop in control accuracy"
    assert list(fig.data[2].x) == pytest.approx(list(-df[df.method == "PASTA"]["d_control"]))
    assert promptscope.load(cmp.session_id) == cmp
    _no_hooks_left(tiny_llama)


def test_summary_picks_on_the_tuning_rows_and_reports_on_the_test_rows():
    """A setting that wins on all rows only thanks to the test rows is not the one picked: the
    reported gain is the test rows' gain of the setting the tuning rows preferred."""
    from promptscope.result import Result

    df = pd.DataFrame({
        "method": ["A", "A", "B"], "setting": "strength", "value": [1.0, 2.0, 1.0],
        "strength": [1.0, 2.0, 1.0], "accuracy": [0.6, 0.7, 0.5], "d_accuracy": [0.1, 0.2, 0],
        "tune_accuracy": [0.8, 0.6, 0.5], "tune_logprob": [-1.0, -0.5, -2.0],
        "test_accuracy": [0.4, 0.8, 0.5], "d_test": [-0.1, 0.3, 0.0],
        "d_test_low": [-0.3, 0.1, 0.0], "d_test_high": [0.1, 0.5, 0.0]})
    result = Result("steering_comparison", df, params={"baseline": {"accuracy": 0.5}})
    got = result.summary().set_index("method")
    assert got.loc["A", "value"] == 1.0 and got.loc["A", "d_test"] == -0.1
    assert "accuracy" not in got  # the all-rows maximum is not reported as the gain
    # ties on tuning accuracy go to the better log-prob of the right answers
    tied = result.df.assign(tune_accuracy=[0.8, 0.8, 0.5])
    assert Result("steering_comparison", tied, params={}).summary().value[0] == 2.0


def test_crossfit_scores_each_half_with_the_setting_picked_on_the_other():
    """Setting 0 is right on the tuning rows only, setting 1 on the test rows only: each half
    scored by the other half's pick is all wrong, so method A's cross-fitted gain is 0 (its
    single-split gain, setting 0 on the test rows, is 0 too); B is right everywhere."""
    from promptscope.analyses.compare_steering import crossfit
    from promptscope.result import Result

    rights = {-1: [0, 0, 0, 0], 0: [1, 1, 0, 0], 1: [0, 0, 1, 1], 2: [1, 1, 1, 1]}
    per = pd.concat([pd.DataFrame({"row": range(4), "right": [bool(x) for x in r],
                                   "logprob": [-1.0] * 4, "setting_index": k})
                     for k, r in rights.items()], ignore_index=True)
    df = pd.DataFrame({"method": ["A", "A", "B"], "setting": "strength",
                       "value": [1.0, 2.0, 5.0], "tune_accuracy": [1.0, 0.0, 1.0],
                       "tune_logprob": [-1.0] * 3, "test_accuracy": [0.0, 1.0, 1.0],
                       "d_test": [0.0, 1.0, 1.0], "d_test_low": [0.0, 1.0, 1.0],
                       "d_test_high": [0.0, 1.0, 1.0]})
    params = {"tune_share": 0.5, "tune_rows": [0, 1], "test_rows": [2, 3], "seed": 0}
    result = Result("steering_comparison", df, params=params, tables={"row_outcomes": per})
    got = crossfit(result).set_index("method")
    assert got.loc["A", "value"] == 1.0 and got.loc["A", "value_on_test_rows"] == 2.0
    assert got.loc["A", "d_crossfit"] == 0.0
    assert got.loc["B", "d_crossfit"] == 1.0
    assert 0.1 < got.loc["B", "d_crossfit_low"] < 0.5  # 4 rows, all gained: little is known
    summary = result.summary().set_index("method")
    assert (summary["n_test"] == 2).all()  # how many rows d_test and its interval rest on
    assert summary.loc["A", "d_test"] == 0.0 and summary.loc["A", "d_crossfit"] == 0.0
    assert list(summary.columns).index("d_crossfit") == list(summary.columns).index(
        "d_test_high") + 2  # beside the single-split gain, after the other pick
    # no split (tune_share=0) or no per-row outcomes (older sessions): nothing to cross-fit
    # a NaN log-prob (a strength that overflowed) ranks lowest in both picks, as in summary()
    nan_rows = pd.concat([per, pd.DataFrame({"row": range(4), "right": True,
                                             "logprob": [np.nan, -1.0, -1.0, -1.0],
                                             "setting_index": 3}),
                          pd.DataFrame({"row": range(4), "right": True, "logprob": -2.0,
                                        "setting_index": 4})], ignore_index=True)
    more = pd.concat([df, pd.DataFrame({"method": ["C", "C"], "setting": "strength",
                                        "value": [1.0, 2.0], "tune_accuracy": [1.0, 1.0],
                                        "tune_logprob": [np.nan, -2.0]})], ignore_index=True)
    both = Result("steering_comparison", more, params=params,
                  tables={"row_outcomes": nan_rows})
    assert both.summary().set_index("method").loc["C", "value"] == 2.0
    assert crossfit(both).set_index("method").loc["C", "value"] == 2.0
    assert crossfit(Result("steering_comparison", df, params={**params, "tune_share": 0},
                           tables={"row_outcomes": per})) is None
    assert "d_crossfit" not in Result("steering_comparison", df, params=params).summary()


def test_crossfit_interval_holds_the_uncertainty_of_the_choice():
    """Two settings tie on the tuning rows, but only the first (the pick, ties to the first)
    is right on the test rows: resampled tuning rows pick the other one often, and the
    interval must show it (with the picks held fixed it sits near the point gain)."""
    from promptscope.analyses.compare_steering import crossfit, paired_gain_interval
    from promptscope.result import Result

    tune_a, test_a = [1, 1, 0, 0] * 3, [1, 1, 1, 1] * 3
    tune_b, test_b = [0, 0, 1, 1] * 3, [0, 0, 0, 0] * 3
    rights = {-1: [0] * 24, 0: tune_a + test_a, 1: tune_b + test_b}
    per = pd.concat([pd.DataFrame({"row": range(24), "right": [bool(x) for x in r],
                                   "logprob": -1.0, "setting_index": k})
                     for k, r in rights.items()], ignore_index=True)
    df = pd.DataFrame({"method": ["A", "A"], "setting": "strength", "value": [1.0, 2.0],
                       "tune_accuracy": [0.5, 0.5], "tune_logprob": [-1.0, -1.0]})
    params = {"tune_share": 0.5, "tune_rows": list(range(12)),
              "test_rows": list(range(12, 24)), "seed": 0}
    got = crossfit(Result("steering_comparison", df, params=params,
                          tables={"row_outcomes": per})).iloc[0]
    assert got["d_crossfit"] == 0.75  # test rows by setting 0; tuning rows by setting 0
    fixed_low, _ = paired_gain_interval([bool(x) for x in tune_a + test_a], [False] * 24)
    assert fixed_low > 0.49 and got["d_crossfit_low"] < 0.45
    assert got["d_crossfit_high"] >= 0.75


def test_gain_interval_and_split():
    """A bootstrap of the rows gave "+0 (0 to 0)" when no test row changed and "+100 (100 to
    100)" from 3 rows that all gained (and Newcombe's score interval gives (0, 0) when no row
    of 30 at 50 % changes); the adjusted paired interval keeps the uncertainty."""
    from promptscope.analyses.compare_steering import _split, paired_gain_interval

    low, high = paired_gain_interval([True] * 8, [True] * 8)
    assert low == pytest.approx(-high) and 0.15 < high < 0.25  # 8 rows: little is known
    for right in (4, 15, 26):  # 30 rows, none changed, at several accuracies
        low, high = paired_gain_interval([False] * (30 - right) + [True] * right,
                                         [False] * (30 - right) + [True] * right)
        assert low == pytest.approx(-high) and 0.05 < high < 0.08
    assert [round(x, 2) for x in paired_gain_interval([True] * 3, [False] * 3)] == [0.02, 1.0]
    low, high = paired_gain_interval([True] * 8, [False] * 8)
    assert 0.4 < low < 0.55 and high == 1.0
    assert paired_gain_interval([False] * 8, [True] * 8) == pytest.approx((-1.0, -low))
    # half the rows gain: the interval is about 0.5 +- 1.96 * 0.5 / sqrt(n)
    steered, plain = [True] * 200, [True, False] * 100
    low, high = paired_gain_interval(steered, plain)
    assert low == pytest.approx(0.5 - 0.069, abs=0.02) and high == pytest.approx(0.5 + 0.069,
                                                                                abs=0.02)
    tune, test = _split(10, 0.3, seed=4)
    assert len(tune) == 3 and sorted(tune + test) == list(range(10))
    assert _split(10, 0.3, seed=4) == (tune, test) != _split(10, 0.3, seed=5)
    assert _split(3, 0.0, seed=0) == ([0, 1, 2], [0, 1, 2])
    assert _split(2, 0.9, seed=0)[1]  # a test row is always left
    for bad in (1.0, -0.1, "half"):
        with pytest.raises(PromptscopeError, match="tune_share"):
            _split(10, bad, seed=0)
    with pytest.raises(PromptscopeError, match="tune_share=0"):
        _split(1, 0.5, seed=0)


def test_steering_lab_reruns_on_its_controls(tiny_llama):
    from promptscope.widgets import SteeringLab

    template = "Context: <<{name} lives in {city}.>> Bob lives in Oslo. Where does {name} live?"
    rows = [{"name": "Ann", "city": "Rome"}, {"name": "Eve", "city": "Lima"}]
    v = _vector(tiny_llama, layers=(0, 1), scale=0.5)
    lab = SteeringLab(template, tiny_llama, choices=" Rome| Oslo| Lima", vars=rows,
                      vectors={"CAA": v})
    assert lab.last.params["steer"]["alpha"] == 0.01 and len(lab.answers.figure.data) == 6
    lab.method.value = "CAA"
    assert lab.layers.value == (0, 1) and lab.last.params["steer"]["method"] == "vector"
    lab.strength.value = 0.0  # no steering at all
    same = lab.last.df.groupby("steered")["prob"].apply(list)
    assert same[True] == pytest.approx(same[False], abs=1e-6)
    lab.strength.value = 4.0
    lab.layers.value = (1,)
    prompt = "Context: Ann lives in Rome. Bob lives in Oslo. Where does Ann live?"
    with promptscope.steer(tiny_llama, vector=v, strength=4.0, layers=[1]):
        expected = tiny_llama.score([prompt] * 3, [" Rome", " Oslo", " Lima"])
    got = lab.last.df[lab.last.df.steered & (lab.last.df.variant == 0)]["logprob"].tolist()
    assert got == pytest.approx([s.logprob for s in expected], abs=1e-5)
    assert "CAA" in lab.status.value
    _no_hooks_left(tiny_llama)


def test_steering_lab_marks_the_current_setting_on_the_comparison_curve(tiny_llama):
    from promptscope.widgets import SteeringLab

    template = "Context: <<{name} lives in {city}.>> Bob lives in Oslo. Where does {name} live?"
    rows = [{"name": "Ann", "city": "Rome", "answer": " Rome"},
            {"name": "Eve", "city": "Lima", "answer": " Lima"}]
    v = _vector(tiny_llama, layers=(1,), scale=0.5)
    cmp = promptscope.compare_steering(
        template, rows, tiny_llama, choices=[" Rome", " Oslo", " Lima"],
        methods={"PASTA": {"heads": "all", "alpha": [0.1, 0.01]},
                 "CAA": {"vector": v, "strength": [1.0, 4.0]}},
        text=["the cat sat on the mat"], save=False, progress=False)
    lab = SteeringLab(template, tiny_llama, choices=" Rome| Oslo| Lima", vars=rows,
                      vectors={"CAA": v}, comparison=cmp)

    def star():
        return [t for t in lab.curve.figure.data if t.name == "current setting"][0]

    pasta = cmp.df[cmp.df.method == "PASTA"].set_index("value")
    assert star().x[0] == pytest.approx(100.0)  # alpha 0.01 -> strength 1/alpha
    assert star().y[0] == pytest.approx(pasta.loc[0.01, "d_accuracy"])
    lab.method.value = "CAA"
    lab.strength.value = 2.0  # halfway between 1 and 4 on the log axis
    caa = cmp.df[cmp.df.method == "CAA"].set_index("value")
    assert star().y[0] == pytest.approx(caa["d_accuracy"].mean())
    assert len([t for t in lab.curve.figure.data if t.marker.symbol == "star"]) == 2
    lab.strength.value = 0.0  # off the log axis: no star rather than one plotly cannot place
    assert not [t for t in lab.curve.figure.data if t.name == "current setting"]
    before = lab.last
    lab.layers.value = ()  # no layer: says so instead of steering every layer
    assert "Pick at least one layer" in lab.status.value and lab.last is before
    _no_hooks_left(tiny_llama)
    # measured at one layer: the lab picks it, and draws no star at other layers
    both = _vector(tiny_llama, layers=(0, 1), scale=0.5)
    one = promptscope.compare_steering(
        template, rows, tiny_llama, choices=[" Rome", " Oslo", " Lima"],
        methods={"CAA": {"vector": both, "strength": [1.0, 4.0], "layers": [1]}},
        save=False, progress=False)
    lab = SteeringLab(template, tiny_llama, choices=" Rome| Oslo| Lima", vars=rows,
                      vectors={"CAA": both}, comparison=one)
    lab.method.value = "CAA"
    assert lab.layers.value == (1,) and star().x[0] == pytest.approx(1.0)
    lab.layers.value = (0, 1)
    assert not [t for t in lab.curve.figure.data if t.name == "current setting"]
    assert "not the layers the comparison measured" in lab.status.value


def test_steering_lab_draws_a_star_only_for_what_the_comparison_measured(tiny_llama):
    """The star sat on the curve of other heads (the lab steered all heads, the comparison
    layer 1's), read the end point's gain beyond the measured strengths, and a knob could not
    be set to its values (tens) nor at the token it was measured at."""
    from promptscope.widgets import SteeringLab

    template = "Context: <<{name} lives in {city}.>> Bob lives in Oslo. Where does {name} live?"
    rows = [{"name": "Ann", "city": "Rome", "answer": " Rome"},
            {"name": "Eve", "city": "Lima", "answer": " Lima"}]
    knob = SteeringVector({1: torch.nn.functional.normalize(
        torch.randn(tiny_llama.model.config.hidden_size), dim=0)},
        tiny_llama.model.config.hidden_size, mode="set")
    cmp = promptscope.compare_steering(
        template, rows, tiny_llama, choices=[" Rome", " Oslo", " Lima"],
        methods={"PASTA up": {"heads": "L1", "alpha": [2.0, 4.0], "mode": "include"},
                 "PASTA (L1)": {"heads": "L1", "alpha": [0.1, 0.01]},
                 "knob": {"vector": knob, "strength": [30.0, 60.0], "start": "last"}},
        save=False, progress=False)

    def stars():
        return [t for t in lab.curve.figure.data if t.name == "current setting"]

    lab = SteeringLab(template, tiny_llama, choices=" Rome| Oslo| Lima", vars=rows,
                      vectors={"knob": knob}, comparison=cmp)
    assert lab._label() == "PASTA (L1)"  # the comparison's PASTA as the lab steers it
    assert lab.heads == "L1" and stars() and stars()[0].x[0] == pytest.approx(100.0)
    lab = SteeringLab(template, tiny_llama, choices=" Rome| Oslo| Lima", vars=rows,
                      vectors={"knob": knob}, comparison=cmp, heads="all")
    assert not stars() and "PASTA steers heads all; the comparison measured L1" in \
        lab.status.value
    lab.method.value = "knob"
    assert lab.strength.max >= 60 and lab.strength.value == 30.0
    assert lab.steering()["start"] == "last" and lab.last.params["steer"]["start"] == "last"
    assert stars() and stars()[0].x[0] == pytest.approx(30.0)
    lab.strength.value = 100.0
    assert not stars() and "strength 100 is outside the measured 30 to 60" in lab.status.value
    _no_hooks_left(tiny_llama)


# ------------------------------------------------------------- torch.compile
def test_steered_generation_is_steered_when_transformers_compiles_the_decoding_step(
        fresh_tiny_llama):
    """With a static cache on a GPU, transformers compiles the decoding step the first time it
    generates, and compiled code runs no hook added later: a vector would steer the prompt pass
    only. promptscope generates uncompiled while a vector is on (forced here on the CPU with
    the eager backend, so that it compiles at all)."""
    from transformers import CompileConfig

    model = fresh_tiny_llama
    v = _vector(model, scale=4.0)

    def run():
        plain = model.generate(PROMPTS[:1], max_new_tokens=5)[0][0]
        with promptscope.steer(model, vector=v):
            steered = model.generate(PROMPTS[:1], max_new_tokens=5)[0][0]
        return plain, steered

    want_plain, want_steered = run()  # uncompiled
    config = model.model.generation_config
    config.cache_implementation = "static"
    config.compile_config = CompileConfig(backend="eager")
    config.compile_config._compile_all_devices = True  # transformers compiles on a GPU only
    plain, steered = run()  # the plain call compiles the decoding step first
    assert getattr(model.model, "_compiled_call", None) is not None  # it did compile
    assert steered.text == want_steered.text
    assert steered.logprob == pytest.approx(want_steered.logprob, abs=1e-4)
    assert plain.logprob == pytest.approx(want_plain.logprob, abs=1e-4)
    assert abs(want_steered.logprob - want_plain.logprob) > 1e-3


@pytest.mark.parametrize("how", ["module", "forward"])
def test_a_compiled_model_is_refused_where_hooks_would_be_skipped(fresh_tiny_llama, how):
    from promptscope.models.vectors import collect_states

    model = fresh_tiny_llama

    def pasta():  # no hooks: its attention function reads the steering state on every call
        with promptscope.steer(model, heads="all", alpha=0.01, emphasis="Ann lives in Rome."):
            return model.score(PROMPTS[:1], [" Rome"])[0].logprob

    want = pasta()
    if how == "module":
        model.model.compile(backend="eager")
    else:
        model.model.forward = torch.compile(model.model.forward, backend="eager")
    with pytest.raises(CapabilityError, match="compiled with torch.compile"):
        with promptscope.steer(model, vector=_vector(model)):
            pass
    assert model.vector_steering is None
    with pytest.raises(CapabilityError, match="compiled with torch.compile"):
        collect_states(model, PROMPTS[:1], [LAYER])
    with pytest.raises(CapabilityError, match="Attention capture needs the model uncompiled"):
        promptscope.attention(PROMPTS[0], model, save=False)  # was an internal torch error
    assert pasta() == pytest.approx(want, abs=1e-5)


def test_compare_steering_steers_the_control_tasks_emphasis_too(tiny_llama, monkeypatch):
    """A control template with <<...>> is PASTA-steered there (its spans were never registered,
    so PASTA's control cost read 0 whatever it did)."""
    from promptscope.models.steering import attention_part

    template = "Context: <<{name} lives in {city}.>> Bob lives in Oslo. Where does {name} live?"
    rows = [{"name": "Ann", "city": "Rome", "answer": " Rome", "choices": [" Rome", " Oslo"]}]
    control = ("Note: <<{name} is tall.>> Where does {name} live?", rows)
    seen: dict[str, list] = {}
    plain_score = type(tiny_llama).score

    def spy(self, prompts, continuations, progress=None):
        attn = attention_part(self.steering) if self.steering is not None else None
        for p in prompts:
            if attn is not None:
                seen[p] = attn.spans_for(p)
        return plain_score(self, prompts, continuations, progress)

    monkeypatch.setattr(type(tiny_llama), "score", spy)
    promptscope.compare_steering(template, rows, tiny_llama, control=control, progress=False,
                                 save=False, tune_share=0,
                                 methods={"PASTA": {"heads": "all", "alpha": [0.1]}})
    ctrl_prompt = "Note: Ann is tall. Where does Ann live?"
    assert seen[ctrl_prompt] == [(6, 18)] and ctrl_prompt[6:18] == "Ann is tall."


def test_compare_steering_option_errors_and_autopasta_question(tiny_llama, monkeypatch):
    template = "Context: <<{name} lives in {city}.>> Bob lives in Oslo. Where does {name} live?"
    rows = [{"name": "Ann", "city": "Rome", "answer": " Rome", "choices": [" Rome", " Oslo"]}]
    v = _vector(tiny_llama)
    with pytest.raises(PromptscopeError, match="only strength is swept.*alpha one value"):
        promptscope.compare_steering(template, rows, tiny_llama, save=False, progress=False,
                                     tune_share=0,
                                     methods={"both": {"method": "pasta+vector", "vector": v,
                                                       "alpha": [0.1, 0.01]}})
    from promptscope.analyses import autopasta

    asked = []
    real = autopasta.key_sentences

    def spy(model, texts, regions, question=autopasta.DEFAULT_QUESTION, **kw):
        asked.append(question)
        return real(model, texts, regions, question, max_new_tokens=2)

    monkeypatch.setattr(autopasta, "key_sentences", spy)
    mine = "Which sentence matters? {prompt}"
    promptscope.compare_steering(template, rows, tiny_llama, save=False, progress=False,
                                 tune_share=0, methods={"Auto": {"heads": "all", "auto": True,
                                                   "question": mine, "alpha": [0.1]}})
    assert asked == [mine]
