"""What the memory does while it reads: gate means, its own loss before and after each chunk's update, and the size
of its state (docs/architecture.md, "Memory statistics").

:func:`memory_scan_stats` runs the chunked recurrence of ``memory_scan`` (paper Sec. 3.2) for one (batch, head) slice
with the fast path's own chunk step (``dual.dual_chunk`` on ``dual.leaf_coeffs``, the gates read by ``gates.prepare``)
and measures, per chunk, the associative loss of paper Eq. 12 on the chunk's keys at the weights the chunk began
with (the loss its gradients are taken at) and at the weights it ended with. A plain chunk-by-chunk ``lax.scan`` with
no custom backward: the statistics are computed on logging steps only, never differentiated.

:func:`pool` averages the statistics of several slices or calls, weighting by their token counts.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from titans_jax.memory.dual import dual_chunk, leaf_coeffs
from titans_jax.memory.gates import prepare
from titans_jax.memory.networks import MemoryNet, associative_loss
from titans_jax.memory.state import MemoryState

MEAN_FIELDS = ("theta", "eta", "alpha", "loss_before", "loss_after")
NORM_FIELDS = ("w_norm", "s_norm")


class ScanStats(NamedTuple):
    """Statistics of one memory call (float scalars, or arrays with leading axes once stacked).

    Attributes:
      theta, eta, alpha: means of the learning-rate, momentum and forgetting gates over the call's tokens (and over
        the gate columns: per memory matrix with per-layer gates, per output channel with channel-wise forgetting).
      loss_before: the mean over tokens of ``sum((M_W(k_t) - v_t)^2)`` (paper Eq. 12, ``networks.associative_loss``
        of one token) at ``W_c``, the weights token t's chunk began with.
      loss_after: the same at the weights that chunk ended with (after its update).
      w_norm, s_norm: Frobenius norms of the final weights W and momentum S over all memory matrices.
      tokens: how many tokens the means cover (the weight of this call in :func:`pool`).
    """

    theta: jax.Array
    eta: jax.Array
    alpha: jax.Array
    loss_before: jax.Array
    loss_after: jax.Array
    w_norm: jax.Array
    s_norm: jax.Array
    tokens: jax.Array


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _masked_mean(gate, on_T, count) -> jax.Array:
    """Mean of a gate (a ``[T, G]`` array or a tuple of ``[T, O_l]`` arrays) over the tokens marked in ``on_T``."""
    leaves = jax.tree.leaves(gate)
    total = sum(jnp.sum(g * on_T[:, None]) for g in leaves)
    return total / (count * sum(g.shape[1] for g in leaves))


def _token_losses(net: MemoryNet, weights, k_BxD, v_BxD) -> jax.Array:
    """``[b]``: each token's associative loss (paper Eq. 12) at ``weights``."""
    return jax.vmap(lambda k, v: associative_loss(net, weights, k[None], v[None]))(k_BxD, v_BxD)


def memory_scan_stats(
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
    length: int | jax.Array | None = None,
) -> tuple[jax.Array, MemoryState, ScanStats]:
    """``memory_scan`` (same arguments, same outputs and final state) together with its :class:`ScanStats`.

    Args:
      net, params, q, k, v, lr, momentum, decay, chunk_size, state, chunk_constant_gates: as in ``memory_scan``.
      length: only the first ``length`` tokens count (an int, or a traced int scalar; default all T): the later ones
        leave the state untouched (gates theta = 0, eta = 1, alpha = 0 and no momentum added, as the empty slots of
        ``resume.py``) and stay out of every mean. MAC's last segment is padded past the sequence's end this way.

    Returns:
      ``(y_TxD, final MemoryState, ScanStats)``; y in q's dtype, the state and the statistics in the compute dtype.
    """
    out_dtype = q.dtype
    q, k, v, (lr_g, mom_g, dec_g), state = prepare(
        net, params, q, k, v, lr, momentum, decay, chunk_size, state, chunk_constant_gates
    )
    t_len = q.shape[0]
    on_T = jnp.arange(t_len) < (t_len if length is None else length)
    count = jnp.sum(on_T).astype(q.dtype)
    denom = jnp.maximum(count, 1.0)
    means = {name: _masked_mean(g, on_T.astype(q.dtype), denom)
             for name, g in (("theta", lr_g), ("eta", mom_g), ("alpha", dec_g))}
    lr_g = jnp.where(on_T[:, None], lr_g, 0.0)
    mom_g = jnp.where(on_T[:, None], mom_g, 1.0)
    dec_g = jax.tree.map(lambda d: jnp.where(on_T[:, None], d, 0.0), dec_g)

    def chunk(carry, xs):
        q_B, k_B, v_B, (lr_B, mom_B, dec_B), on_B = xs
        new, y_B = dual_chunk(net, carry, (q_B, k_B, v_B, leaf_coeffs(net, lr_B, mom_B, dec_B, on_B)))
        w_on = on_B.astype(q_B.dtype)
        before = jnp.sum(_token_losses(net, carry[0], k_B, v_B) * w_on)
        after = jnp.sum(_token_losses(net, new[0], k_B, v_B) * w_on)
        return new, (y_B, before, after)

    n_full, rest = divmod(t_len, chunk_size)
    xs = (q, k, v, (lr_g, mom_g, dec_g), on_T)
    carry = (state.weights, state.momentum)
    ys, before, after = [], 0.0, 0.0
    if n_full:
        full = jax.tree.map(lambda x: x[: n_full * chunk_size].reshape(n_full, chunk_size, *x.shape[1:]), xs)
        carry, (y, b_N, a_N) = jax.lax.scan(chunk, carry, full)
        ys.append(y.reshape(n_full * chunk_size, -1))
        before, after = jnp.sum(b_N), jnp.sum(a_N)
    if rest:
        carry, (y, b_1, a_1) = chunk(carry, jax.tree.map(lambda x: x[n_full * chunk_size :], xs))
        ys.append(y)
        before, after = before + b_1, after + a_1
    y = jnp.concatenate(ys) if len(ys) > 1 else ys[0]
    stats = ScanStats(**means, loss_before=before / denom, loss_after=after / denom, w_norm=_global_norm(carry[0]),
                      s_norm=_global_norm(carry[1]), tokens=count)
    return y.astype(out_dtype), MemoryState(*carry), stats


def pool(stats: ScanStats, axes: int | tuple[int, ...] = 0, *, norms: str = "mean") -> ScanStats:
    """The statistics of the calls stacked on ``axes`` as one: means weighted by each call's tokens, tokens summed.

    ``norms``: "mean" averages the state norms (slices side by side: batch rows, heads); "last" keeps those of the last
    entry along ``axes`` (one sequence cut into consecutive calls, such as MAC's segments: its final state is the last
    call's). Calls without tokens weigh nothing.
    """
    if norms not in ("mean", "last"):
        raise ValueError(f"norms must be 'mean' or 'last', got {norms!r}")
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    w = stats.tokens
    total = jnp.sum(w, axis=axes)
    out = {f: jnp.sum(getattr(stats, f) * w, axis=axes) / jnp.maximum(total, 1.0) for f in MEAN_FIELDS}
    for f in NORM_FIELDS:
        x = getattr(stats, f)
        if norms == "mean":
            out[f] = jnp.mean(x, axis=axes)
        else:
            for a in sorted(axes, reverse=True):
                x = jnp.take(x, -1, axis=a)
            out[f] = x
    return ScanStats(**out, tokens=total)
