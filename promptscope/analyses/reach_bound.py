"""The analytic side of controllability: the self-attention control bound of "What's the Magic
Word?" (Bhargava et al.), per attention layer and head of a loaded model.

For the query at the last position ``i`` of ``x0`` (the one that predicts the next token), a
head's output with ``k`` control tokens ``U`` prepended is a convex mix of what it attends to in
``X0`` and in ``U``::

    y_i = (1 - b) * ybar_x + b * ybar_u,   b = D_u / (D_x + D_u)

with ``D_x = g_i(X0) = sum_j exp(s_ij)`` over ``X0``'s keys and ``D_u`` the same over ``U``'s. Every
control score is bounded, ``|s_ij| <= alpha = sigma_q sigma_k M_u M_x / sqrt(d_k)`` (the largest
singular values of the head's query and key matrices, the largest norms of control and state
token representations), so ``b <= beta = k e^alpha / (g_i + k e^alpha)``, and the part of the
output the control can put in any direction is at most ``beta * sigma_v * M_u`` (the paper's
bound on ``||Y_u^i||``). Through the head's output projection, the layer's output at ``i`` moves
by at most ``beta * (sigma_o sigma_v M_u + ||W_o ybar_x||)`` (``shift_bound``): when that is zero in
every layer (e.g. attention outputs zeroed), no control prompt can change the next-token
distribution and nothing new is reachable.

``M_u``: layer 0 uses the largest normalised embedding of an allowed control token (exact,
through the model's own embedding module); deeper layers use ``sqrt(d) * max|gain|``, the largest
norm RMSNorm can output whatever its input (``gain``: the norm's weight, or ``1 + weight`` in
Gemma's convention). Where queries and keys are normalised per head after projection (Qwen3),
the scores are bounded by those norms instead: ``alpha = d_k * gain_q * gain_k * scale``. The
bound is computed per layer on the uncontrolled states ``X0`` (the paper's single-layer setting),
read at the positions they have after ``k`` control tokens (``BOS u x0``);
across layers it is indicative, except when it is zero. Sliding-window attention and queries and
keys normalised across heads at once are refused (:class:`BoundUnsupported`: the search still
runs, without the bound).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from typing import Any

from promptscope.errors import PromptscopeError
from promptscope.models import resolve_model
from promptscope.models.base import Model


class BoundUnsupported(PromptscopeError):
    """The model's attention is not the llama-style kind the bound is written for."""


