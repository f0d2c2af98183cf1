"""Decoding on top of the streaming ``TitansLM.step`` (docs/architecture.md, "Decoding").

* ``sample_logits``: one token per row from logits: greedy, temperature, top-k, top-p (nucleus). Pure.
* ``generate``: prompts in, prompts plus continuations out. The common part of the prompts is fed with one parallel
  ``model.step`` call (prefill); the token loop runs inside one compiled program (``jax.lax.while_loop``: no Python
  loop and no host round trip per token), compiled once per model structure, shapes and static options.
* ``prefill`` and ``decode_token``: the same two phases one call at a time, for callers that need each token on the
  host as soon as it exists (``python -m titans_jax.sample --interactive`` streams them) or that carry the state
  across calls.

The model's memory keeps learning while it reads (paper Sec. 3.1, Eq. 13-14), so its state after a prompt is a
function of every token fed; decoding feeds every chosen token back, and the state returned by ``decode_token`` is
the state after all of them.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


# -------------------------------------------------------------------------------------------------------- sampling
def _is_python_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def sample_logits(logits_BxV: jax.Array, rng: jax.Array, temperature: float | jax.Array = 1.0,
                  top_k: int | None = None, top_p: float | jax.Array | None = None) -> jax.Array:
    """One token per row, int32 ``[B]``. Pure: the same ``rng`` gives the same tokens.

    Args:
      logits_BxV: unnormalised log-probabilities.
      rng: a JAX PRNG key (unused when greedy).
      temperature: a Python 0 means greedy (``argmax``; ``top_k`` and ``top_p`` then change nothing). Otherwise the
        logits are divided by it before sampling; it may be a traced scalar, then it must be > 0.
      top_k: keep only the k largest logits of each row (ties with the k-th are kept too).
      top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability (at ``temperature``,
        after top-k) sums to at least ``top_p``; the most likely token is always kept, and tokens whose logit ties
        the last kept one are kept too. ``None`` (or 1) keeps every token; it may be a traced scalar in (0, 1].

    Raises:
      ValueError: for a negative Python temperature, ``top_k`` outside [1, V] or a Python ``top_p`` outside (0, 1].
    """
    vocab = logits_BxV.shape[-1]
    if top_k is not None and not 1 <= top_k <= vocab:
        raise ValueError(f"top_k must be in [1, vocab_size={vocab}], got {top_k}")
    if top_p is not None and _is_python_number(top_p) and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if _is_python_number(temperature):
        if not temperature >= 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be finite and >= 0 (0: greedy), got {temperature}")
        if temperature == 0:
            return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV / jnp.asarray(temperature, logits_BxV.dtype)
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and not (_is_python_number(top_p) and top_p >= 1):
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        # Token j (in descending order) is kept while the tokens before it hold less than top_p: that is the smallest
        # prefix reaching top_p, and the first token (nothing before it) is always in.
        before = jnp.cumsum(probs, axis=-1) - probs
        keep = before < jnp.asarray(top_p, probs.dtype)
        threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


class _Options(NamedTuple):
    """Sampling options split into what shapes the program (static) and what it reads (traced)."""

    greedy: bool
    top_k: int | None
    use_top_p: bool
    temperature: jax.Array  # float32 scalar (1 when greedy: unused)
    top_p: jax.Array  # float32 scalar (1 when unused)


def _options(vocab: int, temperature, top_k, top_p) -> _Options:
    """Checks the sampling arguments (naming the bad one) and splits them; greedy drops top-k/top-p so that every
    greedy call shares one program."""
    if not _is_python_number(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= vocab):
        raise ValueError(f"top_k must be an int in [1, vocab_size={vocab}], got {top_k!r}")
    if top_p is not None and (not _is_python_number(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    greedy = temperature == 0
    use_top_p = top_p is not None and top_p < 1 and not greedy
    return _Options(greedy, None if greedy else (None if top_k is None else int(top_k)), use_top_p,
                    jnp.float32(1.0 if greedy else temperature), jnp.float32(top_p if use_top_p else 1.0))


def _sample(logits_BxV, rng, opts_static, temperature, top_p):
    greedy, top_k, use_top_p = opts_static
    if greedy:
        return sample_logits(logits_BxV, rng, 0)
    return sample_logits(logits_BxV, rng, temperature, top_k, top_p if use_top_p else None)


def _stop_tokens(stop_token, batch: int, vocab: int) -> np.ndarray:
    """``stop_token`` (None, an int, or one int per row; negative: no stop token for that row) as int32 ``[B]``."""
    if stop_token is None:
        return np.full((batch,), -1, np.int32)
    stop = np.asarray(stop_token)
    if not np.issubdtype(stop.dtype, np.integer) or stop.ndim > 1 or (stop.ndim == 1 and stop.shape != (batch,)):
        raise ValueError(f"stop_token must be an int or one int per row (shape [{batch}]), got {stop_token!r}")
    if np.any(stop >= vocab):
        raise ValueError(f"stop_token must be < vocab_size={vocab} (negative: none), got {stop_token!r}")
    return np.broadcast_to(stop, (batch,)).astype(np.int32)


# -------------------------------------------------------------------------------------------------------- generate
@functools.partial(jax.jit, static_argnames=("graphdef", "prefill_len", "max_new_tokens", "opts_static"))
def _decode(params, prompt_BxT, lengths_B, stop_B, temperature, top_p, rng, *, graphdef, prefill_len: int,
            max_new_tokens: int, opts_static: tuple):
    """The whole of ``generate`` after validation: prefill, then the token loop. Returns (tokens, lengths)."""
    model = nnx.merge(graphdef, params)
    b, t = prompt_BxT.shape
    total = t + max_new_tokens
    pad_B = jnp.where(stop_B >= 0, stop_B, 0)
    positions = jnp.arange(total, dtype=jnp.int32)[None, :]
    buf_BxL = jnp.concatenate([prompt_BxT, jnp.zeros((b, max_new_tokens), jnp.int32)], axis=1)
    # Everything past a row's prompt is padding until the loop writes it: its continuation, then pad.
    buf_BxL = jnp.where(positions < lengths_B[:, None], buf_BxL, pad_B[:, None])

    logits_BxnxV, state = model.step(prompt_BxT[:, :prefill_len], model.init_state(b))

    def choose(pos, logits_BxV, done_B, n_new_B, buf):
        """The token at ``pos``: the row's prompt token while inside its prompt, pad once stopped, else sampled."""
        sampled = _sample(logits_BxV, jax.random.fold_in(rng, pos), opts_static, temperature, top_p)
        forced = pos < lengths_B
        prompt_tok = jax.lax.dynamic_index_in_dim(buf, pos, axis=1, keepdims=False)
        tok = jnp.where(forced, prompt_tok, jnp.where(done_B, pad_B, sampled))
        new = ~forced & ~done_B
        n_new_B = n_new_B + new.astype(jnp.int32)
        done_B = done_B | (new & ((tok == stop_B) | (n_new_B >= max_new_tokens)))
        return tok, done_B, n_new_B, jax.lax.dynamic_update_slice(buf, tok[:, None], (0, pos))

    pos0 = jnp.int32(prefill_len)
    tok, done, n_new, buf_BxL = choose(pos0, logits_BxnxV[:, -1], jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32),
                                       buf_BxL)

    def cond(carry):
        pos, _, _, done_B, _, _ = carry
        # Every row is done by its own prompt length + max_new_tokens - 1 <= total - 1; the bound is a safeguard.
        return (pos + 1 < total) & ~jnp.all(done_B)

    def body(carry):
        pos, tok_B, state, done_B, n_new_B, buf = carry
        logits, state = model.step(tok_B[:, None], state)
        pos = pos + 1
        tok_B, done_B, n_new_B, buf = choose(pos, logits[:, 0], done_B, n_new_B, buf)
        return pos, tok_B, state, done_B, n_new_B, buf

    _, _, _, _, n_new, buf_BxL = jax.lax.while_loop(cond, body, (pos0, tok, state, done, n_new, buf_BxL))
    return buf_BxL, lengths_B + n_new


