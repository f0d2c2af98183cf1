"""Test-wide JAX settings: 8 fake CPU devices for sharding tests, strict numerics (no silent rank promotion), LLVM at
-O0 and a persistent compilation cache (docs/architecture.md, "The test suite").

Most of the suite's time is XLA compiling small programs, and many are compiled more than once (a fresh ``jax.jit`` of
the same function in another test, the other xdist worker, a command run again in a subprocess, which inherits the
environment). The cache is keyed by the program and the compiler, so a hit runs exactly the code a fresh compile would
produce. ``TITANS_TEST_JAX_CACHE=0`` turns it off.
"""

import os
import pathlib

# The tests check values, not speed: LLVM at -O0 compiles the suite's many small programs about a third faster (XLA's
# own HLO optimisations, fusion included, still run). Timing belongs to experiments/, which compile at the default.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
if os.environ.get("TITANS_TEST_JAX_CACHE", "1") != "0":
    _cache = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_cache))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")


# ------------------------------------------------------------------------------------------ shared training inputs
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path_factory, monkeypatch):
    """Raw corpora are prepared into a per-test folder, never into the user's cache."""
    monkeypatch.setenv("TITANS_JAX_DATA_DIR", str(tmp_path_factory.mktemp("default_data_dir")))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """About 60 KB of word salad: 15 pieces, so the validation split holds at least one."""
    rng = np.random.default_rng(0)
    words = "the king queen lord doth thou art my good sweet love night day and of to".split()
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, size=8)) + "." for _ in range(1500)) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory, corpus):
    """A 300-piece SentencePiece BPE model of ``corpus`` (byte fallback needs more than 256 pieces): a tokenizer with a
    file, which an export must carry."""
    spm = pytest.importorskip("sentencepiece")
    prefix = str(tmp_path_factory.mktemp("sp") / "sp300")
    spm.SentencePieceTrainer.train(input=corpus, model_prefix=prefix, vocab_size=300, model_type="bpe",
                                   byte_fallback=True, minloglevel=2)
    return prefix + ".model"
