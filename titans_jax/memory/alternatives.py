"""The checked alternatives to the fast path, selected with ``memory_scan(impl=...)``: same contract, other algorithms.

They exist to be compared, not to be fast (each is held to the token-by-token reference in
``tests/test_memory_scan.py``, and the fast path to them):

* ``"dual_autodiff"``: the same dual-form chunk step as the fast path, differentiated by JAX instead of by the
  hand-written backward of ``dual_vjp.py``. It also accepts forward-mode differentiation (``jax.jvp`` of the outputs),
  which a ``custom_vjp`` refuses, and it is how channel-wise forgetting is differentiated.
* ``"associative"``: forms the b per-token weights of a chunk with ``jax.lax.associative_scan`` over the two linear
  recurrences (momentum, then forgetting) and reads every query with its own weights: the most literal chunk-parallel
  form of paper Sec. 3.2, and the one with the most memory traffic (measured 8-19x slower on CPU,
  ``docs/benchmarks.md``).

Both keep every chunk's residuals for the backward pass (no rematerialisation): they are for checking at small T.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from titans_jax.memory.dual import dual_chunk, leaf_coeffs
from titans_jax.memory.gates import decay_of_leaf, gate_column
from titans_jax.memory.networks import MemoryNet


def dual_autodiff_chunk(net: MemoryNet, carry, xs):
    """``dual_chunk`` from the chunk's raw gates: the coefficients are computed here, per chunk, so that channel-wise
    ones (``[b, b, O]`` per chunk) are never stacked over all chunks."""
    q_BxD, k_BxD, v_BxD, (lr_BxG, mom_BxG, dec) = xs
    return dual_chunk(net, carry, (q_BxD, k_BxD, v_BxD, leaf_coeffs(net, lr_BxG, mom_BxG, dec)))


def linear_scan(a_B, b_BxIxO, init_IxO):
    """``x_t = a_t x_{t-1} + b_t`` for all t with ``x_0 = init``, by an associative scan (init folded into the first b).
    ``a_B`` is ``[b]`` (one factor per token) or ``[b, O]`` (one per output channel)."""
    a_B = a_B.reshape(a_B.shape[:1] + (1,) * (b_BxIxO.ndim - a_B.ndim) + a_B.shape[1:])
    b_BxIxO = b_BxIxO.at[0].add(a_B[0] * init_IxO)
    a_full = jnp.broadcast_to(a_B, b_BxIxO.shape)

    def combine(left, right):
        a1, b1 = left
        a2, b2 = right
        return a1 * a2, a2 * b1 + b2

    return jax.lax.associative_scan(combine, (a_full, b_BxIxO))[1]


def associative_chunk(net: MemoryNet, carry, xs):
    """One chunk with its b per-token weights formed explicitly: ``((W_c, S_c), (q, k, v, gates)) -> ((W', S'), y)``."""
    w_c, s_c = carry
    q_BxD, k_BxD, v_BxD, (lr_BxG, mom_BxG, dec) = xs
    inputs, deltas = net.key_path(w_c, k_BxD, v_BxD)
    num_sets = lr_BxG.shape[1]
    ws, ss = [], []
    for l in range(net.depth):
        g = gate_column(l, num_sets)
        u_BxIxO = jnp.einsum("bi,bo->bio", inputs[l], deltas[l])
        lr = lr_BxG[:, g][:, None, None]
        s_seq = linear_scan(mom_BxG[:, g], -lr * u_BxIxO, s_c[l])
        ws.append(linear_scan(1.0 - decay_of_leaf(dec, l), s_seq, w_c[l]))
        ss.append(s_seq)
    y_BxD = jax.vmap(lambda w, q: net.apply(w, q[None])[0])(tuple(ws), q_BxD)
    return (tuple(w[-1] for w in ws), tuple(s[-1] for s in ss)), y_BxD
