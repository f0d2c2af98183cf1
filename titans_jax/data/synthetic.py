"""Synthetic tasks with known answers, deterministic from a seed.

* Needle in a haystack, after RULER's single-needle tasks (S-NIAH): filler text, the needle sentence
  "The special magic {kind} is {value}." at a seeded depth, and at the end a question whose answer is the value.
  Kinds: "passkey" (5 digits, in RULER's repeated "noise" haystack), "number" (7 digits) and "word"
  (an adjective-noun pair), both in a haystack of shuffled plain sentences. The filler holds no digits and no
  hyphens, so the value appears exactly twice: in the needle and as the final answer.
* Multi-query associative recall (MQAR, Zoology, Arora et al. 2023): key-value pairs, then the keys again in a
  random order at random places, each followed by its value; only those values are predictable.

Examples are built token by token (segments are encoded separately and concatenated), so the answer positions are
exact for any tokenizer; with bytes every id is < 256. The tasks are designed for bytes: a SentencePiece model
works too, but it adds a word-start marker to each separately encoded segment and needs digits in its vocabulary
(train it with `byte_fallback=True`).
"""

from __future__ import annotations

import numpy as np

from titans_jax.data.tokenizers import ByteTokenizer, Tokenizer

NIAH_KINDS = ("passkey", "number", "word")
_KIND_TEXT = {"passkey": "pass key", "number": "number", "word": "word"}
_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_SENTENCES = (
    "The river ran slowly past the old mill.", "A cold wind came down from the hills that evening.",
    "Nobody in the village remembered who had built the bridge.", "She kept her letters in a wooden box.",
    "The market opened early and closed before the rain.", "He read the same book every winter.",
    "Lamps were lit along the harbour one by one.", "The garden was quiet except for the bees.",
    "Travellers often stopped at the inn for bread and soup.", "The clock in the tower had stopped years ago.",
    "Children chased the geese across the green.", "A letter arrived without a name on it.",
    "The baker sang while the ovens warmed.", "Fog covered the fields until noon.",
    "The teacher wrote a long sentence on the board.", "Ships waited outside the bay for the tide.",
    "The path through the forest was narrow and dark.", "They painted the door a bright shade of red.",
    "An old dog slept by the fire all afternoon.", "The library smelled of dust and paper.",
)
_ADJECTIVES = (
    "amber", "brave", "calm", "dusty", "eager", "fuzzy", "gentle", "hollow", "icy", "jolly", "kind", "lucky",
    "mellow", "noble", "odd", "proud", "quiet", "rusty", "silent", "tiny", "upbeat", "vivid", "wild", "young",
)
_NOUNS = (
    "anchor", "badger", "candle", "dragon", "engine", "falcon", "garnet", "harbor", "island", "jacket", "kettle",
    "lantern", "meadow", "needle", "otter", "pepper", "quartz", "rocket", "saddle", "tulip", "umbrella", "violin",
    "walrus", "zephyr",
)


def _rng(seed) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed))


def _needle_value(rng: np.random.Generator, kind: str) -> str:
    if kind == "passkey":
        return str(rng.integers(10_000, 100_000))
    if kind == "number":
        return str(rng.integers(1_000_000, 10_000_000))
    return f"{_ADJECTIVES[rng.integers(len(_ADJECTIVES))]}-{_NOUNS[rng.integers(len(_NOUNS))]}"


def _haystack(rng: np.random.Generator, kind: str, budget: int, tok: Tokenizer) -> tuple[list[int], list[int]]:
    """At least `budget` filler tokens cut to `budget`, and the sentence boundaries (token offsets) inside it."""
    tokens, bounds = [], [0]
    while len(tokens) < budget:
        sentence = _NOISE if kind == "passkey" else _SENTENCES[rng.integers(len(_SENTENCES))]
        tokens += tok.encode(sentence + " ")
        bounds.append(len(tokens))
    return tokens[:budget], [b for b in bounds if b <= budget]


