"""The layout of a run directory (a "workdir"), shared by the trainer, `python -m titans_jax.sample`,
`python -m titans_jax.export` and the metrics writer, so that none of them imports another for a file name::

    WORKDIR/
      config.json       the resolved RunConfig (RunConfig.to_dict()); a later run without --config reuses it
      metrics.jsonl     one JSON record per logged step and per evaluation (process 0 only)
      tb/               TensorBoard events of the same records
        plugins/profile/  jax.profiler traces (--profile-steps)
      wandb/            W&B's local files (--wandb, local workdirs)
      checkpoints/      orbax step directories (train state + JSON meta with the data position and the config)

A workdir may live anywhere `etils.epath` reaches (a local folder, `gs://bucket/run`, ...): every file in it is read
and written through `epath.Path` (orbax already uses it for the checkpoints), never with `open()` or `os.path`, so a
URL never becomes a local folder named `gs:`. Cloud object stores cannot append to an object: `is_local` tells the
writers that must then rewrite whole files instead (see `metrics.MetricsWriter`).
"""

from __future__ import annotations

import os
import uuid

from etils import epath

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
CHECKPOINT_DIR = "checkpoints"


def path(workdir: epath.PathLike) -> epath.Path:
    """`workdir` as an `epath.Path`: a URL (`gs://...`) as it is, a local path made absolute (orbax wants that)."""
    if isinstance(workdir, str) and "://" in workdir:
        return epath.Path(workdir)
    p = epath.Path(workdir)
    return p if not is_local(p) else epath.Path(os.path.abspath(os.fspath(p)))


def is_local(p: epath.PathLike) -> bool:
    """Whether `p` is on a local (POSIX) file system, where files can be appended to and renamed atomically."""
    return "://" not in os.fspath(p)


def config_path(workdir: epath.PathLike) -> epath.Path:
    """`WORKDIR/config.json`."""
    return path(workdir) / CONFIG_FILE


def metrics_path(workdir: epath.PathLike) -> epath.Path:
    """`WORKDIR/metrics.jsonl`."""
    return path(workdir) / METRICS_FILE


def tb_dir(workdir: epath.PathLike) -> epath.Path:
    """`WORKDIR/tb`."""
    return path(workdir) / TB_DIR


def checkpoint_dir(workdir: epath.PathLike) -> epath.Path:
    """`WORKDIR/checkpoints`."""
    return path(workdir) / CHECKPOINT_DIR


def write_text(p: epath.PathLike, text: str) -> None:
    """Writes `p` whole, never leaving a half-written file: locally a temporary file renamed over it; on an object
    store one object write (an object only appears once its upload completes)."""
    p = epath.Path(p)
    p.parent.mkdir(parents=True, exist_ok=True)
    if not is_local(p):
        p.write_text(text)
        return
    tmp = p.parent / f".{p.name}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(text)
    os.replace(os.fspath(tmp), os.fspath(p))
