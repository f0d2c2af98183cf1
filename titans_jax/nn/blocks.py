"""One layer of every architecture, Llama style (paper Sec. 4; the revision's macro block): pre-RMSNorm token mixer +
residual, pre-RMSNorm SwiGLU + residual. The mixer (``titans_jax.nn.mixers``) is chosen once from the variant; the block
itself is the same for all.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from flax import nnx

from titans_jax.configs import ModelConfig
from titans_jax.nn.layers import RMSNorm, SwiGLU
from titans_jax.nn.mixers import make_mixer


class Block(nnx.Module):
    """``x + mixer(RMSNorm(x))``, then ``+ SwiGLU(RMSNorm(.))``; a parallel ``__call__`` and a streaming ``step``.

    Parameters: ``mixer_norm``, ``mixer`` (one of ``titans_jax.nn.mixers.MIXERS``), ``mlp_norm``, ``mlp``.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.mixer_norm = RMSNorm(cfg.dim)
        self.mlp_norm = RMSNorm(cfg.dim)
        # The MLP draws its initial values before the mixer, as it did when the block built every variant itself, so a
        # seed gives the same initial parameters as before the mixers were split out.
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_hidden, rngs)
        self.mixer = make_mixer(cfg, rngs)

    def _mlp(self, x):
        return x + self.mlp(self.mlp_norm(x)).astype(x.dtype)

    def __call__(self, x_BxTxD: jax.Array, *, state: NamedTuple | None = None, mesh=None):
        """The parallel form. ``state``: the mixer's state to continue from; then returns ``(y, state)`` (the state after
        the last token), else ``y``. ``mesh``: passed to the mixer (sharding constraints on q/k/v, the memory under
        ``shard_map``); None: none."""
        if state is not None:
            y, state = self.mixer(self.mixer_norm(x_BxTxD), x_BxTxD, state=state, mesh=mesh)
            return self._mlp(x_BxTxD + y.astype(x_BxTxD.dtype)), state
        y = self.mixer(self.mixer_norm(x_BxTxD), x_BxTxD, mesh=mesh)
        return self._mlp(x_BxTxD + y.astype(x_BxTxD.dtype))

    def init_state(self, batch: int) -> NamedTuple:
        """The mixer's streaming state at the start of a sequence (the memory has already read the persistent tokens)."""
        return self.mixer.init_state(batch)

    def step(self, x_Bx1xD: jax.Array, state: NamedTuple) -> tuple[jax.Array, NamedTuple]:
        """One token. Returns the block output and the new state."""
        y, state = self.mixer.step(self.mixer_norm(x_Bx1xD), x_Bx1xD, state)
        return self._mlp(x_Bx1xD + y.astype(x_Bx1xD.dtype)), state
