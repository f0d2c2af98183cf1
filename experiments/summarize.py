"""Markdown tables of the committed experiment results (experiments/results/*.json), for experiments/RESULTS.md:
`python -m experiments.summarize [niah babilong ablations memory_depth]`. The tables in RESULTS.md are this output."""

from __future__ import annotations

import sys

from experiments import miniature

EXPERIMENTS = ("niah", "babilong", "ablations", "memory_depth")
KIND = {"niah-passkey": "PK", "niah-number": "N", "niah-word": "W"}


def _pct(x: float) -> str:
    return f"{100 * x:.0f}"


def niah(doc: dict) -> str:
    lengths = doc["lengths"]
    head = "| variant | " + " | ".join(f"{KIND[t]} {L}" for t in KIND for L in lengths) + " |"
    lines = [head, "|---" * (1 + len(KIND) * len(lengths)) + "|"]
    for variant, run in doc["runs"].items():
        cells = []
        for task in KIND:
            rows = run["tasks"][task]["results"]
            for L in lengths:
                at = [r for r in rows if r["length"] == L]
                cells.append(_pct(sum(r["accuracy"] * r["samples"] for r in at) / sum(r["samples"] for r in at)))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def babilong(doc: dict) -> str:
    lengths = doc["lengths"]
    tasks = sorted({t for r in doc["runs"].values() for t in r["tasks"]})
    head = "| variant | task | " + " | ".join(str(L) for L in lengths) + " |"
    lines = [head, "|---" * (2 + len(lengths)) + "|"]
    for variant, run in doc["runs"].items():
        for task in tasks:
            acc = {r["length"]: r["accuracy"] for r in run["tasks"][task]["results"]}
            lines.append(f"| {variant} | {task.removeprefix('babilong-')} | "
                         + " | ".join(_pct(acc[L]) for L in lengths) + " |")
    return "\n".join(lines)


def ablations(doc: dict) -> str:
    lines = ["| row | val bits/byte (ours) | long-context acc % (ours) | LM ppl (paper) | long-context acc % (paper) |",
             "|---|---|---|---|---|"]
    for row, r in doc["rows"].items():
        bpb = "n/a" if r["val_bpb"] is None else f"{r['val_bpb']:.3f}"
        acc = "not run" if r["long_context_accuracy"] is None else _pct(r["long_context_accuracy"])
        lines.append(f"| {row} | {bpb} | {acc} | {r['paper']['lm_ppl']} | "
                     f"{r['paper']['long_context_acc']} |")
    return "\n".join(lines)


def memory_depth(doc: dict) -> str:
    longest = max(doc["lengths"])
    buckets = None
    lines = []
    for depth, d in doc["depths"].items():
        rows = [r for r in d["ppl"]["results"] if r["length"] == longest]
        if buckets is None:
            buckets = [r["position_bucket"] for r in rows]
            lines += ["| L_M | val bits/byte (training) | " + " | ".join(f"{a}-{b}" for a, b in buckets) + " |",
                      "|---" * (2 + len(buckets)) + "|"]
        val = d["train"].get("val_bpb")
        val = "n/a" if val is None else f"{val:.3f}"
        lines.append(f"| {depth} | {val} | " + " | ".join(f"{r['bits_per_byte']:.3f}" for r in rows) + " |")
    lengths = sorted({r["seq_len"] for r in doc["throughput"]})
    lines += ["", "| L_M | " + " | ".join(f"tokens/s at {L}" for L in lengths) + " |", "|---" * (1 + len(lengths)) + "|"]
    for depth in sorted({r["depth"] for r in doc["throughput"]}):
        tps = {r["seq_len"]: r["tokens_per_s"] for r in doc["throughput"] if r["depth"] == depth}
        lines.append(f"| {depth} | " + " | ".join(f"{tps[L]:,.0f}" for L in lengths) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(EXPERIMENTS)
    unknown = sorted(set(names) - set(EXPERIMENTS))
    if unknown:
        raise SystemExit(f"unknown experiments {unknown}; choose from {EXPERIMENTS}")
    for name in names:
        doc = miniature.load(miniature.out_paths(name, False)[0])
        if doc is None:
            print(f"## {name}: no results yet\n")
            continue
        print(f"## {name}\n\n{globals()[name](doc)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
