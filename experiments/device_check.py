"""One script for an accelerator (issue: performance, GPU and TPU readiness); finishes within ~8 minutes on one GPU.

1. The fast memory paths (dual with its hand-written backward, dual with autodiff, associative) against the
   token-by-token reference on the device, float32 and bfloat16: outputs, final states and gradients.
2. Train-step tokens/s and model FLOPs utilisation of the 340m preset of every variant at T = 4096, with the largest
   batch (from 1, 2, 4, 8, ...) whose compiled step fits in device memory; peak memory of that step.

    python -m experiments.device_check            # on the accelerator; writes bench_results/device_check.json
    python -m experiments.device_check --smoke    # tiny shapes on CPU, so the script cannot rot (run by the tests)
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp

from experiments.bench_common import machine, save
from experiments.bench_model import compile_train_step, model_flops, train_inputs
from titans_jax import get_config
from titans_jax.configs import VARIANTS
from titans_jax.memory import linear_memory, memory_scan, memory_scan_reference, mlp_memory
from titans_jax.sharding import make_mesh

# Dense bf16 peak FLOP/s for MFU, by device kind (vendor figures, no sparsity).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12}


def check_memory_paths(t_len, dim, dtypes=("float32", "bfloat16"), nets=None):
    """Max |fast - reference| over outputs, states and gradients, relative to the reference's scale."""
    results = []
    for net in nets or (linear_memory(dim), mlp_memory(dim, 2, 4)):
        params = net.init(jax.random.key(0))
        ks = jax.random.split(jax.random.key(1), 6)
        unit = lambda k: (lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True))(jax.random.normal(k, (t_len, dim)))
        base = (unit(ks[0]), unit(ks[1]), jax.random.normal(ks[2], (t_len, dim)),
                0.1 * jax.random.uniform(ks[3], (t_len,)), 0.9 * jax.random.uniform(ks[4], (t_len,)),
                0.05 * jax.random.uniform(ks[5], (t_len,)))
        for dtype in dtypes:
            args = tuple(a.astype(dtype) for a in base)
            def loss(fn, p, *a, net=net):
                y, st = fn(net, p, *a, chunk_size=16)
                return jnp.sum(jnp.sin(y.astype(jnp.float32))) + sum(jnp.sum(w) for w in st.weights)

            with jax.default_matmul_precision("highest"):
                ref = jax.jit(lambda p, *a, net=net: memory_scan_reference(net, p, *a, chunk_size=16))(params, *args)
                g_r = jax.jit(jax.grad(functools.partial(loss, memory_scan_reference), argnums=(0, 1, 2, 3)))(
                    params, *args)
            for method in ("dual", "dual_autodiff", "associative"):
                fast = functools.partial(memory_scan, impl=method)
                with jax.default_matmul_precision("highest"):
                    out = jax.jit(lambda p, *a, fast=fast, net=net: fast(net, p, *a, chunk_size=16))(params, *args)
                    g = jax.jit(jax.grad(functools.partial(loss, fast), argnums=(0, 1, 2, 3)))(params, *args)

                def rel(a, b):
                    a, b = (jnp.concatenate([x.astype(jnp.float32).ravel() for x in jax.tree.leaves(t)]) for t in (a, b))
                    return float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))

                results.append({"net": f"depth{net.depth}", "dtype": dtype, "method": method,
                                "rel_err_outputs_states": rel(out, ref), "rel_err_grads": rel(g, g_r)})
                print(json.dumps(results[-1]))
    return results


def largest_batch(cfg, t_len, max_batch, budget_bytes, mesh):
    """The largest power-of-two batch whose compiled train step (the trainer's own) fits ``budget_bytes``."""
    best, b = None, 1
    while b <= max_batch:
        try:
            compiled, _, need = compile_train_step(cfg, b, t_len, mesh)
        except Exception as e:  # noqa: BLE001 (an allocation failure at compile time means "does not fit")
            print(f"  batch {b}: does not compile ({type(e).__name__})")
            break
        if need > budget_bytes:
            break
        best = (b, compiled, need)
        b *= 2
    return best


def train_throughput(preset_size, t_len, max_batch, variants, smoke):
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    budget = 0.9 * stats.get("bytes_limit", 16 * 2**30)
    peak = next((v for k, v in PEAK_BF16.items() if k.lower() in dev.device_kind.lower()), None)
    mesh = make_mesh(None, devices=[dev])
    rows = []
    for v in variants:
        cfg = get_config(f"{preset_size}-{v}")
        if smoke:
            cfg = get_config(f"tiny-{v}", dim=32, num_layers=1, num_heads=2, segment_len=16, window=16)
        cfg = cfg.replace(max_seq_len=max(cfg.max_seq_len, t_len + 64), remat=not smoke)
        t0 = time.perf_counter()
        found = largest_batch(cfg, t_len, max_batch, budget, mesh)
        if found is None:
            rows.append({"variant": v, "batch": 0, "note": "batch 1 does not fit"})
            continue
        b, compiled, need = found
        state, batch = train_inputs(cfg, b, t_len, mesh)
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        reps = 1 if smoke else 3
        t1 = time.perf_counter()
        for _ in range(reps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        dt = (time.perf_counter() - t1) / reps
        flops = b * model_flops(cfg, t_len)
        rows.append({"variant": v, "preset": f"{preset_size}-{v}" if not smoke else f"tiny-{v}", "T": t_len,
                     "batch": b, "tokens_per_s": round(b * t_len / dt), "step_s": round(dt, 3),
                     "mfu": None if peak is None else round(flops / dt / peak, 3),
                     "peak_mem_GiB": round(need / 2**30, 3), "peak_mem_bytes": int(need), "loss": float(metrics["loss"]),
                     "setup_s": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, runs on CPU in seconds")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--out", default="device_check")
    args = ap.parse_args(argv)
    report = {"machine": machine(), "smoke": args.smoke}
    t_len = 64 if args.smoke else 4096
    if args.smoke:
        report["memory_paths"] = check_memory_paths(40, 16, dtypes=("float32",), nets=(mlp_memory(16, 2, 2),))
    else:
        report["memory_paths"] = check_memory_paths(1024, 64)
    worst = max(max(r["rel_err_outputs_states"], r["rel_err_grads"]) for r in report["memory_paths"]
                if r["dtype"] == "float32")
    report["memory_paths_ok"] = worst < 1e-3
    report["train"] = train_throughput("340m", t_len, 1 if args.smoke else args.max_batch, args.variants, args.smoke)
    print(f"wrote {save(args.out, report)}")
    if not report["memory_paths_ok"]:
        raise SystemExit(f"fast memory paths disagree with the reference in float32: worst relative error {worst:.2e}")
    return report


if __name__ == "__main__":
    main()
