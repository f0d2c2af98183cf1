"""TitansLM: embed -> scanned blocks -> RMSNorm -> logits, with a streaming ``step`` for decoding.

The blocks are created stacked (``nnx.vmap``: every parameter gets a leading "layers" axis) and run with ``jax.lax.scan``,
so compile time does not grow with depth. Sharding is explicit: ``model(tokens, mesh=mesh)`` constrains the residual
stream between blocks and the q/k/v inputs of attention and memory to the logical rules on ``mesh`` and runs the memory
under ``shard_map`` there; without a mesh nothing is constrained (``docs/architecture.md``, "Architectures").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from titans_jax.configs import MEMORY_VARIANTS, ModelConfig
from titans_jax.nn.blocks import Block
from titans_jax.nn.layers import RMSNorm, compute_dtype, param
from titans_jax.sharding import with_logical_constraint

# Logical axes of the residual stream between blocks (titans_jax.sharding.LOGICAL_AXIS_RULES).
RESIDUAL_AXES = ("batch", "seq", "act_embed")


class TitansLM(nnx.Module):
    """A Titans (or baseline) language model.

    ``TitansLM(config, rngs=nnx.Rngs(seed))``; ``model(tokens_BxT) -> logits_BxTxV`` (float32). Stateful use:
    ``logits, state = model(tokens, return_state=True)`` then ``model(more_tokens, state=state)`` continues the
    sequence (memory, caches and all); ``state = model.init_state(B)`` and ``logits, state = model.step(tokens_Bxn,
    state)`` is the compiled form for decoding (any n >= 1). Every form gives the parallel call's logits.

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

    def _inputs(self, tokens, embeddings):
        """The block stack's input ``[B, T, D]``: embedded token ids, or the caller's embeddings (exactly one)."""
        if (tokens is None) == (embeddings is None):
            raise ValueError("pass exactly one of tokens (int [batch, time]) and embeddings (float [batch, time, dim])")
        if tokens is not None:
            self._check_tokens(tokens)
            return self.embed[...][tokens].astype(jnp.dtype(self.config.dtype))
        if embeddings.ndim != 3 or embeddings.shape[-1] != self.config.dim:
            raise ValueError(f"embeddings must be [batch, time, dim={self.config.dim}], got shape {embeddings.shape}")
        return embeddings.astype(jnp.dtype(self.config.dtype))

    def _logits(self, x):
        x = self.final_norm(x)
        return (x @ self.unembed[...].astype(x.dtype)).astype(compute_dtype(x.dtype))

    def __call__(self, tokens_BxT: jax.Array | None = None, *, state=None, embeddings: jax.Array | None = None,
                 return_state: bool = False, mesh: jax.sharding.Mesh | None = None):
        """Logits ``[B, T, V]`` of every position (float32; float64 for a float64 model), each from the inputs up to it.

        Args:
          tokens_BxT: int token ids; or pass ``embeddings`` instead.
          state: a decoding state (``init_state``, ``step`` or an earlier call's) to continue from: the sequence goes on
            after the tokens the state has seen, through the parallel path (chunked memory, whole MAC segments, blocked
            attention reading the caches). Consecutive calls carrying the state equal one call on the whole sequence,
            for pieces of any length.
          embeddings: ``[B, T, dim]`` inputs in place of the token embedding (patches, time series, other modalities).
          return_state: also return the state after the last position (implied by ``state``); from a fresh state.
          mesh: constrain activations to the logical rules on it and run the memory under ``shard_map`` there (the
            trainer passes its mesh); None constrains nothing and runs the memory as a plain ``vmap``.

        Returns:
          ``logits``, or ``(logits, state)`` with a state or ``return_state``.
        """
        x = with_logical_constraint(self._inputs(tokens_BxT, embeddings), RESIDUAL_AXES, mesh)
        graphdef, params = nnx.split(self.blocks)
        if state is None and return_state:
            state = self.init_state(x.shape[0])
        if state is not None:
            _check_resumable(x, state, "tokens" if embeddings is None else "embeddings")
            def resume(h, xs):
                p, st = xs
                h, st = nnx.merge(graphdef, p)(h, state=st, mesh=mesh)
                return with_logical_constraint(h, RESIDUAL_AXES, mesh), st

            x, state = jax.lax.scan(resume, x, (params, state))
            return self._logits(x), state

        def body(h, layer_params):
            h = nnx.merge(graphdef, layer_params)(h, mesh=mesh)
            return with_logical_constraint(h, RESIDUAL_AXES, mesh), None

        if self.config.remat:
            body = jax.checkpoint(body)
        x, _ = jax.lax.scan(body, x, params)
        return self._logits(x)

    def forward_with_memory_stats(self, tokens_BxT: jax.Array | None = None, *, embeddings: jax.Array | None = None,
                                  mesh: jax.sharding.Mesh | None = None):
        """The parallel forward (``self(tokens)``) and the statistics of every layer's memory on what it reads:
        ``(logits, ScanStats)`` with ``[layers]`` fields (``titans_jax.memory.stats``; MAC's pooled over its
        segments). Forward only, for logging (``titans_jax.diagnostics.memory_stats``). Raises ``ValueError`` for a
        variant without a memory (transformer, swa)."""
        if self.config.variant not in MEMORY_VARIANTS:
            raise ValueError(f"model.variant={self.config.variant!r} has no memory to report on; memory statistics "
                             f"exist for {MEMORY_VARIANTS}")
        x = with_logical_constraint(self._inputs(tokens_BxT, embeddings), RESIDUAL_AXES, mesh)
        graphdef, params = nnx.split(self.blocks)

        def body(h, layer_params):
            block = nnx.merge(graphdef, layer_params)
            y, stats = block.mixer.call_with_memory_stats(block.mixer_norm(h), h, mesh=mesh)
            h = block._mlp(h + y.astype(h.dtype))  # the rest of Block.__call__
            return with_logical_constraint(h, RESIDUAL_AXES, mesh), stats

        x, stats = jax.lax.scan(body, x, params)
        return self._logits(x), stats

    # ------------------------------------------------------------------------------------------------------ streaming
    def init_state(self, batch_size: int):
        """The decoding state at the start of a sequence: the mixer's state of every layer (a ``NamedTuple`` of
        ``titans_jax.nn.mixers``, stacked on a leading layers axis): memory streams, KV caches, MAC's segment state."""
        graphdef, state = nnx.split(self.blocks)
        return jax.vmap(lambda s: nnx.merge(graphdef, s).init_state(batch_size))(state)

    def step(self, tokens_Bxn: jax.Array | None, state, *, embeddings: jax.Array | None = None):
        """Feed ``n >= 1`` tokens (or embeddings ``[B, n, dim]``); returns their logits ``[B, n, V]`` and the new state.

        Compiled once per model structure and input shape (a jitted function keyed by the graph definition), so calling
        it in a Python loop costs one dispatch per call, eagerly and inside an outer ``jax.jit`` alike. One token goes
        through every layer's per-token update; more go through the parallel path from the state (``__call__`` with
        ``state``): a prefill costs about what the parallel forward does.
        """
        graphdef, params = nnx.split(self)
        return _step(graphdef, params, tokens_Bxn, state, embeddings)

    def _step_tokens(self, x_BxnxD, state):
        """The per-token path: a scan over the n positions, each through every layer's ``step``."""
        graphdef, params = nnx.split(self.blocks)

        def one_position(layer_states, x_Bx1xD):
            def layer(h, xs):
                p, st = xs
                h, st = nnx.merge(graphdef, p).step(h, st)
                return h, st

            x, layer_states = jax.lax.scan(layer, x_Bx1xD, (params, layer_states))
            return layer_states, self._logits(x)[:, 0]

        state, logits = jax.lax.scan(one_position, state, x_BxnxD.swapaxes(0, 1)[:, :, None])
        return logits.swapaxes(0, 1), state


