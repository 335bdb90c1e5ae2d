"""Local transformers causal LMs (white-box backend).

torch and transformers are imported here only, and this module is imported only when a model is
loaded, so ``import promptscope`` and ``%load_ext promptscope`` stay fast.

Scoring tokenises prompt and continuation separately and concatenates the ids (the convention of
lm-evaluation-harness): the log-prob of ``" yes"`` after a prompt is the same number whichever
other choices it is compared with, and all continuations of a prompt share its tokens exactly,
so the prompt is run once and its KV cache is reused for every continuation.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from promptscope.errors import CapabilityError, ModelLoadError, PromptscopeError
from promptscope.models.base import Generation, Model, ProgressFn, Score, check_generation

#: Tokens (prompt tokens x batch rows) per forward pass, by device type.
_TOKEN_BUDGET = {"cuda": 65536, "mps": 16384, "cpu": 8192}
# Tokens per forward-and-backward (integrated gradients' steps, GCG's gradient): a backward
# keeps every layer's activations, about 5 MB a token on an 8 B model in bf16.
_GRADIENT_BUDGET = {"cuda": 4096, "mps": 2048, "cpu": 4096}


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given, else cuda, then mps, then cpu."""
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """``dtype`` if given (``"bf16"``, ``"float16"``, ...), else bf16 on capable GPUs, else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
               "float": "float32"}
    name = aliases.get(str(dtype), str(dtype))
    result = getattr(torch, name, None)
    if not isinstance(result, torch.dtype):
        raise PromptscopeError(f"Unknown dtype '{dtype}'; use bf16, fp16 or fp32.")
    return result


class HFModel(Model):
    """A transformers causal LM with its tokenizer.

    Example:
        >>> m = HFModel.from_pretrained("path/to/model")          # doctest: +SKIP
        >>> m.score(["Is Paris in Europe? Answer:"], [" yes"])[0].logprob  # doctest: +SKIP
        -0.21
    """

    capabilities = frozenset({"score", "generate", "forward", "attention", "gradients",
                              "hidden_states"})

    def __init__(self, model: Any, tokenizer: Any, name: str, source: str = "") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.source = source or name
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.batch_size: int | None = None  # None: chosen from the token budget
        # The most tokens the model reads when it has a learned position table (GPT-2, OPT);
        # None when its positions have no hard limit (rotary, ALiBi), which still warn once
        # past the context they were trained for.
        self.max_positions = position_limit(model)
        self._trained_context = getattr(text_config(model), "max_position_embeddings", None)
        self._warned_context = False
        self._stop_texts: dict[int, str] = {}  # stop_text's, per token id
        self.steering: Any = None  # an active AttentionSteering (see promptscope.steer)
        self.vector_steering: Any = None  # an active VectorSteering (hooks on the layers)
        self.steered_by: Any = None  # the frame whose `with` block steers: see steer()
        # transformers 5.x renamed forward's ``past_key_values`` to ``cache``; accept both.
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        # Only the positions read need logits: [rows, length, vocabulary] is gigabytes on a
        # GPU batch (65 k tokens x Gemma's 262 k vocabulary: 34 GB in bf16).
        self.keep_logits = ({"logits_to_keep": 1} if "logits_to_keep" in params else {})
        self._attention_layers: list[int] | None = None
        # A model without attention (Mamba) continues its cache one token per call: its
        # multi-token continuations are scored in one pass over prompt + continuation.
        self._attention_free = attention_free(model)
        self._cache_ok: bool | None = None  # see continues_cache_exactly

    @classmethod
    def from_pretrained(
        cls,
        path_or_name: str | os.PathLike,
        *,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> HFModel:
        """Load a causal LM from a local folder or a hub name.

        Args:
            path_or_name: a folder with ``config.json`` and weights, or a hub name.
            device: ``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"cpu"``; default: the best available.
            dtype: ``"bf16"``, ``"fp16"``, ``"fp32"`` or a torch dtype; default: bf16 on capable
                GPUs, fp32 otherwise.
            name: the name shown in tables and saved with sessions (default: the folder name).
            kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (for an image-text
                checkpoint without a causal-LM class, ``AutoModelForImageTextToText``'s), e.g.
                ``device_map="auto"`` to spread a large model over devices (needs accelerate;
                ``device`` is then accelerate's choice).
        """
        from transformers import AutoConfig, AutoTokenizer

        source = str(path_or_name)
        path = Path(source).expanduser()
        looks_local = path.exists() or source.startswith((".", "/", "~"))
        if looks_local:
            if not path.is_dir():
                raise ModelLoadError(f"No model folder at '{source}'. Give a folder that holds "
                                     "config.json and the weights, or a hub name.")
            if not (path / "config.json").exists():
                raise ModelLoadError(
                    f"'{path}' is not a transformers model folder (no config.json). Point to the "
                    "folder that `save_pretrained` wrote."
                )
        elif not _cached_on_disk(source) and not _hub_reachable():
            raise ModelLoadError(
                f"'{source}' is not a local folder, is not in the Hugging Face cache, and the "
                f"model hub ({_hub_endpoint()}) cannot be reached from this machine. Download the "
                "model elsewhere and pass its local folder (or 'organism' for the bundled model)."
            )
        dev = pick_device(device)
        torch_dtype = pick_dtype(dev, dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model_type = AutoConfig.from_pretrained(source).model_type
            model = auto_class(model_type).from_pretrained(source, dtype=torch_dtype, **kwargs)
        except (OSError, ValueError, KeyError) as exc:
            where = f"folder '{path}'" if looks_local else f"hub name '{source}'"
            hint = "" if looks_local else (
                " The model hub may be unreachable from this machine: download the model "
                "elsewhere and pass its local folder."
            )
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
            raise ModelLoadError(
                f"Could not load a causal LM from {where}: {first}.{hint}") from None
        if getattr(model, "hf_device_map", None) is None:  # (device_map=...: placed already)
            model.to(dev)
        return cls(model, tokenizer, name=name or (path.name if looks_local else source),
                   source=str(path.resolve()) if looks_local else source)

    # ------------------------------------------------------------------ facts
    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embedding's device (with ``device_map=...``, the device
        accelerate runs it on, which an offloaded embedding's weights are not on)."""
        embed = self.model.get_input_embeddings()
        runs_on = getattr(getattr(embed, "_hf_hook", None), "execution_device", None)
        return torch.device(runs_on) if runs_on is not None else embed.weight.device

    @property
    def token_budget(self) -> int:
        """The most tokens one inference forward takes (a batch's rows x its length)."""
        return _TOKEN_BUDGET.get(self.device.type, 8192)

    @property
    def gradient_token_budget(self) -> int:
        """The most tokens one forward-and-backward takes (rows x length)."""
        return _GRADIENT_BUDGET.get(self.device.type, 4096)

    @property
    def text_config(self) -> Any:
        """The language model's config (:func:`text_config`)."""
        return text_config(self.model)

    @property
    def attention_layers(self) -> list[int]:
        """The decoder layers whose attention promptscope steers and captures: all of them,
        except in hybrid models, whose linear-attention, convolution or state-space layers
        (Qwen3.5, LFM2, ...) attend through no attention weights.

        Found once, by which layers call the attention function in a two-token forward pass.
        Raises :class:`CapabilityError` for a model without attention (Mamba).
        """
        if self._attention_layers is None:
            from promptscope.models.steering import (
                NO_ATTENTION,
                _Forward,
                forward_context,
                use_promptscope_attention,
            )

            use_promptscope_attention(self.model)
            seen: set[int] = set()
            state = _Forward(capture=lambda layer, weights: seen.add(layer),
                             capture_layers=frozenset(range(self.text_config.num_hidden_layers)))
            ids = torch.tensor([[self.tokenizer.bos_token_id or 0] * 2], device=self.device)
            with forward_context(state), torch.no_grad():
                self.model(input_ids=ids, use_cache=False)
            if not seen and self._attention_free:
                raise CapabilityError(NO_ATTENTION.format(type(self.model).__name__))
            if not seen:  # heads, yet no layer of its own calls them (Zamba2's shared block)
                raise CapabilityError(
                    f"{type(self.model).__name__} has attention heads, but no decoder layer "
                    "calls attention as its own layer (a block shared between layers?), so "
                    "promptscope cannot tell whose attention to steer or capture. Vector "
                    "steering (method='vector') and the black-box analyses work on it.")
            self._attention_layers = sorted(seen)
        return self._attention_layers

    def describe(self) -> dict[str, Any]:
        cfg = self.text_config
        return {
            "name": self.name,
            "backend": type(self).__name__,
            "source": self.source,
            "architecture": type(self.model).__name__,
            "device": str(self.device),
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "layers": getattr(cfg, "num_hidden_layers", None),
            "heads": getattr(cfg, "num_attention_heads", None),
        }

    def require(self, capability: str, analysis: str) -> None:
        """As :meth:`Model.require`; hidden states also need the model uncompiled (they are
        read and steered with hooks, which compiled code skips)."""
        super().require(capability, analysis)
        if capability == "hidden_states":
            from promptscope.models.vectors import check_uncompiled

            check_uncompiled(self.model, analysis)

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end a generation: the generation config's (a chat model may list its
        end-of-turn token there) and the tokenizer's end-of-sequence token."""
        ids = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return list(dict.fromkeys(ids))

    def stop_text(self, token_id: int) -> str:
        """The text of a stop token that scores back as that one token (its special-token
        text, e.g. ``"</s>"``), or ``""`` when the tokenizer would read the text otherwise.
        A response scored with it (POSIX) includes the model's choice to stop there."""
        if token_id not in self._stop_texts:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            same = self.tokenizer(text, add_special_tokens=False)["input_ids"] == [token_id]
            self._stop_texts[token_id] = text if same else ""
        return self._stop_texts[token_id]

    def chat_prompt(self, user_message: str) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise CapabilityError(
                f"Model '{self.name}' has no chat template in its tokenizer; drop --chat "
                "(or set tokenizer.chat_template)."
            )
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
        )

    # ------------------------------------------------------------------ tokenising
    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt, with the tokenizer's special tokens unless already in the text
        (a chat-templated prompt carries its own BOS)."""
        return self.encode(text)["input_ids"]

    def encode(self, text: str, offsets: bool = False) -> Any:
        """Token ids (and, with ``offsets``, character offsets) of ``text``; BOS is added unless
        the text starts with it (a chat-templated prompt)."""
        bos = self.tokenizer.bos_token
        add_special = not (bos and text.startswith(bos))
        enc = self.tokenizer(text, add_special_tokens=add_special,
                             return_offsets_mapping=offsets)
        if not enc["input_ids"]:  # an empty prompt (all of it ablated) on a tokenizer that
            start = self.start_token_id  # adds no BOS: what follows is read after the start
            if start is None:
                raise PromptscopeError("An empty prompt cannot be scored: the tokenizer has "
                                       "neither a BOS nor an EOS token to start from.")
            enc["input_ids"], enc["attention_mask"] = [start], [1]
            if offsets:
                enc["offset_mapping"] = [(0, 0)]
        self.check_length(len(enc["input_ids"]), text)
        return enc

    @property
    def start_token_id(self) -> int | None:
        """The token a text starts after: BOS, else EOS (GPT-2 begins documents with its
        end-of-text token)."""
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def check_length(self, n: int, text: str, extra: str = "",
                     fix: str = "shorten the prompt") -> None:
        """Refuse a prompt of ``n`` tokens (with what ``extra`` names) that would index past
        the model's position table (a bare ``IndexError`` deep in the forward otherwise). Past
        the context a rotary model was trained for (``max_position_embeddings``) it still
        runs, unreliably: that warns, once per model."""
        limit, trained = self.max_positions, self._trained_context
        if limit is not None and n > limit:
            raise PromptscopeError(
                f"A prompt ('{_opening(text)}...') is {n} tokens{extra}; {self.name} reads at "
                f"most {limit} (its learned position table): {fix}.")
        if limit is None and trained and n > trained and not self._warned_context:
            import warnings

            self._warned_context = True
            warnings.warn(f"A prompt ('{_opening(text)}...') is {n} tokens{extra}; {self.name} "
                          f"was trained on at most {trained} (max_position_embeddings): what it "
                          "computes past that is unreliable.", stacklevel=4)

    def _emphasis_flags(self, texts: Sequence[str]) -> list[list[bool]] | None:
        """Per prompt, which tokens are emphasised (None when not steering). (Every scoring and
        generation call starts here, so a steer() block a Ctrl-C cut off is undone first.)"""
        if self.steered_by is not None:
            from promptscope.models.steering import release_stale_steering

            release_stale_steering(self)
        if self.steering is None:
            return None
        from promptscope.models.steering import token_emphasis

        if not self.steering.emphasis and not self.steering.spans \
                and not self.steering.warned_empty:
            self.steering.warned_empty = True
            warn_from_caller("PASTA is on but has nothing to emphasise, so it changes nothing: "
                             "give steer(..., emphasis='the key sentence'), or run a template "
                             "with <<...>> marks through promptscope.run_prompt inside the "
                             "block.")
        flags = []
        for text in texts:
            enc = self.encode(text, offsets=True)
            flags.append(token_emphasis(enc["offset_mapping"], self.steering.spans_for(text),
                                        text))
        return flags

    def forward_state(self, flags: list[list[bool]] | None, rows: list[int], width: int,
                       capture: Any = None, layers: frozenset[int] = frozenset(),
                       extra: int = 0) -> Any:
        """The attention-function state for a left-padded batch of prompts ``rows``: the
        steering key bias (when steering) and the attention capture (when asked)."""
        if flags is None and capture is None:
            return contextlib.nullcontext()
        from promptscope.models.steering import _Forward, forward_context, key_bias

        bias = {}
        if flags is not None:
            emph = torch.zeros((len(rows), width), dtype=torch.bool)
            real = torch.zeros((len(rows), width), dtype=torch.bool)
            for r, u in enumerate(rows):
                n = len(flags[u])
                emph[r, width - n:] = torch.tensor(flags[u], dtype=torch.bool)
                real[r, width - n:] = True
            bias = key_bias(self.steering, emph, real, self.text_config.num_attention_heads,
                            extra, next(self.model.parameters()).dtype, self.device)
        kernel = self.steering.kernel if flags is not None else "sdpa"
        heads = ({layer: torch.tensor(h, device=self.device)
                  for layer, h in self.steering.heads.items()} if flags is not None else {})
        return forward_context(_Forward(key_bias=bias, capture=capture, capture_layers=layers,
                                        kernel=kernel, heads=heads),
                               self.model if bias else None)

    @torch.inference_mode()
    def forward_with_attention(
        self,
        prompts: Sequence[str],
        layers: Sequence[int],
        on_weights: Any,
        progress: ProgressFn | None = None,
    ) -> list[list[str]]:
        """Run each prompt once and hand its attention weights to ``on_weights``.

        Only ``layers`` compute their weights explicitly (the others stay on SDPA), and nothing is
        kept here: ``on_weights(index, layer, weights)`` gets one prompt's ``[H, L, L]`` float32
        tensor (padding removed) and keeps what it needs. Active steering applies. The model
        must be uncompiled (``promptscope.attention`` checks that before a session starts).

        Returns:
            The tokens of each prompt.
        """
        from promptscope.models.steering import use_promptscope_attention

        use_promptscope_attention(self.model)
        ids = [self.encode_prompt(p) for p in prompts]
        flags = self._emphasis_flags(prompts)
        for batch in self._batches([len(x) for x in ids]):
            width = max(len(ids[u]) for u in batch)
            input_ids, mask = self._left_pad([ids[u] for u in batch], width)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)

            def capture(layer: int, weights: torch.Tensor, batch: list[int] = batch,
                        width: int = width) -> None:
                for r, u in enumerate(batch):
                    pad = width - len(ids[u])
                    on_weights(u, layer, weights[r, :, pad:, pad:].float().cpu())

            with self.forward_state(flags, batch, width, capture, frozenset(layers)):
                self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                           use_cache=False, **self.every_position(width))
            if progress:
                progress(len(batch))
        return [self.tokenizer.convert_ids_to_tokens(x) for x in ids]

    def every_position(self, width: int) -> dict[str, Any]:
        """Forward options for a pass that reads every position's states or attention: the
        last logits only, asked by index. (An int ``logits_to_keep`` also lets Gemma 4
        compute its key-sharing layers for the last query alone.)"""
        if not self.keep_logits:
            return {}
        return {"logits_to_keep": torch.tensor([width - 1], device=self.device)}

    def special_flags(self, ids: Sequence[int]) -> list[bool]:
        """Which of ``ids`` are the tokenizer's special tokens (BOS, EOS, pad, chat markers
        added as special tokens)."""
        tok = self.tokenizer
        special = set(tok.all_special_ids) | {
            i for i, t in getattr(tok, "added_tokens_decoder", {}).items() if t.special}
        return [i in special for i in ids]

    def encode_continuation(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise PromptscopeError("A continuation to score is empty; give non-empty text "
                                   "(e.g. --choices ' yes| no').")
        return ids

    def _left_pad(self, rows: list[list[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and attention mask on the model's device."""
        input_ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            input_ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def _batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices grouped into batches of similar length within the token budget."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        budget = self.token_budget
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            cap = self.batch_size or max(1, budget // max(1, lengths[i]))
            if current and len(current) + 1 > cap:
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    # ------------------------------------------------------------------ scoring
    def score(
        self,
        prompts: Sequence[str],
        continuations: Sequence[str],
        progress: ProgressFn | None = None,
    ) -> list[Score]:
        """Teacher-forced log-prob of each continuation after its prompt (natural log).

        Distinct prompts run once each (batched, left-padded); all continuations of a prompt
        reuse its KV cache, and single-token continuations need no second pass at all.
        """
        if len(prompts) != len(continuations):
            raise PromptscopeError("score() needs one continuation per prompt.")
        unique: dict[str, int] = {}
        for p in prompts:
            unique.setdefault(p, len(unique))
        prompt_ids = [self.encode_prompt(p) for p in unique]
        encoded = {c: self.encode_continuation(c) for c in dict.fromkeys(continuations)}
        cont_ids = [encoded[c] for c in continuations]
        for p, c in zip(prompts, cont_ids):  # (the continuation's last token is not read)
            self.check_length(len(prompt_ids[unique[p]]) + len(c) - 1, p,
                              " with its continuation")
        by_prompt: list[list[int]] = [[] for _ in unique]
        for i, p in enumerate(prompts):
            by_prompt[unique[p]].append(i)

        flags = self._emphasis_flags(list(unique))
        # A unit: a prompt and some of its continuations. Each multi-token continuation adds
        # a row over the prompt's cache in the second pass, so a prompt with many of them is
        # split into units that each fit the token budget, and batches count both passes.
        units, costs = [], []
        for u, ids in enumerate(prompt_ids):
            group, cost = [], len(ids)
            for i in by_prompt[u]:
                extra = len(ids) + len(cont_ids[i]) if len(cont_ids[i]) > 1 else 0
                if group and cost + extra > self.token_budget:
                    units.append((u, group))
                    costs.append(cost)
                    group, cost = [], len(ids)
                group.append(i)
                cost += extra
            units.append((u, group))
            costs.append(cost)
        unit_ids = [prompt_ids[u] for u, _ in units]
        unit_conts = [group for _, group in units]
        unit_flags = [flags[u] for u, _ in units] if flags is not None else None
        results: list[Score | None] = [None] * len(prompts)
        for batch in self._batches(costs):
            self._run_adaptive(batch, lambda b: self._score_batch(
                b, unit_ids, cont_ids, unit_conts, results, unit_flags))
            if progress:
                progress(sum(len(unit_conts[u]) for u in batch))
        return results  # type: ignore[return-value]

    def _run_adaptive(self, batch: list[int], fn: Any) -> None:
        """Run ``fn`` on ``batch``; on CUDA out-of-memory split the batch in halves and retry."""
        try:
            fn(batch)
        except torch.cuda.OutOfMemoryError:
            if len(batch) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(batch) // 2
            self.batch_size = max(1, half)
            self._run_adaptive(batch[:half], fn)
            self._run_adaptive(batch[half:], fn)

    @torch.inference_mode()
    def _score_batch(self, batch: list[int], prompt_ids: list[list[int]],
                     cont_ids: list[list[int]], by_prompt: list[list[int]],
                     results: list[Score | None], flags: list[list[bool]] | None) -> None:
        dev = self.device
        lengths = [len(prompt_ids[u]) for u in batch]
        width = max(lengths)
        pad = self.tokenizer.pad_token_id
        input_ids, mask = self._left_pad([prompt_ids[u] for u in batch], width)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        need_cache = any(len(cont_ids[i]) > 1 for u in batch for i in by_prompt[u]) and \
            self.continues_cache_exactly()
        with self.forward_state(flags, batch, width):
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             use_cache=need_cache, **self.keep_logits)
        first = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)

        # Rows of the second pass: every multi-token continuation, over its prompt's cache.
        rows = [(r, i) for r, u in enumerate(batch) for i in by_prompt[u] if len(cont_ids[i]) > 1]
        rest: dict[int, list[float]] = {}
        if rows and not need_cache:
            rest = self._continuations_in_full(rows, batch, prompt_ids, cont_ids)
        elif rows:
            cache = _output_cache(out)
            # reorder_cache (beam search's row selection) also selects the conv / recurrent
            # states of hybrid models' caches; batch_select_indices keeps only keys and values.
            cache.reorder_cache(torch.tensor([r for r, _ in rows], device=dev))
            clen = max(len(cont_ids[i]) for _, i in rows) - 1
            c_ids = torch.full((len(rows), clen), pad, dtype=torch.long)
            c_mask = torch.zeros((len(rows), clen), dtype=torch.long)
            for k, (_, i) in enumerate(rows):
                toks = cont_ids[i][:-1]
                c_ids[k, : len(toks)] = torch.tensor(toks)
                c_mask[k, : len(toks)] = 1
            c_ids, c_mask = c_ids.to(dev), c_mask.to(dev)
            sel = torch.tensor([r for r, _ in rows], device=dev)
            full_mask = torch.cat([mask[sel], c_mask], dim=1)
            c_pos = torch.tensor([lengths[r] for r, _ in rows], device=dev)[:, None] + \
                torch.arange(clen, device=dev)[None, :]
            rows_of = [batch[r] for r, _ in rows]
            with self.forward_state(flags, rows_of, width):
                out2 = self.model(input_ids=c_ids, attention_mask=full_mask, position_ids=c_pos,
                                  use_cache=False, **{self._cache_kwarg: cache})
            logp = torch.log_softmax(out2.logits.float(), dim=-1)
            for k, (_, i) in enumerate(rows):
                targets = torch.tensor(cont_ids[i][1:], device=dev)
                n = len(targets)
                rest[i] = logp[k, torch.arange(n, device=dev), targets].tolist()

        for r, u in enumerate(batch):
            for i in by_prompt[u]:
                toks = cont_ids[i]
                token_lps = [first[r, toks[0]].item()] + rest.get(i, [])
                results[i] = Score(
                    logprob=math.fsum(token_lps),
                    token_logprobs=token_lps,
                    tokens=self.tokenizer.convert_ids_to_tokens(toks),
                    prompt_tokens=lengths[r],
                )

    def continues_cache_exactly(self) -> bool:
        """Whether a multi-token pass over a prompt's cache gives the log-probs one pass over
        prompt + continuation gives; checked once per model on a short text. Not so without
        attention (Mamba continues one token per call), for RecurrentGemma (its output has no
        cache) and for Jamba's CPU path; their continuations are scored in one full pass
        (the same numbers, the prompt computed again)."""
        if self._cache_ok is None:
            self._cache_ok = not self._attention_free and self._cache_check()
        return self._cache_ok

    @torch.inference_mode()
    def _cache_check(self) -> bool:
        ids = self.encode_prompt("Checking the cache: one, two, three, four, five.")[:12]
        if len(ids) < 4:
            return False
        cut = len(ids) - 3
        x = torch.tensor([ids], device=self.device)
        vector = self.vector_steering
        enabled = vector is not None and vector.enabled
        if vector is not None:
            vector.enabled = False  # (a check inside a steer block: the model itself)
        try:
            whole = self.model(input_ids=x, attention_mask=torch.ones_like(x),
                               use_cache=False).logits[0, cut:]
            head = self.model(input_ids=x[:, :cut], attention_mask=torch.ones_like(x[:, :cut]),
                              use_cache=True)
            tail = self.model(input_ids=x[:, cut:], attention_mask=torch.ones_like(x),
                              position_ids=torch.arange(cut, len(ids), device=self.device)[None],
                              use_cache=False, **{self._cache_kwarg: _output_cache(head)})
        except (AttributeError, TypeError, ValueError, RuntimeError):
            return False  # no cache to continue, or one that takes no multi-token pass
        finally:
            if vector is not None:
                vector.enabled = enabled
        a, b = (torch.log_softmax(t.float(), dim=-1) for t in (whole, tail.logits[0]))
        # 16-bit weights differ between the two orders of summation by far more than fp32
        tol = 1e-3 if next(self.model.parameters()).dtype == torch.float32 else 0.25
        return bool((a - b).abs().max() <= tol)

    def _continuations_in_full(self, rows: list[tuple[int, int]], batch: list[int],
                               prompt_ids: list[list[int]], cont_ids: list[list[int]]
                               ) -> dict[int, list[float]]:
        """Log-probs of the 2nd.. tokens of each row's continuation from one left-padded pass
        over prompt + continuation, no cache: ``{continuation index: [log-probs]}``."""
        seqs = [prompt_ids[batch[r]] + cont_ids[i][:-1] for r, i in rows]
        width = max(map(len, seqs))
        input_ids, mask = self._left_pad(seqs, width)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # A steering vector with start="last" steers from each prompt's last token on, as it
        # does when the continuation comes in a pass of its own over the cache.
        vector = getattr(self, "vector_steering", None)
        if vector is not None:
            vector.from_index = [width - len(s) + len(prompt_ids[batch[r]]) - 1
                                 for s, (r, _) in zip(seqs, rows)]
        try:
            logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                use_cache=False).logits  # (no attention: no PASTA state to set)
        finally:
            if vector is not None:
                vector.from_index = None
        rest = {}
        for k, (_, i) in enumerate(rows):
            targets = torch.tensor(cont_ids[i][1:], device=logits.device)
            n = len(targets)  # predicted by the last n positions (left padding)
            logp = torch.log_softmax(logits[k, width - n:].float(), dim=-1)
            rest[i] = logp[torch.arange(n, device=logits.device), targets].tolist()
        return rest

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        n: int = 1,
        seed: int | None = 0,
        progress: ProgressFn | None = None,
    ) -> list[list[Generation]]:
        """``n`` samples per prompt; greedy when ``temperature == 0``. Batched, left-padded.

        ``logprob`` is the model's own (untempered) log-probability of the generated tokens.
        """
        check_generation(max_new_tokens, n, temperature, top_p)
        if seed is not None:
            torch.manual_seed(seed)
        ids = [self.encode_prompt(p) for p in prompts]
        for x, p in zip(ids, prompts):  # (the last new token is not read back)
            self.check_length(len(x) + max_new_tokens - 1, p,
                              f" with the {max_new_tokens - 1} new tokens it reads back",
                              f"shorten the prompt or lower max_new_tokens (now "
                              f"{max_new_tokens})")
        flags = self._emphasis_flags(prompts)
        results: list[list[Generation] | None] = [None] * len(prompts)
        budget_len = [len(x) + max_new_tokens for x in ids]
        for batch in self._batches([b * n for b in budget_len]):
            self._run_adaptive(batch, lambda b: self._generate_batch(
                b, ids, results, max_new_tokens, temperature, top_p, n, flags))
            if progress:
                progress(len(batch))
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_batch(self, batch: list[int], ids: list[list[int]],
                        results: list[list[Generation] | None], max_new_tokens: int,
                        temperature: float, top_p: float, n: int,
                        flags: list[list[bool]] | None) -> None:
        tok = self.tokenizer
        width = max(len(ids[u]) for u in batch)
        input_ids, mask = self._left_pad([ids[u] for u in batch], width)
        sample = temperature > 0
        # generate() expands the batch n times (row-major), so the steering rows repeat too.
        with self.forward_state(flags, [u for u in batch for _ in range(n)], width,
                                 extra=max_new_tokens):
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=sample,
                temperature=temperature if sample else None,
                top_p=top_p if sample else None,
                top_k=None,
                # The model's own distribution: a checkpoint's generation_config may ask for
                # processors that would change which tokens greedy decoding picks.
                repetition_penalty=None, no_repeat_ngram_size=None, min_p=None, typical_p=None,
                min_new_tokens=None, min_length=None,
                num_return_sequences=n,
                pad_token_id=tok.pad_token_id,
                eos_token_id=self.stop_ids or None,
                return_dict_in_generate=True,
                output_logits=True,
                # transformers compiles the decoding step for static caches on a GPU; compiled
                # code skips forward hooks added after compiling, so steer it uncompiled.
                **({"disable_compile": True} if self.vector_steering is not None else {}),
            )
        new = out.sequences[:, width:]
        logp = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)
        chosen = logp.gather(-1, new[:, : logp.shape[1], None])[..., 0]
        stops = set(self.stop_ids)
        for r, u in enumerate(batch):
            samples = []
            for s in range(n):
                row = r * n + s
                toks = new[row].tolist()
                stop = next((k for k, t in enumerate(toks) if t in stops), None)
                kept = toks[:stop] if stop is not None else toks
                counted = len(kept) + (1 if stop is not None else 0)
                samples.append(Generation(
                    text=tok.decode(kept, skip_special_tokens=True),
                    tokens=tok.convert_ids_to_tokens(kept),
                    logprob=float(chosen[row, :counted].sum()),
                    prompt_tokens=len(ids[u]),
                    finish_reason="stop" if stop is not None else "length",
                    extra={"stop": self.stop_text(toks[stop])} if stop is not None else {},
                ))
            results[u] = samples


