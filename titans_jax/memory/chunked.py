"""The chunked (parallel) memory recurrence of paper Sec. 3.2, and ``memory_scan``: one function, one ``impl`` switch.

The recurrence (paper Eq. 12-14, with the chunk-start gradients of Eq. 18; ``docs/architecture.md``, "The memory
recurrence") for one (batch, head) slice, token t in chunk c::

    u_t = grad_W sum((M_W(k_t) - v_t)^2) at W_c,  S_t = eta_t S_{t-1} - theta_t u_t,  W_t = (1 - alpha_t) W_{t-1} + S_t,
    y_t = M_{W_t}(q_t)

Across chunks a ``jax.lax.scan`` carries ``(W, S)``; it is the only sequential axis. Inside a chunk of b tokens there is
no loop over tokens:

1. Key path at the chunk-start weights ``W_c``: one batched forward/backward through the memory network gives, for every
   layer l, its inputs ``H_l`` [b, d_in] and the back-propagated errors ``D_l`` [b, d_out]. Token i's gradient for layer l
   is the outer product ``H_l[i]^T D_l[i]`` (never materialised by the dual form).
2. The two linear recurrences (momentum then forgetting) in closed form (paper Eq. 16-18, extended to momentum)::

       W_t = A_t W_c + G_t S_c - sum_{i<=t} C[t,i] u_i         S_t = E_t S_c - sum_{i<=t} lr_i (E_t/E_i) u_i
       A_t = prod_{j<=t}(1-decay_j), E_t = prod_{j<=t} momentum_j, C = L_A L_E diag(lr), G = L_A E

3. Reads with each token's own weights ``W_t`` without forming them (the dual form): layer l of the query path computes
   ``Z = A*(H~ W_c) + G*(H~ S_c) - (C . H~ H_l^T) D_l``.

Implementations (``impl``, one switch in the manner of recurrentgemma's scan types):

* ``"dual"`` (default, the fastest measured): the dual form above with the hand-written backward pass of
  ``dual_vjp.py``, which keeps every ``remat_every``-th chunk-start state and recomputes the rest.
* ``"dual_autodiff"``, ``"associative"``: the checked alternatives of ``alternatives.py``.
* ``"reference"``: the token-by-token oracle of ``reference.py``.

Every quantity accumulates in the compute dtype (float32 for bfloat16 inputs); decay products are computed from logs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from titans_jax.memory.alternatives import associative_chunk, dual_autodiff_chunk
from titans_jax.memory.dual import all_chunk_coeffs
from titans_jax.memory.dual_vjp import dual_scan
from titans_jax.memory.gates import is_channel_decay, prepare
from titans_jax.memory.networks import MemoryNet
from titans_jax.memory.reference import memory_scan_reference
from titans_jax.memory.state import MemoryState

IMPLS = ("dual", "dual_autodiff", "associative", "reference")
DEFAULT_REMAT_EVERY = 4  # chunks per remat group of the fast path's backward (4 measured fastest on CPU)


def _scan_dual(net, remat_every, carry, xs):
    """The fast path over whole chunks: ``dual_scan`` (hand-written backward) in groups of ``remat_every`` chunks; a
    remainder of fewer chunks is one more group of its own."""
    n = jax.tree.leaves(xs)[0].shape[0]
    group = min(remat_every, n)
    groups, rest = divmod(n, group)
    carry, y = dual_scan(net, group, carry, jax.tree.map(lambda x: x[: groups * group], xs))
    if not rest:
        return carry, y
    carry, y_rest = dual_scan(net, rest, carry, jax.tree.map(lambda x: x[groups * group :], xs))
    return carry, jnp.concatenate([y, y_rest])


def _check_impl(impl, remat_every) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if remat_every is None:
        return
    if isinstance(remat_every, bool) or not isinstance(remat_every, int) or remat_every < 1:
        raise ValueError(f"remat_every must be None or an int >= 1, got {remat_every!r}")
    if impl != "dual":
        raise ValueError(f"remat_every tunes the backward of impl='dual' only; impl={impl!r} keeps every chunk's "
                         "residuals (it is a checked alternative for small inputs): drop remat_every")


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
    impl: str = "dual",
    remat_every: int | None = None,
) -> tuple[jax.Array, MemoryState]:
    """Run the Titans memory over one (batch, head) slice, chunk-parallel (paper Sec. 3.2).

    Token t (0-based) belongs to chunk ``t // chunk_size``; its gradient is taken at the weights the chunk began with;
    momentum and forgetting act per token; ``y_t`` reads with token t's own weights after its own write. Every ``impl``
    gives :func:`memory_scan_reference`'s results up to float rounding. Jit-able, vmap-able over batch and heads,
    differentiable twice.

    Args:
      net: the memory network (``linear_memory`` / ``mlp_memory``).
      params: initial weights W_0, a tuple of matrices (used when ``state`` is None).
      q, k, v: ``[T, dim]``; any T >= 1 (a last partial chunk is its own, shorter chunk).
      lr, momentum, decay: the gates theta >= 0, eta in [0, 1), alpha in [0, 1]: ``[T]`` arrays, or tuples with one
        ``[T]`` array per weight matrix (per-layer gates). ``decay`` may also hold ``[T, d_out_l]`` arrays: one alpha
        per output channel of weight matrix l (the revision's channel-wise forgetting).
      chunk_size: b, tokens per chunk.
      state: ``MemoryState`` to continue from; None starts at ``(params, 0)``.
      chunk_constant_gates: replace each gate by its mean over the chunk (paper Sec. 3.2, "parameters as functions of
        chunks"; not causal inside a chunk).
      impl: ``"dual"`` (default; the fastest path: dual form, hand-written backward), or a checked alternative:
        ``"dual_autodiff"`` (same forward, JAX's backward; also forward mode), ``"associative"`` (per-token weights
        by associative scans) or ``"reference"`` (token by token). ``"dual"`` differentiates channel-wise decay with
        JAX's backward too (the hand-written one covers per-token gates).
      remat_every: ``impl="dual"`` only: its backward keeps the chunk-start state of every n-th chunk and recomputes
        the rest (default 4, measured fastest on CPU). Each group of n chunks is traced out in full, so compile time
        grows with n.

    Gradients of gradients work with every impl; forward mode through the outputs (``jax.jvp``, ``jax.jacfwd``) needs
    ``"dual_autodiff"``, ``"associative"`` or ``"reference"`` (a ``custom_vjp`` refuses it).

    Returns:
      ``(y_TxD, MemoryState)``: outputs in q's dtype; the final state in the compute dtype (float32 for bfloat16 inputs).
    """
    _check_impl(impl, remat_every)
    if impl == "reference":
        return memory_scan_reference(net, params, q, k, v, lr, momentum, decay, chunk_size=chunk_size, state=state,
                                     chunk_constant_gates=chunk_constant_gates)
    out_dtype = q.dtype
    q, k, v, gates, state = prepare(net, params, q, k, v, lr, momentum, decay, chunk_size, state, chunk_constant_gates)
    if impl == "associative":
        step = functools.partial(associative_chunk, net)
    else:
        step = functools.partial(dual_autodiff_chunk, net)
    # The hand-written backward covers per-token coefficients; channel-wise ones go through JAX's backward.
    manual = impl == "dual" and not is_channel_decay(gates[2])
    t_len = q.shape[0]
    n_full, rest = divmod(t_len, chunk_size)
    carry = (state.weights, state.momentum)

    def chunks(x_TxF, n, b):
        return x_TxF.reshape(n, b, *x_TxF.shape[1:])

    ys = []
    if n_full:
        sl = slice(0, n_full * chunk_size)
        xs = jax.tree.map(lambda x: chunks(x[sl], n_full, chunk_size), (q, k, v, gates))
        if manual:
            q_, k_, v_, g_ = xs
            carry, y = _scan_dual(net, remat_every or DEFAULT_REMAT_EVERY, carry, (q_, k_, v_, all_chunk_coeffs(*g_)))
        else:
            carry, y = jax.lax.scan(step, carry, xs)
        ys.append(y.reshape(n_full * chunk_size, -1))
    if rest:
        carry, y = step(carry, jax.tree.map(lambda x: x[n_full * chunk_size :], (q, k, v, gates)))
        ys.append(y)
    y = jnp.concatenate(ys) if len(ys) > 1 else ys[0]
    return y.astype(out_dtype), MemoryState(*carry)
