"""Inference benchmarks (issue: inference and stateful use): parallel prefill against the parallel forward, decode
speed against context length, and the eager streaming step's per-call time and host memory.

For each variant, with compile time kept out of every timing (each program is compiled ahead of time, run once to
warm up, then timed with ``jax.block_until_ready``; the median of ``--reps`` runs):

a. **prefill**: tokens/s of ``model.step(prompt_BxN, model.init_state(B))`` (jitted; the parallel prefill of
   ``docs/architecture.md``, "Decoding") against the parallel forward ``model(prompt_BxN)`` on the same prompt; the
   ratio column is prefill / forward (the issue's target: >= 0.5 at N = 8192).
b. **decode**: the state after ``L`` tokens of context is built by real prefill (``model.step`` on pieces of the
   context, timed and reported as ``build_tokens_per_s``), then ``--decode-tokens`` single-token steps run inside one
   compiled ``lax.scan`` (greedy: each step's argmax is the next token). ``ratio`` is the tokens/s against the same
   variant's shortest context (the issue's target for the memory variants: >= 0.9 at 64K against 1K). Every model
   is sized for its context: ``max_seq_len = L + decode_tokens`` (the transformer's KV cache has ``max_seq_len``
   slots, so its per-token cost grows with L); a variant whose state does not depend on ``max_seq_len`` (every
   memory variant: fixed-size memory and window caches) runs one model, and so one set of programs, for all L.
c. **eager**: ``model.step(tok_Bx1, state)`` called directly from Python as a notebook user would (no outer jit),
   each call waited for: the first call (which may compile), the median and mean of the next 200, and the process's
   resident size (``VmRSS``) after 100 and after ``--eager-calls`` (1,000) calls; the issue asks for growth within
   50 MiB between the two.

    python -m experiments.bench_inference [--preset-size tiny|170m|340m] [--variants ...] [--prompt-len 8192]
        [--contexts 1024 16384 65536] [--decode-tokens 64] [--batch 1] [--out NAME] [--smoke]
        [--skip prefill decode eager] [--order prefill-first|priority] [--reps 3] [--eager-calls 1000]

``--smoke``: dim 32, one layer, a 48-token prompt, contexts 32 and 64 (on CPU in seconds; the tests run it through
``experiments.device_check --smoke``). ``experiments/device_check.py`` calls ``InferenceBench`` on an accelerator.
Results: a table on stdout and ``bench_results/<out>.json`` (``bench_common.save``, with ``machine()``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.bench_common import machine, package_versions, print_table, save
from titans_jax import TitansLM, get_config
from titans_jax.configs import VARIANTS, ModelConfig

# Smoke shapes: the train smoke's tiny model (experiments/device_check.py), so one CPU core runs every program in seconds.
SMOKE_MODEL = dict(dim=32, num_layers=1, num_heads=2, segment_len=16, window=16)
# The variants whose decode rows come first where time is short: one memory variant without attention, one with a
# sliding window, and the baseline whose KV cache grows.
DECODE_PRIORITY = ("lmm", "mag", "transformer")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one inference benchmark run measures.

    Attributes:
      preset_size: ``tiny``, ``170m`` or ``340m`` (the presets ``<size>-<variant>``); ignored with ``smoke``.
      batch: rows per call (B).
      prompt_len: N, the prompt of the prefill-against-forward rows.
      contexts: the context lengths L of the decode rows.
      decode_tokens: single-token steps per timed decode loop.
      reps: timed runs per measurement (median reported), after one warm-up run.
      max_measure_s: a measurement whose warm-up run already took this long is timed with fewer runs (down to the
        warm-up run alone), so a slow path cannot eat a run's whole budget.
      eager_calls: eager ``model.step`` calls after the warm-up call (resident size read after 100 and after these).
      eager_timed_calls: the first calls whose per-call times are reported.
      eager_budget_s: wall-clock cap per variant of the eager row (a slow step stops early; the row says so).
      smoke: tiny shapes (``SMOKE_MODEL``) whatever the other fields say about the model.
    """

    preset_size: str = "tiny"
    batch: int = 1
    prompt_len: int = 8192
    contexts: tuple[int, ...] = (1024, 16384, 65536)
    decode_tokens: int = 64
    reps: int = 3
    max_measure_s: float = 30.0
    eager_calls: int = 1000
    eager_timed_calls: int = 200
    eager_budget_s: float = 120.0
    smoke: bool = False

    @classmethod
    def for_smoke(cls, **overrides) -> Settings:
        """Tiny shapes that run on CPU in seconds: prompt 48 (not a multiple of the chunk of 16, so the prefill's
        token-by-token remainder runs too), contexts 32 and 64, 8 decode tokens."""
        base = dict(prompt_len=48, contexts=(32, 64), decode_tokens=8, reps=2, max_measure_s=5.0, eager_budget_s=3.0,
                    smoke=True)
        return cls(**{**base, **overrides})


