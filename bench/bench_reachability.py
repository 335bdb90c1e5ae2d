"""Benchmark: promptscope's GCG against nanoGCG on the same model, pairs and search budget.

    python bench/bench_reachability.py [--pairs 12] [--k 3] [--steps 20] [--width 64] [--topk 32]

Both search control prompts of exactly ``--k`` tokens prepended to held-out text of the model
organism (``BOS u x0``) so that a target token becomes the argmax next token, with the same
search width (candidates per step), top-k (tokens per position from the gradient), step budget,
initial control string, allowed control tokens (printable ASCII, no special tokens) and
success test: the found ids make the target the argmax in a plain forward pass (checked for both
by the same code, in each one's own process). promptscope searches all pairs in one batched run;
nanoGCG (the reference implementation) runs pair by pair with ``early_stop=True`` and
``filter_ids=False`` (id-level search like ours).

nanoGCG pins transformers <= 4.47.1, so this script creates its own virtual environment
(``bench/.venv-nanogcg``: ``pip install torch==2.13.0 nanogcg``) and runs nanoGCG there in a
subprocess; the organism folder is copied with its tokenizer class renamed for transformers 4
(same ``tokenizer.json`` and weights). Printed: success rate, wall time, time per success, and
the ratios (nanoGCG / promptscope).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "bench" / ".venv-nanogcg"
INIT = "!"  # "!" * k is k tokens for the organism (promptscope's default init too)

NANO_SCRIPT = r'''
import json, sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
import nanogcg
from nanogcg import GCGConfig
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
tok = AutoTokenizer.from_pretrained(cfg["model"])
model = AutoModelForCausalLM.from_pretrained(cfg["model"], torch_dtype=torch.float32).eval()
# the organism's own chat template would wrap the prompt; BOS u x0 like promptscope:
tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
allowed = torch.zeros(model.get_input_embeddings().weight.shape[0], dtype=torch.bool)
allowed[cfg["allowed"]] = True
results = []
t_all = time.perf_counter()
for p in cfg["pairs"]:
    conf = GCGConfig(num_steps=cfg["steps"], search_width=cfg["width"], topk=cfg["topk"],
                     n_replace=1, buffer_size=0, early_stop=True, use_prefix_cache=True,
                     filter_ids=False, optim_str_init=cfg["init"], seed=0, verbosity="WARNING")
    gcg = nanogcg.gcg.GCG(model, tok, conf)
    gcg.not_allowed_ids = (~allowed).nonzero().flatten()
    t0 = time.perf_counter()
    res = gcg.run("{optim_str}" + p["x0"], p["target"])
    dt = time.perf_counter() - t0
    # verify: the ids nanoGCG optimised (best over steps), BOS u x0, plain forward pass
    u = tok(res.best_string, add_special_tokens=False)["input_ids"]
    ids = [tok.bos_token_id] + u + tok(p["x0"], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        top = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
    results.append({"ok": top == p["target_id"], "time_s": dt, "steps": len(res.losses),
                    "k": len(u)})
print(json.dumps({"results": results, "total_s": time.perf_counter() - t_all}))
'''


def ensure_venv() -> Path | str:
    """The nanoGCG virtual environment's python, created on first use (or why it failed)."""
    python = VENV / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import nanogcg"],
                                          capture_output=True).returncode == 0:
        return python
    try:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0", "nanogcg"],
                       check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        return f"could not create {VENV}: {exc} {getattr(exc, 'stderr', '')[-2000:]}"
    return python


