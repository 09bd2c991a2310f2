"""Public-domain text shipped with t2r-hf (provenance in PROVENANCE.md beside this file)."""

from __future__ import annotations

import os

CORPORA = {"train": "sherlock_holmes.txt", "heldout": "moby_dick_ch1-11.txt"}


def corpus_path(name: str) -> str:
    """Path of a shipped corpus: `"train"` (Sherlock Holmes) or `"heldout"` (Moby Dick, chapters 1-11)."""
    if name not in CORPORA:
        raise ValueError(f"Unknown corpus {name!r}; choose one of {sorted(CORPORA)}.")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), CORPORA[name])
