"""Metrics output: JSON lines in `<workdir>/metrics.jsonl` and TensorBoard events in `<workdir>/tb` (process 0 only),
both through `etils.epath`, so a workdir on a cloud bucket works like a local one.

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

import io
import json
import math
import threading
import time
from typing import Any

from etils import epath

from titans_jax.train.workdir import METRICS_FILE, TB_DIR, is_local, metrics_path, tb_dir, write_text

__all__ = ["METRICS_FILE", "TB_DIR", "UPLOAD_EVERY_S", "MetricsWriter", "read_metrics", "truncate_metrics"]

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
    """

    def __init__(self, workdir: epath.PathLike, start_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = metrics_path(workdir)
        self._tb = None
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
