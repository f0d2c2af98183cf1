"""The grain input pipeline of the trainer: fixed-length token windows, sharded over processes, exactly resumable.

Text corpora are read from a prepared-data directory (`titans_jax.data.prepared`, written by `python -m
titans_jax.data.prepare`): `data` is such a directory, or a raw corpus spec that is prepared into the cache on first
use (`builders.prepare_cached`). A prepared directory is a tfds dataset; a split is one packed token stream (documents
in corpus order, each followed by the end-of-document id), read lazily by random access through tfds's data source
(`tfds.builder_from_directory(dir).as_data_source(split)`, wrapped by `prepared.TokenStream`): nothing of it is held
in memory, so memory does not grow with the corpus. Example i is the window
stream[i * seq_len : i * seq_len + seq_len + 1] (consecutive windows overlap by one token, so every stream token
after the first is a target exactly once). Windows are a random-access `grain.MapDataset`, so the whole pipeline
is a pure function of the global position, and a process reads only the windows of its own rows:

    windows -> shuffle(seed) [train only] -> repeat(num_epochs) -> batch(local) -> [process_index::process_count]

Global batch b holds examples [b * G, (b + 1) * G) of the repeated, shuffled sequence, G = global_batch_size;
process p takes rows [p * local, (p + 1) * local) of it. grain's shuffle draws a fresh permutation per epoch.
The iterator's state is just the next global batch index (plus a fingerprint of the settings), which is the same
on every process: restoring it gives exactly the batches an uninterrupted run would have produced, even with a
different number of processes.

Synthetic tasks (`SYNTHETIC_TASKS`): example i is generated from SeedSequence([seed, 0, i]) (train) or
SeedSequence([VALIDATION_SEED, 1, i]) (validation, the same for every training seed), and batches carry a "mask".
"niah-{passkey,number,word,uuid}" are RULER's single-needle prompts (`titans_jax.data.ruler`) followed by the answer,
"babilong-qa1".."qa5" the BABILong-style stories (`titans_jax.data.babilong`), "niah-mix" and "babilong-mix" their
kinds in turn, "longctx-mix" needles and stories in turn: the mask scores the answer only (needles at seeded depths;
`context_weight` scores the rest too). "niah-simple-*" is the shorter needle format of `titans_jax.data.synthetic`
(a curriculum), "mqar" multi-query associative recall.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import grain
import numpy as np

from titans_jax.data import builders, corpus, prepared, ruler
from titans_jax.data.qa import training_sequence
from titans_jax.data.synthetic import mqar_example, niah_example
from titans_jax.data.tokenizers import Tokenizer, get_tokenizer

NIAH_DATA = tuple(f"niah-{k}" for k in ruler.NIAH_TASKS)
BABILONG_DATA = tuple(f"babilong-qa{i}" for i in range(1, 6))  # titans_jax.data.babilong.BABILONG_TASKS
# "niah-mix": example i is a needle of kind NIAH_MIX[i % 3] (Table 2's PK, N, W); "babilong-mix": task qa{i % 5 + 1}.
NIAH_MIX = ("passkey", "number", "word")
MIXES = ("niah-mix", "babilong-mix", "longctx-mix")
SYNTHETIC_FORMAT = "ruler1"  # bump when a task's examples change
SYNTHETIC_TASKS = (*NIAH_DATA, *BABILONG_DATA, *MIXES, "niah-simple-passkey", "niah-simple-number",
                   "niah-simple-word", "mqar")
DATASET_NAMES = (corpus.SHAKESPEARE, *SYNTHETIC_TASKS)
SPLITS = ("train", "validation")
STATE_VERSION = 1
VALIDATION_SEED = 20_241_231  # fixed: validation examples must not change with the training seed
_SYNTHETIC_TRAIN_SIZE = 2**31  # "infinite": examples are generated on demand
_SYNTHETIC_VALIDATION_SIZE = 1024


class _Windows:
    """Random-access windows of seq_len + 1 tokens over a token stream (an array, or a `prepared.TokenStream`: the
    grain source of a prepared split, each window decoded from the one or two tfds records it spans)."""

    def __init__(self, stream: np.ndarray | prepared.TokenStream, seq_len: int):
        self._stream, self._seq_len = stream, seq_len

    def __len__(self) -> int:
        return (len(self._stream) - 1) // self._seq_len

    def __getitem__(self, i: int) -> dict:
        start = i * self._seq_len
        return {"tokens": self._stream[start : start + self._seq_len + 1].astype(np.int32)}


class _Synthetic:
    """Random-access synthetic examples: {"tokens": int32[seq_len + 1], "mask": float32[seq_len]}."""

    def __init__(self, task: str, split: str, seq_len: int, seed: int, size: int, tok: Tokenizer,
                 context_weight: float = 0.0):
        self._task, self._seq_len, self._size, self._tok = task, seq_len, size, tok
        self._context_weight = float(context_weight)
        self._seed = [seed, 0] if split == "train" else [VALIDATION_SEED, 1]
        try:  # fail now, not in the training loop, if seq_len is too short: 30 examples cover every kind of a mix
            for i in range(min(30, size)):
                self[i]
        except ValueError as e:
            raise ValueError(f"seq_len={seq_len} does not fit the task {task!r}: {e}") from e

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, i: int) -> dict:
        seed = [*self._seed, int(i)]
        if self._task == "mqar":
            pairs = max(1, min(64, (self._seq_len + 1) // 8))  # pairs fill a quarter; queries spread over the rest
            ex = mqar_example(seed, self._seq_len, pairs, vocab_size=min(256, self._tok.vocab_size))
            return {"tokens": ex["tokens"], "mask": self._weigh(ex["mask"])}
        if self._task in (*NIAH_DATA, *BABILONG_DATA, *MIXES):
            task, j = self._task, int(i)
            if task == "longctx-mix":  # needles and stories in turn
                task, j = ("niah-mix", j // 2) if j % 2 == 0 else ("babilong-mix", j // 2)
            kind = task.split("-", 1)[1]
            if kind == "mix":  # the kinds in turn
                kind = NIAH_MIX[j % 3] if task == "niah-mix" else f"qa{j % 5 + 1}"
            if task.startswith("babilong"):
                from titans_jax.data import babilong  # noqa: PLC0415

                make = lambda n: babilong.babilong_example(seed, n, kind, tokenizer=self._tok)
            else:
                make = lambda n: ruler.niah_example(seed, n, kind, tokenizer=self._tok)
            tokens, mask = training_sequence(make, self._seq_len + 1, self._tok)
            return {"tokens": tokens, "mask": self._weigh(mask)}
        ex = niah_example(seed, self._seq_len + 1, self._task.removeprefix("niah-simple-"), tokenizer=self._tok)
        mask = np.zeros(self._seq_len, np.float32)
        mask[ex["answer_positions"] - 1] = 1.0  # target t is tokens[t + 1]
        return {"tokens": ex["tokens"], "mask": self._weigh(mask)}

    def _weigh(self, answers: np.ndarray) -> np.ndarray:
        """Answers weigh 1, every other target `context_weight`."""
        if not self._context_weight:
            return answers
        return (answers + self._context_weight * (1.0 - answers)).astype(np.float32)


def _prepared(data: str, tok: Tokenizer, tokenizer: str, data_dir: str | None, text_field: str) -> tuple[str, dict]:
    """(directory, metadata) of the prepared data behind `data`: itself if it is a prepared directory (its tokenizer
    must be `tok`), else the cache folder of the raw corpus spec, prepared now if it was not yet."""
    if prepared.is_prepared(data):
        directory = data
        meta = prepared.load_metadata(directory)
        saved = meta["tokenizer"]
        if saved["fingerprint"] != tok.fingerprint:
            raise ValueError(
                f"{data} was prepared with the tokenizer {saved['name']!r} ({saved['kind']}, {saved['vocab_size']} "
                f"tokens), not {tok.name!r}: pass --tokenizer {data} (the directory holds a copy of its tokenizer), "
                "or prepare the corpus again with this tokenizer."
            )
    else:
        directory = builders.prepare_cached(data, tokenizer, data_dir=data_dir, text_field=text_field)
        meta = prepared.load_metadata(directory)
    return directory, meta


def _token_stream(data: str, directory: str, meta: dict, split: str) -> prepared.TokenStream:
    if split not in meta["splits"]:
        if meta["num_pieces"] < 2:
            why = (f"it is a single piece of at most {corpus.PIECE_CHARS} characters, and the held-out split needs "
                   "at least two. Use a bigger corpus, or evaluate on another corpus.")
        else:
            why = "it was prepared with --validation-fraction 0. Prepare it with a held-out fraction."
        raise ValueError(f"Corpus {data!r} has no {split!r} split: {why}")
    return prepared.TokenStream(directory, split, meta)


def _mix_seed(seed: int) -> int:
    # grain reshuffles epoch e with seed + e, so seeds s and s + 1 would share permutations; hashing the seed
    # first makes different seeds' epochs unrelated.
    return int(np.random.SeedSequence(seed).generate_state(1)[0])


class DataIterator:
    """Iterator of batches {"tokens": int32[local_batch, seq_len + 1]} (+ "mask": float32[local_batch, seq_len]).

    `get_state()` returns a JSON-serializable dict; `set_state(state)` resumes exactly after the last batch
    the saved iterator returned. Attributes: `vocab_size`, `tokenizer`, `local_batch_size`, `seq_len`,
    `num_batches` (None when infinite), `fingerprint` (the settings that define the batch sequence).
    """

    def __init__(self, batches: grain.MapDataset, *, finite: bool, fingerprint: dict, tokenizer: Tokenizer,
                 local_batch_size: int, seq_len: int):
        self._batches, self._next = batches, 0
        self.num_batches = len(batches) if finite else None
        self.fingerprint, self.tokenizer = fingerprint, tokenizer
        self.vocab_size, self.local_batch_size, self.seq_len = tokenizer.vocab_size, local_batch_size, seq_len

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict:
        if self.num_batches is not None and self._next >= self.num_batches:
            raise StopIteration
        batch = self._batches[self._next]
        self._next += 1
        return batch

    def get_state(self) -> dict:
        """{"version", "next_batch" (global batch index, the same on every process), "fingerprint"}."""
        return {"version": STATE_VERSION, "next_batch": self._next, "fingerprint": dict(self.fingerprint)}

    def set_state(self, state: dict, *, strict: bool = True) -> None:
        """Resumes from `get_state()`. With `strict`, a state saved under other settings (data, seq_len, batch,
        seed, tokenizer, corpus contents) is refused, since resuming it would not continue the same sequence."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"Data state version {state.get('version')!r} is not {STATE_VERSION}: {state}")
        if strict:
            saved = state.get("fingerprint", {})
            diff = {k: (saved.get(k), v) for k, v in self.fingerprint.items() if saved.get(k) != v}
            if diff:
                raise ValueError(
                    f"Data state was saved with other settings {{key: (saved, now)}} = {diff}; resuming would not "
                    "continue the same batches. Restore with the same settings, or pass strict=False to keep "
                    "only the position."
                )
        self._next = int(state["next_batch"])


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}.")


