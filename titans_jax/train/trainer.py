"""The trainer: one run, from its configuration to the end-of-run report (docs/architecture.md, "Training loop").

`train` reads top to bottom: settings and data are checked, the checkpoint to resume from is chosen, the train state
is restored or created, the steps are compiled, `Trainer.fit` runs the loop, and the run ends with a validation score
and a sample. What one step of `fit` does::

    state, metrics = trainer.do_step(state, next(train_data), step)  # dispatched: the host goes on at once
    trainer.read_metrics(*previous)   # the step before: one device_get, stops on a non-finite step, logs
    evaluate / save / stop on preemption, each at its cadence, only after this step's metrics were read

Reading the metrics one step late keeps a step queued on the device while the host waits for the previous one.

`dry_run` resolves and compiles the same run without training or writing anything (`--dry-run`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from etils import epath
from jax.sharding import Mesh
from tqdm.auto import tqdm

from titans_jax import diagnostics, distributed, sharding
from titans_jax.checkpoint import Checkpointer, PreemptionWatch
from titans_jax.data import SYNTHETIC_TASKS, eval_batches, get_tokenizer, make_dataset
from titans_jax.train import step as step_lib
from titans_jax.train import workdir as workdir_lib
from titans_jax.train.config import RunConfig, TrainConfig, parse_profile_steps, setup_warnings
from titans_jax.train.metrics import MetricsWriter, StepProfiler, WandbLogger, import_wandb, new_wandb_run_id
from titans_jax.train.optim import make_optimizer
from titans_jax.train.state import ModelFn, abstract_train_state, create_train_state, model_of, param_count, titans_model_fn

log = logging.getLogger("titans_jax.train")

RESUME_MODES = ("auto", "yes", "no")

Batch = Mapping[str, np.ndarray]


class TrainingDiverged(RuntimeError):
    """The loss, gradients or parameters became NaN/inf (and, with train.nonfinite="skip", could not be skipped); no
    state from that step on was saved."""


# ----------------------------------------------------------------------------------------------- the run
def train(cfg: RunConfig, workdir: epath.PathLike, *, resume: str = "auto", model_fn: ModelFn | None = None,
          data: tuple[Any, list[Batch]] | None = None) -> dict[str, Any]:
    """Trains `cfg` in `workdir`, resuming from its latest checkpoint unless `resume="no"`.

    Args:
      cfg: the run configuration (the learning rate is resolved here if None).
      workdir: holds config.json, metrics.jsonl, tb/ and checkpoints/ (see `titans_jax.train.workdir`); a local
        path or a URL such as gs://bucket/run (every file goes through etils.epath).
      resume: "auto" (resume when a checkpoint exists), "yes" (must exist) or "no" (refuse a used workdir).
      model_fn: builds the model (default: TitansLM of cfg.model seeded by cfg.train.seed).
      data: `(train_data, eval_data)` to use instead of `load_data(cfg)`: a resumable iterator of this process's
        batches (`get_state` / `set_state`, as `titans_jax.data.make_dataset`'s) and the validation batches.

    Returns:
      {"step", "status" ("done" | "preempted"), "val_loss", "val_bpb", "sample"}: the last step taken, the last
      validation scores (None when a preempted run had not evaluated yet) and the end-of-run sample (None when
      preempted, disabled or in a multi-process run).

    Raises:
      ValueError / FileNotFoundError: bad settings or data, before training starts.
      TrainingDiverged: a non-finite loss; the checkpoints written before it are kept.
    """
    cfg = cfg.resolved()
    t = cfg.train
    is_main = jax.process_index() == 0
    mesh = sharding.make_mesh(t.mesh or None)
    check_placeholders(cfg)
    tokenizer = get_tokenizer(t.tokenizer)
    check_setup(cfg, mesh, tokenizer)
    if t.wandb_project and is_main:
        import_wandb()  # a missing optional package fails now, not after the data and the compilation
    train_data, eval_data = data or load_data(cfg)  # before a model is built: a missing or empty corpus fails here
    workdir = workdir_lib.path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # Closing waits for a pending save (always of a good state), also when training raised.
    with Checkpointer(workdir_lib.checkpoint_dir(workdir), max_to_keep=t.keep_checkpoints, async_save=True) as ckpt:
        resume_from = resume_step(ckpt, resume, workdir)
        tx, schedule = make_optimizer(t)
        model_fn = model_fn or titans_model_fn(cfg.model, t.seed)
        graphdef, abstract = abstract_train_state(model_fn, tx, mesh)
        check_layout(cfg, mesh, abstract)
        if resume_from is None:
            _, state, _ = create_train_state(model_fn, tx, mesh)
            start = 0
        else:
            state, start = restore(ckpt, resume_from, abstract, cfg, train_data)
        if is_main:
            workdir_lib.write_text(workdir_lib.config_path(workdir), json.dumps(cfg.to_dict(), indent=2))
        # The W&B run follows the checkpoints: a resumed run continues the run its checkpoint was logged to.
        wandb_id = None
        if t.wandb_project and is_main:
            wandb_id = (resume_from is not None and ckpt.read_meta(resume_from).get("wandb_run_id")) or new_wandb_run_id()

        trainer = Trainer.compile(cfg, mesh, ckpt, graphdef, abstract, schedule, step_lib.token_byte_lengths(tokenizer),
                                  wandb_run_id=wandb_id)
        profiler = StepProfiler(workdir_lib.tb_dir(workdir), parse_profile_steps(t.profile_steps), enabled=is_main)
        with Progress(cfg, workdir, start, enabled=is_main, wandb_run_id=wandb_id) as progress, profiler:
            end = trainer.fit(state, train_data, eval_data, start, progress, profiler)
        return end_of_run(trainer, end, eval_data, graphdef, tokenizer, is_main)


class FitEnd(NamedTuple):
    """Where `Trainer.fit` stopped.

    Attributes:
      state: the train state after `step`.
      step: the last step taken (the start step when none was left to take).
      preempted: stopped early by a preemption (see `checkpoint.PreemptionWatch`), after a checkpoint of `step` was
        saved.
      last_eval: {"val_loss", "val_bpb"} of the last evaluation of this run, or None.
    """

    state: Any
    step: int
    preempted: bool
    last_eval: dict[str, float] | None


@dataclasses.dataclass(frozen=True)
class Trainer:
    """The compiled steps of a run and the checkpoints they go to. The train state is not held: every method takes
    it, and `do_step` / `fit` return the new one (the compiled step donates its input buffers).

    Attributes:
      cfg: the resolved run configuration.
      mesh: the device mesh, passed to the model; batches are split over its batch axes.
      ckpt: where `save` writes.
      train_step: `(state, batch) -> (state, {"loss", "grad_norm", "lr", "ok", "skipped", "skipped_total"})`, see
        `step.make_train_step`.
      eval_step: `(state, batch) -> {"nll", "weight", "bytes"}`, see `step.make_eval_step`.
      wandb_run_id: the Weights & Biases run the metrics go to (saved in every checkpoint's meta, so a resumed run
        continues it), or None.
      memory_stats_step: `(state, batch) -> {"memory/layer{l}/...": scalar}`, the memory statistics of
        `titans_jax.diagnostics` on the batch's inputs, run at every log step (`compile_memory_stats_step`); None
        with train.memory_stats off or a model without a memory.
    """

    cfg: RunConfig
    mesh: Mesh
    ckpt: Checkpointer
    train_step: jax.stages.Compiled
    eval_step: jax.stages.Compiled
    wandb_run_id: str | None = None
    memory_stats_step: jax.stages.Compiled | None = None

    @classmethod
    def compile(cls, cfg: RunConfig, mesh: Mesh, ckpt: Checkpointer, graphdef: Any, abstract_state: Any,
                schedule: Any, token_bytes: np.ndarray | None, *, wandb_run_id: str | None = None) -> Trainer:
        """Compiles the train and eval steps ahead of time for the state's and the batch's shardings."""
        t = cfg.train
        t0 = time.perf_counter()
        with_mask = t.data in SYNTHETIC_TASKS
        train_step = step_lib.compile_run_train_step(graphdef, abstract_state, schedule, t, mesh, with_mask=with_mask)
        batch = step_lib.abstract_batch(mesh, t.batch_size, t.seq_len, with_mask)
        eval_step = step_lib.compile_eval_step(
            step_lib.make_eval_step(graphdef, token_bytes, mesh=mesh), abstract_state, batch, mesh)
        stats_step = (compile_memory_stats_step(graphdef, abstract_state, batch, mesh, t.grad_accum)
                      if t.memory_stats else None)
        mem = step_lib.memory_report(train_step)
        log.info("compiled %s steps in %.1f s; train step memory per device: %s",
                 "train and eval" if stats_step is None else "train, eval and memory statistics", time.perf_counter() - t0,
                 "not reported by this backend" if mem is None else
                 ", ".join(f"{k} {step_lib.format_bytes(v)}" for k, v in mem.items()))
        return cls(cfg, mesh, ckpt, train_step, eval_step, wandb_run_id, stats_step)

    def fit(self, state: Any, train_data: Any, eval_data: list[Batch], start: int, progress: Progress,
            profiler: StepProfiler | None = None) -> FitEnd:
        """Steps `start + 1 .. steps`: train, then evaluate and save at their cadence (and at the last step), and
        stop early on preemption with a checkpoint (`checkpoint.PreemptionWatch`: JAX's preemption sync point, or
        SIGTERM). Raises `TrainingDiverged` at a non-finite step that is not skipped, before saving it. `profiler`
        traces the steps it was given (`--profile-steps`)."""
        t = self.cfg.train
        profiler = profiler or StepProfiler("", None)
        last, last_eval = start, None
        pending = None  # (step, metrics) of the step dispatched last, read one step late
        with PreemptionWatch(self.ckpt, every=t.log_every) as watch:
            for step in range(start + 1, t.steps + 1):
                with profiler.step(step):
                    state, metrics = self.do_step(state, next(train_data), step)
                profiler.step_done(step, metrics)
                if pending is not None:
                    progress.train_step(pending[0], self.read_metrics(*pending))
                pending, last = (step, metrics), step
                eval_now = _every(step, t.eval_every) or step == t.steps
                save_now = _every(step, t.checkpoint_every) or step == t.steps
                preempt = watch.reached(step)
                if not (eval_now or save_now or preempt):
                    continue
                progress.train_step(step, self.read_metrics(*pending))  # a checkpoint only follows a step seen finite
                pending = None
                with progress.paused():  # eval and save time is not training throughput
                    if eval_now:
                        last_eval = self.evaluate(state, eval_data)
                        progress.evaluation(step, last_eval)
                    if save_now or preempt:
                        progress.flush()  # metrics up to `step` are on disk before its checkpoint can exist
                        self.save(step, state, train_data)
                if preempt:
                    self.ckpt.wait()
                    log.warning("stopped by %s at step %d after saving a checkpoint", watch.reason, step)
                    return FitEnd(state, step, True, last_eval)
        # The last step always evaluates and saves, so its metrics were read above.
        return FitEnd(state, last, False, last_eval)

    def do_step(self, state: Any, local_batch: Batch, step: int) -> tuple[Any, dict[str, jax.Array]]:
        """Dispatches one update on this process's rows of the batch; returns without waiting for the device. At a
        log step the memory statistics of the batch (`memory_stats_step`) join the metrics."""
        check_batch(local_batch, self.cfg.model.vocab_size, f"training batch of step {step}")
        batch = distributed.global_batch_from_local(local_batch, self.mesh)
        extra = {}
        if self.memory_stats_step is not None and is_log_step(step, self.cfg.train):
            # Dispatched before the update, on the parameters this step's loss is computed with (the update then
            # takes over the state's buffers once this has read them).
            extra = self.memory_stats_step(state, batch)
        state, metrics = self.train_step(state, batch)
        return state, {**metrics, **extra}

    def read_metrics(self, step: int, metrics: Mapping[str, jax.Array]) -> dict[str, float]:
        """Step `step`'s metrics on the host: one transfer for all of them (blocking until the step is done).

        A step whose update was skipped (train.nonfinite="skip") is logged and training goes on.

        Raises:
          TrainingDiverged: when the step was not finite and not skipped (its update was dropped in-graph, see
            `make_train_step`).
        """
        t = self.cfg.train
        vals = {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}
        finite_grads = math.isfinite(vals["loss"]) and math.isfinite(vals["grad_norm"])
        if not vals["ok"]:
            self.ckpt.wait()
            good = self.ckpt.latest_step()
            if t.nonfinite == "skip" and not finite_grads:
                what = (f"loss or gradients, more than train.max_consecutive_nonfinite={t.max_consecutive_nonfinite} "
                        "steps in a row,")
            else:
                what = "loss" if not math.isfinite(vals["loss"]) else "update (parameters overflowed)"
            advice = " Lower train.lr or raise train.warmup, then resume"
            if t.nonfinite == "stop":
                advice += " (or resume with --set train.nonfinite=skip to skip such steps)"
            raise TrainingDiverged(
                f"non-finite training {what} at step {step}: loss={vals['loss']}, grad_norm={vals['grad_norm']}, "
                f"lr={vals['lr']:.3g}. Training stopped without saving this state. Last good checkpoint: "
                + (f"step {good} in {self.ckpt.directory}." if good is not None else "none (no checkpoint yet).")
                + advice + "."
            )
        if vals["skipped"]:
            log.warning("step %d: non-finite loss or gradients (loss=%s, grad_norm=%s): update skipped (%d skipped in "
                        "this run so far)", step, vals["loss"], vals["grad_norm"], int(vals["skipped_total"]))
        return vals

    def evaluate(self, state: Any, eval_data: list[Batch]) -> dict[str, float]:
        """`{"val_loss" (nats per target token), "val_bpb" (bits per byte)}` over the validation batches."""
        outs = [self.eval_step(state, distributed.global_batch_from_local(b, self.mesh)) for b in eval_data]
        outs = jax.device_get(outs)  # one transfer once every batch is dispatched
        tot = {k: sum(float(o[k]) for o in outs) for k in ("nll", "weight", "bytes")}
        return {"val_loss": tot["nll"] / max(tot["weight"], 1.0),
                "val_bpb": tot["nll"] / math.log(2) / max(tot["bytes"], 1.0)}

    def save(self, step: int, state: Any, train_data: Any) -> None:
        """Starts an asynchronous checkpoint of `state` after `step`, with the data position and the config, so a
        resumed run continues with the very next batch."""
        meta = {"step": step, "data": train_data.get_state(), "config": self.cfg.to_dict()}
        if self.wandb_run_id is not None:
            meta["wandb_run_id"] = self.wandb_run_id
        self.ckpt.save(step, state, meta)


def _every(step: int, period: int) -> bool:
    return bool(period) and step % period == 0


def is_log_step(step: int, t: TrainConfig) -> bool:
    """Whether `step` writes a metrics record: every `t.log_every` steps and the last."""
    return _every(step, t.log_every) or step == t.steps


def compile_memory_stats_step(graphdef: Any, abstract_state: Any, abstract_batch: Any, mesh: Mesh,
                              grad_accum: int = 1) -> jax.stages.Compiled | None:
    """`(state, batch) -> {key: scalar}`: `diagnostics.memory_stats_arrays` of the state's model on the batch's
    inputs, compiled ahead of time for the state's and the batch's shardings; None for a model without a memory.

    With `grad_accum` > 1 only the first micro-batch is measured (rows 0, A, 2A, ..., as the train step cuts them):
    a run that accumulates gradients may not hold the whole batch's activations at once."""
    if not diagnostics.has_memory(model_of(graphdef, abstract_state)):
        return None

    def stats_step(state: Any, batch: Batch) -> dict[str, jax.Array]:
        inputs = batch["tokens"][:, :-1]
        if grad_accum > 1:
            inputs = inputs.reshape(inputs.shape[0] // grad_accum, grad_accum, inputs.shape[1])[:, 0]
        return diagnostics.memory_stats_arrays(model_of(graphdef, state), inputs, mesh=mesh)

    return step_lib.compile_eval_step(stats_step, abstract_state, abstract_batch, mesh)


class Progress(contextlib.AbstractContextManager):
    """What the host shows and writes while training, on process 0 only (`enabled`): metrics.jsonl and TensorBoard
    (`MetricsWriter`, cut back to `start` first), Weights & Biases when `train.wandb_project` is set (the run
    `wandb_run_id`), the tqdm bar, and the throughput clock."""

    def __init__(self, cfg: RunConfig, workdir: epath.PathLike, start: int, *, enabled: bool,
                 wandb_run_id: str | None = None):
        t = cfg.train
        self._log_every, self._last_step, self._tokens_per_step = t.log_every, t.steps, t.batch_size * t.seq_len
        self._skip = t.nonfinite == "skip"
        wandb = None
        if enabled and t.wandb_project:
            wd = workdir_lib.path(workdir)
            wandb = WandbLogger(t.wandb_project, wandb_run_id or new_wandb_run_id(), name=wd.name,
                                config=cfg.to_dict(), directory=os.fspath(wd) if workdir_lib.is_local(wd) else None)
        self.writer = MetricsWriter(workdir, start, enabled=enabled, wandb=wandb)
        self.bar = tqdm(total=t.steps, initial=start, disable=not enabled, unit="step", dynamic_ncols=True,
                        desc=f"train {cfg.model.variant}")
        self._clock = (start, time.perf_counter())  # (step, time) at the last throughput reading

    def train_step(self, step: int, vals: Mapping[str, float]) -> None:
        """Advances the bar; every `log_every` steps (and at the last) writes loss, lr, gradient norm and tokens/s
        (and with train.nonfinite="skip", `skipped_steps`: the steps skipped so far; and the memory statistics
        `memory/...` the step carries, see `Trainer.do_step`)."""
        self.bar.update(1)
        if step % self._log_every and step != self._last_step:
            return
        memory = {k: v for k, v in vals.items() if k.startswith(diagnostics.PREFIX)}
        now = time.perf_counter()
        tokens_per_s = (step - self._clock[0]) * self._tokens_per_step / max(now - self._clock[1], 1e-9)
        self._clock = (step, now)
        extra = {"skipped_steps": vals["skipped_total"]} if self._skip else {}
        self.writer.write(step, loss=vals["loss"], lr=vals["lr"], grad_norm=vals["grad_norm"], tokens_per_s=tokens_per_s,
                          **extra, **memory)
        self.bar.set_postfix(loss=f"{vals['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}")

    def evaluation(self, step: int, scores: Mapping[str, float]) -> None:
        self.writer.write(step, **scores)
        self.bar.write(f"step {step}: val_loss {scores['val_loss']:.4f}, val_bpb {scores['val_bpb']:.4f}")

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside does not count against tokens/s."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._clock = (self._clock[0], self._clock[1] + time.perf_counter() - t0)

    def flush(self) -> None:
        self.writer.flush()

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()
        self.writer.close()


# ----------------------------------------------------------------------------------------------- start
def is_placeholder(value: str | None) -> bool:
    """Whether a run file left `value` for the command line to fill: `"<...>"`, as in experiments/train_configs/."""
    return isinstance(value, str) and value.startswith("<") and value.endswith(">")


def check_placeholders(cfg: RunConfig) -> None:
    """Refuses a run whose data or tokenizer is still a run file's placeholder (`"<...>"`), naming the flag."""
    for field, flag in (("data", "--data DIR"), ("tokenizer", "--tokenizer PATH")):
        value = getattr(cfg.train, field)
        if is_placeholder(value):
            raise ValueError(f"train.{field} is the run file's placeholder {value!r}: pass {flag}.")


def check_setup(cfg: RunConfig, mesh: Mesh, tokenizer: Any | None) -> None:
    """Refuses, before anything is compiled or trained, settings that would fail or silently mistrain, and warns
    about likely mistakes (`config.setup_warnings`). `tokenizer=None` skips the vocabulary check (`dry_run` without
    a tokenizer)."""
    m, t = cfg.model, cfg.train
    for warning in setup_warnings(cfg):
        log.warning(warning)
    if tokenizer is not None and tokenizer.vocab_size > m.vocab_size:
        raise ValueError(
            f"tokenizer {t.tokenizer!r} has {tokenizer.vocab_size} tokens but model.vocab_size={m.vocab_size}: "
            f"token ids would fall outside the embedding. Set --set model.vocab_size={tokenizer.vocab_size} "
            "(or larger), or use a smaller tokenizer."
        )
    if t.seq_len > m.max_seq_len:
        raise ValueError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}; raise model.max_seq_len.")
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if t.batch_size % shards:
        raise ValueError(
            f"train.batch_size={t.batch_size} is not divisible by the batch-parallel devices data x fsdp = {shards} "
            f"of --mesh {t.mesh or '(all devices on data)'!r}."
        )
    if t.batch_size % jax.process_count():
        raise ValueError(f"train.batch_size={t.batch_size} is not divisible by the {jax.process_count()} processes.")


def check_batch(batch: Batch, vocab_size: int, where: str) -> None:
    """Token ids must index the embedding (a mismatched tokenizer or corpus would otherwise read garbage rows)."""
    tokens = batch["tokens"]
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{where}: token ids span [{lo}, {hi}] but model.vocab_size={vocab_size}.")


def load_data(cfg: RunConfig) -> tuple[Any, list[Batch]]:
    """`(train_data, eval_data)`: the resumable training iterator (its position goes into every checkpoint) and the
    validation batches (the same every evaluation), each holding this process's rows of the global batch."""
    t = cfg.train
    kw = dict(tokenizer=t.tokenizer, process_index=jax.process_index(), process_count=jax.process_count(),
              data_dir=t.data_dir, text_field=t.text_field)
    train_data = make_dataset(t.data, split="train", seq_len=t.seq_len, global_batch_size=t.batch_size, seed=t.seed,
                              context_weight=t.context_weight, **kw)
    eval_data = list(eval_batches(t.data, seq_len=t.seq_len, global_batch_size=t.batch_size,
                                  max_batches=t.eval_batches, **kw))
    for i, b in enumerate(eval_data):
        check_batch(b, cfg.model.vocab_size, f"validation batch {i}")
    return train_data, eval_data


def resume_step(ckpt: Checkpointer, resume: str, workdir: epath.PathLike) -> int | None:
    """The checkpoint step to resume from (None: start afresh), as `resume` asks."""
    if resume not in RESUME_MODES:
        raise ValueError(f"--resume {resume!r}: use one of {RESUME_MODES}")
    latest = ckpt.latest_step()
    if resume == "no" and latest is not None:
        raise ValueError(
            f"{workdir} already holds checkpoints (latest step {latest}) and --resume no was given: "
            "use a fresh --workdir, or resume."
        )
    if resume == "yes" and latest is None:
        raise FileNotFoundError(f"--resume yes: no committed checkpoint in {ckpt.directory}")
    return latest if resume != "no" else None


def restore(ckpt: Checkpointer, step: int, abstract_state: Any, cfg: RunConfig, train_data: Any) -> tuple[Any, int]:
    """`(state, step)` of checkpoint `step`, with `train_data` moved to where that run stood.

    Raises:
      ValueError: when the checkpoint was trained with another model config (changed train settings only warn), or
        holds a train state of another layout.
    """
    meta = ckpt.read_meta(step)  # checked before any array is read
    saved = meta.get("config", {})
    diff = _config_diff(saved.get("model", {}), dataclasses.asdict(cfg.model))
    if diff:
        raise ValueError(
            f"the checkpoint was trained with another model config {{field: (saved, now)}} = {diff}. "
            "Resume with the same model (omit --config to reuse the workdir's config.json), or use a fresh --workdir."
        )
    # A field added since the checkpoint was written counts as its default there (no warning for what did not exist).
    saved_train = {**dataclasses.asdict(TrainConfig()), **saved.get("train", {})}
    tdiff = _config_diff(saved_train, dataclasses.asdict(cfg.train))
    if tdiff:
        log.warning("resuming with changed train settings {field: (saved, now)} = %s", tdiff)
    try:
        state, _ = ckpt.restore(step, abstract_state)
    except ValueError as e:
        if "do not match" not in str(e):
            raise
        raise ValueError(
            f"checkpoint {step} in {ckpt.directory} holds a train state of another layout than this version's (e.g. "
            "one written before the optimizer was wrapped in optax.apply_if_finite), so it cannot be resumed; "
            "`python -m titans_jax.export` and `sample` still read its parameters. Use a fresh --workdir "
            f"(orbax: {str(e)[:300]}...)"
        ) from e
    train_data.set_state(meta["data"])
    log.info("resumed from step %d of %s", int(meta["step"]), ckpt.directory)
    return state, int(meta["step"])


def _config_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_layout(cfg: RunConfig, mesh: Mesh, abstract_state: Any) -> dict[str, Any]:
    """Logs the model's size and how much of the train state stays replicated over the model-parallel axes, and
    returns that report (`sharding.replicated_bytes_report`); with `train.max_replicated_fraction` set, refuses a
    layout above it (see `sharding.audit_replication`)."""
    t = cfg.train
    shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
    report = (sharding.audit_replication(shardings, abstract_state, t.max_replicated_fraction)
              if t.max_replicated_fraction is not None else sharding.replicated_bytes_report(shardings, abstract_state))
    log.info("model %s: %.3fM parameters; mesh %s; train state %s per device (%.1f%% of bytes replicated over "
             "model-parallel axes)", cfg.model.variant, param_count(abstract_state) / 1e6, dict(mesh.shape),
             step_lib.format_bytes(report["per_device_bytes"]), 100 * report["replicated_fraction"])
    return report


# ----------------------------------------------------------------------------------------------- dry run
def dry_run(cfg: RunConfig, workdir: epath.PathLike | None = None, *, out: Any = None) -> dict[str, Any]:
    """What `train(cfg, workdir)` would run, without training or writing anything (`--dry-run`): the resolved config,
    the mesh, the parameter count, the train state's bytes per device and the compiled train step's memory estimate
    per device (`compiled.memory_analysis()`), and whether `workdir` would be resumed. Printed to `out` (default
    stdout) on process 0.

    The settings are checked as `train` checks them (a tokenizer that is still a run file's placeholder skips the
    vocabulary check); the data is not opened and no array is allocated: the train state is abstract and the step is
    compiled for it ahead of time, as the trainer compiles it.

    Returns:
      {"config" (the resolved RunConfig as a dict), "mesh" ({axis: size}), "devices", "processes", "params",
      "state_bytes_per_device", "replicated_fraction", "step_memory" ({argument, output, alias, temp,
      generated_code} bytes per device, or None when the backend does not report it), "step_memory_total" (argument
      + output - alias + temp, or None), "tokens_per_step", "resume_step" (the checkpoint a run would resume from,
      or None)}.
    """
    cfg = cfg.resolved()
    t = cfg.train
    mesh = sharding.make_mesh(t.mesh or None)
    tokenizer = None if is_placeholder(t.tokenizer) else get_tokenizer(t.tokenizer)
    check_setup(cfg, mesh, tokenizer)
    tx, schedule = make_optimizer(t)
    graphdef, abstract = abstract_train_state(titans_model_fn(cfg.model, t.seed), tx, mesh)
    layout = check_layout(cfg, mesh, abstract)
    t0 = time.perf_counter()
    compiled = step_lib.compile_run_train_step(graphdef, abstract, schedule, t, mesh, with_mask=t.data in SYNTHETIC_TASKS)
    compile_s = time.perf_counter() - t0
    mem = step_lib.memory_report(compiled)
    resume_from = None
    if workdir is not None and workdir_lib.checkpoint_dir(workdir).exists():
        with Checkpointer(workdir_lib.checkpoint_dir(workdir), read_only=True) as ckpt:
            resume_from = ckpt.latest_step()
    result = {
        "config": cfg.to_dict(), "mesh": dict(mesh.shape), "devices": mesh.devices.size,
        "processes": jax.process_count(), "params": param_count(abstract),
        "state_bytes_per_device": layout["per_device_bytes"], "replicated_fraction": layout["replicated_fraction"],
        "step_memory": mem,
        "step_memory_total": None if mem is None else mem["argument"] + mem["output"] - mem["alias"] + mem["temp"],
        "tokens_per_step": t.batch_size * t.seq_len, "resume_step": resume_from,
    }  # fmt: skip
    if jax.process_index() != 0:
        return result
    fb = step_lib.format_bytes
    device = mesh.devices.flat[0]
    lines = [
        "resolved config:", json.dumps(result["config"], indent=2),
        f"mesh: {result['mesh']} over {result['devices']} {device.platform} device(s) ({device.device_kind}) in "
        f"{result['processes']} process(es)",
        f"parameters: {result['params']:,} ({result['params'] / 1e6:.2f}M, model {cfg.model.variant}"
        + (f", preset {cfg.preset}" if cfg.preset else "") + ")",
        f"train state (parameters + optimizer): {fb(result['state_bytes_per_device'])} per device, "
        f"{100 * result['replicated_fraction']:.1f}% of its bytes replicated over the model-parallel axes",
        f"batch: {t.batch_size} x {t.seq_len} = {result['tokens_per_step']:,} tokens per step"
        + (f" ({t.grad_accum} micro-batches)" if t.grad_accum > 1 else "")
        + f"; {t.steps:,} steps = {t.steps * result['tokens_per_step'] / 1e9:.3g}B tokens; peak lr {t.lr:g}, "
        f"{t.warmup} warm-up steps, cosine to {t.min_lr_ratio:g} x peak",
    ]  # fmt: skip
    if mem is None:
        lines.append(f"train step compiled in {compile_s:.1f} s; its memory is not reported by this backend")
    else:
        lines.append(f"train step compiled in {compile_s:.1f} s; memory per device (compiled.memory_analysis()): "
                     + ", ".join(f"{k} {fb(v)}" for k, v in mem.items())
                     + f"; total about {fb(result['step_memory_total'])} (argument + output - alias + temp)")
    lines.append(f"data: {t.data}; tokenizer: {t.tokenizer} (not opened by --dry-run)")
    if is_placeholder(t.data) or is_placeholder(t.tokenizer):
        lines.append("  a run needs --data and --tokenizer (the run file leaves them to the command line)")
    if workdir is not None:
        what = "a run would start afresh" if resume_from is None else f"a run would resume from step {resume_from}"
        lines.append(f"workdir {workdir_lib.path(workdir)}: {what}")
    lines.append("dry run: nothing was trained or written.")
    print("\n".join(lines), file=out or sys.stdout, flush=True)
    return result


# ----------------------------------------------------------------------------------------------- end
def end_of_run(trainer: Trainer, end: FitEnd, eval_data: list[Batch], graphdef: Any, tokenizer: Any,
               is_main: bool) -> dict[str, Any]:
    """The result of `train`. A finished run also reports its final validation score (evaluated now when this run
    took no step: a finished run started again writes nothing) and a sample."""
    result = {"step": end.step, "status": "preempted" if end.preempted else "done", "val_loss": None, "val_bpb": None,
              "sample": None}
    if end.preempted:
        result.update(end.last_eval or {})
        return result
    result.update(end.last_eval or trainer.evaluate(end.state, eval_data))
    result["sample"] = _sample(trainer.cfg, graphdef, end.state, tokenizer)
    if is_main:
        print(f"final validation at step {end.step}: loss {result['val_loss']:.4f} nats/token, "
              f"{result['val_bpb']:.4f} bits per byte", flush=True)
        if result["sample"] is not None:
            print(f"sample:\n{result['sample']}", flush=True)
    return result


def _sample(cfg: RunConfig, graphdef: Any, state: Any, tokenizer: Any) -> str | None:
    t = cfg.train
    if not t.sample_tokens:
        return None
    if jax.process_count() > 1:
        log.info("no end-of-run sample in a multi-process run; use python -m titans_jax.sample --workdir ...")
        return None
    from titans_jax.generate import generate

    prompt = tokenizer.encode(t.sample_prompt) or tokenizer.encode("\n")
    out = generate(model_of(graphdef, state), np.asarray([prompt], np.int32), t.sample_tokens, rng=jax.random.key(t.seed))
    return tokenizer.decode(np.asarray(out)[0].tolist())
