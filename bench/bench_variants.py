"""Benchmark: rank C choices for F templates x N rows, promptscope vs a hand-written loop.

The baseline is what one writes by hand: one ``model(...)`` call per prompt + choice. Both
methods run in their own subprocess (so peak RSS is each one's own), on the same tiny llama built
locally, and must produce the same log-probs (to 1e-4). Prints a table with the speed-up ratio.

    python bench/bench_variants.py                 # 8 templates x 64 rows x 4 choices
    python bench/bench_variants.py --rows 16       # quicker
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FORMATS = [
    "Question: {q}\nAnswer:",
    "QUESTION: {q}\nANSWER:",
    "Q: {q} A:",
    "question - {q} // answer -",
    "{q}\nThe answer is",
    "Input: {q}\nOutput:",
    "### Question\n{q}\n### Answer\n",
    "q :: {q} :: a ::",
]
CHOICES = [" A", " B", " C", " D"]


def questions(n: int) -> list[dict[str, str]]:
    subjects = ["cat", "dog", "tree", "river", "city", "book", "star", "road"]
    return [{"q": f"Which option fits the {subjects[i % 8]} number {i}? A, B, C or D?"}
            for i in range(n)]


def run_promptscope(folder: str, formats: int, rows: int) -> list[float]:
    import promptscope

    model = promptscope.load_model(folder)
    template = "{{fmt=" + "|".join(FORMATS[:formats]) + "}}"  # one variant per format
    run = promptscope.run_prompt(template, model, vars=questions(rows), choices=CHOICES,
                                 save=False, progress=False)
    # Order as the naive loop: row-major over (row, format, choice).
    return run.df["logprob"].tolist()


def run_naive(folder: str, formats: int, rows: int) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    out = []
    with torch.inference_mode():
        for row in questions(rows):
            for fmt in FORMATS[:formats]:
                prompt = tok(fmt.format(**row))["input_ids"]
                for choice in CHOICES:
                    cont = tok(choice, add_special_tokens=False)["input_ids"]
                    logits = model(torch.tensor([prompt + cont])).logits[0].log_softmax(-1)
                    out.append(sum(logits[len(prompt) - 1 + k, t].item()
                                   for k, t in enumerate(cont)))
    return out


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    fn = run_naive if args.child == "naive" else run_promptscope
    fn(args.model, 1, 2)  # warm-up: import and first-call costs are not what we compare
    t0 = time.perf_counter()
    logprobs = fn(args.model, args.formats, args.rows)
    seconds = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "rss_mb": rss_mb, "logprobs": logprobs}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--formats", type=int, default=8)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", help="model folder (default: a tiny llama built now)")
    p.add_argument("--child", choices=["naive", "promptscope"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    if not args.model:
        from promptscope.testing import make_tiny_model

        args.model = str(make_tiny_model(Path(tempfile.mkdtemp()) / "bench-llama",
                                          hidden_size=256, num_layers=4, num_heads=4,
                                          num_kv_heads=2))
    results = {}
    for method in ("naive", "promptscope"):
        cmd = [sys.executable, __file__, "--child", method, "--model", args.model,
               "--formats", str(args.formats), "--rows", str(args.rows),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    naive, ours = results["naive"], results["promptscope"]
    worst = max(abs(a - b) for a, b in zip(naive["logprobs"], ours["logprobs"]))
    assert len(naive["logprobs"]) == len(ours["logprobs"]), "different number of scores"
    assert worst < 1e-4, f"log-probs disagree by {worst}"
    n = len(ours["logprobs"])
    print(f"\n{args.formats} templates x {args.rows} rows x {len(CHOICES)} choices = {n} scores, "
          f"tiny llama, {args.threads} CPU threads; max |log-prob difference| = {worst:.1e}\n")
    print(f"{'method':<14}{'seconds':>10}{'scores/s':>12}{'peak RSS MB':>14}{'speed-up':>10}")
    for name, r in (("naive loop", naive), ("promptscope", ours)):
        print(f"{name:<14}{r['seconds']:>10.2f}{n / r['seconds']:>12.0f}{r['rss_mb']:>14.0f}"
              f"{naive['seconds'] / r['seconds']:>9.1f}x")


if __name__ == "__main__":
    main()
