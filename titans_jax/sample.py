"""Sample from a trained run: `python -m titans_jax.sample --workdir DIR --prompt TEXT [--max-new-tokens N]
[--temperature T] [--top-k K] [--seed S] [--step STEP]`.

Reads the run's config from DIR/config.json, restores the latest (or the given) checkpoint onto the local devices,
and prints the prompt followed by the generated text.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

from titans_jax.checkpoint import Checkpointer
from titans_jax.data import get_tokenizer
from titans_jax.sharding import make_mesh
from titans_jax.train.config import load_config
from titans_jax.train.optim import make_optimizer
from titans_jax.train.state import abstract_train_state, model_of, titans_model_fn
from titans_jax.train.workdir import checkpoint_dir, config_path


def load_model(workdir: str, step: int | None = None):
    """`(model, tokenizer, run_config, step)` of a run's checkpoint (the latest when `step` is None).

    Raises:
      FileNotFoundError: without DIR/config.json or a committed checkpoint.
    """
    path = config_path(workdir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir!r} a training workdir?")
    cfg = load_config(path).resolved()
    tokenizer = get_tokenizer(cfg.train.tokenizer)
    tx, _ = make_optimizer(cfg.train)
    # The checkpoint holds model and optimizer together; restore both, replicated over this host's devices.
    mesh = make_mesh(None, devices=jax.local_devices())
    graphdef, abstract = abstract_train_state(titans_model_fn(cfg.model, cfg.train.seed), tx, mesh)
    with Checkpointer(checkpoint_dir(workdir), async_save=False) as ckpt:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no committed checkpoint in {ckpt.directory}")
        state, _ = ckpt.restore(step, abstract)
    return model_of(graphdef, state), tokenizer, cfg, step


def sample(workdir: str, prompt: str, max_new_tokens: int = 200, *, temperature: float = 1.0,
           top_k: int | None = None, seed: int = 0, step: int | None = None) -> str:
    """The prompt and its continuation, decoded."""
    from titans_jax.generate import generate

    model, tokenizer, _, _ = load_model(workdir, step)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens; pass a non-empty --prompt")
    out = generate(model, np.asarray([ids], np.int32), max_new_tokens, temperature=temperature, top_k=top_k,
                   rng=jax.random.key(seed))
    return tokenizer.decode(np.asarray(out)[0].tolist())


def main(argv: list[str] | None = None) -> int:
    """Command line; returns the exit status (2 for a missing workdir, config or checkpoint, or bad arguments)."""
    p = argparse.ArgumentParser(prog="python -m titans_jax.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", default="\n")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    args = p.parse_args(argv)
    try:
        text = sample(args.workdir, args.prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      seed=args.seed, step=args.step)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
