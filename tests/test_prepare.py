"""Tests of titans_jax.data.prepared (the prepared-data format: streams, end of document, shards, metadata) and its
command line titans_jax.data.prepare (reruns, refusals, atomic writes, workers), the Hugging Face tokenizer, and memory
that does not grow with the corpus (a 200 MiB corpus prepared and trained on in subprocesses, peak RSS measured).

Every directory is temporary; the home cache is never written (TITANS_JAX_DATA_DIR is redirected).
"""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from titans_jax.data import (
    ByteTokenizer,
    HuggingFaceTokenizer,
    TokenStream,
    check_vocab,
    corpus,
    get_tokenizer,
    is_prepared,
    load_metadata,
    make_dataset,
    pipeline,
    prepare,
    prepared,
)

EOD = ByteTokenizer.eod_id
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




def _text(doc: int, lines: int) -> str:
    return "".join(f"Document {doc} line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(lines))


@pytest.fixture
def txt_dir(tmp_path):
    """Three documents of about 17 KB (5 pieces each), one of them blank-led, and a blank one that is skipped."""
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(3):
        (d / f"doc{i}.txt").write_text(("\n" * 5000 if i == 1 else "") + _text(i, 240))
    (d / "doc3.txt").write_text("  \n\n")
    return d


def _expected_streams(pieces, fraction) -> dict[str, bytes]:
    """The specification of the byte streams: each split holds its pieces in corpus order, with EOD after every run of
    consecutive pieces of one document."""
    out, last = {"train": bytearray(), "validation": bytearray()}, {}
    split = prepared.assign_splits([(p.key, p.index) for p in pieces], fraction)
    for p in pieces:
        s = split[p.key, p.index]
        if last.get(s) not in (None, (p.doc, p.index - 1)):
            out[s].append(EOD)
        out[s] += p.text.encode()
        last[s] = None if p.last else (p.doc, p.index)
        if p.last:
            out[s].append(EOD)
    for s, v in last.items():
        if v is not None:
            out[s].append(EOD)
    return {s: bytes(v) for s, v in out.items()}


def _read_all(directory, split) -> bytes:
    stream = TokenStream(str(directory), split)
    return stream[0 : len(stream)].tobytes()


def _main(argv, capsys):
    code = prepare.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out + out.err


# ----------------------------------------------------------------------------------------------- the format
def test_streams_are_the_pieces_with_end_of_document_ids(txt_dir, tmp_path):
    """Small blocks over 3 shards: every block boundary and the round-robin layout are exercised."""
    out = tmp_path / "prep"
    meta = prepared.prepare(str(txt_dir), str(out), shards=3, block_tokens=1000, validation_fraction=0.2,
                           progress=False)
    pieces = list(corpus.iter_pieces(str(txt_dir)))
    expected = _expected_streams(pieces, 0.2)
    assert expected["validation"] and expected["train"]
    for split in ("train", "validation"):
        assert _read_all(out, split) == expected[split]
        assert meta["splits"][split]["num_tokens"] == len(expected[split])
        assert meta["splits"][split]["num_segments"] == expected[split].count(EOD)
    # every run of text between two EOD ids is contiguous text of one document
    docs = {d.key: d.text for d in corpus.read_documents(str(txt_dir))}
    for split in ("train", "validation"):
        for segment in expected[split].split(bytes([EOD]))[:-1]:
            assert any(segment.decode() in text for text in docs.values())
    assert meta["num_documents"] == 3 and meta["tokenizer"] == {
        "name": "bytes", "kind": "bytes", "vocab_size": 256, "eod_id": 255, "fingerprint": "bytes", "file": None}
    # shards follow the input in order, one tfds-named file each (a slot the input skipped is an empty shard)
    files = [s["file"] for split in ("train", "validation") for s in meta["splits"][split]["shards"]]
    assert meta["dtype"] == "uint8" and sorted(os.listdir(out)) == sorted(
        ["metadata.json", "dataset_info.json", "features.json", *files])
    assert sum(s["records"] > 0 for s in meta["splits"]["train"]["shards"]) >= 2 and files == sorted(files)
    train_files = [f for f in files if f.startswith("prepared-train.")]
    assert train_files == [f"prepared-train.array_record-{i:05d}-of-00003" for i in range(3)]
    # the directory is a tfds dataset: its split infos are the shards', its records the stream's blocks
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(out))
    for split in ("train", "validation"):
        shards = meta["splits"][split]["shards"]
        assert builder.info.splits[split].shard_lengths == [s["records"] for s in shards]
        source = builder.as_data_source(split=split)
        blocks = [source[i]["tokens"] for i in range(len(source))]
        assert all(b.dtype == np.uint8 and len(b) <= 1000 for b in blocks)
        assert np.concatenate(blocks).tobytes() == expected[split]
    # the pieces are the whole-document reading cut every PIECE_CHARS characters (blank documents skipped)
    assert [p.text for p in pieces] == [t[s : s + corpus.PIECE_CHARS] for t in docs.values()
                                        for s in range(0, len(t), corpus.PIECE_CHARS)]
    # random slices, across block and shard boundaries, equal the stream
    stream, full = TokenStream(str(out), "train"), np.frombuffer(expected["train"], np.uint8)
    rng = np.random.default_rng(0)
    for a in rng.integers(0, len(full), 50):
        b = a + int(rng.integers(0, 2500))
        assert np.array_equal(stream[a:b], full[a:b])


