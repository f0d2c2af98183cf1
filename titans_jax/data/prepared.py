"""The prepared-data format: a corpus tokenized once into a directory (`prepare`; its command line is
`python -m titans_jax.data.prepare`), and its token streams read back by random access (`TokenStream`).

The input is streamed once (`corpus.iter_pieces`: never more than one piece or one .jsonl line in memory), tokenized,
and written as two packed token streams, "train" and "validation". DIR is a tensorflow-datasets dataset (ArrayRecord
file format): `tfds.builder_from_directory(DIR).as_data_source(split="train")` reads its records, each
{"tokens": a block of token ids}. Layout of DIR (docs/architecture.md, "Data"):

    metadata.json                                 what was prepared: tokenizer, dtype, counts, fingerprint, shards
    dataset_info.json, features.json              the tfds metadata (`tfds.folder_dataset.write_metadata`)
    tokenizer.model | tokenizer.json              a copy of the tokenizer file(s) (none for bytes): DIR is self-contained
    prepared-train.array_record-00000-of-00004    tfds-named ArrayRecord shards of tfds-serialized token blocks
    ...                                           (group_size 1: one record per read)
    prepared-validation.array_record-00000-of-00001

* **Split.** Documents are cut into pieces of `corpus.PIECE_CHARS` characters; a piece goes to "validation" when
  sha256("<document key>#<piece index>") falls in the lowest `validation_fraction` of the hash range. The rule depends
  only on the piece's identity: the same on every machine and run, and adding a document never moves another's
  pieces. If no piece lands in validation and there are at least two, the piece with the smallest hash is held out.
* **End of document.** Each split is its pieces' tokens in corpus order, with the tokenizer's `eod_id` after every
  run of consecutive pieces of one document: after every document, and where a held-out piece left a gap. So every
  stretch of text between two end-of-document ids is contiguous text of one document.
* **Blocks and shards.** A split's stream is cut into records of `block_tokens` tokens, each a tfds example of
  `features(dtype)` ({"tokens": a 1-D tensor of the smallest unsigned type holding the vocabulary, stored as raw
  bytes}) serialized with the features' `serialize_example`. The shards are written here, not by a tfds builder, so
  the input is streamed once: a piece goes to shard floor(offset * N / input bytes) of its split (its offset: the
  input bytes read when it was), so N shards hold about equal shares of the input, follow it in order, and only one
  file per split is open at a time (an ArrayRecord writer holds megabytes of buffers). A shard ends with a shorter
  record; a slot the input skipped is an empty shard (tfds names every shard of 0..N-1). metadata.json lists each
  shard's tokens and records, from which a position finds its record; the tfds split infos hold the same records.
* **Atomic.** Everything is written into a temporary sibling directory, the tfds metadata, then metadata.json last,
  then renamed into place (the tfds metadata records no absolute path):
  a crash leaves no directory that looks prepared.
* **Reruns.** The fingerprint covers the input files (paths, sizes, modification times), the tokenizer's content and
  the options that change the streams. Preparing again into a directory with the same fingerprint and layout does
  nothing; a different one is refused unless `overwrite`.

`TokenStream` reads one split back lazily through tfds's random-access data source
(`tfds.builder_from_directory(DIR).as_data_source`); `titans_jax.data.make_dataset` cuts training windows from it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import socket
import time
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

from titans_jax.data import corpus
from titans_jax.data.tokenizers import PREPARED_METADATA, Tokenizer, get_tokenizer, storage_dtype

FORMAT = "titans_jax.prepared"
FORMAT_VERSION = 2  # 2: a tfds dataset (tfds shard names, tfds-serialized blocks, dataset_info.json)
TFDS_NAME = "prepared"  # the dataset name in the tfds shard names: "prepared-<split>.array_record-<i>-of-<n>"
METADATA = PREPARED_METADATA
SPLITS = ("train", "validation")
VALIDATION_FRACTION = 0.05
BLOCK_TOKENS = 16_384  # per record: a window of up to ~16K tokens reads one or two records (zstd: ~30 us each)
SHARD_INPUT_BYTES = 256 << 20  # default shards: one per 256 MiB of input
_BATCH_CHARS = 1 << 20  # characters per tokenization batch (bounds what is in flight)
_RECORD_OPTIONS = "group_size:1"  # random access reads one record, not a group (zstd-compressed, ArrayRecord's default)


def features(dtype: np.dtype):
    """The tfds features of a prepared directory's records: {"tokens": a block of up to `block_tokens` ids}.

    The shape is (None,) since each shard ends with a shorter block; BYTES encoding stores the ids as raw bytes of
    `dtype` (its size a token, not a varint per id in an int64 list: compact, and decoded by np.frombuffer)."""
    import tensorflow_datasets as tfds

    tensor = tfds.features.Tensor(shape=(None,), dtype=np.dtype(dtype), encoding=tfds.features.Encoding.BYTES)
    return tfds.features.FeaturesDict({"tokens": tensor})


def shard_name(split: str, index: int, num_shards: int) -> str:
    """tfds's default shard name (`{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}`) of shard `index` of a split."""
    return f"{TFDS_NAME}-{split}.array_record-{index:05d}-of-{num_shards:05d}"