def warn_from_caller(message: str) -> None:
    """A UserWarning shown at the first frame outside promptscope, every time it is asked for
    (the caller decides how often): ``warnings.warn`` shows a message once per code location,
    and inside a notebook that location is IPython's, the same for every cell."""
    import sys
    import warnings

    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith(
            "promptscope"):
        frame = frame.f_back
    warnings.warn_explicit(message, UserWarning, frame.f_code.co_filename, frame.f_lineno,
                           module=frame.f_globals.get("__name__"))


def forward_inputs(args: tuple, kwargs: dict) -> tuple[Any, Any, Any]:
    """``(ids or embeddings, attention_mask, cache)`` of a model call, as a forward pre-hook
    (``with_kwargs=True``) sees it; each may be None."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5 / 4
    return ids, kwargs.get("attention_mask"), cache


def auto_class(model_type: str) -> Any:
    """``AutoModelForCausalLM``, or for an image-text checkpoint that has no causal-LM class
    (Mistral 3, Qwen2.5-VL, LLaVA, ...) ``AutoModelForImageTextToText``: it takes text alone
    as well, and its language model is what promptscope reads and steers."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    if (model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES):
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def text_config(lm: Any) -> Any:
    """The config that describes a transformers model's language model: its own, or for a
    multimodal checkpoint loaded as a causal LM (Gemma 3 4B+, Mistral 3, ...) the text
    sub-config, where ``num_hidden_layers`` and ``num_attention_heads`` live."""
    get = getattr(lm.config, "get_text_config", None)
    return get() if get is not None else lm.config


