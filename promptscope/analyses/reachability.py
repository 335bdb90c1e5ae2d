"""Controllability: which next tokens can a short control prompt force? ("What's the Magic Word?
A Control Theory of LLM Prompting", Bhargava et al.)

For an initial state ``x0`` (text) and a target next token ``y``, a control prompt ``u`` of at most
``k`` tokens *reaches* ``y`` when ``y`` is the argmax next token after ``u + x0`` (``u`` is
prepended to ``x0``; a BOS token, when the tokenizer adds one, stays first: ``BOS u x0``).

Searchers, both batched over (x0, y) pairs and over candidates:

* **greedy back-generation** builds ``u`` right to left, one token at a time, each time prepending
  the token that most raises ``log P(y | u + x0)`` over the whole allowed vocabulary. Its first
  step is shared by every target of one ``x0`` (one pass over the vocabulary serves them all), so
  with ``k = 1`` it is an exhaustive search.
* **greedy coordinate gradient (GCG)** keeps ``k`` control tokens, takes the gradient of the
  target's cross-entropy with respect to the one-hot control tokens, samples ``search_width``
  single-token swaps among the ``top_k`` most promising tokens per position, evaluates them all
  in batched forward passes and moves to the best. ``k = 1`` is searched exhaustively (it costs
  one pass over the vocabulary per ``x0``); longer prompts warm-start from the best prompt one
  token shorter.

Every claimed success is re-verified with a plain, unbatched forward pass on the token ids before
it is reported. Control prompts are token sequences: ``control`` is their decoded text, and
``text_roundtrip`` says whether tokenising ``control + x0`` gives the same ids back.
"""

from __future__ import annotations

import math
import numbers
import random
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from promptscope.analyses._recorder import Recorder
from promptscope.errors import PromptscopeError
from promptscope.models import resolve_model
from promptscope.models.base import Model
from promptscope.result import Result
from promptscope.store import Store

KIND = "reachability"
METHODS = ("gcg", "greedy", "both")
#: The paper's headline: the correct next Wikitext token is reachable with k <= 10 for > 97 % of
#: initial states (Falcon-7b, Llama-7b, Falcon-40b).
PAPER_HEADLINE = {"k": 10, "fraction": 0.97, "target_set": "true"}
_SET_SPEC = re.compile(r"^(true|top:\d+|random:\d+|bottom:\d+)$")
#: Tokens per forward pass on each device type (rows x sequence length).
_TOKEN_BUDGET = {"cuda": 131072, "mps": 32768, "cpu": 16384}


class ReachabilityError(PromptscopeError):
    """A reachability request that cannot run as given (the message says what to change)."""


