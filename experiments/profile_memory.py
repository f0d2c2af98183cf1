"""Where the memory core's forward+backward time goes: an XLA CPU profile, summed per kind of op.

Runs the ``bench_memory`` configuration (batch 2 x 4 heads x head dim 64, 2-layer memory, chunk 16) under
``jax.profiler``, reads the trace back with ``jax.profiler.ProfileData`` and sums the time of every executed HLO op by
kind: matmuls, other fusions, copies and slices; each split by whether it touches a W-sized array (a fast-weight
matrix or its cotangent, [.., 64, 256] or [.., 256, 64]) or only [b, d]-sized activations. Op times are summed over
the executor's threads, so their total exceeds the wall-clock time when ops run concurrently.

    python -m experiments.profile_memory [--length 1024] [--impl dual|dual_autodiff] [--top 15]
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import re
import tempfile

import jax
from jax.profiler import ProfileData

from experiments.bench_common import save
from experiments.bench_memory import CHUNK, build, inputs
from titans_jax.memory import memory_scan, mlp_memory

# Executor bookkeeping and host-side spans: not HLO ops.
_NOT_OPS = re.compile(r"^(\$|ThreadpoolListener|ThunkExecutor|PjitFunction|end: |while|call|conditional)")


def op_table(hlo_text: str) -> dict[str, tuple[str, bool]]:
    """HLO instruction name -> (kind, touches a W-sized array) from a compiled module's text."""
    fused = {m.group(1): m.group(2) for m in re.finditer(r"^%(\S+) .*?\{\n(.*?)\n\}", hlo_text, re.M | re.S)}
    table = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$", hlo_text, re.M):
        name, rest = m.group(1), m.group(2)
        called = re.search(r"calls=%([\w.\-]+)", rest)
        body = fused.get(called.group(1), "") if called else ""
        if " dot(" in rest or " dot(" in body:
            kind = "matmul"
        elif re.search(r"copy|slice|concatenate|transpose|broadcast", name):
            kind = "copy/slice"
        elif " reduce(" in body or " reduce(" in rest:
            kind = "reduction"
        else:
            kind = "elementwise"
        table[name] = (kind, bool(re.search(r"64,256\]|256,64\]", rest.split(" ", 1)[0])))
    return table


def profile(fn, args, hlo_text: str, calls: int = 3):
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        for _ in range(calls):
            jax.block_until_ready(fn(*args))
        jax.profiler.stop_trace()
        data = ProfileData.from_file(glob.glob(f"{tmp}/plugins/profile/*/*.xplane.pb")[0])
    table = op_table(hlo_text)
    by_kind, by_op = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                if _NOT_OPS.match(ev.name) or ev.name not in table:
                    continue
                kind, w_sized = table[ev.name]
                by_kind[f"{kind}, {'W-sized' if w_sized else '[b, d]-sized'}"] += ev.duration_ns / calls
                by_op[ev.name] += ev.duration_ns / calls
    return by_kind, by_op


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--impl", choices=["dual", "dual_autodiff"], default="dual")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)

    net = mlp_memory(64, 2, 4)
    params = net.init(jax.random.key(0))
    _, fwd_bwd = build(functools.partial(memory_scan, net, chunk_size=CHUNK, impl=args.impl), False)
    call_args = (params, *inputs(args.length))
    hlo = fwd_bwd.lower(*call_args).compile().as_text()
    by_kind, by_op = profile(fwd_bwd, call_args, hlo)
    total = sum(by_kind.values())
    print(f"forward+backward, T = {args.length}, impl={args.impl}, 1 device: {total / 1e6:.1f} ms of op time per call")
    for kind, ns in by_kind.most_common():
        print(f"  {kind:32s} {ns / 1e6:8.1f} ms  {100 * ns / total:5.1f}%")
    print(f"top {args.top} ops:")
    for name, ns in by_op.most_common(args.top):
        print(f"  {name:48s} {ns / 1e6:8.2f} ms")
    path = save(f"profile_memory_{args.impl}", {"length": args.length, "impl": args.impl, "op_ms_per_call": {
        k: round(v / 1e6, 2) for k, v in by_kind.most_common()}})
    print(f"wrote {path}")
    return by_kind


if __name__ == "__main__":
    main()
