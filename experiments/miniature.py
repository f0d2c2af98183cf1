"""What the paper's experiments in miniature share: train a tiny preset through the project's own trainer (resuming a
finished or interrupted run instead of starting over), evaluate it with `titans_jax.eval`, and keep the results.

Results go to experiments/results/<name>.json (`--quick` runs to experiments/results/quick/, never over the full
runs' files) and plots to docs/img/<name>_*.png (quick: under the quick results folder).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from collections.abc import Sequence

import jax

RESULTS = os.path.join(os.path.dirname(__file__), "results")
IMG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "img")
# The variants of the paper's Table 2 at the tiny scale (window and segment 64), and the linear-memory baseline.
VARIANTS = ("lmm", "mac", "mag", "mal", "swa", "transformer", "gated-deltanet")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a smoke version in a few minutes (results under quick/)")
    p.add_argument("--workdir-root", default="runs/experiments", help="where the training runs go (resumed if there)")
    p.add_argument("--seed", type=int, default=0, help="training and evaluation seed (default 0)")
    p.add_argument("--variants", nargs="+", help="a subset of the variants")
    p.add_argument("--cpu-devices", type=int, default=2, help="data-parallel CPU devices for training (default 2)")
    p.add_argument("--out-dir", help="write the JSON and plots here instead (default: experiments/results, docs/img)")
    return p


# Long-context training also scores the context at 1/20 of an answer token's weight (as `make niah`): the key's second
# and third mentions are copies, so the context adds recall signal (docs/architecture.md, "Evaluation").
CONTEXT_WEIGHT = "train.context_weight=0.05"


def main(run, doc: str, argv=None, add_arguments=None) -> int:
    """The command line every experiment shares: parse, set the CPU devices up, `run(args)`."""
    p = parser(doc.split("\n\n")[0])
    if add_arguments is not None:
        add_arguments(p)
    args = p.parse_args(argv)
    setup(args.cpu_devices)
    run(args)
    return 0


def save_figure(fig, path: str) -> None:
    """Lays out, writes and closes a matplotlib figure (its folder made if needed)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def out_paths(name: str, quick: bool, out_dir: str | None = None) -> tuple[str, str]:
    """(the results JSON path, the folder for plots)."""
    if out_dir:
        return os.path.join(out_dir, f"{name}.json"), out_dir
    if quick:
        folder = os.path.join(RESULTS, "quick")
        return os.path.join(folder, f"{name}.json"), folder
    return os.path.join(RESULTS, f"{name}.json"), IMG


def setup(cpu_devices: int) -> None:
    """Data-parallel CPU devices for training; call before anything touches JAX's backend."""
    if cpu_devices > 1 and not jax._src.xla_bridge.backends_are_initialized():
        jax.config.update("jax_num_cpu_devices", cpu_devices)


# --quick trains a narrower, shallower model: the smoke run checks the plumbing, not the science.
QUICK_SETS = ("model.dim=32", "model.num_layers=1", "train.eval_batches=1")


def train(workdir: str, config: str, *, data: str, steps: int, seq_len: int, batch_size: int, seed: int,
          sets: Sequence[str] = (), eval_every: int | None = None, quick: bool = False) -> dict:
    """Trains (or finishes, or just reloads) a run with `python -m titans_jax.train` on this process's devices;
    returns its last metrics (every key's latest value) and the wall time."""
    from titans_jax.train import __main__ as train_cli
    from titans_jax.train.metrics import read_metrics

    argv = ["--config", config, "--workdir", workdir, "--data", data, "--steps", str(steps), "--seq-len",
            str(seq_len), "--batch-size", str(batch_size), "--seed", str(seed),
            "--eval-every", str(eval_every or steps), "--checkpoint-every", str(max(1, steps // 4)),
            "--set", "train.sample_tokens=0", *sets, *(QUICK_SETS if quick else ())]
    metrics = os.path.join(workdir, "metrics.jsonl")
    done_before = os.path.exists(metrics) and max((r.get("step", 0) for r in read_metrics(metrics)), default=0)
    t0 = time.perf_counter()
    status = train_cli.main(argv)
    if status != 0:
        raise RuntimeError(f"training {config} in {workdir} failed with exit status {status}")
    last = {k: v for r in read_metrics(metrics) for k, v in r.items()}
    # The wall time of this call trained every step only if the run started from scratch; otherwise say so.
    last["train_wall_s"] = round(time.perf_counter() - t0, 1) if not done_before else None
    last["resumed_from_step"] = int(done_before or 0)
    return last


def environment() -> dict:
    import flax

    return {"date": datetime.date.today().isoformat(), "jax": jax.__version__, "flax": flax.__version__,
            "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "backend": jax.default_backend()}


def save(path: str, doc: dict) -> None:
    from titans_jax.eval import write_json

    write_json({**doc, "environment": environment()}, path)
    print(f"wrote {path}")


def load(path: str) -> dict | None:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None
