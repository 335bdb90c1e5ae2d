"""Measurement utility: PASTA-style attention steering by a per-head additive attention bias.

This is a private helper used to *measure* the organism's steerability (``docs/organism.md``,
``scripts/measure_organism.py``, ``tests/test_organism.py``) until promptscope's own PASTA feature
lands; it is not a public API.

PASTA (Zhang et al., 2023) emphasises a span of the prompt by scaling, on selected (layer, head)s,
the post-softmax attention to every prompt key *outside* the span by ``alpha`` and renormalising.
That equals adding ``log(alpha)`` to the pre-softmax scores of those keys, which is what the
attention function registered here does before calling transformers' SDPA attention.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

ATTN_NAME = "organism_head_bias"
"""Name under which the steering attention function is registered with transformers."""

_state: dict[str, Any] = {"heads": None, "keep": None, "alpha": 1.0}


def _float_mask(attention_mask: torch.Tensor | None, query: torch.Tensor,
                key: torch.Tensor) -> torch.Tensor:
    """An additive float mask [B|1, 1|H, q, k] from whatever transformers handed over."""
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        return attention_mask.to(query.dtype)
    if attention_mask is not None:
        zero = torch.zeros((), dtype=query.dtype, device=query.device)
        return torch.where(attention_mask, zero, torch.finfo(query.dtype).min)
    q_len, k_len = query.shape[2], key.shape[2]
    q_pos = torch.arange(k_len - q_len, k_len, device=query.device)[:, None]
    k_pos = torch.arange(k_len, device=query.device)[None, :]
    mask = torch.zeros(q_len, k_len, dtype=query.dtype, device=query.device)
    return mask.masked_fill(k_pos > q_pos, torch.finfo(query.dtype).min)[None, None]


def head_bias_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, attention_mask: torch.Tensor | None,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """SDPA attention plus ``log(alpha)`` on non-emphasised prompt keys of the steered heads."""
    heads = _state["heads"]
    layer = getattr(module, "layer_idx", None)
    if not heads or layer not in heads:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    mask = _float_mask(attention_mask, query, key)
    keep: torch.Tensor = _state["keep"].to(query.device)  # [B, prompt_len], True = emphasised
    batch, n_heads, _, k_len = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
    outside = torch.zeros(batch, k_len, dtype=torch.bool, device=query.device)
    n = min(k_len, keep.shape[1])
    outside[:, :n] = ~keep[:, :n]  # keys after the prompt (generated tokens) are left alone
    head_on = torch.zeros(n_heads, dtype=torch.bool, device=query.device)
    head_on[list(heads[layer])] = True
    bias = (outside[:, None, None, :] & head_on[None, :, None, None]).to(query.dtype)
    mask = mask + bias * math.log(_state["alpha"])
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


AttentionInterface.register(ATTN_NAME, head_bias_attention)


@contextmanager
def emphasize(model: Any, heads: Iterable[tuple[int, int]], keep: torch.Tensor,
              alpha: float = 0.01) -> Iterator[None]:
    """Within the block, steer ``heads`` of ``model`` toward the ``keep`` tokens.

    Args:
        model: a transformers Llama model (its attention implementation is swapped for the
            block and restored afterwards).
        heads: (layer, head) pairs to steer; an empty iterable steers nothing.
        keep: bool tensor [batch, prompt_len], True on the emphasised span's tokens.
        alpha: the PASTA scaling coefficient for attention outside the span.
    """
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    previous = model.config._attn_implementation
    _state.update(heads=by_layer, keep=keep, alpha=alpha)
    model.set_attn_implementation(ATTN_NAME)
    try:
        yield
    finally:
        _state.update(heads=None, keep=None, alpha=1.0)
        model.set_attn_implementation(previous)
