"""Decoding: ``generate`` (one compiled loop) against a token-by-token reference, ragged prompts, stop tokens,
top-k / top-p, determinism; ``sample_logits`` on hand-made logits; the interactive conversation of
``python -m titans_jax.sample``.

Compiled programs are shared: models are module-scoped fixtures, and the ``generate`` calls on real models use one
shape (batch 2, prompt 5, 6 new tokens) so that greedy calls, and sampling calls with top-p on, each hit one program
per model (temperature, top-p's value, stop tokens and rng are data). Loop semantics (forcing, stopping, padding,
lengths) are also checked on ``Counter``, a parameter-free model whose greedy continuation counts up, whose programs
compile in a fraction of a second.
"""

import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from titans_jax import TitansLM, get_config
from titans_jax.data.tokenizers import ByteTokenizer
from titans_jax.generate import _decode, _plan, decode_token, generate, prefill, sample_logits
from titans_jax.sample import chat_turn, interactive, new_conversation, parse_stop_token
from titans_jax.sample import main as sample_main

B, T, N = 2, 5, 6  # T + N = 11 crosses a chunk (4) and a segment / window (8) boundary


def tiny(variant):
    return get_config(f"tiny-{variant}", dim=32, num_layers=1, num_heads=2, chunk_size=4, segment_len=8, window=8,
                      num_persistent=2, max_seq_len=32, memory_remat_every=1)


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = TitansLM(tiny(variant), rngs=nnx.Rngs(0))
        return cache[variant]

    return get


@pytest.fixture(scope="module")
def prompt():
    return jax.random.randint(jax.random.key(7), (B, T), 0, 256, jnp.int32)


def reference_greedy(model, prompt_BxT, n_new):
    """Every token through its own ``model.step`` call (prompt included), the next one the argmax of the last logits."""
    state = model.init_state(prompt_BxT.shape[0])
    out = [np.asarray(prompt_BxT)[:, i] for i in range(prompt_BxT.shape[1])]
    logits = None
    for i in range(prompt_BxT.shape[1] + n_new - 1):
        logits, state = model.step(jnp.asarray(out[i][:, None], jnp.int32), state)
        if i + 1 >= len(out):
            out.append(np.asarray(jnp.argmax(logits[:, 0], axis=-1)))
    return np.stack(out, axis=1)


# ------------------------------------------------------------------------------------------------- a counting model
@dataclasses.dataclass(frozen=True)
class CounterConfig:
    vocab_size: int = 16
    variant: str = "counter"
    max_seq_len: int = 64


class Counter(nnx.Module):
    """Logits put 10 on ``(token + 1) % V``: greedy decoding counts up from the last token fed. The state counts the
    tokens fed per row."""

    def __init__(self, config=CounterConfig()):
        self.config = config

    def init_state(self, batch):
        return jnp.zeros((batch,), jnp.int32)

    traced: list = []  # the n of every step call while tracing (class level: not part of the module's state)

    def step(self, tokens_Bxn, state):
        Counter.traced.append(tokens_Bxn.shape[1])
        v = self.config.vocab_size
        return 10.0 * jax.nn.one_hot((tokens_Bxn + 1) % v, v), state + tokens_Bxn.shape[1]


# ------------------------------------------------------------------------------------------------ greedy = reference
@pytest.mark.parametrize("variant", ["lmm", "mac", "transformer"])
def test_greedy_equals_token_by_token_reference_and_parallel_argmax(models, prompt, variant):
    """``generate``'s prefill takes the parallel path and the reference the per-token one: their logits differ by float
    rounding (~1e-5), far below the gaps between an untrained model's top logits, so the argmaxes agree exactly."""
    model = models(variant)
    out, lengths = generate(model, prompt, N, temperature=0.0, return_lengths=True)
    assert out.shape == (B, T + N) and out.dtype == jnp.int32
    np.testing.assert_array_equal(lengths, [T + N] * B)
    np.testing.assert_array_equal(out, reference_greedy(model, prompt, N))
    # And each generated token is the argmax of the parallel forward's logits at the position before it.
    logits = jax.jit(lambda m, x: m(x))(model, out)
    np.testing.assert_array_equal(out[:, T:], jnp.argmax(logits[:, T - 1 : -1], axis=-1))


def test_ragged_prompts_equal_each_row_alone(models, prompt):
    model = models("lmm")
    lengths = np.array([3, 5])
    garbage = prompt.at[0, 3:].set(1)  # past row 0's length: must be ignored
    out, total = generate(model, garbage, N, temperature=0.0, prompt_lengths=lengths, return_lengths=True)
    np.testing.assert_array_equal(total, lengths + N)
    for i, n in enumerate(lengths):
        alone = reference_greedy(model, prompt[i : i + 1, :n], N)  # = generate alone (the test above)
        np.testing.assert_array_equal(out[i, : n + N], alone[0], err_msg=f"row {i}")
        np.testing.assert_array_equal(out[i, n + N :], 0, err_msg=f"row {i}: padding")  # no stop token: pad 0


