"""The evaluation tasks and their examples, deterministic from a seed.

* Needle tasks (`NEEDLE_TASKS`): RULER's single-needle prompts (`titans_jax.data.ruler`), scored by greedy decoding of
  the answer, per (length, depth).
* BABILong-style tasks (`BABILONG_TASKS`): bAbI stories hidden in Shakespeare (`titans_jax.data.babilong`), scored
  by greedy decoding of the one-word answer, per length.
* "mqar": multi-query associative recall (`titans_jax.data.synthetic.mqar_example`), the accuracy of the next-token
  argmax at the queried keys, per (number of pairs, length).
* "ppl": bits per byte by position bucket on held-out text, per length.

Example i of a task is drawn from SeedSequence([seed, task id, i]) at every length and depth: the same keys, values
and stories are asked at every length (only the haystack and the needle's place change), so accuracy across lengths
compares like with like.
"""

from __future__ import annotations

import zlib

from titans_jax.data import ruler
from titans_jax.data.qa import QAExample, fit_to_length
from titans_jax.data.tokenizers import Tokenizer

NEEDLE_TASKS = tuple(f"niah-{k}" for k in ruler.NIAH_TASKS)
BABILONG_TASKS = tuple(f"babilong-qa{i}" for i in range(1, 6))
QA_TASKS = NEEDLE_TASKS + BABILONG_TASKS
TASKS = (*QA_TASKS, "mqar", "ppl")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; use one of {', '.join(TASKS)}.")


def task_id(task: str) -> int:
    """A stable integer per task name (seeds must not depend on Python's per-process string hashing)."""
    return zlib.crc32(task.encode())


def qa_example(task: str, seed: int, index: int, length: int, tokenizer: Tokenizer,
               depth: float | None = None) -> QAExample:
    """Example `index` of a question-answering task (`QA_TASKS`) at `length`: its prompt and answer together are
    exactly `length` tokens (what the model reads, as a training sequence of `seq_len` = `length`; RULER counts the
    prompt alone, a difference of the answer's few tokens). `depth` places a needle (needle tasks only; None: a
    seeded depth)."""
    check_task(task)
    key = [int(seed), task_id(task), int(index)]
    kind = task.split("-", 1)[1]
    if task in NEEDLE_TASKS:
        make = lambda n: ruler.niah_example(key, n, kind, depth=depth, tokenizer=tokenizer)
    elif task in BABILONG_TASKS:
        if depth is not None:
            raise ValueError(f"depth applies to the needle tasks only, not {task!r}")
        from titans_jax.data import babilong

        make = lambda n: babilong.babilong_example(key, n, kind, tokenizer=tokenizer)
    else:
        raise ValueError(f"{task!r} is not a question-answering task; use one of {', '.join(QA_TASKS)}.")
    return fit_to_length(make, length)
