"""Command line: `python -m titans_jax.train --config NAME_OR_FILE --workdir DIR [flags] [--set key=value ...]`.

Examples::

    python -m titans_jax.train --config tiny-mac --workdir runs/default
    python -m titans_jax.train --config tiny-mag --workdir runs/mag --steps 200 --set model.dim=64 train.lr=1e-3
    python -m titans_jax.train --config experiments/train_configs/paper-170m-mac.json --workdir gs://b/run \\
        --data /data/fineweb-edu --tokenizer /data/fineweb-edu --mesh fsdp=-1 --wandb my-team/titans
    python -m titans_jax.train --config experiments/train_configs/paper-760m-mag.json --mesh fsdp=8,tensor=2 --dry-run
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
import textwrap

from titans_jax.configs import BASELINES, PAPER_SIZES, PRESET_PEAK_LR, PRESETS, VARIANTS
from titans_jax.train.config import NONFINITE_MODES, RunConfig, TrainConfig, apply_overrides, load_config
from titans_jax.train.trainer import RESUME_MODES, TrainingDiverged
from titans_jax.train.workdir import config_path

# Named flags that are shorthands for `--set train.<field>=<value>` (or model.dtype).
FLAG_FIELDS = {
    "steps": "train.steps", "batch_size": "train.batch_size", "seq_len": "train.seq_len", "seed": "train.seed",
    "lr": "train.lr", "eval_every": "train.eval_every", "checkpoint_every": "train.checkpoint_every",
    "mesh": "train.mesh", "data": "train.data", "tokenizer": "train.tokenizer", "dtype": "model.dtype",
    "nonfinite": "train.nonfinite", "profile_steps": "train.profile_steps", "wandb": "train.wandb_project",
}

_DEFAULTS = TrainConfig()


def _presets_help() -> str:
    """The presets, one line per size with its peak learning rate (generated from `configs.PRESETS`)."""
    names = ",".join(VARIANTS + BASELINES)
    lines = []
    for size in ("tiny", *PAPER_SIZES):
        line = f"  {size}-{{{names}}}"
        if f"{size}-mac-matched" in PRESETS:
            line += f"\n      and {size}-{{...}}-matched (width matched to {size}; docs/architecture.md, \"Presets\")"
        lines.append(f"{line}\n      peak lr {PRESET_PEAK_LR[f'{size}-mac']:g}")
    return "\n".join(lines)


EPILOG = f"""\
presets (--config NAME; the peak learning rate is used unless --lr / train.lr is given):
{_presets_help()}
  tiny-*: byte vocabulary, for a CPU; the paper's sizes (the revision's Table 5): 32K vocabulary, context 4096,
  bfloat16 compute. Run files with the paper's whole recipe (optimiser, schedule, batch, context, token budget):
  experiments/train_configs/paper-<size>-<variant>.json (pass --data and --tokenizer).

data sources (--data):
  DIR            a prepared-data directory (python -m titans_jax.data.prepare --input ... --out DIR): read lazily
                 from its ArrayRecord shards; pass the same DIR as --tokenizer (it holds its tokenizer)
  shakespeare    the built-in tiny corpus (about 5M bytes; the default)
  FILE|DIR|GLOB  raw .txt / .jsonl text ('data/*.jsonl', quoted), prepared into a cache folder on first use
                 (train.data_dir, default $TITANS_JAX_DATA_DIR or ~/.cache/titans_jax/tfds; .jsonl: train.text_field)
  niah-passkey, niah-number, niah-word, niah-uuid (RULER's single-needle prompts), niah-mix (PK, N, W in
  turn), babilong-qa1, babilong-qa2, babilong-qa3, babilong-qa4, babilong-qa5, babilong-mix (BABILong-style
  stories in Shakespeare text), longctx-mix (needles and stories in turn), niah-simple-passkey,
  niah-simple-number, niah-simple-word (a shorter needle format), mqar
                 synthetic recall tasks, generated on the fly (only the answer tokens are scored; --set
                 train.context_weight=W also scores the rest at weight W)

tokenizers (--tokenizer): bytes (256 ids, the default) | a SentencePiece .model | a Hugging Face tokenizer.json |
  a prepared-data directory (the tokenizer it was prepared with). model.vocab_size must be at least its size.

outputs in WORKDIR: config.json, metrics.jsonl, tb/ (TensorBoard; --profile-steps traces in tb/plugins/profile),
  checkpoints/. Rerunning with the same WORKDIR resumes. Exit status: 0 done or preempted (checkpoint saved),
  1 diverged (non-finite step), 2 bad settings or data.