def test_skipped_slots_are_empty_tfds_shards(txt_dir, tmp_path):
    """More shards than the input fills: skipped slots (first, middle, last) are empty shards that tfds names and skips,
    and reads across them still equal the streams."""
    import tensorflow_datasets as tfds

    out = tmp_path / "prep"
    meta = prepared.prepare(str(txt_dir), str(out), shards=12, block_tokens=1000, validation_fraction=0.2,
                           progress=False)
    expected = _expected_streams(list(corpus.iter_pieces(str(txt_dir))), 0.2)
    builder = tfds.builder_from_directory(str(out))
    records = {split: [s["records"] for s in meta["splits"][split]["shards"]] for split in ("train", "validation")}
    assert records["train"][0] == 0 and 0 in records["train"][1:-1] and records["validation"][-1] == 0
    for split, n in (("train", 12), ("validation", 3)):
        assert [s["file"] for s in meta["splits"][split]["shards"]] == [
            f"prepared-{split}.array_record-{i:05d}-of-{n:05d}" for i in range(n)]
        assert all((out / s["file"]).is_file() for s in meta["splits"][split]["shards"])
        assert builder.info.splits[split].shard_lengths == records[split]
        assert _read_all(out, split) == expected[split]
    stream, full = TokenStream(str(out), "train"), np.frombuffer(expected["train"], np.uint8)
    for a in range(0, len(full), 997):
        assert np.array_equal(stream[a : a + 1500], full[a : a + 1500])


def test_tiny_corpus_holds_out_the_smallest_hash_piece(tmp_path):
    (tmp_path / "c.txt").write_text(_text(0, 120))  # 2 pieces; neither hashes into the lowest 5%
    pieces = list(corpus.iter_pieces(str(tmp_path / "c.txt")))
    assert len(pieces) == 2 and all(prepared.split_of(p.key, p.index, 0.05) == "train" for p in pieces)
    meta = prepared.prepare(str(tmp_path / "c.txt"), str(tmp_path / "prep"), progress=False)
    smallest = min(pieces, key=lambda p: prepared.piece_hash(p.key, p.index))
    assert tuple(meta["held_out_piece"]) == (smallest.key, smallest.index)
    expected = _expected_streams(pieces, 0.05)
    assert _read_all(tmp_path / "prep", "validation") == expected["validation"] == smallest.text.encode() + b"\xff"


def test_bytes_end_of_document_never_occurs_in_text():
    tok = ByteTokenizer()
    text = "".join(chr(c) for c in range(0x20, 0x3000)) + "\U0001f600"
    assert EOD not in tok.encode(text) and tok.vocab_size == 256 and tok.decode([EOD]) == "\ufffd"