def test_stop_token_on_a_real_model(models, prompt):
    model = models("lmm")
    greedy = np.asarray(generate(model, prompt, N, temperature=0.0))
    stop = int(greedy[0, T + 2])  # row 0's third new token
    first = {i: next((j for j in range(T, T + N) if greedy[i, j] == stop), None) for i in range(B)}
    out, lengths = generate(model, prompt, N, temperature=0.0, stop_token=stop, return_lengths=True)
    for i in range(B):
        end = T + N if first[i] is None else first[i] + 1
        assert lengths[i] == end
        np.testing.assert_array_equal(out[i, :end], greedy[i, :end])
        np.testing.assert_array_equal(out[i, end:], stop)  # after the stop token: the stop token
    # A stop token for row 0 only (-1: none for row 1): row 1 runs to max_new_tokens.
    out1, lengths1 = generate(model, prompt, N, temperature=0.0, stop_token=[stop, -1], return_lengths=True)
    np.testing.assert_array_equal(lengths1, [lengths[0], T + N])
    np.testing.assert_array_equal(out1[1], greedy[1])


def test_forcing_stopping_padding_and_lengths_on_the_counter():
    model = Counter()
    prompt = np.array([[1, 2, -1, -1], [5, 6, 7, 8], [3, 4, 5, 99]], np.int32)  # padding: anything
    lengths = np.array([2, 4, 3])
    out, total = generate(model, prompt, 5, temperature=0.0, prompt_lengths=lengths, stop_token=[5, 11, -1],
                          return_lengths=True)
    np.testing.assert_array_equal(out, [
        [1, 2, 3, 4, 5, 5, 5, 5, 5],     # stops at its stop token 5 (pad: 5)
        [5, 6, 7, 8, 9, 10, 11, 11, 11],  # 9, 10, 11: stop
        [3, 4, 5, 6, 7, 8, 9, 10, 0],     # its own prompt (the 99 past its length ignored), 5 new, pad 0
    ])  # fmt: skip
    np.testing.assert_array_equal(total, [5, 7, 8])
    # Wrapping around the vocabulary, no stop: 0 new tokens returns the prompt with padding past each length.
    np.testing.assert_array_equal(generate(model, [[14, 15]], 3, temperature=0.0), [[14, 15, 0, 1, 2]])
    out0, total0 = generate(model, prompt, 0, prompt_lengths=lengths, stop_token=7, return_lengths=True)
    np.testing.assert_array_equal(out0, [[1, 2, 7, 7], [5, 6, 7, 8], [3, 4, 5, 7]])
    np.testing.assert_array_equal(total0, lengths)


def test_the_token_loop_is_one_compiled_while_loop():
    """However many tokens are generated, ``step`` is traced twice (the prefill and the loop body) and the program
    holds a while loop: no Python loop per token."""
    model = Counter()
    prompt = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    Counter.traced.clear()
    out = generate(model, prompt, 40, temperature=0.0, prompt_lengths=[2, 3])  # a shape no other test compiles
    assert Counter.traced == [2, 1]
    np.testing.assert_array_equal(out[1, 3:], (np.arange(40) + 7) % 16)
    plan = _plan(model, prompt, 40, temperature=0.0, top_k=None, top_p=None, stop_token=None, prompt_lengths=[2, 3],
                 rng=None)
    assert "stablehlo.while" in _decode.lower(*plan.args, **plan.static).as_text()


def test_bad_arguments_are_named():
    model = Counter()
    p = np.zeros((2, 3), np.int32)
    cases = [
        (dict(prompt_BxT=np.zeros((3,), np.int32)), "prompt must be"),
        (dict(prompt_BxT=np.zeros((2, 3), np.float32)), "prompt must be"),
        (dict(prompt_BxT=np.full((2, 3), 16)), "prompt tokens"),
        (dict(prompt_BxT=np.array([[1, -1, 0], [1, 2, 3]]), prompt_lengths=[2, 3]), "prompt tokens"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=17), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(stop_token=16), "stop_token"),
        (dict(stop_token=[1, 2, 3]), "stop_token"),
        (dict(prompt_lengths=[0, 3]), "prompt_lengths"),
        (dict(prompt_lengths=[4, 3]), "prompt_lengths"),
        (dict(prompt_lengths=[3]), "prompt_lengths"),
    ]
    for kw, match in cases:
        args = dict(prompt_BxT=p, max_new_tokens=2) | kw
        with pytest.raises(ValueError, match=match):
            generate(model, args.pop("prompt_BxT"), args.pop("max_new_tokens"), **args)
    short = Counter(CounterConfig(variant="transformer", max_seq_len=4))
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(short, p, 2)


