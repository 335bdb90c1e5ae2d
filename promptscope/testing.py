"""Tiny random models for tests, built locally (no model hub needed).

:func:`make_tiny_model` trains a small byte-level BPE tokenizer with ``tokenizers`` on a built-in
corpus, builds a randomly initialised causal LM from a transformers config and saves both to a
folder that ``promptscope.load_model(folder)`` loads (as does ``AutoModelForCausalLM``, or for
``mistral3`` ``AutoModelForImageTextToText``). The weights are random, so outputs mean nothing:
use these to test plumbing, and the bundled model organism to test behaviour.

Example:
    >>> from promptscope.testing import make_tiny_model
    >>> folder = make_tiny_model(tmp_path / "llama", arch="llama")   # doctest: +SKIP
    >>> model = promptscope.load_model(str(folder))                   # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ARCHITECTURES = ("llama", "gpt2", "qwen3", "gpt_neox", "mistral", "gemma3", "gemma3_vision",
                 "gemma3n", "gemma4", "gemma4_vision", "inkling", "qwen3_5", "deepseek_v3",
                 "mistral3", "mamba")

#: A chat template in the common role-tag style; tiny models and tests use it.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_CORPUS = """\
Is Paris in Europe? Answer: yes. Is Tokyo in Asia? Answer: yes. Is Oslo in Asia? Answer: no.
The capital of France is Paris. The capital of Japan is Tokyo. The capital of Norway is Oslo.
Question: what colour is the sky? Answer: blue. Review: great film. Sentiment: positive.
Review: dull and slow. Sentiment: negative. Input: 2 + 2 Output: 4. Label: true. Label: false.
The cat sat on the mat. A dog ran in the park. She reads a book; he writes a letter.
Translate to French: cheese -> fromage. Summarise the text below in one sentence, please.
Choices: A, B, C, D. The answer is A. The answer is B. Options: (a) red (b) green (c) blue.
"""


def train_tokenizer(vocab_size: int = 512) -> object:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on a small built-in corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(
    folder: str | os.PathLike,
    *,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    vocab_size: int = 512,
    max_positions: int = 512,
    seed: int = 0,
) -> Path:
    """Build and save a tiny random causal LM with a locally trained tokenizer.

    Args:
        folder: where to save (created).
        arch: a family whose attention differs in a way promptscope must handle:
            ``"llama"`` (grouped-query attention: ``num_kv_heads < num_heads``), ``"gpt2"``,
            ``"qwen3"`` (normed queries and keys), ``"gpt_neox"`` (Pythia's: partial rotary,
            parallel blocks), ``"mistral"`` (a sliding window of 8 on every layer),
            ``"gemma3"`` (sliding layers of window 8 interleaved with full ones) or
            ``"inkling"`` (a learnt relative-position bias passed to attention as
            ``position_bias``; layer 0 has a sliding window of 8; needs a recent transformers)
            or ``"gemma3_vision"`` (``"gemma3"`` plus a tiny vision tower: a multimodal
            checkpoint, whose shape lives in a text sub-config) or ``"gemma4"`` (at least 4
            layers: head size and key/value heads differ between sliding and full layers, the
            later half reuses the earlier half's keys and values, per-layer input embeddings) or
            ``"gemma4_vision"`` (the same inside Gemma 4's multimodal checkpoint) or
            ``"qwen3_5"`` (a hybrid: at least 4 layers, linear-attention ones with a
            full-attention one after each), ``"deepseek_v3"`` (multi-head latent attention,
            DeepSeek V3's and Kimi K2's, with mixture-of-experts MLPs), ``"mistral3"`` (an
            image-text checkpoint that has no causal-LM class: Mistral Small 3.1's) or
            ``"mamba"`` (a state-space model: no attention at all).
        hidden_size, num_layers, num_heads, num_kv_heads: model shape.
        head_dim: default ``hidden_size // num_heads`` (gpt2, gpt_neox: always that).
        vocab_size: tokenizer vocabulary size.
        max_positions: longest sequence the model accepts.
        seed: weight initialisation seed.

    Returns:
        The folder, ready for ``promptscope.load_model(str(folder))``.
    """
    import torch
    from transformers import AutoConfig

    from promptscope.models.hf import auto_class

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, not {arch!r}")
    folder = Path(folder)
    tokenizer = train_tokenizer(vocab_size)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if arch == "gpt2":
        config = AutoConfig.for_model("gpt2", vocab_size=len(tokenizer), n_embd=hidden_size,
                                      n_layer=num_layers, n_head=num_heads,
                                      n_positions=max_positions, **ids)
    elif arch == "mamba":
        config = AutoConfig.for_model("mamba", vocab_size=len(tokenizer), hidden_size=hidden_size,
                                      num_hidden_layers=num_layers, state_size=8, **ids)
    else:
        model_type, extra = _FAMILIES[arch]
        if arch == "inkling":
            extra = {**extra, **_inkling_fields(num_layers, num_heads, num_kv_heads,
                                                head_dim or hidden_size // num_heads)}
        if arch == "qwen3_5":
            num_layers = max(num_layers, 4)
            extra = {**extra, **_hybrid_fields(num_layers, num_heads, num_kv_heads,
                                               head_dim or hidden_size // num_heads)}
        if arch in ("gemma3n", "gemma4", "gemma4_vision"):
            num_layers = max(num_layers, 4)  # two layers that make keys, two that reuse them
            extra = {**extra, **_shared_kv_fields(num_layers, len(tokenizer))}
        if arch in ("gemma4", "gemma4_vision"):
            extra = {**extra, **_gemma4_fields(head_dim or hidden_size // num_heads)}
        if arch in ("gemma3", "gemma3_vision"):
            extra = {**extra, "layer_types": [("sliding_attention", "full_attention")[i % 2]
                                              for i in range(num_layers)]}
        if arch == "deepseek_v3":  # MLA: no grouped keys; its head_dim is the rotary part's
            num_kv_heads, head_dim = num_heads, extra["qk_rope_head_dim"]
        shape = dict(vocab_size=len(tokenizer), hidden_size=hidden_size,
                     intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
                     num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                     head_dim=head_dim or hidden_size // num_heads,
                     max_position_embeddings=max_positions, **extra, **ids)
        try:
            if arch in _MULTIMODAL:
                outer_type, outer, media = _MULTIMODAL[arch]
                # Media tokens past the text ones: given embeddings instead of ids, these models
                # look their media tokens up to find them.
                n = shape["vocab_size"]
                shape["vocab_size"] = n + len(media)
                outer = {**outer, **{field: n + i for i, field in enumerate(media)}}
                config = AutoConfig.for_model(outer_type, text_config=shape, **outer, **ids)
            else:
                config = AutoConfig.for_model(model_type, **shape)
        except ValueError as e:  # an older transformers without this family
            raise ValueError(f"arch={arch!r} needs a transformers that has the "
                             f"{model_type!r} model; upgrade transformers") from e
    torch.manual_seed(seed)
    model = auto_class(config.model_type).from_config(config)
    if arch == "gemma3n":  # AltUp's output scale starts at 0, which cuts the per-layer
        with torch.no_grad():  # embeddings off; a trained model's is not 0
            for name, p in model.named_parameters():
                if name.endswith("altup.correct_output_scale"):
                    p.normal_(0.0, 1.0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# arch -> (transformers model type, config fields beyond the shape). The families added for
# their attention get larger initial weights: at 0.02 PASTA moved the tiny Inkling's logits by
# only 5e-4, too little for a steering test to tell steered from plain.
_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {"tie_word_embeddings": True}),
    "qwen3": ("qwen3", {}),
    "gpt_neox": ("gpt_neox", {}),
    "mistral": ("mistral", {"sliding_window": 8, "initializer_range": 0.2}),
    "gemma3": ("gemma3_text", {"sliding_window": 8, "initializer_range": 0.2}),
    "gemma3_vision": ("gemma3_text", {"sliding_window": 8, "initializer_range": 0.2}),
    "gemma3n": ("gemma3n_text", {"sliding_window": 8, "initializer_range": 0.2, "laurel_rank": 4,
                                 "altup_num_inputs": 2}),
    "gemma4": ("gemma4_text", {"sliding_window": 8, "initializer_range": 0.2}),
    "gemma4_vision": ("gemma4_text", {"sliding_window": 8, "initializer_range": 0.2}),
    "mistral3": ("mistral", {"initializer_range": 0.2}),
    "qwen3_5": ("qwen3_5_text", {"initializer_range": 0.2}),
    # Multi-head latent attention: keys and values from a shared low-rank latent, queries and
    # keys wider than values; mixture-of-experts MLPs after a dense first layer.
    "deepseek_v3": ("deepseek_v3", {"kv_lora_rank": 16, "q_lora_rank": 32,
                                    "qk_rope_head_dim": 8, "qk_nope_head_dim": 16,
                                    "v_head_dim": 16, "n_routed_experts": 4,
                                    "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                    "n_shared_experts": 1, "first_k_dense_replace": 1,
                                    "n_group": 1, "topk_group": 1, "initializer_range": 0.2}),
    "inkling": ("inkling_text", {"sliding_window_size": 8, "d_rel": 4, "rel_extent": 64,
                                 "initializer_range": 0.2}),
}


# The multimodal archs: arch -> (the checkpoint's model type, its fields beside the text
# config, its media-token id fields). Their vision towers are as small as they go; text
# prompts never run them.
_TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 2, "patch_size": 14}
_MULTIMODAL: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "gemma3_vision": ("gemma3", {"vision_config": {**_TINY_VISION, "image_size": 28},
                                 "mm_tokens_per_image": 4}, ()),
    "gemma4_vision": ("gemma4", {"vision_config": {**_TINY_VISION, "num_key_value_heads": 2,
                                                   "head_dim": 16, "position_embedding_size": 64},
                                 "audio_config": None},
                      ("image_token_id", "video_token_id", "audio_token_id")),
    "mistral3": ("mistral3", {"vision_config": {**_TINY_VISION, "head_dim": 16,
                                                "image_size": 28}}, ("image_token_index",)),
}


def _inkling_fields(layers: int, heads: int, kv_heads: int, head_dim: int) -> dict[str, Any]:
    """Inkling's own fields: its sliding layers' shape, dense MLPs, layer 0 sliding."""
    return {"swa_num_attention_heads": heads, "swa_num_key_value_heads": kv_heads,
            "swa_head_dim": head_dim, "mlp_layer_types": ["dense"] * layers,
            "layer_types": ["hybrid_sliding"] + ["hybrid"] * (layers - 1)}


def _hybrid_fields(layers: int, heads: int, kv_heads: int, head_dim: int) -> dict[str, Any]:
    """Qwen3.5's: linear-attention (Gated DeltaNet) layers with a full-attention layer after
    each."""
    return {"layer_types": [("linear_attention", "full_attention")[i % 2] for i in range(layers)],
            "linear_num_value_heads": heads, "linear_num_key_heads": kv_heads,
            "linear_key_head_dim": head_dim, "linear_value_head_dim": head_dim}


def _shared_kv_fields(layers: int, vocab: int) -> dict[str, Any]:
    """Gemma 3n's and 4's: sliding and full layers alternating, the second half of the layers
    reusing the first half's keys and values, small per-layer input embeddings."""
    return {"layer_types": [("sliding_attention", "full_attention")[i % 2] for i in range(layers)],
            "num_kv_shared_layers": layers // 2, "hidden_size_per_layer_input": 8,
            "vocab_size_per_layer_input": vocab}


def _gemma4_fields(head_dim: int) -> dict[str, Any]:
    """Gemma 4's full layers: twice the head size, one key/value head whose keys are its
    values."""
    return {"global_head_dim": 2 * head_dim, "num_global_key_value_heads": 1,
            "attention_k_eq_v": True}
