"""A tfds builder that turns a text corpus into `array_record` files readable without TensorFlow.

Examples are `{"text": piece}` where each document is cut into pieces of `PIECE_CHARS` characters.
Split: a piece goes to "validation" when sha256("<document key>#<piece index>") falls in the lowest
`VALIDATION_FRACTION` of the hash range, else to "train". The rule depends only on the piece's identity, so it is
the same on every machine and run, and adding a document never moves another document's pieces. If no piece lands
in validation (a tiny corpus) and there are at least two, the piece with the smallest hash is held out instead.
Pieces keep corpus order (`disable_shuffling`), so consecutive pieces of a document stay adjacent in the stream.

Each corpus gets its own builder config, so its own directory: `shakespeare`, or `local-<hash>` where the hash
covers the resolved file paths, sizes and mtimes (an edited corpus gets a fresh build). Layout:
`<data_dir>/titans_text_corpus/<config>/<version>/`. The registered config "shakespeare" also makes
`tfds.data_source("titans_text_corpus/shakespeare", data_dir=...)` and `tfds.testing.mock_data` work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds
from etils import epath

from titans_jax.data import corpus

PIECE_CHARS = 4096
VALIDATION_FRACTION = 0.05
NAME = "titans_text_corpus"


def default_data_dir() -> str:
    """`$TITANS_JAX_DATA_DIR`, else `~/.cache/titans_jax/tfds`."""
    return os.environ.get("TITANS_JAX_DATA_DIR") or os.path.expanduser("~/.cache/titans_jax/tfds")


@dataclasses.dataclass(eq=False)
class TextCorpusConfig(tfds.core.BuilderConfig):
    """`corpus`: a corpus spec (see `titans_jax.data.corpus`); `text_field`: the .jsonl field holding text."""

    corpus: str = corpus.SHAKESPEARE
    text_field: str = "text"


def _hash01(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def split_pieces(docs: Sequence[corpus.Document]) -> dict[str, list[tuple[str, str]]]:
    """Cuts documents into pieces and assigns each to a split. Returns {split: [(example key, text), ...]}."""
    pieces = []  # (hash, example key, text), in corpus order
    for d, doc in enumerate(docs):
        for p, start in enumerate(range(0, len(doc.text), PIECE_CHARS)):
            pieces.append((_hash01(f"{doc.key}#{p}"), f"{d:08d}-{p:08d}", doc.text[start : start + PIECE_CHARS]))
    held_out = {i for i, (h, _, _) in enumerate(pieces) if h < VALIDATION_FRACTION}
    if not held_out and len(pieces) >= 2:
        held_out = {min(range(len(pieces)), key=lambda i: pieces[i][0])}
    out = {"train": [], "validation": []}
    for i, (_, key, text) in enumerate(pieces):
        out["validation" if i in held_out else "train"].append((key, text))
    return out


class TitansTextCorpus(tfds.core.GeneratorBasedBuilder):
    """Text corpus -> {"text"} examples in a train and a held-out validation split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": f"Pieces of {PIECE_CHARS} characters, {VALIDATION_FRACTION:.0%} held out by hash."}
    BUILDER_CONFIGS = [TextCorpusConfig(name=corpus.SHAKESPEARE, description="Shakespeare's works (shksprdata).")]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds finds this file through importlib.resources on the top-level package, which raises when titans_jax
        # is seen as a namespace package (a stale editable install); the module's own path is the same answer.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        # Not `dataset_info_from_configs`: that reads metadata files next to the module, which we don't ship.
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Text corpus {self.builder_config.corpus!r} in pieces of {PIECE_CHARS} characters.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            disable_shuffling=True,  # keep corpus order: long-context windows span consecutive text
        )

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        # Read everything first, so an empty or malformed corpus fails before any file is written.
        splits = split_pieces(corpus.read_documents(cfg.corpus, cfg.text_field))
        # tfds cannot write an empty split: a one-piece corpus simply has no validation split.
        return {name: self._generate_examples(items) for name, items in splits.items() if items}

    def _generate_examples(self, items: list[tuple[str, str]]) -> Iterator[tuple[str, dict]]:
        for key, text in items:
            yield key, {"text": text}


def make_config(data: str, text_field: str = "text") -> TextCorpusConfig:
    """The builder config of a corpus spec; local corpora are named by their content fingerprint."""
    if data == corpus.SHAKESPEARE:
        corpus.shakespeare_files()  # fail early with the install hint
        return TitansTextCorpus.BUILDER_CONFIGS[0]
    spec = os.path.abspath(os.path.expanduser(data))  # absolute, so the build does not depend on the cwd
    name = f"local-{corpus.fingerprint(spec, text_field)}"
    return TextCorpusConfig(name=name, corpus=spec, text_field=text_field, description=f"Local corpus {data!r}.")


@contextlib.contextmanager
def _build_lock(data_dir: str, name: str):
    """Serialises builds of one corpus by several processes on a host (they would otherwise race on the rename)."""
    if "://" in data_dir:  # remote filesystems: no flock; build once beforehand
        yield
        return
    lock_dir = os.path.join(data_dir, NAME)
    os.makedirs(lock_dir, exist_ok=True)
    with open(os.path.join(lock_dir, f".{name}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(data: str, *, data_dir: str | None = None, text_field: str = "text") -> TitansTextCorpus:
    """Builds the corpus as array_record under `data_dir` if not built yet, and returns its builder."""
    data_dir = data_dir or default_data_dir()
    config = make_config(data, text_field)
    builder = TitansTextCorpus(config=config, data_dir=data_dir, file_format="array_record")
    with _build_lock(data_dir, config.name):
        builder.download_and_prepare()
    return builder


def load_split(data: str, split: str, *, data_dir: str | None = None, text_field: str = "text") -> Sequence[dict]:
    """A random-access `Sequence` of {"text": bytes} for one split (built on first use). Needs no TensorFlow."""
    if split not in ("train", "validation"):
        raise ValueError(f"Unknown split {split!r}; use 'train' or 'validation'.")
    builder = prepare(data, data_dir=data_dir, text_field=text_field)
    if len(builder.info.splits) and split not in builder.info.splits:  # (no splits at all under mock_data)
        raise ValueError(
            f"Corpus {data!r} has no {split!r} split: it is a single piece of at most {PIECE_CHARS} characters, "
            "and the held-out split needs at least two. Use a bigger corpus, or evaluate on another corpus."
        )
    return builder.as_data_source(split)
