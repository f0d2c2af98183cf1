"""The memory recurrence under shard_map over (batch, heads) equals the unsharded computation.

``memory/sharded.py`` takes its mesh and axes as arguments (no ambient mesh); the axes come from the logical rules.
"""

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from memory_cases import assert_close_scaled, make_inputs

from titans_jax import NeuralMemory
from titans_jax.configs import MemoryConfig
from titans_jax.memory import MemoryState, memory_scan, memory_scan_reference, mlp_memory
from titans_jax.memory.sharded import shard_over_batch_heads
from titans_jax.sharding import make_mesh, memory_shard_axes

B, H, T, D = 4, 4, 10, 8  # T not a multiple of the chunk: the partial last chunk runs under shard_map too


def _is_sharded(lowered_text: str) -> bool:
    return "sdy.manual_computation" in lowered_text or "shard_map" in lowered_text


def _core_case():
    """W_0 per head and q/k/v/gates per (batch, head), laid out as NeuralMemory.run_memory passes them."""
    net = mlp_memory(D, 2, 2)
    w0 = tuple(jnp.stack(ws) for ws in zip(*(net.init(k) for k in jax.random.split(jax.random.key(0), H)), strict=True))
    cases = [make_inputs(T, D, seed=s) for s in range(B * H)]
    slices = tuple(jnp.stack([c[i] for c in cases]).reshape(B, H, *cases[0][i].shape) for i in range(6))
    return net, w0, slices


def _per_slice(net, scan_fn):
    def one(w0, s0, q, k, v, lr, mom, dec):
        st = None if s0 is None else MemoryState(*s0)
        return scan_fn(net, w0, q, k, v, lr, mom, dec, chunk_size=4, state=st)

    def per_slice(w0_H, slices):
        seq, st = slices
        if st is None:
            over_heads = jax.vmap(lambda w, *a: one(w, None, *a))
            return jax.vmap(over_heads, in_axes=(None,) + (0,) * 6)(w0_H, *seq)
        return jax.vmap(jax.vmap(one), in_axes=(None, 0) + (0,) * 6)(w0_H, st, *seq)

    return per_slice


# The chunked path's gradients under shard_map are checked through the layer below (same code, layer-sized inputs);
# here they would only add a costly compile of its hand-written backward.
@pytest.mark.parametrize("scan_fn, grads", [(memory_scan, False), (memory_scan_reference, True)],
                         ids=["chunked", "reference"])
def test_core_under_shard_map_equals_unsharded(scan_fn, grads):
    """Both recurrences run unchanged inside shard_map (W_0 is made varying by the wrapper, not by the core): from a
    fresh state (with gradients to W_0 and to every per-slice input for the reference) and from a carried state."""
    net, w0, seq = _core_case()
    fn = _per_slice(net, scan_fn)
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    axes = memory_shard_axes()
    sharded = shard_over_batch_heads(fn, B, H, mesh=mesh, batch_axes=axes.batch_axes, head_axes=axes.head_axes)
    assert sharded is not fn

    def loss(run, w0, seq):
        y, (w, s) = run(w0, (seq, None))
        return jnp.sum(jnp.sin(y)) + sum(jnp.sum(jnp.cos(x)) for x in (*w, *s)), (y, (w, s))

    assert _is_sharded(jax.jit(sharded).lower(w0, (seq, None)).as_text())  # no jax.set_mesh: the mesh is the argument
    if grads:
        (_, out), g = jax.jit(jax.value_and_grad(lambda *a: loss(fn, *a), argnums=(0, 1), has_aux=True))(w0, seq)
        vg = jax.value_and_grad(lambda *a: loss(sharded, *a), argnums=(0, 1), has_aux=True)
        (_, out_m), g_m = jax.jit(vg)(w0, seq)
        # W_0's gradient sums over the batch shards in another order: float32 reordering, well inside 1e-4 of scale.
        assert_close_scaled(g_m, g, 1e-4, "gradients under shard_map")
    else:
        out, out_m = jax.jit(fn)(w0, (seq, None)), jax.jit(sharded)(w0, (seq, None))
    chex.assert_trees_all_close(out_m, out, atol=1e-5)
    carried = (seq, tuple(out[1]))  # continue from the final [B, H, ...] state
    chex.assert_trees_all_close(jax.jit(sharded)(w0, carried), jax.jit(fn)(w0, carried), atol=1e-5)


def test_no_mesh_means_no_shard_map():
    """None, a single-device mesh, or axes that divide nothing return fn itself; an ambient mesh changes nothing."""
    fn = lambda w, s: s  # noqa: E731
    axes = dict(batch_axes=("data", "fsdp"), head_axes=("tensor",))
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    assert shard_over_batch_heads(fn, B, H, mesh=None, **axes) is fn
    assert shard_over_batch_heads(fn, B, H, mesh=make_mesh(None, devices=jax.devices()[:1]), **axes) is fn
    assert shard_over_batch_heads(fn, 3, 3, mesh=mesh, **axes) is fn  # 3 divides by none of the axes
    assert shard_over_batch_heads(fn, B, H, mesh=mesh, batch_axes=(), head_axes=()) is fn
    with jax.set_mesh(mesh):
        assert shard_over_batch_heads(fn, B, H, mesh=None, **axes) is fn
    assert shard_over_batch_heads(fn, B, H, mesh=mesh, **axes) is not fn


def test_overlapping_axes_are_refused():
    with pytest.raises(ValueError, match="share a mesh axis"):
        shard_over_batch_heads(lambda w, s: s, B, H, mesh=None, batch_axes=("data", "tensor"), head_axes=("tensor",))


def test_neural_memory_under_a_mesh_equals_single_device():
    # remat_every=1 halves the compile time (groups of 4 chunks are traced out in full); the sharding wrapper does not
    # depend on it, and the trainer's sharded-step test runs the model's default under a mesh.
    cfg = MemoryConfig(heads=4, chunk_size=4, depth=2, expansion=2, remat_every=1)
    layer = NeuralMemory(32, cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 21, 32))
    graphdef, state = nnx.split(layer)
    mesh = make_mesh("data=2,fsdp=2,tensor=2")

    def loss(s, x, mesh):  # outputs as aux: one compile gives both outputs and gradients
        y = nnx.merge(graphdef, s)(x, mesh=mesh)
        return jnp.sum(y**2), y

    with jax.set_mesh(mesh):  # an ambient mesh alone does not put the memory under shard_map
        assert not _is_sharded(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, mesh=None)).lower(state, x).as_text())
    assert _is_sharded(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, mesh=mesh)).lower(state, x).as_text())
    (_, y), g = jax.jit(jax.value_and_grad(lambda s, x: loss(s, x, None), has_aux=True))(state, x)
    (_, y_m), g_m = jax.jit(jax.value_and_grad(lambda s, x: loss(s, x, mesh), has_aux=True))(state, x)
    chex.assert_trees_all_close(y_m, y, atol=1e-5)
    # Gradients sum over slices in a different order across devices: float32 reordering, ~2e-4 of the leaf scale.
    assert_close_scaled(g_m, g, 1e-3, "gradients under the mesh")
