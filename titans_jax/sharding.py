"""Device mesh, logical-axis rules and sharding helpers (MaxText style).

One mesh with three named axes is used everywhere:

* ``data``   -- pure data parallelism: the batch is split, parameters are replicated.
* ``fsdp``   -- fully sharded data parallelism: the batch *and* the parameters' ``embed`` axis are split.
* ``tensor`` -- tensor (model) parallelism: ``mlp`` / ``heads`` / ``vocab`` axes of parameters are split.

Modules never name mesh axes. They annotate parameters with *logical* axis names through Flax 0.12's
``out_sharding`` metadata (``nnx.Param(x, out_sharding=("embed", "mlp"))`` or
``nnx.with_partitioning(init, ("embed", "mlp"))``; ``sharding_names=`` is a deprecated alias Flax rewrites to
``out_sharding``), and :data:`LOGICAL_AXIS_RULES` maps logical names to mesh axes in one place.

Build models with eager sharding off and place them with :func:`init_sharded` (or take the target of a restore from
:func:`abstract_state`): Flax's eager sharding applies the rules verbatim and raises ``IndivisibleError`` when a
dimension does not divide the mesh axis (a tiny model on 8 devices), whereas :func:`shard_state_specs` falls back to
replication on that dimension.

The same table decides everything else that is laid out on the mesh, so nothing names a mesh axis twice:

* activations: :func:`with_logical_constraint` (the model applies it to the residual stream between blocks and to
  the q/k/v inputs of attention and memory, with the mesh passed explicitly);
* input batches: :func:`batch_spec` (``distributed.global_batch_from_local``, the trainer's batch sharding);
* the memory recurrence under ``shard_map``: :func:`memory_shard_axes`, which the nn layer passes to
  ``titans_jax.memory.sharded.shard_over_batch_heads`` (``memory/`` itself knows nothing of this table).

See docs/architecture.md, "Sharding".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None

# Logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated). A sequence of pairs, the format Flax
# expects, so ``nnx.logical_axis_rules(LOGICAL_AXIS_RULES)`` also works for ``nnx.get_partition_spec``. Each name
# appears once (:func:`rules_table` refuses a repeated one, which ``dict`` would silently overwrite).
LOGICAL_AXIS_RULES: tuple[tuple[str, MeshAxes], ...] = (
    # Activations, applied by the model through with_logical_constraint: the residual stream between blocks is
    # ("batch", "seq", "act_embed"), the q/k/v inputs of attention and memory ("batch", "seq", "act_heads", "head_dim").
    ("batch", ("data", "fsdp")),  # FSDP is data parallel too: every device sees a different slice of the batch.
    ("seq", None),  # no sequence/context parallelism: the memory recurrence runs along the sequence.
    ("act_embed", None),  # replicated: fsdp is spent on the batch axis of activations.
    ("act_heads", "tensor"),  # follows the head-sharded q/k/v projections, so attention needs no collective.
    ("head_dim", None),  # each head's features stay together: one memory network reads them all.
    # Parameters, through their out_sharding metadata.
    ("vocab", "tensor"),
    ("embed", "fsdp"),  # ZeRO-3 style: weights gathered per layer, gradients reduce-scattered.
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("layers", None),  # the stacked-layer axis of scanned blocks: each scan step needs its whole layer.
    ("conv", None),  # a handful of conv taps.
    ("norm", None),  # small vectors; not worth a collective.
    ("persist", None),  # persistent memory tokens: few rows, read by every sequence.
    ("mem_in", None),  # initial neural-memory weights: small, updated per token inside the scan.
    ("mem_out", None),
)


def rules_table(rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES) -> dict[str, MeshAxes]:
    """The rules as a dict, checked: every logical name once, every target a mesh axis (or None).

    Raises:
      ValueError: naming a logical axis that appears twice (``dict(rules)`` would keep the last one silently), or a
        target that is not one of :data:`MESH_AXES`.
    """
    table: dict[str, MeshAxes] = {}
    for name, axes in rules:
        if name in table:
            raise ValueError(f"logical axis {name!r} appears twice in the rules ({table[name]!r} and {axes!r})")
        unknown = [a for a in _as_axes(axes) if a not in MESH_AXES]
        if unknown:
            raise ValueError(f"logical axis {name!r} maps to {unknown[0]!r}, which is not a mesh axis {MESH_AXES}")
        table[name] = axes
    return table


def _mesh_error(spec: Any, why: str) -> ValueError:
    return ValueError(f"--mesh {spec!r}: {why}. Expected e.g. 'data=2,fsdp=2,tensor=2' with axes {MESH_AXES}.")


def parse_mesh(spec: str, *, num_devices: int | None = None) -> dict[str, int]:
    """Parses a ``--mesh`` string such as ``"data=2,fsdp=2,tensor=2"`` into ``{"data": 2, "fsdp": 2, "tensor": 2}``.

    Axes may come in any order; a missing axis has size 1; at most one axis may be ``-1``, meaning "the remaining
    devices". With ``num_devices`` given, ``-1`` is resolved and the product is checked against it.

    Raises:
      ValueError (naming ``--mesh``) on an unknown or repeated axis, a size that is not a positive integer or -1,
      more than one -1, or a product that does not match ``num_devices``.
    """
    sizes = dict.fromkeys(MESH_AXES, 1)
    seen: set[str] = set()
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        name, eq, value = (t.strip() for t in item.partition("="))
        if not eq:
            raise _mesh_error(spec, f"{item!r} is not of the form axis=size")
        if name not in MESH_AXES:
            raise _mesh_error(spec, f"unknown axis {name!r}")
        if name in seen:
            raise _mesh_error(spec, f"axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            raise _mesh_error(spec, f"size of {name!r} must be a positive integer or -1, got {value!r}") from None
        if size == 0 or size < -1:
            raise _mesh_error(spec, f"size of {name!r} must be a positive integer or -1, got {size}")
        seen.add(name)
        sizes[name] = size
    if sum(v == -1 for v in sizes.values()) > 1:
        raise _mesh_error(spec, "at most one axis may be -1")
    return sizes if num_devices is None else _resolve(sizes, num_devices, spec)


def _resolve(sizes: Mapping[str, int], num_devices: int, spec: Any) -> dict[str, int]:
    sizes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
    known = math.prod(v for v in sizes.values() if v != -1)
    if -1 in sizes.values():
        if num_devices % known:
            raise _mesh_error(spec, f"the fixed axes ({known} devices) do not divide the {num_devices} devices")
        sizes = {a: (num_devices // known if v == -1 else v) for a, v in sizes.items()}
    elif known != num_devices:
        raise _mesh_error(spec, f"the axis sizes multiply to {known} but there are {num_devices} devices")
    return sizes


def make_mesh(spec: str | Mapping[str, int] | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the ``("data", "fsdp", "tensor")`` mesh with ``AxisType.Auto`` axes (classic GSPMD propagation).

    Args:
      spec: a ``--mesh`` string (see :func:`parse_mesh`), a dict of axis sizes, or None (or an empty string, the
        command line's default). None puts every device on
        ``data`` (pure data parallelism): it is correct for any model that fits on one device and needs no tuning;
        ask for ``fsdp``/``tensor`` explicitly when the parameters and optimizer state do not fit.
      devices: the devices to lay out (default ``jax.devices()``, all processes).

    ``jax.make_mesh`` is used for its topology-aware device order, with Auto axes passed explicitly because JAX 0.10
    defaults it to Explicit axes.
    """
    devices = list(jax.devices() if devices is None else devices)
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        sizes: Mapping[str, int] = {"data": -1}
    elif isinstance(spec, str):
        sizes = parse_mesh(spec)
    else:
        unknown = set(spec) - set(MESH_AXES)
        if unknown:
            raise _mesh_error(dict(spec), f"unknown axis {sorted(unknown)[0]!r}")
        sizes = parse_mesh(",".join(f"{k}={v}" for k, v in spec.items()))
    sizes = _resolve(sizes, len(devices), spec)
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _as_axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def logical_to_spec(
    names: Iterable[Any] | None, rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES
) -> PartitionSpec:
    """Maps logical axis names to a ``PartitionSpec`` through ``rules``.

    Each entry of ``names`` is None (replicated), a logical name, a mesh axis name (passed through) or a tuple of
    those. A mesh axis may shard only one dimension, so a mesh axis that an earlier dimension already uses is dropped
    from later ones: ``("batch", "embed")`` gives ``P(("data", "fsdp"), None)``.

    Raises:
      ValueError: for a name that is neither in ``rules`` nor a mesh axis (a typo would otherwise replicate silently),
        or for rules that name a logical axis twice (see :func:`rules_table`).
    """
    if names is None:
        return PartitionSpec()
    if isinstance(names, PartitionSpec | NamedSharding):  # already in mesh axes
        names = tuple(names.spec if isinstance(names, NamedSharding) else names)
    table = rules_table(rules)
    used: set[str] = set()
    out: list[MeshAxes] = []
    for entry in names:
        axes: list[str] = []
        for name in _as_axes(entry):
            if name in table:
                mapped = _as_axes(table[name])
            elif name in MESH_AXES:
                mapped = (name,)
            else:
                raise ValueError(f"unknown logical axis {name!r}; add it to LOGICAL_AXIS_RULES")
            axes += [a for a in mapped if a not in used and a not in axes]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*out)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh_shape: Mapping[str, int]) -> PartitionSpec:
    """Drops mesh axes that do not evenly divide their dimension (and axes absent from the mesh).

    For a dimension sharded over several mesh axes the longest dividing prefix is kept: a batch of 2 on
    ``data=2, fsdp=2`` is split over ``data`` only. A tiny model on 8 devices thus stays valid, just less sharded.
    """
    if len(spec) > len(shape):
        raise ValueError(f"PartitionSpec {spec} has more entries than the rank of shape {tuple(shape)}")
    out: list[MeshAxes] = []
    for entry, dim in zip(spec, shape, strict=False):
        kept: list[str] = []
        for axis in _as_axes(entry):
            if axis not in mesh_shape:
                continue
            if dim % (math.prod(mesh_shape[a] for a in kept) * mesh_shape[axis]):
                break
            kept.append(axis)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def logical_sharding(
    mesh: Mesh,
    names: Iterable[Any] | None,
    shape: Sequence[int] | None = None,
    rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES,
) -> NamedSharding:
    """``NamedSharding`` for logical ``names``; with ``shape``, non-dividing axes are dropped (see :func:`fit_spec`)."""
    spec = logical_to_spec(names, rules)
    if shape is not None:
        spec = fit_spec(spec, shape, dict(mesh.shape))
    return NamedSharding(mesh, spec)


