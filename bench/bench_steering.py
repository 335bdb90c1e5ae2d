"""Benchmark: generation with PASTA or vector steering vs without, and vs an eager PASTA baseline.

Ways to generate the same greedy continuation of one prompt:

- ``plain``: the model's SDPA attention, no steering (the reference time);
- ``promptscope``: PASTA as a per-head key bias inside promptscope's attention function (SDPA);
- ``promptscope flex``: the same bias as a ``flex_attention`` score modifier (``kernel="flex"``:
  no dense ``[B, H, L, L]`` mask; compiled into a fused kernel on CUDA, unfused eager elsewhere);
- ``eager PASTA``: what one writes without promptscope: eager attention whose post-softmax
  weights are scaled by alpha off the emphasised span on the steered heads and renormalised;
- ``vector add``: a steering vector added to the residual stream after two layers (CAA-style,
  forward hooks; target at most 1.05x plain);
- ``vector ICV``: an in-context vector on every layer with the norm-preserving shift (target at
  most 1.05x plain); on CUDA one Triton kernel per layer (``models/icv_kernel.py``);
- ``vector ICV ops``: the same with the shift as aten ops (what CUDA ran before the kernel, and
  what runs where Triton cannot);
- ``vector add all``: the add vector on every layer, as many hooks as the ICV but one add each;
- ``null hooks``: the ICV's hooks (a model pre-hook, one hook per layer) doing nothing.
  These two rows say where the ICV's extra time goes: the hook machinery itself (``null
  hooks``), hooks that change every layer's output (``vector add all``), or the ICV's shift.

Each (method, prompt length) runs in its own subprocess, so peak RSS is its own. Target: PASTA
at most 1.15x the plain time.

    python bench/bench_steering.py                       # lengths 128 512 2048, CPU
    python bench/bench_steering.py --lengths 128 512 --device cuda
    python bench/bench_steering.py --preset 0.6b --lengths 512 2048 8192 --device cuda
    python bench/bench_steering.py --methods plain "vector add" "vector ICV"
    python bench/bench_steering.py --hook-cost --model organism
    python bench/bench_steering.py --hook-cost --preset 0.6b --dtype bf16 --device cuda

``--hook-cost`` times the vector hooks alone per decoding step and counts what they dispatch:
aten ops, and on CUDA the kernels launched (a decoding step at batch 1 is bound by launches).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

METHODS = ("plain", "promptscope", "promptscope flex", "eager PASTA", "vector add", "vector ICV",
           "vector ICV ops", "vector add all", "null hooks")
HEADS = {1: [0, 2], 2: [1, 3]}  # a typical PASTA head set: a few heads in a few layers
# Random llama shapes built when no --model is given: "small" for CPUs; "0.6b" (about 0.6 B
# parameters, head size 64, GQA 4:1) to see steering's cost where attention is real GPU work.
PRESETS = {
    "small": {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2},
    "0.6b": {"hidden_size": 2048, "num_layers": 16, "num_heads": 32, "num_kv_heads": 8},
}
ALPHA = 0.01


def make_prompt(tokenizer, n_tokens: int) -> tuple[str, str]:
    """A prompt of about ``n_tokens`` tokens and the sentence in it to emphasise."""
    key = "The key fact: Ann lives in Rome."
    filler = "Bob reads a book in the park and the cat sat on the mat. "
    text = key + " "
    while len(tokenizer(text + filler)["input_ids"]) < n_tokens:
        text += filler
    return text + "Where does Ann live?", key


def eager_pasta(down: dict):
    """An eager attention function with PASTA's post-softmax scaling (the hand-written way)."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        groups = query.shape[1] // key.shape[1]
        k, v = repeat_kv(key, groups), repeat_kv(value, groups)
        scores = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = torch.softmax(scores.float(), dim=-1)
        heads = HEADS.get(module.layer_idx)
        if heads:
            scale = torch.ones(weights.shape[-1], device=weights.device)
            scale[: down["mask"].shape[0]] = torch.where(down["mask"], ALPHA, 1.0)
            steered = weights[:, heads] * scale
            weights[:, heads] = steered / steered.sum(-1, keepdim=True)
        out = torch.matmul(weights.to(v.dtype), v).transpose(1, 2).contiguous()
        return out, weights

    return attention


