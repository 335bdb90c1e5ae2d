"""Activation (vector) steering: add a direction to the residual stream with forward hooks.

A :class:`SteeringVector` holds one direction per decoder layer. Applying it (with
:func:`apply_vector`, or ``promptscope.steer(model, method="vector", ...)``) registers PyTorch
forward hooks:

* one forward pre-hook on the transformers model itself, which reads the 2-D attention mask of
  every call (``score``'s prompt pass, its KV-cache continuation pass, each ``generate`` step) and
  turns it into a per-token gate: real tokens at or after position ``start`` are steered, padding
  never is (left-padded batches, right-padded continuations);
* one forward hook per steered decoder layer, which replaces the layer's output hidden state
  ``h`` (the residual stream after that layer) by

  - ``mode="add"`` (contrastive steering vectors, CAA): ``h + strength * v``;
  - ``mode="icv"`` (in-context vectors): ``normalize(h / |h| + strength * v) * |h|``: the latent is
    shifted along the ICV, then rescaled to its own norm (ICV paper, norm-preserving step);
  - ``mode="set"`` (a knob, e.g. the context-sensitivity knob): ``h + (strength - h.u) u`` with
    ``u = v / |v|``: the latent's coordinate along the direction is *set* to ``strength``, the rest
    of it is left alone.

``start`` picks the steered positions: tokens from that index of each prompt on, or ``"last"``
(the last prompt token and everything generated after it; where a knob is read).

The hooks are removed when the block is left, also after an exception or a KeyboardInterrupt.
Vectors are values: ``a + b``, ``a - b``, ``2 * a``; saved in the store as sessions of kind
``steering_vector`` (:meth:`SteeringVector.save`, :func:`load_vector`).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from promptscope.errors import PromptscopeError
from promptscope.models.hf import forward_inputs, text_config
from promptscope.models.icv_kernel import icv_shift, kernel_on

KIND = "steering_vector"
MODES = ("add", "icv", "set")


# ---------------------------------------------------------------------- the value
@dataclass(eq=False)
class SteeringVector:
    """Per-layer directions in a model's residual stream.

    Attributes:
        vectors: layer -> float32 tensor ``[hidden_size]`` (on the CPU).
        hidden_size: the model's hidden size (vectors of another size are refused).
        mode: ``"add"`` (``h + s * v``), ``"icv"`` (norm-preserving shift, ICV paper) or
            ``"set"`` (the coordinate along ``v`` set to ``s``: a knob).
        method: how it was made: ``"caa"``, ``"icv"``, ``"knob"``, ``"custom"`` or
            ``"combined"``.
        model: the name of the model it was computed on.
        meta: JSON-friendly facts (number of pairs, positions, explained variance...).
        name: its name in the store ("" until saved or named).

    Example:
        >>> v = promptscope.contrastive_vector(model, pos, neg, layers=[2])    # doctest: +SKIP
        >>> both = v + 0.5 * w; both.save("ctx+style")                          # doctest: +SKIP
    """

    vectors: dict[int, torch.Tensor]
    hidden_size: int
    mode: str = "add"
    method: str = "custom"
    model: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise PromptscopeError(f"Vector mode must be one of {MODES}, not {self.mode!r}.")
        if not self.vectors:
            raise PromptscopeError("A steering vector needs at least one layer.")
        clean = {}
        for layer, v in sorted(self.vectors.items()):
            t = torch.as_tensor(v).detach().to("cpu", torch.float32).reshape(-1)
            if t.numel() != self.hidden_size:
                raise PromptscopeError(f"Layer {layer}'s vector has {t.numel()} values; the "
                                       f"hidden size is {self.hidden_size}.")
            clean[int(layer)] = t
        self.vectors = clean

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    def norms(self) -> dict[int, float]:
        """Layer -> L2 norm of its vector."""
        return {k: float(v.norm()) for k, v in self.vectors.items()}

    # -- arithmetic (ICV paper: vectors of two tasks add up to a vector that does both)
    def _check(self, other: SteeringVector) -> None:
        if not isinstance(other, SteeringVector):
            raise TypeError(f"Cannot combine a SteeringVector with {type(other).__name__}.")
        if other.hidden_size != self.hidden_size:
            raise PromptscopeError(f"Cannot combine vectors of hidden size {self.hidden_size} "
                                   f"and {other.hidden_size}: they come from different models.")
        if other.mode != self.mode:
            raise PromptscopeError(f"Cannot combine a '{self.mode}' vector with an "
                                   f"'{other.mode}' one: they are applied differently.")

    def __add__(self, other: SteeringVector) -> SteeringVector:
        self._check(other)
        out = {k: v.clone() for k, v in self.vectors.items()}
        for k, v in other.vectors.items():
            out[k] = out[k] + v if k in out else v.clone()
        return SteeringVector(out, self.hidden_size, self.mode, "combined", self.model,
                              {"parts": [self.describe(), other.describe()]})

    def __mul__(self, k: float) -> SteeringVector:
        if not isinstance(k, (int, float)):
            return NotImplemented
        meta = {**self.meta, "scaled": float(k) * self.meta.get("scaled", 1.0)}
        if self.mode == "set":  # a unit direction whose value the strength sets
            if abs(float(k)) != 1.0:
                raise PromptscopeError(f"A knob ('set' vector) is a unit direction and the "
                                       f"strength sets its value, so {k} x knob would do "
                                       "nothing; give the value as strength=, or -knob to "
                                       "flip its direction.")
            if k < 0 and "layers" in meta:  # the intents' values along the flipped direction
                meta["layers"] = {
                    layer: {**f, **{side: -f[side] for side in ("positive", "negative",
                                                                 "separation") if side in f}}
                    for layer, f in meta["layers"].items()}
        return SteeringVector({i: v * float(k) for i, v in self.vectors.items()},
                              self.hidden_size, self.mode, self.method, self.model, meta)

    __rmul__ = __mul__

    def __neg__(self) -> SteeringVector:
        return self * -1.0

    def __sub__(self, other: SteeringVector) -> SteeringVector:
        return self + (-other)

    def scale(self, k: float) -> SteeringVector:
        """``k * self`` (the same as the ``*`` operator)."""
        return self * k

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly description (no tensors)."""
        return {"name": self.name, "method": self.method, "mode": self.mode,
                "layers": self.layers, "hidden_size": self.hidden_size, "model": self.model}

    # -- the store
    def to_frame(self) -> Any:
        """One row per layer: ``layer``, ``norm``, ``values`` (a list of floats)."""
        import pandas as pd

        return pd.DataFrame([{"layer": k, "norm": float(v.norm()), "values": v.tolist()}
                             for k, v in sorted(self.vectors.items())])

    def save(self, name: str | None = None, *, store: Any = None) -> str:
        """Save as a session of kind ``steering_vector``; returns its id.

        Example:
            >>> v.save("context-caa"); w = promptscope.load_vector("context-caa")  # doctest: +SKIP
        """
        from promptscope.store import Store

        store = store or Store.default()
        self.name = name or self.name or f"{self.method} vector"
        params = {"method": self.method, "mode": self.mode, "hidden_size": self.hidden_size,
                  "layers": self.layers, "meta": self.meta}
        sid = store.create(KIND, name=self.name, model=self.model,
                           model_info={"name": self.model}, params=params)
        store.append(sid, "rows", self.to_frame())
        store.finish(sid, "done", summary={"rows": len(self.vectors)})
        return sid

    @classmethod
    def from_result(cls, result: Any) -> SteeringVector:
        """Rebuild from ``promptscope.load(id)`` of a ``steering_vector`` session."""
        if result.kind != KIND:
            raise PromptscopeError(f"Session {result.session_id} is a '{result.kind}' run, not "
                                   "a steering vector.")
        p = result.params
        vectors = {int(r.layer): torch.tensor(list(r.values), dtype=torch.float32)
                   for r in result.df.itertuples()}
        return cls(vectors, int(p["hidden_size"]), p.get("mode", "add"), p.get("method", ""),
                   result.model.get("name", ""), p.get("meta", {}), result.name)

    def __repr__(self) -> str:
        return (f"<SteeringVector {self.name or self.method} mode={self.mode} "
                f"layers={self.layers} hidden={self.hidden_size}>")


