"""One script for an accelerator (issues: performance, GPU and TPU readiness; inference and stateful use), sized for
one run of about 8 minutes on one GPU. Sections, in this order:

1. **memory_paths**: the fast memory paths (dual with its hand-written backward, dual with autodiff, associative)
   against the token-by-token reference on the device, float32 and bfloat16: outputs, final states and gradients.
2. **inference** (``experiments.bench_inference``, the 340m presets at batch 1): parallel prefill of an 8192-token
   prompt against the parallel forward for every variant; then decode tokens/s at contexts 1024, 16384 and 65536
   for lmm, mag and the transformer first, the other variants while time remains (``--inference-order priority``:
   prefill and decode of those three before any row of the others).
3. **train**: train-step tokens/s, model FLOPs utilisation and peak memory of the 340m preset of every variant at
   T = 4096, at batch 8, or 4 where 8 does not fit (the trainer's own step, compiled ahead of time).
4. **eager**: ``model.step`` called from Python one token at a time (per-call time, host memory growth), only with
   time left over.

Robust by construction: an exception in a section (or in one row) is recorded in the JSON and the script goes on;
the JSON is rewritten after every row, so a run killed at its time limit still leaves everything measured until
then; ``--budget-s`` bounds the whole run: a row starts only if its estimated cost fits in the time its section has
left (``--train-reserve-s`` of the budget is kept for the sections after inference), and sections with no time left
are recorded as skipped. Every row is printed as one JSON line as it is produced.

Imports only jax, flax, optax, orbax-checkpoint, chex and numpy (and their own dependencies): an accelerator's image
need not have this repository's data dependencies (grain, tensorflow-datasets, tqdm): ``titans_jax.train`` loads its
trainer lazily, so importing its train step does not pull them in.

    PYTHONUNBUFFERED=1 python3 -m experiments.device_check --out-dir $OUT --budget-s 480   # on the accelerator
    python -m experiments.device_check --smoke    # tiny shapes on CPU, so the script cannot rot (run by the tests)
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # with _IMPORT_S below: the budget counts the imports too (not the interpreter's start-up)

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import experiments.bench_common as common  # noqa: E402
from experiments.bench_common import machine, package_versions  # noqa: E402

# The project's modules: where one fails to import (another image's flax, say), main() still writes the JSON with the
# machine, the package versions and the traceback, which is what a one-shot accelerator run needs to be fixed.
try:
    from experiments import bench_inference
    from experiments.bench_model import compile_train_step, model_flops, train_inputs
    from titans_jax import get_config
    from titans_jax.configs import VARIANTS
    from titans_jax.memory import linear_memory, memory_scan, memory_scan_reference, mlp_memory
    from titans_jax.sharding import make_mesh

    IMPORT_ERROR = None
except Exception:  # noqa: BLE001 (reported by main)
    IMPORT_ERROR = traceback.format_exc()
    VARIANTS = ("lmm", "mac", "mag", "mal", "transformer", "swa")

_IMPORT_S = time.perf_counter() - _T0

# Dense bf16 peak FLOP/s for MFU, by device kind (vendor figures, no sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12}
SECTIONS = ("memory_paths", "inference", "train", "eager")
# Seconds a section needs at least to be started at all (a first compile of the 340m programs takes tens of seconds).
MIN_SECTION_S = {"memory_paths": 20.0, "inference": 40.0, "train": 40.0, "eager": 20.0}


def _emit(row: dict) -> None:
    print(json.dumps(row, default=str), flush=True)


# Largest float32 error of a fast path allowed, as a multiple of the float32 oracle's own error against the float64
# truth on the same inputs (tests/memory_cases.py, ORACLE_FACTOR: 4x the largest ratio measured over 30 seeds on CPU).
ORACLE_FACTOR = 100.0


def _flat(tree):
    """Every leaf as one numpy float64 vector (numpy: the comparison stays float64 outside ``jax.enable_x64``)."""
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def _unit_rows(key, t_len, dim):
    x = jax.random.normal(key, (t_len, dim))
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _paths_loss(fn, net, p, *args):
    y, st = fn(net, p, *args, chunk_size=16)
    return jnp.sum(jnp.sin(y.astype(jnp.float32))) + sum(jnp.sum(w) for w in st.weights)


def _outputs_and_grads(fn, net, params, args):
    """Outputs and final state, and the gradients of ``_paths_loss`` (params, q, k, v), each flattened to float64."""
    with jax.default_matmul_precision("highest"):
        out = jax.jit(functools.partial(fn, net, chunk_size=16))(params, *args)
        g = jax.jit(jax.grad(functools.partial(_paths_loss, fn, net), argnums=(0, 1, 2, 3)))(params, *args)
    return _flat(out), _flat(g)


def _rel_errs(got, truth):
    return [float(np.max(np.abs(x - t)) / (np.max(np.abs(t)) + 1e-300)) for x, t in zip(got, truth, strict=True)]


def check_memory_paths(t_len, dim, dtypes=("float32", "bfloat16"), nets=None, *, deadline=None, on_row=_emit,
                       results=None):
    """Every fast path and the float32 (or bfloat16) oracle against the float64 truth (the token-by-token reference in
    float64 on the same inputs): max error over outputs and states, and over gradients, relative to the truth's scale,
    and ``ratio``: the fast path's error over the oracle's own (floored at one float32 ulp of the scale), the rule of
    the test suite. One row per (net, dtype, method), appended to ``results`` and passed to ``on_row``. A (net, dtype)
    case starts only before ``deadline`` (a ``time.perf_counter()`` value).

    Why not fast path against the float32 reference at long T: with these synthetic gates (theta up to 0.1, eta up to
    0.9) the deep memory's recurrence amplifies rounding, so two float32 orderings drift apart whatever the method. On
    CPU (2026-11-30) the float32 oracle's own error against float64 was 5e-7 of scale at T = 64, 4e-6 at 256 and 0.36
    at 1024 (the first H200 run compared at T = 1024 and reported 0.15-0.54 for every method, associative included);
    in float64 the dual form and the oracle agree to 1e-14 at 256. So the check runs at T = 256.
    """
    results = [] if results is None else results
    floor = float(jnp.finfo(jnp.float32).eps)
    for net in nets or (linear_memory(dim), mlp_memory(dim, 2, 4)):
        params = net.init(jax.random.key(0))
        ks = jax.random.split(jax.random.key(1), 6)
        base = (_unit_rows(ks[0], t_len, dim), _unit_rows(ks[1], t_len, dim), jax.random.normal(ks[2], (t_len, dim)),
                0.1 * jax.random.uniform(ks[3], (t_len,)), 0.9 * jax.random.uniform(ks[4], (t_len,)),
                0.05 * jax.random.uniform(ks[5], (t_len,)))
        with jax.enable_x64(True):
            truth = _outputs_and_grads(memory_scan_reference, net, tuple(w.astype(jnp.float64) for w in params),
                                       tuple(a.astype(jnp.float64) for a in base))
        for dtype in dtypes:
            if deadline is not None and time.perf_counter() > deadline:
                results.append({"net": f"depth{net.depth}", "dtype": dtype, "skipped": "section time used up"})
                on_row(results[-1])
                continue
            args = tuple(a.astype(dtype) for a in base)
            oracle = _rel_errs(_outputs_and_grads(memory_scan_reference, net, params, args), truth)
            for method in ("reference", "dual", "dual_autodiff", "associative"):
                fn = functools.partial(memory_scan, impl=method)
                e = oracle if method == "reference" else _rel_errs(_outputs_and_grads(fn, net, params, args), truth)
                results.append({"net": f"depth{net.depth}", "dtype": dtype, "method": method, "T": t_len,
                                "rel_err_outputs_states": e[0], "rel_err_grads": e[1],
                                "ratio": max(x / max(o, floor) for x, o in zip(e, oracle, strict=True))})
                on_row(results[-1])
    return results


def memory_paths_ok(rows) -> bool | None:
    """Whether every float32 fast path is within ``ORACLE_FACTOR`` times the float32 oracle's own error against the
    float64 truth; None when none ran."""
    ratios = [r["ratio"] for r in rows if r.get("dtype") == "float32" and "ratio" in r]
    return None if not ratios else max(ratios) <= ORACLE_FACTOR


def train_throughput(preset_size, t_len, batches, variants, smoke, *, deadline=None, on_row=_emit, rows=None):
    """One row per variant: the first of ``batches`` (largest first) whose compiled train step fits in 90% of the
    device's memory, timed over a few steps. A variant starts only if the slowest set-up seen so far fits before
    ``deadline``."""
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    budget = 0.9 * stats.get("bytes_limit", 16 * 2**30)
    peak = next((v for k, v in PEAK_BF16.items() if k.lower() in dev.device_kind.lower()), None)
    mesh = make_mesh(None, devices=[dev])
    rows = [] if rows is None else rows
    slowest = 0.0
    for v in variants:
        if deadline is not None and deadline - time.perf_counter() < slowest:
            rows.append({"variant": v, "skipped": f"{deadline - time.perf_counter():.0f} s left, a set-up took "
                                                  f"{slowest:.0f} s"})
            on_row(rows[-1])
            continue
        t0 = time.perf_counter()
        try:
            rows.append(_train_row(v, preset_size, t_len, batches, smoke, budget, peak, mesh))
        except Exception as e:  # noqa: BLE001 (recorded; the other variants still run)
            rows.append({"variant": v, "error": f"{type(e).__name__}: {str(e)[:500]}"})
        slowest = max(slowest, time.perf_counter() - t0)
        on_row(rows[-1])
    return rows


def _train_row(v, preset_size, t_len, batches, smoke, budget, peak, mesh):
    cfg = get_config(f"{preset_size}-{v}")
    if smoke:
        cfg = get_config(f"tiny-{v}", **bench_inference.SMOKE_MODEL)
    cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, t_len + 64), remat=not smoke)
    t0 = time.perf_counter()
    found, tried = None, []
    for b in sorted(batches, reverse=True):
        try:
            compiled, compile_s, need = compile_train_step(cfg, b, t_len, mesh)
        except Exception as e:  # noqa: BLE001 (an allocation failure at compile time means "does not fit")
            tried.append({"batch": b, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        if need is not None and need > budget:
            tried.append({"batch": b, "peak_mem_GiB": round(need / 2**30, 2), "note": "over 90% of device memory"})
            continue
        found = (b, compiled, compile_s, need)
        break
    if found is None:
        return {"variant": v, "T": t_len, "batch": 0, "note": f"no batch of {sorted(batches)} fits", "tried": tried}
    b, compiled, compile_s, need = found
    state, batch = train_inputs(cfg, b, t_len, mesh)
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    reps = 1 if smoke else 3
    t1 = time.perf_counter()
    for _ in range(reps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    dt = (time.perf_counter() - t1) / reps
    loss = float(metrics["loss"])
    del state, batch, compiled
    flops = b * model_flops(cfg, t_len)
    return {"variant": v, "preset": f"tiny-{v} (smoke)" if smoke else f"{preset_size}-{v}", "T": t_len, "batch": b,
            "tokens_per_s": round(b * t_len / dt), "step_s": round(dt, 3),
            "mfu": None if peak is None else round(flops / dt / peak, 3),
            "peak_mem_GiB": None if need is None else round(need / 2**30, 3),
            "peak_mem_bytes": None if need is None else int(need), "loss": loss, "compile_s": round(compile_s, 1),
            "setup_s": round(time.perf_counter() - t0, 1), **({"tried": tried} if tried else {})}


def _write(path: str, report: dict) -> None:
    """Replace the JSON at ``path`` in one step (a run killed mid-write leaves the previous complete file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2, default=str)
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, runs on CPU in seconds")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole run (default 480)")
    ap.add_argument("--train-reserve-s", type=float, default=150.0,
                    help="seconds of the budget the inference section leaves to the sections after it (default 150)")
    ap.add_argument("--inference-order", default="prefill-first", choices=["prefill-first", "priority"],
                    help="prefill-first: prefill rows of every variant, then decode rows (lmm, mag, transformer first); "
                         "priority: prefill and decode of lmm, mag, transformer before the other variants")
    ap.add_argument("--out-dir", default=None, help="where the JSON goes (default bench_results/, or $TITANS_BENCH_DIR)")
    ap.add_argument("--out", default="device_check", help="file name without .json")
    args = ap.parse_args(argv)
    start = time.perf_counter() - _IMPORT_S  # as if this module had been imported just now (a test calls main later)
    end = start + args.budget_s
    margin = 0.0 if args.smoke else 10.0  # for writing the JSON and the interpreter's exit
    path = os.path.join(args.out_dir or common.RESULTS_DIR, f"{args.out}.json")
    report = {"machine": machine(), "versions": package_versions(),
              "smoke": args.smoke, "budget_s": args.budget_s, "sections": {},
              "memory_paths": [], "memory_paths_ok": None, "inference": [], "train": []}
    if IMPORT_ERROR is not None:
        report["import_error"] = IMPORT_ERROR
        _write(path, report)
        raise SystemExit(f"the project's modules do not import here (written to {path}):\n{IMPORT_ERROR}")
    _write(path, report)

    def on_row(section):
        def emit(row):
            _emit({"section": section, **row})
            _write(path, report)
        return emit

    def run_section(name, deadline, fn):
        left = deadline - time.perf_counter()
        if name not in args.sections:
            return
        if not args.smoke and left < MIN_SECTION_S[name]:
            report["sections"][name] = {"status": "skipped", "reason": f"{max(left, 0):.0f} s left"}
        else:
            t0 = time.perf_counter()
            try:
                fn(None if args.smoke else deadline)
                report["sections"][name] = {"status": "ok"}
            except Exception as e:  # noqa: BLE001 (recorded; the next section still runs)
                report["sections"][name] = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:1000]}",
                                            "traceback": traceback.format_exc()[-4000:]}
            report["sections"][name]["elapsed_s"] = round(time.perf_counter() - t0, 1)
        _emit({"section": name, **report["sections"][name]})
        _write(path, report)

    # 1. The memory paths: a quarter of the budget at most (many small programs to compile, each case checked apart).
    def memory_paths(deadline):
        rows = report["memory_paths"]
        if args.smoke:
            check_memory_paths(40, 16, dtypes=("float32",), nets=(mlp_memory(16, 2, 2),),
                               on_row=on_row("memory_paths"), results=rows)
        else:
            check_memory_paths(256, 64, deadline=deadline, on_row=on_row("memory_paths"), results=rows)

    run_section("memory_paths", start + 0.25 * args.budget_s, memory_paths)
    report["memory_paths_ok"] = memory_paths_ok(report["memory_paths"])  # also on the rows of a section cut short

    # 2. Inference: every prefill row, then decode rows (lmm, mag, transformer first), up to the train reserve.
    def inference(deadline):
        settings = (bench_inference.Settings.for_smoke() if args.smoke
                    else bench_inference.Settings(preset_size="340m", batch=1, prompt_len=8192,
                                                  contexts=(1024, 16384, 65536), decode_tokens=64, reps=3,
                                                  max_measure_s=20.0))
        bench_inference.run(settings, args.variants, measures=("prefill", "decode"), deadline=deadline,
                            on_row=lambda row: (report["inference"].append(row), on_row("inference")(row)),
                            order=args.inference_order)

    run_section("inference", end - args.train_reserve_s, inference)

    # 3. Train throughput at T = 4096 (smoke: 64), batch 8 or 4 (smoke: 1).
    def train(deadline):
        t_len, batches = (64, (1,)) if args.smoke else (4096, (4, 8))
        train_throughput("340m", t_len, batches, args.variants, args.smoke, deadline=deadline,
                         on_row=on_row("train"), rows=report["train"])

    run_section("train", end - margin, train)

    # 4. The eager step with what is left (a few variants; smoke: the first variant only).
    def eager(deadline):
        report["eager"] = []
        settings = (bench_inference.Settings.for_smoke(eager_calls=200) if args.smoke
                    else bench_inference.Settings(preset_size="340m", batch=1, prompt_len=8192, decode_tokens=64,
                                                  eager_budget_s=30.0))
        variants = args.variants[:1] if args.smoke else [v for v in ("lmm", "transformer", "mac") if v in args.variants]
        bench_inference.run(settings, variants, measures=("eager",), deadline=deadline,
                            on_row=lambda row: (report["eager"].append(row), on_row("eager")(row)))

    run_section("eager", end - margin, eager)

    report["elapsed_s"] = round(time.perf_counter() - start, 1)
    _write(path, report)
    print(f"wrote {path}", flush=True)
    if report["memory_paths_ok"] is False:
        worst = max(r["ratio"] for r in report["memory_paths"] if r.get("dtype") == "float32" and "ratio" in r)
        raise SystemExit(f"a fast memory path is {worst:.3g}x less accurate than the float32 oracle against the float64 "
                         f"truth (allowed {ORACLE_FACTOR:g}x)")
    return report


if __name__ == "__main__":
    main()
