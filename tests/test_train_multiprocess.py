"""Multi-host training on one machine: 2 processes x 2 CPU devices (jax.distributed over gloo on 127.0.0.1) train
exactly like 1 process x 4 devices, through the real command line (each process feeds its half of every batch)."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from titans_jax.train.metrics import read_metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(1)
    words = "to be or not that is the question whether tis nobler in mind suffer".split()
    path = tmp_path_factory.mktemp("mp_corpus") / "c.txt"
    path.write_text("\n".join(" ".join(rng.choice(words, size=9)) for _ in range(1200)) + "\n")
    return str(path)


def _args(workdir, corpus, data_dir, *extra):
    return [
        sys.executable, "-m", "titans_jax.train", "--config", "tiny-transformer", "--workdir", str(workdir),
        "--data", corpus, "--steps", "4", "--batch-size", "8", "--seq-len", "32", "--mesh", "data=2,fsdp=2",
        "--cpu-devices", "2" if extra else "4", *extra,
        "--set", "model.dim=32", "model.num_layers=1", "train.log_every=1", "train.eval_every=2",
        "train.eval_batches=2", "train.checkpoint_every=2", "train.sample_tokens=0", f"train.data_dir={data_dir}",
        "train.memory_stats=false",
    ]  # fmt: skip


def _records(workdir):
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, corpus):
    data_dir = str(tmp_path / "tfds")
    env = {**os.environ, "XLA_FLAGS": "", "TITANS_JAX_DATA_DIR": data_dir}
    # Build the corpus once, so the two processes below only read it.
    one = subprocess.run(_args(tmp_path / "one", corpus, data_dir), env=env, capture_output=True, text=True,
                         timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    port = _free_port()
    procs = [
        subprocess.Popen(_args(tmp_path / "two", corpus, data_dir, "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i)),
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    a, b = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [r["step"] for r in a] == [1, 2, 2, 3, 4, 4] and [sorted(r) for r in a] == [sorted(r) for r in b]
    for ra, rb in zip(a, b, strict=True):
        for k in ra:
            np.testing.assert_allclose(ra[k], rb[k], rtol=1e-5, err_msg=f"step {ra['step']} {k}")
    # Both processes saved their shards into one checkpoint; only process 0 wrote metrics and config.
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2", "4"]
    assert "final validation at step 4" in outs[0]
