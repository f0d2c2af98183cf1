"""Token mixers: one class per architecture (paper Sec. 4), each with a typed streaming state.

Every mixer has the same three methods (``Mixer``):

* ``__call__(xn_BxTxD, x_BxTxD, *, state=None, mesh=None) -> y_BxTxD``: the parallel form over a whole sequence.
  ``xn`` is the block's pre-normed input, what the mixer reads; ``x`` is the block's residual stream, which only MAL
  reads (for its inner residual). The block adds ``y`` to ``x``. With a ``state`` the sequence continues from it (in
  parallel: ``NeuralMemory`` with a stream, ``Attention.extend``, MAC's ``_resume``) and ``(y, state)`` is returned.
* ``init_state(batch) -> State``: the streaming state at the start of a sequence (a ``NamedTuple`` per mixer).
* ``step(xn_Bx1xD, x_Bx1xD, state) -> (y_Bx1xD, state)``: one token; the outputs equal the parallel form's.

The mixer of a variant is chosen once, by ``make_mixer`` from the registry ``MIXERS``:

=============  ====================  ========================================================================
variant        mixer                 state
=============  ====================  ========================================================================
transformer    ``AttentionMixer``    ``AttentionState`` (KV cache of ``max_seq_len`` slots)
swa            ``AttentionMixer``    ``AttentionState`` (KV cache: a ring of ``window`` slots)
lmm            ``LMMMixer``          ``LMMState`` (memory stream)
mac            ``MACMixer``          ``MACState`` (memory stream, segment-start weights, group query sum, KV caches)
mag            ``MAGMixer``          ``MAGState`` (memory stream, KV cache)
mal            ``MALMixer``          ``MALState`` (memory stream, KV cache)
=============  ====================  ========================================================================

Persistent memory (paper Sec. 3.3, Eq. 19): the memory mixers own ``num_persistent`` learned vectors. The memory reads
them first (they are the first tokens of its sequence, so they are written into it; not in MAC); attention sees them as
an always-visible prefix (MAC: in every segment). Their positions never reach the output. The attention baselines have
none. Every single-token step goes through ``Attention.cached_token`` and ``NeuralMemory.stream_tokens``; the stateful
parallel form through ``Attention.extend`` and ``NeuralMemory.resume_memory`` (docs/architecture.md, "Stateful use and
streaming").
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from titans_jax.configs import ModelConfig
from titans_jax.memory.stats import ScanStats, pool
from titans_jax.nn.attention import Attention, KVCache, attend, visible
from titans_jax.nn.layers import Dense, RMSNorm, compute_dtype, l2_normalize, param, rms_norm
from titans_jax.nn.memory_layer import MemoryStream, NeuralMemory


class Mixer(Protocol):
    """What ``Block`` needs of a token mixer (see the module docstring)."""

    def __call__(self, xn_BxTxD: jax.Array, x_BxTxD: jax.Array, *, state: NamedTuple | None = None, mesh=None):
        ...

    def init_state(self, batch: int) -> NamedTuple: ...

    def step(self, xn_Bx1xD: jax.Array, x_Bx1xD: jax.Array, state: NamedTuple) -> tuple[jax.Array, NamedTuple]: ...


# ------------------------------------------------------------------------------------------------------------- states
class AttentionState(NamedTuple):
    """Streaming state of full or sliding-window attention.

    Attributes:
      cache: keys and values of the tokens so far (full: ``max_seq_len`` slots; sliding window: the last ``window``).
    """

    cache: KVCache


class LMMState(NamedTuple):
    """Streaming state of the memory-only mixer.

    Attributes:
      memory: the NeuralMemory's stream (already past the persistent tokens).
    """

    memory: MemoryStream


class MAGState(NamedTuple):
    """Streaming state of MAG, and of MAL (``MALState``: the same two parts).

    Attributes:
      memory: the NeuralMemory's stream (already past the persistent tokens).
      cache: the sliding-window attention's keys and values (a ring of ``window`` slots).
    """

    memory: MemoryStream
    cache: KVCache


MALState = MAGState  # a memory stream and a sliding-window cache, as MAG's


class MACState(NamedTuple):
    """Streaming state of MAC.

    Attributes:
      memory: the NeuralMemory's stream after every token so far; ``memory.pos`` counts the tokens, so the position
        within the segment is ``memory.pos % segment_len``.
      segment_weights: ``M*_{s-1}``, the fast weights when the current segment began (``[B, H, ...]`` per matrix):
        every retrieval of the segment reads them.
      query_sum: ``[B, H, dh]`` float32 (``compute_dtype``), the sum of the retrieval queries of the current group's
        tokens so far (the memory token of a group reads with their mean; unused with one memory token per segment
        token).
      h_cache: keys and values of the segment's memory tokens (``mac_memory_tokens`` slots; slot j at the position
        of its group's last token).
      x_cache: keys and values of the segment's tokens (``segment_len`` slots; slot i at position i).
    """

    memory: MemoryStream
    segment_weights: tuple
    query_sum: jax.Array
    h_cache: KVCache
    x_cache: KVCache


# ------------------------------------------------------------------------------------------------------------ helpers
def _persistent(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Param | None:
    """The ``[Np, D]`` persistent tokens of a memory mixer (None when Np = 0)."""
    return param(rngs, (cfg.num_persistent, cfg.dim), ("persist", "embed"), scale=0.02) if cfg.num_persistent else None


def _prefix(persistent: nnx.Param | None, dim: int) -> jax.Array:
    """The persistent tokens as an ``[Np, D]`` array (``[0, D]`` without any)."""
    return jnp.zeros((0, dim), jnp.float32) if persistent is None else persistent[...]


def _with_prefix(prefix_PxD, xn_BxTxD):
    """``[P || x]``: the persistent tokens before every sequence of the batch."""
    n_p = prefix_PxD.shape[0]
    if not n_p:
        return xn_BxTxD
    b, _, d = xn_BxTxD.shape
    p = jnp.broadcast_to(prefix_PxD[None].astype(xn_BxTxD.dtype), (b, n_p, d))
    return jnp.concatenate([p, xn_BxTxD], axis=1)


def _memory_stream_after_prefix(memory: NeuralMemory, prefix_PxD, batch: int, dtype) -> MemoryStream:
    """The memory's stream after it has read the persistent tokens (identical for every sequence of the batch)."""
    if not prefix_PxD.shape[0]:
        return memory.init_stream(batch)
    _, ms = memory(prefix_PxD[None].astype(dtype), return_state=True)
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (batch, *a.shape[1:])) if a.ndim else a, ms)


