"""Blocked causal attention (``Attention.full`` past ``q_block`` tokens) against the one-block form."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from memory_cases import assert_close_scaled

from titans_jax.nn.attention import Attention


@pytest.mark.parametrize(("t_len", "q_block"), [(37, 8), (32, 8), (9, 8)])
def test_blocked_full_attention_equals_one_block(t_len, q_block):
    """Outputs and gradients (wrt the input, the persistent prefix and the weights); T not a multiple of the block too."""
    attn = Attention(16, 2, nnx.Rngs(0))
    graphdef, params = nnx.split(attn)
    x = jax.random.normal(jax.random.key(1), (2, t_len, 16))
    prefix = jax.random.normal(jax.random.key(2), (3, 16))

    def run(params, x, prefix, q_block):
        return nnx.merge(graphdef, params).full(x, prefix, q_block=q_block)

    def loss(params, x, prefix, q_block):
        y = run(params, x, prefix, q_block)
        return jnp.sum(jnp.sin(y) * jnp.arange(y.shape[1])[None, :, None])

    run = jax.jit(run, static_argnums=3)
    assert_close_scaled(run(params, x, prefix, q_block), run(params, x, prefix, None), 1e-5, "outputs")
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    assert_close_scaled(grad(params, x, prefix, q_block), grad(params, x, prefix, None), 1e-5, "gradients")


def test_blocked_attention_is_causal():
    """Changing token 20 changes no output before it."""
    attn = Attention(16, 2, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (1, 30, 16))
    prefix = jnp.zeros((2, 16))
    y = attn.full(x, prefix, q_block=8)
    y2 = attn.full(x.at[:, 20].add(1.0), prefix, q_block=8)
    assert jnp.allclose(y[:, :20], y2[:, :20], atol=1e-6)
    assert not jnp.allclose(y[:, 20:], y2[:, 20:], atol=1e-3)
