"""Benchmark: attribution by perturbation, promptscope vs captum's own LLM attribution.

The baseline is what one writes with captum alone: ``LLMAttribution`` over a
``TextTemplateInput`` of the same parts (or a ``TextTokenInput`` of the tokens), one forward
per perturbed prompt (its LLM forward takes one prompt at a time; ``forward_in_tokens=False``,
the one-pass convention promptscope uses). promptscope runs each captum step's perturbed
prompts as one batch (left-padded for parts). Both run in
this process on the same model and questions (the model organism's colour questions, answer =
the context's value), after a warm-up, with the same seed per question, and must give the same
attributions (to 1e-3). Prints seconds per question and the ratio.

    python bench/bench_attribution.py                      # organism, CPU, 10 questions
    python bench/bench_attribution.py --device cuda --questions 20
"""

from __future__ import annotations

import argparse
import random
import time


def questions(n: int):  # noqa: ANN201
    from promptscope.organism import world

    rng = random.Random(23)
    rows = world.template_rows([world.qa_example(rng, kind="novel", attribute="color")
                                for _ in range(6 * n)])
    return rows[(rows.before != "") & (rows.after != "")].head(n).reset_index(drop=True)


def run_captum(model, rows, method: str, samples: int, level: str) -> list[float]:  # noqa: ANN001
    import torch
    from captum.attr import LLMAttribution, TextTemplateInput, TextTokenInput

    from promptscope.analyses.attribution import _perturbation

    # (the captum class promptscope uses; KernelShap with its torch least squares, since
    # captum's default fit needs scikit-learn)
    llm = LLMAttribution(_perturbation(method, model.model), model.tokenizer)
    out = []
    for i, r in rows.iterrows():
        pieces = ["Context: ", r.before, r.key, r.after, "\nQuestion: ", r.question, "\nAnswer:"]
        if level == "parts":
            inp = TextTemplateInput("{}" * len(pieces), values=pieces)
        else:  # every token but the BOS, replaced by the pad token
            tok = model.tokenizer
            inp = TextTokenInput("".join(pieces), tok, baselines=tok.pad_token_id,
                                 skip_tokens=[tok.bos_token_id])
        kwargs = {} if method == "ablation" else {"n_samples": samples}
        torch.manual_seed(i)
        res = llm.attribute(inp, target=torch.tensor(model.encode_continuation(r.answer)),
                            forward_in_tokens=False, use_cached_outputs=False, **kwargs)
        out += res.seq_attr.tolist()
    return out


def run_promptscope(model, rows, method: str, samples: int, level: str  # noqa: ANN001
                    ) -> list[float]:
    import promptscope

    template = "Context: {before}{key}{after}\nQuestion: {question}\nAnswer:"
    kwargs = {} if method == "ablation" else {"n_samples": samples}
    run = promptscope.attribute(template, model, vars=rows, target="{answer}", method=method,
                                level=level, seed=0, save=False, progress=False, **kwargs)
    order = ["variant", "segment" if level == "parts" else "position"]
    return run.df.sort_values(order)["attribution"].tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--questions", type=int, default=10)
    p.add_argument("--samples", type=int, default=25, help="shapley / kernelshap samples")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["ablation", "shapley", "kernelshap",
                                                    "ablation:tokens", "shapley:tokens"],
                   help="METHOD[:LEVEL], LEVEL parts (default) or tokens")
    args = p.parse_args()
    import torch

    import promptscope

    torch.set_num_threads(args.threads)
    model = promptscope.load_model("organism", device=args.device)
    rows = questions(args.questions)
    print(f"\nmodel organism on {args.device} ({args.threads} threads), {len(rows)} questions, "
          f"7 parts each, {args.samples} samples for shapley / kernelshap\n")
    print(f"{'method':<18}{'captum s/q':>12}{'promptscope s/q':>17}{'speed-up':>10}"
          f"{'max |diff|':>12}")
    for spec in args.methods:
        method, _, level = spec.partition(":")
        level = level or "parts"
        timings, results = {}, {}
        for name, fn in (("captum", run_captum), ("promptscope", run_promptscope)):
            fn(model, rows.head(1), method, 2, level)  # warm-up
            t0 = time.perf_counter()
            results[name] = fn(model, rows, method, args.samples, level)
            timings[name] = (time.perf_counter() - t0) / len(rows)
        assert len(results["captum"]) == len(results["promptscope"])
        diff = max(abs(a - b) for a, b in zip(results["captum"], results["promptscope"]))
        assert diff < 1e-3, f"{spec}: attributions disagree by {diff}"
        print(f"{method + ' (' + level + ')':<18}{timings['captum']:>12.3f}"
              f"{timings['promptscope']:>17.3f}"
              f"{timings['captum'] / timings['promptscope']:>9.1f}x{diff:>12.1e}")


if __name__ == "__main__":
    main()
