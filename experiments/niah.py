"""Table 2 in miniature: RULER's single-needle tasks (S-NIAH) far beyond the attention window.

Each tiny variant (window and MAC segment 64 tokens) is trained on RULER-format needles (`--data niah-mix`: pass-key,
number and word needles in turn) at TRAIN_LEN tokens, then evaluated with greedy decoding at 1, 2, 4 and 8 times
that length, at five needle depths, on the three needle kinds of the paper's Table 2 (PK, N, W).

    python -m experiments.niah            # the full run: experiments/results/niah.json, docs/img/niah/*.png
    python -m experiments.niah --quick    # a smoke version (two variants, a few steps)

The paper's claim under test: the memory variants keep their accuracy as the needle moves beyond the window, where
sliding-window attention cannot reach it.
"""

from __future__ import annotations

import os
import sys

from experiments import miniature

TRAIN_LEN = 512
LENGTH_MULTIPLES = (1, 2, 4, 8)
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
KINDS = ("niah-passkey", "niah-number", "niah-word")
FULL = dict(steps=300, batch_size=16, samples=10, variants=miniature.VARIANTS)
QUICK = dict(steps=2, batch_size=8, samples=2, variants=("mac",))


def run(args) -> dict:
    s = QUICK if args.quick else FULL
    variants = args.variants or s["variants"]
    path, img = miniature.out_paths("niah", args.quick, args.out_dir)
    train_len = TRAIN_LEN
    lengths = [train_len * m for m in ((1, 2) if args.quick else LENGTH_MULTIPLES)]
    depths = (0.0, 1.0) if args.quick else DEPTHS
    from titans_jax import eval as ev
    from titans_jax.export import load_model

    doc = {"experiment": "niah", "train_len": train_len, "steps": s["steps"], "batch_size": s["batch_size"],
           "seed": args.seed, "lengths": lengths, "depths": list(depths), "runs": {}}
    for variant in variants:
        workdir = os.path.join(args.workdir_root, f"niah-{variant}{'-quick' if args.quick else ''}")
        train = miniature.train(workdir, f"tiny-{variant}", data="niah-mix", steps=s["steps"], seq_len=train_len,
                                batch_size=s["batch_size"], seed=args.seed, sets=NEEDLE_TRAINING, quick=args.quick)
        model, _, tok = load_model(workdir)
        run_doc = {"train": train, "tasks": {}}
        for task in KINDS:
            r = ev.evaluate(model, tok, task, lengths=lengths, depths=depths, samples=s["samples"],
                            batch_size=min(10, s["samples"]), seed=args.seed, name=f"tiny-{variant}")
            print(f"\n{variant} {task}\n{ev.table(r)}")
            run_doc["tasks"][task] = r
            ev.plot(r, os.path.join(img, "niah", f"{variant}_{task}.png"), title=f"tiny-{variant} {task}")
        doc["runs"][variant] = run_doc
        miniature.save(path, doc)  # after every variant: an interrupted run keeps what it measured
    return doc


NEEDLE_TRAINING = (miniature.CONTEXT_WEIGHT, "train.log_every=20")


def main(argv=None) -> int:
    return miniature.main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
