"""The token-by-token oracle of the memory recurrence (paper Eq. 12-15 with the chunk-start gradients of Sec. 3.2;
docs/architecture.md, "The memory recurrence"), written as plainly as possible.

A ``jax.lax.scan`` over tokens (so it can be jitted and timed beside the fast path). The carry holds the chunk-start
weights ``W_c`` next to ``(W, S)``: every gradient of a chunk is taken at ``W_c``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from titans_jax.memory.gates import decay_of_leaf, gate_column, prepare
from titans_jax.memory.networks import MemoryNet, associative_loss
from titans_jax.memory.state import MemoryState


def token_update(net: MemoryNet, carry, q_t, k_t, v_t, lr_G, mom_G, dec_G, *, new_chunk):
    """One token of the recurrence. ``carry = (W, S, W_c)``; ``new_chunk`` (a bool, may be traced) starts a chunk at this
    token, so its gradient (and the rest of the chunk's) is taken at the current weights. Gates are ``[G]`` (see
    ``gates.stack_gates``); channel-wise decay is a tuple with one ``[d_out_l]`` array per weight matrix.

    The reference scans this over tokens; streaming decoders call it once per token.
    """
    w, s, w_chunk = carry
    w_chunk = jax.tree.map(lambda a, b: jnp.where(new_chunk, a, b), w, w_chunk)
    u = jax.grad(lambda w_: associative_loss(net, w_, k_t[None], v_t[None]))(w_chunk)
    num_sets = lr_G.shape[0]
    new_s, new_w = [], []
    for l in range(net.depth):
        g = gate_column(l, num_sets)
        keep = 1 - decay_of_leaf(dec_G, l)  # a scalar, or [d_out] for channel-wise decay: scales W's columns
        new_s.append(mom_G[g] * s[l] - lr_G[g] * u[l])
        new_w.append(keep.reshape((1,) * (2 - keep.ndim) + keep.shape) * w[l] + new_s[l])
    w, s = tuple(new_w), tuple(new_s)
    return (w, s, w_chunk), net.apply(w, q_t[None])[0]


def memory_scan_reference(
    net: MemoryNet,
    params,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lr,
    momentum,
    decay,
    *,
    chunk_size: int = 16,
    state: MemoryState | None = None,
    chunk_constant_gates: bool = False,
) -> tuple[jax.Array, MemoryState]:
    """The memory recurrence one token at a time. Same signature and results as :func:`memory_scan`.

    For token t (0-based) in chunk ``c = t // chunk_size``::

        u_t = grad_W sum((M_W(k_t) - v_t)^2) at W = W_c   (the weights when chunk c began)
        S_t = momentum_t * S_{t-1} - lr_t * u_t
        W_t = (1 - decay_t) * W_{t-1} + S_t
        y_t = M_{W_t}(q_t)

    Args:
      net: the memory network.
      params: its initial weights W_0 (used when ``state`` is None).
      q, k, v: ``[T, dim]`` queries, keys and values of one (batch, head) slice.
      lr, momentum, decay: ``[T]`` gates theta, eta, alpha, or a tuple with one ``[T]`` array per weight matrix.
      chunk_size: b; gradients inside a chunk are taken at the chunk-start weights.
      state: ``MemoryState`` to continue from; None starts at ``(params, 0)``.
      chunk_constant_gates: replace each gate by its chunk mean (paper Sec. 3.2, "parameters as functions of chunks").

    Returns:
      ``(y_TxD, final MemoryState)``; ``y`` in q's dtype, the state in the compute dtype.
    """
    out_dtype = q.dtype
    q, k, v, (lr_g, mom_g, dec_g), state = prepare(
        net, params, q, k, v, lr, momentum, decay, chunk_size, state, chunk_constant_gates
    )
    t_len = q.shape[0]

    def step(carry, xs):
        t, *token = xs
        carry, y_t = token_update(net, carry, *token, new_chunk=(t % chunk_size == 0))
        return carry, y_t

    xs = (jnp.arange(t_len), q, k, v, lr_g, mom_g, dec_g)
    (w, s, _), y = jax.lax.scan(step, (state.weights, state.momentum, state.weights), xs)
    return y.astype(out_dtype), MemoryState(w, s)
