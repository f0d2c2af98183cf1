"""Tokenizers that work offline: raw UTF-8 bytes, a local SentencePiece model, or a Hugging Face `tokenizer.json`.

Every tokenizer has `name`, `kind`, `vocab_size`, `eod_id` (the end-of-document id appended after every document of
a prepared corpus; docs/architecture.md, "Data"), `fingerprint` (its content, not its path), `encode(str) ->
list[int]`, `decode(ids) -> str`, `encode_batch(texts)` (an array per text: the fast path of data preparation),
`encode_concat(texts)` (one array for many texts), `token_byte_lengths()` (UTF-8 bytes of each id, for bits per
byte) and `files()` (the files that define it, copied into a prepared directory so that it is self-contained).

End of document, per tokenizer:
  * bytes: id 255. The byte 0xFF never occurs in UTF-8, so no text encodes to it, and the vocabulary stays 256: a
    vocab-256 model reads prepared byte data unchanged. Decoding it gives U+FFFD, as any invalid byte does.
  * SentencePiece: the model's `eos_id()` (`</s>`, id 2 unless the model was trained otherwise); a model trained
    with `eos_id=-1` is refused.
  * tokenizer.json: the `eos_token` of a `tokenizer_config.json` beside it if there is one, else the first of
    `EOD_TOKEN_NAMES` among its tokens; refused when neither names one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

BYTES = "bytes"
BYTE_EOD_ID = 0xFF  # never a byte of UTF-8 text (docs/architecture.md, "Data")
# Special tokens tried, in this order, as the end of document of a tokenizer.json without a tokenizer_config.json.
EOD_TOKEN_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|end|>")
PREPARED_METADATA = "metadata.json"  # (the prepared-data directory's metadata file; see `prepare`)


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def storage_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type holding every id below `vocab_size` (uint8, uint16 or uint32)."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"vocab_size={vocab_size} does not fit in uint32.")


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256). Needs no vocabulary file, so it can never fail to load."""

    vocab_size = 256
    name = BYTES
    kind = BYTES
    eod_id = BYTE_EOD_ID
    fingerprint = BYTES

    def encode(self, text: str) -> list[int]:
        """Returns the UTF-8 bytes of `text` as ints in [0, 256) (never `eod_id`)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Inverse of `encode`; invalid UTF-8 (a model's sample cut mid-character, the end-of-document byte) becomes
        U+FFFD, not an error."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def encode_concat(self, texts: Sequence[str | bytes]) -> np.ndarray:
        """Concatenated tokens of many texts as a uint8 array (bytes are already tokens: no Python loop per byte)."""
        raw = b"".join(t if isinstance(t, bytes) else t.encode("utf-8") for t in texts)
        return np.frombuffer(raw, dtype=np.uint8).copy()

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """The tokens of each text, as uint8 arrays."""
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def token_byte_lengths(self) -> None:
        """None: one byte per token (bits per byte = loss / ln 2)."""
        return None

    def files(self) -> list[str]:
        return []


class SentencePieceTokenizer:
    """A trained SentencePiece model (`.model` file). `sentencepiece` is imported only when one is used."""

    kind = "sentencepiece"

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
        self.fingerprint = f"sentencepiece:{_file_sha256(model_file)[:16]}"

    @property
    def eod_id(self) -> int:
        """The model's end-of-sequence id; ValueError when it has none (trained with eos_id=-1)."""
        eos = int(self._sp.eos_id())
        if eos < 0:
            raise ValueError(
                f"SentencePiece model {self.model_file!r} has no end-of-sequence piece (trained with eos_id=-1), "
                "so documents cannot be separated. Retrain it with an eos piece (the default eos_id=2)."
            )
        return eos

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

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """The tokens of each text (one batched call), as arrays of the smallest type holding the vocabulary."""
        dtype = storage_dtype(self.vocab_size)
        return [np.asarray(p, dtype) for p in self._sp.encode(list(texts), out_type=int)] if texts else []

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes of each piece: the word-boundary mark counts as a space, byte-fallback pieces one byte,
        control and unknown pieces zero."""
        sp, out = self._sp, np.zeros(self.vocab_size, np.float32)
        for i in range(self.vocab_size):
            if sp.is_byte(i):
                out[i] = 1
            elif not (sp.is_control(i) or sp.is_unknown(i)):
                out[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        return out

    def files(self) -> list[str]:
        return [self.model_file]


class HuggingFaceTokenizer:
    """A Hugging Face `tokenizers` tokenizer saved as `tokenizer.json` (a `tokenizer_config.json` beside it, if any,
    names its end-of-sequence token). `tokenizers` is imported only when one is used."""

    kind = "huggingface"

    def __init__(self, path: str | os.PathLike, eod_token: str | None = None):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Tokenizer file {path!r} does not exist. Pass the path of a Hugging Face `tokenizer.json` "
                "(save one with `tokenizer.save(path)`), a SentencePiece `.model`, or tokenizer='bytes'."
            )
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError(
                "tokenizer=*.json needs the `tokenizers` package: `pip install tokenizers` (or `make install`)."
            ) from e
        self.path = self.name = path
        self._tok = tokenizers.Tokenizer.from_file(path)
        # Ids need not be dense: the embedding must hold the largest one.
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
        self._config = os.path.join(os.path.dirname(path), "tokenizer_config.json")
        self._eod_token = eod_token if eod_token is not None else self._configured_eos()
        self.fingerprint = f"huggingface:{_file_sha256(path)[:16]}:{self._eod_token or ''}"

    def _configured_eos(self) -> str | None:
        if not os.path.isfile(self._config):
            return None
        with open(self._config, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token")
        return eos.get("content") if isinstance(eos, dict) else eos  # transformers writes either form

    @functools.cached_property
    def eod_id(self) -> int:
        """The id of the end-of-sequence token (see the module docstring); ValueError when none is found."""
        names = (self._eod_token,) if self._eod_token is not None else EOD_TOKEN_NAMES
        for name in names:
            i = self._tok.token_to_id(name)
            if i is not None:
                return int(i)
        where = (f"its eos_token {self._eod_token!r} (from {self._config}) is not in the vocabulary"
                 if self._eod_token is not None else f"it has none of the tokens {list(EOD_TOKEN_NAMES)}")
        raise ValueError(
            f"Tokenizer {self.path!r} names no end-of-document token: {where}. Add one as a special token when "
            'training it, or put a tokenizer_config.json with {"eos_token": "<the token>"} beside it.'
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids (special tokens dropped)."""
        return self._tok.decode([int(i) for i in ids])

    def encode_concat(self, texts: Sequence[str | bytes]) -> np.ndarray:
        """Concatenated tokens of many texts (`encode_batch` runs in Rust threads)."""
        strs = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in texts]
        return np.concatenate(self.encode_batch(strs)) if strs else np.zeros(0, storage_dtype(self.vocab_size))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """The tokens of each text (`encode_batch` runs in Rust threads), as arrays of the smallest type holding
        the vocabulary."""
        dtype = storage_dtype(self.vocab_size)
        return [np.asarray(e.ids, dtype) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes of each id: with a byte-level decoder a token's characters are its bytes; otherwise the
        length of the decoded token. Special tokens count zero."""
        out = np.zeros(self.vocab_size, np.float32)
        byte_level = type(self._tok.decoder).__name__ == "ByteLevel"
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        for tok, i in self._tok.get_vocab(with_added_tokens=True).items():
            if tok not in special:
                out[i] = len(tok) if byte_level else len(self._tok.decode([i]).encode("utf-8"))
        return out

    def files(self) -> list[str]:
        return [self.path] + ([self._config] if os.path.isfile(self._config) else [])


Tokenizer = ByteTokenizer | SentencePieceTokenizer | HuggingFaceTokenizer


def _prepared_tokenizer(directory: str) -> Tokenizer:
    """The tokenizer a prepared-data directory was written with (its copy inside the directory)."""
    with open(os.path.join(directory, PREPARED_METADATA), encoding="utf-8") as f:
        meta = json.load(f)["tokenizer"]
    if meta["kind"] == BYTES:
        return ByteTokenizer()
    path = os.path.join(directory, meta["file"])
    tok = SentencePieceTokenizer(path) if meta["kind"] == "sentencepiece" else HuggingFaceTokenizer(path)
    if tok.fingerprint != meta["fingerprint"]:
        raise ValueError(f"The tokenizer file {path} does not match {directory}/{PREPARED_METADATA}: prepare again.")
    return tok


def get_tokenizer(name_or_path: str) -> Tokenizer:
    """'bytes' -> `ByteTokenizer`; a path ending in '.model' -> `SentencePieceTokenizer`; a path ending in '.json'
    -> `HuggingFaceTokenizer`; a prepared-data directory -> the tokenizer it was prepared with."""
    name = os.fspath(name_or_path)
    if name in (BYTES, "byte"):
        return ByteTokenizer()
    if name.endswith(".model"):
        return SentencePieceTokenizer(name)
    if name.endswith(".json"):
        return HuggingFaceTokenizer(name)
    if os.path.isfile(os.path.join(name, PREPARED_METADATA)):
        return _prepared_tokenizer(name)
    raise ValueError(
        f"Unknown tokenizer {name!r}: use 'bytes', the path of a SentencePiece '.model' file, of a Hugging Face "
        "'tokenizer.json', or of a prepared-data directory."
    )


def check_vocab(tokenizer: Tokenizer, vocab_size: int) -> None:
    """Raises ValueError unless the model's `vocab_size` holds every id of `tokenizer`.

    A larger model vocabulary is allowed (unused rows, as when it is padded to a multiple of 128 for the hardware);
    a smaller one would index past the embedding.
    """
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} tokens but model.vocab_size={vocab_size}: token "
            f"ids would fall outside the embedding. Set --set model.vocab_size={tokenizer.vocab_size} (or larger), or "
            "use a tokenizer with fewer tokens."
        )