class _Plan(NamedTuple):
    """``_decode``'s arguments, ``_decode(*args, **static)``, and the checked inputs on the host.

    Attributes:
      args: the traced arguments (parameters, prompt, lengths, stop tokens, temperature, top-p, key).
      static: the static keywords (graphdef, prefill length, max_new_tokens, sampling switches).
      prompt: int32 ``[B, T]``; lengths: int32 ``[B]``; stop: int32 ``[B]`` (-1: none).
    """

    args: tuple
    static: dict
    prompt: np.ndarray
    lengths: np.ndarray
    stop: np.ndarray


def _plan(model, prompt_BxT, max_new_tokens, *, temperature, top_k, top_p, stop_token, prompt_lengths, rng) -> _Plan:
    """Validates ``generate``'s arguments (each error names the argument) and lays out ``_decode``'s."""
    cfg = model.config
    vocab = cfg.vocab_size
    prompt = np.asarray(prompt_BxT)
    if prompt.ndim != 2 or prompt.shape[0] < 1 or prompt.shape[1] < 1 or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"prompt must be an int array [batch, time] with batch, time >= 1, got {prompt.dtype}"
                         f"{prompt.shape}")
    b, t = prompt.shape
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    opts = _options(vocab, temperature, top_k, top_p)
    if prompt_lengths is None:
        lengths = np.full((b,), t, np.int32)
    else:
        lengths = np.asarray(prompt_lengths)
        if lengths.shape != (b,) or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"prompt_lengths must be ints of shape [{b}] (one per prompt row), got {prompt_lengths!r}")
        if lengths.min() < 1 or lengths.max() > t:
            raise ValueError(f"prompt_lengths must be in [1, prompt time={t}], got {lengths.tolist()}")
        lengths = lengths.astype(np.int32)
    used = prompt[np.arange(t)[None, :] < lengths[:, None]]  # padding past a row's length may hold anything
    if used.min() < 0 or used.max() >= vocab:
        raise ValueError(f"prompt tokens must be in [0, vocab_size={vocab}), got [{used.min()}, {used.max()}]")
    stop = _stop_tokens(stop_token, b, vocab)
    total = t + max_new_tokens
    if cfg.variant == "transformer" and total > cfg.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {total} exceeds max_seq_len={cfg.max_seq_len} "
                         "(the transformer's KV cache); raise max_seq_len")
    rng = jax.random.key(0) if rng is None else rng
    graphdef, params = nnx.split(model)
    args = (params, jnp.asarray(prompt, jnp.int32), jnp.asarray(lengths), jnp.asarray(stop), opts.temperature,
            opts.top_p, rng)
    static = dict(graphdef=graphdef, prefill_len=int(lengths.min()), max_new_tokens=int(max_new_tokens),
                  opts_static=(opts.greedy, opts.top_k, opts.use_top_p))
    return _Plan(args, static, prompt.astype(np.int32), lengths, stop)


