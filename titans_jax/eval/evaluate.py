"""`evaluate(model, tokenizer, task, ...)`: one task at several lengths, as the JSON document the command line writes:

    {"task": ..., "model": {...config...}, "results": [{"length": L, "depth": d, "accuracy": a, "samples": n}, ...],
     "timing": {"tokens_per_s": ..., ...}, "settings": {...}, "versions": {...}}
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import numpy as np

from titans_jax.eval import runner
from titans_jax.eval.tasks import DEFAULT_DEPTHS, NEEDLE_TASKS, QA_TASKS, check_task

DEFAULT_PAIRS = (4, 8, 16, 32)


def _versions() -> dict:
    """What the numbers depend on: the libraries, the backend, and the word lists the needle keys are drawn from."""
    import importlib.metadata

    import flax

    return {"jax": jax.__version__, "flax": flax.__version__, "backend": jax.default_backend(),
            "wonderwords": importlib.metadata.version("wonderwords")}


def held_out_windows(data: str, tokenizer_spec: str, batch_size: int, samples: int):
    """`windows(length)` for `evaluate_ppl`: the validation split of `data` (a corpus spec or prepared directory) in
    windows of length + 1 tokens, batches of `batch_size`, at most `samples` windows (whole batches)."""
    from titans_jax.data import eval_batches

    def windows(length: int):
        batches = max(1, samples // batch_size)
        for batch in eval_batches(data, seq_len=length, global_batch_size=batch_size, max_batches=batches,
                                  tokenizer=tokenizer_spec):
            yield batch["tokens"]

    return windows


def tokenizer_spec(tokenizer) -> str:
    """The spec `get_tokenizer` rebuilds `tokenizer` from: "bytes", or its file."""
    files = tokenizer.files()
    return files[0] if files else "bytes"


def evaluate(model, tokenizer, task: str, *, lengths: Sequence[int], depths: Sequence[float] | None = None,
             samples: int = 20, batch_size: int = 8, seed: int = 0, num_pairs: Sequence[int] = DEFAULT_PAIRS,
             data: str = "shakespeare", bucket: int | None = None, progress: bool = True,
             memory_stats: bool = True, name: str | None = None) -> dict:
    """Evaluates `model` on `task` (`titans_jax.eval.TASKS`) at each length; returns the result document.

    Args:
      model, tokenizer: a `TitansLM` and its tokenizer (`titans_jax.load_model(path)` gives both).
      task: a needle task (accuracy per length and depth), a babilong task (per length), "mqar" (per length and
        number of pairs) or "ppl" (bits per byte per position bucket at each length).
      lengths: prompt lengths in tokens (for "ppl" and "mqar": sequence lengths).
      depths: needle depths as fractions of the context (needle tasks; default 0, 0.25, 0.5, 0.75, 1).
      samples: examples per cell (for "ppl": held-out windows per length, rounded down to whole batches).
      batch_size: rows per forward pass.
      seed: the examples' seed.
      num_pairs: key-value pairs of the "mqar" cells.
      data: the held-out text of "ppl" (its validation split).
      bucket: "ppl"'s position-bucket width (default: the shortest length).
      memory_stats: record the memory's statistics (`titans_jax.diagnostics.memory_stats`) on the first batch at the
        longest length, when the model has a memory.
      name: a label for the model (plots, tables).
    """
    check_task(task)
    _check_lengths(lengths)
    if samples < 1 or batch_size < 1:
        raise ValueError(f"samples and batch_size must be >= 1, got samples={samples}, batch_size={batch_size}")
    if depths is not None and task not in NEEDLE_TASKS:
        raise ValueError(f"--depths applies to the needle tasks ({', '.join(NEEDLE_TASKS)}), not {task!r}")
    if task in NEEDLE_TASKS:
        depths = tuple(DEFAULT_DEPTHS if depths is None else depths)
        if not depths:
            raise ValueError("depths must name at least one depth in [0, 1] (or be None for the default five)")
        bad = [d for d in depths if not 0.0 <= d <= 1.0]
        if bad:
            raise ValueError(f"depths must lie in [0, 1] (fractions of the context), got {bad}")
    stats: dict = {}

    def record_stats(prompts_BxL: np.ndarray) -> None:
        if memory_stats and model.config.has_memory:
            from titans_jax.diagnostics import memory_stats as compute

            stats.update({k: float(v) for k, v in compute(model, prompts_BxL).items()})

    start = time.perf_counter()
    settings = {"lengths": [int(x) for x in lengths], "samples": samples, "batch_size": batch_size, "seed": seed}
    if task in QA_TASKS:
        rows, timing = runner.evaluate_qa(model, tokenizer, task, lengths, samples=samples, batch_size=batch_size,
                                          seed=seed, depths=depths, progress=progress, on_batch=record_stats)
        if depths is not None:
            settings["depths"] = [float(d) for d in depths]
    elif task == "mqar":
        rows, timing = runner.evaluate_mqar(model, lengths, num_pairs, samples=samples, batch_size=batch_size,
                                            seed=seed, progress=progress)
        settings["num_pairs"] = [int(p) for p in num_pairs]
    else:
        bucket = int(bucket or min(lengths))
        windows = held_out_windows(data, tokenizer_spec(tokenizer), batch_size, samples)
        rows, timing = runner.evaluate_ppl(model, tokenizer, windows, lengths, bucket=bucket, progress=progress)
        settings.update(data=data, bucket=bucket)
    out = {"task": task, "name": name or model.config.variant, "model": model.config.to_dict(), "results": rows,
           "timing": {**timing.to_dict(), "wall_seconds": round(time.perf_counter() - start, 3)},
           "settings": settings, "versions": _versions()}
    if stats:
        out["memory_stats"] = stats
    return out


def _check_lengths(lengths: Sequence[int]) -> None:
    if not lengths:
        raise ValueError("lengths must name at least one length")
    bad = [x for x in lengths if isinstance(x, bool) or int(x) != x or x < 1]
    if bad:
        raise ValueError(f"lengths must be positive integers (tokens), got {bad}")
