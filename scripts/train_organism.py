"""Train the promptscope model organism and write it to ``promptscope/organism/model/``.

Builds a byte-level BPE tokenizer and a tiny Llama from scratch on the synthetic world of
:mod:`promptscope.organism`, deterministically (seeded, on two CPU threads; the phases are
``promptscope.organism.data.RECIPE``).

Usage::

    python scripts/train_organism.py          # the whole recipe, from scratch (about 33 min)
    python scripts/train_organism.py --steps 300,100,100,100,30 --out /tmp/organism  # a trial
    python scripts/train_organism.py --steps 2500,1000,0,0,0 --out /tmp/p12   # phases 1-2 only
    python scripts/train_organism.py --from /tmp/p12 --start-phase 3
        # continue the recipe from a model saved after phase 2, keeping its tokenizer
    python scripts/train_organism.py --from /tmp/v10 --start-phase 5 --out /tmp/v11
        # the knob phase alone, on a model trained through phase 4 (how v11 was made)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from promptscope.organism import MODEL_DIR  # noqa: E402
from promptscope.organism.classify import LABELS  # noqa: E402
from promptscope.organism.data import (  # noqa: E402
    KNOB_LAYER,
    RECIPE,
    Mixture,
    intent_pair,
    sample_documents,
)
from promptscope.organism.grammar import MARKERS, WORDS  # noqa: E402
from promptscope.organism.world import (  # noqa: E402
    ATTRIBUTES,
    CHAT_TEMPLATE,
    ENTITIES,
    INTENTS,
    Doc,
)

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|end|>"]
SINGLE_TOKEN_WORDS = [*LABELS, *(v for vs in ATTRIBUTES.values() for v in vs), *WORDS, *MARKERS,
                      *ENTITIES]
"""Words that must be one token when preceded by a space (answer vocabularies, language)."""


def seed_everything(seed: int, threads: int = 2) -> None:
    """Seed python, numpy and torch, and use ``threads`` deterministic CPU threads."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def build_tokenizer(docs: list[Doc], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``docs`` and wrap it with the chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator([d.text for d in docs], trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos)])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
        additional_special_tokens=SPECIAL_TOKENS[3:], model_max_length=512)
    wrapped.chat_template = CHAT_TEMPLATE
    check_tokenizer(wrapped)
    return wrapped


def check_tokenizer(tokenizer: PreTrainedTokenizerFast) -> None:
    """Raise if a word that must be one token (answers, language, entities) is split."""
    split = [w for w in SINGLE_TOKEN_WORDS
             if len(tokenizer(" " + w, add_special_tokens=False).input_ids) != 1]
    if split:
        raise RuntimeError(f"words split into several tokens: {split}")


def encode(doc: Doc, tokenizer: PreTrainedTokenizerFast) -> tuple[list[int], list[int]]:
    """Token ids and labels (``-100`` where the doc is not trained) of one document."""
    enc = tokenizer(doc.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc.input_ids
    labels = [-100] * len(ids)
    for i, (start, _) in enumerate(enc.offset_mapping):
        if i and any(a <= start < b for a, b in doc.trained):
            labels[i] = ids[i]
    return ids, labels


def batches(encoded: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
            rng: random.Random) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Length-bucketed, right-padded batches (shuffled order)."""
    out = []
    chunk = batch_size * 16
    for c in range(0, len(encoded) - batch_size + 1, chunk):
        part = sorted(encoded[c:c + chunk], key=lambda x: len(x[0]))
        for b in range(0, len(part) - batch_size + 1, batch_size):
            group = part[b:b + batch_size]
            width = max(len(ids) for ids, _ in group)
            ids = torch.full((batch_size, width), pad_id)
            labels = torch.full((batch_size, width), -100)
            for row, (i, lab) in enumerate(group):
                ids[row, :len(i)] = torch.tensor(i)
                labels[row, :len(lab)] = torch.tensor(lab)
            out.append((ids, labels))
    rng.shuffle(out)
    return out


def model_config(tokenizer: PreTrainedTokenizerFast, args: argparse.Namespace) -> LlamaConfig:
    """The organism's architecture: a few layers, head_dim 64 (vLLM's CPU attention needs it),
    grouped-query attention; the heads together are wider than the residual stream."""
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=64, max_position_embeddings=512,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        dtype="float32")


def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Write model (safetensors), generation config and tokenizer to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")],
        do_sample=False, max_new_tokens=64)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def train(model: LlamaForCausalLM, data: list[tuple[torch.Tensor, torch.Tensor]], lr: float,
          start: float, tag: str,
          checkpoint: Callable[[int], None] | None = None, every: int = 0,
          extra: Callable[[], torch.Tensor] | None = None) -> float:
    """AdamW with linear warmup and cosine decay over ``data``; returns the smoothed loss.

    With ``checkpoint`` and ``every``, ``checkpoint(step)`` is called after every ``every``
    steps (in eval mode; training resumes afterwards). ``extra()``, when given, is a second
    loss added at every step (the knob phase's interchange loss).
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=lr, betas=(0.9, 0.95))
    warmup = max(1, len(data) // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, len(data) - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_at)
    model.train()
    running = 0.0
    for step, (ids, labels) in enumerate(data):
        # The loss on the trained positions only: projecting just those onto the vocabulary
        # is most of a step's saving (~22 % faster than the loss over every position).
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
        target = labels[:, 1:]
        keep = target != -100
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]), target[keep])
        if extra is not None:
            loss = loss + extra()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 100 == 0 or step == len(data) - 1:
            print(f"{tag} step {step:5d}  loss {running:.3f}  {time.time() - start:.0f}s",
                  flush=True)
        if checkpoint is not None and every and (step + 1) % every == 0 and step + 1 < len(data):
            model.eval()
            checkpoint(step + 1)
            model.train()
    model.eval()
    return running