def child(args: argparse.Namespace) -> None:
    import torch

    import promptscope

    torch.set_num_threads(args.threads)
    model = promptscope.load_model(args.model, device=args.device, dtype=args.dtype)
    prompt, key = make_prompt(model.tokenizer, args.length)
    if args.child == "eager PASTA":
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        enc = model.encode(prompt, offsets=True)
        start = prompt.index(key)
        inside = [b > a and a < start + len(key) and b > start for a, b in enc["offset_mapping"]]
        down = {"mask": ~torch.tensor(inside, device=model.device)}
        AttentionInterface.register("eager_pasta", eager_pasta(down))
        AttentionMaskInterface.register("eager_pasta", eager_mask)
        model.model.set_attn_implementation("eager_pasta")

    vector = None
    if args.child.startswith("vector"):
        from promptscope.models.vectors import SteeringVector

        size, n_layers = model.model.config.hidden_size, model.model.config.num_hidden_layers
        g = torch.Generator().manual_seed(0)
        if args.child.startswith("vector add"):  # a contrastive vector: two layers, or all
            layers = (1, 2) if args.child == "vector add" else range(n_layers)
            vector = SteeringVector({i: torch.randn(size, generator=g) for i in layers}, size)
            strength = 2.0
        else:  # an ICV: unit directions on every layer, norm-preserving shift
            if args.child == "vector ICV ops":
                from promptscope.models import vectors

                vectors.icv_kernel_here = lambda t: False
            vector = SteeringVector({i: torch.nn.functional.normalize(
                torch.randn(size, generator=g), dim=0) for i in range(n_layers)}, size, "icv")
            strength = 0.1

    @contextlib.contextmanager
    def null_hooks() -> Any:
        """Hooks where the ICV has them (model pre-hook with kwargs, every layer), doing nothing."""
        from promptscope.models.vectors import decoder_layers

        hf = model.model
        handles = [hf.register_forward_pre_hook(lambda m, a, k: None, with_kwargs=True)]
        handles += [layer.register_forward_hook(lambda m, a, o: None)
                    for layer in decoder_layers(hf)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def generate(steered: bool = True) -> Any:
        if args.child == "null hooks" and steered:
            with null_hooks():
                return model.generate([prompt], max_new_tokens=args.new_tokens)[0][0]
        if vector is not None and steered:
            with promptscope.steer(model, vector=vector, strength=strength):
                return model.generate([prompt], max_new_tokens=args.new_tokens)[0][0]
        if args.child.startswith("promptscope"):
            kernel = "flex" if args.child.endswith("flex") else "sdpa"
            with promptscope.steer(model, heads=HEADS, alpha=ALPHA, emphasis=key, kernel=kernel):
                return model.generate([prompt], max_new_tokens=args.new_tokens)[0][0]
        return model.generate([prompt], max_new_tokens=args.new_tokens)[0][0]

    generate()  # warm-up
    if model.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, plain_times, generated = [], [], set()
    for _ in range(args.repeats):
        # Vector rows also time plain generation in the same process, alternating with the
        # steered runs, so a shared machine's load drift hits both alike.
        paired = vector is not None or args.child == "null hooks"
        for steered in ((False, True) if paired else (True,)):
            t0 = time.perf_counter()
            out = generate(steered)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            (times if steered else plain_times).append(time.perf_counter() - t0)
            generated.add(len(out.tokens))  # a run that stops early at EOS times less work
            if steered:
                text = out.text
    peak = (torch.cuda.max_memory_allocated() / 2**20 if model.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"seconds": min(times), "peak_mb": peak, "text": text,
                      "generated": sorted(generated),
                      "plain_seconds": min(plain_times) if plain_times else None,
                      "tokens": len(model.encode_prompt(prompt))}))


def dispatch_counts(fn) -> tuple[int, int | None]:
    """(aten ops called at the top level, CUDA kernels launched) by one call of ``fn``; the
    kernel count is None off CUDA."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    ops = sum(1 for e in events if e.name.startswith("aten::") and e.device_type.name == "CPU"
              and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::")))
    kernels = (sum(1 for e in events if e.device_type.name == "CUDA") if cuda else None)
    return ops, kernels


def profile_table(fn) -> dict[str, tuple[int, float]]:
    """{call name: (count, total host ms)} of one call of ``fn`` under torch's profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return {e.key: (e.count, e.cpu_time_total / 1e3) for e in prof.key_averages()}


