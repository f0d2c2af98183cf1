"""The chunked memory recurrence continued from a streaming state at any position: ``memory_scan_from``.

``memory_scan`` starts at a chunk boundary. A streaming state can stop anywhere inside a chunk: after ``pos`` tokens
its chunk began at ``pos - pos % b``, and the tokens still to come in that chunk take their gradients at the weights
``W_c`` it began with (paper Sec. 3.2), while the recurrence goes on from the current ``(W, S)``. When ``pos`` is
traced (inside ``jit``), where the chunk boundaries fall in the new tokens is not known while tracing.

So the new tokens are placed in a buffer that starts at the current chunk's boundary (``pos % b`` empty slots in
front, empty slots behind up to a whole number of chunks), and every chunk of the buffer runs the dual-form chunk step
of ``dual.py`` with a mask of the slots that hold tokens. An empty slot is an exact identity of the state:

* its gates are theta = 0, eta = 1, alpha = 0, so it adds no gradient and leaves the momentum and the decay products
  unchanged;
* the momentum it carries is not added to W again: the chunk coefficients ``G`` and ``C`` sum the momentum terms over
  filled slots only (``chunk_coeffs(..., active)``).

A chunk with no token returns ``(W, S)`` bit for bit. The first chunk takes its gradients at the stream's ``W_c``
unless its first slot holds a token (then the chunk starts here, at the current W). Outputs in empty slots are
discarded. This path is autodiff'ed by JAX (no hand-written backward).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from titans_jax.memory.dual import dual_chunk, leaf_coeffs
from titans_jax.memory.gates import prepare
from titans_jax.memory.networks import MemoryNet
from titans_jax.memory.state import MemoryState


def _where_tree(c, a, b):
    return jax.tree.map(lambda x, y: jnp.where(c, x, y), a, b)


def masked_gates(lr_BxG, mom_BxG, dec, active_B):
    """Gates with every empty slot made an identity of the state: theta = 0, eta = 1, alpha = 0."""
    col = active_B[:, None]
    dec = tuple(jnp.where(col, d, 0.0) for d in dec) if isinstance(dec, tuple) else jnp.where(col, dec, 0.0)
    return jnp.where(col, lr_BxG, 0.0), jnp.where(col, mom_BxG, 1.0), dec


def masked_chunk(net: MemoryNet, carry, xs):
    """One chunk of a buffer: ``((W, S, W_c), (q, k, v, gates, active_B)) -> ((W', S', W_c'), y_BxD)``.

    ``W_c`` is the weights the stream's current chunk began with; it becomes ``W`` when this chunk's first slot holds a
    token (the chunk starts here) and stays otherwise. Empty slots leave the state exactly as it was.
    """
    w, s, w_c = carry
    q_BxD, k_BxD, v_BxD, (lr, mom, dec), active_B = xs
    starts_here = active_B[0]
    w_grad = _where_tree(starts_here, w, w_c)
    lr, mom, dec = masked_gates(lr, mom, dec, active_B)
    coeffs = leaf_coeffs(net, lr, mom, dec, active_B)
    (w2, s2), y = dual_chunk(net, (w, s), (q_BxD, k_BxD, v_BxD, coeffs), w_grad=w_grad)
    return (w2, s2, _where_tree(jnp.any(active_B), w_grad, w_c)), y


def memory_scan_from(
    net: MemoryNet,
    state,
    pos,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    lr,
    momentum,
    decay,
    *,
    chunk_size: int = 16,
    length=None,
):
    """Continue the memory recurrence from a streaming state after ``pos`` tokens, for one (batch, head) slice.

    Equal (up to float rounding) to feeding the tokens one at a time with ``token_update`` from the same state, and to
    one ``memory_scan`` over the whole sequence when the state came from its first ``pos`` tokens.

    Args:
      net: the memory network.
      state: ``(W, S, W_c)``: the weights, the momentum and the weights the current chunk began with, each a tuple of
        matrices (``W_c`` is ignored when ``pos`` is a multiple of ``chunk_size``).
      pos: tokens seen so far (an int or a traced int32 scalar); chunks are counted from position 0.
      q, k, v: ``[T, dim]``; lr, momentum, decay: as ``memory_scan`` takes them (``[T]``, tuples per matrix, or
        channel-wise decay).
      chunk_size: b, tokens per chunk.
      length: how many of the T tokens to take (an int or a traced scalar in ``[0, T]``; default T). Later tokens
        leave the state untouched and their outputs are unspecified: this lets a caller with a fixed-size buffer feed a
        variable number of tokens.

    Returns:
      ``(y_TxD, (W, S, W_c))``: outputs in q's dtype, the state after the ``length`` tokens (compute dtype).
    """
    w, s, w_c = (tuple(x) for x in state)
    out_dtype = q.dtype
    q, k, v, gates, st = prepare(net, w, q, k, v, lr, momentum, decay, chunk_size, MemoryState(w, s), False)
    w_c = tuple(x.astype(st.weights[0].dtype) for x in w_c)
    t_len = q.shape[0]
    length = t_len if length is None else length
    offset = jnp.asarray(pos, jnp.int32) % chunk_size
    # Slots: the current chunk's first `offset` slots are already done; the T tokens follow; then padding to whole chunks.
    n_chunks = -(-(t_len + chunk_size - 1) // chunk_size)
    slot = jnp.arange(n_chunks * chunk_size)
    src = slot - offset
    active = (src >= 0) & (src < length)
    take = jnp.clip(src, 0, t_len - 1)

    def place(x_TxF):
        return jnp.where(active.reshape(-1, *([1] * (x_TxF.ndim - 1))), x_TxF[take], 0).reshape(
            n_chunks, chunk_size, *x_TxF.shape[1:])

    xs = jax.tree.map(place, (q, k, v, gates)) + (active.reshape(n_chunks, chunk_size),)
    carry, y = jax.lax.scan(lambda c, x: masked_chunk(net, c, x), (st.weights, st.momentum, w_c), xs)
    y_T = y.reshape(n_chunks * chunk_size, -1)[jnp.arange(t_len) + offset]
    return y_T.astype(out_dtype), carry