def attention_bound(model: Model | str | None, x0s: str | Sequence[str],
                    k: int | Sequence[int] = (1, 4, 10), *,
                    control_tokens: Sequence[int] | None = None) -> Any:
    """The paper's singular-value bound for every attention layer and head, per x0 and k.

    Args:
        model: a local transformers model with llama-style attention (``q_proj``, ``k_proj``,
            ``v_proj``, ``o_proj``, an RMSNorm ``input_layernorm``; llama, mistral, qwen2...).
        x0s: initial state(s); the bound is for the query at the last token.
        k: control prompt length(s).
        control_tokens: token ids the control may use (default: all non-special tokens), for
            the exact ``M_u`` of layer 0.

    Returns:
        A DataFrame, one row per (x0, k, layer, head): ``sigma_q``, ``sigma_k``, ``sigma_v``,
        ``sigma_o`` (largest singular values), ``M_x``, ``M_u``, ``alpha``, ``log_g``,
        ``beta`` (the most attention k control tokens can take), ``control_bound``
        (``beta * sigma_v * M_u``), ``shift_bound`` (largest change of the layer output),
        ``resid_norm`` (norm of the residual stream there, for scale).

    Example:
        >>> promptscope.analyses.reach_bound.attention_bound(model, "tike vonu", k=[1, 4])
        ...                                                                   # doctest: +SKIP
    """
    import pandas as pd
    import torch

    from promptscope.models.hf import linear_weight, text_config
    from promptscope.models.vectors import decoder_layers

    mdl = resolve_model(model)
    mdl.require("hidden_states", "The reachability bound")
    lm = mdl.model  # type: ignore[attr-defined]
    tok = mdl.tokenizer  # type: ignore[attr-defined]
    layers = decoder_layers(lm)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    if not all(all(hasattr(getattr(layer, "self_attn", None), p) for p in projections)
               and hasattr(layer, "input_layernorm") for layer in layers):
        raise BoundUnsupported(
            f"The singular-value bound is implemented for llama-style attention (q_proj, "
            f"k_proj, v_proj, o_proj after an input norm); {type(lm).__name__} has another "
            "layout.")
    norms = {type(layer.input_layernorm).__name__ for layer in layers}
    if any("RMSNorm" not in n for n in norms):  # a LayerNorm subtracts the mean: other gains
        raise BoundUnsupported(
            f"The singular-value bound assumes an RMS norm before attention; "
            f"{type(lm).__name__} uses {', '.join(sorted(norms))}.")
    partial = getattr(text_config(lm), "partial_rotary_factor", 1.0) or 1.0
    if partial < 1:
        raise BoundUnsupported(
            f"The singular-value bound assumes rotary position on every query/key dimension; "
            f"{type(lm).__name__} rotates {partial:.0%} of them.")
    sliding = [i for i, layer in enumerate(layers)
               if getattr(layer.self_attn, "sliding_window", None)]
    if sliding:
        raise BoundUnsupported(
            f"The singular-value bound assumes every query sees every earlier key; layers "
            f"{sliding} of {type(lm).__name__} attend within a sliding window.")
    if any(getattr(layer.self_attn.q_proj, "bias", None) is not None
           or getattr(layer.self_attn.k_proj, "bias", None) is not None for layer in layers):
        raise BoundUnsupported("The singular-value bound assumes attention projections without "
                               "bias; this model's query/key projections have one.")
    ks = [k] if isinstance(k, int) else list(k)
    if any(kk < 1 for kk in ks):
        raise PromptscopeError("The bound needs k >= 1 control tokens.")
    texts = [x0s] if isinstance(x0s, str) else list(x0s)
    # Each layer's own shape (a config may vary it by layer, e.g. Gemma 4's).
    cfg = text_config(lm)
    shapes = [_head_shape(layer.self_attn, cfg) for layer in layers]
    embed = lm.get_input_embeddings()
    vocab, device = embed.weight.shape[0], mdl.device  # type: ignore[attr-defined]
    # Queries and keys normalised per head after projection (qwen3, gemma3): their norms are
    # at most sqrt(hd) * the norm's largest gain, whatever the projection's singular values.
    qk_normed = hasattr(layers[0].self_attn, "q_norm")
    if qk_normed and any(layer.self_attn.q_norm.weight.shape[-1] != hd
                         for layer, (hd, _, _) in zip(layers, shapes)):
        raise BoundUnsupported(
            f"{type(lm).__name__} normalises queries and keys across all heads at once; the "
            "bound is written for per-head normalisation.")
    if control_tokens is None:
        specials = set(tok.all_special_ids)
        control_tokens = [i for i in range(min(len(tok), vocab)) if i not in specials]
    rotary = getattr(lm.model, "rotary_emb", None)
    apply_rope = getattr(importlib.import_module(type(layers[0].self_attn).__module__),
                         "apply_rotary_pos_emb", None)

    def svmax(w: Any) -> float:
        return float(torch.linalg.matrix_norm(w.float(), ord=2)) if w.numel() else 0.0

    rows = []
    with torch.no_grad():
        sig = []  # per layer: per-head singular values (independent of x0)
        for layer, (hd, n_heads, n_kv) in zip(layers, shapes):
            a = layer.self_attn
            wq, wk, wv, wo = (linear_weight(p, lm.dtype)
                              for p in (a.q_proj, a.k_proj, a.v_proj, a.o_proj))
            sig.append({
                "q": [svmax(wq[h * hd:(h + 1) * hd]) for h in range(n_heads)],
                "k": [svmax(wk[g * hd:(g + 1) * hd]) for g in range(n_kv)],
                "v": [svmax(wv[g * hd:(g + 1) * hd]) for g in range(n_kv)],
                "o": [svmax(wo[:, h * hd:(h + 1) * hd]) for h in range(n_heads)],
            })
        # the embedding module's own output (Gemma scales the rows)
        m_u0 = float(layers[0].input_layernorm(
            embed(torch.tensor(list(control_tokens), device=device))).float()
            .norm(dim=-1).max())

        def _bound_rows(s: int, text: str, ks_here: list[int], hs: Any, pos: Any
                        ) -> list[dict[str, Any]]:
            """The rows of one x0 read at positions ``pos``, for each of ``ks_here``."""
            rows: list[dict[str, Any]] = []
            length = pos.shape[1]
            for li, layer in enumerate(layers):
                a = layer.self_attn
                hd, n_heads, n_kv = shapes[li]
                group = n_heads // n_kv
                x = layer.input_layernorm(hs[li])  # [1, L, d]
                m_x = float(x[0].float().norm(dim=-1).max())
                m_u = m_u0 if li == 0 else math.sqrt(x.shape[-1]) * _max_gain(
                    layer.input_layernorm, x)
                q = a.q_proj(x).view(1, length, n_heads, hd).transpose(1, 2)
                kk = a.k_proj(x).view(1, length, n_kv, hd).transpose(1, 2)
                v = a.v_proj(x).view(1, length, n_kv, hd).transpose(1, 2)
                if hasattr(a, "q_norm"):
                    q, kk = a.q_norm(q), a.k_norm(kk)
                if rotary is not None and apply_rope is not None:
                    cos, sin = rotary(x, pos)
                    q, kk = apply_rope(q, kk, cos, sin)
                scale = float(getattr(a, "scaling", 1 / math.sqrt(hd)))
                normed_alpha = (hd * _max_gain(a.q_norm, q) * _max_gain(a.k_norm, kk) * scale
                                if qk_normed else None)
                resid = float(hs[li + 1][0, -1].float().norm())
                wo = linear_weight(a.o_proj, x.dtype)
                for h in range(n_heads):
                    g = h // group
                    scores = (kk[0, g] @ q[0, h, -1]).float() * scale  # [L]
                    log_g = float(torch.logsumexp(scores, 0))
                    ybar = torch.softmax(scores, 0) @ v[0, g].float()
                    ybar_o = float((wo[:, h * hd:(h + 1) * hd].float() @ ybar).norm())
                    sq, sk, sv, so = sig[li]["q"][h], sig[li]["k"][g], sig[li]["v"][g], \
                        sig[li]["o"][h]
                    alpha = normed_alpha if qk_normed else sq * sk * m_u * m_x * scale
                    for k_ in ks_here:
                        # beta = k e^a / (g + k e^a), in log space (e^alpha overflows)
                        beta = 1 / (1 + math.exp(min(700.0, log_g - math.log(k_) - alpha)))
                        rows.append({
                            "state": s, "x0": text, "k": k_, "layer": li, "head": h,
                            "sigma_q": sq, "sigma_k": sk, "sigma_v": sv, "sigma_o": so,
                            "M_x": m_x, "M_u": m_u, "alpha": alpha, "log_g": log_g,
                            "beta": beta, "control_bound": beta * sv * m_u,
                            "shift_bound": beta * (so * sv * m_u + ybar_o),
                            "resid_norm": resid,
                        })
            return rows

        for s, text in enumerate(texts):
            ids = torch.tensor([mdl.encode_prompt(text)], device=device)  # type: ignore
            length = ids.shape[1]
            # The search builds "BOS u x0": k control tokens move x0 k positions away from the
            # BOS (rotary scores depend on that distance), so X0 is read as it stands then.
            # Without a BOS the distances within x0 do not depend on k: one pass serves all.
            bos_first = tok.bos_token_id is not None and int(ids[0, 0]) == tok.bos_token_id
            for shifted in (ks if bos_first else [None]):
                pos = torch.arange(length, device=device)[None]
                if shifted is not None:
                    pos = pos + shifted * (pos >= 1)
                hs = lm(input_ids=ids, position_ids=pos, output_hidden_states=True).hidden_states
                rows += _bound_rows(s, text, [shifted] if shifted is not None else ks, hs, pos)
    return pd.DataFrame(rows)


