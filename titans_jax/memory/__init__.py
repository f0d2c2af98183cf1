"""The functional core of titans_jax: the neural long-term memory as pure JAX (no Flax).

* :func:`linear_memory`, :func:`mlp_memory`: memory networks (``init`` / ``apply`` over a tuple of fast weights).
* :func:`memory_scan`: the chunk-parallel memory recurrence (paper Sec. 3.2) for one (batch, head) slice, with one
  ``impl`` switch between the fast path and the checked alternatives (:data:`IMPLS`).
* :func:`memory_scan_from`: the same recurrence continued from a streaming state at any position (``resume.py``).
* :func:`memory_scan_reference`: the token-by-token oracle it is tested against.
* :class:`MemoryState`: the carried ``(weights, momentum)``.
"""

from titans_jax.memory.chunked import IMPLS, memory_scan
from titans_jax.memory.networks import MemoryNet, associative_loss, layer_norm, linear_memory, mlp_memory
from titans_jax.memory.reference import memory_scan_reference, token_update
from titans_jax.memory.resume import memory_scan_from
from titans_jax.memory.state import MemoryState

__all__ = [
    "IMPLS",
    "MemoryNet",
    "MemoryState",
    "associative_loss",
    "layer_norm",
    "linear_memory",
    "memory_scan",
    "memory_scan_from",
    "memory_scan_reference",
    "mlp_memory",
    "token_update",
]
