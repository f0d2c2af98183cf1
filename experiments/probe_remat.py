"""Probe: forward+backward tokens/s for several ``remat_every`` settings, timed in alternating rounds in one process.

Two subjects:
* default: ``memory_scan`` over the batch 2 x 4 heads x head dim 64 slice set of ``bench_memory`` (2-layer memory,
  expansion 4, chunk 16), random gates (theta up to 0.1, eta near 0.9, alpha near 0.002);
* ``--layer``: the ``NeuralMemory`` layer of the issue's layer benchmark (dim 256, 4 heads, batch 2), under the
  ``tensor`` mesh of ``--devices`` CPU devices that ``bench_model`` uses.

Every setting is compiled first; then each round calls every setting once, and the fastest of ``--rounds`` calls is
reported. Alternating rounds put the settings side by side in the same machine state (this VM's speed drifts by
20-30% over minutes). docs/benchmarks.md quotes its numbers.

    python -m experiments.probe_remat --length 4096 --remat 0 1 2 4
    python -m experiments.probe_remat --layer --devices 2 --length 4096 --remat 0 1 2 4
"""

from __future__ import annotations

if __name__ == "__main__":  # two CPU devices for --devices 2; only when run as a script
    import jax

    jax.config.update("jax_num_cpu_devices", 2)

import argparse  # noqa: E402
import functools  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from titans_jax import NeuralMemory  # noqa: E402
from titans_jax.configs import MemoryConfig  # noqa: E402
from titans_jax.memory import memory_scan, mlp_memory  # noqa: E402

SLICES, BATCH, D = 8, 2, 64  # batch 2 x 4 heads


def core_case(t, n):
    net = mlp_memory(D, 2, 4)
    params = net.init(jax.random.key(0))
    ks = jax.random.split(jax.random.key(1), 6)
    q, k, v = (jax.random.normal(kk, (SLICES, t, D)) / 8 for kk in ks[:3])
    lr = jax.nn.sigmoid(jax.random.normal(ks[3], (SLICES, t))) * 0.1
    mom = jax.nn.sigmoid(jax.random.normal(ks[4], (SLICES, t)) + 2.0)
    dec = jax.nn.sigmoid(jax.random.normal(ks[5], (SLICES, t)) - 6.0)
    f = functools.partial(memory_scan, net, chunk_size=16, remat_every=n)

    def loss(p, q, k, v):
        return jnp.mean(jax.vmap(lambda *a: f(p, *a)[0])(q, k, v, lr, mom, dec) ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))), (params, q, k, v)


def layer_case(t, n, mesh):
    layer = NeuralMemory(256, MemoryConfig(heads=4, chunk_size=16, depth=2, expansion=4, remat_every=n),
                         rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    x = jax.random.normal(jax.random.key(0), (BATCH, t, 256))
    grad = jax.jit(jax.grad(lambda p, x_: jnp.mean(nnx.merge(graphdef, p)(x_, mesh=mesh) ** 2), argnums=(0, 1)))
    return grad, (params, x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--remat", type=int, nargs="+", default=[1, 4], help="remat_every values (1: keep every state)")
    ap.add_argument("--layer", action="store_true", help="time the NeuralMemory layer instead of the bare core")
    ap.add_argument("--devices", type=int, default=1, help="CPU devices of the layer's mesh (--layer only)")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    from experiments.bench_model import layer_mesh

    if args.layer:
        mesh = layer_mesh(args.devices)
        cases = {n: layer_case(args.length, n, mesh) for n in args.remat}
    else:
        cases = {n: core_case(args.length, n) for n in args.remat}
    best = dict.fromkeys(cases, float("inf"))
    for fn, fn_args in cases.values():
        jax.block_until_ready(fn(*fn_args))
    for _ in range(args.rounds):
        for n, (fn, fn_args) in cases.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*fn_args))
            best[n] = min(best[n], time.perf_counter() - t0)
    subject = f"layer, {args.devices} dev" if args.layer else "core, 1 dev"
    for n, dt in best.items():
        print(f"{subject}, remat_every={n}: fwd+bwd {BATCH * args.length / dt:,.0f} tok/s (T={args.length})")
    return {n: BATCH * args.length / dt for n, dt in best.items()}


if __name__ == "__main__":
    main()
