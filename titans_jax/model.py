"""TitansLM: embed -> scanned blocks -> RMSNorm -> logits, with a streaming ``step`` for decoding.

The blocks are created stacked (``nnx.vmap``: every parameter gets a leading "layers" axis) and run with ``jax.lax.scan``,
so compile time does not grow with depth. Sharding is explicit: ``model(tokens, mesh=mesh)`` constrains the residual
stream between blocks and the q/k/v inputs of attention and memory to the logical rules on ``mesh`` and runs the memory
under ``shard_map`` there; without a mesh nothing is constrained (``docs/architecture.md``, "Architectures").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from titans_jax.configs import ModelConfig
from titans_jax.nn.blocks import Block
from titans_jax.nn.layers import RMSNorm, compute_dtype, param
from titans_jax.sharding import with_logical_constraint

# Logical axes of the residual stream between blocks (titans_jax.sharding.LOGICAL_AXIS_RULES).
RESIDUAL_AXES = ("batch", "seq", "act_embed")


class TitansLM(nnx.Module):
    """A Titans (or baseline) language model.

    ``TitansLM(config, rngs=nnx.Rngs(seed))``; ``model(tokens_BxT) -> logits_BxTxV`` (float32). Streaming:
    ``state = model.init_state(B)``, then ``logits, state = model.step(tokens_Bxn, state)`` for any n >= 1 gives the
    parallel call's logits for those tokens.

    Parameters (each with a leading layers axis under ``blocks``): ``embed``, ``blocks/{mixer_norm, mixer, mlp_norm,
    mlp}``, ``final_norm``, ``unembed``; ``blocks/mixer/...`` holds the variant's mixer (``titans_jax.nn.mixers``).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None = None):
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError("TitansLM needs rngs=nnx.Rngs(seed): every initial parameter is drawn from it, and there is "
                            f"no default seed (got rngs={rngs!r})")
        self.config = config
        # Sharding is applied by the trainer from the logical names; building never needs a mesh.
        with nnx.use_eager_sharding(False):
            self.embed = param(rngs, (config.vocab_size, config.dim), ("vocab", "embed"), scale=1.0)
            self.final_norm = RMSNorm(config.dim)
            self.unembed = param(rngs, (config.dim, config.vocab_size), ("embed", "vocab"))

            @nnx.split_rngs(splits=config.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_blocks(r):
                return Block(config, r)

            self.blocks = make_blocks(rngs)

    def _check_tokens(self, tokens):
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an int array of shape [batch, time], got {tokens.dtype}{tokens.shape}")

    def _embed(self, tokens):
        return self.embed[...][tokens].astype(jnp.dtype(self.config.dtype))

    def _logits(self, x):
        x = self.final_norm(x)
        return (x @ self.unembed[...].astype(x.dtype)).astype(compute_dtype(x.dtype))

    def __call__(self, tokens_BxT: jax.Array, *, mesh: jax.sharding.Mesh | None = None) -> jax.Array:
        """Logits ``[B, T, V]`` of every position (float32; float64 for a float64 model), each from the tokens up to it.

        ``mesh``: constrain activations to the logical rules on it and run the memory under ``shard_map`` there (the
        trainer passes its mesh); None constrains nothing and runs the memory as a plain ``vmap``.
        """
        self._check_tokens(tokens_BxT)
        x = with_logical_constraint(self._embed(tokens_BxT), RESIDUAL_AXES, mesh)
        graphdef, state = nnx.split(self.blocks)

        def body(h, layer_state):
            h = nnx.merge(graphdef, layer_state)(h, mesh=mesh)
            return with_logical_constraint(h, RESIDUAL_AXES, mesh), None

        if self.config.remat:
            body = jax.checkpoint(body)
        x, _ = jax.lax.scan(body, x, state)
        return self._logits(x)

    # ------------------------------------------------------------------------------------------------------ streaming
    def init_state(self, batch_size: int):
        """The decoding state at the start of a sequence: the mixer's state of every layer (a ``NamedTuple`` of
        ``titans_jax.nn.mixers``, stacked on a leading layers axis): memory streams, KV caches, MAC's segment state."""
        graphdef, state = nnx.split(self.blocks)
        return jax.vmap(lambda s: nnx.merge(graphdef, s).init_state(batch_size))(state)

    def step(self, tokens_Bxn: jax.Array, state):
        """Feed ``n >= 1`` tokens; returns their logits ``[B, n, V]`` and the new state."""
        self._check_tokens(tokens_Bxn)
        graphdef, params = nnx.split(self.blocks)

        def one_token(layer_states, tok_B):
            x = self._embed(tok_B[:, None])

            def layer(h, xs):
                p, st = xs
                h, st = nnx.merge(graphdef, p).step(h, st)
                return h, st

            x, layer_states = jax.lax.scan(layer, x, (params, layer_states))
            return layer_states, self._logits(x)[:, 0]

        state, logits = jax.lax.scan(one_token, state, tokens_Bxn.T)
        return logits.swapaxes(0, 1), state


def count_params(config: ModelConfig) -> int:
    """Parameter count without allocating (``nnx.eval_shape``)."""
    abstract = nnx.eval_shape(lambda: TitansLM(config, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
