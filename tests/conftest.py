"""Shared fixtures: tiny local models (no hub) and an isolated session store per test."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Set (e.g. to "cuda") to run the tiny-model tests on an accelerator, in fp32 so the numerical
# equivalence checks keep their tolerances. Unset: the default device (the CPU in CI).
TEST_DEVICE = os.environ.get("PROMPTSCOPE_TEST_DEVICE")
_ON_DEVICE = {"device": TEST_DEVICE, "dtype": "fp32"} if TEST_DEVICE else {}


@pytest.fixture(scope="session")
def device_flags() -> str:
    """The same for a model loaded by ``%promptscope model`` (which picks bf16 on a GPU)."""
    return f" --device {TEST_DEVICE} --dtype fp32" if TEST_DEVICE else ""


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


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """``arch -> `` a loaded tiny model of that family (``promptscope.testing`` archs), each
    built once per session; a family this transformers lacks is skipped."""
    from promptscope.models.hf import HFModel
    from promptscope.testing import make_tiny_model

    made: dict = {}

    def load(arch: str):
        if arch not in made:
            try:
                folder = make_tiny_model(tmp_path_factory.mktemp("models") / arch, arch=arch)
            except ValueError as e:
                if "needs a transformers that has" not in str(e):
                    raise
                pytest.skip(str(e))
            made[arch] = HFModel.from_pretrained(folder, name=f"tiny-{arch}", **_ON_DEVICE)
        return made[arch]

    return load


FAMILIES = ["llama", "gpt2", "qwen3", "gpt_neox", "gemma3", "gemma3_vision", "gemma3n", "gemma4",
            "gemma4_vision", "inkling", "qwen3_5", "deepseek_v3", "mistral3"]


@pytest.fixture(params=FAMILIES)
def tiny_model(request, tiny_family):
    """Each family in turn. Attention differs in each way promptscope handles: grouped-query
    (llama), gpt2's own, normed queries and keys (qwen3), partial rotary (gpt_neox), sliding
    layers interleaved with full ones (gemma3), the same inside a multimodal checkpoint whose
    shape is in a text sub-config (gemma3_vision), AltUp streams and per-layer embeddings
    (gemma3n), head shapes varying by layer and shared keys and values (gemma4, and inside its
    multimodal checkpoint, gemma4_vision), a relative-position bias (inkling), linear-attention
    layers between the attention ones (qwen3_5, a hybrid), multi-head latent attention
    (deepseek_v3), an image-text checkpoint without a causal-LM class (mistral3)."""
    if request.param in ("llama", "gpt2"):  # the session's shared ones
        return request.getfixturevalue(f"tiny_{request.param}")
    return tiny_family(request.param)


@pytest.fixture(params=[*FAMILIES, "mamba"])
def any_tiny_model(request, tiny_family):
    """:func:`tiny_model`'s families and a state-space model (Mamba, no attention), for what
    every causal LM must do: score and generate."""
    if request.param in ("llama", "gpt2"):
        return request.getfixturevalue(f"tiny_{request.param}")
    return tiny_family(request.param)


@pytest.fixture(scope="session")
def ip():
    """The test IPython shell with promptscope's magics loaded (one per test session)."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.testing.globalipapp import start_ipython

    start_ipython()  # returns None when a test already started it; the singleton is the same
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "promptscope")
    return shell


@pytest.fixture(params=["mistral", "gemma3", "gemma4"])
def tiny_sliding(request, tiny_family):
    """Sliding windows of 8 (shorter than the test prompts): on every layer (mistral), or
    interleaved with full layers (gemma3; gemma4, whose later layers reuse earlier layers'
    keys and values)."""
    return tiny_family(request.param)