class PreparedDataError(ValueError):
    """A prepared directory that cannot be used as asked (changed input or tokenizer, not a prepared directory)."""


def split_of(key: str, index: int, validation_fraction: float) -> str:
    """The split of piece `index` of document `key` (see the module docstring)."""
    return "validation" if piece_hash(key, index) < validation_fraction else "train"


def piece_hash(key: str, index: int) -> float:
    """sha256("<key>#<index>") as a number in [0, 1)."""
    return int.from_bytes(hashlib.sha256(f"{key}#{index}".encode()).digest()[:8], "big") / 2**64


def assign_splits(pieces: Iterable[tuple[str, int]], validation_fraction: float) -> dict[tuple[str, int], str]:
    """{(key, index): split} for a whole corpus's pieces, the tiny-corpus rule included: what `prepare` writes (it
    streams, so it finds that held-out piece by a second pass)."""
    split = {(k, i): split_of(k, i, validation_fraction) for k, i in pieces}
    if validation_fraction > 0 and "validation" not in split.values() and len(split) >= 2:
        split[min(split, key=lambda p: piece_hash(*p))] = "validation"
    return split


# ----------------------------------------------------------------------------------------------- metadata
def is_prepared(path: str) -> bool:
    """Whether `path` is a complete prepared-data directory (metadata.json is written last)."""
    return os.path.isfile(os.path.join(os.fspath(path), METADATA))


def load_metadata(directory: str) -> dict:
    """The metadata of a prepared directory; PreparedDataError if it is not one (or of another format version)."""
    path = os.path.join(os.fspath(directory), METADATA)
    if not os.path.isfile(path):
        raise PreparedDataError(
            f"{directory!r} is not a prepared-data directory (no {METADATA}). Create one with "
            f"`python -m titans_jax.data.prepare --input ... --out {directory}`."
        )
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise PreparedDataError(
            f"{path} is format {meta.get('format')!r} version {meta.get('version')!r}, not {FORMAT!r} version "
            f"{FORMAT_VERSION}: prepare it again with --overwrite."
        )
    return meta


@dataclasses.dataclass(frozen=True)
class Request:
    """What to prepare. `content` (what the token streams depend on) gives the fingerprint; `layout` (how they are cut
    into files) must match too for a rerun to be a no-op.

    Attributes:
      input: a corpus spec (see `titans_jax.data.corpus`).
      tokenizer: "bytes" or a tokenizer file (see `get_tokenizer`).
      fmt: "txt" or "jsonl" for every file, or None: by suffix.
      text_field: the .jsonl field holding the text.
      validation_fraction: the share of pieces held out, in [0, 1).
      shards: train shards (validation gets ceil(shards * validation_fraction), at least 1); None: one per 256 MiB
        of input.
      block_tokens: tokens per record.
    """

    input: str
    tokenizer: str = "bytes"
    fmt: str | None = None
    text_field: str = "text"
    validation_fraction: float = VALIDATION_FRACTION
    shards: int | None = None
    block_tokens: int = BLOCK_TOKENS

    def __post_init__(self):
        if self.fmt is not None and self.fmt not in corpus.FORMATS:
            raise ValueError(f"format {self.fmt!r}: use one of {corpus.FORMATS}.")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction!r}.")
        for name in ("shards", "block_tokens"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}.")


