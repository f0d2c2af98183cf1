"""The dual-form chunk step of the memory recurrence (``impl="dual"``) and its gate coefficients.

``dual_chunk`` maps ``(W_c, S_c)`` and one chunk's ``(q, k, v, coeffs)`` to the end-of-chunk state and the chunk's
outputs; see ``chunked.py`` for the algebra. ``dual_vjp.py`` holds its hand-written backward pass.

Coefficients of a gate set are per token (``a, g: [b]``, ``c: [b, b]``), or, for channel-wise forgetting (one alpha
per output channel of a weight matrix), carry a trailing channel axis (``a, g: [b, O]``, ``c: [b, b, O]``): forgetting
then scales W's columns, which commutes with the row-convention matmul ``X W``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from titans_jax.memory.gates import gate_column, is_channel_decay, prefix_products, segment_products
from titans_jax.memory.networks import MemoryNet


class ChunkCoeffs(NamedTuple):
    """Within-chunk coefficients of one gate set: a, e, g, s_coef of shape [b]; c of shape [b, b]. With channel-wise
    decay a and g are [b, O] and c is [b, b, O]."""

    a: jax.Array  # A_t = prod_{j<=t} (1 - decay_j)
    e: jax.Array  # E_t = prod_{j<=t} momentum_j
    g: jax.Array  # G_t = sum_{s<=t} (A_t/A_s) E_s: weight of S_c in W_t
    c: jax.Array  # C[t, i]: weight of u_i in W_t
    s_coef: jax.Array  # lr_i E_b / E_i: weight of u_i in the end-of-chunk momentum


def chunk_coeffs(lr_B, mom_B, dec_B, active_B=None) -> ChunkCoeffs:
    """One chunk's coefficients; ``dec_B`` is ``[b]`` or, channel-wise, ``[b, O]``.

    ``active_B`` (bool ``[b]``, default all): slots that hold a token (``resume.py``). The momentum of an empty slot is
    not added to W (``G`` and ``C`` sum over filled slots only); with its gates theta = 0, eta = 1, alpha = 0 the slot
    is then an exact identity of the state.
    """
    keep = 1.0 - dec_B
    le_BxB = segment_products(mom_B)  # E_s / E_i
    e_B = prefix_products(mom_B)
    on = jnp.ones_like(mom_B) if active_B is None else active_B.astype(mom_B.dtype)
    if keep.ndim == 1:
        la_BxB = segment_products(keep)  # A_t / A_s
        a, g, c = prefix_products(keep), la_BxB @ (on * e_B), ((la_BxB * on[None, :]) @ le_BxB) * lr_B[None, :]
    else:
        la_BxBxO = jax.vmap(segment_products, in_axes=1, out_axes=2)(keep)
        a = jax.vmap(prefix_products, in_axes=1, out_axes=1)(keep)
        g = jnp.einsum("tso,s->to", la_BxBxO, on * e_B)
        c = jnp.einsum("tso,si->tio", la_BxBxO * on[None, :, None], le_BxB) * lr_B[None, :, None]
    return ChunkCoeffs(a=a, e=e_B, g=g, c=c, s_coef=le_BxB[-1] * lr_B)


def all_chunk_coeffs(lr_NxBxG, mom_NxBxG, dec_NxBxG) -> ChunkCoeffs:
    """Coefficients of every chunk and gate set at once (fields ``[N, G, ...]``): none of this depends on the carried
    state, so it stays out of the sequential loop. Per-token (not channel-wise) gates only."""
    per_set = jax.vmap(chunk_coeffs, in_axes=(-1, -1, -1))
    return jax.vmap(per_set)(lr_NxBxG, mom_NxBxG, dec_NxBxG)


def leaf_coeffs(net: MemoryNet, lr_BxG, mom_BxG, dec, active_B=None) -> list[ChunkCoeffs]:
    """One chunk's coefficients for every weight matrix, from its gates (``gates.stack_gates`` layout, channel-wise
    decay included): what a scan step computes when the coefficients are not precomputed. ``active_B``: see
    :func:`chunk_coeffs`."""
    if is_channel_decay(dec):
        return [chunk_coeffs(lr_BxG[:, l], mom_BxG[:, l], dec[l], active_B) for l in range(net.depth)]
    per_set = jax.vmap(chunk_coeffs, in_axes=(-1, -1, -1, None))
    return coeffs_per_leaf(net, per_set(lr_BxG, mom_BxG, dec, active_B))


def _rows(x):
    """A per-token coefficient as a multiplier of ``[b, O]`` rows: ``[b] -> [b, 1]``; ``[b, O]`` stays."""
    return x[:, None] if x.ndim == 1 else x


def _cols(x):
    """An end-of-chunk coefficient as a multiplier of ``[I, O]`` weights: a scalar stays; ``[O] -> [1, O]``."""
    return x if x.ndim == 0 else x[None, :]


def weighted_sum(c, att_BxB, d_BxO):
    """``sum_i c[t, i] att[t, i] d[i]`` for every t: one matmul, or per channel when ``c`` is ``[b, b, O]``."""
    if c.ndim == 2:
        return (c * att_BxB) @ d_BxO
    return jnp.einsum("tio,ti,io->to", c, att_BxB, d_BxO)


def key_path_autodiff(net: MemoryNet, w_c, k_BxD, v_BxD):
    """Layer inputs ``H_l`` and errors ``D_l = d loss / d z_l`` of every layer, for all b keys at once at ``W_c``, by
    back-propagation through additive taps on each layer's output. The plain version of ``MemoryNet.key_path``."""

    def loss(taps):
        y, inputs = net.forward(w_c, k_BxD, lambda l, h, w: h @ w + taps[l])
        r = y - v_BxD
        return jnp.sum(r * r), inputs

    taps = tuple(jnp.zeros((k_BxD.shape[0], w.shape[1]), k_BxD.dtype) for w in w_c)
    deltas, inputs = jax.grad(loss, has_aux=True)(taps)
    return inputs, list(deltas)


