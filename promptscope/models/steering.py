"""Attention steering (PASTA) and attention capture inside transformers' attention interface.

PASTA scales the post-softmax attention that selected heads pay to the prompt tokens outside the
emphasised spans by ``alpha`` and renormalises. Since
``softmax(s + log(alpha) * 1[k outside]) == renormalise(alpha^1[k outside] * softmax(s))``, that
is the same as adding ``log(alpha)`` to those keys' pre-softmax scores. So steering is an additive
per-head key bias, applied by one attention function registered with transformers'
``AttentionInterface`` (name :data:`ATTENTION_NAME`) that adds the bias to the mask and calls
transformers' own SDPA attention: no eager attention, grouped-query attention and KV-cached
generation work unchanged, and generated keys (beyond the prompt) get no bias.

The same function captures attention weights of the layers asked for (computing them explicitly
only there), so capture needs no global switch to eager attention either.

The backend (:class:`~promptscope.models.hf.HFModel`) computes the per-batch key bias from token
offsets and publishes it with :func:`forward_context` around each forward / generate call.

:func:`steer` is the one entry point for all steering: ``method="pasta"`` (here),
``"vector"`` (activation steering with forward hooks, :mod:`promptscope.models.vectors`) or
``"pasta+vector"`` (both at once).
"""

from __future__ import annotations

import contextlib
import math
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

try:
    from torch.nn.attention.flex_attention import flex_attention
except ImportError:  # torch < 2.5: kernel="flex" is refused (see steer); sdpa still works
    flex_attention = None

from promptscope.errors import CapabilityError, PromptscopeError
from promptscope.interrupts import running_frames, with_frame
from promptscope.models.fused import fused_on_cuda
from promptscope.models.hf import forward_inputs

ATTENTION_NAME = "promptscope_sdpa"
MODES = ("exclude", "include")
#: How the steered layers compute attention: SDPA with the bias in a dense ``[B, H, Lq, Lk]``
#: float mask, or ``flex_attention`` with the bias as a score modifier (no dense mask; fused and
#: compiled on CUDA).
KERNELS = ("sdpa", "flex")