# ---------------------------------------------------------------------------------------------------------- sampling
def test_top_k_one_and_tiny_top_p_equal_greedy_and_sampling_is_deterministic(models, prompt):
    model = models("lmm")
    greedy = generate(model, prompt, N, temperature=0.0)
    np.testing.assert_array_equal(generate(model, prompt, N, temperature=1.5, top_k=1, rng=jax.random.key(3)), greedy)
    np.testing.assert_array_equal(generate(model, prompt, N, temperature=1.5, top_p=1e-6, rng=jax.random.key(3)),
                                  greedy)
    a = generate(model, prompt, N, temperature=1.0, top_p=0.99, rng=jax.random.key(1))
    np.testing.assert_array_equal(a, generate(model, prompt, N, temperature=1.0, top_p=0.99, rng=jax.random.key(1)))
    b = generate(model, prompt, N, temperature=1.0, top_p=0.99, rng=jax.random.key(2))
    np.testing.assert_array_equal(a[:, :T], prompt)
    # An untrained model's next-token distribution is nearly flat over 256 tokens: another key samples otherwise.
    assert not np.array_equal(a[:, T:], b[:, T:]) and not np.array_equal(a[:, T:], greedy[:, T:])


PROBS = np.array([0.5, 0.3, 0.1, 0.06, 0.04])


def _draws(temperature, top_k=None, top_p=None, n=4000):
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(PROBS, jnp.float32)), (n, PROBS.size))
    return np.asarray(sample_logits(logits, jax.random.key(0), temperature, top_k, top_p))


def test_top_p_never_samples_outside_the_nucleus():
    # At temperature 1 the nucleus of p = 0.7 is {0, 1} (0.5 < 0.7 <= 0.8); p = 0.45 keeps the top token alone.
    assert set(_draws(1.0, top_p=0.7)) == {0, 1}
    assert set(_draws(1.0, top_p=0.45)) == {0}
    assert set(_draws(1.0, top_p=0.95)) == {0, 1, 2, 3}
    # Top-p applies to the distribution at the temperature: at 2 the probabilities flatten to ~ (.35, .27, .16, ...),
    # so p = 0.7 needs {0, 1, 2}.
    assert set(_draws(2.0, top_p=0.7)) == {0, 1, 2}
    # After top-k: among the top 2 (renormalised 0.625, 0.375), p = 0.7 keeps both; top_k=1 keeps one.
    assert set(_draws(1.0, top_k=2, top_p=0.7)) == {0, 1}
    assert set(_draws(1.0, top_k=1, top_p=0.99)) == {0}
    # The kept tokens keep their relative odds: 0.5 / 0.8 of the draws are token 0.
    np.testing.assert_allclose(np.mean(_draws(1.0, top_p=0.7) == 0), 0.625, atol=0.03)
    # Traced temperature and top_p (as inside generate) give the same draws as Python numbers.
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(PROBS, jnp.float32)), (4000, PROBS.size))
    traced = jax.jit(lambda lg, t, p: sample_logits(lg, jax.random.key(0), t, None, p))(logits, 2.0, 0.7)
    np.testing.assert_array_equal(traced, _draws(2.0, top_p=0.7))


