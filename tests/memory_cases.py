"""Random inputs for the memory tests: unit-norm q and k as the layer produces them, gates inside their ranges."""

import jax
import jax.numpy as jnp
import numpy as np


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


F32_EPS = float(jnp.finfo(jnp.float32).eps)  # 1.19e-7
# How much less accurate than the float32 oracle a float32 implementation may be (per leaf, against the float64 truth).
# experiments/probe_float32_error.py over 30 seeds of every float32 case of tests/test_memory_scan.py (2026-11-29, AMD
# EPYC; experiments/results/float32_error_2026-11-29.json): largest ratio 25.7 (gradients, mlp2, chunk 3), 23.2 for the
# alpha = 1 outputs and state; 100 is 4x the largest. A wrong formula errs by ~1e-2 of the scale, ratios of 1e4 and up.
ORACLE_FACTOR = 100.0


def as_float64(tree):
    """Every floating leaf cast to float64 (call under ``jax.enable_x64``): the same inputs, the float64 truth's."""
    return jax.tree.map(lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def oracle_error_ratio(actual, oracle, truth):
    """Per leaf: ``max|actual - truth| / max(max|oracle - truth|, eps32 * max|truth|)``; the largest over the leaves."""
    worst = 0.0
    for a, o, t in zip(jax.tree.leaves(actual), jax.tree.leaves(oracle), jax.tree.leaves(truth), strict=True):
        t = np.asarray(t, np.float64)
        err_a = float(np.max(np.abs(np.asarray(a, np.float64) - t)))
        err_o = float(np.max(np.abs(np.asarray(o, np.float64) - t)))
        worst = max(worst, err_a / max(err_o, F32_EPS * float(np.max(np.abs(t))) + 1e-300))
    return worst


def assert_as_accurate_as_oracle(actual, oracle, truth, what="", factor=ORACLE_FACTOR):
    """A float32 result may differ from the float64 truth by at most ``factor`` times what the float32 oracle itself
    does on the same inputs (floored at one float32 ulp of the leaf's scale).

    Why this bound rather than a fixed tolerance: how much float32 rounding a case suffers depends on its conditioning
    (the deep memory's LayerNorm divides by the spread of a small vector; a wipe with alpha = 1 leaves only S) and on the
    CPU's kernels and reduction order. The oracle's own error measures both on the machine at hand, so the bound moves
    with them, while a wrong formula (errors of 1e-2 of the scale) is still caught."""
    ratio = oracle_error_ratio(actual, oracle, truth)
    assert ratio <= factor, f"{what}: {ratio:.3g}x the float32 oracle's own error against float64 (allowed {factor}x)"
