"""Checkpoints: a small wrapper over orbax's ``CheckpointManager`` (the ``args`` API), and preemption: JAX's preemption
sync point through orbax, or a SIGTERM recorder where a run has none (``PreemptionWatch``).

Each step directory holds two items: ``state`` (any pytree of arrays, e.g. an ``nnx.State`` of model and optimizer,
saved with ``StandardSave``, shardings and bfloat16 included) and ``meta`` (JSON: the data iterator position, the
config as a dict, ...), so the model and the data position are always restored together.

Atomicity (orbax 0.12.8, verified in tests/test_checkpoint.py): a step is written under
``<dir>/<step>.orbax-checkpoint-tmp`` (each item under ``<item>.orbax-checkpoint-tmp``); ``commit_success.txt`` is
written last and the directory is then renamed to ``<dir>/<step>``. On a local/POSIX file system the rename is the
commit: step listing only accepts names that are plain integers without the tmp suffix, so a run killed mid-save
leaves a tmp directory that ``latest_step`` ignores (and that ``cleanup_tmp_directories`` removes at the next start).
On GCS, where renames are not atomic, orbax instead requires ``commit_success.txt`` inside the step directory.

The directory may be a URL (``gs://bucket/run/checkpoints``): orbax reaches it through ``etils.epath`` and TensorStore.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


def _as_abstract(tree: Any) -> Any:
    """Concrete ``jax.Array`` leaves become ``ShapeDtypeStruct``s carrying their sharding; others pass through."""

    def leaf(x: Any) -> Any:
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(leaf, tree)


class Checkpointer:
    """Saves and restores ``(state tree, JSON meta)`` per step with orbax.

    Args:
      directory: root directory (local path or ``gs://``); created if missing.
      max_to_keep: number of most recent checkpoints kept; older ones are deleted after each save.
      async_save: write in a background thread; :meth:`save` returns once arrays are copied off the devices.
        Call :meth:`wait` (or :meth:`close`) before reading the files or exiting.
      read_only: only read (sampling, exporting): nothing is created, saved or deleted, and the tmp directory of a
        save still in progress in a running training job is left alone.
    """

    def __init__(
        self,
        directory: epath.PathLike,
        *,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        path = epath.Path(directory)
        if "://" not in os.fspath(directory):
            path = epath.Path(os.path.abspath(os.fspath(directory)))  # orbax wants absolute paths
        self.directory, self.read_only = path, read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,
            enable_async_checkpointing=async_save and not read_only,
            # Remove tmp directories left by a run killed mid-save; they are never taken as checkpoints anyway.
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(path, item_names=("state", "meta"), options=options)

    def save(self, step: int, state_tree: Any, meta: dict[str, Any] | None = None) -> bool:
        """Saves ``state_tree`` and ``meta`` as ``step``; returns whether a save was started.

        Every call saves: the cadence is the caller's (the trainer's), not one of orbax's policies (which would also
        save the first step of a run). Skipped (False) only when ``step`` is already saved, e.g. a final save right
        after a periodic one.

        Raises:
          TypeError: when ``meta`` is not JSON serialisable (checked here rather than in the background writer).
          ValueError: on a read-only checkpointer.
        """
        if self.read_only:
            raise ValueError(f"read-only checkpointer of {self.directory}: not saving step {step}")
        meta = {} if meta is None else meta
        json.dumps(meta)
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(state_tree), meta=ocp.args.JsonSave(meta))
        return bool(self._manager.save(step, args=args, force=True))

    def latest_step(self) -> int | None:
        """The newest committed step, or None. Half-written (uncommitted) saves are never reported."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All committed steps, ascending."""
        return sorted(self._manager.all_steps())

    def reached_preemption(self, step: int) -> bool:
        """Whether ``step`` is JAX's preemption sync point (orbax's ``CheckpointManager.reached_preemption``): once
        any process got a preemption notice (SIGTERM, or a TPU maintenance event), every process gets True at the
        same step. Always False without ``jax.distributed`` or with ``jax_enable_preemption_service`` off (see
        :class:`PreemptionWatch` for those). Call it at every step, on every process."""
        return bool(self._manager.reached_preemption(step))

    def restore(self, step: int | None = None, abstract_state: Any = None) -> tuple[Any, dict[str, Any]]:
        """Restores ``(state_tree, meta)`` of ``step`` (default: the latest).

        Args:
          step: the step to restore, or None for :meth:`latest_step`.
          abstract_state: the target tree: ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` leaves (e.g. from
            :func:`titans_jax.sharding.abstract_state`) or concrete arrays whose sharding is reused. Arrays are
            placed with these shardings, so a checkpoint written on one mesh restores onto another. With None the
            shardings stored in the checkpoint are used, which needs the same devices as the save.

        Raises:
          FileNotFoundError: when there is no committed checkpoint (or not ``step``).
        """
        step = self.latest_step() if step is None else step
        if step is None or step not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in {self.directory}")
        target = None if abstract_state is None else _as_abstract(abstract_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        return restored["state"], restored["meta"]

    def read_meta(self, step: int) -> dict[str, Any]:
        """The JSON meta of ``step`` alone (no array is read).

        Raises:
          FileNotFoundError: when ``step`` is not a committed step.
        """
        if step not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint {step} in {self.directory}")
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_subtree(self, step: int, target: Any) -> Any:
        """Restores only the part of step ``step``'s state tree that ``target`` names (orbax's partial restore), e.g.
        the model's parameters without the optimizer state; nothing else is read.

        Args:
          step: a committed step.
          target: a tree shaped like a subtree of the saved one from its root, with ``jax.ShapeDtypeStruct`` leaves:
            with a sharding, placed on devices like :meth:`restore`; without, read into host memory as numpy
            arrays. Arrays are cast to the leaves' dtypes.

        Raises:
          FileNotFoundError: when ``step`` is not a committed step.
        """
        if step not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint {step} in {self.directory}")

        def restore_args(leaf: Any) -> ocp.RestoreArgs:
            sharding = getattr(leaf, "sharding", None)
            if sharding is None:
                return ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)
            return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=leaf.shape, dtype=leaf.dtype)

        args = ocp.args.PyTreeRestore(item=target, restore_args=jax.tree.map(restore_args, target),
                                      partial_restore=True)
        # A manager binds each item to one handler: "state" is StandardSave's here, and a partial restore needs the
        # PyTree handler (the same format on disk), so it reads through a read-only manager of its own.
        reader = ocp.CheckpointManager(self.directory, item_names=("state", "meta"),
                                       options=ocp.CheckpointManagerOptions(read_only=True, create=False))
        try:
            return reader.restore(step, args=ocp.args.Composite(state=args))["state"]
        finally:
            reader.close()

    def wait(self) -> None:
        """Blocks until background saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases orbax's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SigtermHandler:
    """Context manager that records SIGTERM (preemption notice) instead of dying, so the loop can save and exit.
    :class:`PreemptionWatch`'s fallback where JAX's preemption sync point is not available.

    Usage::

        with SigtermHandler() as stop:
            for step in ...:
                train_step(...)
                if stop.requested:  # multi-host: distributed.any_process(stop.requested), so all save alike
                    ckpt.save(step, state, meta); ckpt.wait(); break

    The previous handlers are restored on exit. Signal handlers can only be installed from the main thread;
    elsewhere the handler stays inactive (``requested`` remains False) and logs a warning.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.requested = True
        self.signum = signum
        log.warning("received signal %d: will save a checkpoint and stop", signum)

    def __enter__(self) -> SigtermHandler:
        if threading.current_thread() is not threading.main_thread():
            log.warning("SigtermHandler outside the main thread: signals are not intercepted")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            # None means the previous handler was installed outside Python; the default is the best we can do.
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()


