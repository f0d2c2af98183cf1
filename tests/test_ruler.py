"""RULER's single-needle prompts (titans_jax.data.ruler) and the task data the trainer reads."""

import re

import numpy as np
import pytest

from titans_jax.data import get_tokenizer, make_dataset, ruler
from titans_jax.data.haystack import NOISE

TOK = get_tokenizer("bytes")


def _text(ids) -> str:
    return TOK.decode(np.asarray(ids).tolist())


@pytest.mark.parametrize("kind", ruler.NIAH_TASKS)
def test_prompt_follows_rulers_single_needle_template(kind):
    ex = ruler.niah_example(11, 700, kind, depth=0.5)
    text, key, value = _text(ex.prompt), ex.info["key"], ex.target
    t = {"passkey": "number", "number": "number", "word": "word", "uuid": "uuid"}[kind]
    assert len(ex.prompt) == 700 and ex.prompt.dtype == np.int32
    assert text.startswith(f"A special magic {t} is hidden within the following text. Make sure to memorize it. "
                           f"I will quiz you about the {t} afterwards.\n")
    assert f"One of the special magic {t}s for {key} is: {value}." in text
    assert text.endswith(f"\nWhat is the special magic {t} for {key} mentioned in the provided text? "
                         f"The special magic {t} for {key} mentioned in the provided text is")
    assert _text(ex.answer) == " " + value and text.count(value) == 1  # only the needle holds it
    assert re.fullmatch(r"[^\s-]+-.+", key)  # adjective-noun (some nouns hold a space or a hyphen)
    if kind in ("passkey", "number"):
        assert re.fullmatch(r"[1-9]\d{6}", value)
    elif kind == "uuid":
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", value)
    haystack = text[text.index("afterwards.\n") + 12: text.index("\nWhat is the special")]
    if kind == "passkey":  # RULER's noise blocks, one per line, the needle a line of its own
        assert f"{NOISE}\n{NOISE}" in haystack and f"is: {value}.\n" in haystack
    else:
        assert NOISE not in haystack
    start = ex.info["needle_start"]
    assert _text(ex.prompt[start:start + ex.info["needle_len"]]).startswith("One of the special magic")


def test_needle_moves_with_depth_and_the_question_stays():
    by_depth = {d: ruler.niah_example(5, 1200, "number", depth=d) for d in (0.0, 0.5, 1.0)}
    starts = [by_depth[d].info["needle_start"] for d in (0.0, 0.5, 1.0)]
    assert starts[0] < starts[1] < starts[2]
    assert by_depth[0.0].info["depth"] == 0.0 and by_depth[1.0].info["depth"] > 0.9  # the last whole line
    assert abs(by_depth[0.5].info["depth"] - 0.5) < 0.1
    assert len({ex.target for ex in by_depth.values()}) == 1
    longer = ruler.niah_example(5, 3000, "number", depth=0.5)
    assert longer.target == by_depth[0.5].target and longer.info["key"] == by_depth[0.5].info["key"]
    assert not np.array_equal(ruler.niah_example(6, 1200, "number", depth=0.5).prompt, by_depth[0.5].prompt)
    assert np.array_equal(ruler.niah_example(5, 1200, "number", depth=0.5).prompt, by_depth[0.5].prompt)


def test_ruler_errors_name_the_problem():
    with pytest.raises(ValueError, match="too short"):
        ruler.niah_example(0, 100, "passkey")
    with pytest.raises(ValueError, match="niah_single|Unknown needle task"):
        ruler.niah_example(0, 600, "essay")
    with pytest.raises(ValueError, match="depth"):
        ruler.niah_example(0, 600, "passkey", depth=1.5)


@pytest.mark.parametrize("name", ["niah-passkey", "niah-word", "babilong-qa2"])
def test_long_context_tasks_in_the_trainer_score_only_the_answer(name):
    it = make_dataset(name, split="train", seq_len=511, global_batch_size=2, seed=3)
    batch = next(it)
    tokens, mask = batch["tokens"], batch["mask"]
    assert tokens.shape == (2, 512) and mask.shape == (2, 511)
    for row, m in zip(tokens, mask, strict=True):
        text = _text(row)
        answer = _text(row[1:][m > 0])
        assert answer.startswith(" ") and text.endswith(answer + ".")
        prefix = "mentioned in the provided text is" if name.startswith("niah") else "\nAnswer:"
        assert text[: -len(answer) - 1].endswith(prefix)
    again = make_dataset(name, split="train", seq_len=511, global_batch_size=2, seed=3)
    assert np.array_equal(next(again)["tokens"], tokens)


def test_context_weight_scores_the_copies_too_but_answers_most():
    plain = next(make_dataset("niah-number", split="train", seq_len=511, global_batch_size=2, seed=4))
    it = make_dataset("niah-number", split="train", seq_len=511, global_batch_size=2, seed=4, context_weight=0.05)
    weighted = next(it)
    assert np.array_equal(weighted["tokens"], plain["tokens"])
    np.testing.assert_allclose(weighted["mask"], np.where(plain["mask"] > 0, 1.0, 0.05))
    assert it.fingerprint["context_weight"] == 0.05
    with pytest.raises(ValueError, match="context_weight must lie in"):
        make_dataset("niah-number", split="train", seq_len=511, global_batch_size=2, seed=4, context_weight=2.0)
