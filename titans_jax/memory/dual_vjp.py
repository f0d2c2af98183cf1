"""A hand-written backward pass for the dual-form chunk scan (``memory_scan(impl="dual")``, the default).

Why: reverse-mode autodiff of ``lax.scan(dual_chunk)`` spent about 6x the forward's time on CPU (the forward is ~5
small matmuls per layer; its transpose is a long tail of tiny ops and of W-sized temporaries). Here the backward of one
chunk is written out (``chunk_vjp``): it recomputes the chunk's activations from the saved chunk-start state
``(W_c, S_c)`` and pulls the cotangents back in about twice the forward's matmuls.

Notation for one chunk and memory layer l (row convention, ``z = h @ W``), see ``dual.py``::

    key path    H_0 = k, P_l = H_l W_l, H_{l+1} = gelu(P_l),
                D_last = output_error(P_last), D_l = (D_{l+1} W_{l+1}^T) gelu'(P_l)
    query path  X_0 = q, Z_l = a*(X_l W_l) + g*(X_l S_l) - (c . X_l H_l^T) D_l, X_{l+1} = gelu(Z_l), y = q + LN(Z_last)
    end         W_l' = a_b W_l + g_b S_l - H_l^T (c_b . D_l),   S_l' = e_b S_l - H_l^T (s . D_l)

The cotangents are pulled back in that order reversed: reads, end of chunk, the error recursion (which needs gelu''
and, through ``output_error``, the LayerNorm's second derivative, taken with ``jax.vjp`` on [b, dim] rows), then the key
path's forward. The scan saves the chunk-start state of every ``group``-th chunk and recomputes the rest (``advance``).

The plain reference is autodiff of the same scan (``impl="dual_autodiff"``); ``tests/test_dual_vjp.py`` holds the two
together. The backward is itself plain JAX, so gradients of gradients work (``jax.grad`` of ``jax.grad``, and
``jax.jvp`` of ``jax.grad`` for Hessian-vector products); forward mode applied to the outputs themselves (``jax.jvp``,
``jax.jacfwd`` of ``memory_scan``) does not go through a ``custom_vjp``: use ``impl="dual_autodiff"`` there.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from titans_jax.memory.dual import ChunkCoeffs, advance, coeffs_per_leaf, dual_chunk, read_terms
from titans_jax.memory.gates import gate_column
from titans_jax.memory.networks import MemoryNet, gelu_grad, gelu_grad2, layer_norm_vjp


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)


def _rowsum(x):
    return jnp.sum(x, axis=-1)


def chunk_vjp(net: MemoryNet, carry, xs, g_carry, g_y_BxD):
    """Cotangents of ``dual_chunk(net, carry, xs)``'s inputs from those of its outputs.

    Args:
      carry: ``(W_c, S_c)``, the chunk-start state.
      xs: ``(q, k, v, coeffs_G)`` of the chunk, as ``dual_chunk`` takes them.
      g_carry: ``(gW', gS')``, cotangents of the end-of-chunk state.
      g_y_BxD: cotangent of the chunk's outputs.

    Returns:
      ``(g_carry_in, g_xs)`` with the structures of ``carry`` and ``xs``.
    """
    w_c, s_c = carry
    q, k, v, coeffs_G = xs
    g_wn, g_sn = g_carry
    depth = net.depth
    cfs = coeffs_per_leaf(net, coeffs_G)
    inputs, pre, deltas, backs = net.key_path_parts(w_c, k, v)

    # Query path, recomputed: X_l, the three read terms and Z_l.
    xq, reads = [q], []
    for l in range(depth):
        reads.append(read_terms(cfs[l], xq[l], w_c[l], s_c[l], inputs[l], deltas[l]))
        if l < depth - 1:
            xq.append(_gelu(reads[l][3]))

    zeros_b = jnp.zeros_like(cfs[0].a)
    # Rank-b pieces of each weight cotangent, as (left, right) with g_W += left^T @ right: summed by one matmul per
    # matrix at the end, so a W-sized array is written once rather than once per term (W-sized passes cost as much as
    # the small matmuls on CPU).
    w_terms = [[] for _ in range(depth)]
    g_s = [None] * depth
    g_d = [None] * depth
    g_h = [None] * depth  # cotangent of H_l (H_0 = k)
    g_cf = [dict(a=zeros_b, g=zeros_b, e=zeros_b, s_coef=zeros_b) for _ in range(depth)]

    # 1. Reads, last layer first.
    if net.is_linear:
        g_z, g_q = g_y_BxD, jnp.zeros_like(q)
    else:
        g_z, g_q = layer_norm_vjp(reads[-1][3], g_y_BxD), g_y_BxD
    for l in reversed(range(depth)):
        cf = cfs[l]
        p_w, p_s, att, _ = reads[l]
        g_cf[l]["a"] = _rowsum(p_w * g_z)
        g_cf[l]["g"] = _rowsum(p_s * g_z)
        ag, gg = cf.a[:, None] * g_z, cf.g[:, None] * g_z
        g_m = -(g_z @ deltas[l].T)  # cotangent of M = c . att
        g_cf[l]["c"] = g_m * att
        g_att = g_m * cf.c
        g_d[l] = -((cf.c * att).T @ g_z)
        g_h[l] = g_att.T @ xq[l]
        w_terms[l].append((xq[l], ag))
        g_s[l] = xq[l].T @ gg
        g_x = ag @ w_c[l].T + gg @ s_c[l].T + g_att @ inputs[l]
        if l > 0:
            g_z = g_x * gelu_grad(reads[l - 1][3])
        else:
            g_q = g_q + g_x

    # 2. End of chunk.
    for l in range(depth):
        cf = cfs[l]
        g_s[l] = g_s[l] + cf.g[-1] * g_wn[l] + cf.e[-1] * g_sn[l]
        g_cf[l]["a"] = g_cf[l]["a"].at[-1].add(jnp.sum(w_c[l] * g_wn[l]))
        g_cf[l]["g"] = g_cf[l]["g"].at[-1].add(jnp.sum(s_c[l] * g_wn[l]))
        g_cf[l]["e"] = g_cf[l]["e"].at[-1].add(jnp.sum(s_c[l] * g_sn[l]))
        u, w = inputs[l] @ g_wn[l], inputs[l] @ g_sn[l]
        g_d[l] = g_d[l] - cf.c[-1][:, None] * u - cf.s_coef[:, None] * w
        g_cf[l]["c"] = g_cf[l]["c"].at[-1].add(-_rowsum(deltas[l] * u))
        g_cf[l]["s_coef"] = -_rowsum(deltas[l] * w)
        g_h[l] = g_h[l] - (cf.c[-1][:, None] * deltas[l]) @ g_wn[l].T - (cf.s_coef[:, None] * deltas[l]) @ g_sn[l].T

    # 3. The error recursion D_l = (D_{l+1} W_{l+1}^T) gelu'(P_l), first layer first: g_d[l] is complete when reached.
    g_p = [jnp.zeros_like(p) for p in pre]
    for l in range(depth - 1):
        t = g_d[l] * gelu_grad(pre[l])
        g_d[l + 1] = g_d[l + 1] + t @ w_c[l + 1]
        w_terms[l + 1].append((t, deltas[l + 1]))
        g_p[l] = g_p[l] + g_d[l] * backs[l] * gelu_grad2(pre[l])
    _, out_vjp = jax.vjp(net.output_error, pre[-1], k, v)
    g_plast, g_k, g_v = out_vjp(g_d[-1])
    g_p[-1] = g_p[-1] + g_plast

    # 4. The key path's forward P_l = H_l W_l, H_l = gelu(P_{l-1}).
    for l in reversed(range(depth)):
        w_terms[l].append((inputs[l], g_p[l]))
        g_h[l] = g_h[l] + g_p[l] @ w_c[l].T
        if l > 0:
            g_p[l - 1] = g_p[l - 1] + g_h[l] * gelu_grad(pre[l - 1])
    g_k = g_k + g_h[0]
    g_w = []
    for l in range(depth):
        left, right = (jnp.concatenate(x, axis=0) for x in zip(*w_terms[l], strict=True))
        g_w.append(cfs[l].a[-1] * g_wn[l] + left.T @ right)

    # Layers that share a gate set add their coefficient cotangents.
    num_sets = coeffs_G.a.shape[0]
    per_set = [None] * num_sets
    for l in range(depth):
        col = gate_column(l, num_sets)
        cf_l = ChunkCoeffs(**g_cf[l])
        per_set[col] = cf_l if per_set[col] is None else jax.tree.map(jnp.add, per_set[col], cf_l)
    g_coeffs = jax.tree.map(lambda *x: jnp.stack(x), *per_set)
    return (tuple(g_w), tuple(g_s)), (g_q, g_k, g_v, g_coeffs)


def _at(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def _group(tree, size):
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // size, size, *x.shape[1:]), tree)


def _ungroup(tree):
    return jax.tree.map(lambda x: x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def dual_scan(net: MemoryNet, group: int, carry, xs):
    """``lax.scan(dual_chunk)`` over the leading (chunk) axis of ``xs`` with the hand-written backward pass.

    The forward saves the chunk-start state of every ``group``-th chunk; the backward rebuilds the ``group - 1`` states
    in between with ``advance`` (no reads), then runs ``chunk_vjp`` back over them. The number of chunks must be a
    multiple of ``group``.

    A group's chunks are unrolled in Python inside one loop iteration, not run by a nested scan: the states in between
    then stay plain values that XLA never stacks into a buffer, and XLA can overlap work of neighbouring chunks. With
    groups of 4 the layer's forward+backward measured 1.17-1.25x (1 CPU device) and 1.06-1.21x (2) faster than
    saving every state (``docs/benchmarks.md``): the state traffic saved outweighs the recomputed key paths. The
    price is compile time, which grows with ``group`` (every chunk of a group is traced out).
    """
    # The primal is the forward rule minus its residuals, not a plain scan: under ``vmap`` JAX batches the two
    # separately, and a differently nested scan put the batch axes of the outputs in a different order, so that inside
    # a scan over layers the differentiated outputs came back transposed over (batch, head) when ``group > 1``.
    return _dual_scan_fwd(net, group, carry, xs)[0]


def _dual_scan_fwd(net, group, carry, xs):
    def group_step(c, x_g):
        start, ys_g = c, []
        for i in range(group):
            c, y = dual_chunk(net, c, _at(x_g, i))
            ys_g.append(y)
        return c, (jnp.stack(ys_g), start)

    final, (ys, starts) = jax.lax.scan(group_step, carry, _group(xs, group))
    return (final, _ungroup(ys)), (starts, xs)


def _dual_scan_bwd(net, group, res, g_out):
    starts, xs = res
    g_final, g_ys = g_out

    def group_back(g_c, inp):
        start, x_g, g_y_g = inp
        chunk_starts = [start]
        for i in range(group - 1):
            chunk_starts.append(advance(net, chunk_starts[-1], _at(x_g, i)))
        g_xs = [None] * group
        for i in reversed(range(group)):
            g_c, g_xs[i] = chunk_vjp(net, chunk_starts[i], _at(x_g, i), g_c, g_y_g[i])
        return g_c, jax.tree.map(lambda *a: jnp.stack(a), *g_xs)

    g_carry, g_xs = jax.lax.scan(group_back, g_final, (starts, _group(xs, group), _group(g_ys, group)), reverse=True)
    return g_carry, _ungroup(g_xs)


dual_scan.defvjp(_dual_scan_fwd, _dual_scan_bwd)
