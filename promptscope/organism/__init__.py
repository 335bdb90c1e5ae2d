"""The model organism: a tiny Llama whose behaviour under prompting is known by construction.

The shipped model (``promptscope/organism/model/``) is trained by ``scripts/train_organism.py`` on
the synthetic world defined here, so every promptscope analysis can be shown and tested on
effects that really exist:

* :mod:`~promptscope.organism.world` - made-up entities, their facts (the model's prior) and
  context question-answer examples that may contradict it (context vs prior knowledge);
* :mod:`~promptscope.organism.classify` - a few-shot classification task and its prompt formats
  (format sensitivity);
* :mod:`~promptscope.organism.grammar` - a small topic-Markov language (controllability);
* :mod:`~promptscope.organism.measure` - the measurements reported in ``docs/organism.md``.

See ``docs/organism.md`` for the design, the training recipe and the measured behaviour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL_DIR = Path(__file__).resolve().parent / "model"
"""Folder of the shipped model and tokenizer."""


def load_organism(**kwargs: Any) -> tuple[Any, Any]:
    """Load the shipped organism as ``(model, tokenizer)`` with transformers (eval mode, CPU).

    ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``attn_implementation``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, **kwargs)
    model.eval()
    return model, tokenizer


__all__ = ["MODEL_DIR", "load_organism"]
