"""NeuralMemory: the LMM layer of SPEC 8.4, a thin Flax NNX shell around ``titans_jax.memory``.

Data flow for ``x_BxTxD``::

    q, k, v = conv4(x W_Q), conv4(x W_K), conv4(x W_V)  -> SiLU -> l2-normalise q, k (per head)
    lr      = theta_max * sigmoid(x W_lr + b_lr)          (per token, per head [, per memory matrix])
    momentum = sigmoid(x W_mom + b_mom), decay = sigmoid(x W_dec + b_dec)
    y        = memory_scan per (batch, head) from the learned W_0 of that head
    out      = W_O(RMSNorm(y) * SiLU(x W_G))

The layer owns only the slow (outer-loop) parameters; the fast weights live in the state that ``memory_scan`` returns.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from titans_jax.memory import MemoryState, linear_memory, memory_scan, mlp_memory, token_update
from titans_jax.memory.sharded import shard_over_batch_heads
from titans_jax.nn.layers import CausalConv, Dense, along_last, l2_normalize, param

# Initial gate biases (SPEC 8.4 leaves them to us): lr = theta_max * sigmoid(0) = theta_max / 2, momentum = 0.9,
# decay = 0.001 (keep 99.9% of the memory per token at the start of training). Not 0.01: behind the deep memory's
# LayerNorm, forgetting only shrinks W_L, and the memory settles where its relative step per token is about
# sqrt(2 * alpha); at 0.01 that step made the outer gradient spike (docs/architecture.md, "Training stability").
LR_BIAS, MOMENTUM_BIAS, DECAY_BIAS = 0.0, math.log(0.9 / 0.1), math.log(0.001 / 0.999)


class MemoryStream(NamedTuple):
    """Streaming state of one NeuralMemory: fast weights, momentum, chunk-start weights (all ``[B, H, ...]``), the
    conv tails of the q/k/v paths (``[B, K-1, D]``) and the number of tokens seen (chunk boundaries count from 0)."""

    weights: tuple
    momentum: tuple
    chunk_weights: tuple
    tails: tuple
    pos: jax.Array


class Projected(NamedTuple):
    q: jax.Array  # [B, T, H, dh]
    k: jax.Array
    v: jax.Array
    lr: jax.Array  # [B, T, H, G]
    momentum: jax.Array
    decay: jax.Array


class NeuralMemory(nnx.Module):
    """The Titans long-term memory as a sequence layer ``[B, T, dim] -> [B, T, dim]`` (SPEC 8.4).

    Args:
      dim: model width; the memory is multi-head with one memory network per head on ``dim // heads``.
      heads: number of memory heads.
      chunk_size: b, tokens per chunk of the parallel update.
      depth, expansion: memory network (1 = linear memory).
      rngs: parameter initialisation.
      conv_kernel: causal depthwise conv after the q, k, v projections.
      theta_max: the largest inner learning rate.
      momentum, decay: turn the momentum and forgetting terms on or off (off = the gate is 0).
      gate_granularity: "head" (one gate per token per head) or "layer" (one per memory weight matrix).
      chunk_constant_gates: replace gates by their chunk means (SPEC 3.4).
      remat_every: the backward pass keeps every n-th chunk-start state of the memory scan and recomputes the rest
        (``memory_scan``'s ``remat_every``; 4 measured fastest on CPU, None keeps every state).
      dtype: activation dtype ("float32" or "bfloat16"); the memory state accumulates in float32.
      with_output: build the output gate and projection (MAC uses the raw reads and gates them itself).
    """

    def __init__(self, dim: int, *, heads: int, chunk_size: int = 16, depth: int = 2, expansion: int = 4,
                 rngs: nnx.Rngs, conv_kernel: int = 4, theta_max: float = 0.1, momentum: bool = True,
                 decay: bool = True, gate_granularity: str = "head", chunk_constant_gates: bool = False,
                 remat_every: int | None = 4, dtype: str = "float32", with_output: bool = True):
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        if gate_granularity not in ("head", "layer"):
            raise ValueError(f"gate_granularity must be 'head' or 'layer', got {gate_granularity!r}")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.chunk_size, self.theta_max = chunk_size, theta_max
        self.use_momentum, self.use_decay = momentum, decay
        self.chunk_constant_gates, self.remat_every = chunk_constant_gates, remat_every
        self.dtype = jnp.dtype(dtype)
        self.net = linear_memory(self.head_dim) if depth == 1 else mlp_memory(self.head_dim, depth, expansion)
        self.gate_sets = depth if gate_granularity == "layer" else 1
        self.q_proj = Dense(dim, dim, ("embed", "heads"), rngs)
        self.k_proj = Dense(dim, dim, ("embed", "heads"), rngs)
        self.v_proj = Dense(dim, dim, ("embed", "heads"), rngs)
        self.q_conv, self.k_conv, self.v_conv = (CausalConv(dim, conv_kernel) for _ in range(3))
        n_gates = heads * self.gate_sets
        self.lr_gate = Dense(dim, n_gates, ("embed", "heads"), rngs, bias=True, scale=0.02, bias_init=LR_BIAS)
        self.momentum_gate = (Dense(dim, n_gates, ("embed", "heads"), rngs, bias=True, scale=0.02,
                                    bias_init=MOMENTUM_BIAS) if momentum else None)
        self.decay_gate = (Dense(dim, n_gates, ("embed", "heads"), rngs, bias=True, scale=0.02, bias_init=DECAY_BIAS)
                           if decay else None)
        per_head = [self.net.init(key) for key in jax.random.split(rngs.params(), heads)]
        for l in range(self.net.depth):
            stacked = jnp.stack([w[l] for w in per_head])  # [H, d_in, d_out]: one learned W_0 per head
            setattr(self, f"memory_init_{l}", param(None, stacked.shape, ("heads", "mem_in", "mem_out"), value=stacked))
        # MAC gates the attention output with the raw memory read instead (with_output=False).
        self.out_norm = param(None, (dim,), ("norm",), init="ones") if with_output else None
        self.gate_proj = Dense(dim, dim, ("embed", "heads"), rngs) if with_output else None
        self.out_proj = Dense(dim, dim, ("heads", "embed"), rngs) if with_output else None

    # ----------------------------------------------------------------------------------------------------------- pieces
    def initial_weights(self) -> tuple:
        """W_0 of every head: a tuple of ``[H, d_in, d_out]`` float32 arrays."""
        return tuple(getattr(self, f"memory_init_{l}")[...] for l in range(self.net.depth))

    def project(self, x_BxTxD, tails=None) -> tuple[Projected, tuple]:
        """q, k, v and the three gates of every token; also the conv tails to continue from."""
        x = x_BxTxD.astype(self.dtype)
        b, t, _ = x.shape
        tails = tails if tails is not None else (None, None, None)
        outs, new_tails = [], []
        for proj, conv, tail in zip((self.q_proj, self.k_proj, self.v_proj), (self.q_conv, self.k_conv, self.v_conv),
                                    tails, strict=True):
            y, nt = conv(proj(x), tail)
            outs.append(jax.nn.silu(y).reshape(b, t, self.heads, self.head_dim))
            new_tails.append(nt)
        q, k, v = outs
        q, k = l2_normalize(q), l2_normalize(k)

        def gate(layer, fn):
            if layer is None:
                return jnp.zeros((b, t, self.heads, self.gate_sets), jnp.float32)
            return fn(layer(x).astype(jnp.float32)).reshape(b, t, self.heads, self.gate_sets)

        lr = gate(self.lr_gate, lambda z: self.theta_max * jax.nn.sigmoid(z))
        mom = gate(self.momentum_gate, jax.nn.sigmoid)
        dec = gate(self.decay_gate, jax.nn.sigmoid)
        return Projected(q, k, v, lr, mom, dec), tuple(new_tails)

    def _gates_for_core(self, g_TxG):
        return g_TxG[:, 0] if self.gate_sets == 1 else tuple(g_TxG[:, i] for i in range(self.gate_sets))

    def run_memory(self, p: Projected, state: MemoryState | None = None) -> tuple[jax.Array, MemoryState]:
        """The memory recurrence for every (batch, head): ``y [B, T, H, dh]`` and the final state (``[B, H, ...]``)."""
        def one(w0, s0, q, k, v, lr, mom, dec):
            st = None if s0 is None else MemoryState(*s0)
            return memory_scan(self.net, w0, q, k, v, self._gates_for_core(lr), self._gates_for_core(mom),
                               self._gates_for_core(dec), chunk_size=self.chunk_size, state=st,
                               chunk_constant_gates=self.chunk_constant_gates, remat_every=self.remat_every)

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
        run = shard_over_batch_heads(per_slice, b, h)
        y, st = run(w0, (seq, None if state is None else tuple(state)))
        return jnp.moveaxis(y, 1, 2), st

    def read(self, weights, q_BxTxHxd) -> jax.Array:
        """A pure read ``M*(q)`` with per-(batch, head) weights ``[B, H, ...]`` and no write."""
        fn = jax.vmap(jax.vmap(self.net.apply, in_axes=(0, 1), out_axes=1), in_axes=(0, 0))
        return fn(weights, q_BxTxHxd.astype(jnp.float32)).astype(q_BxTxHxd.dtype)

    def output(self, y_BxTxHxd, x_BxTxD) -> jax.Array:
        """``W_O(RMSNorm(y) * SiLU(x W_G))``; the RMSNorm is per head."""
        y32 = y_BxTxHxd.astype(jnp.float32)
        y32 = y32 * jax.lax.rsqrt(jnp.mean(y32 * y32, axis=-1, keepdims=True) + 1e-6)
        b, t = x_BxTxD.shape[:2]
        y = (y32.reshape(b, t, self.dim) * along_last(self.out_norm[...], 3)).astype(self.dtype)
        return self.out_proj(y * jax.nn.silu(self.gate_proj(x_BxTxD.astype(self.dtype))))

    def __call__(self, x_BxTxD) -> jax.Array:
        """Parallel forward from a fresh memory (W_0, S = 0)."""
        p, _ = self.project(x_BxTxD)
        y, _ = self.run_memory(p)
        return self.output(y, x_BxTxD)

    # -------------------------------------------------------------------------------------------------------- streaming
    def _check_streamable(self):
        if self.chunk_constant_gates:
            raise ValueError("chunk_constant_gates averages gates over a whole chunk, so a token's gate depends on later "
                             "tokens of its chunk: such a model is not causal inside a chunk and cannot be streamed; "
                             "set chunk_constant_gates=False to decode")

    def init_stream(self, batch_size: int) -> MemoryStream:
        w0 = tuple(jnp.broadcast_to(w, (batch_size, *w.shape)) for w in self.initial_weights())
        tail = jnp.zeros((batch_size, self.q_conv.kernel - 1, self.dim), self.dtype)
        return MemoryStream(w0, tuple(jnp.zeros_like(w) for w in w0), w0, (tail, tail, tail),
                            jnp.zeros((), jnp.int32))

    def stream_tokens(self, p: Projected, st: MemoryStream) -> tuple[jax.Array, MemoryStream]:
        """The recurrence token by token from a streaming state (exactly the reference's per-token update)."""
        def one(w, s, wc, q, k, v, lr, mom, dec, pos):
            def body(carry, xs):
                t, q_t, k_t, v_t, lr_t, mom_t, dec_t = xs
                return token_update(self.net, carry, q_t, k_t, v_t, lr_t, mom_t, dec_t,
                                    new_chunk=(t % self.chunk_size == 0))
            ts = pos + jnp.arange(q.shape[0])
            (w, s, wc), y = jax.lax.scan(body, (w, s, wc), (ts, q.astype(jnp.float32), k.astype(jnp.float32),
                                                             v.astype(jnp.float32), lr, mom, dec))
            return y, (w, s, wc)

        seq = [jnp.moveaxis(a, 2, 1) for a in p]
        over_heads = jax.vmap(one, in_axes=(0, 0, 0) + (0,) * 6 + (None,))
        y, (w, s, wc) = jax.vmap(over_heads, in_axes=(0, 0, 0) + (0,) * 6 + (None,))(
            st.weights, st.momentum, st.chunk_weights, *seq, st.pos)
        n = p.q.shape[1]
        return jnp.moveaxis(y, 1, 2).astype(p.q.dtype), MemoryStream(w, s, wc, st.tails, st.pos + n)

    def step(self, x_BxnxD, st: MemoryStream) -> tuple[jax.Array, MemoryStream]:
        """Stream ``n >= 1`` tokens; equal to the parallel call on the whole sequence."""
        self._check_streamable()
        p, tails = self.project(x_BxnxD, st.tails)
        y, st = self.stream_tokens(p, st._replace(tails=tails))
        return self.output(y, x_BxnxD), st

    def prefill_stream(self, x_BxTxD) -> tuple[jax.Array, MemoryStream]:
        """Parallel forward of a fresh sequence that also returns the streaming state to continue from."""
        b, t, _ = x_BxTxD.shape
        p, tails = self.project(x_BxTxD)
        n_full = (t // self.chunk_size) * self.chunk_size
        head = Projected(*(a[:, :n_full] for a in p))
        ys = []
        if n_full:
            y, st = self.run_memory(head)
            ys.append(y)
            ws = MemoryStream(st.weights, st.momentum, st.weights, tails, jnp.asarray(n_full, jnp.int32))
        else:
            ws = self.init_stream(b)._replace(tails=tails)
        if n_full < t:
            y, ws = self.stream_tokens(Projected(*(a[:, n_full:] for a in p)), ws)
            ys.append(y)
        y = jnp.concatenate(ys, axis=1) if len(ys) > 1 else ys[0]
        return self.output(y, x_BxTxD), ws._replace(tails=tails)