def niah_example(seed, length: int, kind: str = "passkey", tokenizer: Tokenizer | None = None) -> dict:
    """One needle-in-a-haystack sequence of exactly `length` tokens, ending with the answer and a final ".".

    Returns a dict: "tokens" int32[length]; "answer" int32[n] (the value's tokens); "answer_positions" int32[n]
    (where the answer sits at the end: tokens[answer_positions] == answer); "needle_positions" int32[n] (the value
    inside the needle); "depth" (the needle's start as a fraction of the haystack); "value" (the value as text).
    `seed` is anything `np.random.SeedSequence` accepts (an int, or a list of ints).
    """
    if kind not in NIAH_KINDS:
        raise ValueError(f"Unknown needle kind {kind!r}; use one of {NIAH_KINDS}.")
    tok = tokenizer or ByteTokenizer()
    rng = _rng(seed)
    value = _needle_value(rng, kind)
    what = _KIND_TEXT[kind]
    answer = tok.encode(value)
    needle_head, needle_tail = tok.encode(f"The special magic {what} is "), tok.encode(". ")
    question = tok.encode(f"\nWhat is the special magic {what}?\nThe special magic {what} is ")
    end = tok.encode(".")
    fixed = len(needle_head) + 2 * len(answer) + len(needle_tail) + len(question) + len(end)
    if length < fixed:
        raise ValueError(f"length={length} is too short for a {kind!r} needle: it needs at least {fixed} tokens.")
    hay, bounds = _haystack(rng, kind, length - fixed, tok)
    # The needle goes at the sentence boundary closest to a uniformly drawn depth.
    target = rng.uniform() * len(hay)
    cut = min(bounds, key=lambda b: abs(b - target))
    needle_start = cut + len(needle_head)
    tokens = hay[:cut] + needle_head + answer + needle_tail + hay[cut:] + question + answer + end
    answer_start = length - len(end) - len(answer)
    n = len(answer)
    return {
        "tokens": np.asarray(tokens, np.int32),
        "answer": np.asarray(answer, np.int32),
        "answer_positions": np.arange(answer_start, answer_start + n, dtype=np.int32),
        "needle_positions": np.arange(needle_start, needle_start + n, dtype=np.int32),
        "depth": cut / max(len(hay), 1),
        "value": value,
    }


def mqar_example(seed, length: int, num_pairs: int, vocab_size: int = 256, num_queries: int | None = None) -> dict:
    """One multi-query associative-recall sequence with `length` inputs.

    Layout of the underlying `length + 1` tokens: k1 v1 ... kP vP, then a region where `num_queries` (default
    `num_pairs`) distinct keys, each followed by its value, sit at random even offsets among filler zeros.
    Keys are distinct ids in [1, vocab_size // 2), values distinct ids in [vocab_size // 2, vocab_size).
    Returns "tokens" int32[length + 1], "inputs" = tokens[:-1], "targets" = tokens[1:], and "mask" float32[length],
    1 exactly where the input is a queried key, so the target there is its value (the only predictable tokens).
    """
    num_queries = num_pairs if num_queries is None else num_queries
    num_keys = vocab_size // 2 - 1
    if not 1 <= num_pairs <= num_keys:
        raise ValueError(f"num_pairs={num_pairs} must be in [1, {num_keys}] for vocab_size={vocab_size}.")
    if not 1 <= num_queries <= num_pairs:
        raise ValueError(f"num_queries={num_queries} must be in [1, num_pairs={num_pairs}].")
    slots = (length + 1 - 2 * num_pairs) // 2
    if slots < num_queries:
        need = 2 * num_pairs + 2 * num_queries - 1
        raise ValueError(f"length={length} is too short for {num_pairs} pairs and {num_queries} queries (>= {need}).")
    rng = _rng(seed)
    keys = rng.choice(np.arange(1, vocab_size // 2), size=num_pairs, replace=False)
    values = rng.choice(np.arange(vocab_size // 2, vocab_size), size=num_pairs, replace=False)
    tokens = np.zeros(length + 1, np.int32)
    tokens[0 : 2 * num_pairs : 2], tokens[1 : 2 * num_pairs : 2] = keys, values
    asked = rng.permutation(num_pairs)[:num_queries]
    key_pos = 2 * num_pairs + 2 * np.sort(rng.choice(slots, size=num_queries, replace=False))
    tokens[key_pos], tokens[key_pos + 1] = keys[asked], values[asked]
    mask = np.zeros(length, np.float32)
    mask[key_pos] = 1.0
    return {"tokens": tokens, "inputs": tokens[:-1], "targets": tokens[1:], "mask": mask}
