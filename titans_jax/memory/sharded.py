"""Run a per-(batch, head) memory function under ``jax.shard_map`` over a mesh the caller passes.

The memory recurrence has no communication between (batch, head) slices, so each device can run its own slices with
no collective at all. Under plain GSPMD the partitioner would have to infer that through a ``lax.scan``; ``shard_map``
states it. The mesh and its axis names are arguments: this module knows nothing of the trainer's mesh layout or of its
logical-axis rules (the nn layer passes ``titans_jax.sharding.memory_shard_axes()``), and nothing here reads an ambient
``jax.set_mesh`` context, so whether the memory runs under ``shard_map`` is decided by the caller alone.

Everything that ``shard_map`` needs of the core lives here too: the recurrence (``memory/chunked.py``,
``memory/reference.py``) knows nothing of meshes. See docs/architecture.md, "Sharding".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import PartitionSpec as P


def _fit(axes: Sequence[str], size: int, mesh: Any) -> tuple[str, ...]:
    """The longest prefix of ``axes`` (those present in the mesh) whose product divides ``size``."""
    kept: list[str] = []
    for a in axes:
        if a not in mesh.shape:
            continue
        if size % (math.prod(mesh.shape[x] for x in kept) * mesh.shape[a]):
            break
        kept.append(a)
    return tuple(kept)


def _entry(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _varying_axes(x: Any) -> frozenset:
    """The mesh axes over which ``x`` differs between devices inside ``shard_map`` (empty outside)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.9
    if manual is not None:
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))


def vary_over(tree: Any, axes: Sequence[str]) -> Any:
    """Marks every leaf of ``tree`` as varying over the mesh ``axes`` (``jax.lax.pcast``), inside ``shard_map``.

    The per-head W_0 enters ``shard_map`` varying over the head axes only, yet it seeds the recurrence's scan carry,
    which the per-slice q/k/v make vary over the batch axes too: a carry whose type changed between iterations is
    refused. Casting W_0 up front makes its type the carry's. Its transpose sums the W_0 gradient over the batch axes.
    """
    want = frozenset(axes)

    def cast(x):
        missing = tuple(sorted(want - _varying_axes(x)))
        return jax.lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(cast, tree)


def shard_over_batch_heads(
    fn: Callable,
    batch: int,
    heads: int,
    *,
    mesh: Any,
    batch_axes: Sequence[str],
    head_axes: Sequence[str],
) -> Callable:
    """Wrap ``fn(per_head_tree, per_slice_tree) -> per_slice_tree`` to run each device's (batch, head) slices.

    Args:
      fn: the per-slice computation. ``per_head_tree`` leaves are ``[H, ...]`` (the learned W_0 of each head),
        ``per_slice_tree`` leaves are ``[B, H, ...]`` (q, k, v, gates, an optional carried state) and so are the
        outputs'. Inside ``shard_map`` it sees its devices' blocks, with ``per_head_tree`` already varying over
        every axis the slices vary over (:func:`vary_over`).
      batch, heads: B and H, to keep only the mesh axes that divide them.
      mesh: a ``jax.sharding.Mesh`` (or ``AbstractMesh``), or None. None or a single-device mesh returns ``fn``
        unchanged; no ambient mesh is ever consulted.
      batch_axes, head_axes: mesh axes that split B and H, in order (``titans_jax.sharding.memory_shard_axes()``
        gives them from the logical rules). Axes absent from the mesh are skipped; of the rest, the longest prefix
        whose sizes multiply to a divisor of B (resp. H) is used. With none left, ``fn`` is returned unchanged.
    """
    if set(batch_axes) & set(head_axes):
        raise ValueError(f"batch_axes {tuple(batch_axes)} and head_axes {tuple(head_axes)} share a mesh axis; "
                         "a mesh axis can split only one of them")
    if mesh is None or math.prod(mesh.shape.values()) == 1:
        return fn
    b_ax, h_ax = _fit(batch_axes, batch, mesh), _fit(head_axes, heads, mesh)
    if not b_ax and not h_ax:
        return fn
    head_spec, slice_spec = P(_entry(h_ax)), P(_entry(b_ax), _entry(h_ax))

    def per_device(per_head, per_slice):
        return fn(vary_over(per_head, b_ax + h_ax), per_slice)

    def wrapped(per_head, per_slice):
        specs_in = (jax.tree.map(lambda _: head_spec, per_head), jax.tree.map(lambda _: slice_spec, per_slice))
        out_shape = jax.eval_shape(fn, per_head, per_slice)
        specs_out = jax.tree.map(lambda _: slice_spec, out_shape)
        return jax.shard_map(per_device, mesh=mesh, in_specs=specs_in, out_specs=specs_out)(per_head, per_slice)

    return wrapped