def hook_cost(args: argparse.Namespace) -> None:
    """The vector hooks' own cost per decoding step (pre-hook + one hook per steered layer),
    timed alone (end-to-end ratios on a shared machine are dominated by load noise), and what
    they dispatch per step."""
    import timeit

    import torch

    import promptscope
    from promptscope.models import vectors
    from promptscope.models.hf import _output_cache
    from promptscope.models.vectors import SteeringVector, VectorSteering, _Hooks

    torch.set_num_threads(args.threads)
    if not args.model:
        args.model = _random_llama(args)
    model = promptscope.load_model(args.model, device=args.device, dtype=args.dtype)
    cfg = model.model.config
    ids = torch.tensor([model.encode_prompt("Context: Ann lives in Rome. Where does Ann live?")],
                       device=model.device)
    pos = torch.tensor([[ids.shape[1]]], device=model.device)
    x = torch.randn(1, 1, cfg.hidden_size, device=model.device, dtype=model.model.dtype)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    print(f"{args.model}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{model.model.dtype}, {model.device}")
    every = list(range(cfg.num_hidden_layers))
    kernel = vectors.icv_kernel_here
    cases = [("add", [1, 2], "add", None), ("icv", every, "icv", None)]
    if model.device.type == "cuda":  # the Triton kernel (above) against the aten ops
        cases.append(("icv", every, "icv (aten ops)", lambda t: False))
    for mode, layers, label, here in cases:
        vectors.icv_kernel_here = here or kernel
        vec = SteeringVector({i: torch.nn.functional.normalize(torch.randn(cfg.hidden_size),
                                                               dim=0) for i in layers},
                             cfg.hidden_size, mode)
        hooks = _Hooks(VectorSteering(vec, 0.1, layers))
        fns = [hooks.layer_hook(i) for i in layers]

        def step(hooks: _Hooks = hooks, fns: list = fns) -> None:
            # what transformers' generate passes an unpadded prompt's decoding step: no mask
            hooks.pre(None, (), {"input_ids": ids[:, :1], "position_ids": pos})
            for fn in fns:
                fn(None, None, x)

        step()  # caches the vectors on the device
        ops, kernels = dispatch_counts(step)
        per = min(timeit.repeat(lambda s=step: (s(), sync()), number=2000, repeat=7)) / 2000
        launched = f", {kernels} CUDA kernels" if kernels is not None else ""
        print(f"{label} on {len(layers)} layers: {per * 1e6:.0f} us per decoding step; "
              f"{ops} aten ops{launched} per step")
    vectors.icv_kernel_here = kernel
    enc = model.model(input_ids=ids, use_cache=True)
    nxt = enc.logits[:, -1].argmax(-1, keepdim=True)
    cache = _output_cache(enc)

    def decode() -> None:
        with torch.no_grad():
            model.model(input_ids=nxt, use_cache=False, **{model._cache_kwarg: cache})
        sync()

    per = min(timeit.repeat(decode, number=10, repeat=3)) / 10
    ops, kernels = dispatch_counts(decode)
    launched = f", {kernels} CUDA kernels" if kernels is not None else ""
    print(f"one decoding step of the model: {per * 1e6:.0f} us; {ops} aten ops{launched}")

    def generate(n: int) -> None:  # greedy, exactly n new tokens
        model.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False)
        sync()

    generate(2)
    one = min(timeit.repeat(lambda: generate(1), number=3, repeat=3)) / 3
    many = min(timeit.repeat(lambda: generate(33), number=1, repeat=3))
    print(f"one decoding step inside transformers' generate (what the rows above add to): "
          f"{(many - one) / 32 * 1e6:.0f} us")
    # The whole of promptscope's generate, plain and under the ICV (as the bench's rows run
    # it): what it dispatches in all tells whether the hooks are the whole of its extra cost.
    icv = SteeringVector({i: torch.nn.functional.normalize(torch.randn(cfg.hidden_size), dim=0)
                          for i in every}, cfg.hidden_size, "icv")
    prompt = "Context: Ann lives in Rome. Where does Ann live?"
    runs, tables = {}, {}
    for label, vector in (("plain", None), ("ICV", icv)):
        def run(vector: Any = vector, label: str = label) -> None:
            with (promptscope.steer(model, vector=vector, strength=0.1) if vector is not None
                  else contextlib.nullcontext()):
                gen = model.generate([prompt], max_new_tokens=16)[0][0]
            sync()
            assert len(gen.tokens) == 16 or gen.finish_reason == "stop"
            runs[label] = len(gen.tokens)

        run()
        took = min(timeit.repeat(run, number=1, repeat=5))
        ops, kernels = dispatch_counts(run)
        tables[label] = profile_table(run)
        launched = f", {kernels} CUDA kernels" if kernels is not None else ""
        print(f"promptscope generate, 16 new tokens, {label}: {took * 1e3:.1f} ms, "
              f"{runs[label]} tokens generated; {ops} aten ops{launched}")
    # Where the ICV's extra time goes: the calls (aten ops, CUDA runtime calls such as
    # cudaLaunchKernel / cudaStreamSynchronize) whose total host time grew most.
    plain, steered = tables["plain"], tables["ICV"]
    grown = sorted(steered, key=lambda k: plain.get(k, (0, 0.0))[1] - steered[k][1])[:12]
    print("calls whose host time grew most under the ICV (count, ms: plain -> ICV):")
    for name in grown:
        (n0, t0), (n1, t1) = plain.get(name, (0, 0.0)), steered[name]
        print(f"  {name[:60]:<60} {n0:>6} -> {n1:<6} {t0:8.2f} -> {t1:8.2f}")


