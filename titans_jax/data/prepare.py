"""python -m titans_jax.data.prepare: tokenize a corpus once into a prepared-data directory for the trainer.

    python -m titans_jax.data.prepare --input 'data/**/*.jsonl' --tokenizer tokenizer.json --out prepared/ \\
        [--format txt|jsonl] [--text-field text] [--shards N] [--workers N] [--validation-fraction 0.05] [--overwrite]

then `python -m titans_jax.train --data prepared/ --tokenizer prepared/ ...`. The format, and `prepare` (the same as a
function), are in `titans_jax.data.prepared`; nothing in the package imports this module, so `-m` runs it fresh.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence

from titans_jax.data import corpus
from titans_jax.data.prepared import BLOCK_TOKENS, VALIDATION_FRACTION, prepare_if_needed


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m titans_jax.data.prepare",
        description="Tokenize a corpus once into ArrayRecord shards for `python -m titans_jax.train --data DIR`.",
        epilog="Example: python -m titans_jax.data.prepare --input 'fineweb/*.jsonl' --tokenizer tok/tokenizer.json "
               "--out data/fineweb --shards 64 --workers 8 --validation-fraction 0.001",
    )
    p.add_argument("--input", required=True,
                   help="'shakespeare', a .txt/.jsonl file, a directory of them, or a glob (quote it: 'data/*.jsonl')")
    p.add_argument("--out", required=True, help="the prepared directory to create (local or mounted filesystem)")
    p.add_argument("--tokenizer", default="bytes", help="bytes | a SentencePiece .model | a Hugging Face tokenizer.json")
    p.add_argument("--format", choices=corpus.FORMATS, default=None,
                   help="read every file as txt (one document a file) or jsonl (one document a line); "
                        "default: .jsonl files as jsonl, others as txt")
    p.add_argument("--text-field", default="text", help="the .jsonl field holding the text (default: text)")
    p.add_argument("--validation-fraction", type=float, default=VALIDATION_FRACTION,
                   help=f"share of pieces held out for validation (default {VALIDATION_FRACTION})")
    p.add_argument("--shards", type=int, default=None, help="train shards (default: one per 256 MiB of input)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--block-tokens", type=int, default=BLOCK_TOKENS, help=f"tokens per record (default {BLOCK_TOKENS})")
    p.add_argument("--overwrite", action="store_true", help="replace a directory prepared from other input")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns 0 (prepared, or already prepared) or 2 (refused or bad input)."""
    args = _parser().parse_args(argv)
    try:
        meta, wrote = prepare_if_needed(
            args.input, args.out, tokenizer=args.tokenizer, fmt=args.format, text_field=args.text_field,
            validation_fraction=args.validation_fraction, shards=args.shards, workers=args.workers,
            block_tokens=args.block_tokens, overwrite=args.overwrite, progress=not args.quiet)
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    splits = ", ".join(f"{s} {v['num_tokens']:,}" for s, v in meta["splits"].items())
    if not wrote:
        print(f"{args.out}: already prepared from this input and tokenizer (fingerprint {meta['fingerprint']}); "
              f"nothing to do. Tokens: {splits}.")
    else:
        print(f"{args.out}: {meta['num_documents']:,} documents, {meta['num_tokens']:,} tokens ({splits}), "
              f"{meta['tokenizer']['kind']} vocab {meta['tokenizer']['vocab_size']}, {meta['dtype']}; "
              f"{meta['seconds']:.1f} s ({meta['num_tokens'] / max(meta['seconds'], 1e-9):,.0f} tokens/s).")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
