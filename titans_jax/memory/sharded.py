"""Run a per-(batch, head) memory function under ``jax.shard_map`` over the mesh in context.

The memory recurrence has no communication between (batch, head) slices, so each device can run its own slices with
no collective at all. Under plain GSPMD the partitioner would have to infer that through a ``lax.scan``; ``shard_map``
states it. Axis names are arguments, so this module knows nothing of the trainer's mesh layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P


def current_mesh():
    """The mesh set with ``jax.set_mesh`` (None when there is none, or it has a single device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or math.prod(mesh.shape.values()) == 1:
        return None
    return mesh


def _fit(axes: Sequence[str], size: int, mesh) -> tuple[str, ...] | None:
    """The longest prefix of ``axes`` (present in the mesh) whose product divides ``size``."""
    kept = []
    for a in axes:
        if a not in mesh.shape:
            continue
        if size % (math.prod(mesh.shape[x] for x in kept) * mesh.shape[a]):
            break
        kept.append(a)
    return tuple(kept) or None


def shard_over_batch_heads(fn: Callable, batch: int, heads: int, *, batch_axes=("data", "fsdp"),
                           head_axes=("tensor",)) -> Callable:
    """Wrap ``fn(per_head_tree, per_slice_tree) -> per_slice_tree``.

    ``per_head_tree`` leaves are ``[H, ...]`` (e.g. the learned W_0 of each head), ``per_slice_tree`` leaves are
    ``[B, H, ...]``. Without a multi-device mesh in context ``fn`` is returned unchanged.
    """
    mesh = current_mesh()
    if mesh is None:
        return fn
    b_ax, h_ax = _fit(batch_axes, batch, mesh), _fit(head_axes, heads, mesh)
    if b_ax is None and h_ax is None:
        return fn
    head_spec, slice_spec = P(h_ax), P(b_ax, h_ax)

    def wrapped(per_head, per_slice):
        specs_in = (jax.tree.map(lambda _: head_spec, per_head), jax.tree.map(lambda _: slice_spec, per_slice))
        out_shape = jax.eval_shape(fn, per_head, per_slice)
        specs_out = jax.tree.map(lambda _: slice_spec, out_shape)
        return jax.shard_map(fn, in_specs=specs_in, out_specs=specs_out)(per_head, per_slice)

    return wrapped