def _attention(cfg: ModelConfig, rngs: nnx.Rngs) -> Attention:
    return Attention(cfg.dim, cfg.num_heads, rngs, rope_theta=cfg.rope_theta, dtype=cfg.dtype)


# ------------------------------------------------------------------------------------------------------------- mixers
class AttentionMixer(nnx.Module):
    """transformer (full causal attention, ``sliding=False``) and swa (sliding window of ``cfg.window``)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, sliding: bool):
        self.dim = cfg.dim
        self.window = cfg.window if sliding else None
        self.cache_len = cfg.window if sliding else cfg.max_seq_len
        self.attn = _attention(cfg, rngs)

    def __call__(self, xn_BxTxD, x_BxTxD, *, state: AttentionState | None = None, mesh=None):
        del x_BxTxD
        prefix = _prefix(None, self.dim)
        if state is not None:
            if self.window is None and xn_BxTxD.shape[1] > self.cache_len:
                raise ValueError(f"{xn_BxTxD.shape[1]} tokens do not fit the transformer's KV cache of max_seq_len="
                                 f"{self.cache_len} slots; raise max_seq_len (a cache written past it wraps around)")
            y, cache = self.attn.extend(xn_BxTxD, prefix, state.cache, window=self.window, mesh=mesh)
            return y, AttentionState(cache)
        if self.window is None:
            return self.attn.full(xn_BxTxD, prefix, mesh=mesh)
        return self.attn.window(xn_BxTxD, prefix, self.window, mesh=mesh)

    def init_state(self, batch: int) -> AttentionState:
        return AttentionState(self.attn.init_cache(batch, self.cache_len))

    def step(self, xn_Bx1xD, x_Bx1xD, state: AttentionState):
        del x_Bx1xD
        y, cache = self.attn.cached_token(xn_Bx1xD, _prefix(None, self.dim), state.cache, window=self.window)
        return y, AttentionState(cache)


class LMMMixer(nnx.Module):
    """Titans (LMM): the NeuralMemory over ``[P || x]`` alone is the mixer (the paper's "Titans (LMM)" of Sec. 5)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dim, self.dtype = cfg.dim, jnp.dtype(cfg.dtype)
        self.persistent = _persistent(cfg, rngs)
        self.memory = NeuralMemory(cfg.dim, cfg.memory, rngs=rngs)

    def __call__(self, xn_BxTxD, x_BxTxD, *, state: LMMState | None = None, mesh=None):
        del x_BxTxD
        if state is not None:
            y, ms = self.memory(xn_BxTxD, state=state.memory, mesh=mesh)
            return y, LMMState(ms)
        prefix = _prefix(self.persistent, self.dim)
        return self.memory(_with_prefix(prefix, xn_BxTxD), mesh=mesh)[:, prefix.shape[0]:]

    def call_with_memory_stats(self, xn_BxTxD, x_BxTxD, *, mesh=None) -> tuple[jax.Array, ScanStats]:
        """The parallel form (``__call__`` without a state) and the memory's statistics on what it reads."""
        del x_BxTxD
        prefix = _prefix(self.persistent, self.dim)
        m, stats = self.memory.call_with_stats(_with_prefix(prefix, xn_BxTxD), mesh=mesh)
        return m[:, prefix.shape[0]:], stats

    def init_state(self, batch: int) -> LMMState:
        return LMMState(_memory_stream_after_prefix(self.memory, _prefix(self.persistent, self.dim), batch, self.dtype))

    def step(self, xn_Bx1xD, x_Bx1xD, state: LMMState):
        del x_Bx1xD
        y, ms = self.memory.step(xn_Bx1xD, state.memory)
        return y, LMMState(ms)


class MAGMixer(nnx.Module):
    """Memory as a Gate (paper Sec. 4.2, Eq. 26-28): ``RMSNorm_a(SWA([P || x])) * sigmoid(RMSNorm_b(LMM([P || x])))``,
    the sliding-window attention with the prefix always visible."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dim, self.dtype, self.window = cfg.dim, jnp.dtype(cfg.dtype), cfg.window
        self.persistent = _persistent(cfg, rngs)
        self.attn = _attention(cfg, rngs)
        self.memory = NeuralMemory(cfg.dim, cfg.memory, rngs=rngs)
        self.attn_out_norm = param(None, (cfg.dim,), ("norm",), init="ones")
        self.memory_out_norm = param(None, (cfg.dim,), ("norm",), init="ones")

    def _gate(self, y, m):
        return rms_norm(y, self.attn_out_norm[...]) * jax.nn.sigmoid(rms_norm(m, self.memory_out_norm[...]))

    def __call__(self, xn_BxTxD, x_BxTxD, *, state: MAGState | None = None, mesh=None):
        del x_BxTxD
        prefix = _prefix(self.persistent, self.dim)
        if state is not None:
            y, cache = self.attn.extend(xn_BxTxD, prefix, state.cache, window=self.window, mesh=mesh)
            m, ms = self.memory(xn_BxTxD, state=state.memory, mesh=mesh)
            return self._gate(y, m), MAGState(ms, cache)
        y = self.attn.window(xn_BxTxD, prefix, self.window, mesh=mesh)
        m = self.memory(_with_prefix(prefix, xn_BxTxD), mesh=mesh)[:, prefix.shape[0]:]
        return self._gate(y, m)

    def call_with_memory_stats(self, xn_BxTxD, x_BxTxD, *, mesh=None) -> tuple[jax.Array, ScanStats]:
        """The parallel form (``__call__`` without a state) and the memory's statistics on what it reads."""
        del x_BxTxD
        prefix = _prefix(self.persistent, self.dim)
        y = self.attn.window(xn_BxTxD, prefix, self.window, mesh=mesh)
        m, stats = self.memory.call_with_stats(_with_prefix(prefix, xn_BxTxD), mesh=mesh)
        return self._gate(y, m[:, prefix.shape[0]:]), stats

    def init_state(self, batch: int) -> MAGState:
        prefix = _prefix(self.persistent, self.dim)
        return MAGState(_memory_stream_after_prefix(self.memory, prefix, batch, self.dtype),
                        self.attn.init_cache(batch, self.window))

    def step(self, xn_Bx1xD, x_Bx1xD, state: MAGState):
        del x_Bx1xD
        prefix = _prefix(self.persistent, self.dim)
        y, cache = self.attn.cached_token(xn_Bx1xD, prefix, state.cache, window=self.window)
        m, ms = self.memory.step(xn_Bx1xD, state.memory)
        return self._gate(y, m), MAGState(ms, cache)


class MALMixer(nnx.Module):
    """Memory as a Layer (paper Sec. 4.3, Eq. 29-31): the memory, then sliding-window attention.

    ``x1 = x + LMM([P || xn])`` (the mixer's inner residual), then ``SWA(RMSNorm(x1))`` with P as prefix; the mixer
    returns ``LMM + SWA``, which the block adds to ``x``.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dim, self.dtype, self.window = cfg.dim, jnp.dtype(cfg.dtype), cfg.window
        self.persistent = _persistent(cfg, rngs)
        self.attn = _attention(cfg, rngs)
        self.memory = NeuralMemory(cfg.dim, cfg.memory, rngs=rngs)
        self.attn_norm = RMSNorm(cfg.dim)

    def __call__(self, xn_BxTxD, x_BxTxD, *, state: MALState | None = None, mesh=None):
        prefix = _prefix(self.persistent, self.dim)
        if state is not None:
            m, ms = self.memory(xn_BxTxD, state=state.memory, mesh=mesh)
            m = m.astype(x_BxTxD.dtype)
            y, cache = self.attn.extend(self.attn_norm(x_BxTxD + m), prefix, state.cache, window=self.window, mesh=mesh)
            return m + y.astype(m.dtype), MALState(ms, cache)
        m = self.memory(_with_prefix(prefix, xn_BxTxD), mesh=mesh)[:, prefix.shape[0]:].astype(x_BxTxD.dtype)
        y = self.attn.window(self.attn_norm(x_BxTxD + m), prefix, self.window, mesh=mesh)
        return m + y.astype(m.dtype)

    def call_with_memory_stats(self, xn_BxTxD, x_BxTxD, *, mesh=None) -> tuple[jax.Array, ScanStats]:
        """The parallel form (``__call__`` without a state) and the memory's statistics on what it reads."""
        prefix = _prefix(self.persistent, self.dim)
        m, stats = self.memory.call_with_stats(_with_prefix(prefix, xn_BxTxD), mesh=mesh)
        m = m[:, prefix.shape[0]:].astype(x_BxTxD.dtype)
        y = self.attn.window(self.attn_norm(x_BxTxD + m), prefix, self.window, mesh=mesh)
        return m + y.astype(m.dtype), stats

    def init_state(self, batch: int) -> MALState:
        prefix = _prefix(self.persistent, self.dim)
        return MALState(_memory_stream_after_prefix(self.memory, prefix, batch, self.dtype),
                        self.attn.init_cache(batch, self.window))

    def step(self, xn_Bx1xD, x_Bx1xD, state: MALState):
        m, ms = self.memory.step(xn_Bx1xD, state.memory)
        m = m.astype(x_Bx1xD.dtype)
        y, cache = self.attn.cached_token(self.attn_norm(x_Bx1xD + m), _prefix(self.persistent, self.dim), state.cache,
                                          window=self.window)
        return m + y.astype(m.dtype), MALState(ms, cache)


class MACMixer(nnx.Module):
    """Memory as a Context (paper Sec. 4.1, Eq. 21-25), segment by segment (C = ``segment_len``).

    Per segment s: the segment's C tokens form N_l = ``mac_memory_tokens`` groups of r = C / N_l consecutive tokens.
    Retrieval queries ``q_i = l2norm(SiLU(x_i W_R))`` (a projection of its own without conv: the memory's q-path runs
    over the attention outputs); memory token j reads ``h_j = M*_{s-1}(l2norm(mean of q over group j))`` with the
    memory from before the segment (r = 1: ``h_i = M*_{s-1}(q_i)``, no mean). Attention runs over ``[P || h || x]``:
    token i sees P, the segment tokens up to i and ``h_j`` once its whole group is at or before i
    (``i >= (j + 1) r - 1``); ``h_j`` sits at the RoPE position of its group's last token. The attention outputs y are
    written into the memory chunk by chunk, and the output is ``y * sigmoid(RMSNorm(M*_i(y_i)))`` with each token's
    post-write memory. The memory does not read the persistent tokens in MAC (they are in every segment's attention).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dim, self.heads, self.head_dim = cfg.dim, cfg.num_heads, cfg.head_dim
        self.dtype = jnp.dtype(cfg.dtype)
        self.segment_len = cfg.segment_len
        self.memory_tokens = cfg.memory_tokens_per_segment
        self.group = cfg.segment_len // self.memory_tokens  # r: segment tokens per memory token
        self.remat_segments = not cfg.remat  # under block remat the block is recomputed already
        self.persistent = _persistent(cfg, rngs)
        self.attn = _attention(cfg, rngs)
        self.memory = NeuralMemory(cfg.dim, cfg.memory, rngs=rngs, with_output=False)
        self.retrieve_proj = Dense(cfg.dim, cfg.dim, ("embed", "heads"), rngs)
        self.memory_out_norm = param(None, (cfg.dim,), ("norm",), init="ones")

    # ---------------------------------------------------------------------------------------------------------- pieces
    def _retrieval_queries(self, x_BxTxD):
        q = jax.nn.silu(self.retrieve_proj(x_BxTxD.astype(self.dtype)))
        return l2_normalize(q.reshape(*q.shape[:2], self.heads, self.head_dim))

    def _group_query(self, q_sum, like):
        """The query of a memory token: the l2-normalised mean of its group's retrieval queries (from their sum)."""
        return l2_normalize(q_sum / self.group).astype(like.dtype)

    def _memory_token_positions(self) -> np.ndarray:
        """Within-segment position of each memory token: the last token of its group."""
        return np.arange(1, self.memory_tokens + 1) * self.group - 1

    def _gate(self, y, m_BxTxHxd):
        m = m_BxTxHxd.reshape(*m_BxTxHxd.shape[:2], -1)
        return y * jax.nn.sigmoid(rms_norm(m, self.memory_out_norm[...])).astype(y.dtype)

    # -------------------------------------------------------------------------------------------------------- parallel
    def __call__(self, xn_BxTxD, x_BxTxD, *, state: MACState | None = None, mesh=None):
        del x_BxTxD
        if state is not None:
            return self._resume(xn_BxTxD, state, mesh)
        mem = self.memory

        def write(proj, weights_momentum, seg_idx):
            del seg_idx
            m, st = mem.run_memory(proj, weights_momentum, mesh=mesh)
            return m, st, None

        return self._segments(xn_BxTxD, write, mesh)[0]

    def call_with_memory_stats(self, xn_BxTxD, x_BxTxD, *, mesh=None) -> tuple[jax.Array, ScanStats]:
        """The parallel form (``__call__`` without a state) and the statistics of the memory on what it is written
        with (each segment's attention outputs, from the state the segment began with), pooled over the segments; the
        padding of a last, partial segment does not count."""
        del x_BxTxD
        mem, c, t = self.memory, self.segment_len, xn_BxTxD.shape[1]

        def write(proj, weights_momentum, seg_idx):
            return mem.run_memory_stats(proj, weights_momentum, length=jnp.clip(t - seg_idx * c, 0, c), mesh=mesh)

        y, stats = self._segments(xn_BxTxD, write, mesh)
        return y, pool(stats, 0, norms="last")

    def _segments(self, xn_BxTxD, write: Callable, mesh):
        """The parallel form, segment by segment; ``write(proj, (W, S), segment_index) -> (m, state, extra)`` runs the
        memory on a segment's projected attention outputs. Returns the output and the ``extra`` of every segment."""
        mem, c, n_l, r = self.memory, self.segment_len, self.memory_tokens, self.group
        b, t, d = xn_BxTxD.shape
        nseg = -(-t // c)
        # Padding at the end only ever feeds later (padded) positions: causal attention and a causal memory.
        xs = jnp.pad(xn_BxTxD, ((0, 0), (0, nseg * c - t), (0, 0))).reshape(b, nseg, c, d).swapaxes(0, 1)
        w0 = mem.initial_weights()
        state0 = tuple(jnp.broadcast_to(w, (b, *w.shape)) for w in w0)
        tails0 = mem.init_stream(b).tails
        h_pos = self._memory_token_positions()

        def segment(carry, xs_seg):
            (weights, momentum), tails = carry
            x_seg, seg_idx = xs_seg
            q = self._retrieval_queries(x_seg)
            if r > 1:
                q_sum = q.astype(compute_dtype(q.dtype)).reshape(b, n_l, r, self.heads, self.head_dim).sum(axis=2)
                q = self._group_query(q_sum, q)
            h = mem.read(weights, q).reshape(b, n_l, d)
            y = self.attn.segment(x_seg, h, h_pos, _prefix(self.persistent, self.dim), mesh=mesh)
            proj, tails = mem.project(y, tails, mesh=mesh)
            m, st, extra = write(proj, (weights, momentum), seg_idx)
            return ((st.weights, st.momentum), tails), (self._gate(y, m), extra)

        init = ((state0, tuple(jnp.zeros_like(w) for w in state0)), tails0)
        if self.remat_segments:
            # Rematerialise each segment in the backward pass: the scan then keeps only its carries, not the memory's
            # per-chunk residuals stacked once more over segments (and again over layers). Train step at T = 4096:
            # 1.14x (1 CPU device) and 1.30x (2) faster, 6x less peak memory (docs/benchmarks.md, 2026-11-29).
            segment = jax.checkpoint(segment)
        _, (out, extras) = jax.lax.scan(segment, init, (xs, jnp.arange(nseg)))
        return out.swapaxes(0, 1).reshape(b, nseg * c, d)[:, :t], extras

    # ------------------------------------------------------------------------------------------- parallel from a state
    def _resume(self, xn_BxnxD, state: MACState, mesh):
        """n tokens from a streaming state, segment by segment in parallel: the outputs and state of n ``step`` calls.

        The tokens are laid out in whole segments starting at the current segment's first position (its first
        ``pos % C`` slots already done, empty slots after the last token); every segment runs ``_resume_segment``,
        which leaves the state untouched for empty slots.
        """
        b, n, d = xn_BxnxD.shape
        c = self.segment_len
        p0 = state.memory.pos % c
        nseg = -(-(n + c - 1) // c)
        src = jnp.arange(nseg * c) - p0
        active = (src >= 0) & (src < n)
        xs = jnp.where(active[None, :, None], xn_BxnxD[:, jnp.clip(src, 0, n - 1)], 0)
        xs = xs.reshape(b, nseg, c, d).swapaxes(0, 1)
        def segment(st, xs_seg):
            x_seg, act = xs_seg
            # The buffer's last segment is empty whenever the tokens end on a segment boundary: skip its work.
            return jax.lax.cond(jnp.any(act), lambda: self._resume_segment(st, x_seg, act, mesh),
                                lambda: (st, jnp.zeros_like(x_seg)))

        state, out = jax.lax.scan(segment, state, (xs, active.reshape(nseg, c)))
        return out.swapaxes(0, 1).reshape(b, nseg * c, d)[:, jnp.arange(n) + p0], state

    def _resume_segment(self, st: MACState, x_BxCxD, active_C, mesh):
        """One segment's slots (slot i = within-segment position i), of which ``active_C`` (a contiguous run starting at
        ``pos % C``) hold new tokens: ``step``'s rules for all of them at once. Memory tokens of groups with a new token
        are (re)computed from the group's queries so far; keys and values of new tokens and memory tokens are merged
        into the caches; attention reads the merged caches; the memory is written with the run of outputs."""
        mem, c, n_l, r = self.memory, self.segment_len, self.memory_tokens, self.group
        b = x_BxCxD.shape[0]
        prefix = _prefix(self.persistent, self.dim)
        n_p = prefix.shape[0]
        p = st.memory.pos % c
        count = jnp.sum(active_C, dtype=jnp.int32)
        slot = jnp.arange(c, dtype=jnp.int32)
        seg_w = jax.tree.map(lambda new, old: jnp.where(active_C[0], new, old), st.memory.weights, st.segment_weights)
        q = self._retrieval_queries(x_BxCxD)
        group_active = active_C.reshape(n_l, r).any(axis=1)
        q_sum_next = st.query_sum
        if r > 1:
            q32 = jnp.where(active_C[None, :, None, None], q.astype(st.query_sum.dtype), 0.0)
            q_sum = q32.reshape(b, n_l, r, self.heads, self.head_dim).sum(axis=2)
            # The group holding slot p began before this call when p is inside it: add the queries it has seen.
            began = (jnp.arange(n_l) == p // r) & (p % r != 0) & (count > 0)
            q_sum = q_sum + jnp.where(began[None, :, None, None], st.query_sum[:, None], 0.0)
            hq = self._group_query(q_sum, q)
            last_group = jnp.clip((p + count - 1) // r, 0, n_l - 1)
            q_sum_next = jnp.where(count > 0, q_sum[:, last_group], st.query_sum)
        else:
            hq = q
        h = mem.read(seg_w, hq).reshape(b, n_l, self.dim)
        h_pos = jnp.asarray(self._memory_token_positions(), jnp.int32)
        hk, hv = self.attn.kv(h, jnp.broadcast_to(n_p + h_pos, (b, n_l)), mesh=mesh)
        xq, xk, xv = self.attn.qkv(x_BxCxD, jnp.broadcast_to(n_p + slot, (b, c)), mesh=mesh)
        last = jnp.clip(p + count - 1, 0, c - 1)  # the last new token's slot
        h_cache = _merge(st.h_cache, hk, hv, group_active, h_pos, jnp.where(count > 0, h_pos[last // r] + 1, -1))
        x_cache = _merge(st.x_cache, xk, xv, active_C, slot, jnp.where(count > 0, last + 1, -1))
        pk, pv = self.attn.prefix_kv(prefix, b, mesh=mesh)
        qpos = slot[:, None]
        seen = [(cache.slot_pos >= 0)[None, :] & visible(qpos, cache.slot_pos[None, :], None)
                for cache in (h_cache, x_cache)]
        mask = jnp.concatenate([jnp.ones((c, n_p), bool), *seen], axis=1)
        o = attend(xq, jnp.concatenate([pk, h_cache.k, x_cache.k], 1), jnp.concatenate([pv, h_cache.v, x_cache.v], 1),
                   mask[None, None])
        y = self.attn.out(o)
        # The memory reads its new tokens left-aligned (the run starts at slot p): outputs, then back to slot order.
        y_run = y[:, jnp.clip(slot + p, 0, c - 1)]
        proj, tails = mem.project(y_run, st.memory.tails, mesh=mesh, length=count)
        m, ms = mem.resume_memory(proj, st.memory._replace(tails=tails), length=count, mesh=mesh)
        out = self._gate(y_run, m)[:, jnp.clip(slot - p, 0, c - 1)]
        return MACState(ms, seg_w, q_sum_next, h_cache, x_cache), out

    # ------------------------------------------------------------------------------------------------------- streaming
    def init_state(self, batch: int) -> MACState:
        ms = self.memory.init_stream(batch)
        return MACState(memory=ms, segment_weights=ms.weights,
                        query_sum=jnp.zeros((batch, self.heads, self.head_dim), compute_dtype(self.dtype)),
                        h_cache=self.attn.init_cache(batch, self.memory_tokens),
                        x_cache=self.attn.init_cache(batch, self.segment_len))

    def step(self, xn_Bx1xD, x_Bx1xD, state: MACState):
        """One token. Its group's memory token is rewritten at every token of the group (with the mean so far) at the
        position of the group's last token, so it stays invisible until that token, which writes the full mean."""
        del x_Bx1xD
        mem, r = self.memory, self.group
        b = xn_Bx1xD.shape[0]
        p = state.memory.pos % self.segment_len
        seg_w = jax.tree.map(lambda new, old: jnp.where(p == 0, new, old), state.memory.weights,
                             state.segment_weights)
        q = self._retrieval_queries(xn_Bx1xD)
        q_sum = state.query_sum
        if r > 1:
            q32 = q[:, 0].astype(q_sum.dtype)
            q_sum = jnp.where(p % r == 0, q32, q_sum + q32)
            q = self._group_query(q_sum, q)[:, None]
        h = mem.read(seg_w, q).reshape(b, 1, self.dim)
        j = p // r
        h_pos = (j + 1) * r - 1
        prefix = _prefix(self.persistent, self.dim)
        hk, hv = self.attn.kv(h, jnp.broadcast_to(prefix.shape[0] + h_pos, (b, 1)))
        h_cache = state.h_cache.write(hk, hv, h_pos, slot=j)
        y, x_cache = self.attn.cached_token(xn_Bx1xD, prefix, state.x_cache, window=None, pos=p, context=(h_cache,))
        proj, tails = mem.project(y, state.memory.tails)
        m, ms = mem.stream_tokens(proj, state.memory._replace(tails=tails))
        return self._gate(y, m), MACState(ms, seg_w, q_sum, h_cache, x_cache)


def _merge(cache: KVCache, k_BxLxHxd, v_BxLxHxd, write_L, pos_L, next_pos) -> KVCache:
    """``cache`` with slots ``write_L`` replaced by the new keys and values at positions ``pos_L`` (one per slot), and
    ``pos`` set to ``next_pos`` (as ``KVCache.write`` leaves it after the last write; -1: nothing written, unchanged)."""
    w = write_L[None, :, None, None]
    return KVCache(k=jnp.where(w, k_BxLxHxd.astype(cache.k.dtype), cache.k),
                   v=jnp.where(w, v_BxLxHxd.astype(cache.v.dtype), cache.v),
                   slot_pos=jnp.where(write_L, pos_L, cache.slot_pos).astype(jnp.int32),
                   pos=jnp.where(next_pos >= 0, next_pos, cache.pos).astype(jnp.int32))


# ----------------------------------------------------------------------------------------------------------- registry
MIXERS: dict[str, Callable[[ModelConfig, nnx.Rngs], Mixer]] = {
    "transformer": functools.partial(AttentionMixer, sliding=False),
    "swa": functools.partial(AttentionMixer, sliding=True),
    "lmm": LMMMixer,
    "mac": MACMixer,
    "mag": MAGMixer,
    "mal": MALMixer,
}


def make_mixer(cfg: ModelConfig, rngs: nnx.Rngs) -> Mixer:
    """The token mixer of ``cfg.variant`` (``MIXERS``)."""
    return MIXERS[cfg.variant](cfg, rngs)
