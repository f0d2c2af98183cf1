"""The shape shared by the long-context question-answering tasks (RULER needles, BABILong-style stories): a prompt of
an exact number of tokens that ends with an answer prefix, and the answer that follows it.

Evaluation at length L feeds the prompt of `fit_to_length(make, L)` (prompt + answer = L tokens) and greedily decodes
`len(answer)` tokens; training at `seq_len` L (`training_sequence`) reads the same L tokens, then an end mark, and
scores the answer's tokens.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from titans_jax.data.tokenizers import Tokenizer


class QAExample(NamedTuple):
    """`prompt` int32[L] (exactly the length asked for); `answer` int32[n], the ids of the answer as it continues the
    prompt (with its leading space); `target` the answer's text, which a decoded answer must equal (stripped);
    `info` task details (e.g. "depth": where the needle sits, as a fraction of the haystack)."""

    prompt: np.ndarray
    answer: np.ndarray
    target: str
    info: dict[str, Any]


END = "."  # what follows the answer in a training sequence


def answer_ids(target: str, tok: Tokenizer) -> list[int]:
    """The ids of " target": the answer as the continuation of a prompt that ends with a word."""
    return tok.encode(" " + target)


def fit_to_length(make, length: int) -> QAExample:
    """The example whose prompt and answer together are exactly `length` tokens: what a model reads to produce the
    answer, so an evaluation at the training length puts the answer where training put it (relative to the model's
    chunk and segment boundaries, which a MAC model cannot see across).

    `make(prompt_len)` builds the example for a prompt length; the answer's length is known only once the example is
    drawn, so it is built twice at most (the draw is seeded and the answer drawn first, so it does not change).
    """
    try:
        guess = make(max(1, length - 16))
    except ValueError:  # the fixed text may fit length - len(answer) but not length - 16: learn the answer at length
        guess = make(length)
    prompt_len = length - len(guess.answer)
    ex = guess if prompt_len == len(guess.prompt) else make(prompt_len)
    if not np.array_equal(ex.answer, guess.answer):
        raise AssertionError("the example's answer changed with its length; tasks must draw the answer first")
    return ex


def training_sequence(make, total_len: int, tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """A training row of exactly `total_len` tokens: prompt, answer, end mark; and the loss mask of its targets.

    `make(prompt_len)` builds the example for a prompt length (see `fit_to_length`). Returns (tokens
    int32[total_len], mask float32[total_len - 1]) with mask 1 exactly at the targets that are the answer's tokens
    (target t is tokens[t + 1]): inputs tokens[:-1] are the prompt and the answer, as `fit_to_length(make, total_len
    - 1)` gives for evaluation.
    """
    end = tok.encode(END)
    ex = fit_to_length(make, total_len - len(end))
    tokens = np.concatenate([ex.prompt, ex.answer, np.asarray(end, np.int32)]).astype(np.int32)
    mask = np.zeros(total_len - 1, np.float32)
    mask[len(ex.prompt) - 1 : len(ex.prompt) - 1 + len(ex.answer)] = 1.0
    return tokens, mask


def check_length(length: int, fixed: int, what: str) -> None:
    if length < fixed:
        raise ValueError(f"length={length} is too short for {what}: its fixed text alone takes {fixed} tokens; use "
                         f"a length of at least {fixed + 16}.")