def test_jsonl_text_field_and_forced_format(tmp_path):
    with open(tmp_path / "c.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"body": _text(i, 3), "id": i}) + "\n")
    meta = prepared.prepare(str(tmp_path / "c.jsonl"), str(tmp_path / "p1"), text_field="body", progress=False)
    assert meta["num_documents"] == 30
    train = _read_all(tmp_path / "p1", "train")
    assert train.count(EOD) == meta["splits"]["train"]["num_segments"] and b"Document 7 line 2" in train
    (tmp_path / "c.log").write_text((tmp_path / "c.jsonl").read_text())  # jsonl content under another suffix
    meta = prepared.prepare(str(tmp_path / "c.log"), str(tmp_path / "p2"), text_field="body", fmt="jsonl",
                           progress=False)
    assert meta["num_documents"] == 30
    meta = prepared.prepare(str(tmp_path / "c.log"), str(tmp_path / "p3"), fmt="txt", progress=False)
    assert meta["num_documents"] == 1 and b'{"body": ' in _read_all(tmp_path / "p3", "train")


# ----------------------------------------------------------------------------------------------- the command line
def test_cli_rerun_is_a_noop_and_changes_are_refused(txt_dir, tmp_path, capsys):
    out = tmp_path / "prep"
    args = ["--input", f"{txt_dir}/*.txt", "--out", out, "--quiet"]
    code, text = _main(args, capsys)
    assert code == 0 and "3 documents" in text and "tokens/s" in text
    meta = load_metadata(str(out))
    stamp = os.stat(out / "metadata.json").st_mtime_ns
    code, text = _main(args, capsys)
    assert code == 0 and "already prepared" in text and os.stat(out / "metadata.json").st_mtime_ns == stamp
    # a changed input is refused, and nothing is touched
    (txt_dir / "doc0.txt").write_text(_text(9, 100))
    code, text = _main(args, capsys)
    assert code == 2 and "other input" in text and "--overwrite" in text and "'input'" in text
    assert load_metadata(str(out))["fingerprint"] == meta["fingerprint"]
    code, text = _main([*args, "--overwrite"], capsys)
    assert code == 0 and load_metadata(str(out))["fingerprint"] != meta["fingerprint"]
    assert b"Document 9" in _read_all(out, "train") + _read_all(out, "validation")
    # a changed tokenizer or layout is refused too
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "sp.txt").write_text(_text(0, 100))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "sp.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=80,
                                   model_type="bpe", minloglevel=2)
    code, text = _main([*args, "--tokenizer", tmp_path / "sp.model"], capsys)
    assert code == 2 and "'tokenizer'" in text
    code, text = _main([*args, "--shards", "2"], capsys)
    assert code == 2 and "'shards'" in text
    # a folder that is not a prepared directory is refused; an empty one is used
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, text = _main(["--input", txt_dir, "--out", tmp_path / "other", "--quiet"], capsys)
    assert code == 2 and "not a prepared-data directory" in text and (tmp_path / "other" / "notes.txt").exists()
    (tmp_path / "empty").mkdir()
    assert _main(["--input", txt_dir, "--out", tmp_path / "empty", "--quiet"], capsys)[0] == 0
    code, text = _main(["--input", tmp_path / "nowhere.txt", "--out", tmp_path / "x", "--quiet"], capsys)
    assert code == 2 and "does not exist" in text and not (tmp_path / "x").exists()


def test_a_crash_leaves_no_directory_that_looks_prepared(txt_dir, tmp_path, monkeypatch):
    out = tmp_path / "prep"
    calls = []

    def failing(texts):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("killed mid-way")
        return ByteTokenizer().encode_batch(texts)

    monkeypatch.setattr(prepared, "_BATCH_CHARS", 4096)  # one piece per batch: fail after the first
    monkeypatch.setattr(ByteTokenizer, "encode_batch", lambda self, texts: failing(texts))
    with pytest.raises(RuntimeError, match="killed mid-way"):
        prepared.prepare(str(txt_dir), str(out), progress=False)
    assert not out.exists() and os.listdir(tmp_path) == ["corpus"]  # (the partial directory is removed)
    # A process killed outright leaves its partial directory (under a dead pid): the next run removes it.
    stale = tmp_path / f".prep.partial-{os.uname().nodename}-999999999"
    stale.mkdir()
    (stale / "prepared-train.array_record-00000-of-00001").write_bytes(b"half")
    monkeypatch.undo()
    monkeypatch.setenv("TITANS_JAX_DATA_DIR", str(tmp_path / "unused"))
    prepared.prepare(str(txt_dir), str(out), progress=False)
    assert is_prepared(str(out)) and not stale.exists()


