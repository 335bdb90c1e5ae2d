"""Where the model attends: per-layer, per-head attention over every variant of a template.

Only the layers asked for compute their weights (explicitly, inside promptscope's attention
function); the rest of the model stays on SDPA, and the full token x token matrices are kept
when they fit (``MATRIX_WEIGHTS``) or are asked for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

from promptscope.analyses._recorder import Recorder
from promptscope.errors import PromptscopeError
from promptscope.models import resolve_model
from promptscope.models.base import Model
from promptscope.result import Result
from promptscope.store import Store
from promptscope.templates import (
    Template,
    Variant,
    check_rows,
    chunks,
    count_rows,
    locate_message,
    parse_template,
)

#: Variants per forward step (their rows are saved before the next step).
CHUNK_SIZE = 16

#: Attention weights a run keeps by default (``matrices=None``); beyond, it keeps the per-part
#: summary only and says so. Each weight is a table row of 20 bytes (400 MB at the limit): on an
#: 8 B model (32 layers x 32 heads) one 200-token prompt holds 20 M.
MATRIX_WEIGHTS = 20_000_000


def pick_indices(spec: Any, n: int, what: str) -> list[int]:
    """``None`` / ``"all"`` -> everything; ``"0,2"`` or ``[0, 2]`` -> those, checked."""
    if spec is None or spec == "all":
        return list(range(n))
    try:
        items = ([int(x) for x in spec.split(",") if x.strip()] if isinstance(spec, str)
                 else [int(x) for x in spec])
    except (TypeError, ValueError):
        raise PromptscopeError(f"Cannot read {what}s {spec!r}; write e.g. '0,3' or 'all'."
                               ) from None
    bad = [i for i in items if not 0 <= i < n]
    if bad:
        raise PromptscopeError(f"{what} {bad} out of range: the model has {what}s 0..{n - 1}.")
    return sorted(set(items))


def token_texts(text: str, offsets: Sequence[tuple[int, int]], names: Sequence[str]
                ) -> list[str]:
    """Each token as the text it covers, for tables and axes. A character that byte-level
    tokens split (``ü``, ``東``) is shown on its first token and as ``…`` on the rest; a token
    that covers no text (BOS) keeps its name.

    >>> token_texts("Zü", [(0, 0), (0, 1), (1, 2), (1, 2)], ["<s>", "Z", "Ã", "¼"])
    ['<s>', 'Z', 'ü', '…']
    """
    out, end = [], 0
    for (a, b), name in zip(offsets, names):
        if b <= a:
            out.append(name)
            continue
        out.append(text[max(a, end):b] or "…")
        end = max(end, b)
    return out


def token_parts(offsets: Sequence[tuple[int, int]], v: Variant,
                place: tuple[int, int, int] | None = None,
                special: Sequence[bool] | None = None) -> list[str]:
    """The template part each token belongs to: ``emphasis``, a variable or alternatives-group
    name, ``text``, or ``special`` (a special token of the tokenizer, e.g. BOS, also where a
    chat template spells it out, or a token without characters); ``template`` for the chat
    template's text around the prompt. ``place``: where the prompt stands in the tokenized text
    (:func:`promptscope.templates.locate_message`; default: the text is the prompt)."""
    offset, start, end = place or (0, 0, len(v.text))
    parts = []
    for i, (a, b) in enumerate(offsets):
        if b <= a or (special is not None and special[i]):
            parts.append("special")
            continue
        if b <= start or a >= end:
            parts.append("template")
            continue
        a, b = a - offset, b - offset
        label = "text"
        for span in v.spans:
            if span.kind != "text" and span.start < b and span.end > a:
                if span.kind == "emph":
                    label = "emphasis"
                    break
                label = span.name
        parts.append(label)
    return parts


def attention(
    template: str | Template,
    model: Model | str | None = None,
    *,
    vars: Any = None,
    namespace: Mapping[str, Any] | None = None,
    layers: Any = None,
    heads: Any = None,
    chat: bool = False,
    matrices: bool | None = None,
    steer: dict[str, Any] | None = None,
    name: str = "",
    save: bool = True,
    store: Store | None = None,
    progress: bool = True,
) -> Result:
    """Capture attention for every variant of ``template``.

    Args:
        template, vars, namespace, chat: as in :func:`promptscope.run_prompt`.
        layers: layers to capture (``None``/``"all"``, ``"0,3"``, ``[0, 3]``).
        heads: heads to keep within those layers (default all).
        matrices: keep the full token x token weights (table ``weights``, the causal half of
            each selected head's matrix). ``None`` (default): when the run holds at most
            ``MATRIX_WEIGHTS`` (20 M) of them, else only the summary, with a warning that says
            how many; ``True``: whatever their number; ``False``: only the summary.
        steer: capture under steering (``promptscope.steer`` keyword arguments): PASTA, a
            vector (``{"vector": v, "strength": 4}``; attention changes only after the steered
            layers) or both.

    Returns:
        A Result of kind ``attention``: ``df`` has, per variant, layer and head, the attention
        mass the last prompt token puts on each template part (``emphasis``, each variable and
        alternatives group, ``text``, ``special``); tables ``tokens`` (each token and its part)
        and, with ``matrices``, ``weights`` (variant, layer, head, query, key, weight).

    Example:
        >>> att = promptscope.attention("Context: <<Ann lives in Rome.>> Where is Ann?",
        ...                             layers="0,1")                      # doctest: +SKIP
        >>> promptscope.widgets.AttentionExplorer(att)                      # doctest: +SKIP
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from promptscope.models.steering import check_attention_layers
    from promptscope.models.vectors import check_uncompiled

    tpl = template if isinstance(template, Template) else parse_template(template)
    mdl = resolve_model(model)
    mdl.require("attention", "Attention capture")
    check_uncompiled(mdl.model, "Attention capture")  # type: ignore[attr-defined]
    cfg = mdl.text_config  # type: ignore[attr-defined]
    attended = mdl.attention_layers  # type: ignore[attr-defined]  # (refuses no attention)
    layer_ids = pick_indices(layers, cfg.num_hidden_layers, "layer")
    head_ids = pick_indices(heads, cfg.num_attention_heads, "head")
    if layers is None or layers == "all":
        layer_ids = [layer for layer in layer_ids if layer in attended]
    check_attention_layers(layer_ids, attended)
    check_rows(tpl, vars, namespace)
    total = tpl.n_variants(count_rows(vars))
    if matrices is None:
        matrices = _matrices_fit(mdl, tpl.expand(vars, namespace), chat,
                                 len(layer_ids) * len(head_ids), total)
    params = {"template": tpl.source, "layers": layer_ids, "heads": head_ids, "chat": chat,
              "matrices": matrices, "n_variants": total}
    variants = tpl.expand(vars, namespace)
    bar = tqdm(total=total, disable=not progress or total < 2, desc="attention",
               unit="variant", leave=False)
    with contextlib.ExitStack() as stack:
        steering = stack.enter_context(_steer_block(mdl, steer, tpl))
        if steering is not None:
            params["steer"] = steering.to_json()
        rec = Recorder("attention", name=name, model=mdl, params=params,
                       source=tpl.source, save=save, store=store).enter(stack)
        try:
            for chunk in chunks(variants, CHUNK_SIZE, steered=steering is not None):
                texts = [mdl.chat_prompt(v.text) if chat else v.text for v in chunk]
                places = [locate_message(v.text, t) for v, t in zip(chunk, texts)]
                if steering is not None:
                    for v, t in zip(chunk, texts):
                        if v.emphasis:  # else steer={"emphasis": ...} strings still apply
                            steering.spans[t] = v.emphasis_in(t)
                tokens_rows, mass_rows, weight_frames = [], [], []
                parts_of: dict[int, list[str]] = {}
                shown: dict[int, list[str]] = {}
                for j, (v, t, place) in enumerate(zip(chunk, texts, places)):
                    enc = mdl.encode(t, offsets=True)  # type: ignore[attr-defined]
                    parts_of[j] = token_parts(enc["offset_mapping"], v, place,
                                              mdl.special_flags(enc["input_ids"]))
                    shown[j] = token_texts(t, enc["offset_mapping"], mdl.tokenizer
                                           .convert_ids_to_tokens(enc["input_ids"]))

                def keep(j: int, layer: int, weights: Any, chunk: list[Variant] = chunk,
                         parts_of: dict[int, list[str]] = parts_of,
                         mass_rows: list[dict[str, Any]] = mass_rows,
                         weight_frames: list[Any] = weight_frames) -> None:
                    v = chunk[j]
                    w = weights[head_ids]  # [H, L, L]
                    last = w[:, -1, :]
                    for part in dict.fromkeys(parts_of[j]):
                        cols = [i for i, p in enumerate(parts_of[j]) if p == part]
                        sums = last[:, cols].sum(dim=1).tolist()
                        for h, m in zip(head_ids, sums):
                            mass_rows.append({"variant": v.index, **v.labels, "layer": layer,
                                              "head": h, "part": part, "mass": m})
                    if matrices:
                        weight_frames.append(_weights_frame(v.index, layer, head_ids, w))

                mdl.forward_with_attention(  # type: ignore[attr-defined]
                    texts, layer_ids, keep, progress=bar.update)
                for j, v in enumerate(chunk):
                    for pos, (tok, part) in enumerate(zip(shown[j], parts_of[j])):
                        tokens_rows.append({"variant": v.index, "position": pos, "token": tok,
                                            "part": part})
                rec.add(pd.DataFrame(tokens_rows), "tokens")
                if weight_frames:
                    rec.add(pd.concat(weight_frames, ignore_index=True), "weights")
                rec.add(pd.DataFrame(mass_rows))
                if steering is not None:
                    steering.spans.clear()
        finally:
            bar.close()
    return rec.result()


def _matrices_fit(mdl: Model, variants: Any, chat: bool, heads: int, total: int) -> bool:
    """Whether the run's attention weights (``heads`` selected layer-heads, the causal half of
    each variant's matrix) stay within ``MATRIX_WEIGHTS``; warns when they do not."""
    import warnings

    count = 0
    for v in variants:
        n = len(mdl.encode_prompt(mdl.chat_prompt(v.text) if chat else v.text))  # type: ignore
        count += heads * n * (n + 1) // 2
        if count > MATRIX_WEIGHTS:
            warnings.warn(
                f"Keeping only the per-part summary: the attention matrices of these {total} "
                f"variant(s) hold over {count / 1e6:.0f} M weights already ({heads} layer-heads; "
                f"the default limit is {MATRIX_WEIGHTS / 1e6:.0f} M, 20 bytes each). Pass "
                "matrices=True to keep them anyway, or fewer layers= / heads= / variants.",
                stacklevel=3)
            return False
    return True


def _weights_frame(variant: int, layer: int, heads: list[int], w: Any) -> Any:
    import numpy as np
    import pandas as pd

    n_h, n_q, n_k = w.shape
    h, q, k = np.meshgrid(np.arange(n_h, dtype=np.int16), np.arange(n_q, dtype=np.int32),
                          np.arange(n_k, dtype=np.int32), indexing="ij")
    keep = (k <= q).ravel()  # causal: the upper triangle is all zeros
    n = int(keep.sum())
    return pd.DataFrame({  # (20 bytes a row: these tables get large)
        "variant": np.full(n, variant, dtype=np.int32),
        "layer": np.full(n, layer, dtype=np.int16),
        "head": np.asarray(heads, dtype=np.int16)[h.ravel()[keep]], "query": q.ravel()[keep],
        "key": k.ravel()[keep], "weight": w.numpy().ravel()[keep].astype("float32"),
    })


def _steer_block(mdl: Model, steer: dict[str, Any] | None, tpl: Template) -> Any:
    if steer is None:
        return contextlib.nullcontext(None)
    from promptscope.models.steering import parse_method
    from promptscope.models.steering import steer as _steer

    pasta = "pasta" in parse_method(steer.get("method"), steer.get("vector"))
    if pasta and not tpl.has_emphasis and not steer.get("emphasis"):
        raise PromptscopeError("Steering needs something to emphasise: mark it with <<...>>.")

    return _steer(mdl, **steer)