@dataclass
class _Pair:
    """One (x0, y) search problem and its outcome."""

    index: int
    state: int
    target: int
    target_set: str
    base_prob: float = 0.0
    base_rank: int = 0
    reached: bool = False
    k: int | None = None
    control: list[int] = field(default_factory=list)
    prob: float = 0.0
    rank: int = 0
    steps: int = 0
    method: str = ""
    best_loss: float = math.inf
    best: list[int] = field(default_factory=list)
    best_by_k: dict[int, list[int]] = field(default_factory=dict)
    loss_by_k: dict[int, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    done: bool = False
    #: Other target sets that asked for this same (x0, y): searched once, reported in each.
    also: list[str] = field(default_factory=list)

    def keep(self, k: int, u: list[int], loss: float) -> None:
        """Remember the best control prompt of length ``k`` (warm start for longer ones)."""
        if loss < self.loss_by_k.get(k, math.inf):
            self.loss_by_k[k], self.best_by_k[k] = loss, list(u)


# --------------------------------------------------------------------------- public API
def reachability(
    model: Model | str | None,
    x0s: str | Sequence[Any],
    targets: Any = "top:10",
    *,
    k_max: int = 4,
    k_min: int = 1,
    method: str | None = None,
    steps: int = 32,
    search_width: int = 128,
    top_k: int = 64,
    control_tokens: Sequence[int] | None = None,
    init_control: Sequence[int] | None = None,
    exhaustive_k1: bool = True,
    bound: bool = True,
    seed: int = 0,
    name: str = "",
    save: bool = True,
    store: Store | None = None,
    progress: bool = True,
    on_pair: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Result:
    """Search control prompts ``u`` (at most ``k_max`` tokens, prepended to each ``x0``) that make
    each target the model's most likely next token.

    Args:
        model: a local transformers model, or an API model whose completions endpoint echoes
            prompt log-probs for token-id prompts (vLLM) with ``method="greedy"``: the same
            search on the same token ids, each candidate scored by the server (the served
            model's tokenizer is loaded here for the vocabulary; ``targets="bottom:N"`` and
            ``top:N`` beyond the server's top log-probs need the full distribution).
        x0s: an initial state (text), a list of them, or ``(text, true_next)`` pairs (the true next
            token as text or id, e.g. from :func:`heldout_states`) for ``targets="true"``.
        targets: what to reach after each ``x0``: ``"true"`` (the true next token), ``"top:N"``
            (the model's N most likely next tokens), ``"random:N"`` (N uniformly random tokens),
            ``"bottom:N"`` (the N least likely), single-token strings or token ids, a ``"|"``
            separated string of them, a list mixing all of these, or a list of such lists (one
            per x0, for pairs with their own targets). Generated sets leave out
            special tokens. A target must be one token (multi-token targets are an error).
        k_max: the longest control prompt tried (>= 1). ``k = 0`` means the target already is the
            argmax without control.
        k_min: the shortest control prompt tried (default 1; the benchmark fixes ``k``).
        method: ``"gcg"`` (default on local models), ``"greedy"`` (back-generation; default
            and the only one on API models) or ``"both"`` (greedy first, then GCG on what greedy
            did not reach, warm-started from greedy's prompts).
        steps: GCG iterations per prompt length.
        search_width: GCG candidates (single-token swaps) evaluated per pair and iteration.
        top_k: GCG tokens per position taken from the gradient.
        control_tokens: the token ids ``u`` may use (default: every non-special token).
        init_control: GCG's starting control tokens at length ``k_min`` (default: ``"!"``
            repeated); longer lengths warm-start from the best prompt one token shorter.
        exhaustive_k1: with GCG, search ``k = 1`` by trying every allowed token (one pass over the
            vocabulary per ``x0`` serves all its targets).
        bound: also compute the paper's singular-value bound per attention layer (llama-style
            attention only; table ``bound`` of the result).
        seed: seeds random target sets and GCG's candidate sampling.
        on_pair: called with each finished pair's row (widgets use it for live progress).
        should_stop: polled between steps; when it returns True the run stops like an interrupt
            (status ``interrupted``; every pair is listed, unfinished ones with
            ``complete=False``).

    Returns:
        A Result of kind ``reachability``: one row per (x0, y) and target set (a pair two sets
        ask for is searched once and listed in each) with ``reached``, ``k`` (smallest
        found), ``control`` (text), ``control_ids``, ``prob`` and ``rank`` of ``y`` after the
        control prompt (rank 1 = argmax), the same without control (``base_prob``,
        ``base_rank``), ``steps``, ``method``, ``time_s`` and ``complete``; table ``trace``
        holds loss, probability and rank of the target at every step; table ``bound`` the
        analytic bound.

    Example:
        >>> model = promptscope.load_model("organism")                        # doctest: +SKIP
        >>> run = promptscope.reachability(model, ["tike vonu save"], "top:10",
        ...                                k_max=3)                            # doctest: +SKIP
        >>> run.summary(); run.figure()                                        # doctest: +SKIP
    """
    import pandas as pd
    import torch
    from tqdm.auto import tqdm

    mdl = resolve_model(model)
    white = "gradients" in mdl.capabilities
    method = method or ("gcg" if white else "greedy")
    if method in ("gcg", "both"):
        mdl.require("gradients", f"Reachability by GCG (method={method!r}; method='greedy' "
                    "needs only log-probs)")
    elif not white:
        mdl.require("token_logprobs", "Reachability (control-prompt search)")
    if not white:
        mdl.begin_run("generate", False)  # an API model: reset its request tally
    if not isinstance(k_max, int) or k_max < 1:
        raise ReachabilityError(f"k_max={k_max!r}: the longest control prompt must be at least "
                                "1 token (k = 0 is always checked).")
    if not isinstance(k_min, int) or not 1 <= k_min <= k_max:
        raise ReachabilityError(f"k_min={k_min!r} must be between 1 and k_max={k_max}.")
    if method not in METHODS:
        raise ReachabilityError(f"method={method!r}: use one of {', '.join(METHODS)}.")
    if init_control is not None and len(init_control) != k_min:
        raise ReachabilityError(f"init_control has {len(init_control)} tokens; it starts the "
                                f"search at k_min={k_min}, so give {k_min}.")
    if steps < 1 or search_width < 1 or top_k < 1:
        raise ReachabilityError("steps, search_width and top_k must each be at least 1.")

    search = (_Search if white else _EndpointSearch)(mdl, control_tokens, seed)
    init_control = _python(init_control)
    if init_control is not None:
        allowed = set(search.allowed.tolist())
        if method == "greedy":
            raise ReachabilityError("init_control starts GCG's search; method='greedy' builds "
                                    "its controls token by token: drop init_control, or use "
                                    "method='gcg' or 'both'.")
        if not all(isinstance(t, numbers.Integral) and int(t) in allowed for t in init_control):
            raise ReachabilityError(f"init_control {list(init_control)!r} has ids that are not "
                                    "control tokens (the vocabulary's non-special tokens, or "
                                    "control_tokens=).")
    states, true_next = search.parse_states(x0s)
    if white:  # x0 with k_max control tokens must fit a learned position table (GPT-2's)
        for text, prefix, body in zip(states, search.prefix, search.body):
            mdl.check_length(len(prefix) + k_max + len(body), text,  # type: ignore[attr-defined]
                             f" with {k_max} control tokens", "lower k_max or shorten x0")
    base = search.base_logits(states)
    pairs = search.resolve_targets(targets, states, true_next, base)
    if not pairs:
        raise ReachabilityError("No (x0, target) pairs to search: give at least one x0 and one "
                                "target.")
    texts = [search.state_text[s] for s in range(len(states))]
    params = {
        "x0s": texts, "targets": _jsonable(targets), "k_max": k_max, "k_min": k_min,
        "method": method, "steps": steps, "search_width": search_width, "top_k": top_k,
        "exhaustive_k1": exhaustive_k1, "seed": seed, "n_pairs": len(pairs),
        "n_control_tokens": int(search.allowed.numel()),
        "custom_control_tokens": control_tokens is not None,
        "paper_headline": PAPER_HEADLINE,
    }
    bound_df = None
    if bound and not white:
        params["bound_skipped"] = "the bound needs the model's weights (an API model)"
    elif bound:
        from promptscope.analyses.reach_bound import BoundUnsupported, attention_bound

        try:
            bound_df = attention_bound(mdl, texts, k=sorted({1, k_max}),
                                       control_tokens=search.allowed.tolist())
        except BoundUnsupported as exc:
            params["bound_skipped"] = str(exc)
        except Exception as exc:  # the bound is a side table: never let it stop the search
            params["bound_skipped"] = f"the bound failed ({type(exc).__name__}: {exc})"
            warnings.warn(f"Reachability: {params['bound_skipped']}; searching without it "
                          "(bound=False skips it).", stacklevel=2)
    source = "\n".join(texts)
    bar = tqdm(total=len(pairs), disable=not progress, desc="reachability", unit="pair",
               leave=False)
    rows_pending: list[dict[str, Any]] = []
    trace_pending: list[dict[str, Any]] = []
    search.trace = trace_pending
    search.should_stop = should_stop
    t0 = time.perf_counter()

    def finish(pair: _Pair, method_name: str) -> None:
        if pair.done:
            return
        pair.method = method_name if pair.reached else method
        row = {**search.row(pair), "complete": True}
        rows = [{**row, "target_set": s} for s in [pair.target_set, *pair.also]]
        # Marked done only with its rows in hand: a Ctrl-C before this leaves the pair to the
        # "stopped" rows below, not out of the result.
        pair.done = True
        rows_pending.extend(rows)
        bar.update(1)
        if pair.reached:
            bar.set_postfix(reached=sum(p.reached for p in pairs))
        if on_pair is not None:
            on_pair(row)

    def flush(rec: Recorder) -> None:
        if rows_pending:
            rec.add(pd.DataFrame(rows_pending))
            rows_pending.clear()
        if trace_pending:
            rec.add(pd.DataFrame(trace_pending), table="trace")
            trace_pending.clear()

    def wrap_up(rec: Recorder) -> None:
        # A stopped or failed run still lists every pair: one it did not finish counts as
        # not reached (so far), so k-epsilon stays honest (a lower bound on reached).
        for p in pairs:
            if not p.done:
                p.method = "stopped"
                row = {**search.row(p), "complete": False}
                rows = [{**row, "target_set": s} for s in [p.target_set, *p.also]]
                p.done = True
                rows_pending.extend(rows)
        rec.params["time_s"] = round(time.perf_counter() - t0, 3)
        rec.params["unverified_claims"] = search.unverified
        flush(rec)
        bar.close()

    with Recorder(KIND, name=name, model=mdl, params=params, source=source, save=save,
                  store=store) as rec:
        try:
            if bound_df is not None:
                rec.add(bound_df, table="bound")
            # k = 0: the target already is the argmax.
            for p in pairs:
                if p.base_rank == 1:
                    p.reached, p.k, p.prob, p.rank = True, 0, p.base_prob, 1
                    finish(p, "none")
            flush(rec)
            with torch.enable_grad():
                if method in ("greedy", "both"):
                    search.greedy(pairs, k_min, k_max, lambda p: finish(p, "greedy"),
                                  lambda: flush(rec))
                if method == "greedy":
                    for p in pairs:
                        finish(p, "greedy")
                else:
                    if init_control is not None:
                        search.init_control = [int(t) for t in init_control]
                    # after greedy, k = 1 was already exhaustive: GCG starts at 2
                    start = max(k_min, 2) if method == "both" else k_min
                    search.gcg(pairs, start, k_max, steps, search_width, top_k, exhaustive_k1,
                               warm=method == "both", on_reached=lambda p: finish(p, "gcg"),
                               on_level=lambda: flush(rec))
                    for p in pairs:
                        finish(p, "gcg")
        finally:
            try:
                wrap_up(rec)
            except KeyboardInterrupt:  # (another) Ctrl-C as it began: it is safe to redo
                wrap_up(rec)
                raise
        rec.save_run_info(mdl, verbose=progress)
    return rec.result()


def heldout_states(model: Model | str | None, texts: Sequence[str], n: int = 20, *,
                   min_tokens: int = 4, max_tokens: int = 16,
                   seed: int = 0) -> list[tuple[str, int]]:
    """Cut held-out texts into ``(x0, true next token id)`` pairs for ``targets="true"``.

    Each pair is a random cut of a random text at a token boundary, with ``min_tokens`` to
    ``max_tokens`` tokens before the cut; cuts whose prefix does not tokenise back to the same ids
    are skipped.

    Example:
        >>> from promptscope.organism import grammar  # doctest: +SKIP
        >>> texts = [grammar.text(random.Random(i)) for i in range(50)]       # doctest: +SKIP
        >>> states = heldout_states(model, texts, n=20)                        # doctest: +SKIP
        >>> promptscope.reachability(model, states, "true", k_max=4)           # doctest: +SKIP
    """
    mdl = resolve_model(model)
    tok = mdl.tokenizer  # type: ignore[attr-defined]
    rng = random.Random(seed)
    out: list[tuple[str, int]] = []
    pool = [t for t in texts if t]
    tries = 0
    while len(out) < n and pool and tries < 50 * n:
        tries += 1
        ids = tok(rng.choice(pool), add_special_tokens=False)["input_ids"]
        if len(ids) <= min_tokens:
            continue
        cut = rng.randint(min_tokens, min(max_tokens, len(ids) - 1))
        x0 = tok.decode(ids[:cut])
        if tok(x0, add_special_tokens=False)["input_ids"] != ids[:cut]:
            continue
        if (x0, ids[cut]) not in out:
            out.append((x0, ids[cut]))
    return out


def next_tokens(model: Model | str | None, x0: str, control_ids: Sequence[int] = (), *,
                top: int | None = None) -> Any:
    """The next-token distribution after ``control + x0`` (``BOS u x0``, as the search builds
    it): a DataFrame of ``token``, ``token_id``, ``prob``, ``rank``, most likely first.

    Example:
        >>> next_tokens(model, "tike lara", top=10)                             # doctest: +SKIP
    """
    import pandas as pd
    import torch

    search = _Search(resolve_model(model), None, 0)
    search.parse_states([x0])
    probs = torch.softmax(search.plain_logits(search.seq(0, list(control_ids))), -1)
    order = torch.argsort(probs, descending=True)
    if top is not None:
        order = order[:top]
    ids = order.tolist()
    return pd.DataFrame({"token": [search.tok.decode([i]) for i in ids], "token_id": ids,
                         "prob": probs[order].tolist(), "rank": range(1, len(ids) + 1)})


def k_epsilon(df: Any, k_max: int | None = None, k_min: int | None = None) -> Any:
    """The k-epsilon table: per target set and k, the fraction of pairs reached with a control
    prompt of at most k tokens (``1 - epsilon``). A run that searched from ``k_min`` on
    (``run.params["k_min"]``) did not try the lengths between 0 and ``k_min``: NaN there.

    ``df`` is a reachability Result (its ``k_max`` and ``k_min`` then come from the run) or
    its rows (then give them: without ``k_max`` the table stops at the longest control found).

    Example:
        >>> k_epsilon(run)                                                       # doctest: +SKIP
    """
    import pandas as pd

    if hasattr(df, "params") and hasattr(df, "df"):  # a Result
        k_max = k_max if k_max is not None else df.params.get("k_max")
        k_min = k_min if k_min is not None else df.params.get("k_min")
        df = df.df
    k_min = int(k_min or 1)

    ks = pd.to_numeric(df["k"], errors="coerce")
    top = int(k_max if k_max is not None else (ks.max() if ks.notna().any() else 1))
    rows = []
    for tset, g in df.groupby("target_set", sort=False):
        gk = ks[g.index]
        for k in range(0, top + 1):
            frac = (math.nan if 0 < k < k_min
                    else float((g["reached"].astype(bool) & (gk <= k)).mean()))
            rows.append({"target_set": tset, "k": k, "reached": frac, "epsilon": 1 - frac,
                         "n": len(g)})
    return pd.DataFrame(rows)


def _rank(logits: Any, targets: Any) -> Any:
    """Rank (1 = the argmax) of each ``targets[i, j]`` in ``logits[i]``, in the order argmax
    uses: higher logits first, ties to the lower token id, so exactly one token has rank 1.
    Never a ``[rows, targets, vocab]`` tensor: a few targets are compared one column at a
    time; many (thousands of targets of one x0 took a kernel past 24 GB that way, one
    ``[rows, vocab]`` temporary after another) are looked up in one stable sort per row."""
    import torch

    if targets.shape[1] > 8:
        order = torch.sort(-logits, dim=-1, stable=True).indices  # ties: the lower id first
        place = torch.empty_like(order)
        place.scatter_(1, order, torch.arange(logits.shape[-1], device=logits.device)
                       .expand_as(order))
        return place.gather(1, targets) + 1
    ids = torch.arange(logits.shape[-1], device=logits.device)
    cols = []
    for j in range(targets.shape[1]):
        tid = targets[:, j:j + 1]
        ty = logits.gather(1, tid)
        ahead = (logits > ty) | ((logits == ty) & (ids < tid))
        cols.append(ahead.sum(-1) + 1)
    return torch.stack(cols, 1)


# --------------------------------------------------------------------------- search engine
class _Search:
    """The batched searchers over one model; all work is on token ids."""

    def __init__(self, mdl: Model, control_tokens: Sequence[int] | None, seed: int) -> None:
        import torch

        self.mdl = mdl
        self.tok = mdl.tokenizer  # type: ignore[attr-defined]
        # an API model has no weights here: the vocabulary is its tokenizer's
        self.lm = mdl.model if "forward" in mdl.capabilities else None  # type: ignore[attr-defined]
        self.device = mdl.device if self.lm is not None else torch.device("cpu")  # type: ignore[attr-defined]
        self.embed = self.lm.get_input_embeddings() if self.lm is not None else None
        self.vocab = int(self.embed.weight.shape[0]) if self.embed is not None else len(self.tok)
        specials = set(self.tok.all_special_ids)
        n_tok = min(len(self.tok), self.vocab)
        if control_tokens is None:
            allowed = [i for i in range(n_tok) if i not in specials]
        else:
            allowed = sorted({int(i) for i in control_tokens})
            bad = [i for i in allowed if not 0 <= i < self.vocab]
            if bad:
                raise ReachabilityError(f"control_tokens has ids outside the vocabulary "
                                        f"(0..{self.vocab - 1}): {bad[:5]}.")
        if not allowed:
            raise ReachabilityError("No control tokens allowed; pass control_tokens with at "
                                    "least one token id.")
        self.allowed = torch.tensor(allowed, dtype=torch.long)
        self.allowed_mask = torch.zeros(self.vocab, dtype=torch.bool)
        self.allowed_mask[self.allowed] = True
        self.targetable = [i for i in range(n_tok) if i not in specials]
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.prefix: list[list[int]] = []
        self.body: list[list[int]] = []
        self.state_text: list[str] = []
        self.trace: list[dict[str, Any]] = []
        self.should_stop: Callable[[], bool] | None = None
        self.unverified = 0
        self.init_control: list[int] | None = None
        self.budget = _TOKEN_BUDGET.get(self.device.type, 16384)

    # ------------------------------------------------------------------ inputs
    def parse_states(self, x0s: Any) -> tuple[list[str], list[int | None]]:
        if isinstance(x0s, str):
            x0s = [x0s]
        elif isinstance(x0s, tuple) and len(x0s) == 2 and isinstance(x0s[0], str) \
                and isinstance(x0s[1], int):
            x0s = [x0s]  # one (text, next token id) pair
        elif isinstance(x0s, tuple):
            raise ReachabilityError(f"Cannot read x0s {x0s!r}: give a list of texts or of "
                                    "(text, true next token) pairs, e.g. [(text, next)].")
        states: list[str] = []
        true_next: list[int | None] = []
        for item in x0s:
            if isinstance(item, str):
                text, nxt = item, None
            elif isinstance(item, (tuple, list)) and len(item) == 2:
                text, nxt = item[0], self.token_id(item[1], "true next token")
            else:
                raise ReachabilityError(f"Cannot read x0 {item!r}: give a text or a "
                                        "(text, true next token) pair.")
            ids = self.mdl.encode_prompt(text)  # type: ignore[attr-defined]
            bos = self.tok.bos_token_id
            prefix, body = ([ids[0]], ids[1:]) if bos is not None and ids[:1] == [bos] else (
                [], ids)
            if not prefix and not body:
                raise ReachabilityError("An empty x0 needs a tokenizer that adds a BOS token; "
                                        "give some text.")
            self.prefix.append(prefix)
            self.body.append(body)
            self.state_text.append(text)
            states.append(text)
            true_next.append(nxt)
        if not states:
            raise ReachabilityError("x0s is empty: give at least one initial state (text).")
        return states, true_next

    def token_id(self, target: Any, what: str = "target") -> int:
        """A single token id from an id or a text that must be exactly one token."""
        if isinstance(target, bool):
            raise ReachabilityError(f"Cannot read {what} {target!r}.")
        if isinstance(target, int) or (hasattr(target, "item") and not isinstance(target, str)):
            tid = int(target)
            if not 0 <= tid < self.vocab:
                raise ReachabilityError(f"{what} id {tid} is outside the vocabulary "
                                        f"(0..{self.vocab - 1}).")
            return tid
        if not isinstance(target, str) or not target:
            raise ReachabilityError(f"Cannot read {what} {target!r}: give a token text or id.")
        ids = self.tok(target, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = [self.tok.decode([i]) for i in ids]
            raise ReachabilityError(
                f"{what} {target!r} is {len(ids)} tokens {pieces}; reachability targets are "
                "single next tokens. Use one token (e.g. its first, "
                f"{pieces[0] if pieces else ''!r}), or search each token in turn.")
        return ids[0]

    def resolve_targets(self, targets: Any, states: list[str], true_next: list[int | None],
                        base: Any) -> list[_Pair]:
        import torch

        per_state = _per_state(targets)
        if per_state and len(targets) != len(states):
            raise ReachabilityError(f"targets has {len(targets)} lists (one per x0) for "
                                    f"{len(states)} x0s: give one list per x0, or one flat "
                                    "list for all of them.")
        shared = None if per_state else _split_targets(targets)
        pairs: list[_Pair] = []
        for s in range(len(states)):
            specs = _split_targets(list(targets[s])) if per_state else shared
            logits = base[s]
            order = torch.argsort(logits, descending=True)
            ok = torch.zeros(self.vocab, dtype=torch.bool)
            ok[self.targetable] = True
            ranked = [int(i) for i in order if ok[i]]
            chosen: list[tuple[int, str]] = []
            for spec in specs:
                if isinstance(spec, str) and _SET_SPEC.match(spec):
                    kind, _, num = spec.partition(":")
                    n = int(num) if num else 1
                    if kind == "true":
                        if true_next[s] is None:
                            raise ReachabilityError(
                                "targets='true' needs the true next token of each x0: pass x0s "
                                "as (text, next token) pairs, e.g. from "
                                "promptscope.analyses.reachability.heldout_states(model, texts) "
                                "(in %%reach: lines 'text||next token').")
                        ids = [int(true_next[s])]  # type: ignore[arg-type]
                    elif kind == "top":
                        # (an API model scores only the server's top tokens: the rest are
                        # -inf, and special tokens among those top ones are not targetable)
                        ids = [i for i in ranked[:n] if math.isfinite(float(logits[i]))]
                        if len(ids) < n:
                            raise ReachabilityError(
                                f"targets 'top:{n}': after x0 {s} only {len(ids)} of the "
                                "tokens with a known score can be targets (special tokens "
                                f"are not); use top:{len(ids)} or fewer.")
                    elif kind == "bottom":
                        ids = ranked[::-1][:n]
                    else:
                        ids = self.rng.sample(self.targetable, min(n, len(self.targetable)))
                    chosen += [(i, kind) for i in ids]
                else:
                    chosen.append((self.token_id(spec), "given"))
            seen: dict[int, _Pair] = {}
            for tid, tset in chosen:
                if tid in seen:  # e.g. the true token is also in top:N: one search, both sets
                    first = seen[tid]
                    if tset != first.target_set and tset not in first.also:
                        first.also.append(tset)
                    continue
                logp = torch.log_softmax(logits, -1)
                seen[tid] = _Pair(index=len(pairs), state=s, target=tid, target_set=tset,
                                  base_prob=float(logp[tid].exp()),
                                  base_rank=int(_rank(logits[None], torch.tensor([[tid]]))[0, 0]))
                pairs.append(seen[tid])
        return pairs

    # ------------------------------------------------------------------ forward passes
    def seq(self, state: int, u: Sequence[int]) -> list[int]:
        return [*self.prefix[state], *u, *self.body[state]]

    def base_logits(self, states: list[str]) -> Any:
        import torch

        with torch.no_grad():
            return [self.plain_logits(self.seq(s, [])) for s in range(len(states))]

    def plain_logits(self, ids: list[int]) -> Any:
        """Next-token logits of one sequence: one plain forward pass, no batching or padding."""
        import torch

        with torch.no_grad():
            out = self.lm(input_ids=torch.tensor([ids], device=self.device))
        return out.logits[0, -1].float().cpu()

    def verify(self, pair: _Pair, u: list[int]) -> bool:
        """Independent check of a claimed success; sets the pair's final prob and rank."""
        import torch

        logits = self.plain_logits(self.seq(pair.state, u))
        ok = int(torch.argmax(logits)) == pair.target
        if ok:
            pair.prob = float(torch.softmax(logits, -1)[pair.target])
            pair.rank = 1
        else:
            self.unverified += 1
        return ok

    def evaluate(self, seqs: Any, targets: Any) -> tuple[Any, Any]:
        """Log-prob and rank of ``targets[i]`` (a row of target ids) after each of ``seqs``
        (a ``[N, L]`` tensor of equal-length sequences), in chunks within the token budget."""
        import torch

        n, length = seqs.shape
        chunk = max(1, self.budget // max(1, length))
        logps, ranks = [], []
        with torch.no_grad():
            i = 0
            while i < n:
                part = seqs[i:i + chunk].to(self.device)
                try:
                    logits = self.lm(input_ids=part, logits_to_keep=1).logits[:, -1].float()
                except torch.cuda.OutOfMemoryError:  # halve the chunk and retry
                    if chunk == 1:
                        raise
                    chunk = max(1, chunk // 2)
                    torch.cuda.empty_cache()
                    continue
                tg = targets[i:i + chunk].to(logits.device)
                ty = logits.gather(1, tg)
                logps.append((ty - torch.logsumexp(logits, -1, keepdim=True)).cpu())
                ranks.append(_rank(logits, tg).cpu())
                i += part.shape[0]
        return torch.cat(logps), torch.cat(ranks)

    def _stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise KeyboardInterrupt("reachability search stopped")

    def _trace(self, pair: _Pair, method: str, k: int, step: int, logp: float,
               rank: int) -> None:
        self.trace.append({"pair": pair.index, "method": method, "k": k, "step": step,
                           "loss": -logp, "prob": math.exp(logp), "rank": rank})

    # ------------------------------------------------------------------ greedy
    def greedy(self, pairs: list[_Pair], k_min: int, k_max: int, on_reached: Any,
               on_level: Any) -> None:
        """Back-generation: prepend the token that most raises log P(y), k_max times."""

        active = [p for p in pairs if not p.reached]
        u: dict[int, list[int]] = {p.index: [] for p in active}
        for k in range(1, k_max + 1):
            self._stop()
            groups: dict[tuple[int, tuple[int, ...]], list[_Pair]] = {}
            for p in active:
                groups.setdefault((p.state, tuple(u[p.index])), []).append(p)
            for (state, cur), group in groups.items():
                self._stop()
                u.update(self._front_pass(state, list(cur), group, k, "greedy", on_reached,
                                          may_reach=k >= k_min))
            active = [p for p in active if not p.reached]
            on_level()
            if not active:
                return

    # ------------------------------------------------------------------ GCG
    def gcg(self, pairs: list[_Pair], k_min: int, k_max: int, steps: int, width: int,
            top_k: int, exhaustive_k1: bool, warm: bool, on_reached: Any,
            on_level: Any) -> None:
        """Greedy coordinate gradient, batched over pairs; k grows from k_min to k_max."""
        import torch

        init_tok = self._init_token()
        for k in range(k_min, k_max + 1):
            active = [p for p in pairs if not p.reached]
            if not active:
                return
            if k == 1 and exhaustive_k1:
                self._exhaustive_k1(active, on_reached)
                on_level()
                continue
            u = {}
            for p in active:
                if warm and k in p.best_by_k:
                    u[p.index] = list(p.best_by_k[k])
                elif k - 1 in p.best_by_k:
                    u[p.index] = [init_tok, *p.best_by_k[k - 1]]
                elif self.init_control is not None and len(self.init_control) == k:
                    u[p.index] = list(self.init_control)
                else:
                    u[p.index] = [init_tok] * k
            for _ in range(steps):
                self._stop()
                if not active:
                    break
                grads = self._grads(active, u)  # [P, k, V]
                grads[:, :, ~self.allowed_mask] = math.inf
                kk = min(top_k, int(self.allowed.numel()))
                top = (-grads).topk(kk, dim=-1).indices  # [P, k, kk]
                cand_rows, owners = [], []
                for j, p in enumerate(active):
                    cands = self._sample(u[p.index], top[j], width)
                    cand_rows.append(cands)
                    owners += [j] * len(cands)
                # evaluate all candidates of all pairs, grouped by sequence length
                seq_rows = []
                for j, p in enumerate(active):
                    for c in cand_rows[j]:
                        seq_rows.append(self.seq(p.state, c))
                flat = [c for rows in cand_rows for c in rows]
                logp, rank = self._evaluate_ragged(seq_rows, [active[o].target for o in owners])
                start = 0
                still = []
                for j, p in enumerate(active):
                    n = len(cand_rows[j])
                    lp, rk = logp[start:start + n], rank[start:start + n]
                    cands = flat[start:start + n]
                    start += n
                    p.steps += 1
                    hit = (rk == 1).nonzero().flatten()
                    if len(hit):
                        best_hit = int(hit[torch.argmax(lp[hit])])
                        if self.verify(p, cands[best_hit]):
                            p.reached, p.k, p.control = True, k, cands[best_hit]
                            self._trace(p, "gcg", k, p.steps, float(lp[best_hit]), 1)
                            on_reached(p)
                            continue
                    b = int(torch.argmax(lp))
                    u[p.index] = cands[b]
                    p.keep(k, cands[b], float(-lp[b]))
                    if float(-lp[b]) < p.best_loss:
                        p.best_loss, p.best = float(-lp[b]), cands[b]
                        p.prob, p.rank = math.exp(float(lp[b])), int(rk[b])
                    self._trace(p, "gcg", k, p.steps, float(lp[b]), int(rk[b]))
                    still.append(p)
                active = still
            on_level()

    def _init_token(self) -> int:
        ids = self.tok("!", add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and self.allowed_mask[ids[0]]:
            return ids[0]
        return int(self.allowed[0])

    def _exhaustive_k1(self, active: list[_Pair], on_reached: Any) -> None:
        """Every allowed single token before x0: one pass per x0 serves all its targets."""
        by_state: dict[int, list[_Pair]] = {}
        for p in active:
            by_state.setdefault(p.state, []).append(p)
        for state, group in by_state.items():
            self._stop()
            self._front_pass(state, [], group, 1, "exhaustive", on_reached)

    def _front_pass(self, state: int, cur: list[int], group: list[_Pair], k: int, method: str,
                    on_reached: Any, may_reach: bool = True) -> dict[int, list[int]]:
        """Try every allowed token in front of ``cur`` for the pairs of ``group`` (one x0) in one
        batched pass. A pair whose target becomes the argmax is verified and reported; the others
        keep their most probable prompt, returned as pair index -> control tokens."""
        import torch

        cands = self.allowed
        seqs = torch.tensor([self.seq(state, [0, *cur])] * len(cands))
        seqs[:, len(self.prefix[state])] = cands
        tg = torch.tensor([[p.target for p in group]] * len(cands))
        logp, rank = self.evaluate(seqs, tg)
        kept: dict[int, list[int]] = {}
        for j, p in enumerate(group):
            p.steps += 1
            best = int(torch.argmax(logp[:, j]))
            hit = (rank[:, j] == 1).nonzero().flatten()
            if may_reach and len(hit):
                # among the candidates that make y the argmax, the most probable one
                best_hit = int(hit[torch.argmax(logp[hit, j])])
                trial = [int(cands[best_hit]), *cur]
                if self.verify(p, trial):
                    p.reached, p.k, p.control = True, k, trial
                    self._trace(p, method, k, p.steps, float(logp[best_hit, j]), 1)
                    on_reached(p)
                    continue
            control = [int(cands[best]), *cur]
            lp, rk = float(logp[best, j]), int(rank[best, j])
            p.keep(k, control, -lp)
            if -lp < p.best_loss:
                p.best_loss, p.best, p.prob, p.rank = -lp, control, math.exp(lp), rk
            self._trace(p, method, k, p.steps, lp, rk)
            kept[p.index] = control
        return kept

    def _sample(self, cur: list[int], top: Any, width: int) -> list[list[int]]:
        """Up to ``width`` distinct single-token swaps of ``cur`` drawn from ``top`` [k, kk]."""
        import torch

        k, kk = top.shape
        pos = torch.randint(0, k, (width,), generator=self.gen)
        pick = torch.randint(0, kk, (width,), generator=self.gen)
        toks = top[pos, pick]
        seen = {tuple(cur)}
        out = []
        for p_, t_ in zip(pos.tolist(), toks.tolist(), strict=True):
            c = list(cur)
            c[p_] = t_
            key = tuple(c)
            if key not in seen:
                seen.add(key)
                out.append(c)
        return out or [list(cur)]

    def _evaluate_ragged(self, seq_rows: list[list[int]], targets: list[int]) -> tuple[Any, Any]:
        """:meth:`evaluate` for sequences of different lengths (grouped by length, no padding)."""
        import torch

        n = len(seq_rows)
        logp = torch.empty(n)
        rank = torch.empty(n, dtype=torch.long)
        by_len: dict[int, list[int]] = {}
        for i, s in enumerate(seq_rows):
            by_len.setdefault(len(s), []).append(i)
        for idx in by_len.values():
            lp, rk = self.evaluate(torch.tensor([seq_rows[i] for i in idx]),
                                   torch.tensor([[targets[i]] for i in idx]))
            logp[idx] = lp[:, 0]
            rank[idx] = rk[:, 0]
        return logp, rank

    def _grads(self, active: list[_Pair], u: dict[int, list[int]]) -> Any:
        """Gradient of each pair's cross-entropy w.r.t. its one-hot control tokens [P, k, V]."""
        import torch

        k = len(u[active[0].index])
        out = torch.empty((len(active), k, self.vocab))
        by_len: dict[int, list[int]] = {}
        for j, p in enumerate(active):
            by_len.setdefault(len(self.seq(p.state, u[p.index])), []).append(j)
        for length, idx in by_len.items():
            chunk = max(1, self.mdl.gradient_token_budget // length)  # type: ignore
            for c in range(0, len(idx), chunk):
                part = idx[c:c + chunk]
                ps = [active[j] for j in part]
                ids = torch.tensor([self.seq(p.state, u[p.index]) for p in ps],
                                   device=self.device)
                starts = [len(self.prefix[p.state]) for p in ps]
                s0 = starts[0]  # equal length and same prefix length within a group
                if any(s != s0 for s in starts):
                    raise RuntimeError("mixed prefix lengths in one gradient batch")
                onehot, logits = one_hot_logits(self.lm, ids, s0, k)
                tg = torch.tensor([p.target for p in ps], device=self.device)
                loss = torch.nn.functional.cross_entropy(logits, tg, reduction="sum")
                (g,) = torch.autograd.grad(loss, [onehot])
                out[part] = g.float().cpu()
        return out

    # ------------------------------------------------------------------ rows
    def row(self, p: _Pair) -> dict[str, Any]:
        control = p.control if p.reached else p.best
        # A pair stopped before its first evaluation: its best so far is no control at all.
        tried = p.reached or bool(p.best)
        text = self.tok.decode(control) if control else ""
        state_text = self.state_text[p.state]
        full = self.seq(p.state, control)
        try:  # (re-encoded, the text may come out longer than the model reads: no round trip)
            roundtrip = self.mdl.encode_prompt(text + state_text) == full  # type: ignore
        except PromptscopeError:
            roundtrip = False
        return {
            "pair": p.index, "state": p.state, "x0": state_text, "target_set": p.target_set,
            "target": self.tok.decode([p.target]), "target_id": p.target,
            "base_prob": p.base_prob, "base_rank": p.base_rank, "reached": p.reached,
            "k": float(p.k) if p.reached else math.nan, "control": text,
            "control_ids": list(control),
            "prob": p.prob if tried else p.base_prob, "rank": p.rank if tried else p.base_rank,
            "steps": p.steps, "method": p.method,
            "text_roundtrip": roundtrip, "time_s": round(time.perf_counter() - p.started, 4),
        }


class _EndpointSearch(_Search):
    """Greedy back-generation through an API model that echoes prompt log-probs (vLLM).

    The same search on the same token ids as :class:`_Search`: every candidate prompt is sent
    as token ids with its target appended, and the echoed log-prob (and rank) of the target is
    the score; batches of candidates go out as concurrent requests. Needs no weights, only the
    served model's tokenizer (for the vocabulary and to encode x0).
    """

    def base_logits(self, states: list[str]) -> Any:
        """Per x0 the server's top next tokens as logits (the rest ``-inf``): enough to pick
        ``top:N`` targets; each pair's exact base log-prob and rank are asked for after."""
        import torch

        out = []
        for s in range(len(states)):
            top = self.mdl.top_tokens(self.seq(s, []), self.mdl.top_logprobs)  # type: ignore[attr-defined]
            logits = torch.full((self.vocab,), -math.inf)
            for tid, lp in top.items():
                if 0 <= tid < self.vocab:
                    logits[tid] = lp
            out.append(logits)
        return out

    def resolve_targets(self, targets: Any, states: list[str], true_next: list[int | None],
                        base: Any) -> list[_Pair]:
        n_top = self.mdl.top_logprobs  # type: ignore[attr-defined]
        specs = ([s for t in targets for s in _split_targets(list(t))] if _per_state(targets)
                 else _split_targets(targets))
        for spec in specs:
            kind, _, num = str(spec).partition(":")
            if kind == "bottom" or (kind == "top" and num.isdigit() and int(num) > n_top):
                raise ReachabilityError(
                    f"targets {spec!r} needs the next-token distribution beyond the server's top "
                    f"{n_top}; on an API model use 'true', 'top:N' with N <= {n_top} "
                    "(top_logprobs=... at load time, within the server's --max-logprobs), "
                    "'random:N' or given tokens.")
        pairs = super().resolve_targets(targets, states, true_next, base)
        exact = self.mdl.token_logprobs(  # type: ignore[attr-defined]
            [self.seq(p.state, []) for p in pairs], [p.target for p in pairs])
        for p, (lp, rank) in zip(pairs, exact):
            # a failed request (rank 0) is no measurement: NaN, not a probability of 0
            p.base_prob, p.base_rank = (math.exp(lp), rank) if rank > 0 else (math.nan, 0)
        return pairs

    def evaluate(self, seqs: Any, targets: Any) -> tuple[Any, Any]:
        import torch

        rows = seqs.tolist()
        n, g = targets.shape
        flat = self.mdl.token_logprobs(  # type: ignore[attr-defined]
            [rows[i] for i in range(n) for _ in range(g)], targets.flatten().tolist())
        logp = torch.tensor([lp for lp, _ in flat], dtype=torch.float32).reshape(n, g)
        # a failed request (rank 0) can never count as reached
        rank = torch.tensor([r if r > 0 else self.vocab for _, r in flat]).reshape(n, g)
        return logp, rank

    def verify(self, pair: _Pair, u: list[int]) -> bool:
        """A claimed success asked again, alone, in its own request."""
        ((lp, rank),) = self.mdl.token_logprobs(  # type: ignore[attr-defined]
            [self.seq(pair.state, u)], [pair.target], batch=1)
        if rank == 1:
            pair.prob, pair.rank = math.exp(lp), 1
            return True
        self.unverified += 1
        return False


def one_hot_logits(lm: Any, ids: Any, start: int, k: int) -> tuple[Any, Any]:
    """The model's next-token logits after ``ids`` (``[B, L]``) with the tokens at
    ``[start, start + k)`` fed as one-hot rows over the vocabulary: ``(one_hot [B, k, V],
    logits [B, V])``, the logits differentiable in the one-hot.

    Every embedding the model looks up by token id is taken through the one-hot: the input
    embedding (:func:`embed_rows`) and, in Gemma 3n and 4, the per-layer embeddings, which the
    model would otherwise drop (3n) or recover from the input embedding without a gradient (4)
    when given embeddings instead of ids.
    """
    import torch

    from promptscope.models.hf import per_layer_embedding, text_config, weight_of

    embed = lm.get_input_embeddings()
    weight = weight_of(embed)
    onehot = torch.zeros((*ids.shape[:1], k, weight.shape[0]), device=ids.device,
                         dtype=weight.dtype)
    onehot.scatter_(2, ids[:, start:start + k].unsqueeze(2), 1.0)
    onehot.requires_grad_(True)

    def through(module: Any, table: Any) -> Any:
        with torch.no_grad():
            rows = module(ids)
        control = embed_rows(module, onehot[..., :table.shape[0]] @ table)
        return torch.cat([rows[:, :start], control, rows[:, start + k:]], dim=1)

    kwargs = {"inputs_embeds": through(embed, weight)}
    per_layer = per_layer_embedding(lm)
    if per_layer is not None:
        cfg = text_config(lm)
        kwargs["per_layer_inputs"] = through(per_layer, weight_of(per_layer)).reshape(
            *ids.shape, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input)
    logits = lm(**kwargs, logits_to_keep=1).logits[:, -1].float()
    return onehot, logits


def embed_rows(embed: Any, rows: Any) -> Any:
    """What the input-embedding module outputs for the weight ``rows`` it looked up
    (``[..., d]``), differentiably in them: the module's own forward (Gemma's scale, Inkling's
    norm, ...) over a weight made of those rows, so a one-hot's gradient sees the embeddings
    the model really gets. A plain ``nn.Embedding`` adds nothing after its lookup."""
    import torch

    if type(embed).forward is torch.nn.Embedding.forward:
        return rows
    flat = rows.reshape(-1, rows.shape[-1])
    # F.embedding gives the padding_idx row no gradient: look the rows up past it.
    skip = 0 if embed.padding_idx is None else embed.padding_idx + 1
    weight = torch.cat([flat.new_zeros(skip, flat.shape[1]), flat])
    idx = torch.arange(skip, skip + len(flat), device=flat.device).view(rows.shape[:-1])
    own_forward = getattr(embed, "_old_forward", None)
    if own_forward is None:
        return torch.func.functional_call(embed, {"weight": weight}, (idx,))

    # Offloaded by accelerate (device_map=...): its hook would load the real table over this
    # one, so call the module's own forward, which the hook keeps as ``_old_forward``.
    class Unhooked(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = embed

        def forward(self, idx: Any) -> Any:
            return own_forward(idx)

    return torch.func.functional_call(Unhooked(), {"embed.weight": weight}, (idx,))


def _split_targets(targets: Any) -> list[Any]:
    """``targets`` as a flat list of set specs, token texts and ids."""
    if targets is None:
        raise ReachabilityError("Give targets: 'true', 'top:N', 'random:N', 'bottom:N', "
                                "token texts or ids.")
    targets = _python(targets)
    if isinstance(targets, str):
        parts = [t.strip() for t in targets.split(",")]
        if all(_SET_SPEC.match(t) for t in parts):
            return parts
        loose = [t for t in parts
                 if re.match(r"^(top|random|bottom):", t) and not _SET_SPEC.match(t)]
        if loose and "|" not in targets:  # a set spec with a bad count, not a token text
            raise ReachabilityError(f"Cannot read targets {loose[0]!r}: write top:N, random:N "
                                    "or bottom:N with a whole number N (e.g. top:10).")
        if any(_SET_SPEC.match(t) for t in parts) and "|" not in targets:
            raise ReachabilityError(
                f"Cannot read targets {targets!r}: sets are joined by ',' (top:5,random:5) and "
                "token texts by '|' ( Paris| Rome); to mix them pass a list, e.g. "
                f"{[t if _SET_SPEC.match(t) else ' ' + t for t in parts]}.")
        pieces = targets.split("|")
        if "" in pieces:
            raise ReachabilityError(
                f"targets {targets!r} has an empty token text: '|' separates token texts. To "
                "target a text that holds '|', pass a list (e.g. [' |']).")
        return pieces
    if isinstance(targets, numbers.Integral):
        return [int(targets)]
    # A list's items are taken as they are: a set spec, a token text ('|' included) or an id.
    return [int(t) if isinstance(t, numbers.Integral) else t
            for t in map(_python, targets)]


def _per_state(targets: Any) -> bool:
    """Whether ``targets`` is one list of targets per x0."""
    return (isinstance(targets, (list, tuple)) and bool(targets)
            and all(isinstance(t, (list, tuple)) for t in targets))


def _python(value: Any) -> Any:
    """A tensor, an array or a numpy number as Python lists and numbers; anything else as is."""
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, str) else value


def _jsonable(targets: Any) -> Any:
    targets = _python(targets)
    if isinstance(targets, (str, int)):
        return targets
    if isinstance(targets, (list, tuple)):
        return [_jsonable(t) for t in targets]
    return int(targets)
