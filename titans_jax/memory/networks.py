"""Memory networks: the function M_W whose weights W are the fast weights.

A network is a frozen dataclass with ``init(key) -> params`` and ``apply(params, x) -> y``. ``params`` is a tuple of
matrices ``W_l`` of shape ``[d_in_l, d_out_l]``; a layer computes ``z_l = h_{l-1} @ W_l`` (row convention, so a
per-token gradient is the outer product ``h_{l-1}^T delta_l``).

The chunked memory update (``chunked.py``) needs more than ``apply``: it must see each layer's input and replace a layer's
matmul by the dual-form read. ``forward`` exposes exactly that: a hook ``layer_fn(l, h, W_l) -> z_l``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

Params = tuple[jax.Array, ...]
LayerFn = Callable[[int, jax.Array, jax.Array], jax.Array]

LN_EPS = 1e-5


def _plain_layer(l: int, h: jax.Array, w: jax.Array) -> jax.Array:
    del l
    return h @ w


def _normal_pdf(x: jax.Array) -> jax.Array:
    return jnp.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def gelu_grad(x: jax.Array) -> jax.Array:
    """d/dx of the exact GELU x * Phi(x): Phi(x) + x * phi(x)."""
    return 0.5 * (1.0 + jax.lax.erf(x / math.sqrt(2.0))) + x * _normal_pdf(x)


def gelu_grad2(x: jax.Array) -> jax.Array:
    """d^2/dx^2 of the exact GELU: (2 - x^2) phi(x)."""
    return (2.0 - x * x) * _normal_pdf(x)


def layer_norm(x: jax.Array, eps: float = LN_EPS) -> jax.Array:
    """LayerNorm over the last axis without a learned affine: the fast weights are the matrices alone
    (docs/architecture.md, "Memory networks")."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mean
    var = jnp.mean(xc * xc, axis=-1, keepdims=True)
    return xc * jax.lax.rsqrt(var + eps)


def layer_norm_vjp(z: jax.Array, g: jax.Array, eps: float = LN_EPS) -> jax.Array:
    """``g`` pulled back through :func:`layer_norm` at ``z`` (its Jacobian is symmetric, so this is also the JVP)."""
    mean = jnp.mean(z, axis=-1, keepdims=True)
    zc = z - mean
    inv = jax.lax.rsqrt(jnp.mean(zc * zc, axis=-1, keepdims=True) + eps)
    xhat = zc * inv
    return inv * (g - jnp.mean(g, axis=-1, keepdims=True) - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))