def generate(model, prompt_BxT, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, stop_token: int | Any | None = None, prompt_lengths: Any | None = None,
             rng: jax.Array | None = None, return_lengths: bool = False):
    """Continue each prompt row by up to ``max_new_tokens`` tokens.

    The shortest prompt's tokens (``min(prompt_lengths)``, common to every row) are fed with one ``model.step`` call
    (the parallel prefill); then one compiled ``while_loop`` feeds one token per row per iteration: rows still inside
    their own prompt are fed their prompt's next token, the others sample from their logits, so every row's
    continuation begins right after its own prompt. The loop ends once every row has stopped (emitted its stop
    token) or produced ``max_new_tokens``. One program is compiled per (model structure, prompt shape,
    ``min(prompt_lengths)``, ``max_new_tokens``, greedy or not, ``top_k``, top-p on or off); temperature, top-p's
    value, stop tokens, prompt lengths and ``rng`` are data.

    Args:
      model: a ``TitansLM`` (anything with ``config``, ``init_state(B)`` and ``step(tokens_Bxn, state)``).
      prompt_BxT: int ``[B, T]``, T >= 1; with ``prompt_lengths``, right-padded (tokens past a row's length are
        ignored and may be anything, e.g. -1).
      max_new_tokens: >= 0.
      temperature, top_k, top_p: as ``sample_logits`` (temperature 0: greedy). ``rng`` (default ``key(0)``) is folded
        with the position of each sampled token.
      stop_token: None, an int, or one int per row (negative: none for that row). A row that samples its stop token
        stops there (the stop token is part of its output).
      prompt_lengths: int ``[B]`` in [1, T], each row's prompt length (default T for every row).
      return_lengths: also return each row's total length.

    Returns:
      int32 ``[B, T + max_new_tokens]``: each row is its prompt, its continuation, then padding (the row's stop token,
      or 0 for a row without one) up to the end. With ``return_lengths``: ``(tokens, lengths_B)``, where
      ``tokens[i, :lengths[i]]`` is row i's prompt and continuation (its stop token included).

    Raises:
      ValueError: naming the bad argument (prompt shape, dtype or token range, max_new_tokens, temperature, top_k,
        top_p, stop_token, prompt_lengths, or a transformer whose KV cache of ``max_seq_len`` is too short).
    """
    plan = _plan(model, prompt_BxT, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 stop_token=stop_token, prompt_lengths=prompt_lengths, rng=rng)
    if max_new_tokens == 0:  # nothing to decode: no program to compile
        t = plan.prompt.shape[1]
        pad = np.where(plan.stop >= 0, plan.stop, 0)[:, None]
        out = jnp.asarray(np.where(np.arange(t)[None, :] < plan.lengths[:, None], plan.prompt, pad))
        lengths = jnp.asarray(plan.lengths)
    else:
        out, lengths = _decode(*plan.args, **plan.static)
    return (out, lengths) if return_lengths else out


