"""Multi-head attention with RoPE and an always-visible persistent prefix, in three layouts (SPEC 5.6, 8.5):

* ``full``: causal attention over ``[P || x]`` (Transformer++).
* ``window``: sliding-window causal attention over ``[P || x]``, the prefix always visible (MAG, MAL, SWA).
  Both past 512 tokens run in blocks of 512 queries, each against the keys its queries can see (from ``window - 1``
  before the block to its end) and rematerialised in the backward pass: no [T, T] scores are held, and the masked
  upper triangle (and, with a window, the keys before it) is not computed. Sliding window is linear in T.
* ``segment``: MAC's attention for one segment over ``[P || h || x]`` where token i sees P, ``h_j`` and ``x_j`` for
  j <= i only (``h_j`` carries information about token j, so a plain prefix of all h would leak the future).

Positions: the persistent tokens sit at 0..Np-1 and token t at Np + t (MAC: t counted within the segment, and ``h_j``
shares token j's position). Every layout calls ``jax.nn.dot_product_attention`` (XLA on CPU; cuDNN / TPU paths exist).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from titans_jax.nn.layers import Dense, rope

Q_BLOCK = 512  # queries per block of full and sliding-window attention (512 measured faster than 256 and 1024 on CPU)


def attend(q, k, v, mask):
    """``q [B, Tq, H, d]``, ``k, v [B, S, H, d]``, boolean ``mask`` broadcastable to ``[B, H, Tq, S]``."""
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return out.astype(q.dtype)


class KVCache(NamedTuple):
    """Keys (after RoPE) and values of past tokens, their positions (-1 = empty) and the next position."""

    k: jax.Array  # [B, L, H, d]
    v: jax.Array
    slot_pos: jax.Array  # [L] int32
    pos: jax.Array  # [] int32


class Attention(nnx.Module):
    def __init__(self, dim: int, heads: int, rngs: nnx.Rngs, *, rope_theta: float = 10000.0, dtype="float32"):
        self.heads, self.head_dim, self.rope_theta = heads, dim // heads, rope_theta
        self.dtype = jnp.dtype(dtype)
        self.q_proj = Dense(dim, dim, ("embed", "heads"), rngs)
        self.k_proj = Dense(dim, dim, ("embed", "heads"), rngs)
        self.v_proj = Dense(dim, dim, ("embed", "heads"), rngs)
        self.o_proj = Dense(dim, dim, ("heads", "embed"), rngs)

    def _split(self, x):
        return x.reshape(*x.shape[:2], self.heads, self.head_dim)

    def qkv(self, x_BxTxD, pos_BxT):
        x = x_BxTxD.astype(self.dtype)
        q = rope(self._split(self.q_proj(x)), pos_BxT, self.rope_theta)
        k = rope(self._split(self.k_proj(x)), pos_BxT, self.rope_theta)
        return q, k, self._split(self.v_proj(x))

    def kv(self, x_BxTxD, pos_BxT):
        x = x_BxTxD.astype(self.dtype)
        return rope(self._split(self.k_proj(x)), pos_BxT, self.rope_theta), self._split(self.v_proj(x))

    def prefix_kv(self, prefix_PxD, batch):
        """Keys and values of the persistent tokens at positions 0..Np-1."""
        n_p = prefix_PxD.shape[0]
        p = jnp.broadcast_to(prefix_PxD[None], (batch, *prefix_PxD.shape))
        return self.kv(p, jnp.broadcast_to(jnp.arange(n_p)[None], (batch, n_p)))

    def out(self, o_BxTxHxd):
        return self.o_proj(o_BxTxHxd.reshape(*o_BxTxHxd.shape[:2], -1))

    # ------------------------------------------------------------------------------------------------------- parallel
    def _causal(self, x_BxTxD, prefix_PxD, window: int | None, q_block: int | None):
        """Causal attention over ``[P || x]``, optionally limited to the last ``window`` tokens, in query blocks.

        Each block of ``q_block`` queries attends to the prefix and to the keys from ``window - 1`` before its start (the
        sequence start without a window) to its own end; it is rematerialised in the backward pass. So the [T, T]
        scores are never held at once (T = 16384 needs 4 GiB per head group otherwise), and keys that no query of a
        block can see are not computed. ``q_block=None``: one block (the plain form the blocked one is tested against).
        """
        b, t, _ = x_BxTxD.shape
        n_p = prefix_PxD.shape[0]
        q, k, v = self.qkv(x_BxTxD, jnp.broadcast_to(n_p + jnp.arange(t)[None], (b, t)))
        pk, pv = self.prefix_kv(prefix_PxD, b)

        def block(q_blk, k_blk, v_blk, pk, pv, q_start, k_start):
            qpos = q_start + jnp.arange(q_blk.shape[1])[:, None]
            kpos = k_start + jnp.arange(k_blk.shape[1])[None, :]
            visible = kpos <= qpos
            if window is not None:
                visible = visible & (qpos - kpos < window)
            mask = jnp.concatenate([jnp.ones((q_blk.shape[1], n_p), bool), visible], axis=1)
            return attend(q_blk, jnp.concatenate([pk, k_blk], 1), jnp.concatenate([pv, v_blk], 1), mask[None, None])

        if q_block is None or t <= q_block:
            return self.out(block(q, k, v, pk, pv, 0, 0))
        outs = []
        for start in range(0, t, q_block):
            end = min(start + q_block, t)
            lo = 0 if window is None else max(0, start - window + 1)
            outs.append(jax.checkpoint(block, static_argnums=(5, 6))(q[:, start:end], k[:, lo:end], v[:, lo:end], pk,
                                                                     pv, start, lo))
        return self.out(jnp.concatenate(outs, axis=1))

    def full(self, x_BxTxD, prefix_PxD, q_block: int | None = Q_BLOCK):
        """Causal attention over ``[P || x]`` (Transformer++); see ``_causal`` for the query blocks."""
        return self._causal(x_BxTxD, prefix_PxD, None, q_block)

    def window(self, x_BxTxD, prefix_PxD, window: int, q_block: int | None = Q_BLOCK):
        """Sliding-window causal attention over ``[P || x]``: token t sees the prefix and tokens t - window + 1 .. t.
        Cost and memory are linear in T (``_causal``'s query blocks)."""
        return self._causal(x_BxTxD, prefix_PxD, window, q_block)

    def segment(self, x_BxCxD, h_BxCxD, prefix_PxD):
        """MAC attention of one segment: queries from the segment, keys and values from ``[P || h || x]``."""
        b, c, _ = x_BxCxD.shape
        n_p = prefix_PxD.shape[0]
        pos = jnp.broadcast_to(n_p + jnp.arange(c)[None], (b, c))
        q, k, v = self.qkv(x_BxCxD, pos)
        hk, hv = self.kv(h_BxCxD, pos)
        pk, pv = self.prefix_kv(prefix_PxD, b)
        causal = np.tril(np.ones((c, c), bool))
        mask = np.concatenate([np.ones((c, n_p), bool), causal, causal], axis=1)
        o = attend(q, jnp.concatenate([pk, hk, k], 1), jnp.concatenate([pv, hv, v], 1), mask[None, None])
        return self.out(o)

    # ------------------------------------------------------------------------------------------------------ streaming
    def init_cache(self, batch: int, length: int) -> KVCache:
        z = jnp.zeros((batch, length, self.heads, self.head_dim), self.dtype)
        return KVCache(z, z, jnp.full((length,), -1, jnp.int32), jnp.zeros((), jnp.int32))

    def cached_token(self, x_Bx1xD, prefix_PxD, cache: KVCache, *, window: int | None, ring: bool):
        """One token against the prefix and the cache; writes the token into the cache first (it sees itself).

        ``ring``: the cache holds the last ``len`` tokens at slot ``pos % len`` (sliding window); otherwise slot ``pos``.
        """
        b = x_Bx1xD.shape[0]
        n_p = prefix_PxD.shape[0]
        length = cache.k.shape[1]
        q, k, v = self.qkv(x_Bx1xD, jnp.broadcast_to(n_p + cache.pos, (b, 1)))
        slot = cache.pos % length if ring else cache.pos
        ck = jax.lax.dynamic_update_slice_in_dim(cache.k, k, slot, axis=1)
        cv = jax.lax.dynamic_update_slice_in_dim(cache.v, v, slot, axis=1)
        slot_pos = cache.slot_pos.at[slot].set(cache.pos)
        valid = (slot_pos >= 0) & (slot_pos <= cache.pos)
        if window is not None:
            valid = valid & (cache.pos - slot_pos < window)
        pk, pv = self.prefix_kv(prefix_PxD, b)
        mask = jnp.concatenate([jnp.ones((n_p,), bool), valid])[None, None, None, :]
        o = attend(q, jnp.concatenate([pk, ck], 1), jnp.concatenate([pv, cv], 1), mask)
        return self.out(o), KVCache(ck, cv, slot_pos, cache.pos + 1)
