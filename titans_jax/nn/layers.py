"""Small building blocks: annotated parameters, RMSNorm, dense maps, SwiGLU, causal depthwise conv, RoPE."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

# Logical axes of the q/k/v activations of attention and memory (titans_jax.sharding.LOGICAL_AXIS_RULES).
QKV_AXES = ("batch", "seq", "act_heads", "head_dim")


def named(scope: str):
    """Run a method under ``jax.named_scope(scope)``, so profiler traces (``--profile-steps``) and HLO dumps say which
    part of a block an op belongs to: memory, attention or mlp."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with jax.named_scope(scope):
                return fn(*args, **kwargs)
        return inner
    return wrap


def param(rngs: nnx.Rngs | None, shape, names, init="normal", scale=None, value=None) -> nnx.Param:
    """A float32 parameter tagged with logical axis names (``titans_jax.sharding.LOGICAL_AXIS_RULES``)."""
    if value is None:
        if init == "normal":
            std = scale if scale is not None else 1.0 / math.sqrt(shape[0])
            value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
        elif init == "zeros":
            value = jnp.zeros(shape, jnp.float32)
        elif init == "ones":
            value = jnp.ones(shape, jnp.float32)
        else:
            raise ValueError(f"unknown init {init!r}")
    # The names are metadata only: the trainer shards from them, so building never needs a mesh.
    with nnx.use_eager_sharding(False):
        return nnx.Param(value, out_sharding=tuple(names))


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype small reductions and nonlinearities run in: float32 for float32 and bfloat16 activations, the
    activation dtype when it is wider (a float64 check stays float64 end to end, as the memory core does)."""
    return jnp.promote_types(jnp.float32, dtype)


def along_last(v, ndim: int):
    """Reshape a vector to broadcast along the last axis of a rank-``ndim`` array (tests forbid implicit rank promotion)."""
    return v.reshape((1,) * (ndim - 1) + (-1,))


RMS_EPS = 1e-6


def rms_norm(x, scale, eps: float = RMS_EPS):
    """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis, computed and returned in float32 (or wider inputs'
    dtype: ``compute_dtype``).

    The one RMSNorm of the package: the ``RMSNorm`` module, MAG's and MAC's output gates and the memory layer's per-head
    output norm all call it. ``scale`` matches the trailing axes of ``x`` (``[D]``, or ``[H, dh]`` for a per-head norm
    with one gain per channel). Callers cast the result where they need to.
    """
    x32 = x.astype(compute_dtype(x.dtype))
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y * scale.reshape((1,) * (y.ndim - scale.ndim) + scale.shape)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned gain (:func:`rms_norm`); returns the input's dtype."""

    def __init__(self, dim: int, *, eps: float = RMS_EPS):
        self.scale = param(None, (dim,), ("norm",), value=jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        return rms_norm(x, self.scale[...], self.eps).astype(x.dtype)


class Dense(nnx.Module):
    """``x @ W`` (no bias unless asked), computed in the activation dtype."""

    def __init__(self, d_in, d_out, names, rngs, *, bias=False, scale=None, bias_init=None):
        self.kernel = param(rngs, (d_in, d_out), names, scale=scale)
        value = jnp.full((d_out,), 0.0 if bias_init is None else bias_init, jnp.float32)
        self.bias = param(None, (d_out,), (names[1],), value=value) if bias else None

    def __call__(self, x):
        y = x @ self.kernel[...].astype(x.dtype)
        if self.bias is not None:
            y = y + along_last(self.bias[...].astype(x.dtype), y.ndim)
        return y


class SwiGLU(nnx.Module):
    """Llama MLP: ``W_down(silu(x W_gate) * (x W_up))``."""

    def __init__(self, dim, hidden, rngs):
        self.gate = Dense(dim, hidden, ("embed", "mlp"), rngs)
        self.up = Dense(dim, hidden, ("embed", "mlp"), rngs)
        self.down = Dense(hidden, dim, ("mlp", "embed"), rngs)

    @named("mlp")
    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class CausalConv(nnx.Module):
    """Depthwise causal convolution along time, ``y_t = sum_j w_j x_{t-j}``. Starts as the identity (w_0 = 1) so the
    q/k/v paths are plain projections at initialisation."""

    def __init__(self, dim, kernel):
        w = jnp.zeros((kernel, dim), jnp.float32).at[0].set(1.0)
        self.weight = param(None, (kernel, dim), ("conv", "heads"), value=w)
        self.kernel = kernel

    def __call__(self, x_BxTxD, tail_BxKxD=None, length=None):
        """Convolve; ``tail`` holds the K-1 inputs before ``x`` (zeros at the start of a sequence). Returns the outputs
        and the new tail: the K-1 inputs before position ``length`` (default T; a traced count lets a fixed-size buffer
        hold fewer real inputs)."""
        b, t, d = x_BxTxD.shape
        if tail_BxKxD is None:
            tail_BxKxD = jnp.zeros((b, self.kernel - 1, d), x_BxTxD.dtype)
        full = jnp.concatenate([tail_BxKxD.astype(x_BxTxD.dtype), x_BxTxD], axis=1)
        w = self.weight[...].astype(x_BxTxD.dtype)
        y = sum(along_last(w[j], 3) * full[:, self.kernel - 1 - j : self.kernel - 1 - j + t] for j in range(self.kernel))
        if length is None:
            return y, full[:, t:]  # new tail: the last K-1 inputs
        return y, jax.lax.dynamic_slice_in_dim(full, length, self.kernel - 1, axis=1)


def l2_normalize(x, eps=1e-6):
    """``x / sqrt(sum(x^2) + eps)`` over the last axis, computed in ``compute_dtype``, returned in x's dtype."""
    x32 = x.astype(compute_dtype(x.dtype))
    return (x32 * jax.lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def rope(x_BxTxHxD, pos_BxT, theta: float):
    """Rotary embedding (rotate-half form) at integer positions ``pos``."""
    d = x_BxTxHxD.shape[-1]
    dtype = compute_dtype(x_BxTxHxD.dtype)
    freqs = theta ** (-jnp.arange(0, d // 2, dtype=dtype) * 2.0 / d)
    ang = pos_BxT.astype(dtype)[..., None] * along_last(freqs, 3)  # [B, T, D/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    x1, x2 = jnp.split(x_BxTxHxD.astype(dtype), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxTxHxD.dtype)
