"""lm-evaluation-harness (PyPI ``lm-eval``) adapter: the model type ``titans_jax``.

Importing this module registers ``TitansJaxLM`` in lm-eval's model registry under ``titans_jax``. lm-eval (0.4.13)
discovers models only through its own built-in table or by import (no entry points), so its plain ``lm_eval``
command does not know this one; run it through ``python -m titans_jax.eval.lm_eval`` (same flags, see that module)::

    python -m titans_jax.eval.lm_eval --model titans_jax --model_args workdir=RUN,max_length=1024 \\
        --tasks piqa,hellaswag --batch_size 16

or from Python, after ``import titans_jax.eval.lm_eval_adapter``: ``lm_eval.simple_evaluate(model="titans_jax",
model_args="workdir=RUN", tasks=[...])``, or ``simple_evaluate(model=TitansJaxLM(model=m, tokenizer=t), ...)``.

Model arguments (``--model_args k=v,...``): ``workdir`` (a training workdir or an export, see
``titans_jax.export.load_model``), ``step`` (a workdir's checkpoint, default the latest), ``max_length`` (tokens the
model reads at once, default ``config.max_seq_len``), ``max_gen_toks`` (default 256), ``seed`` (sampling), and
lm-eval's own ``--batch_size`` and ``--device`` (``cpu``, ``cuda``, ``cuda:N``; default JAX's first device).

What each request type computes (docs/architecture.md, "Decoding", for the streaming state):

* ``loglikelihood``: the pair is tokenized as lm-eval's Hugging Face model does (``TemplateLM``: context and
  context + continuation encoded whole, trailing spaces of the context moved to the continuation; an empty context
  becomes the tokenizer's end-of-document id, the ``prefix_token_id``). Context + continuation is cut from the left
  to ``max_length + 1`` tokens and read in one parallel forward pass; the result is the sum of the continuation
  tokens' log-probabilities and whether each is the argmax. Requests are sorted by length and batched, right-padded
  (the logits are causal, so padding after a row changes none of its own).
* ``loglikelihood_rolling``: the text (after the end-of-document id) in disjoint windows of ``max_length``
  predicted tokens, as lm-eval's Hugging Face model does (``get_rolling_token_windows`` with ``context_len=1``, then
  ``make_disjoint_window``): the first window is conditioned on the end-of-document id, each later one only on the
  last token of the window before it, except the last, shorter one, which is conditioned on as many tokens before it
  as fill its input to ``max_length``. Each window starts from a fresh model state (the memory does not carry over
  between windows); the result is the sum over windows, every token predicted once.
* ``generate_until``: ``titans_jax.generate.generate`` (greedy, or sampled at the request's ``temperature``, ``top_k``,
  ``top_p``), stopping at the end-of-document token or after ``max_gen_toks``; the text is cut at the first
  occurrence of any ``until`` string. The context is cut from the left to ``max_length - max_gen_toks`` tokens.

Shapes stay few so that XLA compiles few programs: every batch has ``batch_size`` rows (missing rows are padding),
sequence lengths are padded to 64 times a power of two (capped at ``max_length`` rounded up to 64), and
``generate``'s prefill length (the shortest prompt of its batch, a static argument) is rounded down to a power of two
below 64 or a multiple of 64 above, by one extra row holding that many tokens of the shortest prompt: the rows feed
their remaining prompt tokens one at a time (at most 63).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import lm_eval.models  # noqa: F401  (registers lm-eval's own models first: its registry loads them only when empty)
import numpy as np
from flax import nnx
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry, register_model
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, warning_once
from tqdm import tqdm

from titans_jax.generate import generate

__all__ = ["MODEL_NAME", "TitansJaxLM", "pad_length"]

MODEL_NAME = "titans_jax"
DEFAULT_BATCH_SIZE = 16  # for --batch_size auto (no search: the shapes are few and fixed)
LENGTH_QUANTUM = 64
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")

log = logging.getLogger(__name__)


def pad_length(n: int, cap: int) -> int:
    """The padded length of a batch whose longest row has ``n`` tokens: 64 times the smallest power of two that holds
    ``n``, but at most ``cap`` rounded up to a multiple of 64 (never below ``n``)."""
    padded = LENGTH_QUANTUM
    while padded < n:
        padded *= 2
    return max(n, min(padded, -(-cap // LENGTH_QUANTUM) * LENGTH_QUANTUM))


def _prefill_floor(n: int) -> int:
    """A static prefill length <= ``n`` (n >= 1): below 64 the largest power of two, else the largest multiple of
    64, so that batches of many prompt lengths share few programs."""
    return 1 << (n.bit_length() - 1) if n < LENGTH_QUANTUM else n // LENGTH_QUANTUM * LENGTH_QUANTUM


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _score(graphdef, params, inputs_BxT, targets_BxT, mask_BxT):
    """Per row: the sum of log p(target) over the masked positions, and whether each masked target is the argmax."""
    logits_BxTxV = nnx.merge(graphdef, params)(inputs_BxT)
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    tok_logp_BxT = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    greedy_BxT = jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT
    return jnp.sum(jnp.where(mask_BxT, tok_logp_BxT, 0.0), axis=1), jnp.all(greedy_BxT | ~mask_BxT, axis=1)


def _device(spec: str | None) -> jax.Device:
    """lm-eval's ``--device`` as a JAX device: ``cpu``, ``cuda``/``gpu``, ``cuda:N``, ``tpu:N``; None, or a platform
    this host lacks (lm-eval's command line passes ``cuda:0`` unless told otherwise), gives JAX's first device."""
    default = jax.local_devices()[0]
    if spec is None:
        return default
    name, _, index = str(spec).partition(":")
    platform = {"cuda": "gpu", "rocm": "gpu"}.get(name.lower(), name.lower())
    try:
        devices = jax.local_devices(backend=platform)
    except RuntimeError:
        log.warning("titans_jax: no %s device here; running on %s", spec, default)
        return default
    try:
        return devices[int(index or 0)]
    except (ValueError, IndexError) as e:
        raise ValueError(f"device={spec!r} is not one of this host's {platform} devices {devices}") from e


def _batch_size(batch_size: int | str | None, max_batch_size: int | None) -> int:
    if batch_size is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        chosen = min(DEFAULT_BATCH_SIZE, max_batch_size or DEFAULT_BATCH_SIZE)
        log.info("titans_jax: batch_size=%s is taken as %d (no search)", batch_size, chosen)
        return chosen
    try:
        size = int(batch_size)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"batch_size must be an int >= 1 or 'auto', got {batch_size!r}")
    return size


class TitansJaxLM(TemplateLM):
    """A ``titans_jax`` model as an lm-eval ``LM`` (see the module docstring for what each request computes).

    Args:
      workdir: a training workdir or an export (``titans_jax.export.load_model``); or pass ``model`` and
        ``tokenizer`` instead.
      model, tokenizer: an already built ``TitansLM`` and its tokenizer (``titans_jax.data.get_tokenizer``).
      step: the checkpoint step of a workdir (default: the latest).
      batch_size: rows per forward pass (lm-eval's ``--batch_size``; ``auto`` means 16); max_batch_size caps ``auto``.
      max_length: the most tokens read in one pass (default: the model's ``max_seq_len``).
      max_gen_toks: the default number of generated tokens when a request names none.
      seed: the PRNG seed of sampled generation.
      device: lm-eval's ``--device`` (default: JAX's first device); the model runs on that one device.
    """

    def __init__(self, workdir: str | None = None, *, model: Any = None, tokenizer: Any = None,
                 step: int | None = None, batch_size: int | str | None = DEFAULT_BATCH_SIZE,
                 max_batch_size: int | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 seed: int = 0, device: str | None = None, **unknown: Any):
        super().__init__()
        if unknown:
            raise TypeError(f"titans_jax got unknown model_args {sorted(unknown)}; it takes workdir, step, "
                            "max_length, max_gen_toks, seed (and lm-eval's --batch_size, --device)")
        if (workdir is None) == (model is None) or (model is None) != (tokenizer is None):
            raise ValueError("pass workdir=RUN (a training workdir or an export), or both model= and tokenizer=")
        if model is None:
            from titans_jax.export import load_model
            from titans_jax.sharding import make_mesh

            mesh = make_mesh(None, devices=[_device(device)])
            model, _, tokenizer = load_model(workdir, step=None if step is None else int(step), mesh=mesh)
        self.model, self.tokenizer, self.workdir = model, tokenizer, workdir
        self.config = model.config
        self.batch_size = _batch_size(batch_size, max_batch_size)
        self._max_length = int(max_length) if max_length is not None else int(self.config.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        if self._max_length < 2 or self.max_gen_toks < 1:
            raise ValueError(f"max_length must be >= 2 and max_gen_toks >= 1, got {max_length=}, {max_gen_toks=}")
        self._rng = jax.random.key(int(seed))
        self._graphdef, self._params = nnx.split(model)

    # --------------------------------------------------------------------------------------- what lm-eval asks for
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eod_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of ``string`` (this project's tokenizers add no special tokens)."""
        return [int(i) for i in self.tokenizer.encode(string)]

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode([int(t) for t in tokens])

    def get_model_info(self) -> dict:
        """Recorded by lm-eval in the results' config."""
        from titans_jax.model import count_params

        return {"model_variant": self.config.variant, "model_num_parameters": int(count_params(self.config)),
                "model_workdir": None if self.workdir is None else str(self.workdir), "max_length": self.max_length}

    # --------------------------------------------------------------------------------------------- log-likelihood
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``requests``: ``(cache key or None, context ids, continuation ids)``; returns ``(log p, is greedy)``."""
        rows = []
        for _, context, continuation in requests:
            if not context:  # the first continuation token needs a position to be predicted from
                raise ValueError("loglikelihood needs at least one context token (lm-eval gives an empty context the "
                                 "end-of-document id)")
            if len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length={self.max_length}; "
                                 "raise max_length in --model_args")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append((whole, len(continuation)))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first: the largest shape early
        bar = tqdm(total=len(rows), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests")
        for start in range(0, len(order), self.batch_size):
            batch = [i for i in order[start:start + self.batch_size] if rows[i][1] > 0]
            if batch:
                for i, result in zip(batch, self._score_rows([rows[i] for i in batch]), strict=True):
                    out[i] = result
            for i in order[start:start + self.batch_size]:
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
            bar.update(len(order[start:start + self.batch_size]))
        bar.close()
        return out

    def _score_rows(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """One forward pass over up to ``batch_size`` rows ``(tokens, continuation length)``."""
        width = pad_length(max(len(tokens) - 1 for tokens, _ in rows), self.max_length)
        inputs = np.zeros((self.batch_size, width), np.int32)
        targets = np.zeros((self.batch_size, width), np.int32)
        mask = np.zeros((self.batch_size, width), bool)
        for r, (tokens, n_cont) in enumerate(rows):
            n = len(tokens) - 1  # position t predicts token t + 1
            inputs[r, :n], targets[r, :n] = tokens[:-1], tokens[1:]
            mask[r, n - n_cont:n] = True
        logp_B, greedy_B = jax.device_get(_score(self._graphdef, self._params, inputs, targets, mask))
        return [(float(logp_B[r]), bool(greedy_B[r])) for r in range(len(rows))]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in disjoint windows (see the module docstring)."""
        windows, owner = [], []
        for k, request in enumerate(requests):
            (text,) = request.args
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owner, scores, strict=True):
            totals[k] += logp
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------------------------------------- generation
    def _gen_options(self, gen_kwargs: dict) -> tuple[list[str], tuple[int, float, int | None, float | None]]:
        """``(until strings, (max_gen_toks, temperature, top_k, top_p))`` of a request's generation kwargs."""
        if not isinstance(gen_kwargs, dict):
            raise ValueError(f"generate_until expects a dict of generation kwargs, got {gen_kwargs!r}")
        extra = sorted(set(gen_kwargs) - set(GEN_KWARGS) - {"max_new_tokens", "max_tokens", "max_completion_tokens"})
        if extra:
            warning_once(log, f"titans_jax ignores the generation kwargs {extra}")
        kw = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=self.max_gen_toks)
        until = [s for s in kw["until"] if s]
        temperature = float(kw.get("temperature") or 0.0) if kw.get("do_sample") else 0.0
        top_k = kw.get("top_k") if temperature > 0 else None
        top_p = kw.get("top_p") if temperature > 0 else None
        max_new = int(kw["max_gen_toks"])
        if max_new < 1 or max_new >= self.max_length:
            raise ValueError(f"max_gen_toks={max_new} must be in [1, max_length={self.max_length})")
        return until, (max_new, temperature, None if top_k is None else int(top_k),
                       None if top_p is None else float(top_p))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Decoded continuations, cut at the first ``until`` string (see the module docstring)."""
        items = []
        for request in requests:
            context, gen_kwargs = request.args
            until, options = self._gen_options(gen_kwargs)
            ids = self.tok_encode(context)[-(self.max_length - options[0]):] or [self.prefix_token_id]
            items.append((ids, until, options))
        out = [""] * len(items)
        # Requests that share options share programs; within them, similar lengths share a batch.
        order = sorted(range(len(items)), key=lambda i: (repr(items[i][2]), -len(items[i][0])))
        groups: list[list[int]] = []
        for i in order:
            if groups and items[groups[-1][0]][2] == items[i][2] and len(groups[-1]) < self.batch_size:
                groups[-1].append(i)
            else:
                groups.append([i])
        bar = tqdm(total=len(items), disable=disable_tqdm or self.rank != 0, desc="Running generate_until requests")
        for g, group in enumerate(groups):
            texts = self._generate_rows([items[i][0] for i in group], items[group[0]][2], g)
            for i, text in zip(group, texts, strict=True):
                for stop in items[i][1]:
                    text = text.split(stop, 1)[0]
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            bar.update(len(group))
        bar.close()
        return out

    def _generate_rows(self, prompts: list[list[int]], options, call: int) -> list[str]:
        """One ``generate`` call: ``batch_size`` prompt rows plus the row that fixes the prefill length."""
        max_new, temperature, top_k, top_p = options
        shortest = min(prompts, key=len)
        floor = _prefill_floor(len(shortest))
        rows = prompts + [shortest[:floor]] * (self.batch_size + 1 - len(prompts))
        width = min(pad_length(max(map(len, rows)), self.max_length), self.max_length - max_new)
        prompt = np.zeros((len(rows), width), np.int32)
        for r, ids in enumerate(rows):
            prompt[r, :len(ids)] = ids
        lengths = np.array([len(ids) for ids in rows], np.int32)
        tokens, ends = generate(self.model, prompt, max_new, temperature=temperature, top_k=top_k, top_p=top_p,
                                stop_token=self.eot_token_id, prompt_lengths=lengths,
                                rng=jax.random.fold_in(self._rng, call), return_lengths=True)
        tokens, ends = np.asarray(tokens), np.asarray(ends)
        texts = []
        for r in range(len(prompts)):
            new = tokens[r, lengths[r]:ends[r]].tolist()
            if new and new[-1] == self.eot_token_id:
                new = new[:-1]
            texts.append(self.tok_decode(new))
        return texts


if MODEL_NAME not in model_registry:  # importing the module again (importlib.reload) must not register twice
    register_model(MODEL_NAME)(TitansJaxLM)