def coeffs_per_leaf(net, coeffs) -> list[ChunkCoeffs]:
    """The coefficient set each weight matrix reads (``gates.gate_column``), one entry per layer. ``coeffs`` is a
    ``ChunkCoeffs`` stacked over gate sets (``[G, ...]``) or already one entry per layer."""
    if not isinstance(coeffs, ChunkCoeffs):
        return list(coeffs)
    num_sets = coeffs.a.shape[0]
    sets = [jax.tree.map(lambda x, g=g: x[g], coeffs) for g in range(num_sets)]
    return [sets[gate_column(l, num_sets)] for l in range(net.depth)]


def end_of_chunk(w_c, s_c, inputs, deltas, coeffs):
    """``W' = a_b W_c + g_b S_c - H^T (c_b . D)``, ``S' = e_b S_c - H^T (s . D)`` for every layer."""
    new_w, new_s = [], []
    for w, s, h_BxI, d_BxO, cf in zip(w_c, s_c, inputs, deltas, coeffs, strict=True):
        # One matmul for both rank-b updates: H^T [C_b * D | s_coef * D].
        upd = h_BxI.T @ jnp.concatenate([_rows(cf.c[-1]) * d_BxO, cf.s_coef[:, None] * d_BxO], axis=1)
        upd_w, upd_s = jnp.split(upd, 2, axis=1)
        new_w.append(_cols(cf.a[-1]) * w + _cols(cf.g[-1]) * s - upd_w)
        new_s.append(cf.e[-1] * s - upd_s)
    return tuple(new_w), tuple(new_s)


def read_terms(cf: ChunkCoeffs, x_BxI, w_IxO, s_IxO, h_BxI, d_BxO):
    """One layer's dual-form read ``Z = a*(X W) + g*(X S) - (c . X H^T) D`` and its three products ``X W``, ``X S``,
    ``X H^T`` (the backward pass needs them): ``(XW, XS, XH^T, Z)``.

    Two matmuls against W and S rather than one against concat([W, S]): the concatenation would be one more W-sized
    copy per chunk, and W-sized memory traffic is what the CPU backward is bound by."""
    p_w, p_s, att = x_BxI @ w_IxO, x_BxI @ s_IxO, x_BxI @ h_BxI.T
    return p_w, p_s, att, _rows(cf.a) * p_w + _rows(cf.g) * p_s - weighted_sum(cf.c, att, d_BxO)


def dual_chunk(net: MemoryNet, carry, xs, w_grad=None):
    """One chunk: ``((W_c, S_c), (q, k, v, coeffs_G)) -> ((W', S'), y_BxD)``, every token read with its own weights.

    ``w_grad``: the weights the chunk's gradients are taken at (default ``W_c``). A stream resumed inside a chunk
    (``resume.py``) takes them at the weights its chunk began with while the recurrence goes on from ``(W_c, S_c)``.
    """
    w_c, s_c = carry
    q_BxD, k_BxD, v_BxD, coeffs_G = xs
    coeffs = coeffs_per_leaf(net, coeffs_G)
    inputs, deltas = net.key_path(w_c if w_grad is None else w_grad, k_BxD, v_BxD)

    def read_layer(l, hq_BxI, w_IxO):
        return read_terms(coeffs[l], hq_BxI, w_IxO, s_c[l], inputs[l], deltas[l])[3]

    y_BxD, _ = net.forward(w_c, q_BxD, read_layer)
    return end_of_chunk(w_c, s_c, inputs, deltas, coeffs), y_BxD


def advance(net: MemoryNet, carry, xs):
    """The end-of-chunk state alone (no reads): what the backward pass needs to rebuild chunk-start states."""
    w_c, s_c = carry
    _, k_BxD, v_BxD, coeffs_G = xs
    inputs, deltas = net.key_path(w_c, k_BxD, v_BxD)
    return end_of_chunk(w_c, s_c, inputs, deltas, coeffs_per_leaf(net, coeffs_G))
