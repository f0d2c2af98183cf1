"""``memory_scan_from``: the chunked recurrence continued from a stream at any position (memory/resume.py).

Fed in pieces of any size from the state each piece leaves, it must equal the token-by-token oracle over the whole
sequence: outputs, final state and gradients. Float64, so the checks are tight (summation order alone differs).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from memory_cases import as_float64, make_inputs

from titans_jax.memory import linear_memory, memory_scan_reference, mlp_memory
from titans_jax.memory.resume import memory_scan_from

NETS = {"linear": linear_memory(8), "mlp2": mlp_memory(8, 2, 2)}
CHUNK = 4


def _gates(kind, lr, mom, dec, net):
    if kind == "head":
        return lr, mom, dec
    if kind == "layer":  # per-matrix gates
        return tuple(lr * (1 + 0.5 * l) for l in range(net.depth)), (mom,) * net.depth, (dec,) * net.depth
    # channel-wise decay: one alpha per output channel of every matrix
    return lr, mom, tuple(dec[:, None] * jnp.linspace(0.5, 1.5, d_out)[None] for _, d_out in net.layer_shapes)


def _pieces(net, params, args, sizes, length_pad=0):
    """Feed the sequence in pieces of ``sizes`` (each padded with ``length_pad`` junk tokens cut by ``length``)."""
    w = tuple(params)
    state = (w, tuple(jnp.zeros_like(x) for x in w), w)
    q, k, v, lr, mom, dec = args
    ys, pos = [], 0

    @functools.partial(jax.jit, static_argnums=(0,))
    def run(n_total, state, pos, piece, n):
        return memory_scan_from(net, state, pos, *piece, chunk_size=CHUNK, length=n)

    for n in sizes:
        piece = jax.tree.map(lambda a, pos=pos, n=n: a[pos:pos + n], (q, k, v, lr, mom, dec))
        if length_pad:
            piece = jax.tree.map(lambda a: jnp.concatenate([a, jnp.full((length_pad, *a.shape[1:]), 0.3, a.dtype)]),
                                 piece)
        y, state = run(n + length_pad, state, jnp.int32(pos), piece, jnp.int32(n))
        ys.append(y[:n])
        pos += n
    return jnp.concatenate(ys), state


@pytest.mark.parametrize(("net_name", "gates", "sizes"), [
    ("linear", "head", (4, 8, 12)), ("linear", "channel", (3, 6, 1, 9, 5)), ("mlp2", "head", (3, 6, 1, 9, 5)),
    ("mlp2", "layer", (1, 1, 2, 20)), ("mlp2", "channel", (4, 8, 12))])
def test_pieces_equal_the_oracle(net_name, gates, sizes):
    """Pieces that do and do not line up with the chunks (4), with per-head, per-matrix and channel-wise gates."""
    net = NETS[net_name]
    with jax.enable_x64(True):
        params = as_float64(net.init(jax.random.key(1)))
        q, k, v, lr, mom, dec = as_float64(make_inputs(sum(sizes), 8, seed=3, dec_scale=0.3))
        args = (q, k, v, *_gates(gates, lr, mom, dec, net))
        y_ref, st_ref = jax.jit(lambda *a: memory_scan_reference(net, params, *a, chunk_size=CHUNK))(*args)
        y, (w, s, _) = _pieces(net, params, args, sizes, length_pad=2 if gates == "head" else 0)
        np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-10)
        for a, b in zip((*w, *s), (*st_ref.weights, *st_ref.momentum), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)


def test_empty_length_is_an_identity():
    """``length=0``: the state comes back bit for bit (an empty slot is an exact identity)."""
    net = NETS["mlp2"]
    params = net.init(jax.random.key(1))
    q, k, v, lr, mom, dec = make_inputs(6, 8, seed=2)
    w = tuple(params)
    s = tuple(0.1 * jnp.ones_like(x) for x in w)
    state = (w, s, tuple(2 * x for x in w))
    for pos in (0, 5):
        _, out = jax.jit(lambda st, p: memory_scan_from(net, st, p, q, k, v, lr, mom, dec, chunk_size=CHUNK,
                                                        length=0))(state, jnp.int32(pos))
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(state), strict=True):
            np.testing.assert_array_equal(a, b)


def test_gradients_equal_the_oracle():
    """Gradients through two pieces (split inside a chunk) equal the oracle's over the whole sequence."""
    net = NETS["mlp2"]
    with jax.enable_x64(True):
        params = as_float64(net.init(jax.random.key(1)))
        args = as_float64(make_inputs(11, 8, seed=4))

        def loss_ref(params, *a):
            y, st = memory_scan_reference(net, params, *a, chunk_size=CHUNK)
            return jnp.sum(jnp.sin(y)) + sum(jnp.sum(jnp.cos(x)) for x in (*st.weights, *st.momentum))

        def loss_pieces(params, *a):
            w = tuple(params)
            state = (w, tuple(jnp.zeros_like(x) for x in w), w)
            y1, state = memory_scan_from(net, state, 0, *(x[:6] for x in a), chunk_size=CHUNK)
            y2, (w, s, _) = memory_scan_from(net, state, 6, *(x[6:] for x in a), chunk_size=CHUNK)
            y = jnp.concatenate([y1, y2])
            return jnp.sum(jnp.sin(y)) + sum(jnp.sum(jnp.cos(x)) for x in (*w, *s))

        g_ref = jax.jit(jax.grad(loss_ref, argnums=tuple(range(7))))(params, *args)
        g = jax.jit(jax.grad(loss_pieces, argnums=tuple(range(7))))(params, *args)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-9 * (1 + float(jnp.max(jnp.abs(b)))))
