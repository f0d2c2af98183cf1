"""Attention: full and sliding-window attention in query blocks (past ``q_block`` tokens) against the one-block form;
MAC's segment mask with grouped memory tokens; the streaming ``cached_token`` with a context cache against the segment."""

import jax
import jax.numpy as jnp
import numpy as np
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


def _segment_case(c=8, n_l=4, n_p=2, seed=4):
    attn = Attention(16, 2, nnx.Rngs(0))
    ks = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(ks[0], (1, c, 16))
    h = jax.random.normal(ks[1], (1, n_l, 16))
    prefix = jax.random.normal(ks[2], (n_p, 16))
    r = c // n_l
    return attn, x, h, prefix, r, np.arange(1, n_l + 1) * r - 1


def test_segment_memory_token_is_seen_from_its_groups_last_token():
    """MAC's segment attention with N_l = C / r memory tokens: changing h_j changes the outputs of tokens
    i >= (j + 1) r - 1 (all of them) and of no earlier token."""
    attn, x, h, prefix, r, h_pos = _segment_case()
    base = attn.segment(x, h, h_pos, prefix)
    for j in range(h.shape[1]):
        changed = jnp.max(jnp.abs(attn.segment(x, h.at[:, j].add(1.0), h_pos, prefix) - base), axis=(0, 2)) > 1e-6
        first = (j + 1) * r - 1
        assert not changed[:first].any() and changed[first:].all(), (j, changed)


def test_cached_token_with_a_context_cache_equals_the_segment():
    """The streaming form MAC's step uses: every token against the prefix, the memory-token cache (``context``, slot j
    written at the position of its group's last token) and its own cache equals the parallel segment attention."""
    attn, x, h, prefix, r, h_pos = _segment_case()
    n_p, (b, c, _) = prefix.shape[0], x.shape
    h_cache, x_cache = attn.init_cache(b, h.shape[1]), attn.init_cache(b, c)
    outs = []
    for i in range(c):
        j = i // r
        hk, hv = attn.kv(h[:, j : j + 1], jnp.full((b, 1), n_p + h_pos[j]))
        h_cache = h_cache.write(hk, hv, int(h_pos[j]), slot=j)
        y, x_cache = attn.cached_token(x[:, i : i + 1], prefix, x_cache, window=None, pos=i, context=(h_cache,))
        outs.append(y)
    # One query against <= 2 + 4 + 8 keys in either form; float32 reordering of the softmax sums only.
    assert_close_scaled(jnp.concatenate(outs, axis=1), attn.segment(x, h, h_pos, prefix), 1e-5, "streamed segment")
