"""One layer of each architecture (SPEC 5, 8.5), Llama style: pre-RMSNorm token mixer + residual, pre-RMSNorm SwiGLU +
residual. Every block has a parallel ``__call__`` and a streaming ``step`` over one token with explicit state.

Persistent memory: the memory variants (lmm, mac, mag, mal) own ``num_persistent`` learned vectors per layer. The memory
reads them first (they are the first tokens of its sequence, so they are written into it); attention sees them as an
always-visible prefix (MAC: in every segment). Their positions never reach the block's output. The baselines
(transformer, swa) have none.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from titans_jax.configs import ModelConfig
from titans_jax.nn.attention import Attention, attend
from titans_jax.nn.layers import Dense, RMSNorm, SwiGLU, along_last, l2_normalize, param
from titans_jax.nn.memory_layer import NeuralMemory


def _rms(x, scale):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
    return y * along_last(scale, y.ndim)


def make_memory(cfg: ModelConfig, rngs, **kw) -> NeuralMemory:
    return NeuralMemory(cfg.dim, heads=cfg.num_heads, chunk_size=cfg.chunk_size, depth=cfg.memory_depth,
                        expansion=cfg.memory_expansion, rngs=rngs, conv_kernel=cfg.conv_kernel, theta_max=cfg.theta_max,
                        momentum=cfg.memory_momentum, decay=cfg.memory_decay, gate_granularity=cfg.gate_granularity,
                        chunk_constant_gates=cfg.chunk_constant_gates, remat_every=cfg.memory_remat_every,
                        dtype=cfg.dtype, **kw)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        v = cfg.variant
        self.n_p = cfg.num_persistent if cfg.has_memory else 0
        self.mixer_norm = RMSNorm(cfg.dim)
        self.mlp_norm = RMSNorm(cfg.dim)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_hidden, rngs)
        self.persistent = (param(rngs, (self.n_p, cfg.dim), ("persist", "embed"), scale=0.02) if self.n_p else None)
        self.attn = (Attention(cfg.dim, cfg.num_heads, rngs, rope_theta=cfg.rope_theta, dtype=cfg.dtype)
                     if v != "lmm" else None)
        self.memory = make_memory(cfg, rngs, with_output=(v != "mac")) if cfg.has_memory else None
        if v == "mag":
            self.attn_out_norm = param(None, (cfg.dim,), ("norm",), init="ones")
            self.memory_out_norm = param(None, (cfg.dim,), ("norm",), init="ones")
        if v == "mal":
            self.attn_norm = RMSNorm(cfg.dim)
        if v == "mac":
            self.retrieve_proj = Dense(cfg.dim, cfg.dim, ("embed", "heads"), rngs)
            self.memory_out_norm = param(None, (cfg.dim,), ("norm",), init="ones")

    # -------------------------------------------------------------------------------------------------------- helpers
    def _prefix(self):
        if self.persistent is None:
            return jnp.zeros((0, self.cfg.dim), jnp.float32)
        return self.persistent[...]

    def _with_prefix(self, xn):
        if not self.n_p:
            return xn
        p = jnp.broadcast_to(self._prefix()[None].astype(xn.dtype), (xn.shape[0], self.n_p, xn.shape[2]))
        return jnp.concatenate([p, xn], axis=1)

    def _mlp(self, x):
        return x + self.mlp(self.mlp_norm(x)).astype(x.dtype)

    def _mag_gate(self, y, m):
        return _rms(y, self.attn_out_norm[...]) * jax.nn.sigmoid(_rms(m, self.memory_out_norm[...]))

    def _retrieval_queries(self, x_BxTxD):
        q = jax.nn.silu(self.retrieve_proj(x_BxTxD.astype(jnp.dtype(self.cfg.dtype))))
        return l2_normalize(q.reshape(*q.shape[:2], self.cfg.num_heads, self.cfg.head_dim))

    def _mac_gate(self, y, m_BxTxHxd):
        m = m_BxTxHxd.reshape(*m_BxTxHxd.shape[:2], -1)
        return y * jax.nn.sigmoid(_rms(m, self.memory_out_norm[...])).astype(y.dtype)

    # ------------------------------------------------------------------------------------------------------- parallel
    def __call__(self, x_BxTxD):
        v, cfg = self.cfg.variant, self.cfg
        xn = self.mixer_norm(x_BxTxD)
        if v == "transformer":
            h = self.attn.full(xn, self._prefix())
        elif v == "swa":
            h = self.attn.window(xn, self._prefix(), cfg.window)
        elif v == "lmm":
            h = self.memory(self._with_prefix(xn))[:, self.n_p:]
        elif v == "mag":
            y = self.attn.window(xn, self._prefix(), cfg.window)
            m = self.memory(self._with_prefix(xn))[:, self.n_p:]
            h = self._mag_gate(y, m)
        elif v == "mal":
            x_BxTxD = x_BxTxD + self.memory(self._with_prefix(xn))[:, self.n_p:].astype(x_BxTxD.dtype)
            h = self.attn.window(self.attn_norm(x_BxTxD), self._prefix(), cfg.window)
        else:
            h = self._mac(xn)
        return self._mlp(x_BxTxD + h.astype(x_BxTxD.dtype))

    def _mac(self, xn_BxTxD):
        """Segments of C tokens in a scan: retrieve with the memory from before the segment, attend over
        [P || h || segment] causally, write the attention outputs into the memory chunk by chunk, gate with the reads."""
        cfg, mem = self.cfg, self.memory
        b, t, d = xn_BxTxD.shape
        c = cfg.segment_len
        nseg = -(-t // c)
        # Padding at the end only ever feeds later (padded) positions: causal attention and a causal memory.
        xs = jnp.pad(xn_BxTxD, ((0, 0), (0, nseg * c - t), (0, 0))).reshape(b, nseg, c, d).swapaxes(0, 1)
        w0 = mem.initial_weights()
        state0 = tuple(jnp.broadcast_to(w, (b, *w.shape)) for w in w0)
        tails0 = mem.init_stream(b).tails

        def segment(carry, x_seg):
            (weights, momentum), tails = carry
            h = mem.read(weights, self._retrieval_queries(x_seg)).reshape(b, c, d)
            y = self.attn.segment(x_seg, h, self._prefix())
            proj, tails = mem.project(y, tails)
            m, st = mem.run_memory(proj, (weights, momentum))
            return ((st.weights, st.momentum), tails), self._mac_gate(y, m)

        init = ((state0, tuple(jnp.zeros_like(w) for w in state0)), tails0)
        if not cfg.remat:
            # Rematerialise each segment in the backward pass: the scan then keeps only its carries, not the memory's
            # per-chunk residuals stacked once more over segments (and again over layers). Train step at T = 4096:
            # 1.14x (1 CPU device) and 1.30x (2) faster, 6x less peak memory (docs/benchmarks.md, 2026-11-29). Under
            # block remat the block is recomputed already.
            segment = jax.checkpoint(segment)
        _, out = jax.lax.scan(segment, init, xs)
        return out.swapaxes(0, 1).reshape(b, nseg * c, d)[:, :t]

    # ------------------------------------------------------------------------------------------------------ streaming
    def init_state(self, batch: int) -> dict:
        """Per-layer streaming state at the start of a sequence (the memory has already read the persistent tokens)."""
        cfg, v = self.cfg, self.cfg.variant
        st = {}
        if self.memory is not None and v != "mac":
            if self.n_p:
                p = self._prefix()[None].astype(jnp.dtype(cfg.dtype))
                _, ms = self.memory.prefill_stream(p)
                st["memory"] = jax.tree.map(lambda a: jnp.broadcast_to(a, (batch, *a.shape[1:])) if a.ndim else a, ms)
            else:
                st["memory"] = self.memory.init_stream(batch)
        if v == "mac":
            ms = self.memory.init_stream(batch)
            st["memory"] = ms
            st["segment_weights"] = ms.weights
            st["h_cache"] = self.attn.init_cache(batch, cfg.segment_len)
            st["x_cache"] = self.attn.init_cache(batch, cfg.segment_len)
        elif v == "transformer":
            st["cache"] = self.attn.init_cache(batch, cfg.max_seq_len)
        elif v in ("swa", "mag", "mal"):
            st["cache"] = self.attn.init_cache(batch, cfg.window)
        return st

    def step(self, x_Bx1xD, st: dict):
        """One token. Returns the block output and the new state."""
        v, cfg = self.cfg.variant, self.cfg
        st = dict(st)
        xn = self.mixer_norm(x_Bx1xD)
        window = cfg.window if v in ("swa", "mag", "mal") else None
        ring = window is not None
        if v in ("transformer", "swa"):
            h, st["cache"] = self.attn.cached_token(xn, self._prefix(), st["cache"], window=window, ring=ring)
        elif v == "lmm":
            h, st["memory"] = self.memory.step(xn, st["memory"])
        elif v == "mag":
            y, st["cache"] = self.attn.cached_token(xn, self._prefix(), st["cache"], window=window, ring=ring)
            m, st["memory"] = self.memory.step(xn, st["memory"])
            h = self._mag_gate(y, m)
        elif v == "mal":
            m, st["memory"] = self.memory.step(xn, st["memory"])
            x_Bx1xD = x_Bx1xD + m.astype(x_Bx1xD.dtype)
            h, st["cache"] = self.attn.cached_token(self.attn_norm(x_Bx1xD), self._prefix(), st["cache"],
                                                    window=window, ring=ring)
        else:
            h, st = self._mac_step(xn, st)
        return self._mlp(x_Bx1xD + h.astype(x_Bx1xD.dtype)), st

    def _mac_step(self, xn_Bx1xD, st):
        cfg, mem, attn = self.cfg, self.memory, self.attn
        b = xn_Bx1xD.shape[0]
        ms = st["memory"]
        p = ms.pos % cfg.segment_len
        seg_w = jax.tree.map(lambda new, old: jnp.where(p == 0, new, old), ms.weights, st["segment_weights"])
        h = mem.read(seg_w, self._retrieval_queries(xn_Bx1xD)).reshape(b, 1, cfg.dim)
        pos = jnp.broadcast_to(self.n_p + p, (b, 1))
        q, k, v = attn.qkv(xn_Bx1xD, pos)
        hk, hv = attn.kv(h, pos)
        write = lambda cache, a: jax.lax.dynamic_update_slice_in_dim(cache, a, p, axis=1)
        h_cache = st["h_cache"]._replace(k=write(st["h_cache"].k, hk), v=write(st["h_cache"].v, hv))
        x_cache = st["x_cache"]._replace(k=write(st["x_cache"].k, k), v=write(st["x_cache"].v, v))
        pk, pv = attn.prefix_kv(self._prefix(), b)
        seen = jnp.arange(cfg.segment_len) <= p
        mask = jnp.concatenate([jnp.ones((self.n_p,), bool), seen, seen])[None, None, None, :]
        o = attend(q, jnp.concatenate([pk, h_cache.k, x_cache.k], 1), jnp.concatenate([pv, h_cache.v, x_cache.v], 1),
                   mask)
        y = attn.out(o)
        mem._check_streamable()
        proj, tails = mem.project(y, ms.tails)
        m, ms = mem.stream_tokens(proj, ms._replace(tails=tails))
        st.update(memory=ms, segment_weights=seg_w, h_cache=h_cache, x_cache=x_cache)
        return self._mac_gate(y, m), st
