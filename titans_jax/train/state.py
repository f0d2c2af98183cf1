"""The train state: `nnx.split((model, nnx.Optimizer))`, created directly in its sharded layout.

The state is one `nnx.State` keyed 0 (the model's variables) and 1 (the optimizer: step counter and optax state,
whose moments copy the parameters' logical axes and so shard like them). It is what the jitted step takes and
returns, and what a checkpoint holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from titans_jax import sharding
from titans_jax.configs import ModelConfig

ModelFn = Callable[[], nnx.Module]


def titans_model_fn(config: ModelConfig, seed: int) -> ModelFn:
    """A factory of the TitansLM of `config`, initialised from `seed`.

    The import is deferred so that the trainer's modules import without the model (and stay cheap to import).
    """

    def make() -> nnx.Module:
        from titans_jax.model import TitansLM

        return TitansLM(config, rngs=nnx.Rngs(seed))

    return make


def train_init_fn(model_fn: ModelFn, tx: optax.GradientTransformation) -> Callable[[], tuple[nnx.Module, nnx.Optimizer]]:
    """A function building `(model, optimizer)`: the object whose split is the train state."""

    def make() -> tuple[nnx.Module, nnx.Optimizer]:
        model = model_fn()
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    return make


def create_train_state(model_fn: ModelFn, tx: optax.GradientTransformation, mesh: Mesh) -> tuple[nnx.GraphDef, Any, Any]:
    """`(graphdef, state, shardings)` with every leaf created directly in its shard (see `sharding.init_sharded`)."""
    return sharding.init_sharded(train_init_fn(model_fn, tx), mesh)


def abstract_train_state(model_fn: ModelFn, tx: optax.GradientTransformation, mesh: Mesh) -> tuple[nnx.GraphDef, Any]:
    """`(graphdef, state of sharded ShapeDtypeStructs)`: the restore target and the input of ahead-of-time lowering."""
    return sharding.abstract_state(train_init_fn(model_fn, tx), mesh)


def abstract_model(model_fn: ModelFn, mesh: Mesh | None = None) -> tuple[nnx.GraphDef, Any]:
    """`(graphdef, state)` of the model alone, without computing it: leaves are `ShapeDtypeStruct`s, sharded on
    `mesh` as in the train state, or without a sharding when `mesh` is None (a restore into host memory)."""
    if mesh is not None:
        return sharding.abstract_state(model_fn, mesh)
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(model_fn))
    return graphdef, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)


def model_part(model_state: Any) -> nnx.State:
    """A train state holding only `model_state` under the model's key (0): the target that restores a checkpoint's
    model without its optimizer (`Checkpointer.restore_subtree`)."""
    return nnx.State({0: model_state})


def model_of(graphdef: nnx.GraphDef, state: Any) -> nnx.Module:
    """The model of a train state (sharing its arrays)."""
    return nnx.merge(graphdef, state)[0]


def param_count(state: Any) -> int:
    """Number of model parameters (`nnx.Param` elements) in a train state or its abstract version."""
    leaves = jax.tree.leaves(state[0], is_leaf=lambda x: isinstance(x, nnx.Variable))
    return sum(math.prod(v.get_value().shape) for v in leaves if isinstance(v, nnx.Param))
