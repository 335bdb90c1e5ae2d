"""Benchmark: FormatSpread's bandit budget and scoring throughput.

1. Search efficiency. For F formats x N examples with a known correctness table (synthetic
   tables with paper-like accuracy ranges, and the real table of the model organism on its 24
   formats), the Thompson-sampling search runs with the exhaustive budget as a cap; after each
   round we note whether it names the true best and the true worst format (a tie counts as
   right). "Converged" is the evaluations spent when it named both and kept naming them until
   the end of the run, as a fraction of exhaustive evaluation (F x N). Goal: <= 25 % in >= 80 %
   of seeds. Because real formats often tie or differ by one example, each table also reports
   a tolerance variant: the named format's true accuracy within ``--tol`` of the extreme. For
   reference, the last column is the share of tables on which a clairvoyant search (it knows
   which formats are the extremes and only has to *verify* them) could do so within 25 %
   (:func:`clairvoyant_share`): the goal's ceiling for any search that is right for a reason.
2. Throughput. Examples scored per second by ``format_spread`` (all prompts of a round scored in
   one backend call) vs a naive loop that scores one example (its choices) per call.

    python bench/bench_spread.py                  # synthetic 24 x 200 and the organism table
    python bench/bench_spread.py --seeds 10 --organism-examples 60   # quicker
    python bench/bench_spread.py --table /tmp/organism.npy   # save, later re-analyse the table
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from statistics import NormalDist

import numpy as np

from promptscope.analyses.sensitivity.bandit import run_bandit


def search(table: np.ndarray, seed: int, batch: int) -> list[tuple[int, int, int]]:
    """Run the search on a known table; (evaluations spent, named best, named worst) after
    each round. The cap is one below exhaustive (an exhaustive budget switches to a sweep)."""
    n_formats, n_examples = table.shape
    marks: list[tuple[int, int, int]] = []

    def evaluate(pulls):
        return [table[p.format, list(p.examples)] for p in pulls]

    def on_round(b, pulls, outcomes):
        marks.append((b.spent, b.best(), b.worst()))

    run_bandit(evaluate, n_formats, n_examples, n_formats * n_examples - 1, batch=batch,
               seed=seed, on_round=on_round)
    return marks


def convergence(table: np.ndarray, marks: list[tuple[int, int, int]], tol: float = 0.0
                ) -> float:
    """Fraction of exhaustive evaluations after which the search names the true best and worst
    formats for good (1.0 when it only gets there at the very end)."""
    acc = table.mean(axis=1)
    good_best = acc >= acc.max() - tol - 1e-12
    good_worst = acc <= acc.min() + tol + 1e-12
    since = None
    for spent, best, worst in marks:
        since = (since or spent) if good_best[best] and good_worst[worst] else None
    return (since if since is not None else table.size) / table.size


def spread_recovered(table: np.ndarray, marks: list[tuple[int, int, int]],
                     share: float = 0.25) -> float:
    """With ``share`` of the exhaustive budget spent: the true accuracy gap between the formats
    the search names best and worst, as a fraction of the true spread."""
    acc = table.mean(axis=1)
    within = [m for m in marks if m[0] <= share * table.size]
    _, best, worst = within[-1]
    return float((acc[best] - acc[worst]) / (acc.max() - acc.min()))


def clairvoyant_share(table: np.ndarray, z: float, batch: int = 10) -> float:
    """Evaluations, as a share of exhaustive, that a search knowing the true best and worst
    formats needs to *show* them at ``z`` standard errors: both extremes seen on every example,
    every other format on enough examples (in batches) that its finite-population bound clears
    both extremes (a format tied with an extreme: every example)."""
    n_formats, n_examples = table.shape
    acc = table.mean(axis=1)
    best, worst = int(acc.argmax()), int(acc.argmin())
    sizes = np.arange(batch, n_examples + batch, batch).clip(max=n_examples)
    total = 2 * n_examples
    for f in range(n_formats):
        if f in (best, worst):
            continue
        p = acc[f]
        half = z * np.sqrt(p * (1 - p) / sizes * (n_examples - sizes) / (n_examples - 1))
        gap = min(acc[best] - p, p - acc[worst])
        total += int(sizes[np.argmax((half < gap) | (sizes == n_examples))])
    return total / table.size


def synthetic_table(n_formats: int, n_examples: int, seed: int, shared: float = 0.0
                    ) -> np.ndarray:
    """Formats with accuracies spread like the paper's (a few far apart, most in the middle).

    ``shared``: the share of each answer's (probit) variance that belongs to the example, not
    the format, so formats agree on which examples are hard, as real ones do (0: independent).
    """
    rng = np.random.default_rng(seed)
    acc = np.clip(rng.beta(5, 3, n_formats), 0.05, 0.98)
    ease = rng.standard_normal(n_examples)
    latent = (np.sqrt(shared) * ease[None] +
              np.sqrt(1 - shared) * rng.standard_normal((n_formats, n_examples)))
    cut = np.array([NormalDist().inv_cdf(a) for a in acc])
    return latent < cut[:, None]


def report(name: str, tables: list[np.ndarray], batch: int, tols: tuple[float, ...] = (0.0,)
           ) -> None:
    runs = [(t, search(t, seed, batch)) for seed, t in enumerate(tables)]
    for tol in tols:
        f = np.array([convergence(t, m, tol) for t, m in runs])
        rec = np.array([spread_recovered(t, m) for t, m in runs])
        label = name + (f", within {tol * 100:.0f} points" if tol else ", exact")
        shares = [[clairvoyant_share(t, z, batch) <= 0.25 for t in tables] for z in (1.0, 1.5)]
        oracle = " / ".join(f"{np.mean(s):.0%}" for s in shares) if not tol else ""
        print(f"| {label} | {len(f)} | {np.median(f):.1%} | {np.percentile(f, 80):.1%} | "
              f"{(f <= 0.25).mean():.0%} | {np.median(rec):.0%} | {oracle} |")


def organism_table(n_examples: int, shots: int) -> tuple[np.ndarray, float, int]:
    import promptscope
    from promptscope.analyses.sensitivity.formats import PromptFormat
    from promptscope.organism.classify import classification_dataset, plausible_formats

    model = promptscope.load_model("organism")
    fmts = [PromptFormat.from_organism(f) for f in plausible_formats(24)]
    data = classification_dataset(n_examples, seed=11)
    t0 = time.perf_counter()
    run = promptscope.format_spread(data, model, formats=fmts, shots=shots, save=False,
                                    progress=False)
    took = time.perf_counter() - t0
    table = np.zeros((len(fmts), n_examples), dtype=bool)
    for f, e, c in run.df[["format", "example", "correct"]].itertuples(index=False):
        table[f, e] = c
    return table, took, len(run.df)


def naive_rate(n: int, shots: int) -> float:
    """Examples per second scoring one example (both choices) per backend call."""
    import promptscope
    from promptscope.analyses.sensitivity.formats import PromptFormat
    from promptscope.analyses.sensitivity.spread import FewShotTask
    from promptscope.organism.classify import classification_dataset, plausible_formats

    model = promptscope.load_model("organism")
    fmt = PromptFormat.from_organism(plausible_formats(24)[5])
    task = FewShotTask(classification_dataset(n, seed=11), shots=shots)
    t0 = time.perf_counter()
    for i in range(len(task)):
        model.score([task.prompt(fmt, i)] * 2, task.continuations(fmt))
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", type=int, default=24)
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=30)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--organism-examples", type=int, default=100)
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--tol", type=float, default=0.02)
    ap.add_argument("--no-organism", action="store_true")
    ap.add_argument("--table", metavar="PATH.npy", help="save the organism's correctness table "
                    "here, or load it from here if it exists (skips the model runs)")
    args = ap.parse_args()

    print(f"Search: evaluations until the bandit names the true best and worst format, as a "
          f"share of exhaustive (batch {args.batch}; goal <= 25 % in >= 80 % of seeds)\n")
    print("| table | seeds | median | 80th percentile | seeds <= 25 % | spread recovered at 25 "
          "% (median) | clairvoyant <= 25 % (z = 1 / 1.5) |")
    print("|---|---|---|---|---|---|---|")
    for shared, kind in ((0.0, "independent"), (0.5, "examples shared")):
        report(f"synthetic {args.formats} x {args.examples}, {kind}",
               [synthetic_table(args.formats, args.examples, s, shared)
                for s in range(args.seeds)], args.batch, (0.0, args.tol))
    if args.no_organism:
        return
    if args.table and Path(args.table).exists():  # re-analyse a saved table, no model runs
        table, took, n = np.load(args.table), None, 0
    else:
        table, took, n = organism_table(args.organism_examples, args.shots)
        if args.table:
            np.save(args.table, table)
    acc = table.mean(axis=1)
    # One table, different search seeds: the same table repeated.
    report(f"organism {table.shape[0]} x {table.shape[1]}", [table] * args.seeds, args.batch,
           (0.0, args.tol, 0.05))
    print(f"\norganism format accuracies: best {acc.max():.2f} ({(acc == acc.max()).sum()} "
          f"tied), worst {acc.min():.2f}, sorted lowest five {np.sort(acc)[:5].round(2)}")
    if took is None:
        return
    batched = n / took
    naive = naive_rate(min(60, args.organism_examples), args.shots)
    print("\nThroughput on the organism (CPU):\n")
    print("| method | examples/s |\n|---|---|")
    print(f"| format_spread, exhaustive ({n} evaluations, batched per round) | {batched:.1f} |")
    print(f"| naive loop, one example per score() call | {naive:.1f} |")
    print(f"\nspeed-up x{batched / naive:.1f}")


if __name__ == "__main__":
    main()