def attention_free(lm: Any) -> bool:
    """Whether a transformers model has no attention at all (Mamba): no attention heads in its
    config."""
    return getattr(text_config(lm), "num_attention_heads", None) is None


def weight_of(module: Any, name: str = "weight") -> torch.Tensor:
    """``module``'s parameter ``name`` on the device the module runs on, also when accelerate
    offloaded it (``device_map=...`` with ``"cpu"`` or ``"disk"`` entries), where the
    parameter itself is an empty ``meta`` tensor between forwards. For code that reads weights
    instead of calling the module (the reach bound's singular values, GCG's one-hot product).

    Example:
        >>> w = weight_of(model.model.get_input_embeddings())   # [vocab, hidden]  # doctest: +SKIP
    """
    hook = getattr(module, "_hf_hook", None)
    if not getattr(hook, "offload", False):  # (not placed by accelerate, or not offloaded)
        return getattr(module, name)
    hook.pre_forward(module)  # accelerate's own onloading, as around a forward
    try:
        return getattr(module, name)  # (stays valid: offloading swaps in a new tensor)
    finally:
        hook.post_forward(module, None)


def linear_weight(linear: Any, dtype: torch.dtype) -> torch.Tensor:
    """The ``[out, in]`` matrix a linear layer applies, however it is stored: plain, offloaded
    by accelerate (:func:`weight_of`), or quantized (bitsandbytes' 4- and 8-bit, FP8 with a
    scale, GPTQ / AWQ layers without a ``weight``): then it is read off the layer's own forward
    on the identity, in ``dtype`` (its bias taken off), so it is the matrix the model really
    computes with.

    Example:
        >>> wq = linear_weight(model.model.model.layers[0].self_attn.q_proj, torch.bfloat16)
        ...                                                                # doctest: +SKIP
    """
    w = weight_of(linear) if isinstance(getattr(linear, "weight", None), torch.Tensor) else None
    if w is not None and w.dtype in _PLAIN and tuple(w.shape) == linear_shape(linear):
        return w
    n_in = linear_shape(linear)[1]
    if n_in is None:
        raise PromptscopeError(f"Cannot read the matrix of {type(linear).__name__}: it says "
                               "nothing of its input size (in_features).")
    runs_on = getattr(getattr(linear, "_hf_hook", None), "execution_device", None)
    if runs_on is None:
        runs_on = next(iter([*linear.parameters(), *linear.buffers()])).device
    with torch.no_grad():
        out = linear(torch.eye(n_in, dtype=dtype, device=runs_on))
        bias = getattr(linear, "bias", None)
        return (out - bias if isinstance(bias, torch.Tensor) else out).T


