"""NeuralMemory: the long-term memory as a sequence layer (paper Sec. 3.1, Eq. 11-15; implementation details Sec. 4.4), a
thin Flax NNX shell around ``titans_jax.memory``.

Data flow for ``x_BxTxD``::

    q, k, v = conv4(x W_Q), conv4(x W_K), conv4(x W_V)  -> SiLU -> l2-normalise q, k (per head)
    lr      = theta_max * sigmoid(x W_lr + b_lr)          (per token, per head [, per memory matrix])
    momentum = sigmoid(x W_mom + b_mom), decay = sigmoid(x W_dec + b_dec)  (decay may be per output channel)
    y        = memory_scan per (batch, head) from W_0 of that head (learned, or 0)
    out      = W_O(RMSNorm(y) * SiLU(x W_G))

The layer owns only the slow (outer-loop) parameters; the fast weights live in the state that ``memory_scan`` returns.
Every option comes from one ``MemoryConfig`` (``titans_jax.configs``); choices the paper leaves open are stated in
``docs/architecture.md``, "NeuralMemory layer".
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from titans_jax.configs import MemoryConfig
from titans_jax.memory import MemoryState, linear_memory, memory_scan, mlp_memory, token_update
from titans_jax.memory.resume import memory_scan_from
from titans_jax.memory.sharded import shard_over_batch_heads
from titans_jax.memory.stats import ScanStats, memory_scan_stats, pool
from titans_jax.nn.layers import QKV_AXES, CausalConv, Dense, compute_dtype, l2_normalize, named, param, rms_norm
from titans_jax.sharding import memory_shard_axes, with_logical_constraint

# Initial gate biases (the paper leaves them open; docs/architecture.md, "NeuralMemory layer"): lr = theta_max *
# sigmoid(0) = theta_max / 2, momentum = 0.9, decay = 0.001 (keep 99.9% of the memory per token at the start of
# training). Not 0.01: behind the deep memory's LayerNorm, forgetting only shrinks W_L, and the memory settles where its
# relative step per token is about sqrt(2 * alpha); at 0.01 that step made the outer gradient spike
# (docs/architecture.md, "Training stability").
LR_BIAS, MOMENTUM_BIAS, DECAY_BIAS = 0.0, math.log(0.9 / 0.1), math.log(0.001 / 0.999)


class MemoryStream(NamedTuple):
    """Streaming state of one NeuralMemory.

    Attributes:
      weights: the fast weights W after the last token, one ``[B, H, d_in, d_out]`` float32 array per memory matrix.
      momentum: the surprise S, same shapes.
      chunk_weights: W_c, the weights when the current chunk began (every gradient of a chunk is taken there).
      tails: the last ``conv_kernel - 1`` inputs of the q, k and v convolutions, three ``[B, K-1, D]`` arrays.
      pos: ``[]`` int32, the number of tokens seen (chunk boundaries count from 0).
    """

    weights: tuple
    momentum: tuple
    chunk_weights: tuple
    tails: tuple
    pos: jax.Array


class Projected(NamedTuple):
    """Everything the recurrence reads, per token and head.

    Attributes:
      q, k, v: ``[B, T, H, dh]`` queries, keys (both l2-normalised) and values.
      lr, momentum: ``[B, T, H, G]`` gates theta and eta in float32 (``compute_dtype``); G = 1 (per head) or the
        number of memory matrices (``gate_granularity="layer"``).
      decay: ``[B, T, H, G_a]`` alpha, same dtype; G_a = G, or, channel-wise, the sum of the memory matrices' output
        widths (one alpha per output channel of every matrix).
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    lr: jax.Array
    momentum: jax.Array
    decay: jax.Array