def preemption_sync_available() -> bool:
    """Whether this run has JAX's preemption sync manager: ``jax.distributed`` is initialised (for any number of
    processes, one included) with ``jax_enable_preemption_service`` on (JAX's default). It then owns SIGTERM."""
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class PreemptionWatch:
    """Tells the training loop at which step to save and stop because the job is being preempted.

    Two paths, chosen when entered:

    * ``"sync_point"`` (``preemption_sync_available()``): JAX's preemption sync point through orbax,
      :meth:`Checkpointer.reached_preemption`, asked at every step. JAX's preemption notifier catches SIGTERM (and on
      TPU, maintenance events) in any process; the processes agree on one step, the first after the highest step any
      of them had reached, so all save the same step. Nothing is installed here: a Python SIGTERM handler would
      replace JAX's.
    * ``"signal"`` (a single process without ``jax.distributed``, or the preemption service turned off): SIGTERM is
      recorded by :class:`SigtermHandler`. One process stops at the next step; several all-gather the flag every
      ``every`` steps (``distributed.any_process``), so the other steps stay free of the collective.

    Usage::

        with PreemptionWatch(ckpt, every=log_every) as watch:
            for step in ...:
                ...
                if watch.reached(step):
                    save and stop
    """

    def __init__(self, checkpointer: Checkpointer, every: int = 1):
        self.checkpointer, self.every = checkpointer, max(int(every), 1)
        self.mode: str | None = None
        self._handler: SigtermHandler | None = None

    def __enter__(self) -> PreemptionWatch:
        self.mode = "sync_point" if preemption_sync_available() else "signal"
        if self.mode == "signal":
            self._handler = SigtermHandler().__enter__()
        log.info("preemption: %s", "JAX's preemption sync point (orbax reached_preemption)"
                 if self.mode == "sync_point" else "SIGTERM handler (no jax.distributed preemption service)")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handler is not None:
            self._handler.__exit__(*exc)
            self._handler = None

    def reached(self, step: int) -> bool:
        """Whether to save ``step`` and stop (the same answer on every process)."""
        if self.mode == "sync_point":
            return self.checkpointer.reached_preemption(step)
        requested = self._handler is not None and self._handler.requested
        if jax.process_count() == 1:
            return requested
        from titans_jax import distributed

        return step % self.every == 0 and distributed.any_process(requested)

    @property
    def reason(self) -> str:
        """What stopped the run, for the log."""
        if self.mode == "sync_point":
            return "JAX's preemption sync point"
        signum = self._handler.signum if self._handler is not None else None
        return f"signal {signum}"
