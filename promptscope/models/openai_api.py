"""OpenAI-compatible HTTP models (OpenAI, vLLM, llama.cpp server): the black-box backend.

An :class:`OpenAIModel` runs every black-box analysis through the official ``openai`` client:
requests go out concurrently (at most ``max_concurrency`` in flight), each with a timeout, and
are retried with exponential backoff and jitter on 429, 5xx, timeouts, dropped connections and
malformed responses (a ``Retry-After`` header is honoured). A request that still fails becomes a
failed row (its ``error`` column says why); the run goes on.

Scoring a continuation uses, in this order, whichever the server supports (decided once per model
and recorded in the run's ``params["api"]["scoring"]``; a run never mixes methods):

- ``echo``: the completions endpoint with ``echo`` and ``logprobs`` returns the log-prob of every
  prompt token, so the continuation's log-prob is exact (vLLM does this). Chat prompts are
  scored this way too when the server renders its chat template for us (vLLM's ``/tokenize``
  with ``messages``, then ``/detokenize``): the templated text, plus the reply to score, goes to
  the completions endpoint without a second BOS (``add_special_tokens: false``);
- ``top_logprobs``: the first answer token's ``top_logprobs`` (chat models such as OpenAI's): a
  choice's log-prob is that of the top tokens equal to it (ignoring surrounding whitespace), or
  else those it starts with; ``-inf`` when none is among the top ``top_logprobs``;
- ``generated``: the greedy answer; the choice it starts with gets probability 1.

Deterministic responses (scoring, and generation at temperature 0) are cached on disk (see
:mod:`promptscope.models.cache`), so re-running a notebook sends no requests. The API key lives
only inside the client: it is never in ``describe()``, a session, a log or an error message.

Example:
    >>> import promptscope
    >>> m = promptscope.load_model("openai:gpt-4o-mini")                    # doctest: +SKIP
    >>> m = promptscope.load_model("openai:my-model",
    ...                            base_url="http://localhost:8000/v1")      # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlparse, urlunparse

from promptscope.errors import CapabilityError, ModelLoadError, PromptscopeError
from promptscope.models.base import Generation, Model, ProgressFn, Score, check_generation

#: OpenAI's own endpoint (the default ``base_url``).
OPENAI_BASE_URL = "https://api.openai.com/v1"

#: Scoring methods, best first.
SCORING_METHODS = {
    "echo": "completions echo + logprobs (exact continuation log-probs)",
    "top_logprobs": "top_logprobs of the first answer token (approximate)",
    "generated": "the greedy answer (probability 1 for the choice it starts with)",
}

#: Tokens requested for the ``generated`` scoring method.
_ANSWER_TOKENS = 16


class APIRequestError(PromptscopeError):
    """The server refused every request of a run (bad key, unknown model, no such endpoint).

    ``partial``: from ``score``/``generate``, their results with what finished before the
    refusal (requests answered, and billed) and failed rows for the rest; else None.
    """

    partial: list[Any] | None = None


class ChatText(str):
    """A user message to send to the chat endpoint (what ``OpenAIModel.chat_prompt`` returns).

    The server applies the model's chat template; the text itself is the bare message.
    """


@dataclass
class _Tally:
    """Requests, tokens and cost of one run (thread-safe)."""

    requests: int = 0
    cached: int = 0
    failed: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)


_local = threading.local()  # per worker thread: the stop event of the run it works for


class _Failed(Exception):
    """A request that failed for good; the message is safe to show (no key)."""


class _Rejected(_Failed):
    """A request the server refused as bad (HTTP 400, 413, 422: a prompt too long for the
    model, say): in a pack of prompts, one bad prompt may be the whole reason."""


class _Fatal(Exception):
    """A failure that every further request would repeat (auth, unknown model)."""


class OpenAIModel(Model):
    """A model served by an OpenAI-compatible HTTP API.

    Args:
        model: the model id the server knows (``gpt-4o-mini``, or vLLM's served model name).
        base_url: the API root, e.g. ``http://localhost:8000/v1``; default
            ``$OPENAI_BASE_URL``, else OpenAI's.
        api_key: the key; default: the environment variable ``api_key_env``.
        api_key_env: where to read the key. Default ``OPENAI_API_KEY``, which is only sent to
            OpenAI itself (or to ``$OPENAI_BASE_URL``); other servers get no key unless you name
            the variable (``api_key_env="MY_SERVER_KEY"``) or pass ``api_key``.
        max_concurrency: requests in flight at once.
        timeout: seconds per request.
        max_retries: retries of a request on 429, 5xx, timeouts, dropped connections and
            malformed responses, with exponential backoff (``backoff`` seconds doubled each time,
            at most ``max_backoff``, with jitter) or the server's ``Retry-After``.
        cache: cache deterministic responses on disk (scores; generations at temperature 0).
        cache_path: the cache file (default: ``api_cache.sqlite`` in the workspace folder).
        scoring: ``"auto"`` (the best the server supports) or one of :data:`SCORING_METHODS`.
        top_logprobs: how many top tokens to ask for (``top_logprobs`` scoring).
        prices: USD per million tokens, ``{"input": 0.15, "output": 0.60}``, for the cost tally.
        prompts_per_request: prompts scored in one echo request (the completions endpoint
            takes a list; several per request cut the round trips, and the server batches them).
        tokenizer: the served model's tokenizer (a folder or hub id), for token-level analyses
            (the greedy reachability search); default: the model root the server reports
            (vLLM), when it loads here.
        name: the name shown in tables (default ``openai:MODEL``).
        check: contact the server now (list its models) so a wrong URL, key or model name fails
            here with a clear message.

    Example:
        >>> m = OpenAIModel("tiny", base_url="http://127.0.0.1:8000/v1")   # doctest: +SKIP
        >>> m.score(["Is Paris in Europe? Answer:"], [" yes"])[0].logprob   # doctest: +SKIP
        -0.21
    """

    capabilities = frozenset({"score", "generate", "token_logprobs"})
    per_request_errors = True

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        api_key_env: str | None = None,
        max_concurrency: int = 16,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        cache: bool = True,
        cache_path: str | os.PathLike | None = None,
        scoring: str = "auto",
        top_logprobs: int = 20,
        prices: dict[str, float] | None = None,
        tokenizer: str | os.PathLike | None = None,
        prompts_per_request: int = 16,
        name: str | None = None,
        check: bool = True,
    ) -> None:
        import openai

        if not model:
            raise ModelLoadError("Give the API model's id, e.g. 'openai:gpt-4o-mini'.")
        if scoring != "auto" and scoring not in SCORING_METHODS:
            raise PromptscopeError(f"scoring must be 'auto' or one of {list(SCORING_METHODS)}.")
        if max_concurrency < 1 or max_retries < 0 or timeout <= 0 or prompts_per_request < 1:
            raise PromptscopeError("max_concurrency and prompts_per_request must be >= 1, "
                                   "max_retries >= 0, timeout > 0.")
        env_url = (os.environ.get("OPENAI_BASE_URL") or "").rstrip("/")
        url = (base_url or env_url or OPENAI_BASE_URL).rstrip("/")
        from_env = bool(env_url) and url == env_url  # also when given again as base_url
        _check_url(url)
        is_openai = urlparse(url).hostname == "api.openai.com"
        key = api_key
        if key is None:
            env = api_key_env or ("OPENAI_API_KEY" if is_openai or from_env else None)
            key = os.environ.get(env) if env else None
            if key is None and (is_openai or api_key_env):
                raise ModelLoadError(
                    f"No API key: set the {env} environment variable (or pass api_key=...)."
                    + ("" if api_key_env else " For a local server, give base_url=... "
                       "(--base-url)."))
        self._secrets = [s for s in (key,) if s]
        self.model_id = model
        self.base_url = url
        self.name = name or f"openai:{model}"
        self.max_concurrency = max_concurrency
        self.prompts_per_request = prompts_per_request
        self._pool: ThreadPoolExecutor | None = None
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.cache_enabled = cache
        self._cache_path = cache_path
        self._cache_obj: Any = None
        self._cache_lock = threading.Lock()  # request threads open the cache once, together
        self.scoring = scoring
        self.top_logprobs = top_logprobs
        self.prices = dict(prices) if prices else None
        self._methods: dict[bool, str] = {}  # chat? -> scoring method, decided once
        self._templates: dict[str, str | None] = {}  # user message -> chat-templated text
        self._template_lock = threading.Lock()
        self._echo_max_tokens = 0
        self._tally = _Tally()
        self._last_scoring: str | None = None
        self._is_openai = is_openai
        self._tokenizer_source = os.fspath(tokenizer) if tokenizer is not None else None
        self._tokenizer: Any = None
        self._served_root: str | None = None
        # The key goes into the client and nowhere else; retries are ours, not the client's.
        self._client = openai.OpenAI(api_key=key or "EMPTY", base_url=url, timeout=self.timeout,
                                     max_retries=0)
        if check:
            self._check_server()

    # ------------------------------------------------------------------ facts
    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "backend": type(self).__name__, "model": self.model_id,
                "base_url": _public_url(self.base_url), "max_concurrency": self.max_concurrency,
                "timeout": self.timeout, "max_retries": self.max_retries}

    def chat_prompt(self, user_message: str) -> str:
        """The message itself, marked for the chat endpoint (the server applies the template)."""
        return ChatText(user_message)

    # ------------------------------------------------------------------ runs
    def begin_run(self, mode: str, chat: bool) -> None:
        """Reset the tally and settle how this run scores (before its first request)."""
        self._tally = _Tally()
        self._last_scoring = None
        if mode == "choices":
            self._last_scoring = self.scoring_method(chat)
        elif mode == "target":
            if chat and self.scoring_method(True) != "echo":
                raise CapabilityError(
                    "--target with --chat needs the log-prob of a given assistant reply, which "
                    f"the chat API of '{self.name}' does not return (and the server does not "
                    "render its chat template for the completions endpoint, as vLLM's "
                    "/tokenize does). Drop --chat, or rank answers with --choices.")
            if self.scoring_method(chat) != "echo":
                raise CapabilityError(
                    f"--target needs exact continuation log-probs (completions with echo + "
                    f"logprobs), which the server at {_public_url(self.base_url)} does not "
                    "provide for this model. Use --choices instead.")
            self._last_scoring = "echo"

    def run_info(self) -> dict[str, Any]:
        """Requests, failures, cache hits, tokens and cost since :meth:`begin_run`."""
        t = self._tally
        info: dict[str, Any] = {
            "endpoint": _public_url(self.base_url), "requests": t.requests, "cached": t.cached,
            "failed": t.failed, "retries": t.retries, "prompt_tokens": t.prompt_tokens,
            "completion_tokens": t.completion_tokens}
        if self._last_scoring:
            info["scoring"] = self._last_scoring
        if self.prices:
            info["cost_usd"] = round(
                t.prompt_tokens * self.prices.get("input", 0.0) / 1e6
                + t.completion_tokens * self.prices.get("output", 0.0) / 1e6, 6)
        return info

    # ------------------------------------------------------------------ scoring
    def score(
        self,
        prompts: Sequence[str],
        continuations: Sequence[str],
        progress: ProgressFn | None = None,
    ) -> list[Score]:
        """Log-prob of ``continuations[i]`` after ``prompts[i]``; failed pairs carry ``error``.

        One request per distinct prompt (all its continuations together), run concurrently.
        """
        if len(prompts) != len(continuations):
            raise PromptscopeError("score() needs one continuation per prompt.")
        if any(c == "" for c in continuations):
            raise PromptscopeError("A continuation to score is empty; give non-empty text "
                                   "(e.g. --choices ' yes| no').")
        if not prompts:
            return []
        chat = isinstance(prompts[0], ChatText)
        method = self.scoring_method(chat)
        if self._last_scoring is None:
            self._last_scoring = method
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault(p, []).append(i)
        results: list[Score | None] = [None] * len(prompts)
        # echo scores several prompts per request (the completions endpoint takes a list):
        # far fewer round trips, and the server batches them
        per_request = self.prompts_per_request if method == "echo" else 1
        items = list(groups.items())

        def job(pack: list[tuple[str, list[int]]]) -> Callable[[], None]:
            wanted = [(p, list(dict.fromkeys(continuations[i] for i in idx))) for p, idx in pack]

            def run() -> None:
                try:
                    scores = self._score_pack(method, wanted)
                except _Fatal:
                    raise
                except Exception as exc:  # _Failed, or an answer this code could not read
                    why = self._row_failure(exc)
                    scores = [{c: _failed_score(why) for c in conts} for _, conts in wanted]
                for (_, idx), got in zip(pack, scores):
                    for i in idx:
                        results[i] = got[continuations[i]]
            return run

        packs = [items[k:k + per_request] for k in range(0, len(items), per_request)]
        try:
            self._run_jobs([(job(pack), sum(len(idx) for _, idx in pack)) for pack in packs],
                           progress)
        except (APIRequestError, KeyboardInterrupt) as exc:  # keep what was answered (billed)
            why = _unanswered(exc)
            exc.partial = [r if r is not None else _failed_score(why)
                           for r in results]
            raise
        return results  # type: ignore[return-value]

    def _row_failure(self, exc: Exception) -> str:
        """The error text of rows whose request failed; a response that arrived but could not
        be read (a bug, or a server's odd answer) is counted as a failure too."""
        if isinstance(exc, _Failed):
            return str(exc)
        self._tally.add(failed=1)
        return self._redact(f"unreadable response ({type(exc).__name__}: {exc})")

    def _score_pack(self, method: str, wanted: list[tuple[str, list[str]]],
                    ) -> list[dict[str, Score]]:
        """Scores of each prompt's continuations; one request (echo) or one per prompt."""
        if method == "echo":
            return self._score_echo(wanted)
        score = self._score_top if method == "top_logprobs" else self._score_generated
        return [score(prompt, conts) for prompt, conts in wanted]

    def _score_echo(self, wanted: list[tuple[str, list[str]]]) -> list[dict[str, Score]]:
        texts: list[str] = []
        chat = False
        for prompt, conts in wanted:
            if isinstance(prompt, ChatText):
                chat = True
                text = self._templated(prompt)
                if text is None:  # counted, so the run's summary line reports it
                    self._tally.add(failed=1)
                    raise _Failed("the server no longer renders the chat template (its "
                                  "/tokenize endpoint did not answer)")
            else:
                text = prompt
            texts += [text + c for c in conts]
        body = {"model": self.model_id, "echo": True,
                "logprobs": 1, "max_tokens": self._echo_max_tokens, "temperature": 0.0}
        if chat:
            body["extra_body"] = {"add_special_tokens": False}  # the template has its BOS
        it = iter(self._request_each(body, texts))
        out = []
        for prompt, conts in wanted:
            got = {c: next(it) for c in conts}
            failed = next((g for g in got.values() if isinstance(g, _Failed)), None)
            out.append({c: _failed_score(str(failed)) if failed is not None else
                        _echo_score(prompt, c, g.get("logprobs") or {}, self._echo_max_tokens)
                        for c, g in got.items()})
        return out

    def _score_top(self, prompt: str, conts: list[str]) -> dict[str, Score]:
        chat = isinstance(prompt, ChatText)
        if chat:
            body = {"model": self.model_id, "messages": [{"role": "user", "content": prompt}],
                    "logprobs": True, "top_logprobs": self.top_logprobs, "temperature": 0.0,
                    self._chat_max_key: 1}
        else:
            body = {"model": self.model_id, "prompt": prompt, "logprobs": self.top_logprobs,
                    "max_tokens": 1, "temperature": 0.0}
        data = self._request("chat" if chat else "completions", body, cacheable=True)
        top = _first_top_logprobs(data, chat)
        if top is None:
            self._tally.add(failed=1)
            raise _Failed("the response has no top_logprobs")
        return {c: _match_top(c, top) for c in conts}

    def _score_generated(self, prompt: str, conts: list[str]) -> dict[str, Score]:
        gen = self._generate_one(prompt, max_new_tokens=_ANSWER_TOKENS, temperature=0.0,
                                 top_p=1.0, n=1, seed=0, logprobs=False)[0]
        answer = gen.text.strip()
        hits = [c for c in conts if c.strip() and answer.startswith(c.strip())]
        best = max(hits, key=lambda c: len(c.strip())) if hits else None
        if best is None:
            return {c: _failed_score(f"the answer {answer[:60]!r} starts with no choice")
                    for c in conts}
        return {c: Score(logprob=0.0 if c == best else -math.inf,
                         token_logprobs=[], tokens=[answer], prompt_tokens=gen.prompt_tokens)
                for c in conts}

    def scoring_method(self, chat: bool) -> str:
        """The scoring method for chat or plain prompts, found once by asking the server."""
        if chat not in self._methods:
            self._methods[chat] = self._probe_scoring(chat)
        return self._methods[chat]

    def _probe_scoring(self, chat: bool) -> str:
        wanted = [self.scoring] if self.scoring != "auto" else list(SCORING_METHODS)
        if chat and "echo" in wanted and self._templated(ChatText("Hi")) is None:
            if self.scoring == "echo":
                raise CapabilityError("scoring='echo' with --chat needs a server that renders "
                                      "its chat template (vLLM's /tokenize); drop --chat or use "
                                      "scoring='top_logprobs'.")
            wanted.remove("echo")
        for method in wanted:
            if method == "generated" or self._probe(method, chat):
                return method
        raise CapabilityError(f"The server at {_public_url(self.base_url)} cannot score with "
                              f"{self.scoring!r} for '{self.model_id}'.")

    def _probe(self, method: str, chat: bool) -> bool:
        """Whether the server answers a tiny request of this method (retried, cached)."""
        try:
            if method == "echo":
                body = {"model": self.model_id, "prompt": "Hi there", "echo": True,
                        "logprobs": 1, "temperature": 0.0}
                if chat:
                    body.update(prompt=f"{self._templated(ChatText('Hi'))}Hello",
                                extra_body={"add_special_tokens": False})
                for max_tokens in (0, 1):  # some servers refuse max_tokens=0
                    try:
                        data = self._request("completions", {**body, "max_tokens": max_tokens},
                                             cacheable=True, probe=True)
                    except _Refused:
                        continue
                    choice = (data.get("choices") or [{}])[0]
                    lps = choice.get("logprobs") or {}
                    # echoed: the prompt comes back in the text, and with max_tokens=0
                    # nothing else (a server that ignores echo or max_tokens=0 answers with
                    # generated tokens, which must not be scored as the prompt's)
                    text = str(choice.get("text") or "")
                    if ((text == body["prompt"] if max_tokens == 0
                         else text.startswith(body["prompt"]))
                            and len(lps.get("token_logprobs") or []) >= 2 + max_tokens):
                        self._echo_max_tokens = max_tokens
                        return True
                return False
            body = {"model": self.model_id, "temperature": 0.0}
            if chat:
                body.update(messages=[{"role": "user", "content": "Hi"}], logprobs=True,
                            top_logprobs=self.top_logprobs, **{self._chat_max_key: 1})
            else:
                body.update(prompt="Hi there", logprobs=self.top_logprobs, max_tokens=1)
            data = self._request("chat" if chat else "completions", body, cacheable=True,
                                 probe=True)
            return bool(_first_top_logprobs(data, chat))
        except _Refused:
            return False
        except (_Failed, _Fatal) as exc:
            raise APIRequestError(f"The server at {_public_url(self.base_url)} did not answer a "
                                  f"first request: {exc}.") from None

    def _templated(self, message: ChatText) -> str | None:
        """The server's chat-templated text of one user message (with the generation prompt),
        or ``None`` when the server cannot render it (vLLM's ``/tokenize`` + ``/detokenize``,
        next to ``/v1``)."""
        if self._is_openai:  # OpenAI's API renders no templates for us
            return None
        with self._template_lock:
            if message in self._templates:
                return self._templates[message]
        root = self.base_url.removesuffix("/v1")
        try:
            ids = self._post_json(f"{root}/tokenize", {
                "model": self.model_id, "messages": [{"role": "user", "content": str(message)}],
                "add_generation_prompt": True})["tokens"]
            text = self._post_json(f"{root}/detokenize",
                                   {"model": self.model_id, "tokens": ids})["prompt"]
            text = text if isinstance(text, str) and text else None
        except (_Unsupported, KeyError, TypeError, ValueError):  # no such endpoint or format
            text = None
        except OSError:
            return None  # this time only: a server that was briefly away is asked again
        with self._template_lock:
            self._templates[message] = text
        return text

    def _post_json(self, url: str, body: dict[str, Any]) -> Any:
        """A plain JSON POST to the server (for endpoints the openai client does not know)."""
        import httpx

        headers = {"Authorization": f"Bearer {self._secrets[0]}"} if self._secrets else {}
        stop: threading.Event = getattr(_local, "stop", None) or threading.Event()
        for attempt in range(self.max_retries + 1):
            try:
                resp = httpx.post(url, json=body, headers=headers,
                                  timeout=min(self.timeout, 30.0))
            except httpx.HTTPError as exc:
                error: Exception = OSError(self._redact(str(exc)))
            else:
                if resp.status_code == 200:
                    return resp.json()
                if resp.status_code in (400, 404, 405, 501):
                    raise _Unsupported(f"HTTP {resp.status_code}")
                error = OSError(f"HTTP {resp.status_code}")
            if attempt < self.max_retries and stop.wait(
                    min(self.max_backoff, self.backoff * 2 ** attempt)):
                raise OSError("cancelled")  # the run was stopped: no more waiting
        raise error

    # ------------------------------------------------------------------ token level
    @property
    def tokenizer(self) -> Any:
        """The served model's tokenizer, loaded here (``tokenizer=`` at load time, else the
        model root the server reports) and checked against the server's own ``/tokenize``."""
        if self._tokenizer is None:
            source = self._tokenizer_source or self._served_root
            if not source:
                raise CapabilityError(
                    f"Token-level analyses on '{self.name}' need the served model's tokenizer: "
                    "pass tokenizer='FOLDER or hub id' to load_model (the server does not say "
                    "which model it loaded).")
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(source)
            except (OSError, ValueError) as exc:
                raise CapabilityError(
                    f"Could not load the tokenizer of '{self.name}' from {source!r} "
                    f"({_message(exc)}); pass tokenizer='FOLDER or hub id' to load_model.") \
                    from None
            probe = "Hello there, 12 tokens!"
            try:
                theirs = self._post_json(f"{self.base_url.removesuffix('/v1')}/tokenize",
                                         {"model": self.model_id, "prompt": probe})["tokens"]
            except (OSError, KeyError, TypeError, ValueError):
                theirs = None  # a server without /tokenize: trust the given tokenizer
            if theirs is not None and theirs != tok(probe)["input_ids"]:
                raise CapabilityError(
                    f"The tokenizer from {source!r} does not tokenise like the server of "
                    f"'{self.name}'; pass the served model's tokenizer (tokenizer=...).")
            self._tokenizer = tok
        return self._tokenizer

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt as the server tokenises a text prompt (special tokens added)."""
        return self.tokenizer(text)["input_ids"]

    def token_logprobs(self, prompts: Sequence[Sequence[int]], targets: Sequence[int], *,
                       batch: int = 64, progress: ProgressFn | None = None,
                       ) -> list[tuple[float, int]]:
        """Exact ``log P(targets[i] | prompts[i])`` for token-id prompts, and the target's rank
        there (1 = the argmax), from echoed prompt log-probs: ``prompts[i] + [targets[i]]`` is
        sent as token ids, ``batch`` prompts per request, requests run concurrently.

        The rank is exact where the server reports it (vLLM's ``prompt_logprobs``); elsewhere it
        is 1 for the argmax and 2 ("not the argmax") otherwise. A prompt whose request failed
        for good gives ``(-inf, 0)``.

        Example:
            >>> api.token_logprobs([[0, 712, 491]], [702])                  # doctest: +SKIP
            [(-2.3778, 3)]
        """
        if len(prompts) != len(targets):
            raise PromptscopeError("token_logprobs() needs one target per prompt.")
        if self.scoring_method(False) != "echo":
            raise CapabilityError(
                f"Token-level log-probs need a completions endpoint that echoes prompt "
                f"log-probs (vLLM does); the server at {_public_url(self.base_url)} does not for "
                f"'{self.model_id}'.")
        out: list[tuple[float, int]] = [(-math.inf, 0)] * len(prompts)

        def job(lo: int) -> Callable[[], None]:
            idx = range(lo, min(lo + batch, len(prompts)))

            def run() -> None:
                body = {"model": self.model_id, "echo": True, "logprobs": 1,
                        "max_tokens": self._echo_max_tokens, "temperature": 0.0,
                        "extra_body": {"return_tokens_as_token_ids": True,
                                       "add_special_tokens": False}}
                items = [[*map(int, prompts[i]), int(targets[i])] for i in idx]
                for i, ch in zip(idx, self._request_each(body, items)):
                    if not isinstance(ch, _Failed):
                        out[i] = _target_logprob(ch, len(prompts[i]), int(targets[i]))
            return run

        starts = range(0, len(prompts), batch)
        self._run_jobs([(job(lo), min(batch, len(prompts) - lo)) for lo in starts], progress)
        return out

    def top_tokens(self, prompt: Sequence[int], n: int) -> dict[int, float]:
        """The ``n`` most likely next tokens after a token-id prompt: ``{token id: logprob}``
        (``n`` at most the server's limit on logprobs, 20 on vLLM unless raised)."""
        body = {"model": self.model_id, "prompt": [[*map(int, prompt)]], "max_tokens": 1,
                "logprobs": n, "temperature": 0.0,
                "extra_body": {"return_tokens_as_token_ids": True, "add_special_tokens": False}}
        try:
            data = self._request("completions", body, cacheable=True)
        except _Fatal as exc:  # a bad key, an unknown model: nothing about n to suggest
            raise APIRequestError(f"Could not get the top {n} next tokens: {exc}.") from None
        except _Failed as exc:
            raise APIRequestError(f"Could not get the top {n} next tokens: {exc}. (vLLM allows "
                                  "20 unless started with --max-logprobs.)") from None
        top = (((data.get("choices") or [{}])[0].get("logprobs") or {}).get("top_logprobs")
               or [None])[0] or {}
        return {_token_id(k): float(v) for k, v in top.items()}

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
        """``n`` samples per prompt (completions endpoint, or chat for ``ChatText`` prompts).

        A prompt whose request fails gets ``n`` generations with ``error`` set.
        """
        check_generation(max_new_tokens, n, temperature, top_p)
        results: list[list[Generation] | None] = [None] * len(prompts)

        def job(i: int) -> Callable[[], None]:
            def run() -> None:
                try:
                    results[i] = self._generate_one(prompts[i], max_new_tokens=max_new_tokens,
                                                    temperature=temperature, top_p=top_p, n=n,
                                                    seed=seed, logprobs=True)
                except _Fatal:
                    raise
                except Exception as exc:  # _Failed, or an answer this code could not read
                    results[i] = _failed_generations(self._row_failure(exc), n)
            return run

        try:
            self._run_jobs([(job(i), 1) for i in range(len(prompts))], progress)
        except (APIRequestError, KeyboardInterrupt) as exc:  # keep what was answered (billed)
            why = _unanswered(exc)
            exc.partial = [r if r is not None else _failed_generations(why, n)
                           for r in results]
            raise
        return results  # type: ignore[return-value]

    def _generate_one(self, prompt: str, *, max_new_tokens: int, temperature: float,
                      top_p: float, n: int, seed: int | None, logprobs: bool) -> list[Generation]:
        chat = isinstance(prompt, ChatText)
        body: dict[str, Any] = {"model": self.model_id, "temperature": temperature,
                                "top_p": top_p, "n": n}
        if seed is not None:
            body["seed"] = seed
        if chat:
            body.update(messages=[{"role": "user", "content": prompt}],
                        **{self._chat_max_key: max_new_tokens})
            if logprobs:
                body["logprobs"] = True
        else:
            body.update(prompt=prompt, max_tokens=max_new_tokens)
            if logprobs:
                body["logprobs"] = 1
        data = self._request("chat" if chat else "completions", body,
                             cacheable=temperature == 0, expect=n)
        choices = _in_order(data.get("choices") or [])
        if len(choices) != n:
            raise _Failed(f"malformed response: {len(choices)} choices, expected {n}")
        prompt_tokens = int((data.get("usage") or {}).get("prompt_tokens") or 0)
        return [_generation(ch, chat, prompt_tokens) for ch in choices]

    @property
    def _chat_max_key(self) -> str:
        # OpenAI's newer models refuse max_tokens; other servers may not know the new name.
        return "max_completion_tokens" if self._is_openai else "max_tokens"

    # ------------------------------------------------------------------ requests
    def _run_jobs(self, jobs: list[tuple[Callable[[], None], int]],
                  progress: ProgressFn | None) -> None:
        """Run jobs with at most ``max_concurrency`` in flight; report each job's weight."""
        if not jobs:
            return
        stop = threading.Event()

        def guarded(fn: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                _local.stop = stop
                fn()
            return run

        if self._pool is None:  # kept across calls: starting threads on a busy machine is slow
            self._pool = ThreadPoolExecutor(max_workers=self.max_concurrency,
                                            thread_name_prefix="promptscope-api")
        pool = self._pool
        pending: set[Future[None]] = set()
        weight: dict[Future[None], int] = {}
        fatal: str | None = None
        try:
            for fn, w in jobs:
                fut = pool.submit(guarded(fn))
                weight[fut] = w
                pending.add(fut)
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                for fut in done:
                    fut.result()  # a _Fatal (or a bug) stops the run here
                    if progress:
                        progress(weight[fut])
        except _Fatal as exc:
            fatal = str(exc)
        finally:
            stop.set()  # requests still waiting to retry give up
            for fut in pending:
                fut.cancel()
        if fatal is not None:
            # those already running end soon (answered, or failed the same way): wait, so
            # their results are in before the caller reads what finished
            wait(pending)
            raise APIRequestError(fatal)

    @property
    def _cache(self) -> Any:
        if not self.cache_enabled:
            return None
        with self._cache_lock:
            if self._cache_obj is None:
                from promptscope.models.cache import ResponseCache

                self._cache_obj = (ResponseCache(self._cache_path) if self._cache_path
                                   else ResponseCache.default())
        return self._cache_obj

    def _request_each(self, body: dict[str, Any], items: list[Any]) -> list[Any]:
        """The completions choice for each of ``items`` (prompts sent as ``body["prompt"]``),
        or the ``_Failed`` that stopped it; deterministic requests only.

        The cache is keyed per item, as if each were sent alone: a prompt answered before is
        neither sent nor billed again when others join it (a new variant, a new choice). The
        rest go in one request. When the server rejects that request (one prompt too long
        for the model, say), each prompt is sent alone, so only the bad one fails.
        """
        cache = self._cache
        keys = [cache.key(self.base_url, self.model_id, "completions", {**body, "prompt": [x]})
                if cache is not None else None for x in items]
        got: list[Any] = [cache.get(k) if k is not None else None for k in keys]
        got = [g["choices"][0] if g is not None else None for g in got]
        todo = [i for i, g in enumerate(got) if g is None]
        if not todo:
            self._tally.add(requests=1, cached=1)
            return got
        try:
            data = self._request("completions", {**body, "prompt": [items[i] for i in todo]},
                                 cacheable=False, expect=len(todo))
        except _Rejected as exc:
            if len(todo) == 1:
                got[todo[0]] = exc
                return got
            # The pack's failure is not the prompts': each gets its own answer (or failure).
            self._tally.add(failed=-1)
            stop = getattr(_local, "stop", None)
            for i in todo:
                got[i] = (_Failed("cancelled") if stop is not None and stop.is_set()
                          else self._request_each(body, [items[i]])[0])
            return got
        except _Failed as exc:
            for i in todo:
                got[i] = exc
            return got
        for i, choice in zip(todo, _in_order(data["choices"])):
            got[i] = choice
            if cache is not None:
                cache.put(keys[i], {"choices": [{**choice, "index": 0}]})
        return got

    def _request(self, kind: str, body: dict[str, Any], *, cacheable: bool,
                 probe: bool = False, expect: int | None = None) -> dict[str, Any]:
        """One request through the cache, with retries; raises ``_Failed`` or ``_Fatal``.

        A probe (a request that finds out what the server supports) is not tallied, and a
        refusal other than 401/403 comes back as ``_Refused``. A response without choices (or
        without the ``expect``-ed number of them) is retried as malformed and never cached.
        """
        tally = _Tally() if probe else self._tally
        cache = self._cache if cacheable else None
        key = cache.key(self.base_url, self.model_id, kind, body) if cache is not None else None
        if key is not None:
            hit = cache.get(key)
            if hit is not None:
                tally.add(requests=1, cached=1)
                return hit
        stop: threading.Event = getattr(_local, "stop", None) or threading.Event()
        attempt = 0
        while True:
            try:
                data = self._send(kind, body)
                usage = data.get("usage") if isinstance(data, dict) else None
                if isinstance(usage, dict):  # billed, also when refused as malformed below
                    tally.add(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                              completion_tokens=int(usage.get("completion_tokens") or 0))
                if not probe:  # a probe reads refusals itself (e.g. max_tokens=0, then 1)
                    _check_choices(data, expect)
                break
            except _Failed:
                tally.add(requests=1, failed=1)
                raise
            except _Retryable as exc:
                if attempt >= self.max_retries:
                    tally.add(requests=1, failed=1)
                    raise _Failed(f"{exc} (after {attempt + 1} attempt"
                                  f"{'s' if attempt else ''})") from None
                if exc.retry_after is not None:  # the server's word, within reason
                    delay = min(exc.retry_after, 4 * self.max_backoff)
                else:  # exponential backoff with jitter
                    delay = min(self.max_backoff, self.backoff * 2 ** attempt)
                    delay *= random.uniform(0.5, 1.0)
                attempt += 1
                tally.add(retries=1)
                if stop.wait(delay):
                    tally.add(requests=1, failed=1)
                    raise _Failed("cancelled") from None
            except _Refused as exc:
                tally.add(requests=1, failed=1)
                if exc.status in (401, 403, 429) or exc.status == 404 and not probe:
                    raise _Fatal(str(exc)) from None
                if probe:
                    raise
                raise (_Rejected if exc.status in (400, 413, 422) else _Failed)(str(exc)) \
                    from None
        tally.add(requests=1)
        if key is not None:
            cache.put(key, data)
        return data

    def _send(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """One HTTP request; raises ``_Retryable`` or ``_Refused`` with a key-free message."""
        import openai

        endpoint = self._client.chat.completions if kind == "chat" else self._client.completions
        try:
            resp = endpoint.create(**body)
        except openai.APITimeoutError:
            raise _Retryable(f"timed out after {self.timeout:g} s") from None
        except openai.APIConnectionError as exc:
            raise _Retryable(f"connection failed ({self._redact(_root_cause(exc))})") from None
        except openai.APIStatusError as exc:
            status = exc.status_code
            reason = self._redact(_message(exc))
            if status == 429 and "quota" in f"{reason} {_error_code(exc)}".lower():
                raise _Refused(429, f"HTTP 429: {reason} (out of quota: retrying will not "
                               "help; check the account's plan and billing)") from None
            if status in (408, 409, 429) or status >= 500:
                raise _Retryable(f"HTTP {status}: {reason}",
                                 _retry_after(exc.response.headers)) from None
            if status == 401:
                raise _Refused(401, f"the server at {_public_url(self.base_url)} rejected the "
                               "API key (HTTP 401); check the key") from None
            raise _Refused(status, f"HTTP {status}: {self._redact(_message(exc))}") from None
        except (json.JSONDecodeError, openai.APIResponseValidationError):
            raise _Retryable("malformed response (not JSON)") from None
        if not hasattr(resp, "model_dump"):  # a body that was not JSON at all
            raise _Retryable("malformed response (not JSON)")
        return resp.model_dump()

    def _redact(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return text

    def _check_server(self) -> None:
        """List the server's models: a clear error for a bad URL, key or model name."""
        import openai

        where = _public_url(self.base_url)
        try:
            listed = list(self._client.models.list(timeout=min(self.timeout, 15.0)))
        except openai.APIConnectionError as exc:
            raise ModelLoadError(
                f"Cannot reach the API server at {where} ({self._redact(_root_cause(exc))}). "
                "Is it running? Check base_url= (--base-url).") from None
        except openai.AuthenticationError:
            if not self._secrets:  # a local server's URL gets no key unless asked
                raise ModelLoadError(
                    f"The server at {where} wants an API key (HTTP 401) and none was sent: "
                    "pass api_key=... or api_key_env='VAR' (--api-key-env VAR).") from None
            raise ModelLoadError(f"The server at {where} rejected the API key (HTTP 401).") \
                from None
        except openai.APIStatusError as exc:
            hint = "" if self.base_url.endswith("/v1") else " (most servers want it to end in /v1)"
            raise ModelLoadError(f"The server at {where} did not list its models (HTTP "
                                 f"{exc.status_code}); check the URL{hint}.") from None
        except (json.JSONDecodeError, openai.APIResponseValidationError):
            raise ModelLoadError(f"{where} did not answer like an OpenAI-compatible API; "
                                 "check the URL.") from None
        served = [m.id for m in listed]
        # vLLM reports the folder or hub id it loaded: the tokenizer for token-level analyses
        self._served_root = next((getattr(m, "root", None) for m in listed
                                  if m.id == self.model_id), None)
        if served and self.model_id not in served:
            shown = ", ".join(served[:10]) + (" ..." if len(served) > 10 else "")
            raise ModelLoadError(f"The server at {where} does not serve '{self.model_id}'; it "
                                 f"serves: {shown}.")


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Unsupported(OSError):
    """The server refused an endpoint for good (no such route, or it cannot do this)."""


def _check_choices(data: Any, expect: int | None) -> None:
    """Refuse an answer that must not be cached: an error body or no choices (``_Retryable``:
    a passing fault), or the wrong number of choices (``_Failed`` at once: a server that
    ignores ``n`` or a batch would answer the same way again, and each retry is billed)."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if isinstance(data, dict) and data.get("error"):
        raise _Retryable(f"the server answered with an error: {str(data['error'])[:200]}")
    if not isinstance(choices, list) or not choices:
        raise _Retryable("malformed response: no choices")
    if expect is not None and len(choices) != expect:
        raise _Failed(f"malformed response: {len(choices)} choices, expected {expect}")


def _error_code(exc: Any) -> str:
    body = getattr(exc, "body", None)
    err = body.get("error") if isinstance(body, dict) else None
    return " ".join(str(err.get(k) or "") for k in ("code", "type")) if isinstance(err, dict) \
        else ""


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------- helpers
def _check_url(url: str) -> None:
    parts = urlparse(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ModelLoadError(f"'{_public_url(url)}' is not an http(s) URL; give the API root, "
                             "e.g. http://localhost:8000/v1.")


def _public_url(url: str) -> str:
    """The URL without user info, query or fragment (they may carry credentials)."""
    try:
        p = urlparse(url)
        host = p.hostname or ""
        netloc = f"{host}:{p.port}" if p.port else host
        return urlunparse((p.scheme, netloc, p.path, "", "", ""))
    except ValueError:
        return "<invalid URL>"


def _retry_after(headers: Any) -> float | None:
    """Seconds from ``Retry-After`` (seconds or an HTTP date) or ``retry-after-ms``."""
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def _message(exc: Any) -> str:
    """The server's error message (first line, shortened)."""
    body = getattr(exc, "body", None)
    msg = None
    if isinstance(body, dict):
        err = body.get("error")
        msg = err.get("message") if isinstance(err, dict) else body.get("message")
    msg = msg or getattr(exc, "message", "") or type(exc).__name__
    return (str(msg).splitlines() or [""])[0][:300]


def _failed_generations(error: str, n: int) -> list[Generation]:
    return [Generation(text="", tokens=[], logprob=math.nan, prompt_tokens=0,
                       finish_reason="error", error=error) for _ in range(n)]


def _unanswered(exc: BaseException) -> str:
    """The error of a row with no answer when ``exc`` stopped the run: after a fatal error the
    requests still waiting were not sent; after a Ctrl-C some may have been (and billed)."""
    if isinstance(exc, KeyboardInterrupt):
        return "no answer: interrupted (Ctrl-C; the request may have been sent)"
    return f"not sent: {exc}"


def _failed_score(error: str) -> Score:
    return Score(logprob=math.nan, token_logprobs=[], tokens=[], prompt_tokens=0, error=error)


def _echo_score(prompt: str, cont: str, lp: dict[str, Any], generated: int) -> Score:
    """The continuation's tokens and log-probs out of an echoed ``prompt + cont``."""
    tokens = list(lp.get("tokens") or [])
    values = list(lp.get("token_logprobs") or [])
    offsets = list(lp.get("text_offset") or [])
    if generated:
        tokens, values, offsets = tokens[:-generated], values[:-generated], offsets[:-generated]
    if not tokens or len(values) != len(tokens):
        return _failed_score("malformed response: no echoed log-probs")
    # Walk back from the end until the tokens spell the continuation.
    text = ""
    start = len(tokens)
    while start > 0 and len(text) < len(cont):
        start -= 1
        text = tokens[start] + text
    # vLLM writes a character split over byte tokens on its last piece and "" on the others:
    # those pieces belong to the continuation's first character too (the prompt ends whole).
    while text == cont and start > 0 and tokens[start - 1] == "":
        start -= 1
    if text != cont and len(offsets) == len(tokens):
        # Token strings may not spell the text (partial UTF-8): use the character offsets.
        end = offsets[-1] + len(tokens[-1])
        cut = end - len(cont)
        start = next((k for k, o in enumerate(offsets) if o >= cut), len(tokens))
        text = cont if start < len(tokens) and offsets[start] == cut else text
    if text != cont:
        return _failed_score("the server's tokenizer merges the end of the prompt with the "
                             "continuation; end the prompt before a space or start the "
                             "continuation with one")
    picked = values[start:]
    if start == 0 or any(v is None for v in picked):
        return _failed_score("malformed response: missing echoed log-probs")
    return Score(logprob=math.fsum(picked), token_logprobs=[float(v) for v in picked],
                 tokens=tokens[start:], prompt_tokens=start)


def _token_id(key: str) -> int:
    """``"token_id:712"`` (vLLM's ``return_tokens_as_token_ids``) -> 712."""
    return int(str(key).rpartition(":")[2])


def _target_logprob(choice: dict[str, Any], pos: int, target: int) -> tuple[float, int]:
    """Log-prob and rank of the echoed token at ``pos`` (the target after its prompt)."""
    exact = choice.get("prompt_logprobs")  # vLLM: every prompt position, with ranks
    if isinstance(exact, list) and len(exact) > pos and exact[pos]:
        entry = exact[pos].get(str(target))
        if entry is not None:
            return float(entry["logprob"]), int(entry["rank"])
    lp = choice.get("logprobs") or {}
    values, tops = lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
    if len(values) <= pos or values[pos] is None:
        return -math.inf, 0
    value = float(values[pos])
    best = max((tops[pos] or {}).values(), default=value) if len(tops) > pos else value
    return value, 1 if value >= best else 2


def _in_order(choices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Choices in the order of their ``index`` (a server may leave it out: then as given)."""
    return sorted(choices, key=lambda ch: ch.get("index") if isinstance(ch.get("index"), int)
                  else 0)


def _first_top_logprobs(data: dict[str, Any], chat: bool) -> dict[bytes, float] | None:
    """``{token's UTF-8 bytes: logprob}`` of the first generated token, or ``None``.

    A chat answer gives each token's ``bytes``: a token that holds part of a character (a rare
    CJK character, an emoji) has no text of its own (OpenAI writes ``"bytes:\\xe6\\x97"``)."""
    try:
        lp = data["choices"][0]["logprobs"]
        if chat:
            return {bytes(t["bytes"]) if t.get("bytes") else str(t["token"]).encode():
                    t["logprob"] for t in lp["content"][0]["top_logprobs"]}
        return {str(t).encode(): v for t, v in lp["top_logprobs"][0].items()}
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None


def _match_top(choice: str, top: dict[bytes, float]) -> Score:
    """A choice's log-prob among the first token's top log-probs (see module docs), matched
    on UTF-8 bytes, so a first token that holds part of the choice's first character counts."""
    want = choice.strip().encode()
    hits = [t for t in top if _stripped(t) == want] or \
        [t for t in top if _stripped(t) and want.startswith(_stripped(t))]
    if not hits:
        return Score(logprob=-math.inf, token_logprobs=[], tokens=[], prompt_tokens=0)
    vals = [top[t] for t in hits]
    best = max(vals)
    total = best + math.log(math.fsum(math.exp(v - best) for v in vals))
    return Score(logprob=total, token_logprobs=vals,
                 tokens=[t.decode(errors="replace") for t in hits], prompt_tokens=0)


def _stripped(token: bytes) -> bytes:
    """A token's bytes without surrounding whitespace (any script's, as ``str.strip``), its
    bytes that are no whole character kept as they are."""
    return token.decode(errors="surrogateescape").strip().encode(errors="surrogateescape")


def _generation(ch: dict[str, Any], chat: bool, prompt_tokens: int) -> Generation:
    lp = ch.get("logprobs") or {}
    if chat:
        text = (ch.get("message") or {}).get("content") or ""
        items = lp.get("content") or []
        tokens = [t.get("token", "") for t in items]
        values = [t.get("logprob") for t in items]
    else:
        text = ch.get("text") or ""
        tokens = list(lp.get("tokens") or [])
        values = list(lp.get("token_logprobs") or [])
    logprob = math.fsum(v for v in values if v is not None) if values else math.nan
    return Generation(text=text, tokens=tokens, logprob=logprob, prompt_tokens=prompt_tokens,
                      finish_reason=ch.get("finish_reason") or "length")


