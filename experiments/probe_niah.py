"""Why a needle run scores what it scores: finer measurements than exact-match accuracy, on a trained workdir.

* per-digit accuracy of the value, teacher-forced (the argmax at each answer position given the true digits before
  it; chance is 1/10), by length and depth: learning shows here long before whole 7-digit values come out right;
* the first answer token (a space) and the answer's mean loss in nats (chance for a digit: ln 10 = 2.30);
* the memory's statistics on the same prompts (gate means, the memory's loss before and after each chunk's update)
  and the share of a memory write that survives forgetting over the distance from the needle to the question,
  prod(1 - alpha) ~ (1 - mean alpha)^distance.

    python -m experiments.probe_niah --workdir runs/niah-mac [--lengths 512 2048] [--samples 32]
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--task", default="niah-passkey", choices=("niah-passkey", "niah-number"),
                   help="a needle whose value is 7 digits")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args(argv)
    from titans_jax import eval as ev
    from titans_jax.diagnostics import memory_stats
    from titans_jax.export import load_model

    model, config, tok = load_model(args.workdir)
    rows = []
    for length in args.lengths:
        for depth in args.depths:
            exs = [ev.qa_example(args.task, 0, i, length, tok, depth=depth) for i in range(args.samples)]
            n = len(exs[0].answer)
            exs = [e for e in exs if len(e.answer) == n]  # with bytes, all of them
            full = np.stack([np.concatenate([e.prompt, e.answer]) for e in exs])
            prompt_len = full.shape[1] - n  # prompt + answer = length
            logits = model(jnp.asarray(full[:, :-1]))
            logp = jax.nn.log_softmax(logits[:, prompt_len - 1:], axis=-1)
            target = full[:, prompt_len:]
            pred = np.asarray(jnp.argmax(logp, axis=-1))
            nll = -np.take_along_axis(np.asarray(logp), target[..., None], axis=-1)[..., 0]
            row = {"length": length, "depth": depth, "first_token_accuracy": float((pred[:, 0] == target[:, 0]).mean()),
                   "digit_accuracy": float((pred[:, 1:] == target[:, 1:]).mean()),
                   "digit_loss_nats": float(nll[:, 1:].mean()), "chance_digit_loss_nats": math.log(10)}
            if config.has_memory:
                stats = memory_stats(model, full[:, :prompt_len])
                alphas = [v for k, v in stats.items() if k.endswith("/alpha")]
                needle = np.mean([e.info["needle_start"] for e in exs])
                distance = prompt_len - needle
                row["memory"] = stats
                row["needle_to_question_tokens"] = float(distance)
                row["write_surviving_forgetting"] = [float((1 - a) ** distance) for a in alphas]
            rows.append(row)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                              if k != "memory"}))
    if args.out:
        from titans_jax.eval import write_json

        write_json({"workdir": args.workdir, "task": args.task, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
