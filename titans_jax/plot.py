"""Command line: `python -m titans_jax.plot RUN [RUN ...] [--out DIR] [--metrics loss val_loss ...]`.

Draws what training runs wrote into their `metrics.jsonl` (`titans_jax.train.metrics`) as PNG files in DIR:

* `curves.png`: one panel per metric (training loss, validation loss and bits per byte, gradient norm by default),
  the runs overlaid, the legend naming each run (its directory's name);
* `memory.png`, when a run logged memory statistics (`train.memory_stats`, docs/architecture.md, "Memory
  statistics"): one row per memory layer, with the means of the gates theta, eta and alpha, the memory's own loss
  before (solid) and after (dashed) each chunk's update, and the norms of W and S, against the training step.

RUN is a training workdir (or a metrics.jsonl file); local paths and URLs both work (etils.epath). The paths written
are printed. Needs matplotlib (`pip install 'titans_jax[plot]'`).

Examples::

    python -m titans_jax.plot runs/default
    python -m titans_jax.plot runs/mac runs/swa --out plots/compare --metrics loss val_bpb
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from collections.abc import Sequence
from typing import Any

from etils import epath

from titans_jax.diagnostics import layers_of
from titans_jax.train.metrics import read_metrics
from titans_jax.train.workdir import METRICS_FILE

DEFAULT_METRICS = ("loss", "val_loss", "val_bpb", "grad_norm")
# The memory figure's columns: (title, [(statistic, line style)]).
MEMORY_PANELS = (
    ("theta (learning rate)", [("theta", "-")]),
    ("eta (momentum)", [("eta", "-")]),
    ("alpha (forgetting)", [("alpha", "-")]),
    ("memory loss: before - / after --", [("loss_before", "-"), ("loss_after", "--")]),
    ("|W|", [("w_norm", "-")]),
    ("|S|", [("s_norm", "-")]),
)


class Run:
    """One run's records: `name` (its directory's name) and `records` (metrics.jsonl, in order)."""

    def __init__(self, name: str, records: list[dict[str, Any]]):
        self.name, self.records = name, records

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """`(steps, values)` of every record holding `key` (non-finite values, stored as strings, as floats)."""
        pts = [(int(r["step"]), float(r[key])) for r in self.records if key in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    def memory_series(self, layer: int, name: str) -> tuple[list[int], list[float]]:
        """`(steps, values)` of memory statistic `name` of `layer`."""
        pts = [(int(r["step"]), float(v)) for r in self.records
               if (v := layers_of(r).get(layer, {}).get(name)) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    @property
    def memory_layers(self) -> list[int]:
        return sorted({layer for r in self.records for layer in layers_of(r)})


def load_run(run: str) -> Run:
    """The records of `run`: a training workdir holding metrics.jsonl, or the metrics.jsonl file itself.

    Raises:
      FileNotFoundError: when there is no metrics.jsonl, or it holds no record.
    """
    path = epath.Path(run)
    if path.name != METRICS_FILE:
        path = path / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"run {run!r} has no {METRICS_FILE} (looked for {path}): pass a training workdir "
                                "(python -m titans_jax.train --workdir RUN) or the path of its metrics.jsonl")
    records = read_metrics(path)
    if not records:
        raise FileNotFoundError(f"run {run!r}: {path} holds no metrics record yet")
    return Run(path.parent.name or str(path.parent), records)


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ModuleNotFoundError("python -m titans_jax.plot needs matplotlib: pip install 'titans_jax[plot]' (or pip "
                                  "install matplotlib)") from e
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: epath.Path, name: str) -> epath.Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    path = out / name
    path.write_bytes(buf.getvalue())
    return path


def plot_curves(plt, runs: Sequence[Run], metrics: Sequence[str], out: epath.Path) -> epath.Path:
    """`curves.png`: one panel per metric, every run that has it overlaid."""
    cols = min(len(metrics), 2)
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False, layout="constrained")
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for run in runs:
            steps, values = run.series(metric)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 3 else None, label=run.name)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle(" vs ".join(r.name for r in runs))
    path = _save(fig, out, "curves.png")
    plt.close(fig)
    return path


def plot_memory(plt, runs: Sequence[Run], out: epath.Path) -> epath.Path | None:
    """`memory.png`: a row per memory layer, a column per statistic (`MEMORY_PANELS`), the runs overlaid in one colour
    each; None when no run logged memory statistics."""
    layers = sorted({layer for run in runs for layer in run.memory_layers})
    if not layers:
        return None
    cols = len(MEMORY_PANELS)
    fig, axes = plt.subplots(len(layers), cols, figsize=(3.4 * cols, 2.6 * len(layers)), squeeze=False,
                             layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, layer in zip(axes, layers, strict=True):
        for ax, (title, stats) in zip(row, MEMORY_PANELS, strict=True):
            for i, run in enumerate(runs):
                for name, style in stats:
                    steps, values = run.memory_series(layer, name)
                    if steps:
                        ax.plot(steps, values, style, color=colours[i % len(colours)],
                                label=run.name if style == "-" else None)
            ax.set_title(f"layer {layer}: {title}", fontsize="small")
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize="x-small")
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize="small")
    axes[0][0].legend(fontsize="x-small")
    fig.suptitle("memory statistics (per layer; means over batch, heads and tokens)")
    path = _save(fig, out, "memory.png")
    plt.close(fig)
    return path


def plot_runs(runs: Sequence[str], out: epath.PathLike = "plots",
              metrics: Sequence[str] | None = None) -> list[epath.Path]:
    """Draws `curves.png` (and `memory.png` when there are memory statistics) into `out`; returns the paths written.

    Args:
      runs: training workdirs (or metrics.jsonl files).
      out: the output directory (created; local or a URL).
      metrics: the curves to draw (default `DEFAULT_METRICS`, those some run has).

    Raises:
      FileNotFoundError: a run without metrics.jsonl (or without any record).
      ValueError: no runs, or a requested metric that no run logged (the message lists those there are).
    """
    if not runs:
        raise ValueError("runs: give at least one training workdir")
    loaded = [load_run(r) for r in runs]
    available = sorted({k for run in loaded for r in run.records for k in r if k != "step"})
    if metrics:
        missing = [m for m in metrics if m not in available]
        if missing:
            plain = [k for k in available if not k.startswith("memory/")]
            raise ValueError(f"--metrics {' '.join(missing)}: not in any run's metrics.jsonl; available: "
                             f"{', '.join(plain)} (and memory/layer<l>/<statistic>)")
    else:
        metrics = [m for m in DEFAULT_METRICS if m in available]
        if not metrics:
            raise ValueError(f"none of the default metrics {DEFAULT_METRICS} was logged; pass --metrics (available: "
                             f"{', '.join(available)})")
    plt = _pyplot()
    out = epath.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_curves(plt, loaded, metrics, out)]
    memory = plot_memory(plt, loaded, out)
    if memory is not None:
        written.append(memory)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m titans_jax.plot", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 1)[1].replace("Examples::", "examples:"))
    parser.add_argument("runs", nargs="+", metavar="RUN", help="training workdir (or its metrics.jsonl)")
    parser.add_argument("--out", default="plots", help="directory for the PNG files (default: ./plots)")
    parser.add_argument("--metrics", nargs="+", default=None, metavar="NAME",
                        help=f"curves to draw (default: {' '.join(DEFAULT_METRICS)}, those logged)")
    args = parser.parse_args(argv)
    try:
        paths = plot_runs(args.runs, args.out, args.metrics)
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