def test_workers_write_the_same_streams(txt_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(prepared, "_BATCH_CHARS", 10_000)  # several batches in flight
    monkeypatch.setenv("PYTHONPATH", ROOT)  # (spawned workers import titans_jax)
    one = prepared.prepare(str(txt_dir), str(tmp_path / "one"), progress=False)
    two = prepared.prepare(str(txt_dir), str(tmp_path / "two"), workers=2, progress=False)
    assert one["splits"] == two["splits"] and one["fingerprint"] == two["fingerprint"]
    for split in ("train", "validation"):
        assert _read_all(tmp_path / "one", split) == _read_all(tmp_path / "two", split)


# ----------------------------------------------------------------------------------------------- the reader
def test_prepared_directory_needs_no_input_files(txt_dir, tmp_path):
    out = tmp_path / "prep"
    prepared.prepare(str(txt_dir), str(out), progress=False)
    expected = next(make_dataset(str(txt_dir), split="train", seq_len=16, global_batch_size=4, seed=0))
    for f in txt_dir.iterdir():
        f.unlink()
    batch = next(make_dataset(str(out), split="train", seq_len=16, global_batch_size=4, seed=0))
    assert batch["tokens"].shape == (4, 17) and batch["tokens"].dtype == np.int32
    assert np.array_equal(batch["tokens"], expected["tokens"])  # the cache folder holds the same streams


def test_each_process_reads_only_its_rows(txt_dir, monkeypatch):
    read = []
    original = pipeline._Windows.__getitem__
    monkeypatch.setattr(pipeline._Windows, "__getitem__", lambda self, i: read.append(i) or original(self, i))
    it = make_dataset(str(txt_dir), split="train", seq_len=16, global_batch_size=8, seed=0, process_index=1,
                      process_count=2)
    read.clear()
    next(it)
    assert len(read) == 4


def test_sentencepiece_end_of_document_is_its_eos(txt_dir, tmp_path):
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "sp.txt").write_text(_text(0, 100))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "sp.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=80,
                                   model_type="bpe", minloglevel=2)
    tok = get_tokenizer(str(tmp_path / "sp.model"))
    assert tok.eod_id == 2
    meta = prepared.prepare(str(txt_dir), str(tmp_path / "prep"), tokenizer=str(tmp_path / "sp.model"),
                           progress=False)
    train = TokenStream(str(tmp_path / "prep"), "train")
    ids = train[0 : len(train)]
    assert meta["dtype"] == "uint8" and int((ids == 2).sum()) == meta["splits"]["train"]["num_segments"] > 0
    assert os.path.isfile(tmp_path / "prep" / "sp.model")
    assert get_tokenizer(str(tmp_path / "prep")).fingerprint == tok.fingerprint
    spm.SentencePieceTrainer.train(input=str(tmp_path / "sp.txt"), model_prefix=str(tmp_path / "noeos"),
                                   vocab_size=80, model_type="bpe", minloglevel=2, eos_id=-1)
    with pytest.raises(ValueError, match="no end-of-sequence piece"):
        prepared.prepare(str(txt_dir), str(tmp_path / "p2"), tokenizer=str(tmp_path / "noeos.model"), progress=False)


