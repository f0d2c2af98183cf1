"""The chunked (parallel) memory recurrence: SPEC 8.2, the fast path of SPEC 8.1.

Across chunks a ``jax.lax.scan`` carries ``(W, S)``; it is the only sequential axis. Inside a chunk of b tokens there is
no loop over tokens:

1. Key path at the chunk-start weights ``W_c``: one batched forward/backward through the memory network gives, for every
   layer l, its inputs ``H_l`` [b, d_in] and the back-propagated errors ``D_l`` [b, d_out]. Token i's gradient for layer l
   is the outer product ``H_l[i]^T D_l[i]`` (never materialised by the dual method).
2. The two linear recurrences (momentum then forgetting) in closed form (SPEC 3.5)::

       W_t = A_t W_c + G_t S_c - sum_{i<=t} C[t,i] u_i         S_t = E_t S_c - sum_{i<=t} lr_i (E_t/E_i) u_i
       A_t = prod_{j<=t}(1-decay_j), E_t = prod_{j<=t} momentum_j, C = L_A L_E diag(lr), G = L_A E

3. Reads with each token's own weights ``W_t``:

   * ``method="dual"``: never forms ``W_t``. Layer l of the query path computes
     ``Z = A*(H~ W_c) + G*(H~ S_c) - (C . H~ H_l^T) D_l`` (the TTT dual form extended with decay and momentum).
   * ``method="associative"``: forms the b per-token weights with ``jax.lax.associative_scan`` over the two recurrences
     and runs each query through its own weights (simple, more memory traffic).

Every quantity accumulates in the compute dtype (float32 for bfloat16 inputs); decay products are computed from logs.
The dual chunk step lives in ``dual.py``; its hand-written backward pass (the default) in ``dual_vjp.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from titans_jax.memory.dual import all_chunk_coeffs, dual_chunk
from titans_jax.memory.dual_vjp import dual_scan
from titans_jax.memory.gates import gate_column, prepare
from titans_jax.memory.networks import MemoryNet
from titans_jax.memory.state import MemoryState

METHODS = ("dual", "associative")
VJPS = ("manual", "autodiff")


def _linear_scan(a_B, b_BxN, init_N):
    """``x_t = a_t x_{t-1} + b_t`` for all t with ``x_0 = init``, by an associative scan (init folded into the first b)."""
    b_BxN = b_BxN.at[0].add(a_B[0] * init_N)
    a_BxN = jnp.broadcast_to(a_B.reshape(a_B.shape + (1,) * (b_BxN.ndim - 1)), b_BxN.shape)

    def combine(left, right):
        a1, b1 = left
        a2, b2 = right
        return a1 * a2, a2 * b1 + b2

    return jax.lax.associative_scan(combine, (a_BxN, b_BxN))[1]


def _associative_chunk(net: MemoryNet, carry, xs):
    w_c, s_c = carry
    q_BxD, k_BxD, v_BxD, (lr_BxG, mom_BxG, dec_BxG) = xs
    inputs, deltas = net.key_path(w_c, k_BxD, v_BxD)
    num_sets = lr_BxG.shape[1]
    ws, ss = [], []
    for l in range(net.depth):
        g = gate_column(l, num_sets)
        u_BxIxO = jnp.einsum("bi,bo->bio", inputs[l], deltas[l])
        lr = lr_BxG[:, g][:, None, None]
        s_seq = _linear_scan(mom_BxG[:, g], -lr * u_BxIxO, s_c[l])
        ws.append(_linear_scan(1.0 - dec_BxG[:, g], s_seq, w_c[l]))
        ss.append(s_seq)
    y_BxD = jax.vmap(lambda w, q: net.apply(w, q[None])[0])(tuple(ws), q_BxD)
    return (tuple(w[-1] for w in ws), tuple(s[-1] for s in ss)), y_BxD


def _scan_chunks(step, carry, xs, remat_every: int | None, unroll: int = 1):
    """``lax.scan`` of ``step`` over the leading (chunk) axis; with ``remat_every=n`` only every n-th carry is kept for the
    backward pass and the n chunks in between are recomputed (memory O(T/(b n)) states instead of O(T) activations)."""
    n = jax.tree.leaves(xs)[0].shape[0]
    if not remat_every:
        return jax.lax.scan(step, carry, xs, unroll=unroll)
    groups, rest = divmod(n, remat_every)
    ys = []
    if groups:
        head = jax.tree.map(lambda x: x[: groups * remat_every].reshape(groups, remat_every, *x.shape[1:]), xs)
        inner = jax.checkpoint(lambda c, x: jax.lax.scan(step, c, x, unroll=unroll))
        carry, y = jax.lax.scan(inner, carry, head)
        ys.append(y.reshape(groups * remat_every, *y.shape[2:]))
    if rest:
        carry, y = jax.lax.scan(step, carry, jax.tree.map(lambda x: x[groups * remat_every :], xs))
        ys.append(y)
    return carry, (jnp.concatenate(ys) if len(ys) > 1 else ys[0])


def _scan_dual_manual(net, carry, xs, remat_every, unroll):
    """``dual_scan`` (hand-written backward) over all chunks; a remainder of fewer than ``remat_every`` chunks is one
    more group of its own."""
    n = jax.tree.leaves(xs)[0].shape[0]
    group = min(remat_every or 1, n)
    groups, rest = divmod(n, group)
    carry, y = dual_scan(net, group, unroll, carry, jax.tree.map(lambda x: x[: groups * group], xs))
    if not rest:
        return carry, y
    carry, y_rest = dual_scan(net, rest, unroll, carry, jax.tree.map(lambda x: x[groups * group :], xs))
    return carry, jnp.concatenate([y, y_rest])


def memory_scan(
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
    method: str = "dual",
    remat_every: int | None = None,
    unroll: int = 1,
    vjp: str | None = None,
) -> tuple[jax.Array, MemoryState]:
    """Run the Titans memory over one (batch, head) slice: SPEC 8.1, chunk-parallel.

    Token t (0-based) belongs to chunk ``t // chunk_size``; its gradient is taken at the weights the chunk began with;
    momentum and forgetting act per token; ``y_t`` reads with token t's own weights after its own write. Results equal
    :func:`memory_scan_reference` up to float rounding. Jit-able, vmap-able over batch and heads, differentiable twice.

    Args:
      net: the memory network (``linear_memory`` / ``mlp_memory``).
      params: initial weights W_0, a tuple of matrices (used when ``state`` is None).
      q, k, v: ``[T, dim]``; any T >= 1 (a last partial chunk is its own, shorter chunk).
      lr, momentum, decay: the gates theta >= 0, eta in [0, 1), alpha in [0, 1]: ``[T]`` arrays, or tuples with one ``[T]``
        array per weight matrix (per-layer gates).
      chunk_size: b, tokens per chunk.
      state: ``MemoryState`` to continue from; None starts at ``(params, 0)``.
      chunk_constant_gates: replace each gate by its mean over the chunk (SPEC 3.4).
      method: ``"dual"`` (default; fastest measured) or ``"associative"`` (per-token weights via associative scans).
      remat_every: recompute the forward of every n chunks in the backward pass instead of storing it (None: store).
        Under ``vjp="manual"`` each group of n chunks is traced out in full, so compile time grows with n; small n
        (4 measured fastest on CPU) is the intended use.
      unroll: chunks per iteration of the compiled loop (``lax.scan``'s unroll).
      vjp: how the backward pass is computed. ``"manual"`` (the default for ``method="dual"``): the hand-written
        backward of ``dual_vjp.py``, which saves the chunk-start state every ``remat_every`` chunks (every chunk when
        None) and recomputes the rest. Gradients of gradients work; ``jax.jvp`` / ``jax.jacfwd`` of the outputs
        themselves do not. ``"autodiff"`` (the only choice for ``method="associative"``): JAX differentiates the scan,
        in either mode.

    Returns:
      ``(y_TxD, MemoryState)``: outputs in q's dtype; the final state in the compute dtype (float32 for bfloat16 inputs).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if remat_every is not None and (isinstance(remat_every, bool) or not isinstance(remat_every, int) or remat_every < 1):
        raise ValueError(f"remat_every must be None or an int >= 1, got {remat_every!r}")
    if vjp not in (None,) + VJPS:
        raise ValueError(f"vjp must be None or one of {VJPS}, got {vjp!r}")
    if vjp is None:
        vjp = "manual" if method == "dual" else "autodiff"
    if vjp == "manual" and method != "dual":
        raise ValueError(f"vjp='manual' exists for method='dual' only; use vjp='autodiff' with method={method!r}")
    out_dtype = q.dtype
    q, k, v, gates, state = prepare(net, params, q, k, v, lr, momentum, decay, chunk_size, state, chunk_constant_gates)
    dual = method == "dual"
    step = functools.partial(dual_chunk if dual else _associative_chunk, net)
    t_len = q.shape[0]
    n_full, rest = divmod(t_len, chunk_size)
    carry = (state.weights, state.momentum)

    def chunk_inputs(x_TxF, n, b):
        return x_TxF.reshape(n, b, *x_TxF.shape[1:])

    def run(carry, sl, n, b, scan):
        q_, k_, v_ = (chunk_inputs(x[sl], n, b) for x in (q, k, v))
        g_ = tuple(chunk_inputs(x[sl], n, b) for x in gates)
        aux = all_chunk_coeffs(*g_) if dual else g_
        if scan and vjp == "manual":
            return _scan_dual_manual(net, carry, (q_, k_, v_, aux), remat_every, unroll)
        if scan:
            return _scan_chunks(step, carry, (q_, k_, v_, aux), remat_every, unroll)
        return step(carry, jax.tree.map(lambda x: x[0], (q_, k_, v_, aux)))

    ys = []
    if n_full:
        carry, y = run(carry, slice(0, n_full * chunk_size), n_full, chunk_size, True)
        ys.append(y.reshape(n_full * chunk_size, -1))
    if rest:
        carry, y = run(carry, slice(n_full * chunk_size, t_len), 1, rest, False)
        ys.append(y)
    y = jnp.concatenate(ys) if len(ys) > 1 else ys[0]
    return y.astype(out_dtype), MemoryState(*carry)