_PLAIN = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def linear_shape(linear: Any) -> tuple[int | None, int | None]:
    """``(out_features, in_features)`` of a linear layer, plain or quantized (whose packed
    ``weight`` has another shape; AutoGPTQ spells them ``outfeatures`` / ``infeatures``)."""
    return (getattr(linear, "out_features", None) or getattr(linear, "outfeatures", None),
            getattr(linear, "in_features", None) or getattr(linear, "infeatures", None))


def _opening(text: str) -> str:
    """The start of a prompt, to name it in a message."""
    return text[:40].replace("\n", " ")


def position_limit(lm: Any) -> int | None:
    """How many positions a model with a learned position table reads (GPT-2's ``wpe``, OPT's
    ``embed_positions``, ...): a longer input indexes past the table. ``None`` for rotary,
    ALiBi and other positions computed on the fly, which have no hard limit."""
    embed = lm.get_input_embeddings()
    # the table sits beside the token embedding (a vision tower's own positions do not count)
    owner = next((m for m in lm.modules() if embed in m.children()), None)
    for name, module in (owner.named_children() if owner is not None else ()):
        if isinstance(module, torch.nn.Embedding) and name in _POSITION_TABLES:
            return int(module.num_embeddings) - int(getattr(module, "offset", 0) or 0)
    return None


#: Names of learned absolute position tables (GPT-2 and GPT-Neo ``wpe``, OPT, BioGPT...).
_POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")


def per_layer_embedding(lm: Any) -> Any:
    """The second table a model looks token ids up in, if it has one: Gemma 3n's and 4's
    per-layer embeddings (``embed_tokens_per_layer``), else ``None``. Whatever feeds the model
    embeddings instead of ids (GCG's one-hot, integrated gradients) must take it along."""
    for name, module in lm.named_modules():
        if name.endswith("embed_tokens_per_layer"):
            return module
    return None


def _output_cache(out: Any) -> Any:
    """The KV cache of a forward output (``cache`` in transformers 5, else ``past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _cached_on_disk(name: str) -> bool:
    """Whether the hub cache already holds this model's config (loads with no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # an invalid repo id, an old huggingface_hub: let transformers decide
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so an offline machine fails in seconds rather than after retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(_hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False
