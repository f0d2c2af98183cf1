"""Pure train and eval steps over the `nnx.split` train state, and their jitted, sharded, ahead-of-time compiled form.

A batch is `{"tokens": int32[B, T + 1]}` (inputs `tokens[:, :-1]`, targets `tokens[:, 1:]`) with an optional
`"mask": float32[B, T]` weighting the targets (synthetic tasks score only the answer tokens).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from titans_jax import sharding

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


def _inputs_targets_mask(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    tokens = batch["tokens"]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = batch.get("mask")
    mask = jnp.ones(targets.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    return inputs, targets, mask


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood in float32 (logits may be bfloat16)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def _select_finite(ok: jax.Array, new: Any, old_leaves: list[jax.Array]) -> Any:
    """`new` where `ok`, else the `old_leaves` (taken before the step), leaf by leaf."""

    def pick(n: jax.Array, o: jax.Array) -> jax.Array:
        if jax.dtypes.issubdtype(n.dtype, jax.dtypes.prng_key):
            return n
        return jnp.where(ok, n, o)

    leaves, treedef = jax.tree.flatten(new)
    return treedef.unflatten([pick(n, o) for n, o in zip(leaves, old_leaves, strict=True)])


def _skipped_so_far(opt: nnx.Optimizer) -> jax.Array:
    """Updates `optax.apply_if_finite` has counted as non-finite so far (0 for an optimizer without it)."""
    total = getattr(opt.opt_state, "total_notfinite", None)
    return jnp.zeros((), jnp.int32) if total is None else total[...]


def make_train_step(
    graphdef: nnx.GraphDef, schedule: optax.Schedule, grad_accum: int = 1, mesh: Mesh | None = None,
    skip_nonfinite: bool = False,
) -> Callable[[Any, Batch], tuple[Any, Metrics]]:
    """The pure step `(state, batch) -> (state, {"loss", "grad_norm", "lr", "ok", "skipped", "skipped_total"})`.

    `mesh` is passed to the model (`model(tokens, mesh=mesh)`): with it the memory runs under `shard_map` and the
    activations get their logical sharding constraints; None (one device, or a plain `jax.jit`) uses neither, and
    nothing depends on a mesh set elsewhere (`jax.set_mesh`).

    loss: mean next-token cross-entropy over the (masked) targets of the whole batch, in float32.
    grad_norm: global norm of the gradient before clipping. lr: the learning rate this update used (the schedule at
    the count of updates applied so far: skipped steps do not advance it).
    ok: whether the run may go on. Without `skip_nonfinite`: the update was applied, loss, gradient norm and
    updated parameters all finite. With it (the optimizer wrapped in `optax.apply_if_finite`, see
    `optim.make_optimizer`): the parameters after the step are finite, so a step whose non-finite gradients were
    skipped is ok, and one the wrapper let through (too many in a row) or that overflowed the parameters is not.
    skipped: 1 when the wrapper skipped this step's update (non-finite gradients), else 0.
    skipped_total: steps skipped so far in the run (the wrapper's `total_notfinite`, saved with the state).

    With `grad_accum` > 1 the batch is cut into that many micro-batches (rows i, i + A, i + 2A, ... form micro-batch
    i, so each keeps an even share of every device's rows) whose gradients are summed in a `lax.scan`; each micro
    loss is divided by the whole batch's target count, so the sum is exactly the full-batch mean.

    When not `ok` the returned state equals the input state (the update is dropped in-graph, since the input
    buffers are donated), and the caller stops.

    `skip_nonfinite` only changes `ok`: skipping itself is the optimizer's (apply_if_finite's count limit decides).
    """

    def train_step(state: Any, batch: Batch) -> tuple[Any, Metrics]:
        # The arrays, not the Variables: nnx.merge reuses the state's Variables, which the update then overwrites.
        old_leaves = jax.tree.leaves(state)
        model, opt = nnx.merge(graphdef, state)
        model_def, params, rest = nnx.split(model, nnx.Param, ...)
        inputs, targets, mask = _inputs_targets_mask(batch)
        denom = jnp.maximum(mask.sum(), 1.0)

        def loss_fn(p: Any, x: jax.Array, y: jax.Array, m: jax.Array) -> jax.Array:
            logits = nnx.merge(model_def, p, rest)(x, mesh=mesh)
            return (token_nll(logits, y) * m).sum() / denom

        grad_fn = jax.value_and_grad(loss_fn)
        if grad_accum == 1:
            loss, grads = grad_fn(params, inputs, targets, mask)
        else:

            def micro(a: jax.Array) -> jax.Array:  # [B, ...] -> [A, B / A, ...]
                return jnp.swapaxes(a.reshape(a.shape[0] // grad_accum, grad_accum, *a.shape[1:]), 0, 1)

            def body(carry: tuple[jax.Array, Any], xs: tuple[jax.Array, ...]) -> tuple[tuple[jax.Array, Any], None]:
                loss_i, grads_i = grad_fn(params, *xs)
                return (carry[0] + loss_i, jax.tree.map(jnp.add, carry[1], grads_i)), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            xs = tuple(map(micro, (inputs, targets, mask)))
            (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), xs)
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

        grad_norm = optax.tree.norm(grads)
        skipped_before = _skipped_so_far(opt)
        lr = schedule(opt.step[...].astype(jnp.int32) - skipped_before)
        opt.update(model, grads)
        _, new_state = nnx.split((model, opt))
        # Finite loss and gradients can still overflow the parameters (a huge learning rate): check those too.
        new_params = jax.tree.leaves(nnx.state(model, nnx.Param))
        params_ok = jnp.all(jnp.stack([jnp.isfinite(p).all() for p in new_params]))
        ok = params_ok if skip_nonfinite else jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_ok
        skipped_total = _skipped_so_far(opt)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": jnp.asarray(lr, jnp.float32), "ok": ok,
                   "skipped": (ok & (skipped_total > skipped_before)).astype(jnp.int32), "skipped_total": skipped_total}
        return _select_finite(ok, new_state, old_leaves), metrics

    return train_step


def token_byte_lengths(tokenizer: Any) -> np.ndarray | None:
    """UTF-8 bytes of each token id (the `token_bytes` of `make_eval_step`), or None for the byte tokenizer (one
    byte per token): each tokenizer of `titans_jax.data.tokenizers` knows its own pieces."""
    return tokenizer.token_byte_lengths()


def make_eval_step(
    graphdef: nnx.GraphDef, token_bytes: np.ndarray | None = None, mesh: Mesh | None = None
) -> Callable[[Any, Batch], Metrics]:
    """The pure eval step `(state, batch) -> {"nll", "weight", "bytes"}`: sums over the batch (float32), so batches
    combine exactly. `token_bytes[v]` is the UTF-8 length of token v (None: one byte per token, the byte tokenizer);
    bits per byte = nll / ln 2 / bytes. `mesh`: as in `make_train_step`."""
    table = None if token_bytes is None else jnp.asarray(token_bytes, jnp.float32)

    def eval_step(state: Any, batch: Batch) -> Metrics:
        model = nnx.merge(graphdef, state)[0]
        inputs, targets, mask = _inputs_targets_mask(batch)
        nll = (token_nll(model(inputs, mesh=mesh), targets) * mask).sum()
        nbytes = mask.sum() if table is None else (table[targets] * mask).sum()
        return {"nll": nll, "weight": mask.sum(), "bytes": nbytes}

    return eval_step


# ----------------------------------------------------------------------------------------------- jit / AOT
def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Inputs are split over the batch axis on ("data", "fsdp"), as LOGICAL_AXIS_RULES maps "batch"."""
    return NamedSharding(mesh, sharding.batch_spec())


def abstract_batch(mesh: Mesh, batch_size: int, seq_len: int, with_mask: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch as sharded ShapeDtypeStructs, for lowering."""
    s = batch_sharding(mesh)
    out = {"tokens": jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32, sharding=s)}
    if with_mask:
        out["mask"] = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32, sharding=s)
    return out


def _shardings_of(abstract: Any) -> Any:
    return jax.tree.map(lambda a: a.sharding, abstract)


def compile_run_train_step(graphdef: nnx.GraphDef, abstract_state: Any, schedule: optax.Schedule, train_cfg: Any,
                           mesh: Mesh, *, with_mask: bool = False) -> jax.stages.Compiled:
    """The train step ``python -m titans_jax.train`` runs for ``train_cfg`` (a ``TrainConfig``: batch shape, gradient
    accumulation) on ``mesh``, compiled ahead of time. The trainer and ``experiments/bench_model.py`` both build it
    here, so the benchmark times the step a run takes."""
    batch = abstract_batch(mesh, train_cfg.batch_size, train_cfg.seq_len, with_mask)
    step = make_train_step(graphdef, schedule, train_cfg.grad_accum, mesh=mesh,
                           skip_nonfinite=train_cfg.nonfinite == "skip")
    return compile_train_step(step, abstract_state, batch, mesh)


def compile_train_step(fn: Callable, abstract_state: Any, abstract_batch_: Any, mesh: Mesh) -> jax.stages.Compiled:
    """Lowers and compiles the train step once, ahead of time: state donated, shardings fixed by the mesh."""
    replicated = NamedSharding(mesh, PartitionSpec())
    state_sh = _shardings_of(abstract_state)
    jitted = jax.jit(
        fn,
        in_shardings=(state_sh, _shardings_of(abstract_batch_)),
        out_shardings=(state_sh, replicated),
        donate_argnums=0,
    )
    return jitted.lower(abstract_state, abstract_batch_).compile()


def compile_eval_step(fn: Callable, abstract_state: Any, abstract_batch_: Any, mesh: Mesh) -> jax.stages.Compiled:
    """Lowers and compiles the eval step once (the state is read, not donated)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(
        fn, in_shardings=(_shardings_of(abstract_state), _shardings_of(abstract_batch_)), out_shardings=replicated
    )
    return jitted.lower(abstract_state, abstract_batch_).compile()


def memory_report(compiled: jax.stages.Compiled) -> dict[str, int] | None:
    """Bytes per device the compiled program needs (argument, output, temp, generated code), or None when the
    backend does not report them."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, jax.errors.JaxRuntimeError):
        return None
    if stats is None:
        return None
    names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
             "generated_code_size_in_bytes")
    return {n.removesuffix("_size_in_bytes"): int(getattr(stats, n, 0) or 0) for n in names}


def format_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = min(int(math.log(max(n, 1), 1024)), len(units) - 1)
    return f"{n / 1024**i:.2f} {units[i]}"