def load_vector(name_or_id: str, *, store: Any = None) -> SteeringVector:
    """The newest saved steering vector with this name (or this session id).

    Example:
        >>> v = promptscope.load_vector("context-caa")                        # doctest: +SKIP
    """
    import promptscope
    from promptscope.store import Store

    store = store or Store.default()
    records = [r for r in store.list(kind=KIND) if name_or_id in (r.name, r.id)]
    if not records:
        raise PromptscopeError(f"No steering vector named '{name_or_id}'. promptscope.sessions("
                               f"kind='{KIND}') lists the saved ones.")
    return SteeringVector.from_result(promptscope.load(records[0].id, store=store))


# ---------------------------------------------------------------------- model structure
def decoder_layers(model: Any) -> Any:
    """The ``nn.ModuleList`` of a transformers causal LM's decoder layers, to hook (refused on
    a ``torch.compile``'d model, :func:`check_uncompiled`)."""
    check_uncompiled(model, "Hooking its layers")
    n = getattr(text_config(model), "num_hidden_layers", None)
    # (a multimodal checkpoint's vision tower has a list of layers too: name the text one)
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers",
                 "model.language_model.layers", "language_model.model.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.nn.ModuleList) and (n is None or len(obj) == n):
            return obj
    for _, module in model.named_modules():  # other architectures: the list of n layers
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    from promptscope.errors import CapabilityError

    raise CapabilityError(f"Cannot find the decoder layers of {type(model).__name__}; vector "
                          "steering needs a list of num_hidden_layers blocks.")