def test_sample_logits_greedy_top_k_and_errors():
    logits = jnp.asarray([[0.0, 3.0, 1.0], [2.0, -1.0, 5.0]])
    np.testing.assert_array_equal(sample_logits(logits, jax.random.key(0), 0), [1, 2])
    draws = np.asarray(sample_logits(jnp.tile(logits, (500, 1)), jax.random.key(1), 1.0, top_k=2))
    assert set(draws[0::2]) == {1, 2} and set(draws[1::2]) == {0, 2}
    with pytest.raises(ValueError, match="top_k"):
        sample_logits(logits, jax.random.key(0), 1.0, top_k=4)
    with pytest.raises(ValueError, match="top_p"):
        sample_logits(logits, jax.random.key(0), 1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sample_logits(logits, jax.random.key(0), -0.5)


# ------------------------------------------------------------------------------------------------------ conversation
def test_prefill_in_pieces_and_decode_token_equal_one_sequence(models, prompt):
    """``prefill`` (pieces of 4 + 1) then ``decode_token`` greedy: the same tokens as ``generate``."""
    model = models("lmm")
    logits, state = prefill(model, prompt, model.init_state(B))
    toks = []
    for i in range(N):
        tok, logits, state = decode_token(model, logits, state, jax.random.key(i), temperature=0.0)
        toks.append(tok)
    np.testing.assert_array_equal(jnp.stack(toks, axis=1), generate(model, prompt, N, temperature=0.0)[:, T:])


def test_chat_turns_keep_the_state(models):
    """Two turns equal greedy decoding of the whole conversation token by token: the second turn's prompt continues the
    state the first turn left (its prompt and continuation), and the stop token ends a turn."""
    model = models("lmm")
    conv = new_conversation(model)
    a, b = [10, 20, 30], [40, 50]
    streamed = []
    ids1, conv, s1 = chat_turn(model, conv, a, 4, temperature=0.0, on_token=streamed.append)
    assert streamed == ids1 and len(ids1) == 4 and conv.n_tokens == 7 and s1.prompt_tokens == 3 and s1.new_tokens == 4
    ids2, conv2, _ = chat_turn(model, conv, b, 4, temperature=0.0)
    np.testing.assert_array_equal(ids2, reference_greedy(model, np.asarray([a + ids1 + b]), 4)[0, -4:])
    assert conv2.n_tokens == 13
    # An empty prompt continues the last continuation.
    ids3, _, _ = chat_turn(model, conv2, [], 2, temperature=0.0)
    np.testing.assert_array_equal(ids3, reference_greedy(model, np.asarray([a + ids1 + b + ids2]), 2)[0, -2:])
    # Stop after the second token of turn 2 (unless it occurs first): the state then holds exactly the tokens returned.
    stop = ids2[1]
    cut = ids2[: ids2.index(stop) + 1]
    ids2s, conv2s, _ = chat_turn(model, conv, b, 4, temperature=0.0, stop_token=stop)
    assert ids2s == cut and conv2s.n_tokens == 7 + 2 + len(cut)
    nxt, _, _ = chat_turn(model, conv2s, [], 1, temperature=0.0)
    np.testing.assert_array_equal(nxt, reference_greedy(model, np.asarray([a + ids1 + b + cut]), 1)[0, -1:])
    with pytest.raises(ValueError, match="first prompt"):
        chat_turn(model, new_conversation(model), [], 2)


def test_transformer_conversation_is_capped_at_its_kv_cache():
    model = Counter(CounterConfig(variant="transformer", max_seq_len=6))
    conv = new_conversation(model)
    ids, conv, _ = chat_turn(model, conv, [1, 2, 3], 10, temperature=0.0)
    assert ids == [4, 5, 6] and conv.n_tokens == 6 and int(conv.state[0]) == 6  # 6 tokens read, none past the cache
    with pytest.raises(ValueError, match="max_seq_len"):
        chat_turn(model, conv, [1], 1, temperature=0.0)


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_interactive_streams_each_turn_and_reports_tokens_per_s(models):
    """stdin with three lines (the second empty: continue) gives the turns ``chat_turn`` gives, printed as text."""
    model = models("lmm")
    tok = ByteTokenizer()
    stdout, stderr = io.StringIO(), io.StringIO()
    assert interactive(model, tok, max_new_tokens=3, temperature=0.0, stdin=io.StringIO("hi\n\nyo\n"), stdout=stdout,
                       stderr=stderr) == 0
    conv, turns = new_conversation(model), []
    for line in ("hi", "", "yo"):
        ids, conv, _ = chat_turn(model, conv, tok.encode(line), 3, temperature=0.0)
        turns.append(ids)
    assert stdout.getvalue() == "".join(tok.decode(ids) + "\n" for ids in turns)
    assert stderr.getvalue().count("tokens/s") == 3 and "conversation 13 tokens" in stderr.getvalue()
    # On a terminal each turn is prompted with "> "; the stop token ends a turn early.
    stop = turns[0][1]
    cut = turns[0][: turns[0].index(stop) + 1]
    tty_out = io.StringIO()
    interactive(model, tok, max_new_tokens=3, temperature=0.0, stop_token=stop, stdin=_Tty("hi\n"), stdout=tty_out,
                stderr=io.StringIO())
    assert tty_out.getvalue() == "> " + tok.decode(cut) + "\n> "


def test_stop_token_argument_and_command_line_errors(tmp_path, capsys):
    tok = ByteTokenizer()
    assert parse_stop_token("10", tok) == 10
    assert parse_stop_token("\\n", tok) == 10
    assert parse_stop_token(".", tok) == ord(".")
    for bad in ("ab", "é"):  # two characters; one character of two bytes
        with pytest.raises(ValueError, match="--stop-token"):
            parse_stop_token(bad, tok)
    assert sample_main(["--workdir", str(tmp_path), "--interactive"]) == 2 and "config.json" in capsys.readouterr().err
    assert sample_main(["--workdir", str(tmp_path), "--top-p", "0"]) == 2 and "--top-p" in capsys.readouterr().err
