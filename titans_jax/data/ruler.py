"""RULER's single-needle tasks (S-NIAH; Hsieh et al. 2024, the tasks of Titans' Table 2), in RULER's own formats.

    A special magic {type} is hidden within the following text. Make sure to memorize it. I will quiz you about the
    {type} afterwards.
    {haystack with the needle "One of the special magic {types} for {key} is: {value}." at a depth}
    What is the special magic {type} for {key} mentioned in the provided text? The special magic {type} for {key}
    mentioned in the provided text is{ value}

Kinds (`NIAH_TASKS`):
* "passkey" (RULER niah_single_1, Table 2's PK): a 7-digit number in RULER's repeated noise sentences.
* "number" (niah_single_2, N): a 7-digit number in natural prose (Shakespeare here; RULER uses essays).
* "word" (W): an adjective-noun word in prose.
* "uuid" (niah_single_3): a UUID in prose.

Keys are adjective-noun words from the `wonderwords` lists RULER draws from. The prompt is exactly `length` tokens:
the haystack is cut to fit and the needle sits at the sentence boundary closest to the depth asked for.
"""

from __future__ import annotations

import functools
import importlib.resources
import uuid

import numpy as np

from titans_jax.data import haystack as hay_lib
from titans_jax.data.qa import QAExample, answer_ids, check_length
from titans_jax.data.tokenizers import ByteTokenizer, Tokenizer

NIAH_TASKS = ("passkey", "number", "word", "uuid")
_VALUE_TYPE = {"passkey": "number", "number": "number", "word": "word", "uuid": "uuid"}
_HAYSTACK = {"passkey": "noise", "number": "shakespeare", "word": "shakespeare", "uuid": "shakespeare"}


@functools.lru_cache(maxsize=1)
def _word_lists() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The wonderwords adjective and noun lists RULER pairs into its keys and word values (read once)."""
    try:
        assets = importlib.resources.files("wonderwords") / "assets"
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("The needle tasks draw their keys from the wonderwords word lists: "
                                  "pip install wonderwords (or `make install`).") from e
    def read(name):
        return [w.strip() for w in (assets / name).read_text(encoding="utf-8").splitlines() if w.strip()]
    return tuple(read("adjectivelist.txt")), tuple(read("nounlist.txt"))


def _word(rng: np.random.Generator) -> str:
    # Uniform over RULER's adjective-noun pairs (6.2M of them), without building the list as RULER does.
    adjectives, nouns = _word_lists()
    return f"{adjectives[int(rng.integers(len(adjectives)))]}-{nouns[int(rng.integers(len(nouns)))]}"


def _value(rng: np.random.Generator, kind: str) -> str:
    if kind in ("passkey", "number"):
        return str(int(rng.integers(1_000_000, 10_000_000)))
    if kind == "word":
        return _word(rng)
    return str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "big"), version=4))


def texts(kind: str, key: str, value: str) -> dict[str, str]:
    """RULER's single-needle texts for a needle: "instruction", "needle", "question" and "answer_prefix". The needle
    is a line of its own among the noise blocks (RULER joins them with newlines), a sentence among prose."""
    t = _VALUE_TYPE[kind]
    return {
        "instruction": f"A special magic {t} is hidden within the following text. Make sure to memorize it. "
                       f"I will quiz you about the {t} afterwards.\n",
        "needle": f"One of the special magic {t}s for {key} is: {value}." + ("\n" if kind == "passkey" else " "),
        "question": f"\nWhat is the special magic {t} for {key} mentioned in the provided text?",
        "answer_prefix": f" The special magic {t} for {key} mentioned in the provided text is",
    }


def niah_example(seed, length: int, kind: str = "passkey", *, depth: float | None = None,
                 tokenizer: Tokenizer | None = None) -> QAExample:
    """One RULER single-needle prompt of exactly `length` tokens and its answer.

    Args:
      seed: anything `np.random.SeedSequence` accepts (an int, or a list of ints); the example is a pure function of
        it and the other arguments. The key and value do not depend on `length` or `depth`.
      length: prompt tokens (instruction, haystack with the needle, question, answer prefix).
      kind: one of `NIAH_TASKS`.
      depth: where the needle goes, as a fraction of the haystack (0: first, 1: last); None draws it uniformly.
      tokenizer: default bytes.

    Returns a `QAExample`; `info` holds "depth" (the needle's actual offset as a fraction of the haystack), "key",
    "needle_start" (the token offset of the needle sentence in the prompt) and "needle_len".
    """
    if kind not in NIAH_TASKS:
        raise ValueError(f"Unknown needle task {kind!r}; use one of {NIAH_TASKS}.")
    tok = tokenizer or ByteTokenizer()
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    key, value = _word(rng), _value(rng, kind)
    draw = rng.uniform()  # drawn whether or not `depth` is given, so the haystack does not depend on it
    hay_rng = np.random.default_rng(rng.integers(2**63))
    parts = {name: tok.encode(text) for name, text in texts(kind, key, value).items()}
    fixed = sum(len(p) for p in parts.values())
    check_length(length, fixed, f"a {kind!r} needle")
    hay = hay_lib.haystack(hay_rng, _HAYSTACK[kind], length - fixed, tok)
    cut = hay_lib.insertion_point(hay, draw if depth is None else depth)
    prompt = (parts["instruction"] + hay.tokens[:cut] + parts["needle"] + hay.tokens[cut:] + parts["question"]
              + parts["answer_prefix"])
    if len(prompt) != length:  # only if the haystack could not fill its budget
        raise ValueError(f"length={length}: the {_HAYSTACK[kind]} haystack holds fewer than {length - fixed} tokens")
    info = {"depth": cut / max(len(hay.tokens), 1), "key": key, "needle_start": len(parts["instruction"]) + cut,
            "needle_len": len(parts["needle"])}
    return QAExample(np.asarray(prompt, np.int32), np.asarray(answer_ids(value, tok), np.int32), value, info)
