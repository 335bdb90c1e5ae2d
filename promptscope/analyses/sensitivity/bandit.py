"""FormatSpread's search: Thompson sampling for the best and the worst format under a budget.

Each format is an arm whose reward is "the model answered this example right", and the quantity
searched is each format's accuracy over *all* the examples (a finite population). All arms walk
the same seeded permutation of the examples, so formats are compared on the same examples and no
format sees an example twice. A round makes two pulls, one for each side (best, worst), each on
the arm's next ``batch`` examples:

* every format is first seen on one batch;
* formats that can no longer be the extreme of a side are set aside for that side: their
  finite-population bound (observed accuracy +- ``z`` standard errors, shrunk by the share of
  examples still unseen, so a fully seen format has its exact accuracy) falls short of another
  format's bound on the other side;
* among the rest, top-two Thompson sampling (Russo, 2016) picks the arm: a draw of each format's
  full-population accuracy (its observed successes plus a beta-binomial draw for the unseen
  examples); the arm with the most extreme draw is pulled with probability ``top_two``, otherwise
  a challenger that comes out on top in a repeated draw;
* when one format is left on both sides, the search stops before its budget.

An evaluation that could not be scored (``None`` instead of a bool: an API request that failed
for good) uses up its example but is no evidence: it leaves the format's population, so each
format's accuracy is over the examples it could be scored on.

Nothing here touches a model: ``evaluate`` is a callback, so the search is tested on synthetic
accuracy tables (``bench/bench_spread.py`` measures it against a clairvoyant bound).
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
    side: str  # "best", "worst", "all" (exhaustive) or "report" (outside the budget)


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
    z: float = 1.5
    successes: Any = None
    trials: Any = None  # examples used, scored or not (the next one is order[trials])
    failed: Any = None  # of which could not be scored
    spent: int = 0  # evaluations of the search (the budget's)
    reported: int = 0  # evaluations outside the budget: the named formats measured exactly
    trace: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.order = self.rng.permutation(self.n_examples)
        self.successes = np.zeros(self.n_formats, dtype=np.int64)
        self.trials = np.zeros(self.n_formats, dtype=np.int64)
        self.failed = np.zeros(self.n_formats, dtype=np.int64)

    @property
    def scored(self) -> Any:
        """Evaluations per format that count: answered right or wrong."""
        return self.trials - self.failed

    def population(self) -> Any:
        """Examples per format whose answers can count (all but the failed ones)."""
        return self.n_examples - self.failed

    def open_arms(self) -> Any:
        """Formats that still have unseen examples."""
        return np.flatnonzero(self.trials < self.n_examples)

    def posterior_mean(self) -> Any:
        a, b = self.prior
        return (self.successes + a) / (self.scored + a + b)

    def bounds(self) -> tuple[Any, Any, Any]:
        """Observed accuracy and its finite-population bounds on each format's accuracy over
        all examples: +- ``z`` standard errors times sqrt((N - n) / (N - 1)) (exact once a
        format has seen every example); unseen formats are unbounded."""
        n, s, big_n = self.scored, self.successes, self.population()
        seen = n > 0
        mean = np.where(seen, s / np.maximum(n, 1), 0.5)
        a, b = self.prior
        smooth = (s + a) / (n + a + b)  # keeps the error above 0 for 0 % or 100 % so far
        fpc = (big_n - n) / np.maximum(1, big_n - 1)
        half = self.z * np.sqrt(smooth * (1 - smooth) / np.maximum(n, 1) * fpc)
        half = np.where(seen, half, np.inf)
        return mean, mean - half, mean + half

    def contenders(self, sign: int) -> Any:
        """Formats that may still be the best (``sign`` +1) or the worst (-1); not those with
        no example left that could be scored."""
        mean, lo, hi = self.bounds()
        if sign < 0:
            lo, hi = -hi, -lo
        alive = self.population() > 0
        if not alive.any():
            return np.flatnonzero(alive)
        return np.flatnonzero(alive & (hi >= lo[alive].max() - 1e-12))

    def _take(self, f: int, limit: int, side: str) -> Pull:
        start = int(self.trials[f])
        n = min(self.batch, self.n_examples - start, limit)
        return Pull(f, tuple(int(i) for i in self.order[start:start + n]), side)

    def _draw(self, arms: Any) -> Any:
        """One posterior draw of each arm's accuracy over all examples."""
        a, b = self.prior
        n, s, big_n = self.scored[arms], self.successes[arms], self.population()[arms]
        rate = self.rng.beta(s + a, n - s + b)
        return (s + self.rng.binomial(big_n - n, rate)) / np.maximum(big_n, 1)

    def _thompson(self, arms: Any, sign: int) -> int:
        """Top-two Thompson sampling among ``arms`` for the best (``sign`` +1) or worst (-1)
        side: the arm with the most extreme draw with probability ``top_two`` (always, when
        ``top_two`` is None), otherwise the first other arm to come out on top in a new draw."""
        def pick() -> int:
            return int(arms[np.argmax(sign * self._draw(arms))])

        leader = pick()
        if self.top_two is None or len(arms) < 2 or self.rng.random() < self.top_two:
            return leader
        for _ in range(50):
            challenger = pick()
            if challenger != leader:
                return challenger
        return leader

    def _choose(self, sign: int, taken: Sequence[int]) -> int | None:
        """The arm this side pulls next, or None when the side is settled."""
        fresh = [int(f) for f in np.flatnonzero(self.trials == 0) if f not in taken]
        if fresh:
            return fresh[0]
        arms = self.contenders(sign)
        if len(arms) < 2:
            return None
        pulled = self._thompson(arms, sign)
        open_ = [int(f) for f in arms if self.trials[f] < self.n_examples and f not in taken]
        if pulled in open_:
            return pulled
        # A fully seen (exactly known) or already pulled arm: measure the least-seen contender.
        return min(open_, key=lambda f: self.trials[f]) if open_ else None

    def propose(self, limit: int) -> list[Pull]:
        """This round's pulls (at most ``limit`` evaluations in all); empty when both sides are
        settled or nothing is left to evaluate."""
        pulls: list[Pull] = []
        for sign, side in ((+1, "best"), (-1, "worst")):
            left = limit - sum(len(p.examples) for p in pulls)
            arm = self._choose(sign, [p.format for p in pulls]) if left > 0 else None
            if arm is not None:
                pulls.append(self._take(arm, left, side))
        return pulls

    def update(self, pull: Pull, correct: Sequence[bool | None]) -> None:
        """Record the outcome of ``pull``: one bool per example, None where the answer could
        not be scored."""
        if len(correct) != len(pull.examples):
            raise ValueError("update() needs one outcome per example of the pull.")
        self.successes[pull.format] += sum(1 for c in correct if c is not None and c)
        self.failed[pull.format] += sum(1 for c in correct if c is None)
        self.trials[pull.format] += len(correct)
        if pull.side == "report":
            self.reported += len(correct)
        else:
            self.spent += len(correct)

    def rest_of(self, formats: Sequence[int]) -> list[Pull]:
        """Pulls (side ``"report"``, outside the budget) that evaluate each of ``formats`` on
        every example it has not seen, so its accuracy is exact: FormatSpread measures the two
        formats the search named this way, as the paper's code does before it reports them."""
        return [Pull(int(f), tuple(int(i) for i in self.order[self.trials[f]:]), "report")
                for f in dict.fromkeys(formats) if f >= 0 and self.trials[f] < self.n_examples]

    def _pick(self, sign: int, other_than: int = -1) -> int:
        seen = np.flatnonzero(self.scored > 0)
        if len(seen) > 1:  # a well-measured format can have the best lower bound and the
            seen = seen[seen != other_than]  # worst upper one: then the spread would read 0
        if not len(seen):
            return -1
        mean, lo, hi = self.bounds()
        # A cautious pick: the best lower (worst upper) bound, so a format seen on one lucky
        # batch is not named before it is measured; ties go to the more measured format.
        key = np.lexsort((-self.scored[seen], -(lo if sign > 0 else -hi)[seen]))
        return int(seen[key[0]])

    def best(self) -> int:
        """The format named best: the highest finite-population lower bound."""
        return self._pick(+1)

    def worst(self) -> int:
        """The format named worst: the lowest finite-population upper bound, among the
        formats other than :meth:`best` (when another has been evaluated)."""
        return self._pick(-1, other_than=self.best())

    def record(self) -> None:
        """Append the current state to :attr:`trace` (after each round)."""
        b, w = self.best(), self.worst()
        mean = self.posterior_mean()
        self.trace.append({"round": len(self.trace) + 1, "evaluations": self.spent,
                           "best": b, "worst": w,  # -1: nothing scored yet
                           "best_mean": float(mean[b]) if b >= 0 else math.nan,
                           "worst_mean": float(mean[w]) if w >= 0 else math.nan,
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
               top_two: float | None = 0.5, z: float = 1.5,
               on_round: Callable[[SpreadBandit, list[Pull], Any], None] | None = None
               ) -> SpreadBandit:
    """Search for the best and the worst format with at most ``budget`` evaluations.

    ``evaluate(pulls)`` returns, for each pull, one bool per example (answered right; None:
    could not be scored). With
    ``budget >= n_formats * n_examples`` every format is evaluated on every example instead
    (exhaustive; pulls of side ``"all"``). ``on_round(bandit, pulls, outcomes)`` is called after
    each round (progress bars, live plots, saving rows). ``top_two``: see
    :meth:`SpreadBandit._thompson` (``None`` = plain Thompson sampling); ``z``: the width of
    the finite-population bounds that set formats aside and name the extremes, in standard
    errors. The search may stop below ``budget`` once both sides are settled.
    """
    check_budget(budget, n_formats, n_examples, batch)
    bandit = SpreadBandit(n_formats, n_examples, batch=batch, seed=seed, top_two=top_two,
                          z=z)
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