def organism_copy() -> Path:
    """The organism folder with its tokenizer class named for transformers 4 (same files)."""
    from promptscope.organism import MODEL_DIR

    dest = Path(tempfile.mkdtemp(prefix="organism-tf4-"))
    for f in MODEL_DIR.iterdir():
        shutil.copy(f, dest / f.name)
    cfg = json.loads((dest / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    # transformers 4 reads extra special tokens from another key
    cfg["additional_special_tokens"] = cfg.pop("extra_special_tokens", [])
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-random", action="store_true", help="only targets ranked 2-4 (no "
                    "uniformly random targets, which are rarely reachable)")
    args = ap.parse_args()

    import torch

    import promptscope
    from promptscope.analyses.reachability import heldout_states, next_tokens
    from promptscope.organism import grammar

    torch.set_num_threads(args.threads)
    model = promptscope.load_model("organism")
    tok = model.tokenizer
    init_ids = tok(INIT * args.k, add_special_tokens=False)["input_ids"]
    assert len(init_ids) == args.k, "the init string must be k tokens"
    specials = set(tok.all_special_ids)
    allowed = [i for i in range(len(tok)) if i not in specials
               and tok.decode([i]).isascii() and tok.decode([i]).isprintable()]
    # pairs: held-out states; targets ranked 2-4 and random tokens (not already the argmax)
    texts = [grammar.text(random.Random(5000 + i)) for i in range(60)]
    states = heldout_states(model, texts, n=args.pairs, min_tokens=4, max_tokens=10,
                            seed=args.seed)
    rng = random.Random(args.seed)
    pairs = []
    for i, (x0, _) in enumerate(states):
        dist = next_tokens(model, x0)
        ranked = i % 2 == 0 or args.no_random
        tid = int(dist["token_id"].iloc[1 + i % 3]) if ranked else rng.choice(allowed)
        if tid == int(dist["token_id"].iloc[0]):
            continue
        pairs.append({"x0": x0, "target_id": tid, "target": tok.decode([tid])})
    pairs = [p for p in pairs if tok(p["target"], add_special_tokens=False)["input_ids"]
             == [p["target_id"]]]

    # promptscope: one batched run over all pairs (each x0 with its own target)
    t0 = time.perf_counter()
    run = promptscope.reachability(
        model, [p["x0"] for p in pairs], [[p["target_id"]] for p in pairs], k_min=args.k,
        k_max=args.k, method="gcg", steps=args.steps, search_width=args.width,
        top_k=args.topk, control_tokens=allowed, init_control=init_ids, bound=False,
        save=False, progress=False, seed=args.seed)
    ours_s = time.perf_counter() - t0
    ours_rows = []
    for r in run.df.itertuples():  # the same independent check as for nanoGCG
        ids = model.encode_prompt(r.x0)
        full = [ids[0], *r.control_ids, *ids[1:]]
        with torch.no_grad():
            top = int(model.model(input_ids=torch.tensor([full])).logits[0, -1].argmax())
        ours_rows.append(bool(r.reached) and top == r.target_id and len(r.control_ids) == args.k)

    python = ensure_venv()
    if isinstance(python, str):
        print(f"nanoGCG not run: {python}")
        return
    cfg = {"model": str(organism_copy()), "pairs": pairs, "steps": args.steps,
           "width": args.width, "topk": args.topk, "init": INIT * args.k,
           "allowed": allowed, "threads": args.threads}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    t1 = time.perf_counter()
    proc = subprocess.run([str(python), "-c", NANO_SCRIPT, json.dumps(cfg)],
                          capture_output=True, text=True, env=env)
    nano_wall = time.perf_counter() - t1
    if proc.returncode != 0:
        print("nanoGCG failed:\n" + proc.stderr[-3000:])
        return
    nano = json.loads(proc.stdout.strip().splitlines()[-1])
    nano_ok = [r["ok"] for r in nano["results"]]
    nano_s = nano["total_s"]

    n = len(pairs)
    ours_succ, nano_succ = sum(ours_rows), sum(nano_ok)
    kinds = "ranked 2-4" if args.no_random else "ranked 2-4 or random"
    print(f"pairs {n} (x0 from held-out organism text; targets {kinds}), k = "
          f"{args.k}, steps {args.steps}, search width {args.width}, top-k {args.topk}, "
          f"{args.threads} CPU threads")
    print(f"{'':14}{'success':>10}{'time s':>10}{'s/success':>12}")
    for label, succ, secs in (("promptscope", ours_succ, ours_s), ("nanoGCG", nano_succ, nano_s)):
        per = secs / succ if succ else float("inf")
        print(f"{label:14}{succ:>6}/{n:<3}{secs:>10.1f}{per:>12.2f}")
    ours_per = ours_s / ours_succ if ours_succ else float("inf")
    nano_per = nano_s / nano_succ if nano_succ else float("inf")
    speed = f"{nano_per / ours_per:.2f}x" if ours_succ and nano_succ else "n/a (no successes)"
    print(f"ratios (nanoGCG / promptscope): success {nano_succ / max(1, ours_succ):.2f}, "
          f"time per success {speed} (goal: >= 1.5x with success ratio <= 1.00)")
    print(f"(nanoGCG process wall time incl. model load: {nano_wall:.1f} s)")


if __name__ == "__main__":
    main()