def _content(req: Request, tok: Tokenizer) -> dict:
    return {
        "format_version": FORMAT_VERSION, "input": corpus.fingerprint(req.input, req.text_field, req.fmt),
        "text_field": req.text_field, "fmt": req.fmt, "tokenizer": tok.fingerprint, "eod_id": tok.eod_id,
        "piece_chars": corpus.PIECE_CHARS, "validation_fraction": req.validation_fraction,
    }


def _layout(req: Request, input_bytes: int) -> dict:
    train = req.shards or max(1, math.ceil(input_bytes / SHARD_INPUT_BYTES))
    validation = max(1, math.ceil(train * req.validation_fraction))
    return {"block_tokens": req.block_tokens, "shards": {"train": train, "validation": validation}}


def _fingerprint(content: dict) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- writing
class _SplitWriter:
    """One split's token stream, packed into blocks of `block_tokens` and written to one shard at a time: the shard of
    a piece is its input offset's share of the input (slot floor(offset * N / input bytes)), so shards follow the
    input in order and only one file is open (an ArrayRecord writer holds megabytes of buffers: N open at once
    would make memory grow with N)."""

    def __init__(self, directory: str, split: str, num_shards: int, block_tokens: int, dtype: np.dtype, eod_id: int,
                 total_bytes: int):
        self._directory, self._split, self._num_shards = directory, split, num_shards
        self._total_bytes = max(total_bytes, 1)
        self._writer, self._slot, self._wanted = None, -1, 0
        self.shards: list[dict] = []  # {"file", "records", "tokens"} of every slot once the split has tokens
        self._features = features(dtype)
        self._block = np.empty(block_tokens, dtype)
        self._fill = self.num_tokens = self.num_segments = 0
        self._eod = np.asarray([eod_id], dtype)
        self._open: tuple[int, int] | None = None  # (doc, index) of the last piece, while its run has no EOD yet

    def _append(self, tokens: np.ndarray) -> None:
        self.num_tokens += len(tokens)
        while len(tokens):
            n = min(len(tokens), len(self._block) - self._fill)
            self._block[self._fill : self._fill + n] = tokens[:n]
            self._fill, tokens = self._fill + n, tokens[n:]
            if self._fill == len(self._block):
                self._flush()

    def _flush(self) -> None:
        if not self._fill:
            return
        if self._slot != self._wanted:
            self._open_shard(self._wanted)
        self._writer.write(self._features.serialize_example({"tokens": self._block[: self._fill]}))
        self.shards[-1]["records"] += 1
        self.shards[-1]["tokens"] += self._fill
        self._fill = 0

    def _open_shard(self, slot: int) -> None:
        """Closes the open shard, writes the slots skipped since as empty shards, and opens shard `slot`."""
        from array_record.python import array_record_module

        self._close_writer()
        while self._slot < slot:
            self._slot += 1
            name = shard_name(self._split, self._slot, self._num_shards)
            self._writer = array_record_module.ArrayRecordWriter(os.path.join(self._directory, name), _RECORD_OPTIONS)
            self.shards.append({"file": name, "records": 0, "tokens": 0})
            if self._slot < slot:
                self._close_writer()

    def _close_writer(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _end_segment(self) -> None:
        self._append(self._eod)
        self.num_segments += 1
        self._open = None

    def add(self, piece: corpus.Piece, tokens: np.ndarray) -> None:
        """Appends a piece's tokens, with an end-of-document id before it when it does not continue the last piece
        (a gap left by a held-out piece) and after it when it ends its document."""
        slot = min(self._num_shards - 1, piece.offset * self._num_shards // self._total_bytes)
        if slot != self._wanted:
            self._flush()  # the shard ends with a short block
            self._wanted = slot
        if self._open is not None and self._open != (piece.doc, piece.index - 1):
            self._end_segment()
        self._append(tokens)
        self._open = (piece.doc, piece.index)
        if piece.last:
            self._end_segment()

    def close(self) -> dict:
        try:
            if self._open is not None:
                self._end_segment()
            self._flush()
            if self.shards:  # tfds expects every shard of 0..N-1: the slots after the last are empty ones
                self._open_shard(self._num_shards - 1)
        finally:
            self._close_writer()
        return {"num_tokens": self.num_tokens, "num_segments": self.num_segments, "shards": self.shards}


_worker_tokenizer: Tokenizer | None = None


def _init_worker(tokenizer: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = get_tokenizer(tokenizer)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return _worker_tokenizer.encode_batch(texts)


def _batches(pieces: Iterable[corpus.Piece]) -> Iterator[list[corpus.Piece]]:
    batch, chars = [], 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece.text)
        if chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _tokenized(pieces: Iterable[corpus.Piece], tok: Tokenizer, tokenizer: str,
               workers: int) -> Iterator[tuple[corpus.Piece, np.ndarray]]:
    """(piece, tokens) in corpus order. With workers > 1, batches are tokenized in worker processes, at most
    2 x workers batches in flight, so memory stays bounded however fast the input is read."""
    if workers <= 1:
        for batch in _batches(pieces):
            yield from zip(batch, tok.encode_batch([p.text for p in batch]), strict=True)
        return
    # spawn, not fork: the caller may have started threads (JAX, grain) that a fork would copy mid-lock.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                                initargs=(tokenizer,)) as pool:
        pending: deque = deque()
        for batch in _batches(pieces):
            pending.append((batch, pool.submit(_encode_in_worker, [p.text for p in batch])))
            if len(pending) >= 2 * workers:
                done, future = pending.popleft()
                yield from zip(done, future.result(), strict=True)
        while pending:
            done, future = pending.popleft()
            yield from zip(done, future.result(), strict=True)


def _write_streams(req: Request, tok: Tokenizer, layout: dict, directory: str, workers: int, progress: bool,
                   total_bytes: int, held_out: tuple[str, int] | None, name: str) -> dict:
    """Writes both splits into `directory`; returns their metadata plus the piece with the smallest hash."""
    from tqdm.auto import tqdm

    dtype = storage_dtype(tok.vocab_size)
    writers = {s: _SplitWriter(directory, s, layout["shards"][s], req.block_tokens, dtype, tok.eod_id, total_bytes)
               for s in SPLITS}
    pieces = docs = 0
    smallest = (2.0, None)
    bar = tqdm(desc=f"prepare {name}", unit="tok", unit_scale=True, disable=not progress, mininterval=1.0,
               dynamic_ncols=True)
    try:
        stream = corpus.iter_pieces(req.input, req.text_field, req.fmt)
        for piece, tokens in _tokenized(stream, tok, req.tokenizer, workers):
            h = piece_hash(piece.key, piece.index)
            smallest = min(smallest, (h, (piece.key, piece.index)))
            split = "validation" if (h < req.validation_fraction or (piece.key, piece.index) == held_out) else "train"
            writers[split].add(piece, tokens)
            pieces, docs = pieces + 1, docs + piece.last
            bar.update(len(tokens) + piece.last)
            if progress and pieces % 256 == 0:
                bar.set_postfix_str(f"input {min(1.0, piece.offset / max(total_bytes, 1)):.0%}", refresh=False)
        bar.set_postfix_str("input 100%", refresh=True)
    finally:
        splits = {s: w.close() for s, w in writers.items()}
        bar.close()
    return {"splits": splits, "num_pieces": pieces, "num_documents": docs, "smallest": smallest[1]}


def _partial_dir(out: str) -> str:
    parent, name = os.path.split(os.path.abspath(out))
    return os.path.join(parent, f".{name}.partial-{socket.gethostname()}-{os.getpid()}")


def _remove_stale_partials(out: str) -> None:
    """Removes what crashed runs on this host left (their process is gone); another host's are left alone."""
    parent, name = os.path.split(os.path.abspath(out))
    prefix = f".{name}.partial-{socket.gethostname()}-"
    for entry in os.listdir(parent) if os.path.isdir(parent) else []:
        if entry.startswith(prefix):
            pid = entry[len(prefix):]
            alive = pid.isdigit() and os.path.exists(f"/proc/{pid}") and int(pid) != os.getpid()
            if not alive:
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _diff(saved: dict, now: dict) -> dict:
    return {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}


def prepare(input: str, out: str, *, tokenizer: str = "bytes", fmt: str | None = None, text_field: str = "text",
            validation_fraction: float = VALIDATION_FRACTION, shards: int | None = None, workers: int = 1,
            block_tokens: int = BLOCK_TOKENS, overwrite: bool = False, progress: bool = True) -> dict:
    """Prepares `input` into the directory `out` (see the module docstring) and returns its metadata.

    A no-op when `out` already holds this input, tokenizer and layout. Arguments: see `Request` (the options) and
    `python -m titans_jax.data.prepare --help` (`workers`: tokenizer processes; `progress`: a tqdm bar in tokens/s).

    Raises:
      PreparedDataError: `out` holds something else (other input, tokenizer or layout, or files that are not a
        prepared directory) and `overwrite` is false.
      FileNotFoundError / ValueError: a missing, empty or malformed corpus, a tokenizer with no end-of-document id.
    """
    return prepare_if_needed(input, out, tokenizer=tokenizer, fmt=fmt, text_field=text_field,
                             validation_fraction=validation_fraction, shards=shards, workers=workers,
                             block_tokens=block_tokens, overwrite=overwrite, progress=progress)[0]


def prepare_if_needed(input: str, out: str, *, tokenizer: str = "bytes", fmt: str | None = None,
                      text_field: str = "text", validation_fraction: float = VALIDATION_FRACTION,
                      shards: int | None = None, workers: int = 1, block_tokens: int = BLOCK_TOKENS,
                      overwrite: bool = False, progress: bool = True) -> tuple[dict, bool]:
    """`prepare`, returning (metadata, whether anything was written: False when `out` was already prepared)."""
    if "://" in os.fspath(out):
        raise ValueError(f"--out {out!r}: prepare writes to a local or mounted filesystem (e.g. gcsfuse), not a URL.")
    req = Request(input=input, tokenizer=tokenizer, fmt=fmt, text_field=text_field,
                  validation_fraction=validation_fraction, shards=shards, block_tokens=block_tokens)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}.")
    tok = get_tokenizer(tokenizer)
    content = _content(req, tok)  # resolves the input files and the end-of-document id: fails before any write
    total_bytes = corpus.input_bytes(input)
    layout = _layout(req, total_bytes)
    fingerprint = _fingerprint(content)
    if is_prepared(out):
        meta = load_metadata(out)
        same = meta["fingerprint"] == fingerprint and meta["layout"] == layout
        if same:
            return meta, False
        if not overwrite:
            raise PreparedDataError(
                f"{out} was prepared from other input, tokenizer or options: {{field: (saved, now)}} = "
                f"{_diff({**meta['content'], **meta['layout']}, {**content, **layout})}. Pass --overwrite "
                "(overwrite=True) to replace it, or choose another --out."
            )
    elif os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise PreparedDataError(f"{out} exists and is not a prepared-data directory: pass --overwrite or another --out.")

    _remove_stale_partials(out)
    tmp = _partial_dir(out)
    try:
        meta = _write(req, tok, layout, content, fingerprint, tmp, out, workers, progress, total_bytes)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # (a killed process leaves it: the next run removes it)
        raise
    return meta, True


def _write(req: Request, tok: Tokenizer, layout: dict, content: dict, fingerprint: str, tmp: str, out: str,
           workers: int, progress: bool, total_bytes: int) -> dict:
    """Writes the prepared directory into `tmp`, metadata.json last; returns the metadata."""
    start = time.perf_counter()
    held_out = None
    while True:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        written = _write_streams(req, tok, layout, tmp, workers, progress, total_bytes, held_out,
                                 os.path.basename(os.path.abspath(out)))
        if not written["num_pieces"]:
            raise ValueError(
                f"Corpus {req.input!r} is empty: its files hold no text (field {req.text_field!r} for .jsonl)."
            )
        no_validation = not written["splits"]["validation"]["num_tokens"]
        if held_out is None and req.validation_fraction > 0 and no_validation and written["num_pieces"] >= 2:
            held_out = written["smallest"]  # a tiny corpus: hold out the smallest-hash piece (a second pass)
            continue
        break
    files = []
    for path in tok.files():
        shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))
        files.append(os.path.basename(path))
    splits = {s: v for s, v in written["splits"].items() if v["num_tokens"]}  # (an empty split wrote no file)
    _write_tfds_metadata(tmp, storage_dtype(tok.vocab_size), splits, req.block_tokens)
    seconds = time.perf_counter() - start
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "fingerprint": fingerprint, "content": content, "layout": layout,
        "input": {"spec": req.input, "format": req.fmt, "text_field": req.text_field, "bytes": total_bytes},
        "tokenizer": {"name": tok.name, "kind": tok.kind, "vocab_size": tok.vocab_size, "eod_id": tok.eod_id,
                      "fingerprint": tok.fingerprint, "file": files[0] if files else None},
        "dtype": storage_dtype(tok.vocab_size).name, "block_tokens": req.block_tokens,
        "num_documents": written["num_documents"], "num_pieces": written["num_pieces"],
        "num_tokens": sum(v["num_tokens"] for v in splits.values()), "held_out_piece": held_out, "splits": splits,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "seconds": round(seconds, 3),
    }
    with open(os.path.join(tmp, METADATA), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    return meta


def _write_tfds_metadata(tmp: str, dtype: np.dtype, splits: dict, block_tokens: int) -> None:
    """Makes `tmp` a tfds dataset: dataset_info.json and features.json for the shards written (their split infos
    are known, so nothing is read back)."""
    import tensorflow_datasets as tfds

    infos = [
        tfds.core.SplitInfo(name=split, shard_lengths=[s["records"] for s in v["shards"]],
                            num_bytes=sum(os.path.getsize(os.path.join(tmp, s["file"])) for s in v["shards"]))
        for split, v in splits.items()
    ]
    # check_data would read an example with tf.data (TensorFlow is not a dependency); TokenStream checks instead.
    tfds.folder_dataset.write_metadata(
        data_dir=tmp, features=features(dtype), split_infos=infos, check_data=False,
        description=(f"A corpus tokenized by titans_jax.data.prepare: each split is a packed token stream (an "
                     f"end-of-document id after every document), cut into records of {block_tokens} tokens. "
                     f"See {METADATA} for the tokenizer, counts and fingerprint."),
    )


def _replace(tmp: str, out: str) -> None:
    """Moves the finished `tmp` to `out`; an old `out` is moved aside first and removed after."""
    old = None
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        old = f"{tmp}.old"
        os.rename(out, old)
    os.rename(tmp, out)  # (an empty directory at `out` is replaced by the rename itself)
    if old is not None:
        shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)


