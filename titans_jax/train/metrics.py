"""Metrics output: JSON lines in `<workdir>/metrics.jsonl` and TensorBoard events in `<workdir>/tb` (process 0 only).

A resumed run first cuts both back to the restored step, so its metrics.jsonl reads exactly like an uninterrupted
run's: no step twice, none missing (lines a killed run wrote after its last checkpoint are dropped and then
recomputed).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from titans_jax.train.workdir import METRICS_FILE, TB_DIR

__all__ = ["METRICS_FILE", "TB_DIR", "MetricsWriter", "read_metrics", "truncate_metrics"]


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (a torn last line, from a killed writer, is skipped)."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def truncate_metrics(path: str | os.PathLike, last_step: int) -> None:
    """Keeps only the records with step <= last_step (atomically: write a temp file, then rename)."""
    if not os.path.exists(path):
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)


def _clean(v: Any) -> Any:
    # JSON has no NaN/inf; write them as strings so the file stays valid JSON.
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsWriter:
    """Appends metric records; a no-op on processes other than 0 (`enabled=False`).

    Args:
      workdir: the run directory.
      start_step: the step the run starts from (0 or the restored step): later records are removed first.
      enabled: whether this process writes.
    """

    def __init__(self, workdir: str, start_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if not enabled:
            return
        truncate_metrics(self.path, start_step)
        self._file = open(self.path, "a")  # noqa: SIM115 -- closed in close()
        try:
            from tensorboardX import SummaryWriter

            # purge_step hides events of a killed run beyond the restored step, like the truncation above.
            self._tb = SummaryWriter(os.path.join(workdir, TB_DIR), purge_step=start_step + 1 if start_step else None)
        except ImportError:  # TensorBoard output is optional
            self._tb = None

    def write(self, step: int, **values: float) -> None:
        """One record `{"step": step, **values}` (flushed, so a kill loses nothing already written)."""
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _clean(float(v)) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, float(v), int(step))

    def flush(self) -> None:
        if self.enabled:
            self._file.flush()
            if self._tb is not None:
                self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()