def variant_config(settings: Settings, variant: str, max_seq_len: int) -> ModelConfig:
    """The benchmarked model of ``variant``, sized for ``max_seq_len`` tokens (the transformer's KV cache)."""
    if settings.smoke:
        return get_config(f"tiny-{variant}", **SMOKE_MODEL, max_seq_len=max_seq_len)
    return get_config(f"{settings.preset_size}-{variant}", max_seq_len=max_seq_len)


def _state_layout(cfg: ModelConfig, batch: int):
    """Shapes and dtypes of ``init_state(batch)`` without allocating it."""
    state = jax.eval_shape(lambda: TitansLM(cfg, rngs=nnx.Rngs(0)).init_state(batch))
    return jax.tree.structure(state), tuple((x.shape, str(x.dtype)) for x in jax.tree.leaves(state))


def _shapes_key(tree) -> tuple:
    return jax.tree.structure(tree), tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(tree))


def rss_bytes() -> int | None:
    """The process's resident set size (``VmRSS`` of /proc/self/status), or None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _mib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


# ------------------------------------------------------------------------------------------------- programs timed
def _step_program(graphdef):
    """``model.step`` as a function of the parameters: ``(params, tokens_Bxn, state) -> (logits_BxnxV, state)``."""
    return lambda params, tokens, state: nnx.merge(graphdef, params).step(tokens, state)


def _forward_program(graphdef):
    """The parallel forward ``model(tokens_BxT) -> logits_BxTxV``."""
    return lambda params, tokens: nnx.merge(graphdef, params)(tokens)


def _decode_program(graphdef, n: int):
    """``n`` greedy single-token steps in one ``lax.scan``: ``(params, tok_B, state) -> (tokens_Bxn, state)``; each
    step feeds the previous step's argmax, so no step can start before the one before it ends (as in sampling)."""

    def run(params, tok_B, state):
        def body(carry, _):
            tok, st = carry
            logits, st = nnx.merge(graphdef, params).step(tok[:, None], st)
            nxt = jnp.argmax(logits[:, -1], axis=-1).astype(tok.dtype)
            return (nxt, st), nxt

        (_, state), toks = jax.lax.scan(body, (tok_B, state), None, length=n)
        return toks.T, state

    return run


class _Model(NamedTuple):
    """One benchmarked model: its config, structure and parameters (shared by every ``max_seq_len`` of a variant)."""

    cfg: ModelConfig
    graphdef: Any
    params: Any


