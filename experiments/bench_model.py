"""Model-scale benchmarks (issue: performance): NeuralMemory layer throughput, train-step throughput and peak memory of
every variant against T, decoding tokens/s, compile time against depth. Prints tables, writes bench_results/model.json
and a plot bench_results/model_throughput.png.

Bench config: dim 256, 4 layers, 4 heads, byte vocabulary, batch 1 (paper structure: chunk 16, segment 512, window
2048, 128 persistent tokens, 2-layer memory with expansion 4). Peak memory is the compiled step's memory analysis
(arguments + outputs + temporaries). Decoding is timed from a state at position L (caches and memory at their L-token
sizes): the per-token cost depends on the state's sizes, not its values.

The train-step and compile rows time the step ``python -m titans_jax.train`` runs, built by the trainer's own functions:
``make_optimizer`` (gradient clipping at 1.0, AdamW with the weight-decay mask, warm-up and cosine schedule),
``make_train_step`` (loss, gradient, update and the in-graph finite check that drops a non-finite update) and
``compile_train_step`` (ahead of time, train state donated, shardings fixed by the mesh).

Layer and train-step rows run on a ``(data=1, fsdp=1, tensor=N)`` mesh of ``--devices`` devices (default 2: on
this CPU that is one XLA device per core; the memory recurrence is split over heads with ``shard_map``, the rest follows
the logical sharding rules). The train step and the layer get the mesh explicitly (``model(tokens, mesh=mesh)``,
``layer(x, mesh=mesh)``). Decoding and compile time use one device.

    python -m experiments.bench_model [--lengths 1024 4096 16384] [--devices 2]
"""

from __future__ import annotations

if __name__ == "__main__":  # one CPU device per core for the mesh rows; only when run as a script
    import jax

    jax.config.update("jax_num_cpu_devices", 2)

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from experiments.bench_common import machine, matmul_peak, memory_flops, print_table, save, time_fn  # noqa: E402
from titans_jax import NeuralMemory, TitansLM, distributed, get_config  # noqa: E402
from titans_jax.configs import VARIANTS, MemoryConfig, ModelConfig  # noqa: E402
from titans_jax.sharding import make_mesh  # noqa: E402
from titans_jax.train import step as step_lib  # noqa: E402
from titans_jax.train.config import TINY_PEAK_LR, TrainConfig  # noqa: E402
from titans_jax.train.optim import make_optimizer  # noqa: E402
from titans_jax.train.state import abstract_train_state, create_train_state, titans_model_fn  # noqa: E402

BENCH = dict(vocab_size=256, dim=256, num_layers=4, num_heads=4, chunk_size=16, segment_len=512, window=2048,
             num_persistent=128, memory_depth=2, memory_expansion=4)


def bench_config(variant, t_len, **kw):
    return get_config(f"tiny-{variant}", **{**BENCH, "max_seq_len": max(t_len, 1024) + 64, **kw})


def model_flops(cfg, t_len) -> float:
    """Training FLOPs per sequence (forward + backward = 3x forward): dense matmuls, attention scores, memory core."""
    d, h = cfg.dim, cfg.mlp_hidden
    per_tok = 3 * d * h * 2  # SwiGLU
    attn_span = {"transformer": t_len / 2, "swa": min(cfg.window, t_len), "mag": min(cfg.window, t_len),
                 "mal": min(cfg.window, t_len), "mac": cfg.segment_len, "lmm": 0}[cfg.variant]
    if cfg.variant != "lmm":
        per_tok += 4 * d * d * 2 + 2 * 2 * d * (attn_span + cfg.num_persistent)  # projections, QK^T and PV
    fwd = per_tok * t_len
    if cfg.has_memory:
        mem_proj = 5 * d * d * 2 + 3 * d * cfg.num_heads * 2
        from titans_jax.memory import mlp_memory

        net = mlp_memory(cfg.head_dim, cfg.memory_depth, cfg.memory_expansion)
        fwd += mem_proj * t_len + cfg.num_heads * memory_flops(net, t_len, cfg.chunk_size)
    return 3 * (cfg.num_layers * fwd + 2 * t_len * d * cfg.vocab_size)


def train_config(batch_size: int, t_len: int) -> TrainConfig:
    """The trainer's defaults (clipping, AdamW and its schedule) at this batch shape, at the tiny presets' peak LR."""
    return TrainConfig(batch_size=batch_size, seq_len=t_len, lr=TINY_PEAK_LR)


