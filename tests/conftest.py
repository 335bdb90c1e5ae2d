"""Shared fixtures: tiny local models (no hub) and an isolated session store per test."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Set (e.g. to "cuda") to run the tiny-model tests on an accelerator, in fp32 so the numerical
# equivalence checks keep their tolerances. Unset: the default device (the CPU in CI).
TEST_DEVICE = os.environ.get("PROMPTSCOPE_TEST_DEVICE")
_ON_DEVICE = {"device": TEST_DEVICE, "dtype": "fp32"} if TEST_DEVICE else {}


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path, monkeypatch):
    """Every test writes sessions into its own folder, never into the user's workspace."""
    home = tmp_path / "promptscope-home"
    monkeypatch.setenv("PROMPTSCOPE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    from promptscope.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "llama", arch="llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    from promptscope.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "gpt2", arch="gpt2")


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    from promptscope.models.hf import HFModel

    return HFModel.from_pretrained(tiny_llama_dir, name="tiny-llama", **_ON_DEVICE)


@pytest.fixture
def fresh_tiny_llama(tiny_llama_dir):
    """A tiny llama of its own (not the session's), for a test that changes the model."""
    from promptscope.models.hf import HFModel

    return HFModel.from_pretrained(tiny_llama_dir, name="tiny-llama-own", **_ON_DEVICE)


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir):
    from promptscope.models.hf import HFModel

    return HFModel.from_pretrained(tiny_gpt2_dir, name="tiny-gpt2", **_ON_DEVICE)


@pytest.fixture(params=["llama", "gpt2", "inkling"])
def tiny_model(request):
    """Each family in turn: llama (GQA), gpt2, and a model with a relative-position bias and a
    sliding window (fetched lazily: it is skipped where transformers lacks it)."""
    name = {"llama": "tiny_llama", "gpt2": "tiny_gpt2", "inkling": "tiny_relbias"}[request.param]
    return request.getfixturevalue(name)


@pytest.fixture(scope="session")
def ip():
    """The test IPython shell with promptscope's magics loaded (one per test session)."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.testing.globalipapp import start_ipython

    start_ipython()  # returns None when a test already started it; the singleton is the same
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "promptscope")
    return shell


@pytest.fixture(scope="session")
def tiny_relbias(tmp_path_factory):
    """A tiny model whose attention takes a relative-position bias per call (``position_bias``,
    transformers' Inkling), with a sliding window on layer 0: the path other families skip."""
    pytest.importorskip("transformers.models.inkling")
    from promptscope.models.hf import HFModel
    from promptscope.testing import make_tiny_model

    folder = make_tiny_model(tmp_path_factory.mktemp("models") / "inkling", arch="inkling")
    return HFModel.from_pretrained(folder, name="tiny-relbias", **_ON_DEVICE)


@pytest.fixture(scope="session", params=["mistral", "gemma3"])
def tiny_sliding(request, tmp_path_factory):
    """Sliding windows of 8 (shorter than the test prompts): a Mistral with the window on every
    layer, a Gemma 3 with sliding and full layers interleaved."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, MistralConfig

    from promptscope.models.hf import HFModel
    from promptscope.testing import train_tokenizer

    tok = train_tokenizer(512)
    shape = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                 max_position_embeddings=256, initializer_range=0.2,
                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                 pad_token_id=tok.pad_token_id)
    config = (MistralConfig(**shape) if request.param == "mistral" else Gemma3TextConfig(
        head_dim=16, layer_types=["sliding_attention", "full_attention"], **shape))
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / f"{request.param}-sliding"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return HFModel.from_pretrained(folder, name=f"tiny-{request.param}-sliding", **_ON_DEVICE)
