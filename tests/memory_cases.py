"""Random inputs for the memory tests: unit-norm q and k as the layer produces them, gates inside their ranges."""

import jax
import jax.numpy as jnp


def make_inputs(t_len, dim, dtype=jnp.float32, seed=0, lr_scale=0.1, mom_scale=0.9, dec_scale=0.2):
    ks = jax.random.split(jax.random.key(seed), 6)

    def unit(key):
        x = jax.random.normal(key, (t_len, dim), jnp.float32)
        return (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)

    q, k = unit(ks[0]), unit(ks[1])
    v = jax.random.normal(ks[2], (t_len, dim), jnp.float32).astype(dtype)
    lr = (lr_scale * jax.random.uniform(ks[3], (t_len,))).astype(dtype)
    mom = (mom_scale * jax.random.uniform(ks[4], (t_len,))).astype(dtype)
    dec = (dec_scale * jax.random.uniform(ks[5], (t_len,))).astype(dtype)
    return q, k, v, lr, mom, dec


def outer_loss(fn, net, params, q, k, v, lr, mom, dec, **kw):
    """A scalar that depends on every output and on the final state, so gradients see all of them."""
    y, st = fn(net, params, q, k, v, lr, mom, dec, **kw)
    w_term = sum(jnp.sum(jnp.sin(w)) for w in st.weights)
    s_term = sum(jnp.sum(jnp.cos(s)) for s in st.momentum)
    return jnp.sum(jnp.sin(y) * jnp.arange(1, y.shape[0] + 1, dtype=y.dtype)[:, None]) + w_term + s_term


def max_abs(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def assert_close_scaled(actual, expected, rel, what=""):
    """Per leaf: |actual - expected| <= rel * max|expected|. Float32 sums carry errors relative to their largest terms,
    so a small entry of a large-valued gradient can differ by more than rel of itself yet far less than rel of the leaf."""
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        scale = float(jnp.max(jnp.abs(e))) + 1e-30
        err = float(jnp.max(jnp.abs(a - e)))
        assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel} x leaf scale {scale:.3g}"
