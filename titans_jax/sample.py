"""Sample from a trained run: `python -m titans_jax.sample --workdir DIR [--prompt TEXT | --interactive]
[--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--stop-token S] [--seed S] [--step STEP]`.

DIR is a training workdir (its config.json and the latest, or the given, checkpoint) or an export
(`python -m titans_jax.export`), local or a URL; only the model's parameters are read onto the local devices
(`titans_jax.export.load_model`).
Without --interactive: prints the prompt followed by its continuation (one compiled decode loop, `generate`), and
the compile time and decode tokens/s to stderr. With --interactive: a conversation read from stdin, one line a turn
(a `> ` prompt when stdin is a terminal). Each turn's text continues the conversation's state, so the memory carries
everything said so far; its continuation is printed as it is produced, then that turn's tokens/s go to stderr. An
empty line continues the last continuation. The state is kept for the whole session (a transformer's conversation
starts over once it fills its KV cache of max_seq_len tokens).
"""

from __future__ import annotations

import argparse
import codecs
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TextIO

import jax
import numpy as np

from titans_jax.export import load_model


def parse_stop_token(text: str, tokenizer) -> int:
    """`--stop-token`'s value as a token id: an integer is an id; otherwise one character (backslash escapes such as
    `\\n` are read as in Python) that the tokenizer encodes to exactly one token.

    Raises:
      ValueError: for anything else, naming --stop-token.
    """
    try:
        return int(text)
    except ValueError:
        pass
    char = codecs.decode(text, "unicode_escape") if "\\" in text else text
    if len(char) != 1:
        raise ValueError(f"--stop-token must be a token id or one character, got {text!r}")
    ids = tokenizer.encode(char)
    if len(ids) != 1:
        raise ValueError(f"--stop-token {text!r} encodes to {len(ids)} tokens, not one; pass its token id instead")
    return ids[0]


# ------------------------------------------------------------------------------------------------ one-shot sampling
class SampleResult(NamedTuple):
    """`sample_timed`'s result.

    Attributes:
      text: the prompt and its continuation, decoded (up to and including the stop token, when one was emitted).
      new_tokens: tokens generated.
      compile_s: seconds spent compiling the decode program.
      decode_s: seconds the compiled program ran (prefill and decode loop).
    """

    text: str
    new_tokens: int
    compile_s: float
    decode_s: float


def sample_timed(model, tokenizer, prompt: str, max_new_tokens: int = 200, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, stop_token: int | None = None,
                 seed: int = 0) -> SampleResult:
    """`prompt` continued by `generate`'s one compiled loop, with the compile and run times measured apart."""
    from titans_jax.generate import _decode, _plan

    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens; pass a non-empty --prompt")
    plan = _plan(model, np.asarray([ids], np.int32), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 stop_token=stop_token, prompt_lengths=None, rng=jax.random.key(seed))
    if max_new_tokens == 0:
        return SampleResult(tokenizer.decode(ids), 0, 0.0, 0.0)
    t0 = time.perf_counter()
    compiled = _decode.lower(*plan.args, **plan.static).compile()
    t1 = time.perf_counter()
    out, lengths = jax.block_until_ready(compiled(*plan.args))
    t2 = time.perf_counter()
    n = int(lengths[0])
    return SampleResult(tokenizer.decode(np.asarray(out)[0, :n].tolist()), n - len(ids), t1 - t0, t2 - t1)


def sample(workdir: str, prompt: str, max_new_tokens: int = 200, *, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, stop_token: int | None = None, seed: int = 0,
           step: int | None = None) -> str:
    """The prompt and its continuation, decoded (a workdir's checkpoint or an export; see `sample_timed`)."""
    model, _, tokenizer = load_model(workdir, step=step)
    return sample_timed(model, tokenizer, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                        stop_token=stop_token, seed=seed).text


# ------------------------------------------------------------------------------------------------------- conversation
class Conversation(NamedTuple):
    """A conversation between turns: batch 1, every token so far read into the model's state.

    Attributes:
      state: the model's decoding state (``model.init_state(1)`` at the start) after every token so far.
      logits_1xV: the logits after the last token (None before any token).
      n_tokens: tokens read so far (prompts and continuations).
    """

    state: Any
    logits_1xV: jax.Array | None
    n_tokens: int


