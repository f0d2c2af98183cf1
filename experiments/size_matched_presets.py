"""Derive the widths of the size-matched presets (``<size>-<variant>-matched``) and print them as the table that
``titans_jax/configs.py`` holds (``MATCHED_DIMS``).

The rule (docs/architecture.md, "Presets"): keep the paper's preset (depth, heads, every other field) and choose the
model width ``dim``, a multiple of 64, whose parameter count (``count_params``, untied embeddings) is closest to the
nominal size (170M, 340M, 760M, 1.3B). The paper's shapes stay under their plain names.

    python -m experiments.size_matched_presets
"""

from __future__ import annotations

from titans_jax.configs import MATCHED_VARIANTS, NOMINAL_SIZES, PAPER_SIZES, get_config
from titans_jax.model import count_params

STEP = 64


def closest_dim(name: str, nominal: float) -> tuple[int, int]:
    """``(dim, count)`` of the multiple of STEP whose count is closest to ``nominal`` (counts grow with dim)."""
    lo, hi = 4, 64  # dim from 256 to 4096
    while lo < hi:  # the smallest multiple whose count reaches the nominal size
        mid = (lo + hi) // 2
        if count_params(get_config(name, dim=mid * STEP)) < nominal:
            lo = mid + 1
        else:
            hi = mid
    cands = [m * STEP for m in (lo - 1, lo)]
    counts = [count_params(get_config(name, dim=d)) for d in cands]
    best = min(range(2), key=lambda i: abs(counts[i] - nominal))
    return cands[best], counts[best]


def main() -> dict:
    table = {}
    for size in PAPER_SIZES:
        for variant in MATCHED_VARIANTS:
            dim, count = closest_dim(f"{size}-{variant}", NOMINAL_SIZES[size])
            table[(size, variant)] = dim
            print(f"{size}-{variant}-matched: dim {dim}, {count / 1e6:.1f}M ({count / NOMINAL_SIZES[size] - 1:+.1%})",
                  flush=True)
    print("MATCHED_DIMS = {")
    for (size, variant), dim in table.items():
        print(f'    ("{size}", "{variant}"): {dim},')
    print("}")
    return table


if __name__ == "__main__":
    main()