# ------------------------------------------------------------------------------------------- one call at a time
def prefill(model, tokens_BxT, state) -> tuple[jax.Array, Any]:
    """Feed ``tokens_BxT`` (T >= 1) to ``state``; returns the logits after the last token ``[B, V]`` and the state.

    The tokens go through ``model.step`` in pieces whose lengths are powers of two (largest first: 13 = 8 + 4 + 1),
    so a session fed prompts of many lengths compiles at most log2(longest) + 1 programs; ``model.step`` on n tokens
    equals n single-token steps (up to float rounding: more than one token takes the parallel path), so the pieces
    change nothing but the number of programs.
    """
    tokens = jnp.asarray(tokens_BxT, jnp.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 1:
        raise ValueError(f"tokens must be an int array [batch, time] with time >= 1, got shape {tokens.shape}")
    start, n = 0, tokens.shape[1]
    logits = None
    while start < n:
        piece = 1 << ((n - start).bit_length() - 1)
        logits, state = model.step(tokens[:, start:start + piece], state)
        start += piece
    return logits[:, -1], state


@functools.partial(jax.jit, static_argnames=("graphdef", "opts_static"))
def _decode_token(graphdef, params, logits_BxV, state, rng, temperature, top_p, *, opts_static):
    tok = _sample(logits_BxV, rng, opts_static, temperature, top_p)
    logits, state = nnx.merge(graphdef, params).step(tok[:, None], state)
    return tok, logits[:, 0], state


def decode_token(model, logits_BxV, state, rng, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None):
    """Sample one token per row from ``logits_BxV`` and feed it: ``(tok_B, next_logits_BxV, state)``.

    One jitted program per (model structure, shapes, greedy or not, ``top_k``, top-p on or off), as ``generate``'s loop
    body; the state returned has read the sampled token (so it continues the sequence with it).
    """
    opts = _options(model.config.vocab_size, temperature, top_k, top_p)
    graphdef, params = nnx.split(model)
    return _decode_token(graphdef, params, logits_BxV, state, rng, opts.temperature, opts.top_p,
                         opts_static=(opts.greedy, opts.top_k, opts.use_top_p))