@dataclass
class AttentionSteering:
    """A PASTA steering: which heads, how strongly, and what is emphasised.

    Attributes:
        heads: layer -> head indices to steer.
        alpha: ``exclude`` mode: 0 < alpha <= 1 scales attention to the non-emphasised prompt
            tokens (default 0.01, PASTA's). ``include`` mode: alpha > 0 scales attention to the
            emphasised tokens (alpha > 1 up-weights them).
        mode: ``"exclude"`` (PASTA's default) or ``"include"``.
        emphasis: substrings to emphasise wherever they occur in a prompt.
        spans: exact prompt text -> emphasised character spans (``%%prompt``'s ``<<...>>``).
        kernel: ``"sdpa"`` or ``"flex"`` (see :data:`KERNELS`); the same numbers either way.
    """

    heads: dict[int, list[int]]
    alpha: float = 0.01
    mode: str = "exclude"
    emphasis: tuple[str, ...] = ()
    spans: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    kernel: str = "sdpa"
    #: Whether this block has said it has nothing to emphasise (said once per block).
    warned_empty: bool = field(default=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise PromptscopeError(f"kernel must be one of {', '.join(KERNELS)}, not "
                                   f"{self.kernel!r}.")
        if self.mode not in MODES:
            raise PromptscopeError(f"Steering mode must be 'exclude' or 'include', not "
                                   f"{self.mode!r}.")
        if self.mode == "exclude" and not 0 < self.alpha <= 1:
            raise PromptscopeError(
                f"alpha={self.alpha} is outside (0, 1]: PASTA's exclude mode multiplies the "
                "attention to non-emphasised tokens by alpha (0.01 is the usual value). Use "
                "mode='include' (--steer-mode include) with alpha > 1 to up-weight the "
                "emphasised tokens instead."
            )
        if self.mode == "include" and not self.alpha > 0:
            raise PromptscopeError(f"alpha={self.alpha} must be > 0 in include mode.")
        if not any(self.heads.values()):
            raise PromptscopeError("No heads to steer; pick at least one (e.g. heads='all').")

    def spans_for(self, text: str) -> list[tuple[int, int]]:
        """Emphasised character spans of ``text``: registered spans (an empty list: none),
        else substring matches of the ``emphasis=`` strings."""
        if text in self.spans:
            return self.spans[text]
        found = []
        for sub in self.emphasis:
            start = text.find(sub)
            while sub and start != -1:
                found.append((start, start + len(sub)))
                start = text.find(sub, start + len(sub))
        return found

    def to_json(self) -> dict[str, Any]:
        """PASTA's head config (``{"layer": [heads]}``) plus alpha, mode and the
        ``emphasis=`` strings (when given)."""
        out = {"heads": {str(k): v for k, v in sorted(self.heads.items())},
               "alpha": self.alpha, "mode": self.mode}
        if self.emphasis:
            out["emphasis"] = list(self.emphasis)
        if self.kernel != "sdpa":
            out["kernel"] = self.kernel
        return out

    def n_heads(self) -> int:
        return sum(len(v) for v in self.heads.values())


def parse_heads(spec: Any, n_layers: int, n_heads: int,
                attention_layers: Sequence[int] | None = None) -> dict[int, list[int]]:
    """Turn a head selection into ``{layer: [heads]}``, checked against the model's shape.

    Accepts ``"all"``, ``"3.1,4.0"`` (layer.head), ``"L3"`` (every head of layer 3), PASTA's
    head-config dict ``{"3": [1, 2]}``, or pairs ``[(3, 1), (4, 0)]``. ``attention_layers``:
    the layers that have attention (``HFModel.attention_layers``; default all): ``"all"`` means
    those, and naming another is an error.
    """
    attended = range(n_layers) if attention_layers is None else attention_layers
    out: dict[int, set[int]] = {}
    if isinstance(spec, str):
        spec = spec.strip()
        if spec == "all":
            return {layer: list(range(n_heads)) for layer in attended}
        pairs: list[tuple[int, int | None]] = []
        for item in filter(None, (s.strip() for s in spec.split(","))):
            try:
                if item.upper().startswith("L"):
                    pairs.append((int(item[1:]), None))
                else:
                    layer_s, head_s = item.split(".")
                    pairs.append((int(layer_s), int(head_s)))
            except ValueError:
                raise PromptscopeError(
                    f"Cannot read head '{item}'. Write heads as layer.head (e.g. '3.1,4.0'), "
                    "'L3' for every head of layer 3, or 'all'."
                ) from None
    elif isinstance(spec, dict):
        pairs = [(int(k), int(h)) for k, hs in spec.items() for h in hs]
    elif isinstance(spec, Iterable):
        pairs = [(int(p[0]), int(p[1])) for p in spec]
    else:
        raise PromptscopeError(f"Unknown head selection {spec!r}.")
    for layer, head in pairs:
        if not 0 <= layer < n_layers:
            raise PromptscopeError(f"Layer {layer} is out of range: the model has layers "
                                   f"0..{n_layers - 1}.")
        if head is not None and not 0 <= head < n_heads:
            raise PromptscopeError(f"Head {layer}.{head} is out of range: each layer has heads "
                                   f"0..{n_heads - 1}.")
        out.setdefault(layer, set()).update(range(n_heads) if head is None else [head])
    check_attention_layers(list(out), attended)
    return {layer: sorted(hs) for layer, hs in sorted(out.items())}


def check_attention_layers(layers: Sequence[int], attention_layers: Sequence[int]) -> None:
    """Refuse layers without attention weights (a hybrid model's linear-attention, convolution
    or state-space layers): steering or capturing them would silently do nothing."""
    missing = sorted(set(layers) - set(attention_layers))
    if missing:
        many = len(missing) > 1
        raise PromptscopeError(
            f"{'Layers' if many else 'Layer'} {', '.join(map(str, missing))} of this model "
            f"{'have' if many else 'has'} no attention weights to steer or capture (a linear "
            "attention, convolution or state-space layer). Its attention "
            f"layers are {', '.join(map(str, attention_layers))}.")


# ---------------------------------------------------------------------- forward-time state
@dataclass
class _Forward:
    """What the attention function needs during one forward / generate call."""

    key_bias: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, H, 1, L]
    capture: Callable[[int, torch.Tensor], None] | None = None  # (layer, weights [B,H,Lq,Lk])
    capture_layers: frozenset[int] = frozenset()
    kernel: str = "sdpa"  # how steered layers attend (KERNELS)
    # layer -> the steered heads (a long tensor on the model's device). When given and they are
    # at most half the layer's heads, "sdpa" recomputes only those (see _steered_sdpa).
    heads: dict[int, torch.Tensor] = field(default_factory=dict)
    block_masks: dict[Any, Any] = field(default_factory=dict)  # flex: (mask, block) per shape
    # How many key positions (cached + this call's) the current forward call ends with, kept by
    # track(): a sliding-window layer's cache hands attention only its last keys, so its bias
    # columns are the last ones too. None: not tracked (keys then start at position 0).
    end: int | None = None

    def track(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the model: set :attr:`end` for this call."""
        ids, mask, cache = forward_inputs(args, kwargs)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:  # covers cache + this call
            self.end = mask.shape[1]
            return
        cached = cache.get_seq_length() if cache is not None else 0
        self.end = None if ids is None else cached + ids.shape[1]


_local = threading.local()


def _current() -> _Forward | None:
    return getattr(_local, "forward", None)


@contextlib.contextmanager
def forward_context(state: _Forward, model: Any = None) -> Iterator[None]:
    """Make ``state`` visible to the attention function while the block runs; with ``model``
    (a transformers model), keep ``state.end`` up to date on each of its forward calls."""
    previous, handle = _current(), None
    try:  # (set inside the try: a Ctrl-C between two steps still undoes the first)
        _local.forward = state
        if model is not None:
            handle = model.register_forward_pre_hook(state.track, with_kwargs=True)
        yield
    finally:
        _local.forward = previous
        if handle is not None:
            try:
                handle.remove()
            except KeyboardInterrupt:  # landed as remove() began: remove, then stop
                handle.remove()
                raise


def token_emphasis(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]],
                   text: str = "") -> list[bool]:
    """Which tokens overlap an emphasised character span.

    A token that straddles a span edge (a BPE merge across it) counts as emphasised. Special
    tokens (offset ``(0, 0)``) never are. A span that covers no token is an error.
    """
    flags = [False] * len(offsets)
    for start, end in spans:
        hit = False
        for i, (a, b) in enumerate(offsets):
            if b > a and a < end and b > start:
                flags[i] = hit = True
        if not hit:
            shown = repr(text[start:end]) if text else f"{start}:{end}"
            raise PromptscopeError(f"The emphasised span {shown} covers no token; emphasise "
                                   "some text (e.g. <<the key sentence>>).")
    return flags


def key_bias(steering: AttentionSteering, emphasised: torch.Tensor, real: torch.Tensor,
             n_heads: int, extra: int = 0, dtype: torch.dtype = torch.float32,
             device: Any = None) -> dict[int, torch.Tensor]:
    """Per-layer additive key bias ``[B, H, 1, L + extra]`` for a left-padded batch of prompts.

    Args:
        emphasised: bool ``[B, L]``, token is inside an emphasised span.
        real: bool ``[B, L]``, token is a real prompt token (not padding).
        extra: zero columns for the keys that follow the prompt (generated or scored tokens),
            so each decoding step only slices the bias.
    """
    log_alpha = math.log(steering.alpha)
    if steering.mode == "exclude":
        target = real & ~emphasised & emphasised.any(dim=1, keepdim=True)  # rows w/o spans: none
    else:
        target = real & emphasised
    per_key = torch.nn.functional.pad(target.float() * log_alpha, (0, extra))  # [B, L + extra]
    out = {}
    for layer, heads in steering.heads.items():
        bias = torch.zeros(per_key.shape[0], n_heads, 1, per_key.shape[1], device=per_key.device)
        bias[:, heads, 0, :] = per_key[:, None, :]
        out[layer] = bias.to(device=device, dtype=dtype)
    return out


# ---------------------------------------------------------------------- the attention function
def _float_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor,
                causal: bool) -> torch.Tensor:
    """An additive float mask ``[B|1, 1, Lq, Lk]``, with causality when transformers passed none.

    transformers hands ``None`` for unpadded input and expects the attention function to be
    causal itself (as SDPA's ``is_causal``); a bias-only mask would silently drop causality.
    Its alignment is SDPA's, upper-left: with more keys than queries and no mask (only the
    prefill of an empty static cache) the extra keys are empty cache slots, never attended.
    """
    lq, lk = query.shape[2], key.shape[2]
    neg = torch.finfo(query.dtype).min
    if mask is None:
        if not causal or lq == 1:
            return torch.zeros(1, 1, lq, lk, dtype=query.dtype, device=query.device)
        q_pos = torch.arange(lq, device=query.device)[:, None]
        allowed = q_pos >= torch.arange(lk, device=query.device)[None, :]
        return torch.where(allowed, 0.0, neg).to(query.dtype)[None, None]
    if mask.dtype == torch.bool:
        return torch.where(mask, 0.0, neg).to(query.dtype)
    return mask.to(query.dtype)


def promptscope_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: torch.Tensor | None,
                          **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """SDPA attention plus the active key bias / capture for this layer (else plain SDPA)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    state = _current()
    layer = getattr(module, "layer_idx", None)
    bias = state.key_bias.get(layer) if state is not None else None
    capture = state is not None and state.capture is not None and layer in state.capture_layers
    if bias is None and not capture:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    # transformers 5 may pass causality and a relative-position bias per call (as SDPA takes
    # them). flex adds the bias in its score modifier; otherwise it goes into the float mask
    # (then per head: [B, H, Lq, Lk]) with transformers' own helper.
    causal = kwargs.pop("is_causal", None)
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    position_bias = kwargs.pop("position_bias", None)
    lk = key.shape[2]
    # The keys are positions [end - lk, end): all of them from 0 on a full (or static) cache,
    # the last ones on a sliding-window layer's cache.
    end = max(lk, state.end or 0) if bias is not None else lk
    if bias is not None and bias.shape[-1] < end:  # more keys than the bias was padded for
        bias = torch.nn.functional.pad(bias, (0, end - bias.shape[-1]))
    b = bias[..., end - lk:end] if bias is not None else None  # a view: [B, H, 1, Lk]
    if b is not None and b.device != query.device:  # a model spread over devices (device_map)
        b = b.to(query.device)
    if b is not None and not capture and state.kernel == "flex":
        return _flex_attention(state, query, key, value, attention_mask, b, causal,
                               kwargs.get("scaling"), position_bias)
    if position_bias is not None:
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        attention_mask = create_position_bias_mask(position_bias, attention_mask,
                                                   causal and query.shape[2] > 1, query, key)
    if not capture:  # steering
        return _steered_sdpa(module, query, key, value, attention_mask, b,
                             state.heads.get(layer), causal, **kwargs)

    mask = _float_mask(attention_mask, query, key, causal)
    if b is not None:
        mask = mask + b
    # Capture: this layer's weights computed explicitly (the other layers stay on SDPA).
    groups = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling + mask
    weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    state.capture(layer, weights.detach())
    out = torch.matmul(weights, v).transpose(1, 2).contiguous()
    return out, None


def _steered_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, attention_mask: torch.Tensor | None, bias: torch.Tensor,
                  heads: torch.Tensor | None, causal: bool, **kwargs: Any
                  ) -> tuple[torch.Tensor, None]:
    """SDPA with the key bias ``[B, H, 1, Lk]`` on a steered layer.

    A decoding step (one query) is one SDPA call over all heads with the bias as its mask (at
    one query the mask is no bigger than the bias). In a prompt pass, where attention is the
    cost, when ``heads`` (the steered ones) are at most half the layer's, the other heads run
    alone through plain SDPA and only the steered ones get the bias, so no head is computed
    twice; otherwise all heads are computed once with it. A prompt pass without padding
    (transformers passes no mask) folds the bias into the dot product, so SDPA keeps its causal
    fast path and no mask is built: an extra query component ``1 / scale`` meets a key
    component equal to that key's bias, adding exactly the bias to the scaled scores. With
    padding the computed heads get an explicit ``[B, h, Lq, Lk]`` mask.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] == 1:  # a decoding step: the bias [B, H, 1, Lk] is the whole mask
        mask = bias.to(query.dtype) if attention_mask is None else (
            _float_mask(attention_mask, query, key, causal) + bias)
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    n_heads, lq, lk = query.shape[1], query.shape[2], key.shape[2]
    group = n_heads // key.shape[1]  # query heads per KV head
    scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
    unmasked = attention_mask is None and lq == lk  # causal alone: SDPA's is_causal fast path
    split = heads is not None and 2 * len(heads) <= n_heads
    out = None
    if split:
        rest = torch.ones(n_heads, dtype=torch.bool, device=query.device)
        rest[heads] = False
        rest = rest.nonzero()[:, 0]
        others = sdpa(query[:, rest], key[:, rest // group], value[:, rest // group],
                      attn_mask=None if unmasked else _heads_of(
                          _float_mask(attention_mask, query, key, causal), rest),
                      is_causal=causal and unmasked, scale=scale)
        out = query.new_empty(query.shape[0], lq, n_heads, value.shape[-1])
        out[:, :, rest] = others.transpose(1, 2)
    else:
        heads = torch.arange(n_heads, device=query.device)
    q, b = query[:, heads], bias[:, heads]
    k, v = key[:, heads // group], value[:, heads // group]
    if unmasked:
        # Kernels like head sizes in multiples of 8; the other 7 components are zero. In bf16
        # the folded bias is rounded like the scores are (to about 0.4 % of its value).
        extra = 8
        q_extra = q.new_zeros(*q.shape[:-1], extra)
        q_extra[..., 0] = 1 / scale
        k_extra = k.new_zeros(*k.shape[:-1], extra)
        k_extra[..., 0] = b[:, :, 0, :]
        steered = sdpa(torch.cat([q, q_extra], -1), torch.cat([k, k_extra], -1),
                       torch.nn.functional.pad(v, (0, extra)), is_causal=causal,
                       scale=scale)[..., : v.shape[-1]]
    else:
        mask = _heads_of(_float_mask(attention_mask, query, key, causal), heads)
        steered = sdpa(q, k, v, attn_mask=mask + b, scale=scale)
    steered = steered.transpose(1, 2)  # [B, Lq, h, D], transformers' layout
    if out is None:
        return steered.contiguous(), None
    out[:, :, heads] = steered.to(out.dtype)
    return out, None


def _heads_of(mask: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """The rows of a float mask for these heads: a mask with a relative-position bias is per
    head ``[B, H, Lq, Lk]``; one without, ``[B|1, 1, Lq, Lk]``, serves every head."""
    return mask[:, heads] if mask.shape[1] > 1 else mask


def _flex_attention(state: _Forward, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None, bias: torch.Tensor,
                    causal: bool, scaling: float | None,
                    position_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
    """Steered attention through ``flex_attention``: the key bias (and a model's
    relative-position bias, when it passes one) is a score modifier and the causal/padding mask
    a block mask, so no dense ``[B, H, Lq, Lk]`` mask is built for them."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, n_heads, lq, _ = query.shape
    lk = key.shape[2]
    per_key = bias[:, :, 0, :]  # [B, H, Lk]
    if position_bias is None:
        def score_mod(score: Any, b: Any, h: Any, q: Any, kv: Any) -> Any:
            return score + per_key[b, h, kv].to(score.dtype)
    else:
        pos = position_bias.expand(batch, n_heads, lq, lk)  # a view

        def score_mod(score: Any, b: Any, h: Any, q: Any, kv: Any) -> Any:
            return score + (per_key[b, h, kv] + pos[b, h, q, kv]).to(score.dtype)

    # One block mask per forward pass and shape: every layer gets the same attention_mask
    # object (kept in the cache, so its identity cannot be reused by another tensor).
    cache_key = (None if attention_mask is None else id(attention_mask), batch, lq, lk)
    mask_and_block = state.block_masks.get(cache_key)
    block = mask_and_block[1] if mask_and_block is not None else None
    if block is None:
        if attention_mask is None:  # as _float_mask: one query sees all, else upper-left
            causal_here = causal and lq > 1

            def mask_mod(b: Any, h: Any, q: Any, kv: Any) -> Any:
                return q >= kv if causal_here else kv >= 0
        else:
            allowed = (attention_mask if attention_mask.dtype == torch.bool
                       else attention_mask > torch.finfo(attention_mask.dtype).min / 2)

            def mask_mod(b: Any, h: Any, q: Any, kv: Any) -> Any:
                return allowed[b if allowed.shape[0] > 1 else 0, 0, q, kv]
        block = create_block_mask(mask_mod, batch, None, lq, lk, device=query.device)
        state.block_masks[cache_key] = (attention_mask, block)
    out = _flex_function(
        query, key, value, score_mod=score_mod, block_mask=block, scale=scaling,
        enable_gqa=key.shape[1] != n_heads)
    return out.transpose(1, 2).contiguous(), None


