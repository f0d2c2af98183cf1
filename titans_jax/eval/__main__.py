"""python -m titans_jax.eval --workdir RUN --task TASK [--lengths ...] [--depths ...] [--samples N] [--batch-size B]
[--seed S] [--out results.json] [--plot heatmap.png]

Evaluates a training workdir (its latest checkpoint, or --step) or an export on one task; prints a table and the
evaluation's tokens/s, and writes the JSON and PNG asked for.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from titans_jax.eval.tasks import NEEDLE_TASKS, TASKS

_EPILOG = f"""tasks:
  niah-passkey, niah-number, niah-word, niah-uuid  RULER's single-needle tasks (PK, N, W of the paper's Table 2, and
      UUID): accuracy of the greedily decoded value per length and needle depth (--depths)
  babilong-qa1 .. babilong-qa5  bAbI-style stories hidden in Shakespeare: accuracy of the one-word answer per length
  mqar  multi-query associative recall: accuracy at the queried keys per length and number of pairs (--pairs)
  ppl   bits per byte by position bucket (--bucket) on the held-out split of --data, at each length

default lengths: 1, 2, 4 and 8 times the run's training length (an export: its max_seq_len / 4 as the unit).
example:
  python -m titans_jax.eval --workdir runs/niah-mac --task niah-passkey --lengths 512 2048 --samples 20 \\
      --out results/niah.json --plot results/niah.png
(choices: {", ".join(TASKS)})"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m titans_jax.eval", description=__doc__.split("\n\n")[1],
                                epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a training workdir or an export (local or gs://...)")
    p.add_argument("--step", type=int, help="checkpoint step of a workdir (default: the latest)")
    p.add_argument("--task", required=True, choices=TASKS, metavar="TASK", help="what to evaluate (listed below)")
    p.add_argument("--lengths", type=int, nargs="+", help="context lengths in tokens")
    p.add_argument("--depths", type=float, nargs="+", help="needle depths in [0, 1] (default 0 0.25 0.5 0.75 1)")
    p.add_argument("--samples", type=int, default=20, help="examples per cell (default 20)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the examples (default 0)")
    p.add_argument("--pairs", type=int, nargs="+", help="mqar: key-value pairs per cell (default 4 8 16 32)")
    p.add_argument("--data", default="shakespeare", help="ppl: held-out text (its validation split)")
    p.add_argument("--bucket", type=int, help="ppl: position bucket width (default: the shortest length)")
    p.add_argument("--out", help="write the result JSON here")
    p.add_argument("--plot", help="write a PNG here: a length x depth heatmap for needles, curves otherwise")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def default_lengths(path: str, config) -> list[int]:
    """1, 2, 4, 8 x the run's training length (a workdir), or x max_seq_len / 4 (an export)."""
    from titans_jax import export
    from titans_jax.train import workdir as workdir_lib

    p = workdir_lib.path(path)
    if not export.is_export(p) and workdir_lib.config_path(p).exists():
        base = json.loads(workdir_lib.config_path(p).read_text())["train"]["seq_len"]
    else:
        base = max(64, config.max_seq_len // 4)
    return [base * m for m in (1, 2, 4, 8)]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%X")
    from titans_jax.eval import evaluate, report
    from titans_jax.export import load_model

    if args.depths is not None and args.task not in NEEDLE_TASKS:
        print(f"error: --depths applies to the needle tasks ({', '.join(NEEDLE_TASKS)}), not {args.task}",
              file=sys.stderr)
        return 2
    try:
        model, config, tokenizer = load_model(args.workdir, step=args.step)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lengths = args.lengths or default_lengths(args.workdir, config)
    kwargs = {} if args.pairs is None else {"num_pairs": args.pairs}
    try:
        result = evaluate(model, tokenizer, args.task, lengths=lengths, depths=args.depths, samples=args.samples,
                          batch_size=args.batch_size, seed=args.seed, data=args.data, bucket=args.bucket,
                          progress=not args.no_progress, name=str(args.workdir).rstrip("/").split("/")[-1], **kwargs)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result["workdir"] = str(args.workdir)
    print(report.table(result))
    t = result["timing"]
    print(f"{t['tokens']} tokens in {t['seconds']:.1f} s; {t['tokens_per_s']:,.0f} tokens/s after compilation")
    if args.out:
        report.write_json(result, args.out)
        print(f"wrote {args.out}")
    if args.plot:
        print(f"wrote {report.plot(result, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
