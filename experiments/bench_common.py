"""Shared benchmark helpers: timing, the machine's matmul peak, and where results go."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time

import jax
import jax.numpy as jnp

RESULTS_DIR = os.environ.get("TITANS_BENCH_DIR", "bench_results")


def time_fn(fn, *args, repeats: int = 3) -> tuple[float, float]:
    """(compile + first call seconds, fastest of ``repeats`` later calls) of an already-jitted function.

    The fastest call, not the mean: this VM loses time to CPU steal from its neighbours at random, which only ever
    makes a call slower, so the minimum is the stable estimate of what the code costs."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return first, best


def matmul_peak(n: int = 2048, dtype=jnp.float32) -> float:
    """Measured FLOP/s of one large jitted matmul on the default device: the ceiling the other numbers are read against."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    _, dt = time_fn(jax.jit(jnp.matmul), a, b, repeats=5)
    return 2 * n**3 / dt


def machine() -> dict:
    dev = jax.devices()[0]
    return {
        "date": datetime.date.today().isoformat(),
        "platform": dev.platform,
        "device": dev.device_kind,
        "num_devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
    }


def save(name: str, payload: dict) -> str:
    os.makedirs(RESULTS_DIR, exist_ok=True)
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths, strict=True)))


def memory_flops(net, t_len: int, chunk: int) -> float:
    """Forward FLOPs of the dual form for one (batch, head) slice: key path forward (2) and errors (1, layers >= 2), the
    query read against [W | S] (4), the end-of-chunk rank-b updates of W and S (4), each in units of 2*b*din*dout per
    layer, plus the b x b attention-like terms of the read."""
    total = 0.0
    for l, (din, dout) in enumerate(net.layer_shapes):
        per = 2 * chunk * din * dout
        total += per * (2 + (1 if l > 0 else 0) + 4 + 4) + 2 * chunk * chunk * (din + dout)
    return total * t_len / chunk


def package_versions(names=("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy")) -> dict:
    """Installed versions of the packages a result depends on (None where one is missing): an accelerator machine
    runs its own image's versions, not this repository's pins."""
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out
