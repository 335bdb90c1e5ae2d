"""Variants per second through the API backend vs the plain sequential ``openai`` loop.

Against one local vLLM server (started here on 127.0.0.1 with the tiny head_dim-64 test model,
unless ``--base-url`` points at a running one), the same choices run three ways:

- baseline: the loop a user would write with the ``openai`` client, one request per variant
  (all its choices in one echo request), one after another;
- promptscope: ``run_prompt`` on an ``OpenAIModel`` (concurrent requests, one or several
  prompts per echo request, cache off);
- cached re-run: the same run again with the on-disk cache on (second pass).

Both run twice: straight to the local server, and through a proxy that adds ``--latency``
seconds to every request, as a remote server's round trip does (on a small shared CPU machine
the local server itself is the bottleneck, so concurrency gains less there than over a network).
Prints a table of times and ratios against the baseline measured in the same run.

    PROMPTSCOPE_VLLM_PYTHON=/path/to/vllm-env/bin/python python bench/bench_api.py
    python bench/bench_api.py --base-url http://127.0.0.1:8000/v1 --model tiny
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

TEMPLATE = "Question {i}: is {{Paris|Tokyo|Oslo|Rome}} in {{Europe|Asia}}? Answer:"
CHOICES = [" yes", " no"]


def baseline(base_url: str, model: str, prompts: list[str]) -> float:
    """The sequential loop a user would write with the openai client."""
    import openai

    client = openai.OpenAI(api_key="EMPTY", base_url=base_url)
    t0 = time.perf_counter()
    for p in prompts:
        resp = client.completions.create(model=model, prompt=[p + c for c in CHOICES], echo=True,
                                         logprobs=1, max_tokens=0, temperature=0.0)
        [ch.logprobs.token_logprobs[-1] for ch in resp.choices]
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", help="a running server's /v1 URL (default: start one)")
    ap.add_argument("--model", default="tiny", help="served model name (with --base-url)")
    ap.add_argument("--rows", type=int, default=40, help="template rows (8 variants each)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--per-request", type=int, nargs="+", default=[1, 16],
                    help="prompts per echo request (promptscope's default is 16)")
    ap.add_argument("--latency", type=float, default=0.05, help="added round trip, seconds")
    args = ap.parse_args()

    import promptscope
    from promptscope.models.openai_api import OpenAIModel

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        import os

        os.environ["PROMPTSCOPE_HOME"] = str(tmp / "home")  # a cache of its own
        if args.base_url:
            url, name = args.base_url, args.model
        else:
            from vllm_server import server_model_dir, vllm_server

            folder, name = server_model_dir(tmp)
            t0 = time.perf_counter()
            url = stack.enter_context(vllm_server(folder, served_name=name,
                                                  log_path=tmp / "vllm.log"))
            print(f"vLLM server ready in {time.perf_counter() - t0:.0f} s")
        from fault_proxy import FaultProxy

        proxy = stack.enter_context(FaultProxy(url.removesuffix("/v1")))
        proxy.latency = args.latency
        rows = [{"i": i} for i in range(args.rows)]
        prompts = [v.text for v in promptscope.parse_template(TEMPLATE).expand(rows)]
        n = len(prompts)
        # Warm up the server and promptscope (first requests, imports).
        baseline(url, name, prompts[:8])
        promptscope.run_prompt(TEMPLATE, OpenAIModel(name, base_url=url, cache=False),
                               vars=rows[:2], choices=CHOICES, progress=False, save=False)
        tables = []
        for label, where in [("local server", url),
                             (f"+{args.latency * 1000:.0f} ms round trip (proxy)", proxy.url)]:
            base = baseline(where, name, prompts)
            table = [("openai client, sequential loop (baseline)", base)]
            for per in args.per_request:
                for c in args.concurrency:
                    model = OpenAIModel(name, base_url=where, max_concurrency=c, cache=False,
                                        prompts_per_request=per)
                    t0 = time.perf_counter()
                    run = promptscope.run_prompt(TEMPLATE, model, vars=rows, choices=CHOICES,
                                                 progress=False, save=False)
                    table.append((f"promptscope, {c} in flight x {per} per request",
                                  time.perf_counter() - t0))
                    assert run.params["api"]["failed"] == 0
            model = OpenAIModel(name, base_url=where, cache=True)
            promptscope.run_prompt(TEMPLATE, model, vars=rows, choices=CHOICES,
                                   progress=False, save=False)
            t0 = time.perf_counter()
            run = promptscope.run_prompt(TEMPLATE, model, vars=rows, choices=CHOICES,
                                         progress=False, save=False)
            table.append(("promptscope, cached re-run", time.perf_counter() - t0))
            assert run.params["api"]["cached"] == run.params["api"]["requests"]
            tables.append((label, base, table))

    for label, base, table in tables:
        print(f"\n{label}: {n} variants x {len(CHOICES)} choices\n")
        print(f"{'how':<52} {'seconds':>8} {'variants/s':>11} {'vs baseline':>12}")
        for how, secs in table:
            print(f"{how:<52} {secs:>8.2f} {n / secs:>11.1f} {base / secs:>11.1f}x")


if __name__ == "__main__":
    main()
