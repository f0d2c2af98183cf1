"""Sampling on top of the streaming ``TitansLM.step``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


@functools.partial(jax.jit, static_argnums=(0,))
def _step(graphdef, params, tokens, state):
    return nnx.merge(graphdef, params).step(tokens, state)


def sample_logits(logits_BxV, rng, temperature: float, top_k: int | None):
    """Greedy when ``temperature == 0``; otherwise softmax sampling at ``temperature``, optionally among the top k."""
    if temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(model, prompt, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None, rng=None):
    """Continue ``prompt`` (int ``[B, T]``, T >= 1) by ``max_new_tokens`` tokens; returns ``[B, T + max_new_tokens]``.

    The prompt is fed through the streaming state once, then one token at a time (each step jitted once).
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be an int array [batch, time] with time >= 1, got shape {prompt.shape}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if top_k is not None and not 1 <= top_k <= model.config.vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size={model.config.vocab_size}], got {top_k}")
    total = prompt.shape[1] + max_new_tokens
    if model.config.variant == "transformer" and total > model.config.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {total} exceeds max_seq_len={model.config.max_seq_len} "
                         "(the transformer's KV cache); raise max_seq_len")
    rng = jax.random.key(0) if rng is None else rng
    graphdef, params = nnx.split(model)
    state = model.init_state(prompt.shape[0])
    logits, state = _step(graphdef, params, prompt, state)
    out = [prompt]
    for _ in range(max_new_tokens):
        rng, sub = jax.random.split(rng)
        tok = sample_logits(logits[:, -1], sub, temperature, top_k)[:, None]
        out.append(tok)
        logits, state = _step(graphdef, params, tok, state)
    return jnp.concatenate(out, axis=1)