def residual_stream(model: Any) -> int | None:
    """Where a decoder layer's output keeps the residual stream: ``None`` when the output (or
    its first item) is the stream, ``[B, L, D]``; an index when layers pass several streams,
    ``[streams, B, L, D]`` (Gemma 3n's AltUp), that of the one the block's attention and MLP
    compute (``altup_active_idx``), which vector methods read and steer."""
    cfg = text_config(model)
    return int(cfg.altup_active_idx) if getattr(cfg, "altup_num_inputs", None) else None


def block_state(output: Any, stream: int | None) -> torch.Tensor:
    """The residual stream ``[B, L, D]`` in what a decoder layer returned
    (``stream``: :func:`residual_stream`)."""
    h = output[0] if isinstance(output, tuple) else output
    return h if stream is None else h[stream]


def with_block_state(output: Any, new: torch.Tensor, stream: int | None) -> Any:
    """A decoder layer's ``output`` with its residual stream replaced by ``new`` (the other
    streams and items kept; nothing changed in place)."""
    h = output[0] if isinstance(output, tuple) else output
    if stream is not None:
        new = torch.cat([h[:stream], new[None], h[stream + 1:]])
    return (new, *output[1:]) if isinstance(output, tuple) else new


def check_uncompiled(model: Any, analysis: str) -> None:
    """Refuse a ``torch.compile``'d transformers model for ``analysis``: compiled code does not
    run forward hooks registered after compiling (torch does not guard on them), so steering,
    reading states or capturing attention would silently do nothing, or fail deep inside
    torch."""
    if compiled(model):
        from promptscope.errors import CapabilityError

        raise CapabilityError(
            f"{analysis} needs the model uncompiled: its forward is compiled with torch.compile, "
            "whose code skips hooks added after compiling. Load the model again without "
            "compiling it (promptscope's own generation already runs uncompiled while a vector "
            "steers it).")


def compiled(model: Any) -> bool:
    """Whether ``torch.compile`` wraps this module's forward: ``torch.compile(model)``,
    ``model.compile()`` or ``model.forward = torch.compile(model.forward)``."""
    return (hasattr(model, "_orig_mod")
            or getattr(model, "_compiled_call_impl", None) is not None
            or hasattr(getattr(model, "forward", None), "_torchdynamo_orig_callable"))


def hidden_size(model: Any) -> int:
    cfg = text_config(model)
    return int(getattr(cfg, "hidden_size", None) or cfg.n_embd)


def check_layers(layers: Sequence[int] | int | str | None, n_layers: int) -> list[int] | None:
    """``"2,3"`` / ``[2, 3]`` / ``2`` / ``"all"`` -> a sorted checked list (``None`` = all)."""
    if layers is None or layers == "all":
        return None
    if isinstance(layers, str):
        try:
            layers = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise PromptscopeError(f"Cannot read layers {layers!r}; write e.g. '2,3'.") from None
    elif isinstance(layers, int):
        layers = [layers]
    out = sorted({int(x) for x in layers})
    for layer in out:
        if not 0 <= layer < n_layers:
            raise PromptscopeError(f"Layer {layer} is out of range: the model has layers "
                                   f"0..{n_layers - 1}.")
    if not out:
        raise PromptscopeError("No layers given; pick at least one (e.g. layers=[2]).")
    return out