class TurnStats(NamedTuple):
    """One turn's counts and times (seconds). ``prefill_s`` includes compiling a prefill piece of a new length;
    ``decode_s`` runs an already compiled step when the session was warmed up (``warm_up``)."""

    prompt_tokens: int
    prefill_s: float
    new_tokens: int
    decode_s: float

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: new tokens per second of decoding."""
        return self.new_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def new_conversation(model) -> Conversation:
    """An empty conversation."""
    return Conversation(model.init_state(1), None, 0)


def warm_up(model, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None) -> None:
    """Compile a conversation's (batch 1) one-token prefill and per-token decode step, so that turns time decoding,
    not compilation. The step runs twice: on the prefill's state and on its own, in case their types differ."""
    from titans_jax.generate import decode_token, prefill

    logits, state = prefill(model, np.zeros((1, 1), np.int32), model.init_state(1))
    for _ in range(2):
        _, logits, state = decode_token(model, logits, state, jax.random.key(0), temperature=temperature, top_k=top_k,
                                        top_p=top_p)
    jax.block_until_ready(state)


def chat_turn(model, conv: Conversation, prompt_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 1.0,
              top_k: int | None = None, top_p: float | None = None, stop_token: int | None = None,
              rng: jax.Array | None = None, on_token: Callable[[int], None] | None = None,
              ) -> tuple[list[int], Conversation, TurnStats]:
    """One turn: read ``prompt_ids`` into the conversation, then decode up to ``max_new_tokens`` tokens.

    The prompt continues the conversation's state (``generate.prefill``: the memory keeps what it read before);
    an empty prompt continues the last continuation. Tokens are sampled one at a time (``generate.decode_token``) and
    handed to ``on_token`` as soon as each is on the host; the turn ends after the stop token (included) or
    ``max_new_tokens``. The next token's step is queued before the current token is read back, so the host's round
    trip overlaps the device's work (a step queued past the stop token is dropped: the state returned has read exactly
    the prompt and the tokens returned). A transformer's conversation is capped at ``max_seq_len`` tokens (its KV
    cache): the continuation is cut to fit.

    Returns:
      ``(new_ids, conversation, stats)``.

    Raises:
      ValueError: an empty prompt with nothing before it, or a transformer's prompt that does not fit its KV cache.
    """
    from titans_jax.generate import decode_token, prefill

    cfg = model.config
    prompt_ids = [int(i) for i in prompt_ids]
    if not prompt_ids and conv.logits_1xV is None:
        raise ValueError("the conversation is empty: its first prompt must have at least one token")
    if cfg.variant == "transformer":
        room = cfg.max_seq_len - conv.n_tokens - len(prompt_ids)
        if room < 0:
            raise ValueError(f"the conversation ({conv.n_tokens} tokens) and this prompt ({len(prompt_ids)}) exceed "
                             f"max_seq_len={cfg.max_seq_len} (the transformer's KV cache)")
        max_new_tokens = min(max_new_tokens, room)
    stop = None if stop_token is None or stop_token < 0 else int(stop_token)
    rng = jax.random.key(0) if rng is None else rng

    t0 = time.perf_counter()
    logits, state = conv.logits_1xV, conv.state
    if prompt_ids:
        logits, state = jax.block_until_ready(prefill(model, np.asarray([prompt_ids], np.int32), state))
    t1 = time.perf_counter()

    def step(i, logits, state):
        return decode_token(model, logits, state, jax.random.fold_in(rng, i), temperature=temperature, top_k=top_k,
                            top_p=top_p)

    new_ids: list[int] = []
    pending = step(0, logits, state) if max_new_tokens > 0 else None
    while pending is not None:
        tok, logits, state = pending
        i = len(new_ids)
        # Queue the next step before reading this token back (dispatch is asynchronous).
        pending = step(i + 1, logits, state) if i + 1 < max_new_tokens else None
        tid = int(tok[0])
        new_ids.append(tid)
        if on_token is not None:
            on_token(tid)
        if tid == stop:
            pending = None
    jax.block_until_ready(state)
    t2 = time.perf_counter()
    conv = Conversation(state, logits, conv.n_tokens + len(prompt_ids) + len(new_ids))
    return new_ids, conv, TurnStats(len(prompt_ids), t1 - t0, len(new_ids), t2 - t1)