def batch_spec(rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES) -> PartitionSpec:
    """The ``PartitionSpec`` of an input batch: its leading axis laid out as the rules map ``"batch"``, the rest
    replicated (``P(("data", "fsdp"))`` with the default rules)."""
    return logical_to_spec(("batch",), rules)


class MemoryShardAxes(NamedTuple):
    """Mesh axes for ``titans_jax.memory.sharded.shard_over_batch_heads``.

    Attributes:
      batch_axes: mesh axes that split the batch (the rules' ``"batch"``).
      head_axes: mesh axes that split the memory heads, as they split the q/k/v activations (``"act_heads"``), so
        entering the per-(batch, head) recurrence moves no data.
    """

    batch_axes: tuple[str, ...]
    head_axes: tuple[str, ...]


def memory_shard_axes(rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES) -> MemoryShardAxes:
    """The mesh axes the memory recurrence runs over in ``shard_map``, from the rules (see :class:`MemoryShardAxes`).

    A mesh axis that the batch already uses is not used again for the heads (as in :func:`logical_to_spec`).
    """
    b, h = logical_to_spec(("batch", "act_heads"), rules)
    return MemoryShardAxes(_as_axes(b), _as_axes(h))


def with_logical_constraint(
    x: jax.Array,
    names: Iterable[Any],
    mesh: Mesh | None,
    rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES,
) -> jax.Array:
    """Constrains an activation's sharding on ``mesh`` by logical names (mapped through ``rules``).

    The mesh is an argument, never looked up from a ``jax.set_mesh`` context, so whether a constraint is applied is
    decided by the caller alone. Returns ``x`` unchanged for ``mesh=None`` or a single-device mesh (unit tests and
    single-device runs). A mesh axis that does not divide its dimension is dropped (see :func:`fit_spec`).
    """
    if mesh is None or math.prod(mesh.shape.values()) == 1:
        return x
    spec = fit_spec(logical_to_spec(names, rules), x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def variable_logical_names(v: nnx.Variable) -> Any:
    """A Variable's logical axis names: Flax 0.12's ``out_sharding`` metadata, or None."""
    return v.get_metadata().get("out_sharding")


def shard_state_specs(
    abstract_state: Any, mesh: Mesh, rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES
) -> Any:
    """Maps a state tree to the ``NamedSharding`` of each leaf, for ``jax.jit`` in/out shardings and restores.

    ``nnx.Variable`` leaves (of ``nnx.state(model)``, ``nnx.split`` or an ``nnx.Optimizer``, whose moments copy the
    parameters' metadata) are sharded by their ``out_sharding`` logical names and returned as the same Variable
    holding a ``NamedSharding`` (what ``nnx.get_named_sharding`` returns), so the result has the state's tree
    structure. Variables without annotation and plain arrays / ``ShapeDtypeStruct``s are replicated. An axis whose
    size the mesh axis does not divide is replicated (see :func:`fit_spec`).
    """
    mesh_shape = dict(mesh.shape)

    def leaf_sharding(x: Any) -> Any:
        if _is_variable(x):
            value = x.get_value()
            names = variable_logical_names(x)
            shape = getattr(value, "shape", None)
            if shape is None:
                return x.replace(None)
            spec = fit_spec(logical_to_spec(names, rules), shape, mesh_shape) if names else PartitionSpec()
            return x.replace(NamedSharding(mesh, spec))
        if hasattr(x, "shape"):
            return NamedSharding(mesh, PartitionSpec())
        return None

    return jax.tree.map(leaf_sharding, abstract_state, is_leaf=_is_variable)


def to_abstract(tree: Any, shardings: Any) -> Any:
    """Pairs a tree of arrays (or ShapeDtypeStructs) with a matching sharding tree into sharded ShapeDtypeStructs."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def abstract_state(
    init_fn: Callable[[], Any], mesh: Mesh, rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES
) -> tuple[nnx.GraphDef, Any]:
    """``(graphdef, state)`` of ``init_fn()`` without computing it, leaves being sharded ``ShapeDtypeStruct``s.

    The target for a sharded restore; like ``nnx.get_abstract_model`` but with our rules and divisibility fallback.
    """
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(init_fn))
    return graphdef, to_abstract(state, shard_state_specs(state, mesh, rules))


def init_sharded(
    init_fn: Callable[[], Any], mesh: Mesh, rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES
) -> tuple[nnx.GraphDef, Any, Any]:
    """Creates ``init_fn()`` (a Module or Optimizer) directly in its sharded layout.

    Returns ``(graphdef, state, shardings)``. The state is computed by one jitted call whose ``out_shardings`` come
    from :func:`shard_state_specs`, so no device ever holds a full unsharded copy of the parameters.
    """
    with nnx.use_eager_sharding(False):
        graphdef, abstract = nnx.split(nnx.eval_shape(init_fn))
        shardings = shard_state_specs(abstract, mesh, rules)
        state = jax.jit(lambda: nnx.split(init_fn())[1], out_shardings=shardings)()
    return graphdef, state, shardings


def _nbytes(shape: Sequence[int], dtype: Any) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def replicated_bytes_report(
    state_shardings_tree: Any, arrays_or_abstract: Any, *, ignore_axes: Sequence[str] = ("data",)
) -> dict[str, Any]:
    """Counts how many parameter bytes are replicated across the model-parallel mesh axes.

    A leaf counts as replicated when its sharding uses none of the mesh axes outside ``ignore_axes`` whose size is
    above 1, while those axes span more than one device. Replication over ``data`` is ignored by default because it
    is what data parallelism means; with a pure data-parallel mesh nothing counts as replicated.

    Args:
      state_shardings_tree: shardings (e.g. from :func:`shard_state_specs`), same structure as the arrays.
      arrays_or_abstract: arrays or ``ShapeDtypeStruct``s (anything with ``shape`` and ``dtype``).

    Returns:
      dict with ``total_bytes``, ``replicated_bytes``, ``replicated_fraction``, ``per_device_bytes`` (bytes one
      device holds), ``ideal_per_device_bytes`` (total / devices in the model-parallel axes) and ``largest_replicated``
      (up to 5 ``(path, bytes)`` pairs, largest first).
    """
    is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)
    shardings = jax.tree.leaves(state_shardings_tree, is_leaf=is_sharding)
    arrays = jax.tree_util.tree_leaves_with_path(arrays_or_abstract)
    if len(shardings) != len(arrays):
        raise ValueError(f"sharding tree has {len(shardings)} leaves but the array tree has {len(arrays)}")
    total = replicated = per_device = 0
    model_devices = 1
    offenders: list[tuple[str, int]] = []
    for sharding, (path, arr) in zip(shardings, arrays, strict=True):
        nbytes = _nbytes(arr.shape, arr.dtype)
        total += nbytes
        per_device += _nbytes(sharding.shard_shape(arr.shape), arr.dtype)
        mesh_shape = dict(sharding.mesh.shape) if isinstance(sharding, NamedSharding) else {}
        model_axes = {a for a, n in mesh_shape.items() if a not in ignore_axes and n > 1}
        model_devices = max(model_devices, math.prod(mesh_shape[a] for a in model_axes))
        used = {a for entry in (sharding.spec if isinstance(sharding, NamedSharding) else ()) for a in _as_axes(entry)}
        if model_axes and not (used & model_axes):
            replicated += nbytes
            offenders.append((jax.tree_util.keystr(path).removesuffix(".value"), nbytes))  # nnx.Variable leaf
    offenders.sort(key=lambda t: -t[1])
    return {
        "total_bytes": total,
        "replicated_bytes": replicated,
        "replicated_fraction": replicated / total if total else 0.0,
        "per_device_bytes": per_device,
        "ideal_per_device_bytes": total / model_devices,
        "largest_replicated": offenders[:5],
    }


def audit_replication(
    state_shardings_tree: Any, arrays_or_abstract: Any, max_fraction: float, *, ignore_axes: Sequence[str] = ("data",)
) -> dict[str, Any]:
    """Raises ``ValueError`` when more than ``max_fraction`` of parameter bytes are replicated (see
    :func:`replicated_bytes_report`, whose report is returned otherwise).

    Catches a forgotten annotation or a rules change that silently replicates a large matrix on every device.
    """
    report = replicated_bytes_report(state_shardings_tree, arrays_or_abstract, ignore_axes=ignore_axes)
    if report["replicated_fraction"] > max_fraction:
        worst = ", ".join(f"{p} ({b / 2**20:.2f} MiB)" for p, b in report["largest_replicated"])
        raise ValueError(
            f"{report['replicated_fraction']:.1%} of parameter bytes ({report['replicated_bytes'] / 2**20:.2f} of "
            f"{report['total_bytes'] / 2**20:.2f} MiB) are replicated across the model-parallel mesh axes, above the "
            f"allowed {max_fraction:.1%}. Largest: {worst}. Annotate them with logical axes (out_sharding) or "
            f"change LOGICAL_AXIS_RULES."
        )
    return report
