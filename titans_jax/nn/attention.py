"""Multi-head attention with RoPE and an always-visible persistent prefix (paper Sec. 4, Figure 3), in three layouts:

* ``full``: causal attention over ``[P || x]`` (Transformer++).
* ``window``: sliding-window causal attention over ``[P || x]``, the prefix always visible (MAG, MAL, SWA).
  Both past 512 tokens run in blocks of 512 queries, each against the keys its queries can see (from ``window - 1``
  before the block to its end) and rematerialised in the backward pass: no [T, T] scores are held, and the masked
  upper triangle (and, with a window, the keys before it) is not computed. Sliding window is linear in T.
* ``segment``: MAC's attention for one segment over ``[P || h || x]`` (paper Eq. 22-23), where ``h`` holds the
  segment's N_l memory tokens; token i sees P, the segment tokens j <= i and the memory tokens whose position is <= i
  (``h_j`` is retrieved with the queries of a group of tokens and sits at the position of the group's last token, so
  a plain prefix of all h would leak the future; docs/architecture.md, "Architectures").

Every key has a position; a query at position p sees a key at position p' exactly when ``p' <= p`` (and, with a
window, ``p - p' < window``). The persistent tokens sit at 0..Np-1 and are always visible; token t sits at Np + t (MAC:
t counted within the segment). Streaming uses the same rule: the keys and values of past tokens are kept in ``KVCache``
slots with their positions; ``Attention.cached_token`` attends one token to them, ``Attention.extend`` n tokens at once
(the blocked form, each block also reading the cache). Every layout calls
``jax.nn.dot_product_attention`` (XLA on CPU; cuDNN / TPU paths exist).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from titans_jax.nn.layers import QKV_AXES, Dense, named, rope
from titans_jax.sharding import with_logical_constraint

Q_BLOCK = 512  # queries per block of full and sliding-window attention (512 measured faster than 256 and 1024 on CPU)


def attend(q, k, v, mask):
    """``q [B, Tq, H, d]``, ``k, v [B, S, H, d]``, boolean ``mask`` broadcastable to ``[B, H, Tq, S]``."""
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return out.astype(q.dtype)


def visible(q_pos, k_pos, window: int | None):
    """Whether a query at ``q_pos`` sees a key at ``k_pos`` (broadcast): causal, optionally within ``window``."""
    ok = k_pos <= q_pos
    if window is not None:
        ok = ok & (q_pos - k_pos < window)
    return ok


class KVCache(NamedTuple):
    """Keys and values of past tokens in ``L`` slots, for streaming attention.

    Attributes:
      k: ``[B, L, H, d]`` keys, RoPE already applied at their positions.
      v: ``[B, L, H, d]`` values.
      slot_pos: ``[L]`` int32, the position of the token in each slot; -1 = empty (never visible).
      pos: ``[]`` int32, the position after the last written token (the next token's position for a plain cache).
    """

    k: jax.Array
    v: jax.Array
    slot_pos: jax.Array
    pos: jax.Array

    def write(self, k_Bx1xHxd, v_Bx1xHxd, pos, slot=None) -> KVCache:
        """Store one token's key and value at ``slot`` (default ``pos % L``: the cache is a ring of its last L tokens,
        so a sliding window of L keys needs no more) and record its position."""
        slot = pos % self.k.shape[1] if slot is None else slot
        k = jax.lax.dynamic_update_slice_in_dim(self.k, k_Bx1xHxd.astype(self.k.dtype), slot, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(self.v, v_Bx1xHxd.astype(self.v.dtype), slot, axis=1)
        return KVCache(k, v, self.slot_pos.at[slot].set(pos), jnp.asarray(pos + 1, jnp.int32))

    def write_many(self, k_BxnxHxd, v_BxnxHxd, pos) -> KVCache:
        """Store n consecutive tokens at positions ``pos .. pos + n - 1`` (slots ``position % L``); of more than L only
        the last L fit. A cache of ``max_seq_len`` slots must not be written past it (it would wrap)."""
        n, length = k_BxnxHxd.shape[1], self.k.shape[1]
        m = min(n, length)
        p = pos + jnp.arange(n - m, n, dtype=jnp.int32)
        slots = p % length
        k = self.k.at[:, slots].set(k_BxnxHxd[:, n - m:].astype(self.k.dtype))
        v = self.v.at[:, slots].set(v_BxnxHxd[:, n - m:].astype(self.v.dtype))
        return KVCache(k, v, self.slot_pos.at[slots].set(p), jnp.asarray(pos + n, jnp.int32))


class Attention(nnx.Module):
    """Multi-head attention (RoPE theta ``rope_theta``) with q/k/v/o projections; see the module docstring."""

    def __init__(self, dim: int, heads: int, rngs: nnx.Rngs, *, rope_theta: float = 10000.0, dtype="float32"):
        self.heads, self.head_dim, self.rope_theta = heads, dim // heads, rope_theta
        self.dtype = jnp.dtype(dtype)
        self.q_proj = Dense(dim, dim, ("embed", "heads"), rngs)
        self.k_proj = Dense(dim, dim, ("embed", "heads"), rngs)
        self.v_proj = Dense(dim, dim, ("embed", "heads"), rngs)
        self.o_proj = Dense(dim, dim, ("heads", "embed"), rngs)

    def _split(self, x):
        return x.reshape(*x.shape[:2], self.heads, self.head_dim)

    def qkv(self, x_BxTxD, pos_BxT, *, mesh=None):
        """Queries, keys (RoPE at ``pos``) and values ``[B, T, H, d]``; with ``mesh``, constrained to ``QKV_AXES``."""
        x = x_BxTxD.astype(self.dtype)
        q = rope(self._split(self.q_proj(x)), pos_BxT, self.rope_theta)
        k, v = self.kv(x, pos_BxT)
        return tuple(with_logical_constraint(a, QKV_AXES, mesh) for a in (q, k, v))

    def kv(self, x_BxTxD, pos_BxT, *, mesh=None):
        """Keys (RoPE at ``pos``) and values of tokens that are not queries (the prefix, MAC's memory tokens)."""
        x = x_BxTxD.astype(self.dtype)
        k = rope(self._split(self.k_proj(x)), pos_BxT, self.rope_theta)
        return tuple(with_logical_constraint(a, QKV_AXES, mesh) for a in (k, self._split(self.v_proj(x))))

    def prefix_kv(self, prefix_PxD, batch, *, mesh=None):
        """Keys and values of the persistent tokens at positions 0..Np-1 (``[B, Np, H, d]``; Np may be 0)."""
        n_p = prefix_PxD.shape[0]
        p = jnp.broadcast_to(prefix_PxD[None], (batch, *prefix_PxD.shape))
        return self.kv(p, jnp.broadcast_to(jnp.arange(n_p)[None], (batch, n_p)), mesh=mesh)

    def out(self, o_BxTxHxd):
        return self.o_proj(o_BxTxHxd.reshape(*o_BxTxHxd.shape[:2], -1))

    # ------------------------------------------------------------------------------------------------------- parallel
    @named("attention")
    def _causal(self, x_BxTxD, prefix_PxD, window: int | None, q_block: int | None, mesh, past: KVCache | None = None):
        """Causal attention over ``[P || past || x]``, optionally limited to the last ``window`` tokens, in query blocks.

        Each block of ``q_block`` queries attends to the prefix and to the keys from ``window - 1`` before its start (the
        sequence start without a window) to its own end; it is rematerialised in the backward pass. So the [T, T]
        scores are never held at once (T = 16384 needs 4 GiB per head group otherwise), and keys that no query of a
        block can see are not computed. ``q_block=None``: one block (the plain form the blocked one is tested against).

        ``past``: a cache of earlier tokens (positions before ``past.pos``, where x begins); every block also attends to
        its visible slots. Returns the output and x's keys and values (to be cached).
        """
        b, t, _ = x_BxTxD.shape
        n_p = prefix_PxD.shape[0]
        start = jnp.zeros((), jnp.int32) if past is None else past.pos
        q, k, v = self.qkv(x_BxTxD, jnp.broadcast_to(n_p + start + jnp.arange(t)[None], (b, t)), mesh=mesh)
        pk, pv = self.prefix_kv(prefix_PxD, b, mesh=mesh)
        if past is not None:  # the cache's slots sit between the prefix and x
            pk, pv = jnp.concatenate([pk, past.k.astype(pk.dtype)], 1), jnp.concatenate([pv, past.v.astype(pv.dtype)], 1)

        def block(q_blk, k_blk, v_blk, pk, pv, q_start, k_start):
            qpos = start + q_start + jnp.arange(q_blk.shape[1])[:, None]
            kpos = start + k_start + jnp.arange(k_blk.shape[1])[None, :]
            seen = [jnp.ones((q_blk.shape[1], n_p), bool)]
            if past is not None:
                seen.append((past.slot_pos >= 0)[None, :] & visible(qpos, past.slot_pos[None, :], window))
            mask = jnp.concatenate([*seen, visible(qpos, kpos, window)], axis=1)
            return attend(q_blk, jnp.concatenate([pk, k_blk], 1), jnp.concatenate([pv, v_blk], 1), mask[None, None])

        if q_block is None or t <= q_block:
            return self.out(block(q, k, v, pk, pv, 0, 0)), k, v
        outs = []
        for s0 in range(0, t, q_block):
            end = min(s0 + q_block, t)
            lo = 0 if window is None else max(0, s0 - window + 1)
            outs.append(jax.checkpoint(block, static_argnums=(5, 6))(q[:, s0:end], k[:, lo:end], v[:, lo:end], pk,
                                                                     pv, s0, lo))
        return self.out(jnp.concatenate(outs, axis=1)), k, v

    def full(self, x_BxTxD, prefix_PxD, q_block: int | None = Q_BLOCK, *, mesh=None):
        """Causal attention over ``[P || x]`` (Transformer++); see ``_causal`` for the query blocks."""
        return self._causal(x_BxTxD, prefix_PxD, None, q_block, mesh)[0]

    def window(self, x_BxTxD, prefix_PxD, window: int, q_block: int | None = Q_BLOCK, *, mesh=None):
        """Sliding-window causal attention over ``[P || x]``: token t sees the prefix and tokens t - window + 1 .. t.
        Cost and memory are linear in T (``_causal``'s query blocks)."""
        return self._causal(x_BxTxD, prefix_PxD, window, q_block, mesh)[0]

    def extend(self, x_BxnxD, prefix_PxD, cache: KVCache, *, window: int | None, q_block: int | None = Q_BLOCK,
               mesh=None) -> tuple[jax.Array, KVCache]:
        """n tokens after those in ``cache`` (full causal, or with a ``window``), in parallel: the outputs of n
        ``cached_token`` calls and the cache after them. An empty cache (``pos == 0``, chosen at run time) takes the
        plain blocked form, so a prefill costs what the parallel forward does; otherwise every query block also attends
        to the cache's visible slots. (Under ``jax.vmap`` the run-time choice becomes a select that computes both.) A
        full cache (``max_seq_len`` slots) must not be written past its length: positions are traced here, so that is
        the caller's to check (``AttentionMixer`` refuses more tokens than slots in one call; ``generate`` checks the
        total)."""
        def fresh(cache):
            y, k, v = self._causal(x_BxnxD, prefix_PxD, window, q_block, mesh)
            return y, cache.write_many(k, v, cache.pos)

        def resumed(cache):
            y, k, v = self._causal(x_BxnxD, prefix_PxD, window, q_block, mesh, past=cache)
            return y, cache.write_many(k, v, cache.pos)

        return jax.lax.cond(cache.pos == 0, fresh, resumed, cache)

    @named("attention")
    def segment(self, x_BxCxD, h_BxNxD, h_pos_N, prefix_PxD, *, mesh=None):
        """MAC attention of one segment: queries from the segment, keys and values from ``[P || h || x]``.

        ``h_pos_N``: the within-segment position of every memory token (MAC: the last token of its group); token i sees
        ``h_j`` when ``h_pos_N[j] <= i``. With one memory token per segment token (``h_pos_N = arange(C)``) this is the
        causal mask of ``[h || x]`` side by side.
        """
        b, c, _ = x_BxCxD.shape
        n_p = prefix_PxD.shape[0]
        pos = jnp.arange(c)
        q, k, v = self.qkv(x_BxCxD, jnp.broadcast_to(n_p + pos[None], (b, c)), mesh=mesh)
        hk, hv = self.kv(h_BxNxD, jnp.broadcast_to(n_p + h_pos_N[None], (b, h_pos_N.shape[0])), mesh=mesh)
        pk, pv = self.prefix_kv(prefix_PxD, b, mesh=mesh)
        qpos = pos[:, None]
        mask = jnp.concatenate([jnp.ones((c, n_p), bool), visible(qpos, h_pos_N[None, :], None),
                                visible(qpos, pos[None, :], None)], axis=1)
        o = attend(q, jnp.concatenate([pk, hk, k], 1), jnp.concatenate([pv, hv, v], 1), mask[None, None])
        return self.out(o)

    # ------------------------------------------------------------------------------------------------------ streaming
    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty cache of ``length`` slots."""
        z = jnp.zeros((batch, length, self.heads, self.head_dim), self.dtype)
        return KVCache(z, z, jnp.full((length,), -1, jnp.int32), jnp.zeros((), jnp.int32))

    @named("attention")
    def cached_token(self, x_Bx1xD, prefix_PxD, cache: KVCache, *, window: int | None, pos=None,
                     context: Sequence[KVCache] = ()) -> tuple[jax.Array, KVCache]:
        """One token against the prefix, the ``context`` caches and ``cache``; the token is written into ``cache`` first
        (it sees itself). The streaming form of every layout above; every variant's step calls it.

        Args:
          x_Bx1xD: the token (normalised block input).
          prefix_PxD: the persistent tokens (always visible; Np may be 0).
          cache: this attention's own keys and values; the token is written at ``pos % L``.
          window: a query at p sees keys at p' with ``p - window < p' <= p``; None: every written key up to p.
          pos: the token's position after the prefix (default ``cache.pos``: tokens are counted by the cache; MAC
            passes the position within the segment).
          context: read-only caches attended before ``cache`` with the same rule (MAC's memory tokens).
        """
        b = x_Bx1xD.shape[0]
        n_p = prefix_PxD.shape[0]
        pos = cache.pos if pos is None else pos
        q, k, v = self.qkv(x_Bx1xD, jnp.broadcast_to(n_p + pos, (b, 1)))
        cache = cache.write(k, v, pos)
        caches = (*context, cache)
        pk, pv = self.prefix_kv(prefix_PxD, b)
        seen = [(c.slot_pos >= 0) & visible(pos, c.slot_pos, window) for c in caches]
        mask = jnp.concatenate([jnp.ones((n_p,), bool), *seen])[None, None, None, :]
        o = attend(q, jnp.concatenate([pk, *(c.k for c in caches)], 1), jnp.concatenate([pv, *(c.v for c in caches)], 1),
                   mask)
        return self.out(o), cache
