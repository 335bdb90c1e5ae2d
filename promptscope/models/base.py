"""The model backend interface: the seam between white-box and black-box models.

Analyses talk to a :class:`Model`. Everything a black-box (HTTP) model can do is here; an
analysis that needs internals calls :meth:`Model.require` with a capability name and gets a clear
:class:`~promptscope.errors.CapabilityError` on a backend that lacks it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from promptscope.errors import CapabilityError, PromptscopeError

#: Capability names an analysis may require.
CAPABILITIES = {
    "score": "log-probabilities of given continuations",
    "token_logprobs": "next-token log-probabilities after token-id prompts",
    "forward": "running the model's own forward pass on token ids (local weights)",
    "generate": "text generation",
    "attention": "attention weights and attention steering",
    "gradients": "gradients through the input embeddings",
    "hidden_states": "hidden states and activation steering",
}

ProgressFn = Callable[[int], None]


@dataclass
class Score:
    """Log-probability of one continuation after one prompt (natural log)."""

    logprob: float
    token_logprobs: list[float]
    tokens: list[str]
    prompt_tokens: int
    #: Why this score could not be computed (an API request that failed for good), else None.
    error: str | None = None


@dataclass
class Generation:
    """One generated sample."""

    text: str
    tokens: list[str]
    logprob: float
    prompt_tokens: int
    finish_reason: str = "length"
    #: Backend facts: ``"stop"``, the text of the stop token that ended it, where it scores
    #: back as that token (transformers models; POSIX scores responses with it).
    extra: dict[str, Any] = field(default_factory=dict)
    #: Why this sample could not be generated (an API request that failed for good), else None.
    error: str | None = None


def check_generation(max_new_tokens: int, n: int, temperature: float, top_p: float) -> None:
    """The one check of generation settings (backends and ``run_prompt``, before a session)."""
    wrong = [f"{name} (--{name.replace('_', '-')}) must be {rule}, not {value}"
             for name, value, ok, rule in [
                 ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, "at least 1"),
                 ("n", n, n >= 1, "at least 1"),
                 ("temperature", temperature, temperature >= 0, ">= 0 (0: greedy)"),
                 ("top_p", top_p, 0 < top_p <= 1, "in (0, 1]")] if not ok]
    if wrong:
        raise PromptscopeError("Generation: " + "; ".join(wrong) + ".")


class Model(ABC):
    """A language model promptscope can run.

    Subclasses set ``name`` (shown in tables and saved with sessions) and ``capabilities``.
    """

    name: str = "model"
    capabilities: frozenset[str] = frozenset()
    #: Whether single scores/generations can fail without stopping the run (their ``error`` is
    #: set); runs on such a backend have an ``error`` column.
    per_request_errors: bool = False

    def require(self, capability: str, analysis: str) -> None:
        """Raise a clear error if this backend cannot do ``capability`` for ``analysis``."""
        if capability not in self.capabilities:
            what = CAPABILITIES.get(capability, capability)
            raise CapabilityError(
                f"{analysis} needs {what}, which the {type(self).__name__} backend "
                f"('{self.name}') does not provide. Use a local transformers model "
                "(promptscope.load_model('organism') or a model folder)."
            )

    @abstractmethod
    def score(
        self,
        prompts: Sequence[str],
        continuations: Sequence[str],
        progress: ProgressFn | None = None,
    ) -> list[Score]:
        """Log-prob of ``continuations[i]`` after ``prompts[i]`` for every i (teacher forced)."""

    @abstractmethod
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
        """``n`` samples per prompt (greedy when ``temperature == 0``)."""

    def begin_run(self, mode: str, chat: bool) -> None:
        """Called before a run's first request (``mode``: choices, target or generate).

        A backend may check here that it can do the run and reset its per-run tally.
        """
        return None

    def run_info(self) -> dict[str, Any]:
        """Per-run facts to save in the run's params (requests, tokens, cost); ``{}`` if none."""
        return {}

    def chat_prompt(self, user_message: str) -> str:
        """Wrap a user message in the model's chat template (ready for the assistant turn)."""
        raise CapabilityError(f"Model '{self.name}' has no chat template; drop --chat.")

    def describe(self) -> dict[str, Any]:
        """JSON-friendly facts saved with every session (name, backend, device, dtype...)."""
        return {"name": self.name, "backend": type(self).__name__}

    def __repr__(self) -> str:
        facts = ", ".join(f"{k}={v}" for k, v in self.describe().items() if k != "name")
        return f"<{type(self).__name__} '{self.name}' {facts}>"