def compile_train_step(cfg: ModelConfig, batch_size: int, t_len: int, mesh: Mesh):
    """``(compiled, compile_s, peak_bytes)``: the train step ``titans_jax.train`` runs, compiled for a global batch of
    ``batch_size`` sequences of ``t_len`` tokens on ``mesh``, built by the trainer's own functions (``make_optimizer``,
    ``step.compile_run_train_step``). ``compiled(state, batch) -> (state, metrics)`` donates the state.
    ``peak_bytes``: arguments + outputs + temporaries - aliased, per device (None when the backend does not say)."""
    tc = train_config(batch_size, t_len)
    tx, schedule = make_optimizer(tc)
    graphdef, abstract = abstract_train_state(titans_model_fn(cfg, 0), tx, mesh)
    t0 = time.perf_counter()
    compiled = step_lib.compile_run_train_step(graphdef, abstract, schedule, tc, mesh)
    compile_s = time.perf_counter() - t0
    mem = step_lib.memory_report(compiled)
    peak_bytes = None if mem is None else mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
    return compiled, compile_s, peak_bytes


def train_inputs(cfg: ModelConfig, batch_size: int, t_len: int, mesh: Mesh) -> tuple[Any, dict[str, jax.Array]]:
    """``(state, batch)`` for :func:`compile_train_step`: a fresh train state (model and optimizer) in the mesh's
    layout and a global batch of random tokens (the step's cost does not depend on their values)."""
    tx, _ = make_optimizer(train_config(batch_size, t_len))
    _, state, _ = create_train_state(titans_model_fn(cfg, 0), tx, mesh)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch_size, t_len + 1), dtype=np.int32)
    return state, distributed.global_batch_from_local({"tokens": tokens}, mesh)


def mesh_of(devices: int) -> Mesh:
    """A ``tensor``-only mesh of the first ``devices`` devices (data = fsdp = 1)."""
    if devices > jax.device_count():
        raise ValueError(f"--devices {devices}: only {jax.device_count()} devices are visible")
    return make_mesh({"tensor": devices}, jax.devices()[:devices])


def layer_mesh(devices: int) -> Mesh | None:
    """The mesh the layer rows pass to the layer (``layer(x, mesh=...)``): None for 1 device (no shard_map)."""
    return None if devices <= 1 else mesh_of(devices)


def bench_layer(lengths, peak, rows, devices):
    layer = NeuralMemory(256, MemoryConfig(heads=4, chunk_size=16, depth=2, expansion=4), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    mesh = layer_mesh(devices)
    fwd = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, mesh=mesh))
    grad = jax.jit(jax.grad(lambda p, x: jnp.mean(nnx.merge(graphdef, p)(x, mesh=mesh) ** 2), argnums=(0, 1)))
    from titans_jax.memory import mlp_memory

    net = mlp_memory(64, 2, 4)
    for t_len in lengths:
        x = jax.random.normal(jax.random.key(0), (2, t_len, 256))
        flops = 2 * (4 * memory_flops(net, t_len, 16) + t_len * (5 * 256 * 256 * 2 + 3 * 256 * 4 * 2))
        for mode, f, fl in (("fwd", fwd, flops), ("fwd+bwd", grad, 3 * flops)):
            first, dt = time_fn(f, params, x, repeats=5)
            rows.append({"bench": "layer", "T": t_len, "mode": mode, "tokens_per_s": round(2 * t_len / dt),
                         "gflops": round(fl / dt / 1e9, 1), "frac_of_peak": round(fl / dt / peak, 3),
                         "first_call_s": round(first, 1)})
            print_table(rows[-1:], list(rows[-1]))


def _host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def bench_train(variants, lengths, peak, rows, devices):
    for t_len in lengths:
        for v in variants:
            cfg = bench_config(v, t_len, remat=t_len > 4096)
            mesh = mesh_of(devices)
            compiled, compile_s, peak_bytes = compile_train_step(cfg, 1, t_len, mesh)
            # peak_bytes is per device, and an undercount: a 17.2 GiB transformer step (T = 16384) was OOM-killed at
            # 24 GiB RSS. Record such a step instead of letting the OOM killer end the whole run.
            if peak_bytes is not None and devices * peak_bytes > 0.6 * _host_memory_bytes():
                rows.append({"bench": "train", "variant": v, "T": t_len, "tokens_per_s": None,
                             "peak_mem_MiB": round(peak_bytes / 2**20, 1), "compile_s": round(compile_s, 1),
                             "remat": cfg.remat, "note": "does not fit in host memory; not run"})
                print_table(rows[-1:], list(rows[-1]))
                continue
            state, batch = train_inputs(cfg, 1, t_len, mesh)
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            dt = float("inf")  # fastest of the timed steps, as in bench_common.time_fn
            for _ in range(3 if t_len <= 4096 else 2):
                t0 = time.perf_counter()
                state, metrics = compiled(state, batch)
                jax.block_until_ready(metrics)
                dt = min(dt, time.perf_counter() - t0)
            del state  # the next row's state replaces it; free the buffers first
            fl = model_flops(cfg, t_len)
            rows.append({"bench": "train", "variant": v, "T": t_len, "tokens_per_s": round(t_len / dt),
                         "gflops": round(fl / dt / 1e9, 1), "frac_of_peak": round(fl / dt / peak, 3),
                         "peak_mem_MiB": None if peak_bytes is None else round(peak_bytes / 2**20, 1),
                         "compile_s": round(compile_s, 1), "remat": cfg.remat})
            print_table(rows[-1:], list(rows[-1]))