# ---------------------------------------------------------------------- application
@dataclass
class VectorSteering:
    """An active vector steering: what is added, how strongly, where.

    ``enabled`` can be switched off without removing the hooks (``run_prompt``'s ``compare``).
    """

    vector: SteeringVector
    strength: float = 1.0
    layers: list[int] = field(default_factory=list)
    start: int | str = 0
    enabled: bool = True
    spans: dict[str, list[tuple[int, int]]] = field(default_factory=dict,
                                                    repr=False)  # PASTA's; unused here
    #: Set by a pass over prompt + continuation at once (no cache): per row, the position of
    #: the prompt's last token, from which ``start="last"`` steers (as if the continuation
    #: came in a later pass).
    from_index: list[int] | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"method": "vector", "vector": self.vector.name or self.vector.method,
                "vector_method": self.vector.method, "mode": self.vector.mode,
                "strength": self.strength, "layers": self.layers, "start": self.start}


class _Hooks:
    """The forward hooks of one :class:`VectorSteering` on one transformers model."""

    def __init__(self, steering: VectorSteering, stream: int | None = None) -> None:
        self.s = steering
        self.stream = stream  # residual_stream(model)
        self.gate: torch.Tensor | None = None  # bool [B, Lq, 1]; None: steer every position
        self.cast: dict[tuple[Any, Any], dict[int, torch.Tensor]] = {}
        self.unit: dict[tuple[Any, int], torch.Tensor] = {}
        self.cache: Any = None  # a weak reference to the cache of the last call...
        self.seen: Any = 0  # ...and each row's tokens so far with it ([B, 1], or an int)

    def pre(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Per call: which of this call's tokens are real and at or after ``start``.

        Without a 2-D mask (a direct call on unpadded ids; Mamba's ``generate``) every token
        is real and positions come from ``position_ids``, else from the tokens earlier calls
        with the same cache brought (:meth:`offset`).
        """
        ids, mask, cache = forward_inputs(args, kwargs)
        if ids is None:
            self.gate = None
            return
        q = ids.shape[1]
        masked = isinstance(mask, torch.Tensor) and mask.dim() == 2
        if not masked and self.s.start == 0:
            # Every token is real and at or after 0: steer them all, with no host sync (on a
            # GPU, asking about the positions waits for every queued kernel). transformers'
            # generate drops an all-ones mask, so this is each step of unpadded generation.
            self.gate = None
            return
        if masked:  # noted for later calls without a mask (Mamba's decoding steps)
            self._note(cache, mask.long().sum(-1, keepdim=True))
            before: Any = 0
        else:
            before = self.offset(cache, q)
        if self.s.start == "last":
            # A prompt pass (nothing cached) steers its last token (prompts are left-padded);
            # a later pass (continuation, generation step) steers all its real tokens.
            fresh = mask.shape[1] == q if masked else bool(torch.as_tensor(before).eq(0).all())
            gate = torch.zeros(ids.shape[0], q, dtype=torch.bool, device=ids.device)
            if fresh and self.s.from_index is not None:
                first = torch.tensor(self.s.from_index, device=ids.device)[:, None]
                gate = torch.arange(q, device=ids.device)[None, :] >= first
            elif fresh:
                gate[:, -1] = True
            else:
                gate[:] = True
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                gate &= mask.bool()[:, -q:]
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2 and self.s.start == 0:
            # Every real token of this call: the tail of the 2-D mask (cached keys + this
            # call's tokens). The common case, so a decoding step pays two small ops.
            tail = mask[:, -q:]
            if self.s.vector.mode == "icv" and icv_kernel_here(tail) and kernel_on():
                # The ICV's kernel reads the gate as it runs, which costs less than asking
                # the GPU whether there is padding (a host sync on every decoding step).
                self.gate = tail.bool()[..., None]
                return
            if bool(tail.all()):  # no padding in this call: skip the gate altogether
                self.gate = None
                return
            gate = tail.bool()
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2:
            # The 2-D mask covers cached keys + this call's tokens: its tail is this call.
            real = mask.bool()
            pos = real.long().cumsum(-1) - 1
            gate = (real & (pos >= self.s.start))[:, -q:]
        else:
            pos = kwargs.get("position_ids")
            if pos is None:
                pos = torch.as_tensor(before, device=ids.device) + torch.arange(
                    q, device=ids.device)[None, :]
            gate = pos >= self.s.start
        self.gate = None if bool(gate.all()) else gate[..., None]

    def offset(self, cache: Any, q: int) -> Any:
        """How many tokens came before this call's ``q`` in each row, for a call without a 2-D
        mask: 0 without a cache; what earlier calls with the same cache object brought (a
        linear-attention cache cannot tell its length; a masked prompt pass counts each row's
        real tokens); else what a new cache holds."""
        if cache is None:
            before: Any = 0
        elif self.cache is not None and self.cache() is cache:
            before = self.seen
        else:
            try:
                before = int(cache.get_seq_length())
            except (ValueError, AttributeError, NotImplementedError):
                before = 0
        self._note(cache, before + q)
        return before

    def _note(self, cache: Any, seen: Any) -> None:
        """Remember ``cache`` (weakly: a KV cache can be large) and the tokens seen with it."""
        import weakref

        try:
            self.cache = weakref.ref(cache) if cache is not None else None
        except TypeError:  # an object that takes no weak references
            self.cache = lambda cache=cache: cache
        self.seen = seen

    def _vec(self, layer: int, device: torch.device, dtype: torch.dtype, scaled: bool
             ) -> torch.Tensor:
        """The layer's vector on the device, times the strength if ``scaled`` (cached: the hooks
        run on every layer of every decoding step; the strength changes only between runs)."""
        key = (device, dtype, self.s.strength if scaled else None)
        if key not in self.cast:
            factor = self.s.strength if scaled else 1.0
            self.cast[key] = {k: factor * v.to(device, dtype)
                              for k, v in self.s.vector.vectors.items()}
        return self.cast[key][layer]

    def layer_hook(self, layer: int) -> Any:
        def hook(module: Any, args: Any, output: Any) -> Any:
            if not self.s.enabled:
                return None
            h = block_state(output, self.stream)
            mode = self.s.vector.mode
            # "set" and the ICV compute in fp32; "set" needs the unscaled direction.
            v = self._vec(layer, h.device, h.dtype if mode == "add" else torch.float32,
                          scaled=mode != "set")
            return with_block_state(output, self.shift(h, v), self.stream)
        hook.steering_hook = True  # type: ignore[attr-defined]  (see remove_steering_hooks)
        return hook

    def shift(self, h: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``h`` steered at this layer; ``v`` is strength x vector for "add" and "icv", the
        vector itself for "set"."""
        gate = self.gate
        if gate is not None and gate.device != h.device:  # a model split over devices
            gate = gate.to(h.device)
        if self.s.vector.mode == "add":
            return h + (v if gate is None else gate.to(h.dtype) * v)
        if self.s.vector.mode == "set":
            u = torch.nn.functional.normalize(v, dim=-1)
            delta = ((self.s.strength - h.float() @ u)[..., None] * u).to(h.dtype)
            return h + (delta if gate is None else gate.to(h.dtype) * delta)
        # ICV: shift the unit latent along v, then give it back its own norm:
        # normalize(h / |h| + s v) * |h| == normalize(w) * |h| with w = h + s |h| v.
        # A decoding step at batch 1 is bound by op dispatch and kernel launches, not by this
        # arithmetic, so the ops are chosen per device: one Triton kernel on CUDA
        # (models/icv_kernel.py), else aten ops. torch.compile of this function cost more per
        # call on an H200 (guards) than the launches it saved.
        if icv_kernel_here(h):
            moved = icv_shift(h, v, gate)  # one Triton kernel (None: it cannot run here)
            if moved is not None:
                return moved
        fp32 = h.dtype == torch.float32
        if fused_rms_norm(h):
            # GPU kernels cast mixed dtypes as they read and write, and rms_norm is one fused
            # kernel: 4 launches per steered layer (8 in the CPU form with a bf16 model).
            norm = torch.linalg.vector_norm(h, dim=-1, keepdim=True, dtype=torch.float32)
            w = torch.addcmul(h, norm, v)  # fp32 by promotion
            unit = torch.nn.functional.rms_norm(w, (w.shape[-1],), self._unit_weight(w), 1e-30)
            moved = torch.mul(unit, norm, out=unit if fp32 else torch.empty_like(h))
        else:
            # On the CPU mixed-dtype ops cost more than explicit casts, and rms_norm is six
            # composite ops, so: cast once, two norms, in place on our own tensors. (A
            # same-dtype .float() / .to() is still a dispatcher call, ~5 us each on a CPU.)
            hf = h if fp32 else h.float()
            norm = torch.linalg.vector_norm(hf, dim=-1, keepdim=True)
            w = torch.addcmul(hf, norm, v)
            scale = norm.div_(torch.linalg.vector_norm(w, dim=-1, keepdim=True)
                              .clamp_min_(1e-12))
            moved = w.mul_(scale) if fp32 else w.mul_(scale).to(h.dtype)
        return moved if gate is None else torch.where(gate, moved, h)

    def _unit_weight(self, w: torch.Tensor) -> torch.Tensor:
        """rms_norm's weight that makes it ``w / |w|``: every entry 1 / sqrt(size)."""
        key = (w.device, w.shape[-1])
        if key not in self.unit:
            self.unit[key] = torch.full((w.shape[-1],), w.shape[-1] ** -0.5, device=w.device)
        return self.unit[key]


def icv_kernel_here(t: torch.Tensor) -> bool:
    """Whether the ICV shift of ``t`` runs as one Triton kernel (models/icv_kernel.py): on CUDA,
    outside ``torch.compile`` (where inductor fuses the aten form with its neighbours)."""
    return t.is_cuda and not torch.compiler.is_compiling()


def fused_rms_norm(t: torch.Tensor) -> bool:
    """Whether ``torch.nn.functional.rms_norm`` runs as one fused kernel on ``t``'s device
    (aten's ``_fused_rms_norm``; on the CPU it is six composite ops). The ICV shift picks its
    ops by this. (Tensor flags, not ``t.device.type``: that costs ~5 us per call.)"""
    return t.is_cuda or t.is_xpu or t.is_mps


@contextlib.contextmanager
def vector_hooks(hf_model: Any, steering: VectorSteering) -> Iterator[VectorSteering]:
    """Register the hooks of ``steering`` on a transformers model for the block's duration."""
    hooks = _Hooks(steering, residual_stream(hf_model))
    layers = decoder_layers(hf_model)
    handles: list[Any] = []
    try:
        handles.append(hf_model.register_forward_pre_hook(hooks.pre, with_kwargs=True))
        for layer in steering.layers:
            handles.append(layers[layer].register_forward_hook(hooks.layer_hook(layer)))
        yield steering
    finally:  # also on exceptions and KeyboardInterrupt
        remove_all(handles)


def remove_all(handles: list[Any]) -> None:
    """Remove hook handles; a Ctrl-C while doing so removes the rest before it goes on."""
    try:
        while handles:
            handles[-1].remove()
            handles.pop()
    except KeyboardInterrupt:
        while handles:
            handles.pop().remove()
        raise


def remove_steering_hooks(hf_model: Any) -> None:
    """Remove every hook :func:`vector_hooks` put on ``hf_model``, handles or not (what a Ctrl-C
    that cut a clean-up short can leave)."""
    for module in hf_model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key, fn in list(hooks.items()):
                if getattr(fn, "steering_hook", False) or isinstance(
                        getattr(fn, "__self__", None), _Hooks):
                    hooks.pop(key, None)


def resolve_vector(vector: Any, store: Any = None) -> SteeringVector:
    """A SteeringVector, or the saved one with this name."""
    if isinstance(vector, SteeringVector):
        return vector
    if isinstance(vector, str):
        return load_vector(vector, store=store)
    raise PromptscopeError("Vector steering needs vector=: a SteeringVector (from "
                           "promptscope.contrastive_vector / in_context_vector) or the name of "
                           "a saved one.")


def make_vector_steering(model: Any, vector: Any, strength: float = 1.0,
                         layers: Sequence[int] | int | str | None = None,
                         start: int | str = 0) -> VectorSteering:
    """Check a vector against ``model`` (an HFModel) and build the steering."""
    model.require("hidden_states", "Vector steering")
    vec = resolve_vector(vector)
    size = hidden_size(model.model)
    if vec.hidden_size != size:
        raise PromptscopeError(f"The vector has hidden size {vec.hidden_size} but model "
                               f"'{model.name}' has {size}: it was computed on another model"
                               f"{' (' + vec.model + ')' if vec.model else ''}.")
    n_layers = int(model.text_config.num_hidden_layers)
    for layer in vec.layers:
        if not 0 <= layer < n_layers:
            raise PromptscopeError(f"The vector has layer {layer}, out of range for model "
                                   f"'{model.name}' (layers 0..{n_layers - 1}).")
    chosen = check_layers(layers, n_layers)
    if chosen is None:
        chosen = vec.layers
    missing = [x for x in chosen if x not in vec.vectors]
    if missing:
        raise PromptscopeError(f"The vector has no direction for layer(s) {missing}; it has "
                               f"layers {vec.layers}.")
    if (isinstance(strength, bool) or not isinstance(strength, numbers.Real)
            or not math.isfinite(strength)):
        raise PromptscopeError(f"strength must be a number, not {strength!r}.")
    if start != "last" and (not isinstance(start, int) or start < 0):
        raise PromptscopeError("start must be a token position >= 0 (from the prompt's start) "
                               f"or 'last' (the last prompt token on), not {start!r}.")
    return VectorSteering(vec, float(strength), chosen, start)


@contextlib.contextmanager
def apply_vector(model: Any, vector: Any, strength: float = 1.0,
                 layers: Sequence[int] | int | str | None = None,
                 start: int | str = 0) -> Iterator[VectorSteering]:
    """Add ``strength x vector`` to ``model``'s residual stream inside the block.

    Prefer ``promptscope.steer(model, method="vector", ...)``, which also refuses nesting.

    Example:
        >>> with apply_vector(model, v, strength=4, layers=[2]):
        ...     model.score([prompt], [" red"])                             # doctest: +SKIP
    """
    steering = make_vector_steering(model, vector, strength, layers, start)
    model.vector_steering = steering
    try:
        with vector_hooks(model.model, steering):
            yield steering
    finally:
        model.vector_steering = None


# ---------------------------------------------------------------------- reading latents
Position = int | str


@torch.inference_mode()
def collect_states(model: Any, prompts: Sequence[str], layers: Sequence[int],
                   position: Position = "last") -> torch.Tensor:
    """Residual stream after each of ``layers`` for each prompt: float32 ``[N, len(layers), H]``.

    Inside a ``steer(...)`` block the states are the steered ones (its hooks run first).

    Args:
        position: ``"last"`` (the last prompt token), ``"mean"`` (mean over the prompt's
            tokens), or a token index (``0`` the first, ``-2`` the one before the last).

    Example:
        >>> collect_states(model, ["Is Paris in Europe?"], layers=[0, 2]).shape  # doctest: +SKIP
        torch.Size([1, 2, 256])
    """
    model.require("hidden_states", "Reading hidden states")
    blocks = decoder_layers(model.model)
    stream = residual_stream(model.model)
    ids = [model.encode_prompt(p) for p in prompts]
    out = torch.zeros(len(prompts), len(layers), hidden_size(model.model))
    for batch in model._batches([len(x) for x in ids]):
        width = max(len(ids[u]) for u in batch)
        input_ids, mask = model._left_pad([ids[u] for u in batch], width)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        got: dict[int, torch.Tensor] = {}

        def keep(j: int, got: dict[int, torch.Tensor] = got) -> Any:
            def hook(module: Any, args: Any, output: Any) -> None:
                got[j] = block_state(output, stream).float()
            return hook

        handles: list[Any] = []
        try:
            for j, layer in enumerate(layers):
                handles.append(blocks[layer].register_forward_hook(keep(j)))
            model.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                        use_cache=False, **model.every_position(width))
        finally:
            remove_all(handles)
        for r, u in enumerate(batch):
            n = len(ids[u])
            for j in range(len(layers)):
                row = got[j][r, width - n:]  # padding removed
                if position == "last":
                    out[u, j] = row[-1].cpu()
                elif position == "mean":
                    out[u, j] = row.mean(0).cpu()
                elif isinstance(position, int):
                    if not -n <= position < n:
                        raise PromptscopeError(f"Token position {position} is outside prompt "
                                               f"{u} ({n} tokens).")
                    out[u, j] = row[position].cpu()
                else:
                    raise PromptscopeError(f"position must be 'last', 'mean' or a token "
                                           f"index, not {position!r}.")
    return out
