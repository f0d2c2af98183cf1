"""Data reader throughput (issue 13): tokens/s one process reads from a prepared directory, against what the tiny
model's train step consumes.

For each `--seq-lens` value, `make_dataset(split="train")` (shuffled windows: random access over the shards) is
drained for `--seconds` after two warm-up batches, as process 0 of `--process-count`: the tokens/s are that one
process's rows (local batch x seq_len per batch). With `--train-config`, the trainer then runs that preset for
`--train-steps` steps on the same data (a subprocess, `python -m titans_jax.train`) and its median tokens/s after the
first three steps (compilation excluded) is the consumption the reader is compared with; the issue's floor is 20x.

    python -m experiments.bench_data [--data DIR|shakespeare] [--seq-lens 256 1024 4096] [--batch 16]
        [--process-count 1] [--seconds 3] [--train-config tiny-lmm] [--train-steps 12] [--out NAME]

Results: a table on stdout and `bench_results/<out>.json`. The files are read through the page cache: a corpus larger
than memory also pays for the disk (one or two records of `block_tokens` per window).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from experiments.bench_common import save
from titans_jax.data import builders, is_prepared, load_metadata, make_dataset


def reader_tokens_per_s(data: str, seq_len: int, batch: int, process_count: int, seconds: float) -> dict:
    """Drains this process's batches for `seconds`; returns tokens/s and batches/s."""
    it = make_dataset(data, split="train", seq_len=seq_len, global_batch_size=batch, seed=0, tokenizer=data,
                      process_index=0, process_count=process_count)
    for _ in range(2):
        next(it)
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        next(it)
        n += 1
    tokens = n * it.local_batch_size * seq_len
    return {"seq_len": seq_len, "local_batch": it.local_batch_size, "batches": n, "seconds": elapsed,
            "tokens_per_s": tokens / elapsed, "windows_per_s": n * it.local_batch_size / elapsed}


def train_tokens_per_s(data: str, config: str, steps: int, batch: int, seq_len: int) -> dict:
    """The trainer's own tokens/s (metrics.jsonl) for `steps` steps of `config` on `data`: median after step 3."""
    with tempfile.TemporaryDirectory() as workdir:
        cmd = [sys.executable, "-m", "titans_jax.train", "--config", config, "--workdir", workdir, "--data", data,
               "--tokenizer", data, "--steps", str(steps), "--batch-size", str(batch), "--seq-len", str(seq_len),
               "--set", "train.log_every=1", "train.eval_batches=1", "train.sample_tokens=0",
               f"train.eval_every={steps}", f"train.checkpoint_every={steps}"]
        start = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(out.stdout[-2000:] + out.stderr[-2000:])
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > 3]
    return {"config": config, "steps": steps, "batch": batch, "seq_len": seq_len, "wall_s": time.perf_counter() - start,
            "tokens_per_s": statistics.median(rates)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="shakespeare", help="a prepared directory, or a raw corpus spec (prepared first)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--batch", type=int, default=16, help="global batch")
    p.add_argument("--process-count", type=int, default=1, help="read as process 0 of this many")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--train-config", default=None, help="also time this preset's train step (e.g. tiny-lmm)")
    p.add_argument("--train-steps", type=int, default=12)
    p.add_argument("--train-seq-len", type=int, default=256)
    p.add_argument("--out", default="bench_data")
    args = p.parse_args(argv)

    data = args.data if is_prepared(args.data) else builders.prepare_cached(args.data)
    meta = load_metadata(data)
    rows = [reader_tokens_per_s(data, s, args.batch, args.process_count, args.seconds) for s in args.seq_lens]
    print(f"reader, {data}: {meta['num_tokens']:,} tokens, {meta['dtype']}, blocks of {meta['block_tokens']}, "
          f"{len(meta['splits']['train']['shards'])} train shards; process 0 of {args.process_count}")
    print("| seq_len | local batch | tokens/s | windows/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['seq_len']} | {r['local_batch']} | {r['tokens_per_s']:,.0f} | {r['windows_per_s']:,.0f} |")
    result = {"data": data, "num_tokens": meta["num_tokens"], "block_tokens": meta["block_tokens"],
              "process_count": args.process_count, "reader": rows}
    if args.train_config:
        train = train_tokens_per_s(data, args.train_config, args.train_steps, args.batch, args.train_seq_len)
        reader = next((r for r in rows if r["seq_len"] == args.train_seq_len), None) or reader_tokens_per_s(
            data, args.train_seq_len, args.batch, args.process_count, args.seconds)
        ratio = reader["tokens_per_s"] / train["tokens_per_s"]
        print(f"train {args.train_config} (batch {args.batch}, seq_len {args.train_seq_len}): "
              f"{train['tokens_per_s']:,.0f} tokens/s; reader / train = {ratio:,.0f}x (floor 20x)")
        result.update(train=train, reader_over_train=ratio)
    print("saved", save(args.out, result))
    return result


if __name__ == "__main__":
    main()