def _state_at(state, pos):
    """A decoding state whose caches and counters say ``pos`` tokens were seen (values are irrelevant to the cost)."""
    def fix(path, x):
        name = str(path[-1])
        if "pos" in name and x.dtype == jnp.int32 and "slot" not in name:
            return jnp.full_like(x, pos)
        if "slot_pos" in name:
            n = x.shape[-1]
            return jnp.broadcast_to(pos - n + jnp.arange(n, dtype=jnp.int32), x.shape) % (pos + 1)
        return x
    return jax.tree_util.tree_map_with_path(fix, state)


def bench_decode(variants, contexts, rows, steps=32):
    for ctx in contexts:
        for v in variants:
            cfg = bench_config(v, ctx + 3 * steps + 1)
            model = TitansLM(cfg, rngs=nnx.Rngs(0))
            state = _state_at(model.init_state(1), ctx)
            tok = jnp.zeros((1, 1), jnp.int32)
            _, state = model.step(tok, state)
            jax.block_until_ready(state)
            dt = float("inf")
            for _ in range(3):  # best of 3 rounds: one round of a few ms per token is at the mercy of the OS
                t0 = time.perf_counter()
                for _ in range(steps):
                    logits, state = model.step(tok, state)
                jax.block_until_ready(logits)
                dt = min(dt, (time.perf_counter() - t0) / steps)
            rows.append({"bench": "decode", "variant": v, "context": ctx, "tokens_per_s": round(1 / dt, 1)})
            print_table(rows[-1:], list(rows[-1]))


def bench_compile(rows, variants=("mac", "lmm", "transformer")):
    for v in variants:
        for layers in (2, 8):
            cfg = bench_config(v, 1024, num_layers=layers)
            _, compile_s, _ = compile_train_step(cfg, 1, 1024, mesh_of(1))
            rows.append({"bench": "compile", "variant": v, "layers": layers, "compile_s": round(compile_s, 2)})
            print_table(rows[-1:], list(rows[-1]))


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for v in VARIANTS:
        r = [x for x in rows if x["bench"] == "train" and x["variant"] == v and x["tokens_per_s"] is not None]
        if r:
            axes[0].plot([x["T"] for x in r], [x["tokens_per_s"] for x in r], marker="o", label=v)
            axes[1].plot([x["T"] for x in r], [x["peak_mem_MiB"] for x in r], marker="o", label=v)
    for ax, title in zip(axes, ("train-step tokens/s", "peak memory of one step (MiB)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 16384])
    ap.add_argument("--skip", nargs="*", default=[], choices=["layer", "train", "decode", "compile"])
    ap.add_argument("--devices", type=int, default=min(2, jax.device_count()),
                    help="devices on the tensor axis for the layer and train rows (default 2, or 1 if only one)")
    args = ap.parse_args(argv)
    peak = matmul_peak()
    rows = []
    if "layer" not in args.skip:
        bench_layer(args.lengths, peak, rows, args.devices)
    if "train" not in args.skip:
        bench_train(args.variants, args.lengths, peak, rows, args.devices)
    if "decode" not in args.skip:
        bench_decode(args.variants, args.contexts, rows)
    if "compile" not in args.skip:
        bench_compile(rows)
    for kind in ("layer", "train", "decode", "compile"):
        sel = [r for r in rows if r["bench"] == kind]
        if sel:
            print(f"\n== {kind}")
            print_table(sel, [c for c in sel[0] if c != "bench"])
    print(f"\nmatmul peak: {peak / 1e9:.1f} GFLOP/s")
    out = save("model", {"machine": machine(), "matmul_peak_flops": peak, "bench_config": BENCH,
                         "mesh_devices": args.devices, "rows": rows})
    png = plot(rows, out.replace(".json", "_throughput.png"))
    print(f"wrote {out}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
