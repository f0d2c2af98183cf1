"""Probe: forward+backward tokens/s of ``memory_scan`` for several ``remat_every`` settings on one CPU device.

The batch 2 x 4 heads x head dim 64 slice set of ``bench_memory`` (2-layer memory, expansion 4, chunk 16), random gates
(theta up to 0.1, eta near 0.9, alpha near 0.002), best of 3 calls. docs/benchmarks.md quotes its numbers.

    python -m experiments.probe_remat --length 4096 --remat 0 1 2 4
    python -m experiments.probe_remat --length 16384 --remat 1 32
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp

from titans_jax.memory import memory_scan, mlp_memory

SLICES, BATCH, D = 8, 2, 64  # batch 2 x 4 heads


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--remat", type=int, nargs="+", default=[0, 1], help="remat_every values (0: no remat)")
    args = ap.parse_args(argv)
    net = mlp_memory(D, 2, 4)
    params = net.init(jax.random.key(0))
    ks = jax.random.split(jax.random.key(1), 6)
    t = args.length
    q, k, v = (jax.random.normal(kk, (SLICES, t, D)) / 8 for kk in ks[:3])
    lr = jax.nn.sigmoid(jax.random.normal(ks[3], (SLICES, t))) * 0.1
    mom = jax.nn.sigmoid(jax.random.normal(ks[4], (SLICES, t)) + 2.0)
    dec = jax.nn.sigmoid(jax.random.normal(ks[5], (SLICES, t)) - 6.0)
    for n in args.remat:
        f = functools.partial(memory_scan, net, chunk_size=16, remat_every=n or None)

        def loss(p, q, k, v, f=f):
            return jnp.mean(jax.vmap(lambda *a: f(p, *a)[0])(q, k, v, lr, mom, dec) ** 2)

        g = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        jax.block_until_ready(g(params, q, k, v))
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            jax.block_until_ready(g(params, q, k, v))
            best = min(best, time.perf_counter() - t0)
        print(f"remat_every={n or None}: fwd+bwd {BATCH * t / best:,.0f} tok/s (T={t})", flush=True)


if __name__ == "__main__":
    main()