def _random_llama(args: argparse.Namespace) -> str:
    """A random llama of ``--preset``'s shape in a temporary folder."""
    from promptscope.testing import make_tiny_model

    return str(make_tiny_model(Path(tempfile.mkdtemp()) / "bench-llama", **PRESETS[args.preset],
                               head_dim=64, max_positions=max(4096, max(args.lengths) + 64)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="model dtype (default: bf16 on capable GPUs, else fp32)")
    p.add_argument("--model", help="model folder (default: a random llama of --preset's shape)")
    p.add_argument("--preset", choices=PRESETS, default="small",
                   help="shape of the random llama built when no --model is given")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="which rows to run ('plain' is always run: the reference)")
    p.add_argument("--hook-cost", action="store_true", help="time the vector hooks alone "
                   "against one decoding step")
    p.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    if args.hook_cost:
        hook_cost(args)
        return
    given_model = bool(args.model)
    if not args.model:
        args.model = _random_llama(args)
    where = args.device or "default device"
    shape = PRESETS[args.preset]
    what = (f"random llama ({shape['num_layers']} layers, hidden {shape['hidden_size']}, "
            f"{shape['num_heads']} heads of 64, {shape['num_kv_heads']} KV heads)"
            if not given_model else args.model)
    print(f"\nGreedy generation of {args.new_tokens} tokens, batch 1, {what}, "
          f"{where}, {args.threads} threads; steered heads "
          f"{HEADS}, alpha {ALPHA}; vector add: layers 1-2, strength 2; vector ICV: every layer, "
          f"lambda 0.1. Times are the best of {args.repeats}; vector and null-hook rows are "
          f"compared with plain runs alternated in their own process (the plain row's time in "
          f"brackets).\n")
    print(f"{'tokens':>7} {'method':<17}{'seconds':>9}{'vs plain':>10}{'peak MB':>10}"
          f"{'same text as eager':>20}", flush=True)
    # Each row prints as soon as its run ends, so a run cut short still leaves its rows.
    for length in args.lengths:
        res = {}
        methods = ["plain", *[x for x in args.methods if x != "plain"]]
        for method in methods:
            cmd = [sys.executable, __file__, "--child", method, "--model", args.model,
                   "--length", str(length), "--new-tokens", str(args.new_tokens),
                   "--repeats", str(args.repeats), "--threads", str(args.threads)]
            if args.device:
                cmd += ["--device", args.device]
            if args.dtype:
                cmd += ["--dtype", args.dtype]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{method} at {length} tokens failed:\n{out.stderr[-3000:]}")
            r = res[method] = json.loads(out.stdout.strip().splitlines()[-1])
            base = r.get("plain_seconds") or res["plain"]["seconds"]
            flag = f"(plain {base:.3f} s)" if r.get("plain_seconds") else ""
            if method.startswith("promptscope") and "eager PASTA" in methods[methods.index(
                    method):]:  # wait for the eager run, which says if the text matches
                res.setdefault("_pending", []).append((method, r, base))
                continue
            if method.startswith("promptscope") and "eager PASTA" in res:
                flag = "yes" if r["text"] == res["eager PASTA"]["text"] else "NO"
            print(_row(method, r, base, flag), flush=True)
            if method == "eager PASTA":
                for m, rr, b in res.pop("_pending", []):
                    print(_row(m, rr, b, "yes" if rr["text"] == r["text"] else "NO"), flush=True)


def _row(method: str, r: dict, base: float, flag: str) -> str:
    short = [n for n in r["generated"] if n != max(r["generated"])]
    flag += f" (some runs stopped at {short} tokens)" if short else ""
    return (f"{r['tokens']:>7} {method:<17}{r['seconds']:>9.3f}{r['seconds'] / base:>9.2f}x"
            f"{r['peak_mb']:>10.0f}{flag:>20}")

if __name__ == "__main__":
    main()
