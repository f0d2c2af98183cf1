"""Seeing inside the memory: per-layer statistics of a model's neural memories on a batch (docs/architecture.md,
"Memory statistics").

``memory_stats(model, tokens_BxT)`` returns, for every layer, the means of the learning-rate (theta), momentum (eta)
and forgetting (alpha) gates, the memory's own loss (paper Eq. 12) on each chunk's keys before and after the chunk's
update, and the norms of the final weights W and momentum S, as plain floats keyed ``memory/layer{l}/{name}``::

    {"memory/layer0/theta": 0.05, "memory/layer0/eta": 0.9, ..., "memory/layer1/s_norm": 3.2}

The trainer logs them every log step (``train.memory_stats``); ``python -m titans_jax.plot`` draws them.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from titans_jax.configs import MEMORY_VARIANTS

# What is reported per layer, in order (fields of titans_jax.memory.stats.ScanStats).
STAT_NAMES = ("theta", "eta", "alpha", "loss_before", "loss_after", "w_norm", "s_norm")
PREFIX = "memory/"


def stat_key(layer: int, name: str) -> str:
    """The metrics key of statistic ``name`` of layer ``layer``: ``memory/layer{layer}/{name}``."""
    return f"{PREFIX}layer{layer}/{name}"


def has_memory(model: Any) -> bool:
    """Whether ``model`` is a TitansLM (or alike) of a variant with a neural memory (lmm, mac, mag, mal)."""
    config = getattr(model, "config", None)
    return callable(getattr(model, "forward_with_memory_stats", None)) and getattr(
        config, "variant", None) in MEMORY_VARIANTS


def memory_stats_arrays(model: Any, tokens_BxT: jax.Array, *, mesh: jax.sharding.Mesh | None = None
                        ) -> dict[str, jax.Array]:
    """The statistics as float32 scalars (traceable: for use inside a jitted step); ``{}`` for a model without a
    memory. ``mesh``: as ``model(tokens, mesh=)`` (the memory under ``shard_map`` on it)."""
    if not has_memory(model):
        return {}
    _, stats = model.forward_with_memory_stats(tokens_BxT, mesh=mesh)
    out = {}
    for name in STAT_NAMES:
        per_layer = getattr(stats, name).astype(jnp.float32)
        for layer in range(per_layer.shape[0]):
            out[stat_key(layer, name)] = per_layer[layer]
    return out


@functools.partial(jax.jit, static_argnums=(0,))
def _stats(graphdef: nnx.GraphDef, state: nnx.State, tokens_BxT: jax.Array) -> dict[str, jax.Array]:
    return memory_stats_arrays(nnx.merge(graphdef, state), tokens_BxT)


def memory_stats(model: Any, tokens_BxT: Any) -> dict[str, float]:
    """Per-layer memory statistics of ``model`` on ``tokens_BxT`` (int ``[batch, time]``) as ``{key: float}`` (keys
    from :func:`stat_key`; see the module docstring). Compiled once per model structure and input shape.

    Raises:
      ValueError: for a model without a memory (transformer, swa) or tokens that are not an int ``[batch, time]``
        array.
    """
    if not has_memory(model):
        variant = getattr(getattr(model, "config", None), "variant", type(model).__name__)
        raise ValueError(f"memory_stats needs a TitansLM with a neural memory ({', '.join(MEMORY_VARIANTS)}); "
                         f"got {variant!r}, which has none")
    tokens_BxT = jnp.asarray(tokens_BxT)
    if tokens_BxT.ndim != 2 or not jnp.issubdtype(tokens_BxT.dtype, jnp.integer):
        raise ValueError(f"tokens_BxT must be an int array of shape [batch, time], got {tokens_BxT.dtype}"
                         f"{tuple(tokens_BxT.shape)}")
    graphdef, state = nnx.split(model)
    return {k: float(v) for k, v in jax.device_get(_stats(graphdef, state, tokens_BxT)).items()}


def layers_of(record: dict[str, Any]) -> dict[int, dict[str, float]]:
    """The memory statistics of one metrics record, per layer: ``{layer: {name: value}}`` (empty when there are
    none)."""
    out: dict[int, dict[str, float]] = {}
    for key, value in record.items():
        if not key.startswith(PREFIX + "layer"):
            continue
        layer, _, name = key[len(PREFIX) + len("layer"):].partition("/")
        if layer.isdigit() and name:
            out.setdefault(int(layer), {})[name] = value
    return out
