"""Tokenizers that work offline: raw UTF-8 bytes, or a local SentencePiece model.

Every tokenizer has `vocab_size`, `encode(str) -> list[int]`, `decode(ids) -> str` and `encode_concat(texts)`,
the fast path the pipeline uses to turn a whole corpus split into one token stream.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np

BYTES = "bytes"


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256). Needs no vocabulary file, so it can never fail to load."""

    vocab_size = 256
    name = BYTES

    def encode(self, text: str) -> list[int]:
        """Returns the UTF-8 bytes of `text` as ints in [0, 256)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Inverse of `encode`; invalid UTF-8 (a model's sample cut mid-character) becomes U+FFFD, not an error."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def encode_concat(self, texts: Sequence[str | bytes]) -> np.ndarray:
        """Concatenated tokens of many texts as a uint8 array (bytes are already tokens: no Python loop per byte)."""
        raw = b"".join(t if isinstance(t, bytes) else t.encode("utf-8") for t in texts)
        return np.frombuffer(raw, dtype=np.uint8).copy()


class SentencePieceTokenizer:
    """A trained SentencePiece model (`.model` file). `sentencepiece` is imported only when one is used."""

    def __init__(self, model_file: str | os.PathLike):
        model_file = os.fspath(model_file)
        if not os.path.isfile(model_file):
            raise FileNotFoundError(
                f"SentencePiece model file {model_file!r} does not exist. Pass the path of a trained `.model` file "
                "(train one with `sentencepiece.SentencePieceTrainer.train(...)`) or use tokenizer='bytes'."
            )
        try:
            import sentencepiece as spm
        except ImportError as e:  # an optional dependency: say how to get it
            raise ImportError(
                "tokenizer=*.model needs the `sentencepiece` package: `pip install sentencepiece` "
                "(or `pip install -e '.[sentencepiece]'`), or use tokenizer='bytes'."
            ) from e
        self.model_file = model_file
        self.name = model_file
        self._sp = spm.SentencePieceProcessor(model_file=model_file)
        self.vocab_size = int(self._sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""
        return list(self._sp.encode(text, out_type=int))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids."""
        return self._sp.decode([int(i) for i in ids])

    def encode_concat(self, texts: Sequence[str | bytes]) -> np.ndarray:
        """Concatenated tokens of many texts (one batched call: sentencepiece encodes a list in C++ threads)."""
        strs = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in texts]
        pieces = self._sp.encode(strs, out_type=int) if strs else []
        dtype = np.uint16 if self.vocab_size <= 2**16 else np.int32  # halves the memory of a big stream
        return np.concatenate([np.asarray(p, dtype) for p in pieces]) if pieces else np.zeros(0, dtype)


Tokenizer = ByteTokenizer | SentencePieceTokenizer


def get_tokenizer(name_or_path: str) -> Tokenizer:
    """'bytes' -> `ByteTokenizer`; a path ending in '.model' -> `SentencePieceTokenizer`."""
    if name_or_path in (BYTES, "byte"):
        return ByteTokenizer()
    if str(name_or_path).endswith(".model"):
        return SentencePieceTokenizer(name_or_path)
    raise ValueError(
        f"Unknown tokenizer {name_or_path!r}: use 'bytes' or the path of a SentencePiece '.model' file."
    )
