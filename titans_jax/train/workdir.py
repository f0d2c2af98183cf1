"""The layout of a run directory (a "workdir"), shared by the trainer, `python -m titans_jax.sample` and the metrics
writer, so that none of them imports another for a file name::

    WORKDIR/
      config.json       the resolved RunConfig (RunConfig.to_dict()); a later run without --config reuses it
      metrics.jsonl     one JSON record per logged step and per evaluation (process 0 only)
      tb/               TensorBoard events of the same records
      checkpoints/      orbax step directories (train state + JSON meta with the data position and the config)
"""

from __future__ import annotations

import os

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
CHECKPOINT_DIR = "checkpoints"


def config_path(workdir: str) -> str:
    """`WORKDIR/config.json`."""
    return os.path.join(workdir, CONFIG_FILE)


def checkpoint_dir(workdir: str) -> str:
    """`WORKDIR/checkpoints`."""
    return os.path.join(workdir, CHECKPOINT_DIR)