# ----------------------------------------------------------------------------------------------- reading
class TokenStream:
    """One split of a prepared directory as a random-access token stream: `len(stream)` tokens, `stream[a:b]` an
    array (of the storage dtype) decoded from the one or few records it spans. Nothing is read until asked.

    The records come from tfds's random-access data source (`tfds.builder_from_directory(directory)
    .as_data_source(split)`, which opens a shard only when it is first read); record r of the split is
    {"tokens": block r}. Position p lies in shard s (the last whose first token is <= p), record
    (p - start_s) // block_tokens of it, from metadata.json's per-shard counts."""

    def __init__(self, directory: str, split: str, meta: dict | None = None):
        import tensorflow_datasets as tfds

        meta = meta or load_metadata(directory)
        if split not in meta["splits"]:
            raise PreparedDataError(f"{directory} has no {split!r} split.")
        info = meta["splits"][split]
        shards = info["shards"]
        self.split, self.num_tokens = split, int(info["num_tokens"])
        self._block = int(meta["block_tokens"])
        self._dtype = np.dtype(meta["dtype"])
        self._starts = np.cumsum([0] + [s["tokens"] for s in shards])  # first token of each shard, then the end
        self._first_record = np.cumsum([0] + [s["records"] for s in shards])
        self._source = tfds.builder_from_directory(os.fspath(directory)).as_data_source(split=split)
        if len(self._source) != self._first_record[-1]:
            raise PreparedDataError(
                f"{directory}: the tfds split {split!r} has {len(self._source)} records, {METADATA} says "
                f"{self._first_record[-1]}: the directory was changed after it was prepared; prepare it again."
            )

    def __len__(self) -> int:
        return self.num_tokens

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(self.num_tokens)
        if step != 1:
            raise ValueError("TokenStream supports contiguous slices only.")
        parts = []
        while start < stop:
            shard = int(np.searchsorted(self._starts, start, side="right")) - 1  # (an empty shard is skipped)
            block, offset = divmod(start - int(self._starts[shard]), self._block)
            record = self._source[int(self._first_record[shard]) + block]["tokens"]
            take = record[offset : offset + stop - start]
            parts.append(take)
            start += len(take)
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros(0, self._dtype)