def make_dataset(
    data: str,
    *,
    split: str,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    tokenizer: str = "bytes",
    process_index: int = 0,
    process_count: int = 1,
    data_dir: str | None = None,
    text_field: str = "text",
    num_epochs: int | None = None,
    context_weight: float = 0.0,
) -> DataIterator:
    """Batches of this process's rows of the global batch, as a resumable `DataIterator`.

    Args:
      data: a prepared-data directory (`python -m titans_jax.data.prepare`), "shakespeare", a local corpus (a .txt
        or .jsonl file, a directory, or a glob; prepared into `data_dir` on first use), or a synthetic task in
        `SYNTHETIC_TASKS` (task names win over a local path of the same name; write "./mqar" for the path).
      split: "train" (shuffled, a new order every epoch) or "validation" (corpus order, deterministic).
      seq_len: inputs per example; "tokens" holds seq_len + 1 (inputs = tokens[:, :-1], targets = tokens[:, 1:]).
      global_batch_size: rows per step over all processes; process_count must divide it.
      seed: shuffle / synthetic-generation seed (>= 0). The validation split ignores it.
      tokenizer: "bytes", a SentencePiece ".model", a Hugging Face "tokenizer.json", or a prepared directory (its
        tokenizer). A prepared `data` directory must have been prepared with this tokenizer.
      process_index, process_count: this process takes rows [index * local, (index + 1) * local) of each batch.
      data_dir: where raw corpora are prepared (default `$TITANS_JAX_DATA_DIR` or ~/.cache/titans_jax/tfds).
      text_field: the field holding the text in .jsonl corpora.
      num_epochs: None repeats train forever and runs validation once; an int bounds either (the last
        incomplete global batch is dropped).
      context_weight: synthetic tasks: the mask's weight of the targets that are not answers (answers weigh 1; 0, the
        default, scores the answers only). Training can learn recall from the copies in the context too.
    """
    _check_positive(seq_len=seq_len, global_batch_size=global_batch_size, process_count=process_count)
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {SPLITS}.")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}.")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count}).")
    if num_epochs is not None:
        _check_positive(num_epochs=num_epochs)
    seq_len, global_batch_size, seed = int(seq_len), int(global_batch_size), int(seed)  # numpy ints are not JSON
    local = global_batch_size // process_count
    tok = get_tokenizer(tokenizer)

    if data in SYNTHETIC_TASKS:
        size = _SYNTHETIC_TRAIN_SIZE if split == "train" else max(_SYNTHETIC_VALIDATION_SIZE, global_batch_size)
        if not 0.0 <= context_weight <= 1.0:
            raise ValueError(f"context_weight must lie in [0, 1], got {context_weight!r}")
        source = _Synthetic(data, split, seq_len, seed, size, tok, context_weight)
        # The needle and story formats are versioned: a run saved with another format is not resumed onto this one.
        shuffle, data_id = False, f"{data}@{SYNTHETIC_FORMAT}"
    else:
        if context_weight:
            raise ValueError(f"context_weight={context_weight} applies to the synthetic tasks only; a text corpus "
                             f"({data!r}) scores every token already: leave it at 0")
        directory, meta = _prepared(data, tok, tokenizer, data_dir, text_field)
        data_id = f"prepared-{meta['fingerprint']}"  # names the corpus version and its tokenization
        stream = _token_stream(data, directory, meta, split)
        source, shuffle = _Windows(stream, seq_len), split == "train"
        if len(source) < 1:
            raise ValueError(
                f"The {split!r} split of corpus {data!r} has {len(stream)} tokens, fewer than one sequence of "
                f"seq_len + 1 = {seq_len + 1}. Use a smaller seq_len or a bigger corpus."
            )
    epochs = num_epochs if num_epochs is not None else (None if split == "train" else 1)

    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=_mix_seed(seed))
    ds = ds.repeat(epochs)
    if epochs is not None:  # keep whole global batches only, so every process gets the same number of batches
        usable = len(ds) // global_batch_size * global_batch_size
        if usable == 0:
            raise ValueError(
                f"The {split!r} split of {data!r} has {len(ds)} sequences of seq_len + 1 = {seq_len + 1} tokens "
                f"over {epochs} epoch(s), fewer than global_batch_size={global_batch_size}. "
                "Use a smaller batch or seq_len, or more epochs."
            )
        ds = ds[:usable]
    ds = ds.batch(local, drop_remainder=True)[process_index::process_count]
    fingerprint = {
        "data": data_id, "split": split, "seq_len": seq_len, "global_batch_size": global_batch_size,
        "seed": seed if split == "train" else None, "tokenizer": tok.fingerprint, "num_epochs": epochs,
        "num_examples": len(source),
    }
    if context_weight:
        fingerprint["context_weight"] = float(context_weight)
    return DataIterator(ds, finite=epochs is not None, fingerprint=fingerprint, tokenizer=tok,
                        local_batch_size=local, seq_len=seq_len)


def eval_batches(data: str, *, seq_len: int, global_batch_size: int, max_batches: int | None = None,
                 **kwargs) -> Iterator[dict]:
    """The validation split from its start, one pass, at most `max_batches` batches: the same batches every call.

    `kwargs` are `make_dataset`'s (tokenizer, process_index, process_count, data_dir, text_field).
    """
    it = make_dataset(data, split="validation", seq_len=seq_len, global_batch_size=global_batch_size, seed=0,
                      num_epochs=1, **kwargs)
    return itertools.islice(it, max_batches)