class NeuralMemory(nnx.Module):
    """The Titans long-term memory as a sequence layer ``[B, T, dim] -> [B, T, dim]`` (paper Sec. 3.1).

    Args:
      dim: model width; the memory is multi-head with one memory network per head on ``dim // config.heads``.
      config: every option of the layer (``MemoryConfig``: heads, chunk size, memory network, gates, implementation).
      rngs: parameter initialisation.
      with_output: build the output norm, gate and projection (MAC reads the raw memory outputs and gates them itself).

    Parameters: ``q_proj``, ``k_proj``, ``v_proj`` and their convs, the gate projections (``lr_gate``, ``momentum_gate``,
    ``decay_gate``; None when that term is off), ``memory_init`` (an ``nnx.List`` with W_0 of every head per memory
    matrix, ``[H, d_in, d_out]``; None with ``learned_init=False``, where W_0 = 0), and with the output ``out_norm``,
    ``gate_proj``, ``out_proj``.
    """

    def __init__(self, dim: int, config: MemoryConfig, *, rngs: nnx.Rngs, with_output: bool = True):
        if not isinstance(config, MemoryConfig):
            raise TypeError(f"config must be a MemoryConfig (titans_jax.configs), got {type(config).__name__}")
        if dim % config.heads:
            raise ValueError(f"dim={dim} must be divisible by MemoryConfig.heads={config.heads}")
        self.config = config
        self.dim, self.heads, self.head_dim = dim, config.heads, dim // config.heads
        self.dtype = jnp.dtype(config.dtype)
        depth = config.depth
        self.net = linear_memory(self.head_dim) if depth == 1 else mlp_memory(self.head_dim, depth, config.expansion)
        # Gate columns per head: theta and eta are one per token (per matrix with "layer"); alpha may be per channel.
        self.gate_sets = depth if config.gate_granularity == "layer" else 1
        self.decay_widths = (tuple(d_out for _, d_out in self.net.layer_shapes) if config.gate_granularity == "channel"
                             else None)
        self.decay_sets = sum(self.decay_widths) if self.decay_widths else self.gate_sets
        self.q_proj = Dense(dim, dim, ("embed", "heads"), rngs)
        self.k_proj = Dense(dim, dim, ("embed", "heads"), rngs)
        self.v_proj = Dense(dim, dim, ("embed", "heads"), rngs)
        self.q_conv, self.k_conv, self.v_conv = (CausalConv(dim, config.conv_kernel) for _ in range(3))

        def gate(n, bias):
            return Dense(dim, self.heads * n, ("embed", "heads"), rngs, bias=True, scale=0.02, bias_init=bias)

        self.lr_gate = gate(self.gate_sets, LR_BIAS)
        self.momentum_gate = gate(self.gate_sets, MOMENTUM_BIAS) if config.momentum else None
        self.decay_gate = gate(self.decay_sets, DECAY_BIAS) if config.decay else None
        if config.learned_init:
            per_head = [self.net.init(key) for key in jax.random.split(rngs.params(), self.heads)]
            # One learned W_0 per head and memory matrix: [H, d_in, d_out].
            self.memory_init = nnx.List([
                param(None, (self.heads, *shape), ("heads", "mem_in", "mem_out"), value=jnp.stack([w[l] for w in per_head]))
                for l, shape in enumerate(self.net.layer_shapes)])
        else:
            self.memory_init = None  # W_0 = 0: an empty memory, as DeltaNet and Gated DeltaNet start from
        # MAC gates the attention output with the raw memory read instead (with_output=False).
        self.out_norm = param(None, (dim,), ("norm",), init="ones") if with_output else None
        self.gate_proj = Dense(dim, dim, ("embed", "heads"), rngs) if with_output else None
        self.out_proj = Dense(dim, dim, ("heads", "embed"), rngs) if with_output else None

    # ----------------------------------------------------------------------------------------------------------- pieces
    def initial_weights(self) -> tuple:
        """W_0 of every head: a tuple of ``[H, d_in, d_out]`` arrays in the memory's compute dtype (float32; float64
        for a float64 layer), zeros without a learned W_0. In the compute dtype because the recurrence returns its
        weights in it, and a scan carry (MAC's segments, a stream) must keep one type."""
        dtype = compute_dtype(self.dtype)
        if self.memory_init is None:
            return tuple(jnp.zeros((self.heads, *shape), dtype) for shape in self.net.layer_shapes)
        return tuple(w[...].astype(dtype) for w in self.memory_init)

    @named("memory_project")
    def project(self, x_BxTxD, tails=None, *, mesh=None, length=None) -> tuple[Projected, tuple]:
        """q, k, v and the three gates of every token; also the conv tails to continue from (after the first
        ``length`` tokens; default all).

        ``mesh``: constrain q, k, v to the logical axes ``QKV_AXES`` on it (None: no constraint).
        """
        x = x_BxTxD.astype(self.dtype)
        b, t, _ = x.shape
        tails = tails if tails is not None else (None, None, None)
        outs, new_tails = [], []
        for proj, conv, tail in zip((self.q_proj, self.k_proj, self.v_proj), (self.q_conv, self.k_conv, self.v_conv),
                                    tails, strict=True):
            y, nt = conv(proj(x), tail, length)
            outs.append(jax.nn.silu(y).reshape(b, t, self.heads, self.head_dim))
            new_tails.append(nt)
        q, k, v = outs
        q, k = l2_normalize(q), l2_normalize(k)
        q, k, v = (with_logical_constraint(a, QKV_AXES, mesh) for a in (q, k, v))

        gate_dtype = compute_dtype(x.dtype)  # gates in float32 (wider inputs: their dtype)

        def gate(layer, n, fn):
            if layer is None:
                return jnp.zeros((b, t, self.heads, n), gate_dtype)
            return fn(layer(x).astype(gate_dtype)).reshape(b, t, self.heads, n)

        cfg = self.config
        lr = gate(self.lr_gate, self.gate_sets, lambda z: cfg.theta_max * jax.nn.sigmoid(z))
        mom = gate(self.momentum_gate, self.gate_sets, jax.nn.sigmoid)
        dec = gate(self.decay_gate, self.decay_sets, jax.nn.sigmoid)
        return Projected(q, k, v, lr, mom, dec), tuple(new_tails)

    def _split_gates(self, g_TxG):
        """``[..., G]`` gate columns as the core takes them: ``[...]`` (one gate), or a tuple with one per matrix."""
        if self.gate_sets == 1:
            return g_TxG[..., 0]
        return tuple(g_TxG[..., i] for i in range(self.gate_sets))

    def _split_decay(self, d_TxG):
        """Decay columns as the core takes them; channel-wise: a tuple with one ``[..., d_out_l]`` array per matrix."""
        if self.decay_widths is None:
            return self._split_gates(d_TxG)
        bounds = [sum(self.decay_widths[:l]) for l in range(len(self.decay_widths) + 1)]
        return tuple(d_TxG[..., lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True))

    @named("memory_scan")
    def run_memory(self, p: Projected, state: MemoryState | None = None, *, mesh=None) -> tuple[jax.Array, MemoryState]:
        """The memory recurrence for every (batch, head): ``y [B, T, H, dh]`` and the final state (``[B, H, ...]``).

        ``mesh``: run the (batch, head) slices under ``shard_map`` on it, over the mesh axes the logical rules give the
        batch and the heads (``titans_jax.sharding.memory_shard_axes``); None runs them as a plain ``vmap``.
        """
        cfg = self.config
        # remat_every tunes the fast path's backward only; the checked alternatives keep every chunk's residuals.
        remat_every = cfg.remat_every if cfg.impl == "dual" else None

        def one(w0, s0, q, k, v, lr, mom, dec):
            st = None if s0 is None else MemoryState(*s0)
            return memory_scan(self.net, w0, q, k, v, self._split_gates(lr), self._split_gates(mom),
                               self._split_decay(dec), chunk_size=cfg.chunk_size, state=st,
                               chunk_constant_gates=cfg.chunk_constant_gates, impl=cfg.impl, remat_every=remat_every)

        y, st = self._over_slices(one, p, state, mesh)
        return jnp.moveaxis(y, 1, 2), st

    def _over_slices(self, one, p: Projected, state, mesh):
        """``one(W_0, state or None, q, k, v, lr, momentum, decay)`` for every (batch, head) slice, as a ``vmap`` or
        under ``shard_map`` on ``mesh``; outputs ``[B, H, ...]``."""
        w0 = self.initial_weights()
        # Move heads next to batch: [B, T, H, ...] -> [B, H, T, ...].
        seq = tuple(jnp.moveaxis(a, 2, 1) for a in p)

        def per_slice(w0_H, slices):
            seq_, st_ = slices
            if st_ is None:
                over_heads = jax.vmap(lambda w, *a: one(w, None, *a))
                return jax.vmap(over_heads, in_axes=(None,) + (0,) * 6)(w0_H, *seq_)
            over_heads = jax.vmap(one)
            return jax.vmap(over_heads, in_axes=(None, 0) + (0,) * 6)(w0_H, st_, *seq_)

        b, h = seq[0].shape[:2]
        axes = memory_shard_axes()
        run = shard_over_batch_heads(per_slice, b, h, mesh=mesh, batch_axes=axes.batch_axes, head_axes=axes.head_axes)
        return run(w0, (seq, None if state is None else tuple(state)))

    @named("memory_scan")
    def run_memory_stats(self, p: Projected, state: MemoryState | None = None, *, length=None,
                         mesh=None) -> tuple[jax.Array, MemoryState, ScanStats]:
        """:meth:`run_memory` through ``titans_jax.memory.stats.memory_scan_stats``: the same ``y`` and final state,
        and the memory's statistics pooled over batch and heads (forward only: for logging, not for training).

        ``length``: only the first ``length`` tokens count (MAC's padded last segment); ``mesh``: as in
        :meth:`run_memory`.
        """
        cfg = self.config

        def one(w0, s0, q, k, v, lr, mom, dec):
            st = None if s0 is None else MemoryState(*s0)
            return memory_scan_stats(self.net, w0, q, k, v, self._split_gates(lr), self._split_gates(mom),
                                     self._split_decay(dec), chunk_size=cfg.chunk_size, state=st,
                                     chunk_constant_gates=cfg.chunk_constant_gates, length=length)

        y, st, stats = self._over_slices(one, p, state, mesh)
        return jnp.moveaxis(y, 1, 2), st, pool(stats, (0, 1))

    def call_with_stats(self, x_BxTxD, *, mesh=None) -> tuple[jax.Array, ScanStats]:
        """The parallel forward from a fresh memory (``self(x)``) and the memory's statistics on ``x``
        (:meth:`run_memory_stats`)."""
        p, _ = self.project(x_BxTxD, mesh=mesh)
        y, _, stats = self.run_memory_stats(p, mesh=mesh)
        return self.output(y, x_BxTxD), stats

    @named("memory_read")
    def read(self, weights, q_BxTxHxd) -> jax.Array:
        """A pure read ``M*(q)`` (paper Eq. 15) with per-(batch, head) weights ``[B, H, ...]`` and no write."""
        fn = jax.vmap(jax.vmap(self.net.apply, in_axes=(0, 1), out_axes=1), in_axes=(0, 0))
        return fn(weights, q_BxTxHxd.astype(compute_dtype(q_BxTxHxd.dtype))).astype(q_BxTxHxd.dtype)

    @named("memory_output")
    def output(self, y_BxTxHxd, x_BxTxD) -> jax.Array:
        """``W_O(RMSNorm(y) * SiLU(x W_G))``; the RMSNorm is per head (one gain per channel)."""
        b, t = x_BxTxD.shape[:2]
        y32 = rms_norm(y_BxTxHxd, self.out_norm[...].reshape(self.heads, self.head_dim))
        y = y32.reshape(b, t, self.dim).astype(self.dtype)
        return self.out_proj(y * jax.nn.silu(self.gate_proj(x_BxTxD.astype(self.dtype))))

    @named("memory_scan")
    def resume_memory(self, p: Projected, st: MemoryStream, *, length=None, mesh=None) -> tuple[jax.Array, MemoryStream]:
        """The recurrence through the chunked (parallel) path from a streaming state at any position
        (``titans_jax.memory.resume``): ``y [B, T, H, dh]`` and the stream after the first ``length`` tokens (default
        all T; a traced count lets a fixed-size buffer carry fewer). The conv tails are the caller's to set.

        ``mesh``: run the (batch, head) slices under ``shard_map`` on it, as :meth:`run_memory` does.
        """
        cfg = self.config
        _refuse_chunk_constant(cfg, "continued from a state")
        t = p.q.shape[1]
        n = t if length is None else length

        def one(w, s, wc, pos, q, k, v, lr, mom, dec):
            return memory_scan_from(self.net, (w, s, wc), pos, q, k, v, self._split_gates(lr), self._split_gates(mom),
                                    self._split_decay(dec), chunk_size=cfg.chunk_size, length=n)

        seq = tuple(jnp.moveaxis(a, 2, 1) for a in p)
        b, h = seq[0].shape[:2]
        pos_BxH = jnp.broadcast_to(st.pos, (b, h))
        axes = memory_shard_axes()

        def per_slice(_, slices):
            return jax.vmap(jax.vmap(one))(*slices)

        run = shard_over_batch_heads(per_slice, b, h, mesh=mesh, batch_axes=axes.batch_axes, head_axes=axes.head_axes)
        y, (w, s, wc) = run((), (st.weights, st.momentum, st.chunk_weights, pos_BxH, *seq))
        return jnp.moveaxis(y, 1, 2), MemoryStream(w, s, wc, st.tails, (st.pos + n).astype(jnp.int32))

    def __call__(self, x_BxTxD, *, state: MemoryStream | None = None, return_state: bool = False, mesh=None):
        """The parallel (chunked) forward of ``x [B, T, D]``.

        Args:
          state: a ``MemoryStream`` to continue from (``init_stream``, ``step`` or an earlier call's); None starts from
            a fresh memory (W_0, S = 0). Consecutive calls carrying the state equal one call on the whole sequence, for
            pieces of any length (chunk boundaries are counted from the stream's first token, not from each call).
          return_state: also return the stream after the last token (implied by ``state``).
          mesh: as in :meth:`run_memory`.

        Returns:
          ``y [B, T, D]``, or ``(y, MemoryStream)`` with a state or ``return_state``.
        """
        if state is None and not return_state:
            p, _ = self.project(x_BxTxD, mesh=mesh)
            y, _ = self.run_memory(p, mesh=mesh)
            return self.output(y, x_BxTxD)
        state = self.init_stream(x_BxTxD.shape[0]) if state is None else state
        p, tails = self.project(x_BxTxD, state.tails, mesh=mesh)
        y, st = self.resume_memory(p, state._replace(tails=tails), mesh=mesh)
        return self.output(y, x_BxTxD), st

    # -------------------------------------------------------------------------------------------------------- streaming
    def init_stream(self, batch_size: int) -> MemoryStream:
        """The streaming state at the start of a sequence (W = W_0, S = 0, zero conv tails)."""
        w0 = tuple(jnp.broadcast_to(w, (batch_size, *w.shape)) for w in self.initial_weights())
        tail = jnp.zeros((batch_size, self.q_conv.kernel - 1, self.dim), self.dtype)
        return MemoryStream(w0, tuple(jnp.zeros_like(w) for w in w0), w0, (tail, tail, tail),
                            jnp.zeros((), jnp.int32))

    @named("memory_scan")
    def stream_tokens(self, p: Projected, st: MemoryStream) -> tuple[jax.Array, MemoryStream]:
        """The recurrence token by token from a streaming state (exactly the reference's per-token update).

        Raises ``ValueError`` for chunk-constant gates: a token's gate would depend on later tokens of its chunk (the
        paper's Sec. 3.2 speed-up is not causal inside a chunk), so such a layer cannot be streamed.
        """
        _refuse_chunk_constant(self.config, "streamed")
        chunk = self.config.chunk_size

        def one(w, s, wc, q, k, v, lr, mom, dec, pos):
            def body(carry, xs):
                t, q_t, k_t, v_t, lr_t, mom_t, dec_t = xs
                dec_t = dec_t if self.decay_widths is None else self._split_decay(dec_t)
                return token_update(self.net, carry, q_t, k_t, v_t, lr_t, mom_t, dec_t, new_chunk=(t % chunk == 0))
            ts = pos + jnp.arange(q.shape[0])
            dtype = compute_dtype(q.dtype)
            (w, s, wc), y = jax.lax.scan(body, (w, s, wc), (ts, q.astype(dtype), k.astype(dtype), v.astype(dtype), lr,
                                                             mom, dec))
            return y, (w, s, wc)

        seq = [jnp.moveaxis(a, 2, 1) for a in p]
        over_heads = jax.vmap(one, in_axes=(0, 0, 0) + (0,) * 6 + (None,))
        y, (w, s, wc) = jax.vmap(over_heads, in_axes=(0, 0, 0) + (0,) * 6 + (None,))(
            st.weights, st.momentum, st.chunk_weights, *seq, st.pos)
        n = p.q.shape[1]
        return jnp.moveaxis(y, 1, 2).astype(p.q.dtype), MemoryStream(w, s, wc, st.tails, st.pos + n)

    def step(self, x_BxnxD, st: MemoryStream) -> tuple[jax.Array, MemoryStream]:
        """Stream ``n >= 1`` tokens: one token through the per-token update, more through the chunked path
        (``__call__`` with the state). Equal to the parallel call on the whole sequence."""
        if x_BxnxD.shape[1] > 1:
            return self(x_BxnxD, state=st)
        p, tails = self.project(x_BxnxD, st.tails)
        y, st = self.stream_tokens(p, st._replace(tails=tails))
        return self.output(y, x_BxnxD), st


def _refuse_chunk_constant(cfg: MemoryConfig, what: str) -> None:
    if cfg.chunk_constant_gates:
        raise ValueError(f"chunk_constant_gates averages gates over a whole chunk, so a token's gate depends on later "
                         f"tokens of its chunk: such a model is not causal inside a chunk and cannot be {what}; "
                         "set chunk_constant_gates=False for streaming and stateful calls")