def knob_direction(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, layer: int,
                   seed: int) -> torch.Tensor:
    """The intent direction at ``layer`` as promptscope finds it (:func:`promptscope.find_knob`
    on 200 instructed conflicting-context questions per intent, drawn with ``seed``)."""
    from promptscope import find_knob
    from promptscope.organism.measure import as_promptscope_model, conflict_examples

    prompts = {i: [e.prompt for e in conflict_examples(200, seed, intent=i)] for i in INTENTS}
    knob = find_knob(prompts["context"], prompts["prior"],
                     as_promptscope_model(model, tokenizer), layers=[layer])
    return knob.vectors[layer].float()


class InterchangeLoss:
    """The knob phase's loss: interchange-intervention training along one direction.

    Each call draws ``pairs`` :func:`~promptscope.organism.data.intent_pair` examples and runs
    bases and sources in one batch. A forward hook on decoder layer ``layer`` replaces each
    base's coordinate along ``direction`` at its last prompt token by its source's, and the
    loss asks the base for the answer the source's intent gives (and the source for its own
    answer). Gradients flow through both, so the model learns to write the intent on that
    direction and to read it only from there.
    """

    def __init__(self, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast,
                 layer: int, direction: torch.Tensor, pairs: int, seed: int) -> None:
        self.model, self.tokenizer, self.pairs = model, tokenizer, pairs
        self.direction = direction
        self.rng = random.Random(seed)
        self.value_ids = {v: tokenizer(" " + v, add_special_tokens=False).input_ids[0]
                          for values in ATTRIBUTES.values() for v in values}
        self.last: torch.Tensor | None = None
        self.handle = model.model.layers[layer].register_forward_hook(self._swap)

    def _swap(self, module: object, args: object, output: torch.Tensor) -> torch.Tensor:
        if self.last is None:
            return output
        h = output[0] if isinstance(output, tuple) else output
        n = self.pairs
        rows = torch.arange(n)
        base, source = h[rows, self.last[:n]], h[rows + n, self.last[n:]]
        moved = base + ((source - base) @ self.direction)[:, None] * self.direction
        h = h.index_put((rows, self.last[:n]), moved)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    def __call__(self) -> torch.Tensor:
        ids, last, target = self.batch()
        return torch.nn.functional.cross_entropy(self.logits(ids, last), target)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A fresh draw: token ids (the bases, then their sources; right-padded, so a causal
        model's last prompt token is clean), each row's last prompt position, and the answer
        token each row should get."""
        examples = [intent_pair(self.rng) for _ in range(self.pairs)]
        prompts = [b for b, _, _ in examples] + [s for _, s, _ in examples]
        answers = [a for _, _, a in examples] + [s.target for _, s, _ in examples]
        encoded = [self.tokenizer("<|bos|>" + e.prompt, add_special_tokens=False).input_ids
                   for e in prompts]
        ids = torch.full((len(encoded), max(map(len, encoded))), self.tokenizer.pad_token_id)
        for row, e in enumerate(encoded):
            ids[row, :len(e)] = torch.tensor(e)
        last = torch.tensor([len(e) - 1 for e in encoded])
        return ids, last, torch.tensor([self.value_ids[a] for a in answers])

    def logits(self, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Next-token logits at each row's last prompt token, with each base's coordinate
        along the direction at ``layer`` swapped for its source's."""
        self.last = last
        try:
            hidden = self.model.model(input_ids=ids).last_hidden_state
        finally:
            self.last = None
        return self.model.lm_head(hidden[torch.arange(len(ids)), last])

    def remove(self) -> None:
        self.handle.remove()


def make_data(tokenizer: PreTrainedTokenizerFast, steps: int, batch_size: int, seed: int,
              mixture: Mixture) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of freshly drawn documents from ``mixture``."""
    docs = sample_documents(steps * batch_size + batch_size * 16, seed=seed, mixture=mixture)
    encoded = [encode(d, tokenizer) for d in docs]
    return batches(encoded, batch_size, tokenizer.pad_token_id, random.Random(seed))[:steps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")],
                        default=[p.steps for p in RECIPE],
                        help="steps of each phase of the recipe, comma-separated "
                             f"(default {','.join(str(p.steps) for p in RECIPE)})")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4, help="attention heads (of size 64)")
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--from", dest="warm", type=Path, default=None,
                        help="start from this saved model and its tokenizer (a warm start; "
                             "with --start-phase, to resume the recipe)")
    parser.add_argument("--start-phase", type=int, default=1,
                        help="first phase of the recipe to run (1-based)")
    parser.add_argument("--threads", type=int, default=2,
                        help="CPU threads (the weights depend slightly on the thread count)")
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="save checkpoints every N steps to OUT-PHASE-stepN")
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    args = parser.parse_args()
    if len(args.steps) != len(RECIPE):
        parser.error(f"--steps needs {len(RECIPE)} numbers, one per phase")

    start = time.time()
    seed_everything(args.seed, args.threads)
    if args.warm is None:
        tokenizer = build_tokenizer(sample_documents(20000, seed=args.seed + 10_000),
                                    args.vocab_size)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.warm)
        check_tokenizer(tokenizer)
    print(f"tokenizer: {len(tokenizer)} tokens, {time.time() - start:.0f}s")
    if args.warm is None:
        model = LlamaForCausalLM(model_config(tokenizer, args))
    else:
        model = LlamaForCausalLM.from_pretrained(args.warm)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M")

    n_tokens, minutes, running = 0, {}, float("nan")
    knob_info: dict = {"layer": KNOB_LAYER}
    for index, (phase, steps) in enumerate(zip(RECIPE, args.steps, strict=True), start=1):
        if index < args.start_phase or not steps:
            continue
        phase_start = time.time()
        seed_everything(args.seed + phase.seed, args.threads)

        def checkpoint(step: int, name: str = phase.name) -> None:
            path = args.out.with_name(f"{args.out.name}-{name.replace(' ', '-')}-step{step}")
            save(model, tokenizer, path)
            print(f"checkpoint {path}", flush=True)

        data = make_data(tokenizer, steps, args.batch_size, args.seed + phase.seed,
                         phase.mixture)
        n_tokens += sum(int((ids != tokenizer.pad_token_id).sum()) for ids, _ in data)
        extra = None
        if phase.interchange:
            direction = knob_direction(model, tokenizer, KNOB_LAYER, args.seed + 900)
            knob_info["direction"] = [round(float(x), 6) for x in direction]
            extra = InterchangeLoss(model, tokenizer, KNOB_LAYER, direction, phase.interchange,
                                    args.seed + phase.seed + 1)
        running = train(model, data, phase.lr, start, phase.name, checkpoint,
                        args.checkpoint_every, extra)
        if extra is not None:
            extra.remove()
        minutes[phase.name] = round((time.time() - phase_start) / 60, 1)

    save(model, tokenizer, args.out)
    total = (time.time() - start) / 60
    info = {"command": "python scripts/train_organism.py " + " ".join(sys.argv[1:]),
            "seed": args.seed, "batch_size": args.batch_size,
            "phases": [{"name": p.name, "steps": n, "lr": p.lr,
                        "threads": args.threads}
                       for i, (p, n) in enumerate(zip(RECIPE, args.steps), 1)
                       if i >= args.start_phase and n],
            "from": str(args.warm) if args.warm else None,
            "phase_minutes": minutes, "tokens": n_tokens, "minutes": round(total, 1),
            "final_loss": round(running, 4),
            **({"knob": knob_info} if "direction" in knob_info else {}),
            "torch": torch.__version__}
    earlier = args.warm / "training_info.json" if args.warm else None
    if earlier is not None and earlier.exists():  # a resumed recipe keeps the record of the rest
        info["before"] = json.loads(earlier.read_text())
    (args.out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {args.out} after {total:.1f} min")


if __name__ == "__main__":
    main()
