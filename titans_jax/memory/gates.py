"""Gates of the recurrence: argument checks, per-leaf expansion, chunk means and the within-chunk decay matrices.

Shared by the chunked fast path and the token-by-token reference so that both read their arguments the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from titans_jax.memory.networks import MemoryNet
from titans_jax.memory.state import MemoryState

GATE_NAMES = ("lr", "momentum", "decay")


def _check_float(name: str, x) -> None:
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array (float32, bfloat16 or float64), got dtype {dtype}")


def compute_dtype(*arrays) -> jnp.dtype:
    """float32 for narrow inputs (bfloat16, float16), the input's dtype when it is wider (float64 runs in float64)."""
    return jnp.result_type(jnp.float32, *[a.dtype for a in arrays])


def check_inputs(net: MemoryNet, params, q, k, v, gates: dict, chunk_size: int, state) -> tuple[int, int]:
    """Validate the arguments of ``memory_scan``; return ``(T, num_leaves)``. Raises ``ValueError`` naming the argument."""
    if not isinstance(net, MemoryNet):
        raise ValueError(f"net must be a MemoryNet (from linear_memory / mlp_memory), got {type(net).__name__}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    params = tuple(params)
    if len(params) != net.depth:
        raise ValueError(f"params must hold {net.depth} weight matrices for this net, got {len(params)}")
    for l, (p, shape) in enumerate(zip(params, net.layer_shapes, strict=True)):
        if tuple(p.shape) != shape:
            raise ValueError(f"params[{l}] must have shape {shape}, got {tuple(p.shape)}")
        _check_float(f"params[{l}]", p)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_float(name, x)
        if x.ndim != 2 or x.shape[1] != net.dim:
            raise ValueError(
                f"{name} must have shape [T, {net.dim}] for one (batch, head) slice, got {tuple(x.shape)}; "
                "vmap over batch and heads"
            )
    t = q.shape[0]
    if k.shape[0] != t or v.shape[0] != t:
        raise ValueError(f"q, k and v must have the same length T, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if t < 1:
        raise ValueError("q, k and v must hold at least one token (T >= 1)")
    for name in GATE_NAMES:
        g = gates[name]
        leaves = jax.tree.leaves(g)
        if len(leaves) == 1 and not isinstance(g, (tuple, list)):
            shapes_ok = leaves[0].shape == (t,)
        else:
            # decay alone may be channel-wise: [T, d_out] for weight matrix l (one alpha per output channel).
            allowed = [{(t,)} | ({(t, shape[1])} if name == "decay" else set()) for shape in net.layer_shapes]
            shapes_ok = len(leaves) == net.depth and all(
                tuple(x.shape) in ok for x, ok in zip(leaves, allowed, strict=False))
        if not shapes_ok:
            got = [tuple(x.shape) for x in leaves]
            channel = (f", or (decay only) [T, d_out] arrays with d_out = {[s[1] for s in net.layer_shapes]} "
                       "(channel-wise forgetting)") if name == "decay" else ""
            raise ValueError(
                f"{name} must be a [T] = [{t}] array (one gate per token) or a tuple of {net.depth} such arrays "
                f"(one per memory weight){channel}, got shapes {got}"
            )
        for x in leaves:
            _check_float(name, x)
    if state is not None:
        w, s = state
        for nm, tree in (("state.weights", w), ("state.momentum", s)):
            shapes = [tuple(x.shape) for x in tree]
            if shapes != list(net.layer_shapes):
                raise ValueError(f"{nm} must have shapes {list(net.layer_shapes)}, got {shapes}")
    return t, net.depth


def is_channel_decay(decay) -> bool:
    """Whether ``decay`` is channel-wise: a tuple with a ``[T, d_out]`` array for some weight matrix."""
    return isinstance(decay, (tuple, list)) and any(jnp.ndim(x) == 2 for x in decay)


def stack_gates(gates: dict, num_leaves: int, dtype):
    """Stack the three gates as ``[T, G]`` arrays: G = 1 when every gate is one per token (all weight leaves share it),
    G = num_leaves when any gate is given per leaf (then leaf ``l`` reads column ``l`` of every gate).

    Channel-wise decay (see :func:`is_channel_decay`) stays a tuple with one ``[T, d_out_l]`` array per leaf (a ``[T]``
    entry becomes ``[T, 1]``); lr and momentum are then ``[T, num_leaves]``.
    """
    per_leaf_given = any(isinstance(gates[n], (tuple, list)) for n in GATE_NAMES)
    out = []
    for name in GATE_NAMES:
        g = gates[name]
        if name == "decay" and is_channel_decay(g):
            out.append(tuple(jnp.asarray(x, dtype).reshape(x.shape[0], -1) for x in g))
            continue
        if isinstance(g, (tuple, list)):
            cols = [jnp.asarray(x, dtype) for x in g]
        else:
            cols = [jnp.asarray(g, dtype)] * (num_leaves if per_leaf_given else 1)
        out.append(jnp.stack(cols, axis=1))
    return tuple(out)


def decay_of_leaf(dec, l: int):
    """Leaf ``l``'s decay from a stacked ``[..., G]`` array (``[...]``), or from a channel-wise tuple (``[..., O]``)."""
    if isinstance(dec, (tuple, list)):
        return dec[l]
    return dec[..., gate_column(l, dec.shape[-1])]


def gate_column(l: int, num_sets: int) -> int:
    """Which column of a ``[T, G]`` gate array weight leaf ``l`` reads."""
    return l if num_sets > 1 else 0


def chunk_means(g_TxG: jax.Array, chunk_size: int) -> jax.Array:
    """Replace each gate by its mean over its chunk (paper Sec. 3.2, "parameters as functions of chunks"); the last,
    partial chunk averages its own tokens."""
    t = g_TxG.shape[0]
    n_full, rest = divmod(t, chunk_size)
    parts = []
    if n_full:
        full = g_TxG[: n_full * chunk_size].reshape(n_full, chunk_size, -1)
        parts.append(jnp.repeat(jnp.mean(full, axis=1), chunk_size, axis=0))
    if rest:
        tail = g_TxG[n_full * chunk_size :]
        parts.append(jnp.broadcast_to(jnp.mean(tail, axis=0), tail.shape))
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]


def segment_products(g_B: jax.Array) -> jax.Array:
    """``L[t, s] = prod_{s < j <= t} g_j`` for ``t >= s`` (1 on the diagonal), 0 above it.

    A cumulative product down each column of ``X[t, s] = g_t (t > s), 1 (t <= s)``: plain products, no division by a
    running product, so a factor of exactly 0 (a full wipe, or momentum 0) stays exact, and so do the derivatives there
    (a product through logs has a zero derivative at a zero factor, where the true one is the product of the others).
    """
    b = g_B.shape[0]
    x_BxB = jnp.where(np.tril(np.ones((b, b), bool), -1), g_B[:, None], 1.0)
    return jnp.where(np.tril(np.ones((b, b), bool)), jnp.cumprod(x_BxB, axis=0), 0.0)


def prefix_products(g_B: jax.Array) -> jax.Array:
    """``P[t] = prod_{j <= t} g_j`` within a chunk (a cumulative product; see :func:`segment_products`)."""
    return jnp.cumprod(g_B)


def prepare(net, params, q, k, v, lr, momentum, decay, chunk_size, state, chunk_constant_gates):
    """Checks, casts and gate stacking shared by the reference and the fast path.

    Returns ``(q, k, v, (lr_TxG, momentum_TxG, decay_TxG), state)`` in the compute dtype (float32, or wider when the
    inputs are wider); see :func:`stack_gates` for G and for channel-wise decay (a tuple of ``[T, d_out_l]``).
    """
    gates = {"lr": lr, "momentum": momentum, "decay": decay}
    _, depth = check_inputs(net, params, q, k, v, gates, chunk_size, state)
    dtype = compute_dtype(q, k, v, *jax.tree.leaves(params), *jax.tree.leaves(gates))
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    stacked = stack_gates(gates, depth, dtype)
    if chunk_constant_gates:
        stacked = jax.tree.map(lambda g: chunk_means(g, chunk_size), stacked)
    if state is None:
        state = MemoryState.fresh(params, dtype)
    else:
        state = MemoryState(tuple(w.astype(dtype) for w in state[0]), tuple(s.astype(dtype) for s in state[1]))
    return q, k, v, stacked, state