"""


def build_parser() -> argparse.ArgumentParser:
    description = __doc__.split("\n\n", 1)[1].replace("Examples::", "examples:").strip()
    p = argparse.ArgumentParser(prog="python -m titans_jax.train", description=description,
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("run")
    run.add_argument("--config", default=None, metavar="NAME_OR_FILE",
                     help="preset name (tiny-mac, 170m-mag, ...: listed below) or JSON run file ({\"model\": ..., "
                          "\"train\": ...}, e.g. experiments/train_configs/paper-170m-mac.json); default: "
                          "WORKDIR/config.json if present, else tiny-mac")
    run.add_argument("--workdir", default=None,
                     help="run directory (config.json, metrics.jsonl, tb/, checkpoints/): a local path or a URL, "
                          "e.g. runs/mac or gs://bucket/run. Required, except with --dry-run")
    run.add_argument("--set", dest="overrides", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                     help="override any model.* or train.* field, e.g. --set model.dim=64 train.lr=1e-3 "
                          "train.grad_accum=4 (values parsed as JSON, then Python literals, else strings)")
    run.add_argument("--resume", nargs="?", const="yes", default="auto", choices=RESUME_MODES,
                     help="auto (default): resume if WORKDIR has a checkpoint; yes (or a bare --resume): must "
                          "resume; no: refuse a workdir that has checkpoints")
    run.add_argument("--dry-run", action="store_true",
                     help="print the resolved config, the mesh, parameter counts and the compiled train step's "
                          "memory per device, then exit without training or writing anything, e.g. --config "
                          "experiments/train_configs/paper-1.3b-mac.json --mesh fsdp=8,tensor=2 --dry-run")

    tr = p.add_argument_group("training (shorthands for --set train.<field>; they win over --set)")
    tr.add_argument("--steps", type=int, help=f"optimizer updates, the schedule's length (default {_DEFAULTS.steps})")
    tr.add_argument("--batch-size", type=int,
                    help=f"global batch: sequences per update over all processes (default {_DEFAULTS.batch_size})")
    tr.add_argument("--seq-len", type=int, help=f"tokens per training sequence (default {_DEFAULTS.seq_len})")
    tr.add_argument("--lr", type=float, help="peak learning rate (default: the preset's, listed below)")
    tr.add_argument("--seed", type=int, help=f"model initialisation and data order (default {_DEFAULTS.seed})")
    tr.add_argument("--eval-every", type=int,
                    help=f"validate every N steps and at the end; 0: only at the end (default {_DEFAULTS.eval_every})")
    tr.add_argument("--checkpoint-every", type=int,
                    help=f"save every N steps, at the end and on preemption; 0: only then "
                         f"(default {_DEFAULTS.checkpoint_every})")
    tr.add_argument("--data", help="training data: a prepared directory, shakespeare, raw .txt/.jsonl files or a "
                                   "synthetic task (listed below), e.g. --data /data/fineweb-edu")
    tr.add_argument("--tokenizer", help="bytes | a SentencePiece .model | a tokenizer.json | a prepared directory, "
                                        "e.g. --tokenizer /data/fineweb-edu")
    tr.add_argument("--dtype", choices=("float32", "bfloat16"),
                    help="compute dtype (parameters and optimizer state stay float32); the paper presets: bfloat16")
    tr.add_argument("--mesh", help="device mesh over data, fsdp and tensor; -1 takes the remaining devices, e.g. "
                                   "--mesh fsdp=-1 or data=2,fsdp=4,tensor=2 (default: all devices on data)")
    tr.add_argument("--nonfinite", choices=NONFINITE_MODES,
                    help="a step with a non-finite loss or gradients: stop (default; the last checkpoint is the last "
                         "good state) or skip it and go on (at most train.max_consecutive_nonfinite in a row; the "
                         "count is logged as skipped_steps)")

    diag = p.add_argument_group("diagnostics and logging")
    diag.add_argument("--profile-steps", metavar="A:B",
                      help="write a jax.profiler trace of steps A to B (inclusive) into WORKDIR/tb/plugins/profile "
                           "(TensorBoard's profile tab, or perfetto_trace.json.gz in ui.perfetto.dev), e.g. "
                           "--profile-steps 10:12 (skip the first steps, they include warm-up effects)")
    diag.add_argument("--wandb", metavar="PROJECT",
                      help="also log the metrics to Weights & Biases, e.g. --wandb titans or --wandb my-team/titans "
                           "(needs pip install wandb; WANDB_MODE=offline works); a resumed run continues the same "
                           "W&B run")

    dist = p.add_argument_group("processes and devices", textwrap.dedent("""\
        jax.distributed starts by itself under SLURM (srun), on multi-host TPU slices (GKE or
        TPU VM environment variables) and under mpirun; TITANS_DISTRIBUTED=1 forces JAX's
        auto-detection (a TPU pod that JAX finds through its metadata server),
        TITANS_DISTRIBUTED=0 a single process. Elsewhere, give all three of:"""))
    dist.add_argument("--coordinator", metavar="HOST:PORT",
                      help="address of process 0 for jax.distributed, e.g. --coordinator 10.0.0.2:12345 "
                           "(with --num-processes and --process-id)")
    dist.add_argument("--num-processes", type=int, help="number of processes of the run")
    dist.add_argument("--process-id", type=int, help="this process's index, 0 .. num-processes - 1")
    dist.add_argument("--cpu-devices", type=int,
                      help="CPU devices this process exposes (jax_num_cpu_devices), to shard on a CPU, e.g. "
                           "--cpu-devices 2 --mesh data=2")
    return p


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """The run config from --config / the workdir's config.json, --set, and the named flags."""
    name = args.config
    if name is None:
        saved = config_path(args.workdir) if args.workdir is not None else None
        name = str(saved) if saved is not None and saved.exists() else "tiny-mac"
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workdir is None and not args.dry_run:
        parser.error("--workdir is required (except with --dry-run)")
    import jax

    if args.cpu_devices:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    from titans_jax import distributed
    from titans_jax.train.trainer import dry_run, train

    try:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        _setup_logging(jax.process_index() == 0)
        cfg = resolve_config(args)
        if args.dry_run:
            dry_run(cfg, args.workdir)
        else:
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
