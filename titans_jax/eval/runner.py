"""Evaluation of a model on the tasks of `titans_jax.eval.tasks`: one parallel forward pass over each context, then
greedy decoding of the few answer tokens from the streaming state (never token by token through the context; in a
batch of prompts of different lengths, the longer rows read their last few prompt tokens, at most the spread of the
answers' lengths, one at a time in the decode loop).

Every function takes a `TitansLM` and its tokenizer and returns result rows, JSON-ready:
* `evaluate_qa`: {"length", "depth" (needle tasks), "accuracy", "samples"}
* `evaluate_mqar`: {"length", "num_pairs", "accuracy", "samples"} (accuracy over queried keys)
* `evaluate_ppl`: {"length", "position_bucket": [start, end), "bits_per_byte", "bits_per_token", "tokens"}
plus a `Timing` of the tokens read and generated per second (compilation excluded where a shape ran more than once).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from titans_jax.data.qa import QAExample
from titans_jax.data.synthetic import mqar_example
from titans_jax.eval.tasks import NEEDLE_TASKS, QA_TASKS, qa_example, task_id
from titans_jax.generate import generate


@dataclasses.dataclass
class Timing:
    """Tokens read (context) and generated, and the seconds they took; `first_s` holds the first batch of each
    shape (compilation) apart."""

    tokens: int = 0
    seconds: float = 0.0
    first_tokens: int = 0
    first_s: float = 0.0

    def add(self, tokens: int, seconds: float, first: bool) -> None:
        if first:
            self.first_tokens, self.first_s = self.first_tokens + tokens, self.first_s + seconds
        else:
            self.tokens, self.seconds = self.tokens + tokens, self.seconds + seconds

    def tokens_per_s(self) -> float:
        """Throughput after compilation; over every batch when no shape ran twice."""
        if self.tokens:
            return self.tokens / max(self.seconds, 1e-9)
        return self.first_tokens / max(self.first_s, 1e-9)

    def to_dict(self) -> dict:
        return {"tokens_per_s": round(self.tokens_per_s(), 1), "tokens": self.tokens + self.first_tokens,
                "seconds": round(self.seconds + self.first_s, 3), "first_batch_seconds": round(self.first_s, 3)}


def fit_context(model, max_len: int):
    """The model itself, or the same parameters in a model whose KV caches hold `max_len` positions.

    Only a full-attention cache (the transformer's) is sized by `config.max_seq_len`; it is no parameter, so a model
    trained at a short context can be evaluated at a longer one (how well it extrapolates is what is measured).
    """
    cfg = model.config
    if cfg.variant != "transformer" or cfg.max_seq_len >= max_len:
        return model
    from titans_jax.model import TitansLM

    longer = cfg.replace(max_seq_len=int(max_len))
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: TitansLM(longer, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, nnx.state(model))


def _batches(n: int, batch_size: int) -> Iterable[np.ndarray]:
    """Index batches of exactly `batch_size` (the last one padded by repeating its first index: one shape only)."""
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        yield np.concatenate([idx, np.full(batch_size - len(idx), idx[0])])


def greedy_answers(model, prompts: np.ndarray | Sequence[np.ndarray], num_new: int) -> np.ndarray:
    """int32 [B, num_new]: the greedy continuation of each prompt (one parallel prefill, then a compiled decode loop).

    `prompts` is an int array [B, L] or a list of 1-D prompts of different lengths (a question's answer may be longer
    than another's, so its prompt is shorter): those are right-padded and decoded with `prompt_lengths`, each row's
    continuation starting right after its own prompt.
    """
    rows = list(prompts)
    lengths = np.asarray([len(r) for r in rows])
    padded = np.zeros((len(rows), lengths.max()), np.int32)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = r
    ragged = bool((lengths != lengths.max()).any())
    out = np.asarray(generate(model, jnp.asarray(padded), num_new, temperature=0.0,
                              prompt_lengths=jnp.asarray(lengths) if ragged else None))
    return np.stack([out[i, n : n + num_new] for i, n in enumerate(lengths)])


def score_answers(examples: Sequence[QAExample], generated_BxN: np.ndarray, tokenizer) -> np.ndarray:
    """bool [B]: whether row i's first len(answer) generated tokens decode to the target (whole value, stripped)."""
    return np.asarray([tokenizer.decode(generated_BxN[i, : len(ex.answer)].tolist()).strip() == ex.target
                       for i, ex in enumerate(examples)])


def evaluate_qa(model, tokenizer, task: str, lengths: Sequence[int], *, samples: int, batch_size: int, seed: int,
                depths: Sequence[float] | None = None, progress: bool = True,
                on_batch: Callable[[np.ndarray], None] | None = None) -> tuple[list[dict], Timing]:
    """Accuracy of greedy answers on a question-answering task (`QA_TASKS`) at each length (and depth, for needles).

    `samples` examples per cell; example i is the same key/value (or story) in every cell. `on_batch(prompts_BxL)` is
    called with the first batch of the longest length (e.g. to record memory statistics).
    """
    if task not in QA_TASKS:
        raise ValueError(f"evaluate_qa runs {', '.join(QA_TASKS)}, not {task!r}")
    if task in NEEDLE_TASKS:
        cells = [(length, d) for length in lengths for d in (depths or (None,))]
    else:
        if depths:
            raise ValueError(f"depths apply to the needle tasks only, not {task!r}")
        cells = [(length, None) for length in lengths]
    model = fit_context(model, max(lengths) + 64)
    rows, timing, seen, stats_done = [], Timing(), set(), False
    bar = tqdm(total=len(cells) * samples, desc=f"eval {task}", unit="ex", disable=not progress)
    for length, depth in cells:
        examples = [qa_example(task, seed, i, length, tokenizer, depth) for i in range(samples)]
        num_new = max(len(ex.answer) for ex in examples)
        correct, actual_depths = [], []
        for idx in _batches(samples, batch_size):
            batch = [examples[i] for i in idx]
            prompts = [ex.prompt for ex in batch]
            if on_batch is not None and length == max(lengths) and not stats_done:
                shortest = min(len(p) for p in prompts)
                on_batch(np.stack([p[:shortest] for p in prompts]))
                stats_done = True
            t0 = time.perf_counter()
            gen = greedy_answers(model, prompts, num_new)
            key = (max(len(p) for p in prompts), min(len(p) for p in prompts), num_new)  # what generate compiles for
            first = key not in seen
            seen.add(key)
            timing.add(sum(len(p) for p in prompts) + gen.size, time.perf_counter() - t0, first)
            ok = score_answers(batch, gen, tokenizer)
            correct += ok[: len(set(idx.tolist()))].tolist()
            actual_depths += [ex.info.get("depth", 0.0) for ex in batch[: len(set(idx.tolist()))]]
            bar.update(len(set(idx.tolist())))
        row = {"length": int(length)}
        if task in NEEDLE_TASKS:
            row["depth"] = float(depth) if depth is not None else None
        row.update(accuracy=float(np.mean(correct)), samples=len(correct))
        if task in NEEDLE_TASKS:  # where the needles really sat (the nearest line boundary to the depth asked)
            row["needle_depth"] = round(float(np.mean(actual_depths)), 3)
        rows.append(row)
    bar.close()
    return rows, timing


@functools.partial(jax.jit, static_argnums=(0,))
def _mqar_hits(graphdef, params, inputs_BxT, targets_BxT, mask_BxT):
    pred = jnp.argmax(nnx.merge(graphdef, params)(inputs_BxT), axis=-1)
    return ((pred == targets_BxT) * mask_BxT).sum(), mask_BxT.sum()


def evaluate_mqar(model, lengths: Sequence[int], num_pairs: Sequence[int], *, samples: int, batch_size: int,
                  seed: int, progress: bool = True) -> tuple[list[dict], Timing]:
    """Next-token accuracy at the queried keys of multi-query associative recall (Zoology's MQAR), per (length,
    number of key-value pairs); a (length, pairs) cell that cannot hold the pairs and their queries is skipped."""
    vocab = min(256, model.config.vocab_size)
    rows, timing = [], Timing()
    cells = [(L, p) for L in lengths for p in num_pairs if 4 * p <= L]
    if not cells:
        raise ValueError(f"no (length, num_pairs) cell fits: each length must be at least 4 x num_pairs "
                         f"(lengths {list(lengths)}, num_pairs {list(num_pairs)})")
    bar = tqdm(total=len(cells) * samples, desc="eval mqar", unit="ex", disable=not progress)
    for length, pairs in cells:
        exs = [mqar_example([seed, task_id("mqar"), pairs, i], length, pairs, vocab_size=vocab) for i in range(samples)]
        hits = total = 0.0
        for b, idx in enumerate(_batches(samples, batch_size)):
            n = len(set(idx.tolist()))
            mask = np.stack([exs[i]["mask"] for i in idx])
            mask[n:] = 0.0  # padding rows count nothing
            t0 = time.perf_counter()
            h, t = _mqar_hits(*nnx.split(model), jnp.asarray(np.stack([exs[i]["inputs"] for i in idx])),
                              jnp.asarray(np.stack([exs[i]["targets"] for i in idx])), jnp.asarray(mask))
            hits, total = hits + float(h), total + float(t)
            timing.add(len(idx) * length, time.perf_counter() - t0, b == 0)
            bar.update(n)
        rows.append({"length": int(length), "num_pairs": int(pairs), "accuracy": hits / max(total, 1.0),
                     "samples": samples})
    bar.close()
    return rows, timing


@functools.partial(jax.jit, static_argnums=(0,))
def _token_nll(graphdef, params, inputs_BxT, targets_BxT):
    logp = jax.nn.log_softmax(nnx.merge(graphdef, params)(inputs_BxT).astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]


def evaluate_ppl(model, tokenizer, windows: Callable[[int], Iterable[np.ndarray]], lengths: Sequence[int], *,
                 bucket: int, progress: bool = True) -> tuple[list[dict], Timing]:
    """Bits per byte (and per token) by position bucket [k * bucket, (k + 1) * bucket) at each length.

    `windows(length)` yields int arrays [B, length + 1] of held-out text (inputs are [:, :-1], targets [:, 1:]), the
    same batch size throughout. Bytes per token come from the tokenizer (`token_byte_lengths`; None: one byte each).
    """
    table = tokenizer.token_byte_lengths()
    rows, timing = [], Timing()
    for length in lengths:
        nbuckets = math.ceil(length / bucket)
        nll, nbytes, ntok = np.zeros(nbuckets), np.zeros(nbuckets), np.zeros(nbuckets)
        for b, tokens in enumerate(tqdm(windows(length), desc=f"eval ppl {length}", disable=not progress)):
            tokens = np.asarray(tokens)
            t0 = time.perf_counter()
            per_token = np.asarray(_token_nll(*nnx.split(model), jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:])))
            timing.add(tokens[:, :-1].size, time.perf_counter() - t0, b == 0)
            weights = np.ones_like(per_token) if table is None else table[tokens[:, 1:]]
            which = np.arange(length) // bucket
            np.add.at(nll, which, per_token.sum(0))
            np.add.at(nbytes, which, weights.sum(0))
            np.add.at(ntok, which, np.full(length, tokens.shape[0]))
        if not ntok.any():
            raise ValueError(f"the held-out text has no window of {length + 1} tokens; use shorter lengths")
        for k in range(nbuckets):
            rows.append({"length": int(length), "position_bucket": [k * bucket, min((k + 1) * bucket, length)],
                         "bits_per_byte": float(nll[k] / max(nbytes[k], 1e-9) / math.log(2)),
                         "bits_per_token": float(nll[k] / max(ntok[k], 1) / math.log(2)), "tokens": int(ntok[k])})
    return rows, timing
