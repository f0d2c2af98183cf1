"""Probe: how much less accurate than the float32 oracle each float32 memory implementation is, over many seeds.

For every float32 case of ``tests/test_memory_scan.py`` (net, chunk size, impl) and seeds 0..N-1 it computes outputs,
final state and the gradients of the tests' outer loss with the implementation and with the token-by-token oracle in
float32, and the oracle in float64 on the same inputs (the truth), and records per case the largest
``max|impl - truth| / max(max|oracle - truth|, eps32 * max|truth|)`` over leaves and seeds. ``tests/memory_cases.py``
sets ``ORACLE_FACTOR`` from the largest of these (with a margin); ``docs/architecture.md`` ("The test suite") records
the run.

    python -m experiments.probe_float32_error --seeds 40 --out bench_results/float32_error.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from memory_cases import as_float64, make_inputs, oracle_error_ratio, outer_loss  # noqa: E402

from titans_jax.memory import linear_memory, memory_scan, memory_scan_reference, mlp_memory  # noqa: E402

CASES = [("linear", 3, "dual"), ("linear", 16, "dual"), ("mlp2", 3, "dual"), ("mlp2", 16, "dual"),
         ("linear", 3, "associative"), ("mlp2", 3, "associative"), ("mlp2", 16, "dual_autodiff"), ("mlp2", 4, "dual")]
NETS = {"linear": linear_memory(8), "mlp2": mlp_memory(8, 2, 2)}


def _programs(net, chunk, impl):
    fast = functools.partial(memory_scan, chunk_size=chunk, impl=impl)
    ref = functools.partial(memory_scan_reference, chunk_size=chunk)

    def both(fn):
        out = jax.jit(lambda p, *a: fn(net, p, *a))
        grad = jax.jit(jax.grad(lambda *a: outer_loss(fn, net, *a), tuple(range(7))))
        return lambda p, a: (out(p, *a), grad(p, *a))

    return both(fast), both(ref)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--out", default="bench_results/float32_error.json")
    args = ap.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    results = {}
    t0 = time.time()
    for net_name, chunk, impl in CASES:
        net = NETS[net_name]
        fast, ref = _programs(net, chunk, impl)
        worst = {"outputs/state": 0.0, "gradients": 0.0}
        for seed in range(args.seeds):
            params = net.init(jax.random.key(1 + seed))
            inputs = make_inputs(37, 8, seed=seed)
            if (net_name, chunk) == ("mlp2", 4):  # the alpha = 1 gate edge (every token wipes the memory)
                inputs = inputs[:5] + (jnp.ones_like(inputs[5]),)
            (out, g), (out_r, g_r) = fast(params, inputs), ref(params, inputs)
            with jax.enable_x64(True):
                out_t, g_t = ref(*as_float64((params, inputs)))
            worst["outputs/state"] = max(worst["outputs/state"], oracle_error_ratio(out, out_r, out_t))
            worst["gradients"] = max(worst["gradients"], oracle_error_ratio(g, g_r, g_t))
        name = f"{net_name} chunk={chunk} impl={impl}" + (" alpha=1" if (net_name, chunk) == ("mlp2", 4) else "")
        results[name] = worst
        print(f"{name}: largest ratio outputs/state {worst['outputs/state']:.2f}, gradients {worst['gradients']:.2f}",
              flush=True)
    report = {"seeds": args.seeds, "cases": results,
              "largest": max(v for r in results.values() for v in r.values()),
              "cpu": _cpu(), "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), "seconds": time.time() - t0}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"largest ratio over all cases: {report['largest']:.2f} ({report['cpu']})")


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