# ----------------------------------------------------------------------------------------------- Hugging Face
def _train_bpe(path, text: str, vocab_size: int = 300, special=("<|endoftext|>",)) -> str:
    """A byte-level BPE trained here on `text` (nothing downloaded), saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(), trainer)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    return os.path.join(path, "tokenizer.json")


def test_huggingface_bpe_tokenizer(txt_dir, tmp_path):
    pytest.importorskip("tokenizers")
    path = _train_bpe(tmp_path / "bpe", _text(0, 200) + "naïve mémoire ✓\n")
    tok = get_tokenizer(path)
    assert isinstance(tok, HuggingFaceTokenizer) and tok.vocab_size == 300 and tok.eod_id == 0
    text = "Document 7 line 3: the lazy fox, naïve ✓ 😀"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text.encode())  # merges learnt
    assert tok.token_byte_lengths()[ids].sum() == len(text.encode()) and tok.token_byte_lengths()[0] == 0
    check_vocab(tok, 300)
    check_vocab(tok, 384)  # a padded embedding is fine
    with pytest.raises(ValueError, match=r"300 tokens but model.vocab_size=256.*model.vocab_size=300"):
        check_vocab(tok, 256)
    # prepared with it: uint16 ids, the EOD id after every document, the tokenizer copied in
    out = tmp_path / "prep"
    meta = prepared.prepare(str(txt_dir), str(out), tokenizer=path, progress=False)
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["vocab_size"] == 300 and meta["tokenizer"]["eod_id"] == 0
    train = TokenStream(str(out), "train")
    ids = train[0 : len(train)]
    assert int((ids == 0).sum()) == meta["splits"]["train"]["num_segments"]
    assert "Document 2 line 5: the quick brown fox" in tok.decode(ids)
    it = make_dataset(str(out), split="train", seq_len=32, global_batch_size=2, seed=0, tokenizer=str(out))
    assert it.vocab_size == 300 and next(it)["tokens"].max() < 300
    with pytest.raises(ValueError, match=r"prepared with the tokenizer .*huggingface, 300 tokens.*--tokenizer"):
        make_dataset(str(out), split="train", seq_len=32, global_batch_size=2, seed=0, tokenizer="bytes")
    # a raw corpus with this tokenizer goes through the cache the same way
    it = make_dataset(str(txt_dir), split="train", seq_len=32, global_batch_size=2, seed=0, tokenizer=path)
    assert it.vocab_size == 300
    # the end of document: a tokenizer_config.json beside it names it; without one nor a known token, refused
    nameless = _train_bpe(tmp_path / "nameless", _text(0, 50), special=("<sep>",))
    with pytest.raises(ValueError, match="names no end-of-document token"):
        prepared.prepare(str(txt_dir), str(tmp_path / "p2"), tokenizer=nameless, progress=False)
    (tmp_path / "nameless" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<sep>"}))
    assert get_tokenizer(nameless).eod_id == 0
    meta = prepared.prepare(str(txt_dir), str(tmp_path / "p2"), tokenizer=nameless, progress=False)
    assert sorted(f for f in os.listdir(tmp_path / "p2") if "token" in f) == ["tokenizer.json", "tokenizer_config.json"]
    assert get_tokenizer(str(tmp_path / "p2")).eod_id == 0


def test_trainer_on_a_directory_prepared_with_a_huggingface_bpe(txt_dir, tmp_path, capsys):
    """The trainer's command line on a prepared directory: its vocabulary is checked against the model's (the error
    names both numbers and the fix), its tokenizer must be the directory's, and bits per byte use the BPE's pieces."""
    pytest.importorskip("tokenizers")
    from titans_jax.train.__main__ import main as train_main
    from titans_jax.train.metrics import read_metrics

    path = _train_bpe(tmp_path / "bpe", _text(0, 200))
    out = tmp_path / "prep"
    prepared.prepare(str(txt_dir), str(out), tokenizer=path, progress=False)

    def run(*overrides, tokenizer=out):
        wd = tmp_path / f"wd{len(list(tmp_path.iterdir()))}"
        code = train_main([
            "--config", "tiny-transformer", "--workdir", str(wd), "--data", str(out), "--tokenizer", str(tokenizer),
            "--steps", "2", "--batch-size", "8", "--seq-len", "16", "--set", "model.dim=32", "model.num_layers=1",
            "train.log_every=1", "train.eval_batches=1", "train.sample_tokens=0", "train.memory_stats=false", *overrides])
        return code, capsys.readouterr().err, wd

    code, err, _ = run()
    assert code == 2 and "300 tokens but model.vocab_size=256" in err and "model.vocab_size=300" in err
    code, err, _ = run("model.vocab_size=300", tokenizer="bytes")
    assert code == 2 and "prepared with the tokenizer" in err and f"--tokenizer {out}" in err
    code, err, wd = run("model.vocab_size=384")  # a padded embedding trains
    assert code == 0, err
    final = [r for r in read_metrics(str(wd / "metrics.jsonl")) if "val_bpb" in r][-1]
    assert np.isfinite(final["val_bpb"]) and final["val_bpb"] < final["val_loss"] / np.log(2)  # > 1 byte per token


# ----------------------------------------------------------------------------------------------- memory
GIB = 2**30


def _write_corpus(directory, total_bytes: int, files: int = 4) -> None:
    """`files` text files of random words, `total_bytes` or a little more in all, written ~8 MiB at a time."""
    rng = np.random.default_rng(0)
    words = np.array("the of and to in a is that for it as was with be by on not he this are or his from at which"
                     " but have an they you were her she there one all we their".split())
    lines = "\n".join(" ".join(rng.choice(words, 12)) + "." for _ in range(2**12)) + "\n"  # ~190 KiB
    per_file = -(-total_bytes // files)
    for i in range(files):
        with open(os.path.join(directory, f"part{i}.txt"), "w") as f:
            left = per_file
            while left > 0:
                n = min(-(-left // len(lines)), 40)
                f.write(lines * n)
                left -= n * len(lines)


# Runs a command and writes the peak RSS of that command alone (KiB) to a file. Why a launcher: a child forked (or
# vforked) from the pytest worker counts the worker's resident pages in its own peak, even after exec (Linux carries
# the pre-exec high-water mark over), so measured directly a 200 MiB run read as the worker's 2.8 GiB. The launcher is
# a fresh, small interpreter: what its child inherits is a few MiB.
_LAUNCHER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
             "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(rc)")


def _peak_rss(cmd, log, env=None, timeout=300) -> tuple[float, str]:
    """Runs `cmd`; returns its peak resident set size in bytes and its output."""
    rss_file = f"{log}.maxrss"
    with open(log, "w") as f:
        p = subprocess.run([sys.executable, "-c", _LAUNCHER, rss_file, *cmd], env=env, stdout=f,
                           stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout)
    with open(log) as f:
        out = f.read()
    assert p.returncode == 0, out[-3000:]
    with open(rss_file) as f:
        return int(f.read()) * 1024, out  # (ru_maxrss is in KiB on Linux)


@pytest.mark.slow
def test_memory_does_not_grow_with_a_200mib_corpus(tmp_path):
    """Prepare and the trainer's first steps on a 200 MiB corpus each stay under 1.5 GiB of peak RSS."""
    start = time.perf_counter()
    raw = tmp_path / "raw"
    raw.mkdir()
    _write_corpus(raw, 200 * 2**20)
    size = sum(f.stat().st_size for f in raw.iterdir())
    assert size >= 200 * 2**20
    env = {**os.environ, "PYTHONPATH": ROOT}  # (the suite's XLA flags and compilation cache: the trainer compiles fast)
    env.pop("JAX_NUM_CPU_DEVICES", None)
    out = tmp_path / "prep"
    prep_rss, _ = _peak_rss([sys.executable, "-m", "titans_jax.data.prepare", "--input", f"{raw}/*.txt", "--out",
                             str(out), "--shards", "4", "--quiet"], tmp_path / "prepare.log", env)
    meta = load_metadata(str(out))
    assert meta["num_tokens"] >= size and meta["num_documents"] == 4
    prepare_done = time.perf_counter()
    for f in raw.iterdir():
        f.unlink()  # the trainer reads the prepared directory only
    train_rss, log = _peak_rss([
        sys.executable, "-m", "titans_jax.train", "--config", "tiny-lmm", "--workdir", str(tmp_path / "wd"),
        "--data", str(out), "--steps", "3", "--batch-size", "8", "--seq-len", "64",
        "--set", "model.dim=32", "model.num_layers=1", "train.log_every=1", "train.eval_batches=1",
        "train.sample_tokens=0"], tmp_path / "train.log", env)
    assert "final validation at step 3" in log
    print(f"\n200 MiB corpus: prepare {prepare_done - start:.1f} s (with generation), peak RSS {prep_rss / 2**20:.0f} MiB; "
          f"trainer {time.perf_counter() - prepare_done:.1f} s, peak RSS {train_rss / 2**20:.0f} MiB")
    assert prep_rss < 1.5 * GIB and train_rss < 1.5 * GIB, (prep_rss, train_rss)
