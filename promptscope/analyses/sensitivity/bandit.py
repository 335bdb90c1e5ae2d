"""FormatSpread's search: Thompson sampling for the best and the worst format under a budget.

Each format is an arm whose reward is "the model answered this example right". Every arm has a
Beta posterior on its accuracy (prior Beta(1, 1)). A round makes two pulls: one for the arm whose
posterior draw is the highest (looking for the best format) and one for the lowest (the worst),
each on the arm's next ``batch`` examples. All arms walk the same seeded permutation of the
examples, so two formats are always compared on the same examples (paired, lower variance), and
no format sees an example twice. Nothing here touches a model: ``evaluate`` is a callback, so the
search is tested on synthetic accuracy tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from promptscope.errors import PromptscopeError


@dataclass(frozen=True)
class Pull:
    """One evaluation request: ``format`` on the given example indices, for ``side``."""

    format: int
    examples: tuple[int, ...]
    side: str  # "best", "worst" or "all" (exhaustive)


@dataclass
class SpreadBandit:
    """Posterior state of the best/worst-format search.

    Example:
        >>> table = np.array([[1, 1, 0, 1], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=bool)
        >>> b = run_bandit(lambda pulls: [table[p.format, list(p.examples)] for p in pulls],
        ...                n_formats=3, n_examples=4, budget=12, batch=2, seed=0)
        >>> b.best(), b.worst(), b.spent
        (2, 1, 12)
    """

    n_formats: int
    n_examples: int
    batch: int = 10
    seed: int = 0
    prior: tuple[float, float] = (1.0, 1.0)
    top_two: float | None = 0.5
    successes: Any = None
    trials: Any = None
    spent: int = 0
    trace: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.order = self.rng.permutation(self.n_examples)
        self.successes = np.zeros(self.n_formats, dtype=np.int64)
        self.trials = np.zeros(self.n_formats, dtype=np.int64)

    def open_arms(self) -> Any:
        """Formats that still have unseen examples."""
        return np.flatnonzero(self.trials < self.n_examples)

    def posterior_mean(self) -> Any:
        a, b = self.prior
        return (self.successes + a) / (self.trials + a + b)

    def _take(self, f: int, limit: int, side: str) -> Pull:
        start = int(self.trials[f])
        n = min(self.batch, self.n_examples - start, limit)
        return Pull(f, tuple(int(i) for i in self.order[start:start + n]), side)

    def _draw(self, arms: Any) -> Any:
        a, b = self.prior
        return self.rng.beta(self.successes[arms] + a, self.trials[arms] - self.successes[arms]
                             + b)

    def _thompson(self, arms: Any, sign: int) -> int:
        """The arm to pull for the best (``sign`` +1) or worst (-1) side.

        Plain Thompson sampling pulls the arm whose posterior draw is the most extreme. With
        ``top_two`` (Russo's top-two Thompson sampling, made for *identifying* the extreme arm
        rather than for reward), that leader is pulled with probability ``top_two``; otherwise
        draws are repeated until another arm comes out on top, the challenger, and it is pulled.
        """
        def pick(draws: Any) -> int:
            return int(arms[np.argmax(sign * draws)])

        leader = pick(self._draw(arms))
        if self.top_two is None or len(arms) < 2 or self.rng.random() < self.top_two:
            return leader
        for _ in range(50):
            challenger = pick(self._draw(arms))
            if challenger != leader:
                return challenger
        return leader

    def propose(self, limit: int) -> list[Pull]:
        """This round's pulls (at most ``limit`` evaluations in all)."""
        arms = self.open_arms()
        if not len(arms) or limit < 1:
            return []
        pulls = [self._take(self._thompson(arms, +1), limit, "best")]
        left = limit - len(pulls[0].examples)
        # The worst-side pull goes to another arm when there is one: its examples would repeat.
        others = arms[arms != pulls[0].format]
        if left > 0 and len(others):
            pulls.append(self._take(self._thompson(others, -1), left, "worst"))
        return pulls

    def update(self, pull: Pull, correct: Sequence[bool]) -> None:
        """Record the outcome of ``pull`` (one bool per example)."""
        if len(correct) != len(pull.examples):
            raise ValueError("update() needs one outcome per example of the pull.")
        self.successes[pull.format] += int(np.sum(correct))
        self.trials[pull.format] += len(correct)
        self.spent += len(correct)

    def _pick(self, sign: int) -> int:
        seen = np.flatnonzero(self.trials > 0)
        if not len(seen):
            return -1
        a, b = self.prior
        al = self.successes[seen] + a
        be = self.trials[seen] - self.successes[seen] + b
        mean = al / (al + be)
        sd = np.sqrt(al * be / ((al + be) ** 2 * (al + be + 1)))
        # A cautious pick: the best (worst) posterior mean less (plus) one posterior standard
        # deviation, so a format seen on one lucky batch is not named before it is measured.
        key = np.lexsort((-self.trials[seen], -(sign * mean - sd)))
        return int(seen[key[0]])

    def best(self) -> int:
        """The format named best: the highest posterior mean minus one posterior std."""
        return self._pick(+1)

    def worst(self) -> int:
        """The format named worst: the lowest posterior mean plus one posterior std."""
        return self._pick(-1)

    def record(self) -> None:
        """Append the current state to :attr:`trace` (after each round)."""
        b, w = self.best(), self.worst()
        mean = self.posterior_mean()
        self.trace.append({"round": len(self.trace) + 1, "evaluations": self.spent,
                           "best": b, "worst": w, "best_mean": float(mean[b]),
                           "worst_mean": float(mean[w]),
                           "formats_seen": int((self.trials > 0).sum())})


def check_budget(budget: int, n_formats: int, n_examples: int, batch: int) -> None:
    """Fail clearly when the search cannot compare even two formats."""
    if n_formats < 2:
        raise PromptscopeError("A spread needs at least two formats (n_formats >= 2).")
    if n_examples < 1:
        raise PromptscopeError("A spread needs at least one example.")
    if batch < 1:
        raise PromptscopeError("batch must be at least 1.")
    need = 2 * min(batch, n_examples)
    if budget < need:
        raise PromptscopeError(
            f"A budget of {budget} evaluations cannot evaluate two formats on a batch of "
            f"{min(batch, n_examples)} examples each; give budget >= {need} (or a smaller "
            "batch). Exhaustive evaluation needs "
            f"{n_formats * n_examples} ({n_formats} formats x {n_examples} examples).")


def run_bandit(evaluate: Callable[[list[Pull]], Sequence[Sequence[bool]]], n_formats: int,
               n_examples: int, budget: int, *, batch: int = 10, seed: int = 0,
               top_two: float | None = 0.5,
               on_round: Callable[[SpreadBandit, list[Pull], Any], None] | None = None
               ) -> SpreadBandit:
    """Search for the best and the worst format with at most ``budget`` evaluations.

    ``evaluate(pulls)`` returns, for each pull, one bool per example (answered right). With
    ``budget >= n_formats * n_examples`` every format is evaluated on every example instead
    (exhaustive; pulls of side ``"all"``). ``on_round(bandit, pulls, outcomes)`` is called after
    each round (progress bars, live plots, saving rows). ``top_two``: see
    :meth:`SpreadBandit._thompson` (``None`` = plain Thompson sampling).
    """
    check_budget(budget, n_formats, n_examples, batch)
    bandit = SpreadBandit(n_formats, n_examples, batch=batch, seed=seed, top_two=top_two)
    exhaustive = budget >= n_formats * n_examples
    while bandit.spent < budget:
        if exhaustive:  # several formats per round: larger backend batches
            per_round = max(2, math.ceil(64 / max(1, n_examples)))
            arms = bandit.open_arms()[:per_round]
            pulls = [Pull(int(f), tuple(int(i) for i in bandit.order), "all") for f in arms]
        else:
            pulls = bandit.propose(budget - bandit.spent)
        if not pulls:
            break
        outcomes = evaluate(pulls)
        for p, out in zip(pulls, outcomes):
            bandit.update(p, out)
        bandit.record()
        if on_round is not None:
            on_round(bandit, pulls, outcomes)
    return bandit


def wilson_interval(successes: Any, trials: Any, z: float = 1.96) -> tuple[Any, Any]:
    """Wilson score interval of a binomial proportion (95 % by default); NaN where no trials."""
    s = np.asarray(successes, dtype=float)
    n = np.asarray(trials, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = s / n
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half
