"""The optimiser: AdamW with weight decay 0.1 and a cosine schedule (paper Sec. 5.1 of v1; the peak learning rates of
the revision's Table 5), with the choices the paper leaves open (docs/architecture.md, "Training loop"): moments
(0.9, 0.95), eps 1e-8, no decay on norms / biases / persistent tokens, linear warm-up, a floor of 10% of the peak,
global-norm clipping at 1.0.

The whole chain is wrapped in `optax.apply_if_finite`, so a step with non-finite gradients can be skipped
(`TrainConfig.nonfinite="skip"`). The wrapper is there in both modes, so the train state has one layout and a run
stopped by a non-finite step ("stop") can be resumed with "skip".

Gradient accumulation is not an optax wrapper: the train step (see `step.py`) sums micro-batch gradients inside one
jitted call, so one optimizer update is one data batch and one metrics line, whatever `grad_accum` is.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from titans_jax.train.config import TrainConfig

__all__ = ["NO_DECAY_KEYWORDS", "TrainConfig", "decay_mask", "make_optimizer", "make_schedule", "max_skipped_in_a_row"]

# A parameter whose path has a component containing one of these is not weight-decayed: norm scales, biases
# (gates' biases included), persistent-memory tokens and the memory's learned initial weights W_0 (docs/architecture.md,
# "Training loop"; W_0: "Training stability", measured by experiments/probe_w0_decay.py). This is the model's naming
# contract.
NO_DECAY_KEYWORDS = ("norm", "bias", "persistent", "memory_init")


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Learning rate of update `count` (0-based): linear warm-up to the peak over `warmup` updates (the first update
    already gets peak / warmup, so none is wasted at 0), then cosine decay to `min_lr_ratio * peak` at `steps`."""
    if cfg.lr is None:
        raise ValueError("TrainConfig.lr is None: resolve it first (RunConfig.resolved())")
    peak, floor = float(cfg.lr), float(cfg.lr) * cfg.min_lr_ratio
    warmup = min(cfg.warmup, cfg.steps)
    decay = max(cfg.steps - warmup, 1)

    def schedule(count: jax.Array) -> jax.Array:
        count = jnp.asarray(count, jnp.float32)
        warm = peak * (count + 1.0) / max(warmup, 1)
        progress = jnp.clip((count - warmup) / decay, 0.0, 1.0)
        cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(count < warmup, warm, cosine)

    return schedule


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def decay_mask(params: Any) -> Any:
    """A tree of bools like `params`: True where weight decay applies (see `NO_DECAY_KEYWORDS`)."""

    def keep(path: tuple, _: Any) -> bool:
        return not any(w in _key_name(k).lower() for k in path for w in NO_DECAY_KEYWORDS)

    return jax.tree_util.tree_map_with_path(keep, params)


def max_skipped_in_a_row(cfg: TrainConfig) -> int:
    """`apply_if_finite`'s `max_consecutive_errors`: non-finite updates in a row that are skipped. 0 with
    nonfinite="stop": the update passes through unchanged and the step's own check stops the run."""
    return cfg.max_consecutive_nonfinite if cfg.nonfinite == "skip" else 0


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`(tx, schedule)`: clipping (when `clip` > 0) then AdamW with the masked weight decay and the schedule, inside
    `optax.apply_if_finite` (whose state's `total_notfinite` counts the skipped steps).

    The schedule is indexed by applied updates: a skipped step does not advance AdamW's count.
    """
    schedule = make_schedule(cfg)
    adamw = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    inner = optax.chain(optax.clip_by_global_norm(cfg.clip), adamw) if cfg.clip else adamw
    return optax.apply_if_finite(inner, max_skipped_in_a_row(cfg)), schedule
