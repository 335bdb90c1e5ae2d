"""Benchmark: generation with PASTA steering vs without, and vs an eager PASTA baseline.

Three ways to generate the same greedy continuation of one prompt:

- ``plain``: the model's SDPA attention, no steering (the reference time);
- ``promptscope``: PASTA as a per-head key bias inside promptscope's attention function (SDPA);
- ``eager PASTA``: what one writes without promptscope: eager attention whose post-softmax
  weights are scaled by alpha off the emphasised span on the steered heads and renormalised.

Each (method, prompt length) runs in its own subprocess, so peak RSS is its own. Target: steering
at most 1.15x the plain time.

    python bench/bench_steering.py                       # lengths 128 512 2048, CPU
    python bench/bench_steering.py --lengths 128 512 --device cuda
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

METHODS = ("plain", "promptscope", "eager PASTA")
HEADS = {1: [0, 2], 2: [1, 3]}  # a typical PASTA head set: a few heads in a few layers
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
    model = promptscope.load_model(args.model, device=args.device)
    prompt, key = make_prompt(model.tokenizer, args.length)
    if args.child == "eager PASTA":
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        enc = model._encode(prompt, offsets=True)
        start = prompt.index(key)
        inside = [b > a and a < start + len(key) and b > start for a, b in enc["offset_mapping"]]
        down = {"mask": ~torch.tensor(inside, device=model.device)}
        AttentionInterface.register("eager_pasta", eager_pasta(down))
        AttentionMaskInterface.register("eager_pasta", eager_mask)
        model.model.set_attn_implementation("eager_pasta")

    def generate() -> str:
        if args.child == "promptscope":
            with promptscope.steer(model, heads=HEADS, alpha=ALPHA, emphasis=key):
                return model.generate([prompt], max_new_tokens=args.new_tokens)[0][0].text
        return model.generate([prompt], max_new_tokens=args.new_tokens)[0][0].text

    generate()  # warm-up
    if model.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        text = generate()
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if model.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"seconds": min(times), "peak_mb": peak, "text": text,
                      "tokens": len(model.encode_prompt(prompt))}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--model", help="model folder (default: a small llama built now)")
    p.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    if not args.model:
        from promptscope.testing import make_tiny_model

        args.model = str(make_tiny_model(Path(tempfile.mkdtemp()) / "bench-llama",
                                          hidden_size=256, num_layers=4, num_heads=4,
                                          num_kv_heads=2, head_dim=64, max_positions=4096))
    rows = []
    for length in args.lengths:
        res = {}
        for method in METHODS:
            cmd = [sys.executable, __file__, "--child", method, "--model", args.model,
                   "--length", str(length), "--new-tokens", str(args.new_tokens),
                   "--repeats", str(args.repeats), "--threads", str(args.threads)]
            if args.device:
                cmd += ["--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{method} at {length} tokens failed:\n{out.stderr[-3000:]}")
            res[method] = json.loads(out.stdout.strip().splitlines()[-1])
        same = res["promptscope"]["text"] == res["eager PASTA"]["text"]
        rows.append((length, res, same))
    where = args.device or "default device"
    print(f"\nGreedy generation of {args.new_tokens} tokens, batch 1, small llama "
          f"(4 layers, 4 heads of 64, GQA), {where}, {args.threads} threads; steered heads "
          f"{HEADS}, alpha {ALPHA}. Times are the best of {args.repeats}.\n")
    print(f"{'tokens':>7} {'method':<13}{'seconds':>9}{'vs plain':>10}{'peak MB':>10}"
          f"{'same text as eager':>20}")
    for _, res, same in rows:
        base = res["plain"]["seconds"]
        for method in METHODS:
            r = res[method]
            flag = ("yes" if same else "NO") if method == "promptscope" else ""
            print(f"{r['tokens']:>7} {method:<13}{r['seconds']:>9.3f}{r['seconds'] / base:>9.2f}x"
                  f"{r['peak_mb']:>10.0f}{flag:>20}")


if __name__ == "__main__":
    main()
