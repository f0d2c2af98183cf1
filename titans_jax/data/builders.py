"""The cache of prepared corpora: a raw corpus spec ("shakespeare", a .txt/.jsonl file, directory or glob) is
prepared on first use (`titans_jax.data.prepare`) into a folder of the data directory, then read lazily like any
prepared directory (a tfds dataset: `tfds.builder_from_directory(folder)` reads it too).

Layout: `<data_dir>/titans_prepared/<corpus>-<hash>/`, where <corpus> is "shakespeare" or "local" and the hash covers
the corpus's fingerprint (resolved file paths, sizes and modification times: an edited corpus gets a fresh folder),
the text field and the tokenizer's content. Preparing is serialised by a lock file per folder, so the processes of a
host that start together prepare it once; on a pod whose hosts do not share a disk, prepare once beforehand with
`python -m titans_jax.data.prepare` and pass the directory as `data`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os

from titans_jax.data import corpus, prepared
from titans_jax.data.tokenizers import Tokenizer, get_tokenizer

CACHE = "titans_prepared"


def default_data_dir() -> str:
    """`$TITANS_JAX_DATA_DIR`, else `~/.cache/titans_jax/tfds` (prepared corpora are tfds datasets)."""
    return os.environ.get("TITANS_JAX_DATA_DIR") or os.path.expanduser("~/.cache/titans_jax/tfds")


def cache_dir(data: str, tokenizer: Tokenizer | str = "bytes", *, data_dir: str | None = None,
              text_field: str = "text") -> str:
    """The folder a raw corpus spec is prepared into, for this tokenizer (costs one `stat` per corpus file)."""
    tok = get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
    spec = data if data == corpus.SHAKESPEARE else os.path.abspath(os.path.expanduser(data))
    key = {"format_version": prepared.FORMAT_VERSION, "corpus": corpus.fingerprint(spec, text_field),
           "tokenizer": tok.fingerprint, "piece_chars": corpus.PIECE_CHARS,
           "validation_fraction": prepared.VALIDATION_FRACTION}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = corpus.SHAKESPEARE if data == corpus.SHAKESPEARE else "local"
    return os.path.join(data_dir or default_data_dir(), CACHE, f"{name}-{digest}")


@contextlib.contextmanager
def _lock(path: str):
    """Serialises preparations of one folder by several processes on a host (they would otherwise race)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(f"{path}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_cached(data: str, tokenizer: str = "bytes", *, data_dir: str | None = None, text_field: str = "text",
                   progress: bool = True) -> str:
    """Prepares a raw corpus spec into its cache folder unless done already; returns the folder.

    Raises what `prepared.prepare` raises (a missing, empty or malformed corpus), before anything is written.
    """
    if data_dir and "://" in data_dir:
        raise ValueError(
            f"data_dir {data_dir!r}: corpora are prepared on a local or mounted filesystem. Prepare once with "
            "`python -m titans_jax.data.prepare --out DIR` and pass DIR as the data."
        )
    spec = data if data == corpus.SHAKESPEARE else os.path.abspath(os.path.expanduser(data))  # not cwd-dependent
    if spec == corpus.SHAKESPEARE:
        corpus.shakespeare_files()  # fail early with the install hint
    out = cache_dir(spec, tokenizer, data_dir=data_dir, text_field=text_field)
    with _lock(out):
        with contextlib.suppress(prepared.PreparedDataError):
            prepared.load_metadata(out)
            return out
        # The folder is ours: whatever an older format left there is replaced.
        prepared.prepare(spec, out, tokenizer=tokenizer, text_field=text_field, overwrite=True, progress=progress)
    return out
