"""The hand-written backward pass of the dual chunk scan (``dual_vjp.py``, ``impl="dual"``) against autodiff of the same
forward (``impl="dual_autodiff"``).

In float64 the two differ only by summation order, so they agree to ~1e-12 of each leaf's scale.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import pytest
from memory_cases import assert_close_scaled, make_inputs, outer_loss

from titans_jax.memory import MemoryState, linear_memory, memory_scan, mlp_memory
from titans_jax.memory.dual import all_chunk_coeffs, dual_chunk
from titans_jax.memory.dual_vjp import chunk_vjp

NETS = {"linear": linear_memory(6), "mlp2": mlp_memory(6, 2, 2), "mlp3": mlp_memory(6, 3, 2)}


def _chunk_case(net, num_sets, b=5, seed=0):
    ks = jax.random.split(jax.random.key(seed), 8)
    w = net.init(ks[0], jnp.float64)
    s_keys = jax.random.split(ks[1], net.depth)
    s = tuple(0.1 * jax.random.normal(kk, x.shape, jnp.float64) for kk, x in zip(s_keys, w, strict=True))
    q, k, v = (jax.random.normal(kk, (b, net.dim), jnp.float64) for kk in ks[2:5])
    gates = [scale * jax.random.uniform(kk, (1, b, num_sets), jnp.float64)
             for kk, scale in zip(ks[5:8], (0.1, 0.9, 0.2), strict=True)]
    coeffs = jax.tree.map(lambda x: x[0], all_chunk_coeffs(*gates))
    return (w, s), (q, k, v, coeffs)


@pytest.mark.parametrize(("net", "per_layer_gates"), [("linear", False), ("mlp2", False), ("mlp3", False),
                                                      ("mlp2", True), ("mlp3", True)])
def test_chunk_vjp_equals_autodiff(net, per_layer_gates):
    net = NETS[net]
    with jax.enable_x64(True):
        carry, xs = _chunk_case(net, net.depth if per_layer_gates else 1)
        out = jax.eval_shape(lambda c, x: dual_chunk(net, c, x), carry, xs)
        leaves, tree = jax.tree.flatten(out)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        g_out = tree.unflatten([jax.random.normal(kk, x.shape, x.dtype) for kk, x in zip(keys, leaves, strict=True)])
        expected = jax.jit(lambda c, x, g: jax.vjp(lambda c_, x_: dual_chunk(net, c_, x_), c, x)[1](g))(carry, xs, g_out)
        actual = jax.jit(lambda c, x, g: chunk_vjp(net, c, x, g[0], g[1]))(carry, xs, g_out)
        chex.assert_trees_all_equal_structs(actual, expected)
        assert_close_scaled(actual, expected, 1e-12, "chunk cotangents")


@pytest.mark.parametrize(("net", "remat_every"), [("linear", None), ("mlp2", None), ("mlp2", 3), ("mlp3", 1)])
def test_memory_scan_gradients_manual_equal_autodiff(net, remat_every):
    """All seven inputs, a last partial chunk (T = 23, chunk 4) and, with remat_every=3, a remainder group."""
    net = NETS[net]
    with jax.enable_x64(True):
        params = net.init(jax.random.key(2), jnp.float64)
        args = make_inputs(23, 6, jnp.float64, seed=3)
        argnums = tuple(range(7))
        grads = {}
        for impl, kw in (("dual", {"remat_every": remat_every}), ("dual_autodiff", {})):
            fn = functools.partial(memory_scan, chunk_size=4, impl=impl, **kw)
            grads[impl] = jax.jit(jax.grad(lambda *a, fn=fn: outer_loss(fn, net, *a), argnums))(params, *args)
        assert_close_scaled(grads["dual"], grads["dual_autodiff"], 1e-10, f"gradients, remat_every={remat_every}")


@pytest.mark.parametrize("t_len", [24, 28])
def test_manual_vjp_inside_a_scan_over_layers_under_vmap(t_len):
    """The model's setting: a scan over layers whose body vmaps over (batch, heads), W_0 shared over the batch, chunk-start
    states kept every 3 chunks (T = 28: a remainder group). A regression test: the primal and the forward rule of the
    custom_vjp once batched differently there, and the outputs came back transposed over (batch, head)."""
    net = NETS["mlp2"]
    with jax.enable_x64(True):
        n_layers, batch, heads = 2, 2, 3
        per_head = [net.init(kk, jnp.float64) for kk in jax.random.split(jax.random.key(6), n_layers * heads)]
        w0 = tuple(jnp.stack(ws).reshape(n_layers, heads, *ws[0].shape) for ws in zip(*per_head, strict=True))
        x = jax.random.normal(jax.random.key(7), (batch, heads, t_len, net.dim), jnp.float64)

        def model(w0, x, impl):
            kw = {"remat_every": 3} if impl == "dual" else {}

            def one(w, h):
                lr, mom, dec = (jnp.full(h.shape[:1], g, h.dtype) for g in (0.1, 0.9, 0.02))
                return memory_scan(net, w, h, jnp.tanh(h), 0.5 * h, lr, mom, dec, chunk_size=4, impl=impl, **kw)[0]

            def layer(h, w_H):
                return h + jnp.tanh(jax.vmap(jax.vmap(one), in_axes=(None, 0))(w_H, h)), None

            return jax.lax.scan(layer, x, w0)[0]

        results = {}
        for impl in ("dual", "dual_autodiff"):
            loss = functools.partial(lambda w, x_, impl_: jnp.sum(jnp.sin(model(w, x_, impl_))), impl_=impl)
            results[impl] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(w0, x)
        assert_close_scaled(results["dual"], results["dual_autodiff"], 1e-10, f"loss and gradients, T={t_len}")


def test_manual_vjp_from_a_given_state_and_per_layer_gates():
    net = NETS["mlp2"]
    with jax.enable_x64(True):
        params = net.init(jax.random.key(4), jnp.float64)
        q, k, v, lr, mom, dec = make_inputs(16, 6, jnp.float64, seed=5)
        state = MemoryState(params, tuple(0.05 * jnp.ones_like(w) for w in params))
        gates = ((lr, 0.5 * lr), (mom, mom), (dec, 0.3 * dec))

        def loss(state, q, k, impl):
            y, st = memory_scan(net, params, q, k, v, *gates, chunk_size=4, state=state, impl=impl)
            return jnp.sum(jnp.sin(y)) + sum(jnp.sum(w * w) for w in st.weights) + sum(jnp.sum(s) for s in st.momentum)

        g_manual = jax.grad(loss, argnums=(0, 1, 2))(state, q, k, "dual")
        g_auto = jax.grad(loss, argnums=(0, 1, 2))(state, q, k, "dual_autodiff")
        assert_close_scaled(g_manual, g_auto, 1e-10, "gradients wrt state, q, k")


def test_gradient_of_gradient_through_manual_vjp():
    """Reverse over reverse: the hand-written backward is itself differentiable."""
    net = NETS["mlp2"]
    with jax.enable_x64(True):
        params = net.init(jax.random.key(6), jnp.float64)
        q, k, v, lr, mom, dec = make_inputs(12, 6, jnp.float64, seed=7)

        def second(impl):
            loss = lambda k_: outer_loss(functools.partial(memory_scan, chunk_size=4, impl=impl), net, params, q, k_, v,
                                         lr, mom, dec)
            return jax.jit(jax.grad(lambda k_: jnp.sum(jnp.cos(jax.grad(loss)(k_)))))(k)

        assert_close_scaled(second("dual"), second("dual_autodiff"), 1e-9, "gradient of gradient")


def test_bad_impl_arguments_name_the_fix():
    net = NETS["linear"]
    args = make_inputs(8, 6)
    with pytest.raises(ValueError, match="impl must be one of"):
        memory_scan(net, net.init(jax.random.key(0)), *args, impl="manual")
    with pytest.raises(ValueError, match="remat_every tunes the backward of impl='dual' only"):
        memory_scan(net, net.init(jax.random.key(0)), *args, impl="associative", remat_every=2)
    with pytest.raises(ValueError, match="remat_every must be None or an int"):
        memory_scan(net, net.init(jax.random.key(0)), *args, remat_every=0)
