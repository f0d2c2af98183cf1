"""Figures 7 and 8 in miniature: the depth of the memory MLP (L_M = 1 to 4) for the LMM.

* Figure 7: each depth is trained on Shakespeare at TRAIN_LEN tokens, then bits per byte by position bucket on the
  held-out split at 1, 2, 4 and 8 times that length (does loss keep falling with position past the training length?).
* Figure 8: training throughput (forward + backward, tokens/s on this CPU, one device) against depth and sequence
  length, at a constant number of tokens per step.

    python -m experiments.memory_depth            # experiments/results/memory_depth.json, docs/img/memory_depth_*.png
    python -m experiments.memory_depth --quick

The paper's claims under test: deeper memory gives lower perplexity at every length and is more robust to length;
throughput stays roughly constant with sequence length and falls roughly linearly with depth.
"""

from __future__ import annotations

import os
import sys

from experiments import miniature

TRAIN_LEN = 256
DEPTHS = (1, 2, 3, 4)
FULL = dict(steps=300, batch_size=16, samples=32, throughput_lengths=(256, 512, 1024, 2048), tokens_per_step=8192)
QUICK = dict(steps=2, batch_size=8, samples=4, throughput_lengths=(64,), tokens_per_step=128)


def throughput(depth: int, seq_len: int, tokens_per_step: int) -> float:
    """Tokens/s of a jitted forward + backward of tiny-lmm with `depth` on one device (fastest of 3 calls)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from experiments.bench_common import time_fn
    from titans_jax.configs import get_config
    from titans_jax.model import TitansLM

    model = TitansLM(get_config("tiny-lmm", memory_depth=depth, max_seq_len=seq_len), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    batch = max(1, tokens_per_step // seq_len)
    tokens = jax.random.randint(jax.random.key(0), (batch, seq_len + 1), 0, 256)

    @jax.jit
    def loss_and_grad(p, t):
        def loss(p):
            logits = nnx.merge(graphdef, p)(t[:, :-1])
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, 1:, None], axis=-1).mean()

        return jax.value_and_grad(loss)(p)

    _, best = time_fn(loss_and_grad, params, tokens, repeats=3)
    return batch * seq_len / best


def run(args) -> dict:
    s = QUICK if args.quick else FULL
    path, img = miniature.out_paths("memory_depth", args.quick, args.out_dir)
    train_len = 64 if args.quick else TRAIN_LEN
    depths = DEPTHS[:1] if args.quick else DEPTHS
    lengths = [train_len * m for m in ((1, 2) if args.quick else (1, 2, 4, 8))]
    from titans_jax import eval as ev
    from titans_jax.export import load_model

    doc = {"experiment": "memory_depth", "train_len": train_len, "steps": s["steps"], "batch_size": s["batch_size"],
           "seed": args.seed, "lengths": lengths, "depths": {}, "throughput": []}
    for depth in depths:
        workdir = os.path.join(args.workdir_root, f"depth-lmm-{depth}{'-quick' if args.quick else ''}")
        train = miniature.train(workdir, "tiny-lmm", data="shakespeare", steps=s["steps"], seq_len=train_len,
                                batch_size=s["batch_size"], seed=args.seed, sets=(f"model.memory_depth={depth}",),
                                quick=args.quick)
        model, _, tok = load_model(workdir)
        r = ev.evaluate(model, tok, "ppl", lengths=lengths, samples=s["samples"], batch_size=4, bucket=train_len,
                        seed=args.seed, name=f"LMM depth {depth}")
        print(f"\ndepth {depth}\n{ev.table(r)}")
        doc["depths"][str(depth)] = {"train": train, "ppl": r}
        miniature.save(path, doc)
    for depth in depths:
        for seq_len in s["throughput_lengths"]:
            tps = throughput(depth, seq_len, s["tokens_per_step"])
            doc["throughput"].append({"depth": depth, "seq_len": seq_len, "tokens_per_s": round(tps, 1)})
            print(f"depth {depth} seq_len {seq_len}: {tps:,.0f} tokens/s")
    miniature.save(path, doc)
    plot(doc, img)
    return doc


def plot(doc: dict, folder: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    longest = max(doc["lengths"])
    for depth, d in doc["depths"].items():
        rows = [r for r in d["ppl"]["results"] if r["length"] == longest]
        ax.plot([sum(r["position_bucket"]) / 2 for r in rows], [r["bits_per_byte"] for r in rows], marker="o",
                label=f"L_M = {depth}")
    ax.axvline(doc["train_len"], color="grey", linestyle=":", label="training length")
    ax.set_xlabel(f"position in a {longest}-token window (bucket centre)")
    ax.set_ylabel("bits per byte (held-out Shakespeare)")
    ax.legend()
    miniature.save_figure(fig, os.path.join(folder, "memory_depth_ppl.png"))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for depth in sorted({r["depth"] for r in doc["throughput"]}):
        rows = [r for r in doc["throughput"] if r["depth"] == depth]
        ax.plot([r["seq_len"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=f"L_M = {depth}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens per step constant)")
    ax.set_ylabel("training tokens/s (forward + backward, 1 CPU device)")
    ax.legend()
    miniature.save_figure(fig, os.path.join(folder, "memory_depth_throughput.png"))


def main(argv=None) -> int:
    return miniature.main(run, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
