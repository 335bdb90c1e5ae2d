"""Prompt sensitivity: how much a model's behaviour depends on meaning-preserving prompt changes.

* :func:`format_spread` (``spread.py``): accuracy across plausible formats from a format grammar
  (``formats.py``), with a Thompson-sampling search for the best and worst (``bandit.py``);
* :func:`posix` (``posix.py``): the POSIX prompt sensitivity index by variant type;
* :func:`select_prompt` (``selection.py``): label-free prompt selection by mutual information,
  with calibration by marginalisation.
"""

from __future__ import annotations

from promptscope.analyses.sensitivity.formats import (
    FormatGrammar,
    PromptFormat,
    sample_formats,
)
from promptscope.analyses.sensitivity.posix import posix, posix_index
from promptscope.analyses.sensitivity.selection import select_prompt
from promptscope.analyses.sensitivity.spread import alternatives_spread, format_spread

__all__ = ["format_spread", "alternatives_spread", "posix", "posix_index", "select_prompt",
           "FormatGrammar", "PromptFormat", "sample_formats"]