@dataclasses.dataclass(frozen=True)
class MemoryNet:
    """A memory MLP ``M_W: R^dim -> R^dim``.

    depth == 1: ``M_W(x) = x @ W`` (linear memory).
    depth >= 2: ``M_W(x) = x + LN(gelu(... gelu(x @ W_1) ...) @ W_L)`` with hidden width ``expansion * dim``.

    Attributes:
      dim: input and output width (the head dimension when the memory is multi-head).
      depth: number of weight matrices L_M (>= 1).
      expansion: hidden width multiplier for depth >= 2.
      out_init_std: standard deviation of the entries of the initial W_L for depth >= 2 (see ``init``).
    """

    dim: int
    depth: int = 2
    expansion: int = 4
    out_init_std: float = 2.0

    def __post_init__(self):
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"dim must be a positive int, got {self.dim!r}")
        if not isinstance(self.depth, int) or self.depth < 1:
            raise ValueError(f"depth must be an int >= 1 (1 = linear memory), got {self.depth!r}")
        if not isinstance(self.expansion, int) or self.expansion < 1:
            raise ValueError(f"expansion must be a positive int, got {self.expansion!r}")
        if not self.out_init_std > 0:
            raise ValueError(f"out_init_std must be > 0, got {self.out_init_std!r}")

    @property
    def is_linear(self) -> bool:
        return self.depth == 1

    @property
    def layer_shapes(self) -> tuple[tuple[int, int], ...]:
        """``(d_in, d_out)`` of each weight matrix."""
        if self.depth == 1:
            return ((self.dim, self.dim),)
        hidden = self.expansion * self.dim
        widths = [self.dim] + [hidden] * (self.depth - 1) + [self.dim]
        return tuple(zip(widths[:-1], widths[1:], strict=True))

    @property
    def num_params(self) -> int:
        return sum(a * b for a, b in self.layer_shapes)

    def init(self, key: jax.Array, dtype=jnp.float32) -> Params:
        """Initial fast weights W_0 (learned in the outer loop by the layers that own them).

        Linear memory starts at zero (an empty associative memory, as in DeltaNet). Deep memory: W_1 .. W_{L-1} are
        fan-in scaled normals; the LayerNorm'd last matrix W_L has entries of standard deviation ``out_init_std``.

        Why W_L is not fan-in scaled: LN makes ``M_W`` independent of W_L's scale, so the scale changes nothing in the
        forward pass but sets the inner problem's curvature, ``2 / std(W_L)^2`` per token. At fan-in scale that is
        ``2 * hidden`` (256 for the tiny presets), far past heavy-ball stability ``theta * lambda < 2 (1 + eta)``, and
        forgetting (which shrinks W_L) pushes it further: the outer gradient through the recurrence then explodes. At
        std 2 it is 0.5, below the linear memory's 2 for unit keys (``docs/architecture.md``, "Training stability").
        """
        if self.is_linear:
            return (jnp.zeros((self.dim, self.dim), dtype),)
        keys = jax.random.split(key, self.depth)
        stds = [1.0 / math.sqrt(d_in) for d_in, _ in self.layer_shapes[:-1]] + [self.out_init_std]
        return tuple(
            (jax.random.normal(k, shape, jnp.float32) * std).astype(dtype)
            for k, shape, std in zip(keys, self.layer_shapes, stds, strict=True)
        )

    def forward(self, params: Sequence[jax.Array], x: jax.Array, layer_fn: LayerFn = _plain_layer):
        """Run the network on ``x_NxD`` and return ``(y, layer_inputs)``.

        ``layer_fn(l, h, W_l)`` replaces the plain matmul of layer ``l`` (the dual-form read and the gradient taps use it);
        ``layer_inputs[l]`` is the ``h`` that layer ``l`` received.
        """
        h = x
        inputs = []
        for l, w in enumerate(params):
            if l > 0:
                h = jax.nn.gelu(h, approximate=False)
            inputs.append(h)
            h = layer_fn(l, h, w)
        y = h if self.is_linear else x + layer_norm(h)
        return y, inputs

    def output_error(self, z: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """``d/dz sum((M(k) - v)^2)`` at the last layer's pre-activation ``z`` (before the residual and LayerNorm)."""
        if self.is_linear:
            return 2.0 * (z - v)
        return layer_norm_vjp(z, 2.0 * (k + layer_norm(z) - v))

    def key_path_parts(self, params: Sequence[jax.Array], k: jax.Array, v: jax.Array):
        """``(inputs, pre, deltas, backs)`` per layer: the input ``H_l``, the pre-activation ``P_l = H_l W_l``, the
        error ``D_l = d/dP_l sum((M(k) - v)^2)``, derived by hand, and for l < L-1 the back-propagated product
        ``B_l = D_{l+1} W_{l+1}^T`` (so ``D_l = B_l gelu'(P_l)``). The manual VJP of the chunk step needs all four."""
        pre, inputs = [], []
        h = k
        for l, w in enumerate(params):
            if l > 0:
                h = jax.nn.gelu(pre[-1], approximate=False)
            inputs.append(h)
            pre.append(h @ w)
        d = self.output_error(pre[-1], k, v)
        deltas, backs = [d], []
        for l in range(self.depth - 1, 0, -1):
            backs.append(d @ params[l].T)
            d = backs[-1] * gelu_grad(pre[l - 1])
            deltas.append(d)
        return inputs, pre, deltas[::-1], backs[::-1]

    def key_path(self, params: Sequence[jax.Array], k: jax.Array, v: jax.Array):
        """Layer inputs ``H_l`` and errors ``D_l = d/dz_l sum((M(k) - v)^2)`` for every layer, derived by hand.

        Equal to back-propagation (``tests/test_memory_scan.py`` holds it to ``key_path_autodiff``) but written out, so
        that the outer backward pass differentiates a handful of matmuls instead of a nested ``jax.grad``.
        """
        inputs, _, deltas, _ = self.key_path_parts(params, k, v)
        return inputs, deltas

    def apply(self, params: Sequence[jax.Array], x: jax.Array) -> jax.Array:
        """``M_W(x)`` for ``x`` of shape ``[..., dim]``."""
        return self.forward(params, x)[0]


def linear_memory(dim: int) -> MemoryNet:
    """A linear (matrix) memory ``M_W(x) = x @ W`` with ``W`` of shape ``[dim, dim]``."""
    return MemoryNet(dim=dim, depth=1, expansion=1)


def mlp_memory(dim: int, depth: int = 2, expansion: int = 4) -> MemoryNet:
    """The deep memory (paper Sec. 3.1, "Memory architecture"): ``x + LN(W_L gelu(... gelu(W_1 x)))``, hidden width
    ``expansion * dim``."""
    if depth < 2:
        raise ValueError(f"mlp_memory needs depth >= 2 (got {depth}); use linear_memory(dim) for a one-matrix memory")
    return MemoryNet(dim=dim, depth=depth, expansion=expansion)


def associative_loss(net: MemoryNet, params: Sequence[jax.Array], k: jax.Array, v: jax.Array) -> jax.Array:
    """The inner loss of paper Eq. 12 summed over tokens: ``sum_t sum_features (M_W(k_t) - v_t)^2`` (no 1/2)."""
    r = net.apply(params, k) - v
    return jnp.sum(r * r)
