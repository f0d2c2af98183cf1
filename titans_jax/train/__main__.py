"""Command line: `python -m titans_jax.train --config NAME_OR_FILE --workdir DIR [flags] [--set key=value ...]`.

Examples::

    python -m titans_jax.train --config tiny-mac --workdir runs/default
    python -m titans_jax.train --config tiny-mag --workdir runs/mag --steps 200 --set model.dim=64 train.lr=1e-3
    python -m titans_jax.train --config 170m-mac --workdir gs://b/run --mesh fsdp=-1,tensor=4 --batch-size 128 \\
        --seq-len 4096 --steps 28600 --dtype bfloat16
    # two processes on one machine, two CPU devices each:
    python -m titans_jax.train ... --cpu-devices 2 --coordinator 127.0.0.1:12345 --num-processes 2 --process-id 0

Configuration is applied in this order: the preset or file (default: the workdir's config.json when it exists,
else tiny-mac), then `--set`, then the named flags (--steps, --lr, ...), which therefore win.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from titans_jax.train.config import NONFINITE_MODES, RunConfig, apply_overrides, load_config
from titans_jax.train.trainer import RESUME_MODES, TrainingDiverged
from titans_jax.train.workdir import config_path

# Named flags that are shorthands for `--set train.<field>=<value>` (or model.dtype).
FLAG_FIELDS = {
    "steps": "train.steps", "batch_size": "train.batch_size", "seq_len": "train.seq_len", "seed": "train.seed",
    "lr": "train.lr", "eval_every": "train.eval_every", "checkpoint_every": "train.checkpoint_every",
    "mesh": "train.mesh", "data": "train.data", "tokenizer": "train.tokenizer", "dtype": "model.dtype",
    "nonfinite": "train.nonfinite",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m titans_jax.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="preset name (tiny-mac, 170m-mag, ...) or JSON file; default: WORKDIR/config.json if present, "
                        "else tiny-mac")
    p.add_argument("--workdir", required=True,
                   help="run directory (config.json, metrics.jsonl, tb/, checkpoints/): a local path or a URL such as "
                        "gs://bucket/run")
    p.add_argument("--set", dest="overrides", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                   help="override any field: model.dim=64 train.lr=1e-3 (values parsed as JSON / Python literals)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="global batch (sequences per update over all processes)")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=2,tensor=2 (default: all devices on data)")
    p.add_argument("--data", help="shakespeare | path to .txt/.jsonl file, directory or glob | niah-* | mqar")
    p.add_argument("--tokenizer", help="bytes | path to a SentencePiece .model")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (parameters stay float32)")
    p.add_argument("--nonfinite", choices=NONFINITE_MODES,
                   help="a step with a non-finite loss or gradients: stop (default; the last checkpoint is the last "
                        "good state) or skip it and go on (at most train.max_consecutive_nonfinite in a row)")
    p.add_argument("--resume", nargs="?", const="yes", default="auto", choices=RESUME_MODES,
                   help="auto (default): resume if WORKDIR has a checkpoint; yes (or bare --resume): must resume; "
                        "no: refuse a workdir that has checkpoints")
    p.add_argument("--coordinator", help="HOST:PORT of process 0, for a multi-process run")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--cpu-devices", type=int,
                   help="number of CPU devices this process exposes (jax_num_cpu_devices), for sharding on a CPU")
    return p


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """The run config from --config / the workdir's config.json, --set, and the named flags."""
    name = args.config
    if name is None:
        saved = config_path(args.workdir)
        name = str(saved) if saved.exists() else "tiny-mac"
    cfg = load_config(name)
    cfg = apply_overrides(cfg, [item for group in args.overrides for item in group])
    # json.dumps keeps each flag's own type: a string flag such as a path "1e3" stays a string.
    flags = [f"{key}={json.dumps(getattr(args, attr))}" for attr, key in FLAG_FIELDS.items()
             if getattr(args, attr) is not None]
    return apply_overrides(cfg, flags)


class _StderrHandler(logging.StreamHandler):
    """Writes to the current sys.stderr (which a host program such as pytest may swap between calls of main)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _setup_logging(main_process: bool) -> None:
    # Only the package's logger: the root logger (and a host program's handlers, e.g. pytest's) stays untouched.
    logger = logging.getLogger("titans_jax")
    logger.setLevel(logging.INFO if main_process else logging.WARNING)
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 1 diverged, 2 bad settings or data)."""
    args = build_parser().parse_args(argv)
    import jax

    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    from titans_jax import distributed
    from titans_jax.train.trainer import train

    try:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        _setup_logging(jax.process_index() == 0)
        cfg = resolve_config(args)
        train(cfg, args.workdir, resume=args.resume)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
