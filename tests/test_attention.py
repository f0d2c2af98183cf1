"""Full and sliding-window attention in query blocks (past ``q_block`` tokens) against the one-block form."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from memory_cases import assert_close_scaled

from titans_jax.nn.attention import Attention


def _attention(x, prefix, params, graphdef, window, q_block):
    attn = nnx.merge(graphdef, params)
    return attn.full(x, prefix, q_block=q_block) if window is None else attn.window(x, prefix, window, q_block=q_block)


@pytest.mark.parametrize(("t_len", "q_block", "window"), [(37, 8, None), (9, 8, None), (37, 8, 5), (37, 4, 11)])
def test_blocked_attention_equals_one_block(t_len, q_block, window):
    """Outputs and gradients (wrt the input, the persistent prefix and the weights); T not a multiple of the block,
    windows shorter and longer than the block."""
    graphdef, params = nnx.split(Attention(16, 2, nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (2, t_len, 16))
    prefix = jax.random.normal(jax.random.key(2), (3, 16))
    run = jax.jit(lambda p, x, pre, qb: _attention(x, pre, p, graphdef, window, qb), static_argnums=3)

    def loss(p, x, pre, qb):
        y = run(p, x, pre, qb)
        return jnp.sum(jnp.sin(y) * jnp.arange(y.shape[1])[None, :, None])

    assert_close_scaled(run(params, x, prefix, q_block), run(params, x, prefix, None), 1e-5, "outputs")
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    assert_close_scaled(grad(params, x, prefix, q_block), grad(params, x, prefix, None), 1e-5, "gradients")


@pytest.mark.parametrize("window", [None, 6])
def test_blocked_attention_sees_exactly_its_span(window):
    """Changing token 20 changes outputs 20 .. 20 + window - 1 only (all later ones without a window)."""
    attn = Attention(16, 2, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (1, 30, 16))
    prefix = jnp.zeros((2, 16))
    run = (lambda x: attn.full(x, prefix, q_block=8)) if window is None else (lambda x: attn.window(x, prefix, window,
                                                                                                    q_block=8))
    changed = jnp.max(jnp.abs(run(x) - run(x.at[:, 20].add(1.0))), axis=(0, 2)) > 1e-5
    end = 30 if window is None else 20 + window
    assert not changed[:20].any() and changed[20:end].all() and not changed[end:].any()
