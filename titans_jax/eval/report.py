"""What an evaluation shows: a table on screen, the JSON file, and a PNG drawn as the paper draws its results (a length
x depth heatmap for the needle tasks, curves against length for the others)."""

from __future__ import annotations

import json
import os
from collections import defaultdict

from titans_jax.eval.tasks import NEEDLE_TASKS


def table(result: dict) -> str:
    """The result rows as an aligned text table; needle tasks add one accuracy per length over all depths."""
    rows = result["results"]
    if not rows:
        return "(no results)"
    keys = list(rows[0])
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    if result["task"] in NEEDLE_TASKS:  # one more row per length: every depth together
        for length, acc, n in per_length(rows):
            summary = {"length": length, "depth": "all", "accuracy": acc, "samples": n}
            cells.append([_fmt(summary.get(k, "")) for k in keys])
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths, strict=True))
    return "\n".join([line(keys), line(["-" * w for w in widths]), *(line(c) for c in cells)])


def per_length(rows: list[dict]) -> list[tuple[int, float, int]]:
    """(length, accuracy over every depth weighted by samples, samples) of needle rows."""
    acc, n = defaultdict(float), defaultdict(int)
    for r in rows:
        acc[r["length"]] += r["accuracy"] * r["samples"]
        n[r["length"]] += r["samples"]
    return [(length, acc[length] / n[length], n[length]) for length in sorted(n)]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, list):
        return f"[{v[0]}, {v[1]})"
    return str(v)


def write_json(result: dict, path: str) -> None:
    """Writes atomically (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def plot(result: dict, path: str, title: str | None = None) -> str:
    """Draws the result into a PNG at `path` (needs matplotlib); returns the path. Draws on its own `Figure`, so the
    caller's pyplot backend and figures (a notebook's inline ones) are left alone."""
    from matplotlib.figure import Figure

    task, rows = result["task"], result["results"]
    title = title or f"{result.get('name', result['model'].get('variant', ''))} {task}".strip()
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    if task in NEEDLE_TASKS:
        lengths = sorted({r["length"] for r in rows})
        depths = sorted({r["depth"] for r in rows})
        grid = [[next(r["accuracy"] for r in rows if r["length"] == L and r["depth"] == d) for L in lengths]
                for d in depths]
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        for i, row in enumerate(grid):
            for j, a in enumerate(row):
                ax.text(j, i, f"{100 * a:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        fig.colorbar(im, ax=ax, label="accuracy")
    elif task == "ppl":
        for length in sorted({r["length"] for r in rows}):
            pts = [r for r in rows if r["length"] == length]
            ax.plot([sum(r["position_bucket"]) / 2 for r in pts], [r["bits_per_byte"] for r in pts], marker="o",
                    label=f"length {length}")
        ax.set_xlabel("position (tokens, bucket centre)")
        ax.set_ylabel("bits per byte")
        ax.legend()
    elif task == "mqar":
        for length in sorted({r["length"] for r in rows}):
            pts = [r for r in rows if r["length"] == length]
            ax.plot([r["num_pairs"] for r in pts], [r["accuracy"] for r in pts], marker="o", label=f"length {length}")
        ax.set_xlabel("key-value pairs")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.legend()
    else:
        ax.plot([r["length"] for r in rows], [r["accuracy"] for r in rows], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
