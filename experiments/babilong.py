"""Figure 6 in miniature: BABILong-style question answering (bAbI stories qa1-qa5 hidden in Shakespeare) by length.

Each tiny variant is trained on the five tasks in turn (`--data babilong-mix`, the context scored at weight 0.05 as in
`experiments.niah`) at TRAIN_LEN tokens and evaluated by greedy decoding of the one-word answer at 1, 2, 4 and 8 times
that length. The seven variants of `experiments.niah`.

    python -m experiments.babilong            # experiments/results/babilong.json, docs/img/babilong_*.png
    python -m experiments.babilong --quick    # a smoke version

The paper's claim under test (its Figure 6): Titans keeps its accuracy as the story is spread over longer text.
"""

from __future__ import annotations

import os
import sys

from experiments import miniature

TRAIN_LEN = 640  # the longest story (qa3, 16 facts) with its question and answer takes up to 616 tokens
LENGTH_MULTIPLES = (1, 2, 4, 8)
TASKS = tuple(f"babilong-qa{i}" for i in range(1, 6))
FULL = dict(steps=150, batch_size=16, samples=10, variants=miniature.VARIANTS)
QUICK = dict(steps=2, batch_size=8, samples=2, variants=("mac",))


def run(args) -> dict:
    s = QUICK if args.quick else FULL
    variants = args.variants or s["variants"]
    path, img = miniature.out_paths("babilong", args.quick, args.out_dir)
    train_len = TRAIN_LEN
    lengths = [train_len * m for m in ((1, 2) if args.quick else LENGTH_MULTIPLES)]
    tasks = TASKS[:2] if args.quick else TASKS
    from titans_jax import eval as ev
    from titans_jax.export import load_model

    doc = {"experiment": "babilong", "train_len": train_len, "steps": s["steps"], "batch_size": s["batch_size"],
           "seed": args.seed, "lengths": lengths, "runs": {}}
    for variant in variants:
        workdir = os.path.join(args.workdir_root, f"babilong-{variant}{'-quick' if args.quick else ''}")
        train = miniature.train(workdir, f"tiny-{variant}", data="babilong-mix", steps=s["steps"], seq_len=train_len,
                                batch_size=s["batch_size"], seed=args.seed, sets=(miniature.CONTEXT_WEIGHT,),
                                quick=args.quick)
        model, _, tok = load_model(workdir)
        run_doc = {"train": train, "tasks": {}}
        for task in tasks:
            r = ev.evaluate(model, tok, task, lengths=lengths, samples=s["samples"], batch_size=min(10, s["samples"]),
                            seed=args.seed, name=f"tiny-{variant}")
            print(f"\n{variant} {task}\n{ev.table(r)}")
            run_doc["tasks"][task] = r
        doc["runs"][variant] = run_doc
        miniature.save(path, doc)
    plot_curves(doc, os.path.join(img, "babilong_accuracy.png"))
    return doc


def plot_curves(doc: dict, path: str) -> None:
    """Accuracy against length, one panel per task, one line per variant (as the paper's Figure 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for r in doc["runs"].values() for t in r["tasks"]})
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.2), sharey=True, squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for variant, r in doc["runs"].items():
            rows = r["tasks"][task]["results"]
            ax.plot([x["length"] for x in rows], [x["accuracy"] for x in rows], marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_title(task)
        ax.set_xlabel("length (tokens)")
        ax.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=7)
    miniature.save_figure(fig, path)


def main(argv=None) -> int:
    return miniature.main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