def _head_shape(attn: Any, cfg: Any) -> tuple[int, int, int]:
    """``(head size, query heads, key/value heads)`` of one attention module, read from its
    projections."""
    from promptscope.models.hf import linear_shape

    hd = int(getattr(attn, "head_dim", 0) or cfg.hidden_size // cfg.num_attention_heads)
    return hd, linear_shape(attn.q_proj)[0] // hd, linear_shape(attn.k_proj)[0] // hd


def _max_gain(norm: Any, like: Any) -> float:
    """The largest factor an RMSNorm-like module applies to one coordinate of a unit-RMS
    input (its weight ``w``, or ``1 + w`` in Gemma's convention): its output for all-ones. Its
    outputs' norm is at most ``sqrt(d)`` times this."""
    import torch

    d = norm.weight.shape[-1]
    return float(norm(torch.ones(d, dtype=like.dtype, device=like.device)).abs().max())


def layer_summary(bound: Any) -> Any:
    """Per (k, layer): the largest ``beta`` over heads and the summed ``shift_bound``, averaged
    over the x0s, beside the residual norm (for scale)."""
    per_state = bound.groupby(["k", "layer", "state"]).agg(
        beta_max=("beta", "max"), shift_bound=("shift_bound", "sum"),
        control_bound=("control_bound", "max"), resid_norm=("resid_norm", "first"),
        sigma_q=("sigma_q", "max"), sigma_k=("sigma_k", "max"), sigma_v=("sigma_v", "max"),
        sigma_o=("sigma_o", "max"))
    return per_state.groupby(["k", "layer"]).mean().reset_index()


def nothing_new_reachable(bound: Any) -> bool:
    """True when the bound proves no control prompt can move the next-token distribution: the
    control-induced change of every attention layer's output is bounded by zero."""
    return bool(len(bound)) and float(bound["shift_bound"].abs().max()) == 0.0