def _time_runs(fn: Callable, args: tuple, reps: int, max_s: float) -> tuple[float, Any, int]:
    """``(seconds per run, the last output, runs timed)``: one warm-up run, then the median of up to ``reps`` runs,
    fewer where the warm-up says they would take more than ``max_s``; a warm-up over ``max_s`` is itself the
    measurement (runs timed 0: it may hold first-execution costs)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    warm = time.perf_counter() - t0
    n = min(reps, int(max_s / max(warm, 1e-9)))
    if n < 1:
        return warm, out, 0
    times = []
    for _ in range(n):
        del out  # the previous output's buffers go before the next run allocates its own
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out, n


class InferenceBench:
    """Runs the rows of the three measurements for one ``Settings``; each row is passed to ``on_row`` as it is made.

    Programs are compiled ahead of time (``jax.jit(...).lower(...).compile()``), so compile time is measured apart
    (``*_compile_s``) and never in a timing; each program is kept per (name, config, argument shapes), so a variant's
    decode rows reuse the prefill program of the prefill row where the shapes match. ``deadline`` (a
    ``time.perf_counter()`` value) lets a caller with a time budget skip rows: a row starts only if its estimated
    cost (its programs not yet compiled, times the slowest compile seen, plus its tokens at the prefill speed
    measured) fits before it; a skipped row is still reported, with ``skipped``.
    """

    def __init__(self, settings: Settings, on_row: Callable[[dict], None] | None = None):
        self.settings = settings
        self.on_row = on_row or (lambda row: None)
        self.rows: list[dict] = []
        self._params: dict[str, Any] = {}
        self._compiled: dict[tuple, Any] = {}
        self._max_compile_s = 0.0
        self._prefill_tps: dict[str, float] = {}
        self._decode_tps: dict[str, float] = {}
        self._fixed_layout: dict[str, bool] = {}

    # ------------------------------------------------------------------------------------------------ plumbing
    def _emit(self, row: dict) -> dict:
        self.rows.append(row)
        self.on_row(row)
        return row

    def _row(self, bench: str, variant: str, **fields) -> dict:
        s = self.settings
        preset = f"tiny-{variant} (smoke)" if s.smoke else f"{s.preset_size}-{variant}"
        return {"bench": bench, "variant": variant, "preset": preset, "batch": s.batch, **fields}

    def _seq_lens(self) -> list[int]:
        s = self.settings
        return sorted({s.prompt_len + s.decode_tokens, *(c + s.decode_tokens for c in s.contexts)})

    def model(self, variant: str, seq_len: int) -> _Model:
        """The model of ``variant`` for contexts up to ``seq_len`` tokens. A variant whose state layout does not depend
        on ``max_seq_len`` gets the config of the longest length of this run whatever ``seq_len`` is (one structure:
        its programs compile once for every context); parameters are drawn once per variant and shared."""
        lens = self._seq_lens()
        longest = max(lens + [seq_len])
        if variant not in self._fixed_layout:
            layouts = {_state_layout(variant_config(self.settings, variant, n), self.settings.batch)
                       for n in (min(lens + [seq_len]), longest)}
            self._fixed_layout[variant] = len(layouts) == 1
        cfg = variant_config(self.settings, variant, longest if self._fixed_layout[variant] else seq_len)
        if variant not in self._params:
            self._params[variant] = nnx.split(TitansLM(cfg, rngs=nnx.Rngs(0)))[1]
        graphdef = nnx.split(nnx.eval_shape(lambda: TitansLM(cfg, rngs=nnx.Rngs(0))))[0]
        return _Model(cfg, graphdef, self._params[variant])

    def _compile(self, name: str, m: _Model, make: Callable, *args) -> tuple[Any, float | None]:
        """``(compiled program, compile seconds or None when it was compiled before)``."""
        key = (name, m.cfg, _shapes_key(args[1:]))
        if key in self._compiled:
            return self._compiled[key], None
        t0 = time.perf_counter()
        compiled = jax.jit(make(m.graphdef)).lower(*args).compile()
        dt = time.perf_counter() - t0
        self._max_compile_s = max(self._max_compile_s, dt)
        self._compiled[key] = compiled
        return compiled, dt

    def _is_compiled(self, name: str, m: _Model, *args) -> bool:
        return (name, m.cfg, _shapes_key(args)) in self._compiled

    def _tokens(self, n: int, seed: int = 0) -> jax.Array:
        vocab = variant_config(self.settings, "lmm", 1).vocab_size
        return jax.random.randint(jax.random.key(seed), (self.settings.batch, n), 0, vocab, jnp.int32)

    def _skip(self, estimate_s: float, deadline: float | None) -> str | None:
        if deadline is None:
            return None
        left = deadline - time.perf_counter()
        if estimate_s > left:
            return f"estimated {estimate_s:.0f} s, {max(left, 0):.0f} s left"
        return None

    def _init_state(self, m: _Model):
        return nnx.merge(m.graphdef, m.params).init_state(self.settings.batch)

    # ------------------------------------------------------------------------------------------------- a. prefill
    def prefill_row(self, variant: str, deadline: float | None = None) -> dict:
        """Prefill (``model.step`` on the whole prompt from ``init_state``) against the parallel forward."""
        s = self.settings
        n = s.prompt_len
        skip = self._skip(2 * self._max_compile_s, deadline)
        if skip:
            return self._emit(self._row("prefill", variant, n=n, skipped=skip))
        m = self.model(variant, n + s.decode_tokens)
        prompt = self._tokens(n)
        state0 = self._init_state(m)
        fwd, fwd_c = self._compile("forward", m, _forward_program, m.params, prompt)
        step, step_c = self._compile("step", m, _step_program, m.params, prompt, state0)
        t_fwd, logits_fwd, fwd_runs = _time_runs(fwd, (m.params, prompt), s.reps, s.max_measure_s)
        t_pre, (logits_pre, _), pre_runs = _time_runs(step, (m.params, prompt, state0), s.reps, s.max_measure_s)
        last_f, last_p = logits_fwd[:, -1].astype(jnp.float32), logits_pre[:, -1].astype(jnp.float32)
        rel = float(jnp.max(jnp.abs(last_p - last_f)) / (jnp.max(jnp.abs(last_f)) + 1e-30))
        del logits_fwd, logits_pre, state0
        tps_pre, tps_fwd = s.batch * n / t_pre, s.batch * n / t_fwd
        self._prefill_tps[variant] = tps_pre
        return self._emit(self._row(
            "prefill", variant, n=n, prefill_tokens_per_s=round(tps_pre, 1), forward_tokens_per_s=round(tps_fwd, 1),
            ratio=round(tps_pre / tps_fwd, 3), prefill_s=round(t_pre, 4), forward_s=round(t_fwd, 4),
            prefill_runs=pre_runs, forward_runs=fwd_runs, prefill_compile_s=_round(step_c),
            forward_compile_s=_round(fwd_c), last_logits_rel_diff=float(f"{rel:.3g}")))

    # -------------------------------------------------------------------------------------------------- b. decode
    def _piece_len(self) -> int:
        """Tokens fed per ``step`` call while a context is built: the greatest common divisor of the contexts (so
        every context of a variant whose state layout is fixed shares one program; 1024 for the defaults) or, where
        that is longer than the prompt, its greatest common divisor with the prompt length."""
        s = self.settings
        piece = math.gcd(*s.contexts)
        return piece if piece <= s.prompt_len else math.gcd(piece, s.prompt_len)

    def decode_row(self, variant: str, context: int, deadline: float | None = None) -> dict:
        """Decode tokens/s from a state that has read ``context`` tokens (built by real prefill, timed too)."""
        s = self.settings
        m = self.model(variant, context + s.decode_tokens)
        piece = self._piece_len()
        state = jax.eval_shape(lambda: self._init_state(m))
        piece_toks = jax.ShapeDtypeStruct((s.batch, piece), jnp.int32)
        tok_B = jax.ShapeDtypeStruct((s.batch,), jnp.int32)
        n_compiles = (not self._is_compiled("step", m, piece_toks, state)) + (
            not self._is_compiled(f"decode{s.decode_tokens}", m, tok_B, state))
        tps = self._prefill_tps.get(variant) or max(self._prefill_tps.values(), default=0.0)
        skip = self._skip(n_compiles * self._max_compile_s + (s.batch * context / tps if tps else 0.0), deadline)
        if skip:
            return self._emit(self._row("decode", variant, context=context, skipped=skip))
        state = self._init_state(m)
        tokens = self._tokens(context, seed=1)
        step, step_c = self._compile("step", m, _step_program, m.params, tokens[:, :piece], state)
        # The build's first piece is not a warm-up: the program is compiled, and a first execution's costs are part of
        # what a user who prefills a long context pays.
        t0 = time.perf_counter()
        for start in range(0, context, piece):
            logits, state = step(m.params, tokens[:, start:start + piece], state)
        jax.block_until_ready(state)
        build_s = time.perf_counter() - t0
        tok = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        del logits, tokens
        loop, loop_c = self._compile(f"decode{s.decode_tokens}", m, lambda g: _decode_program(g, s.decode_tokens),
                                     m.params, tok, state)
        t_dec, _, runs = _time_runs(loop, (m.params, tok, state), s.reps, s.max_measure_s)
        del state
        tps_dec = s.batch * s.decode_tokens / t_dec
        base = self._decode_tps.setdefault(variant, tps_dec) if context == min(s.contexts) else \
            self._decode_tps.get(variant)
        return self._emit(self._row(
            "decode", variant, context=context, decode_tokens_per_s=round(tps_dec, 1),
            ms_per_token=round(1e3 * t_dec / s.decode_tokens, 3),
            ratio=None if base is None else round(tps_dec / base, 3), decode_runs=runs,
            build_tokens_per_s=round(s.batch * context / build_s, 1), build_s=round(build_s, 3), piece=piece,
            max_seq_len=m.cfg.max_seq_len, step_compile_s=_round(step_c), decode_compile_s=_round(loop_c)))

    def decode_rows(self, variant: str, deadline: float | None = None) -> list[dict]:
        """Every context of the settings, shortest first (the ratio's base)."""
        rows = []
        for context in sorted(self.settings.contexts):
            rows.append(_guarded(self, "decode", variant, lambda c=context: self.decode_row(variant, c, deadline),
                                 context=context))
        return rows

    # --------------------------------------------------------------------------------------------------- c. eager
    def eager_row(self, variant: str, deadline: float | None = None) -> dict:
        """``model.step`` called from Python, one token per call, as a notebook user streams text."""
        s = self.settings
        skip = self._skip(self._max_compile_s, deadline)
        if skip:
            return self._emit(self._row("eager", variant, skipped=skip))
        cfg = variant_config(s, variant, max(s.prompt_len + s.decode_tokens, s.eager_calls + 8))
        if variant not in self._params:
            self._params[variant] = nnx.split(TitansLM(cfg, rngs=nnx.Rngs(0)))[1]
        graphdef = nnx.split(nnx.eval_shape(lambda: TitansLM(cfg, rngs=nnx.Rngs(0))))[0]
        model = nnx.merge(graphdef, self._params[variant])
        state = model.init_state(s.batch)
        tok = jnp.zeros((s.batch, 1), jnp.int32)
        t0 = time.perf_counter()
        logits, state = model.step(tok, state)
        jax.block_until_ready(logits)
        first = time.perf_counter() - t0
        # The cap counts from after the first call: that one may compile, and is reported on its own.
        stop = time.perf_counter() + s.eager_budget_s
        if deadline is not None:
            stop = min(stop, deadline)
        times: list[float] = []
        rss_100 = rss_end = None
        calls = 0
        while calls < s.eager_calls and time.perf_counter() < stop:
            t0 = time.perf_counter()
            logits, state = model.step(tok, state)
            jax.block_until_ready(logits)
            calls += 1
            if calls <= s.eager_timed_calls:
                times.append(time.perf_counter() - t0)
            if calls == 100:
                gc.collect()
                rss_100 = rss_bytes()
        if calls == s.eager_calls:
            gc.collect()
            rss_end = rss_bytes()
        note = None if calls == s.eager_calls else f"stopped after {calls} calls (time cap)"
        return self._emit(self._row(
            "eager", variant, first_call_s=round(first, 3),
            ms_per_call_median=round(1e3 * statistics.median(times), 3) if times else None,
            ms_per_call_mean=round(1e3 * statistics.fmean(times), 3) if times else None, calls=calls,
            rss_MiB_after_100=_mib(rss_100), rss_MiB_after_all=_mib(rss_end),
            rss_growth_MiB=None if rss_100 is None or rss_end is None else _mib(rss_end - rss_100),
            **({"note": note} if note else {})))


def _round(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def _guarded(bench: InferenceBench, kind: str, variant: str, fn: Callable[[], dict], **fields) -> dict:
    """``fn()``, or a row that records its exception (an out-of-memory at 64K must not end the other rows)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 (recorded in the row; the run goes on)
        return bench._emit(bench._row(kind, variant, **fields, error=f"{type(e).__name__}: {str(e)[:500]}"))


def by_priority(variants) -> list[str]:
    """``variants`` with ``DECODE_PRIORITY``'s first (in its order), the others after in their given order."""
    return sorted(variants, key=lambda v: DECODE_PRIORITY.index(v) if v in DECODE_PRIORITY else len(DECODE_PRIORITY))


def run(settings: Settings, variants, *, measures=("prefill", "decode", "eager"), deadline: float | None = None,
        on_row: Callable[[dict], None] | None = None, order: str = "prefill-first") -> list[dict]:
    """Every row of ``measures`` for ``variants`` (``by_priority``), returned and passed to ``on_row`` as each is made.

    ``order``: ``"prefill-first"`` runs every prefill row, then every decode row, then the eager rows;
    ``"priority"`` runs prefill and decode of ``DECODE_PRIORITY``'s variants before those of the others (where a
    ``deadline`` cuts the run short, the rows the issue's targets rest on come first).
    """
    if order not in ("prefill-first", "priority"):
        raise ValueError(f"order must be 'prefill-first' or 'priority', got {order!r}")
    bench = InferenceBench(settings, on_row)
    ordered = by_priority(variants)
    groups = [ordered] if order == "prefill-first" else [[v for v in ordered if v in DECODE_PRIORITY],
                                                         [v for v in ordered if v not in DECODE_PRIORITY]]
    for group in groups:
        if "prefill" in measures:
            for v in group:
                _guarded(bench, "prefill", v, lambda v=v: bench.prefill_row(v, deadline))
        if "decode" in measures:
            for v in group:
                bench.decode_rows(v, deadline)
    if "eager" in measures:
        for v in ordered:
            _guarded(bench, "eager", v, lambda v=v: bench.eager_row(v, deadline))
    return bench.rows


def _print_row(row: dict) -> None:
    print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset-size", default="tiny", choices=["tiny", "170m", "340m"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--prompt-len", type=int, default=None, help="prefill rows' prompt (default 8192; smoke 48)")
    ap.add_argument("--contexts", type=int, nargs="+", default=None,
                    help="decode rows' context lengths (default 1024 16384 65536; smoke 32 64)")
    ap.add_argument("--decode-tokens", type=int, default=None, help="tokens per timed decode loop (default 64; smoke 8)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=None, help="timed runs per measurement (default 3; smoke 2)")
    ap.add_argument("--eager-calls", type=int, default=1000)
    ap.add_argument("--skip", nargs="*", default=[], choices=["prefill", "decode", "eager"])
    ap.add_argument("--order", default="prefill-first", choices=["prefill-first", "priority"],
                    help="prefill-first: every prefill row, then decode; priority: lmm, mag, transformer first")
    ap.add_argument("--out", default=None, help="results file name (default inference, smoke inference_smoke)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU in seconds")
    args = ap.parse_args(argv)
    given = {k: v for k, v in dict(prompt_len=args.prompt_len, decode_tokens=args.decode_tokens, reps=args.reps,
                                   contexts=None if args.contexts is None else tuple(args.contexts)).items()
             if v is not None}
    common = dict(preset_size=args.preset_size, batch=args.batch, eager_calls=args.eager_calls, **given)
    settings = Settings.for_smoke(**common) if args.smoke else Settings(**common)
    measures = [m for m in ("prefill", "decode", "eager") if m not in args.skip]
    rows = run(settings, args.variants, measures=measures, on_row=_print_row, order=args.order)
    columns = {
        "prefill": ["variant", "n", "prefill_tokens_per_s", "forward_tokens_per_s", "ratio", "prefill_compile_s",
                    "forward_compile_s", "last_logits_rel_diff"],
        "decode": ["variant", "context", "decode_tokens_per_s", "ms_per_token", "ratio", "build_tokens_per_s",
                   "build_s", "max_seq_len", "decode_compile_s"],
        "eager": ["variant", "first_call_s", "ms_per_call_median", "ms_per_call_mean", "calls", "rss_MiB_after_100",
                  "rss_MiB_after_all", "rss_growth_MiB"],
    }
    for kind, cols in columns.items():
        sel = [r for r in rows if r["bench"] == kind]
        if sel:
            extra = [c for c in ("skipped", "error", "note") if any(c in r for r in sel)]
            print(f"\n== {kind}")
            print_table(sel, cols + extra)
    out = save(args.out or ("inference_smoke" if args.smoke else "inference"),
               {"machine": machine(), "versions": package_versions(), "settings": dataclasses.asdict(settings),
                "rows": rows})
    print(f"\nwrote {out}")
    return rows


if __name__ == "__main__":
    main()
