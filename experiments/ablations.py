"""Table 5 in miniature: the LMM with one component changed at a time.

Rows (the paper's): LMM; +attention as MAC, MAG, MAL; linear memory (depth 1); without convolution (a one-tap
conv, which mixes nothing across time); without momentum; without forgetting (weight decay); without persistent memory.
Each row is trained twice from the same seed: on Shakespeare (language modelling, validation bits per byte) and on
the long-context tasks (RULER needles and BABILong stories in turn, `--data longctx-mix`), then scored by greedy
accuracy on needles and stories at 4x the training length.

    python -m experiments.ablations            # experiments/results/ablations.json, docs/img/ablations.png
    python -m experiments.ablations --quick

The paper's claim under test: every component helps, and forgetting > momentum > convolution > persistent memory.
"""

from __future__ import annotations

import os
import sys

from experiments import miniature

ROWS = {  # row -> (preset, --set overrides)
    "LMM": ("tiny-lmm", ()),
    "+Attn (MAC)": ("tiny-mac", ()),
    "+Attn (MAG)": ("tiny-mag", ()),
    "+Attn (MAL)": ("tiny-mal", ()),
    "Linear Memory": ("tiny-lmm", ("model.memory_depth=1",)),
    "w/o Convolution": ("tiny-lmm", ("model.conv_kernel=1",)),
    "w/o Momentum": ("tiny-lmm", ("model.memory_momentum=false",)),
    "w/o Weight Decay": ("tiny-lmm", ("model.memory_decay=false",)),
    "w/o Persistent Memory": ("tiny-lmm", ("model.num_persistent=0",)),
}
# The paper's Table 5 (400M scale): LM perplexity, reasoning accuracy, long-context accuracy.
PAPER = {
    "LMM": (27.01, 47.83, 92.68), "+Attn (MAC)": (26.67, 48.65, 97.95), "+Attn (MAG)": (25.70, 48.60, 96.70),
    "+Attn (MAL)": (25.91, 47.87, 96.91), "Linear Memory": (28.49, 46.97, 85.34),
    "w/o Convolution": (28.73, 45.82, 90.28), "w/o Momentum": (28.98, 45.49, 87.12),
    "w/o Weight Decay": (29.04, 45.11, 85.60), "w/o Persistent Memory": (27.63, 46.35, 92.49),
}
LM = dict(steps=200, batch_size=16, seq_len=256)
LONG = dict(steps=120, batch_size=16, seq_len=640, samples=10)
QUICK_LM = dict(steps=2, batch_size=8, seq_len=64)
QUICK_LONG = dict(steps=2, batch_size=8, seq_len=640, samples=2)
LONG_TASKS = ("niah-passkey", "niah-number", "niah-word", "babilong-qa1", "babilong-qa2")


def run(args) -> dict:
    lm, long = (QUICK_LM, QUICK_LONG) if args.quick else (LM, LONG)
    unknown = sorted(set(args.variants or ()) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; the rows are {list(ROWS)}")
    rows = [r for r in ROWS if not args.variants or r in args.variants]
    if args.quick:
        rows = rows[:1]
    path, img = miniature.out_paths("ablations", args.quick, args.out_dir)
    from titans_jax import eval as ev
    from titans_jax.export import load_model

    doc = {"experiment": "ablations", "lm": lm, "long": long, "seed": args.seed, "long_tasks": list(LONG_TASKS),
           "eval_length": 4 * long["seq_len"], "rows": {}}
    for row in rows:
        preset, sets = ROWS[row]
        slug = row.lower().replace(" ", "-").replace("/", "").replace("(", "").replace(")", "").replace("+", "plus")
        suffix = "-quick" if args.quick else ""
        lm_train = miniature.train(os.path.join(args.workdir_root, f"ablation-lm-{slug}{suffix}"), preset,
                                   data="shakespeare", steps=lm["steps"], seq_len=lm["seq_len"],
                                   batch_size=lm["batch_size"], seed=args.seed, sets=sets, quick=args.quick)
        accs = {}
        for task in () if args.skip_long else LONG_TASKS:
            if not accs:
                long_dir = os.path.join(args.workdir_root, f"ablation-long-{slug}{suffix}")
                miniature.train(long_dir, preset, data="longctx-mix", steps=long["steps"], seq_len=long["seq_len"],
                                batch_size=long["batch_size"], seed=args.seed,
                                sets=(*sets, miniature.CONTEXT_WEIGHT), quick=args.quick)
                model, _, tok = load_model(long_dir)
            r = ev.evaluate(model, tok, task, lengths=[4 * long["seq_len"]],
                            depths=[0.0, 0.5, 1.0] if task.startswith("niah") else None, samples=long["samples"],
                            batch_size=min(10, long["samples"]), seed=args.seed, progress=False, memory_stats=False)
            accs[task] = sum(x["accuracy"] * x["samples"] for x in r["results"]) / sum(
                x["samples"] for x in r["results"])
        doc["rows"][row] = {"preset": preset, "overrides": list(sets), "val_bpb": lm_train.get("val_bpb"),
                            "long_context_accuracy": sum(accs.values()) / len(accs) if accs else None,
                            "accuracy_by_task": accs,
                            "paper": dict(zip(("lm_ppl", "reasoning_acc", "long_context_acc"), PAPER[row],
                                              strict=True))}
        print(f"{row}: val bpb {lm_train.get('val_bpb')}, long-context accuracy {doc['rows'][row]['long_context_accuracy']}")
        miniature.save(path, doc)
    plot_rows(doc, os.path.join(img, "ablations.png"))
    return doc


def plot_rows(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["rows"])
    measured = [n for n in names if doc["rows"][n]["long_context_accuracy"] is not None]
    fig, axes = plt.subplots(1, 2 if measured else 1, figsize=(10 if measured else 6, 0.45 * len(names) + 1.5),
                             sharey=True, squeeze=False)
    a = axes[0][0]
    a.barh(names, [doc["rows"][n]["val_bpb"] or 0 for n in names])
    a.set_xlabel("validation bits per byte (lower is better)")
    if measured:  # rows run with --skip-long have no long-context accuracy
        b = axes[0][1]
        b.barh(names, [doc["rows"][n]["long_context_accuracy"] or 0.0 for n in names], color="tab:green")
        b.set_xlabel("long-context accuracy at 4x training length")
    a.invert_yaxis()
    miniature.save_figure(fig, path)


def _add_skip_long(p) -> None:
    p.add_argument("--skip-long", action="store_true", help="language modelling only: no long-context training")


def main(argv=None) -> int:
    return miniature.main(run, __doc__, argv, _add_skip_long)


if __name__ == "__main__":
    sys.exit(main())
