"""Checkpoints: a small wrapper over orbax's ``CheckpointManager`` (the ``args`` API), and a SIGTERM recorder.

Each step directory holds two items: ``state`` (any pytree of arrays, e.g. an ``nnx.State`` of model and optimizer,
saved with ``StandardSave``, shardings and bfloat16 included) and ``meta`` (JSON: the data iterator position, the
config as a dict, ...), so the model and the data position are always restored together.

Atomicity (orbax 0.12.8, verified in tests/test_checkpoint.py): a step is written under
``<dir>/<step>.orbax-checkpoint-tmp`` (each item under ``<item>.orbax-checkpoint-tmp``); ``commit_success.txt`` is
written last and the directory is then renamed to ``<dir>/<step>``. On a local/POSIX file system the rename is the
commit: step listing only accepts names that are plain integers without the tmp suffix, so a run killed mid-save
leaves a tmp directory that ``latest_step`` ignores (and that ``cleanup_tmp_directories`` removes at the next start).
On GCS, where renames are not atomic, orbax instead requires ``commit_success.txt`` inside the step directory.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any

import jax
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
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        async_save: bool = True,
    ):
        path = epath.Path(directory)
        if "://" not in str(directory):
            path = epath.Path(os.path.abspath(directory))  # orbax wants absolute paths
        self.directory = path
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            # Remove tmp directories left by a run killed mid-save; they are never taken as checkpoints anyway.
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(path, item_names=("state", "meta"), options=options)

    def save(self, step: int, state_tree: Any, meta: dict[str, Any] | None = None) -> bool:
        """Saves ``state_tree`` and ``meta`` as ``step``; returns whether a save was started.

        Every call saves: the cadence is the caller's (the trainer's), not one of orbax's policies (which would also
        save the first step of a run). Skipped (False) only when ``step`` is already saved, e.g. a final save right
        after a periodic one.

        Raises:
          TypeError: when ``meta`` is not JSON serialisable (checked here rather than in the background writer).
        """
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