def _flex_eager(*args: Any, **kwargs: Any) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without")
        return flex_attention(*args, **kwargs)


# flex_attention compiled into a fused kernel on CUDA; elsewhere its unfused eager form (the
# same numbers; inductor's CPU template failed on dynamic shapes in torch 2.13).
_flex_function = (fused_on_cuda(flex_attention, "flex_attention", eager=_flex_eager)
                  if flex_attention is not None else None)


def register() -> None:
    """Register :data:`ATTENTION_NAME` with transformers (attention and its mask; idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, promptscope_attention)
    # Without a registered mask function transformers builds no mask at all for a custom
    # attention name, and padding would be attended to.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


NO_ATTENTION = ("{} has no attention layers (e.g. a state-space model), so there is no "
                "attention to steer or capture. Vector steering (method='vector') and the "
                "black-box analyses work on it.")


def use_promptscope_attention(model: Any) -> None:
    """Switch a transformers model to :data:`ATTENTION_NAME` (same numbers as SDPA)."""
    register()
    current = getattr(model.config, "_attn_implementation", None)
    if current == ATTENTION_NAME:
        return
    can_set = getattr(model, "_can_set_attn_implementation", lambda: False)()
    if not can_set:
        raise CapabilityError(
            f"{type(model).__name__} does not route attention through transformers' "
            "AttentionInterface, so promptscope cannot steer or capture its attention. Use a "
            "model whose attention calls ALL_ATTENTION_FUNCTIONS (llama, mistral, qwen, gpt2...)."
        )
    from promptscope.models.hf import attention_free

    if attention_free(model):
        raise CapabilityError(NO_ATTENTION.format(type(model).__name__))
    if not getattr(model, "_supports_sdpa", True):
        # e.g. attention sinks (gpt-oss): SDPA, which promptscope's attention builds on, would
        # drop them; transformers refuses too, with advice that does not apply here.
        raise CapabilityError(
            f"{type(model).__name__}'s attention does what SDPA cannot (transformers runs it "
            "eager only, e.g. for attention sinks), so promptscope cannot steer or capture its "
            "attention without changing its numbers. Vector steering (method='vector') and the "
            "black-box analyses work on it.")
    model.set_attn_implementation(ATTENTION_NAME)


#: ``steer(method=...)`` values; ``"caa"`` and ``"icv"`` are names for ``"vector"``.
METHODS = ("pasta", "vector", "pasta+vector")


@dataclass
class CombinedSteering:
    """PASTA and a steering vector at once (``steer(method="pasta+vector")``)."""

    attention: AttentionSteering
    vector: Any  # a promptscope.models.vectors.VectorSteering

    @property
    def spans(self) -> dict[str, list[tuple[int, int]]]:
        return self.attention.spans

    def to_json(self) -> dict[str, Any]:
        return {"method": "pasta+vector", **self.attention.to_json(),
                **{k: v for k, v in self.vector.to_json().items() if k not in ("method", "mode")},
                "vector_mode": self.vector.vector.mode}


def parse_method(method: str | Sequence[str] | None, vector: Any = None) -> str:
    """``"pasta"`` / ``"vector"`` / ``"pasta+vector"`` (also ``["pasta", "vector"]``, ``"caa"``,
    ``"icv"``); ``None`` means ``"vector"`` when a vector is given, else ``"pasta"``."""
    if method is None:
        return "pasta" if vector is None else "vector"
    parts = [method] if isinstance(method, str) else list(method)
    names = set()
    for part in parts:
        for item in str(part).replace(",", "+").split("+"):
            item = item.strip().lower()
            names.add("vector" if item in ("caa", "icv", "vectors") else item)
    unknown = names - {"pasta", "vector"}
    if unknown or not names:
        raise PromptscopeError(f"Unknown steering method {method!r}; use 'pasta', 'vector' or "
                               "'pasta+vector'.")
    return "+".join(m for m in ("pasta", "vector") if m in names)


def attention_part(steering: Any) -> AttentionSteering | None:
    """The PASTA part of what ``steer`` yields (``None`` for vector-only steering)."""
    if isinstance(steering, AttentionSteering):
        return steering
    return getattr(steering, "attention", None)


def set_steered(model: Any, steering: Any, on: bool) -> None:
    """Switch a steering on or off without leaving its block (``run_prompt(compare=True)``)."""
    attn = attention_part(steering)
    if attn is not None:
        model.steering = attn if on else None
    vec = steering.vector if isinstance(steering, CombinedSteering) else (
        None if attn is steering else steering)
    if vec is not None:
        vec.enabled = on


def require_steerable(model: Any, which: str) -> None:
    """Fail clearly when ``model`` cannot be steered by ``which`` (from :func:`parse_method`),
    e.g. an API model (checked before any request is sent)."""
    if "pasta" in which:
        model.require("attention", "Attention steering")
    if "vector" in which:
        model.require("hidden_states", "Vector steering")


@contextlib.contextmanager
def steer(model: Any, *, method: str | Sequence[str] | None = None, heads: Any = "all",
          alpha: float = 0.01, mode: str = "exclude",
          emphasis: str | Sequence[str] | None = None, vector: Any = None,
          strength: float = 1.0, layers: Any = None, start: int | str = 0,
          kernel: str = "sdpa") -> Iterator[Any]:
    """Steer ``model`` for everything run inside the block: PASTA, a vector, or both.

    Args:
        model: a local transformers model (``HFModel``).
        method: ``"pasta"`` (attention steering, the default without ``vector``), ``"vector"``
            (activation steering with a :class:`~promptscope.models.vectors.SteeringVector`:
            contrastive or in-context; the default with ``vector``) or ``"pasta+vector"``.
        heads: PASTA: ``"all"``, ``"3.1,4.0"`` (layer.head), ``"L3"``, PASTA's head config
            ``{"3": [1, 2]}``, ``[(layer, head), ...]``, or from a saved head profile:
            ``"top:8"`` (this model's newest profile) or ``"profile:NAME"`` / ``"profile:NAME:8"``.
        alpha: PASTA's scaling of the non-emphasised tokens (exclude mode, 0 < alpha <= 1), or of
            the emphasised tokens (include mode).
        mode: PASTA's ``"exclude"`` (default) or ``"include"``.
        emphasis: PASTA: substring(s) to emphasise wherever they occur. ``run_prompt`` (with
            ``steer=``, or inside this block) also emphasises its template's ``<<...>>``
            marks; a block with neither steers nothing, and its first call warns so.
        vector: a SteeringVector or the name of a saved one.
        strength: the vector's multiplier (``h + strength * v``; ICV's lambda; a knob's value).
        layers: the vector's layers to steer (default: all the vector has).
        start: steer tokens from this position of each prompt on (default 0: all tokens), or
            ``"last"``: the last prompt token and what is generated after it.
        kernel: PASTA's attention kernel on the steered layers: ``"sdpa"`` (default; the bias
            in a dense float mask) or ``"flex"`` (``flex_attention`` with the bias as a score
            modifier: no ``[B, H, L, L]`` mask, a fused compiled kernel on CUDA).

    Yields:
        The :class:`AttentionSteering` (PASTA), a ``VectorSteering``, or a
        :class:`CombinedSteering`.

    Example:
        >>> with promptscope.steer(model, heads="1.0,2.3", emphasis="Ann lives in Rome."):
        ...     model.score([prompt], [" Rome"])                     # doctest: +SKIP
        >>> with promptscope.steer(model, method="vector", vector=v, strength=4, layers=[2]):
        ...     model.generate([prompt])                                # doctest: +SKIP
    """
    which = parse_method(method, vector)
    require_steerable(model, which)
    owner = with_frame() or _UNTRACKED  # whose block this is
    release_stale_steering(model)
    if (getattr(model, "steering", None) is not None
            or getattr(model, "vector_steering", None) is not None):
        raise PromptscopeError("This model is already being steered; leave the other "
                               "`steer(...)` block first.")
    vec_steering = None
    if "vector" in which:
        from promptscope.models.vectors import make_vector_steering

        vec_steering = make_vector_steering(model, vector, strength, layers, start)
    elif vector is not None:
        raise PromptscopeError("vector= is given but method='pasta'; use method='vector' or "
                               "'pasta+vector'.")
    try:
        with contextlib.ExitStack() as stack:
            # Each undo is registered before what it undoes, so a Ctrl-C anywhere in the set-up
            # leaves nothing behind; the owner's frame is noted so that a block whose clean-up
            # a Ctrl-C cut off entirely is undone later (release_stale_steering).
            stack.callback(_clear, model, "steered_by", owner)
            model.steered_by = owner
            attn = None
            if "pasta" in which:
                attn = stack.enter_context(_pasta(model, heads, alpha, mode, emphasis, kernel))
            if vec_steering is not None:
                from promptscope.models.vectors import vector_hooks

                stack.callback(_clear, model, "vector_steering", vec_steering)
                model.vector_steering = vec_steering
                stack.enter_context(vector_hooks(model.model, vec_steering))
            if attn is not None and vec_steering is not None:
                yield CombinedSteering(attn, vec_steering)
            else:
                yield attn if attn is not None else vec_steering
    except KeyboardInterrupt:  # it may have cut a step of the clean-up short: redo them all
        unsteer(model)
        raise


#: The owner of a block entered other than by a ``with`` statement (see ``with_frame``): it is
#: never taken for one a Ctrl-C cut off.
_UNTRACKED = object()


def release_stale_steering(model: Any) -> None:
    """Undo a ``steer`` block whose code is no longer running but whose clean-up never ran (a
    Ctrl-C that landed as the block was left, at the entry of an ``__exit__``; see
    :mod:`promptscope.interrupts`), with a warning. The model would stay steered otherwise."""
    owner = getattr(model, "steered_by", None)
    if owner is None or owner is _UNTRACKED or id(owner) in running_frames():
        return
    unsteer(model)
    warnings.warn("A steer() block left by a Ctrl-C was still steering the model; it is undone "
                  "now. (steer() steers only inside its `with` block.)", stacklevel=3)


def _clear(model: Any, name: str, value: Any) -> None:
    """Set ``model.<name>`` back to None if it still holds ``value``: a block undone long after
    (its generator collected late) must not clear a newer block's state."""
    if getattr(model, name, None) is value:
        setattr(model, name, None)