class _TextStream:
    """Writes a growing token sequence as text: each call prints the text added since the last, holding back a
    trailing U+FFFD (a multi-byte character cut short, which the next byte may complete)."""

    def __init__(self, tokenizer, out: TextIO):
        self.tokenizer, self.out, self.ids, self.printed = tokenizer, out, [], ""

    def add(self, tid: int) -> None:
        self.ids.append(tid)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._write(text)

    def finish(self) -> None:
        self._write(self.tokenizer.decode(self.ids))

    def _write(self, text: str) -> None:
        self.out.write(text[len(self.printed):] if text.startswith(self.printed) else text)
        self.out.flush()
        self.printed = text


def interactive(model, tokenizer, *, max_new_tokens: int = 200, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, stop_token: int | None = None, seed: int = 0, stdin: TextIO | None = None,
                stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """The conversation loop of ``--interactive`` (see the module docstring); returns the exit status (0 at the end of
    stdin).

    Each line is a turn (``chat_turn``; its trailing newline is not part of the prompt); the first turn's empty line
    reads one newline token. Turn k samples with ``fold_in(key(seed), k)``.

    Raises:
      ValueError: for bad sampling options or a stop token outside the vocabulary (before the first turn).
    """
    stdin, stdout, stderr = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    if stop_token is not None and stop_token >= model.config.vocab_size:
        raise ValueError(f"stop_token must be < vocab_size={model.config.vocab_size} (negative: none), got {stop_token}")
    opts = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    t0 = time.perf_counter()
    warm_up(model, **opts)
    print(f"[decode step compiled in {time.perf_counter() - t0:.1f} s]", file=stderr, flush=True)
    conv, key, turn = new_conversation(model), jax.random.key(seed), 0
    while True:
        if stdin.isatty():
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        ids = tokenizer.encode(line.rstrip("\r\n"))
        if not ids and conv.logits_1xV is None:
            ids = tokenizer.encode("\n")
        text = _TextStream(tokenizer, stdout)
        try:
            _, conv, stats = chat_turn(model, conv, ids, max_new_tokens, stop_token=stop_token,
                                       rng=jax.random.fold_in(key, turn), on_token=text.add, **opts)
        except ValueError as e:
            print(f"error: {e}; starting a new conversation", file=stderr, flush=True)
            conv = new_conversation(model)
            continue
        text.finish()
        stdout.write("\n")
        stdout.flush()
        print(f"[{stats.prompt_tokens} prompt tokens in {stats.prefill_s:.2f} s; {stats.new_tokens} new tokens in "
              f"{stats.decode_s:.2f} s: {stats.tokens_per_s:.1f} tokens/s; conversation {conv.n_tokens} tokens]",
              file=stderr, flush=True)
        turn += 1
    return 0


# ------------------------------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    """Command line; returns the exit status (2 for a missing workdir, config or checkpoint, or bad arguments)."""
    p = argparse.ArgumentParser(prog="python -m titans_jax.sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", "--model", dest="workdir", required=True,
                   help="a training workdir or an export (python -m titans_jax.export), local or a URL")
    p.add_argument("--prompt", default="\n", help="the text to continue (not used with --interactive)")
    p.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line, keeping the state")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the most likely tokens up to P")
    p.add_argument("--stop-token", default=None,
                   help="stop a continuation after this token: an id, or one character (e.g. '\\n')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    args = p.parse_args(argv)
    try:
        # Checked before the (slow) restore; top-k and the stop token's range need the vocabulary, checked by generate.
        if args.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
        if not args.temperature >= 0:
            raise ValueError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
        if args.top_p is not None and not 0 < args.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
        model, _, tokenizer = load_model(args.workdir, step=args.step)
        stop = None if args.stop_token is None else parse_stop_token(args.stop_token, tokenizer)
        opts = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_token=stop, seed=args.seed)
        if args.interactive:
            return interactive(model, tokenizer, max_new_tokens=args.max_new_tokens, **opts)
        res = sample_timed(model, tokenizer, args.prompt, args.max_new_tokens, **opts)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(res.text, flush=True)
    print(f"[decode compiled in {res.compile_s:.1f} s; {res.new_tokens} new tokens in {res.decode_s:.2f} s: "
          f"{res.new_tokens / max(res.decode_s, 1e-9):.1f} tokens/s]", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
