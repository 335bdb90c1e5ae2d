"""The organism's knob phase (scripts/train_organism.py): its examples, its swap, its result."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

from promptscope.organism.data import KNOB_BASE_KINDS, KNOB_LAYER, intent_pair

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from train_organism import InterchangeLoss  # noqa: E402


def test_intent_pair_answer_is_the_one_the_source_instruction_gives_the_base():
    rng = random.Random(0)
    kinds = set()
    for _ in range(300):
        base, source, answer = intent_pair(rng)
        kinds.add(base.kind)
        assert source.kind == "conflict" and source.intent in ("context", "prior")
        assert source.target == (source.context_value if source.intent == "context"
                                 else source.prior)
        if base.kind == "distractors":  # no answer in the context: the prior, whatever is said
            assert base.context_value is None and base.intent in (None, "prior")
            assert answer == base.prior
        else:
            assert base.intent in ("context", "prior")
            assert answer == (base.context_value if source.intent == "context" else base.prior)
    assert kinds == set(KNOB_BASE_KINDS)


def _organism():
    from promptscope.organism import load_organism

    return load_organism()


def test_swap_changes_only_the_bases_coordinate_along_the_direction_at_their_last_token():
    model, tok = _organism()
    direction = torch.nn.functional.normalize(torch.randn(model.config.hidden_size,
                                                          generator=torch.Generator().manual_seed(0)),
                                              dim=0)
    loss = InterchangeLoss(model, tok, KNOB_LAYER, direction, pairs=4, seed=0)
    seen = []
    spy = model.model.layers[KNOB_LAYER].register_forward_hook(  # runs after the swap
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach()))
    try:
        ids, last, target = loss.batch()
        with torch.no_grad():
            loss.logits(ids, last)
            model.model(input_ids=ids)  # no swap outside logits()
    finally:
        spy.remove()
        loss.remove()
    swapped, plain = seen
    assert ids.shape[0] == 8 and target.shape == (8,)
    rows = torch.arange(4)
    base, source = plain[rows, last[:4]], plain[rows + 4, last[4:]]
    got = swapped[rows, last[:4]]
    assert torch.allclose(got @ direction, source @ direction, atol=1e-4)
    off = lambda h: h - (h @ direction)[:, None] * direction  # noqa: E731
    assert torch.allclose(off(got), off(base), atol=1e-4)
    mask = torch.ones_like(plain[..., 0], dtype=torch.bool)
    mask[rows, last[:4]] = False
    assert torch.equal(swapped[mask], plain[mask])  # sources and earlier tokens untouched


def test_shipped_organism_answers_by_the_intent_swapped_in_along_its_knob():
    """Measured on v11 (this draw of 64 pairs): of the 21 bases whose own answer is not the one
    their source's instruction gives, 71 % switch to it when only the knob coordinate is
    swapped, 0 % with another direction (v10, before the knob phase: 21 % of 24)."""
    import json

    from promptscope.organism import MODEL_DIR

    model, tok = _organism()
    knob = json.loads((MODEL_DIR / "training_info.json").read_text())["knob"]
    trained = torch.tensor(knob["direction"])
    other = torch.nn.functional.normalize(
        torch.randn(trained.shape, generator=torch.Generator().manual_seed(1)), dim=0)
    share = {}
    for name, direction in (("knob", trained), ("other", other)):
        loss = InterchangeLoss(model, tok, knob["layer"], direction, pairs=64, seed=5)
        try:
            ids, last, target = loss.batch()
            with torch.no_grad():
                picked = loss.logits(ids, last).argmax(-1)[:64]
                own = model(input_ids=ids).logits[torch.arange(len(ids)), last].argmax(-1)[:64]
        finally:
            loss.remove()
        moved = own != target[:64]
        share[name] = float((picked[moved] == target[:64][moved]).float().mean())
    assert moved.sum() >= 10
    assert share["knob"] >= 0.55
    assert share["other"] <= 0.2
