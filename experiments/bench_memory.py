"""Benchmark of the functional memory core (issue: memory core): ``memory_scan`` forward and forward+backward tokens/s.

Configuration: batch 2 x 4 heads x head dim 64, 2-layer memory (expansion 4), chunk 16, T in {1024, 4096}; beside the
jitted token-by-token reference and the machine's measured large-matmul FLOP/s. "dual" differentiates with the
hand-written backward pass (``impl="dual"``, the default; ``remat=n``: it keeps every n-th chunk-start state, 4 by
default), "dual autodiff" with JAX's autodiff of the same scan (``impl="dual_autodiff"``, every chunk's residuals
kept). "1 dev" runs on one XLA CPU device; "2 dev" splits (batch, heads) over two CPU devices with ``shard_map``, which
is how both cores get used. FLOPs are counted analytically (``memory_flops``), forward+backward as 3x forward.

    python -m experiments.bench_memory [--lengths 1024 4096] [--skip-reference]
"""

from __future__ import annotations

import jax

if __name__ == "__main__":  # two CPU devices for the shard_map rows; only when run as a script (imports stay inert)
    jax.config.update("jax_num_cpu_devices", 2)

import argparse  # noqa: E402
import functools  # noqa: E402

import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from experiments.bench_common import machine, matmul_peak, memory_flops, print_table, save, time_fn  # noqa: E402
from titans_jax.memory import memory_scan, memory_scan_reference, mlp_memory  # noqa: E402
from titans_jax.memory.sharded import vary_over  # noqa: E402

B, H, D, CHUNK = 2, 4, 64, 16


def build(fn, sharded: bool):
    def local(params, q, k, v, g):
        if sharded:  # the replicated W_0 seeds a carry beside per-shard data (memory/sharded.py does the same)
            params = vary_over(params, ("x",))
        one = lambda q, k, v, a, b, c: fn(params, q, k, v, a, b, c)[0]
        return jax.vmap(jax.vmap(one))(q, k, v, g[0], g[1], g[2])

    if sharded:
        mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
        local = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("x"), P("x"), P("x"), P(None, "x")), out_specs=P("x"))
    loss = lambda *a: jnp.mean(local(*a) ** 2)
    return jax.jit(local), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def inputs(t_len):
    ks = jax.random.split(jax.random.key(1), 4)
    q, k = (jax.random.normal(kk, (B, H, t_len, D)) for kk in ks[:2])
    q, k = (x / jnp.linalg.norm(x, axis=-1, keepdims=True) for x in (q, k))
    v = jax.random.normal(ks[2], (B, H, t_len, D))
    u = jax.random.uniform(ks[3], (3, B, H, t_len))
    gates = jnp.stack([0.1 * u[0], 0.9 * u[1], 0.02 * u[2]])
    return q, k, v, gates


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    net = mlp_memory(D, 2, 4)
    params = net.init(jax.random.key(0))
    peak = matmul_peak()
    rows = []
    dual = functools.partial(memory_scan, net, chunk_size=CHUNK)
    autodiff = functools.partial(dual, impl="dual_autodiff")  # the same forward under JAX's backward, for comparison
    variants = [
        ("dual remat=1, 1 dev", functools.partial(dual, remat_every=1), False),
        ("dual autodiff, 1 dev", autodiff, False),
        ("dual remat=4, 1 dev", dual, False),  # the default
        ("associative, 1 dev", functools.partial(dual, impl="associative"), False),
        ("dual remat=1, 2 dev", functools.partial(dual, remat_every=1), True),
        ("dual autodiff, 2 dev", autodiff, True),
        ("dual remat=4, 2 dev", dual, True),
    ]
    if jax.device_count() < 2:
        variants = [v for v in variants if not v[2]]
    if not args.skip_reference:
        variants.append(("reference, 1 dev", functools.partial(memory_scan_reference, net, chunk_size=CHUNK), False))
    for t_len in args.lengths:
        data = inputs(t_len)
        fwd_flops = memory_flops(net, t_len, CHUNK) * B * H
        for name, fn, sharded in variants:
            if name.startswith("associative") and t_len > 1024:
                continue  # ~10x slower than dual at T = 1024 already: measured there only
            fwd, fwd_bwd = build(fn, sharded)
            reps = 1 if name.startswith("reference") else args.repeats
            for mode, f, flops in (("fwd", fwd, fwd_flops), ("fwd+bwd", fwd_bwd, 3 * fwd_flops)):
                compile_s, dt = time_fn(f, params, *data, repeats=reps)
                rows.append({
                    "impl": name, "T": t_len, "mode": mode, "tokens_per_s": round(B * t_len / dt),
                    "seconds": round(dt, 4), "first_call_s": round(compile_s, 1),
                    "gflops": round(flops / dt / 1e9, 1), "frac_of_peak": round(flops / dt / peak, 3),
                })
                print_table(rows[-1:], list(rows[-1]))
    print(f"\nmatmul peak (2048^2 float32, 1 device): {peak / 1e9:.1f} GFLOP/s")
    print_table(rows, ["impl", "T", "mode", "tokens_per_s", "gflops", "frac_of_peak", "first_call_s"])
    path = save("memory", {"machine": machine(), "matmul_peak_flops": peak, "config": {
        "batch": B, "heads": H, "head_dim": D, "chunk": CHUNK, "memory_depth": 2, "expansion": 4}, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