def unsteer(model: Any) -> None:
    """Undo everything a ``steer`` block puts on ``model`` (idempotent)."""
    from promptscope.models.vectors import remove_steering_hooks

    model.steering = model.vector_steering = model.steered_by = None
    remove_steering_hooks(model.model)


@contextlib.contextmanager
def _pasta(model: Any, heads: Any, alpha: float, mode: str,
           emphasis: str | Sequence[str] | None, kernel: str = "sdpa",
           ) -> Iterator[AttentionSteering]:
    """PASTA's part of :func:`steer`."""
    cfg = model.text_config
    if isinstance(heads, str) and heads.startswith(("top:", "profile:")):
        from promptscope.analyses.heads import resolve_profile_heads

        heads = resolve_profile_heads(heads, model.name)
    subs = (emphasis,) if isinstance(emphasis, str) else tuple(emphasis or ())
    if kernel == "flex":
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError:
            raise CapabilityError("kernel='flex' needs torch >= 2.5 (flex_attention); use "
                                  "kernel='sdpa'.") from None
    attended = model.attention_layers  # (refuses a model without attention)
    steering = AttentionSteering(parse_heads(heads, cfg.num_hidden_layers,
                                             cfg.num_attention_heads, attended),
                                 alpha, mode, subs, kernel=kernel)
    use_promptscope_attention(model.model)
    model.steering = steering
    try:
        yield steering
    finally:
        _clear(model, "steering", steering)
