"""The carried state of the memory recurrence."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class MemoryState(NamedTuple):
    """``(W, S)`` after the last processed token: the fast weights and their momentum (surprise), same pytree shape.

    Chunk boundaries are counted from the start of each call, so handing a state from one call to the next continues the
    sequence exactly when the first call's length is a multiple of the chunk size.
    """

    weights: tuple[jax.Array, ...]
    momentum: tuple[jax.Array, ...]

    @classmethod
    def fresh(cls, params, dtype=None) -> MemoryState:
        """The state at the start of a sequence: ``W = params`` (W_0) and ``S = 0``."""
        params = tuple(params if dtype is None else (p.astype(dtype) for p in params))
        return cls(weights=params, momentum=tuple(jnp.zeros_like(p) for p in params))
