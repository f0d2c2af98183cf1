"""Does AdamW's weight decay on the learned initial memory W_0 shrink its last matrix over a long schedule?

The deep memory's last matrix sits behind its LayerNorm (docs/architecture.md, "Training stability"): the output does
not depend on its scale, so no gradient pushes back against decoupled weight decay, and a smaller W_0 means a larger
relative step for the inner loop. Two runs of the same tiny MAC model, same data and seed, at the paper's weight decay
(0.1): one decays W_0 (the trainer's default before 2026-11-30), one does not (``memory_init`` in
``optim.NO_DECAY_KEYWORDS``, the default since this measurement).
Every ``--checkpoint-every`` steps the RMS of each W_0 matrix is read back from the checkpoint; validation bits per byte
and the largest gradient norm come from ``metrics.jsonl``.

    python -m experiments.probe_w0_decay [--steps 2000] [--out probe_w0_decay]

Writes ``experiments/results/<out>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np

RUN_ARGS = ["--config", "tiny-mac", "--batch-size", "8", "--seq-len", "128", "--cpu-devices", "2",
            "--set", "train.weight_decay=0.1", "train.warmup=100", "train.sample_tokens=0", "train.log_every=50"]


def _w0_rms(workdir: str) -> dict[int, list[float]]:
    """Step -> RMS of each W_0 matrix (averaged over layers and heads), from every checkpoint of the run."""
    from titans_jax import load_model
    from titans_jax.checkpoint import Checkpointer
    from titans_jax.train.workdir import checkpoint_dir

    with Checkpointer(checkpoint_dir(workdir), async_save=False, read_only=True) as ckpt:
        steps = ckpt.all_steps()
    out = {}
    for step in steps:
        model, _, _ = load_model(workdir, step=step)
        mats = model.blocks.mixer.memory.memory_init
        out[step] = [float(np.sqrt(np.mean(np.square(np.asarray(w[...], np.float64))))) for w in mats]
    return out


def _metrics(workdir: str) -> dict:
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = {r["step"]: r["val_bpb"] for r in records if "val_bpb" in r}
    grads = [r["grad_norm"] for r in records if "grad_norm" in r]
    return {"val_bits_per_byte": evals, "max_grad_norm": max(grads) if grads else None}


def run(decay_w0: bool, steps: int, every: int, root: str) -> dict:
    from titans_jax.train import __main__ as cli
    from titans_jax.train import optim

    workdir = os.path.join(root, "decayed" if decay_w0 else "not_decayed")
    shutil.rmtree(workdir, ignore_errors=True)
    base = tuple(k for k in optim.NO_DECAY_KEYWORDS if k != "memory_init")
    default = optim.NO_DECAY_KEYWORDS
    optim.NO_DECAY_KEYWORDS = base if decay_w0 else (*base, "memory_init")
    status = cli.main([*RUN_ARGS, "--workdir", workdir, "--steps", str(steps), "--eval-every", str(every),
                       "--checkpoint-every", str(every), "--set", f"train.keep_checkpoints={steps // every + 1}"])
    optim.NO_DECAY_KEYWORDS = default
    return {"decay_w0": decay_w0, "status": status, "w0_rms": _w0_rms(workdir), **_metrics(workdir)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--root", default="runs/probe_w0_decay")
    ap.add_argument("--out", default="probe_w0_decay")
    args = ap.parse_args(argv)
    result = {"run_args": RUN_ARGS, "steps": args.steps,
              "runs": [run(flag, args.steps, args.every, args.root) for flag in (True, False)]}
    path = os.path.join(os.path.dirname(__file__), "results", f"{args.out}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    for r in result["runs"]:
        print(f"decay W_0={r['decay_w0']}: status {r['status']}, max grad norm {r['max_grad_norm']}")
        for step, rms in sorted(r["w0_rms"].items()):
            print(f"  step {step:5d}  W_0 RMS per matrix {[round(x, 4) for x in rms]}  "
                  f"val bpb {r['val_bits_per_byte'].get(step)}")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