def _check_resumable(x_BxTxD, state, what: str) -> None:
    """A stateful call needs at least one position and the state's batch size (leaves of rank >= 4 are ``[layers, B,
    ...]``: weights, caches, conv tails, query sums)."""
    if x_BxTxD.shape[1] < 1:
        raise ValueError(f"{what} must hold at least one position (time >= 1) to continue from a state")
    batches = {leaf.shape[1] for leaf in jax.tree.leaves(state) if leaf.ndim >= 4}
    if batches and batches != {x_BxTxD.shape[0]}:
        raise ValueError(f"the state was built for batch size {sorted(batches)[0]} but {what} have batch size "
                         f"{x_BxTxD.shape[0]}; build the state with model.init_state({x_BxTxD.shape[0]})")


@functools.partial(jax.jit, static_argnums=(0,))
def _step(graphdef, params, tokens, state, embeddings):
    model = nnx.merge(graphdef, params)
    x = model._inputs(tokens, embeddings)
    _check_resumable(x, state, "tokens" if embeddings is None else "embeddings")
    if x.shape[1] == 1:
        return model._step_tokens(x, state)
    return model(embeddings=x, state=state)


def count_params(config: ModelConfig) -> int:
    """Parameter count without allocating (``nnx.eval_shape``)."""
    abstract = nnx.eval_shape(lambda: TitansLM(config, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
