"""Metrics output: JSON lines in `<workdir>/metrics.jsonl` and TensorBoard events in `<workdir>/tb` (process 0 only),
both through `etils.epath`, so a workdir on a cloud bucket works like a local one; optionally the same records to
Weights & Biases (`WandbLogger`, `--wandb PROJECT`); and the run's profiler trace (`StepProfiler`, `--profile-steps`).

A resumed run first cuts both back to the restored step, so its metrics.jsonl reads exactly like an uninterrupted
run's: no step twice, none missing (lines a killed run wrote after its last checkpoint are dropped and then
recomputed).

Local files are appended to and flushed at every record. An object store (`gs://`, `s3://`) cannot append, so there
the records are kept in memory and the whole file is rewritten at every `flush` (the trainer flushes before each
checkpoint, so what a checkpoint covers is always written first) and at most every `UPLOAD_EVERY_S` seconds.
TensorBoard events on an object store go the same way: `tensorboardX`'s writer for that URL scheme is replaced by one
that writes whole event files through `epath` (its own `gs://` writer would need `google-cloud-storage` and bypass
epath).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import jax
from etils import epath

from titans_jax.train.workdir import METRICS_FILE, TB_DIR, is_local, metrics_path, tb_dir, write_text

__all__ = ["METRICS_FILE", "TB_DIR", "UPLOAD_EVERY_S", "MetricsWriter", "StepProfiler", "WandbLogger", "import_wandb",
           "new_wandb_run_id", "read_metrics", "truncate_metrics"]

log = logging.getLogger("titans_jax.train")

# On an object store, the longest a record waits in memory before the file is rewritten (between flushes).
UPLOAD_EVERY_S = 60.0


def read_metrics(path: epath.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (a torn last line, from a killed writer, is skipped)."""
    path = epath.Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _dump(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def truncate_metrics(path: epath.PathLike, last_step: int) -> None:
    """Keeps only the records with step <= last_step (the file is replaced whole, never left half-written)."""
    path = epath.Path(path)
    if not path.exists():
        return
    write_text(path, _dump([r for r in read_metrics(path) if r.get("step", 0) <= last_step]))


def _clean(v: Any) -> Any:
    # JSON has no NaN/inf; write them as strings so the file stays valid JSON.
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class _ObjectRecordWriter:
    """A tensorboardX record writer for an object store: the event file is held in memory and rewritten whole
    through `epath` at every flush (tensorboardX flushes every `flush_secs` and when asked)."""

    def __init__(self, path: str):
        self._path, self._buffer, self._written, self._lock = epath.Path(path), io.BytesIO(), -1, threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            self._buffer.write(data)

    def flush(self) -> None:
        with self._lock:
            if self._buffer.tell() != self._written:
                self._path.write_bytes(self._buffer.getvalue())
                self._written = self._buffer.tell()

    def close(self) -> None:
        self.flush()


class _ObjectRecordWriterFactory:
    """What tensorboardX's `register_writer_factory` expects: `open(path)` and `directory_check(path)`."""

    def open(self, path: str) -> _ObjectRecordWriter:
        return _ObjectRecordWriter(path)

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def _tensorboard(logdir: epath.Path, start_step: int) -> Any:
    """A tensorboardX SummaryWriter on `logdir`, or None when tensorboardX is not installed (it is optional)."""
    try:
        from tensorboardX import SummaryWriter
        from tensorboardX.record_writer import register_writer_factory
    except ImportError:
        return None
    if not is_local(logdir):
        register_writer_factory(str(logdir).split("://")[0], _ObjectRecordWriterFactory())
    # purge_step hides events of a killed run beyond the restored step, like the truncation of metrics.jsonl.
    return SummaryWriter(str(logdir), purge_step=start_step + 1 if start_step else None)


class MetricsWriter:
    """Appends metric records; a no-op on processes other than 0 (`enabled=False`).

    Args:
      workdir: the run directory (local or a URL).
      start_step: the step the run starts from (0 or the restored step): later records are removed first.
      enabled: whether this process writes.
      wandb: where every record also goes (closed with this writer), or None.
    """

    def __init__(self, workdir: epath.PathLike, start_step: int, enabled: bool = True, *,
                 wandb: WandbLogger | None = None):
        self.enabled = enabled
        self.path = metrics_path(workdir)
        self._tb = None
        self._wandb = wandb if enabled else None
        if not enabled:
            return
        self._local = is_local(self.path)
        if self._local:
            truncate_metrics(self.path, start_step)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a")
        else:
            self._records = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
            self._dirty, self._uploaded_at = True, time.monotonic()
            self._upload()  # the truncation, at once
        self._tb = _tensorboard(tb_dir(workdir), start_step)

    def _upload(self) -> None:
        if self._dirty:
            write_text(self.path, _dump(self._records))
        self._dirty, self._uploaded_at = False, time.monotonic()

    def write(self, step: int, **values: float) -> None:
        """One record `{"step": step, **values}`: flushed at once to a local file (a kill loses nothing already
        written); on an object store, written at the next flush or within `UPLOAD_EVERY_S`."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _clean(float(v)) for k, v in values.items()}}
        if self._local:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        else:
            self._records.append(record)
            self._dirty = True
            if time.monotonic() - self._uploaded_at > UPLOAD_EVERY_S:
                self._upload()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, float(v), int(step))
        if self._wandb is not None:
            self._wandb.log(step, values)

    def flush(self) -> None:
        """Everything written so far is in the workdir when this returns."""
        if self.enabled:
            if self._local:
                self._file.flush()
            else:
                self._upload()
            if self._tb is not None:
                self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            if self._local:
                self._file.close()
            else:
                self._upload()
            if self._tb is not None:
                self._tb.close()
            if self._wandb is not None:
                self._wandb.close()


# ----------------------------------------------------------------------------------------------- Weights & Biases
WANDB_MISSING = ("--wandb needs the optional `wandb` package: pip install 'titans_jax[wandb]' (or pip install wandb), "
                 "or drop --wandb / train.wandb_project.")


def import_wandb() -> Any:
    """The `wandb` module (an optional dependency, imported only when asked for).

    Raises:
      ModuleNotFoundError: with the install command, when it is not installed.
    """
    try:
        import wandb
    except ImportError as e:
        raise ModuleNotFoundError(WANDB_MISSING) from e
    return wandb


def new_wandb_run_id() -> str:
    """A fresh W&B run id (8 lowercase hex characters; W&B's own ids look alike)."""
    return uuid.uuid4().hex[:8]


class WandbLogger:
    """One W&B run that receives the records of metrics.jsonl, on process 0 only (the trainer opens it there).

    The records are logged against the training step as a metric of their own (`define_metric("*",
    step_metric="step")`), not W&B's internal step, which only moves forward: a resumed run re-logs the steps a killed
    run had logged after its last checkpoint (metrics.jsonl and TensorBoard are cut back to the checkpoint; W&B
    keeps both points at such a step). `WANDB_MODE=offline` (or `disabled`) and the other `WANDB_*` variables work as
    usual.

    Args:
      project: "PROJECT" or "ENTITY/PROJECT".
      run_id: the W&B run id; the same id resumes that run (`resume="allow"`).
      name: the run's display name (the trainer gives the workdir's name).
      config: logged as the run's config (the resolved RunConfig).
      directory: where W&B keeps its local files (`<dir>/wandb/`); None: W&B's default (`WANDB_DIR`, else the
        current directory).
    """

    def __init__(self, project: str, run_id: str, *, name: str | None = None, config: Mapping[str, Any] | None = None,
                 directory: str | None = None):
        wandb = import_wandb()
        entity, _, proj = project.strip("/").rpartition("/")
        self.run = wandb.init(project=proj, entity=entity or None, id=run_id, resume="allow", name=name,
                              config=dict(config or {}), dir=directory)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.run_id = run_id

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """One record, `{"step": step, **values}` (non-finite values as W&B takes them: NaN / inf floats)."""
        self.run.log({"step": int(step), **{k: float(v) for k, v in values.items()}})

    def close(self) -> None:
        self.run.finish()


# ----------------------------------------------------------------------------------------------- profiler
def _files_under(directory: str) -> list[str]:
    """Every file below a local `directory` (none when it does not exist)."""
    return [os.path.join(root, f) for root, _, names in os.walk(directory) for f in names]


class StepProfiler:
    """A `jax.profiler` trace of training steps `first..last` (inclusive), written under `logdir` the way TensorBoard's
    profile tab reads it (`<logdir>/plugins/profile/<time>/<host>.xplane.pb`) plus a Perfetto trace
    (`perfetto_trace.json.gz`, for ui.perfetto.dev). The model's `jax.named_scope`s (memory_project, memory_scan,
    memory_read (MAC's retrieval), memory_output, attention, mlp) name its ops in the trace, and each step is a
    `StepTraceAnnotation("train", step_num=step)`.

    JAX's profiler writes through TensorFlow's file systems: a local directory, or `gs://` where the runtime has that
    file system (Cloud TPU VMs do). So that every workdir `etils.epath` reaches works alike, a non-local `logdir` is
    traced into a local temporary directory first and its files copied there through `epath` when the trace stops
    (`stage_locally`).

    Usage (the trainer's loop)::

        with StepProfiler(tb_dir(workdir), (10, 12)) as prof:
            for step in ...:
                with prof.step(step):
                    state, metrics = dispatch(step)
                prof.step_done(step, metrics)  # at `last`: waits for the step, stops and writes the trace

    Steps before `first` and after `last` run untraced; a run resumed inside the range traces from its first step; a
    run that stops inside it (preemption, divergence) writes what it traced when the context closes.

    Args:
      logdir: where the trace goes (local or a URL).
      steps: `(first, last)`, or None (a no-op).
      enabled: whether this process traces (the trainer: process 0 only).
      stage_locally: trace into a local temporary directory and copy (None: when `logdir` is not local).
    """

    def __init__(self, logdir: epath.PathLike, steps: tuple[int, int] | None, *, enabled: bool = True,
                 stage_locally: bool | None = None):
        self.logdir = epath.Path(logdir)
        self.steps = steps if enabled else None
        self._stage = (not is_local(self.logdir)) if stage_locally is None else stage_locally
        self._tracing_into: str | None = None  # the directory of the trace in progress
        self._before: set[str] = set()  # files that were there when the trace started
        self.written: list[epath.Path] = []  # the files of the finished trace, in `logdir`

    @property
    def active(self) -> bool:
        """Whether a trace is being recorded."""
        return self._tracing_into is not None

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Wraps the dispatch of `step`: starts the trace at the first step of the range, and annotates the step."""
        if self.steps is not None and not self.active and self.steps[0] <= step <= self.steps[1]:
            self._start()
        if not self.active:
            yield
            return
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            yield

    def step_done(self, step: int, outputs: Any) -> None:
        """After `step` was dispatched: at the last step of the range, waits for `outputs` (so the trace holds the
        step's device work) and writes the trace."""
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(outputs)
            self.stop()

    def _start(self) -> None:
        if self._stage:
            target = tempfile.mkdtemp(prefix="titans_jax_profile_")
        else:
            self.logdir.mkdir(parents=True, exist_ok=True)
            target = os.fspath(self.logdir)
        self._before = set(_files_under(target))  # a local logdir may hold earlier traces (and TensorBoard's events)
        jax.profiler.start_trace(target, create_perfetto_trace=True)
        self._tracing_into = target
        log.info("profiling steps %d to %d", *self.steps)

    def stop(self) -> None:
        """Stops the trace in progress (if any) and writes its files into `logdir`."""
        if not self.active:
            return
        target, self._tracing_into = self._tracing_into, None
        jax.profiler.stop_trace()
        new = sorted(set(_files_under(target)) - self._before)
        if self._stage:
            for f in new:
                dest = self.logdir / os.path.relpath(f, target)
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(f, "rb") as src, dest.open("wb") as dst:  # streamed: a trace can be large
                    shutil.copyfileobj(src, dst)
                self.written.append(dest)
            shutil.rmtree(target, ignore_errors=True)
        else:
            self.written.extend(epath.Path(f) for f in new)
        log.info("profile of steps %d to %d written to %s (TensorBoard's profile tab: tensorboard --logdir %s; or "
                 "open its perfetto_trace.json.gz in ui.perfetto.dev)", *self.steps, self.logdir, self.logdir)

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
