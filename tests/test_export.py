"""Workdirs anywhere, export and load: a run on a (fake) cloud bucket trains, resumes, samples and exports with nothing
written locally; a params-only export loads in a fresh process, without the run, its optimizer state or its data,
and gives the training run's logits.

The bucket is a stand-in for GCS that needs no network: `gs://` paths go to a local folder through etils.epath (the
backend every workdir file uses) and through TensorStore (orbax's array storage), and, like an object store, it
cannot append to a file. orbax keeps its GCS behaviour (commit marker files instead of renames).
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any backend use; conftest sets the same

import json  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from etils.epath import backend as epath_backend  # noqa: E402
from etils.epath import gpath  # noqa: E402
from orbax.checkpoint._src.path import gcs_utils  # noqa: E402

import titans_jax  # noqa: E402
from titans_jax.checkpoint import Checkpointer  # noqa: E402
from titans_jax.export import load_model, read_export_meta  # noqa: E402
from titans_jax.export import main as export_main  # noqa: E402
from titans_jax.sample import main as sample_main  # noqa: E402
from titans_jax.train.__main__ import main as train_main  # noqa: E402
from titans_jax.train.config import load_config  # noqa: E402
from titans_jax.train.metrics import read_metrics  # noqa: E402
from titans_jax.train.optim import make_optimizer  # noqa: E402
from titans_jax.train.state import abstract_train_state, model_of, titans_model_fn  # noqa: E402

PROMPT = "the king doth love"


# ------------------------------------------------------------------------------------------------ a bucket, offline
class FakeBucketBackend(epath_backend._OsPathBackend):
    """etils.epath's backend for `gs://` URLs, storing `gs://b/x` under `root/b/x`; refuses to append, as GCS does."""

    def __init__(self, root: str):
        self.root = root

    def local(self, p) -> str:
        p = os.fspath(p)
        assert p.startswith("gs://"), p
        return os.path.join(self.root, p[len("gs://"):])

    def url(self, p) -> str:
        return "gs://" + os.path.relpath(os.fspath(p), self.root)

    def open(self, path, mode):
        if "a" in mode or "+" in mode:
            raise NotImplementedError(f"an object store cannot append: open({path!r}, {mode!r})")
        if "w" in mode:
            os.makedirs(os.path.dirname(self.local(path)), exist_ok=True)
        return super().open(self.local(path), mode)

    def exists(self, p):
        return super().exists(self.local(p))

    def isdir(self, p):
        return super().isdir(self.local(p))

    def listdir(self, p):
        return super().listdir(self.local(p))

    def glob(self, p):
        return [self.url(x) for x in super().glob(self.local(p))]

    def walk(self, top, *, top_down=True, on_error=None):
        for root, dirs, files in super().walk(self.local(top), top_down=top_down, on_error=on_error):
            yield self.url(root), dirs, files

    def makedirs(self, p, *, exist_ok=False, mode=None):
        return super().makedirs(self.local(p), exist_ok=exist_ok, mode=mode)

    def mkdir(self, p, *, exist_ok=False, mode=None):
        return super().mkdir(self.local(p), exist_ok=exist_ok, mode=mode)

    def rmtree(self, p):
        return super().rmtree(self.local(p))

    def remove(self, p):
        return super().remove(self.local(p))

    def rename(self, p, dst):
        return super().rename(self.local(p), self.local(dst))

    def replace(self, p, dst):
        return super().replace(self.local(p), self.local(dst))

    def copy(self, p, dst, overwrite):
        return super().copy(self.local(p), self.local(dst), overwrite=overwrite)

    def stat(self, p):
        return super().stat(self.local(p))


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """`gs://` served from `tmp_path/bucket_store` for this test (every patch is undone after it)."""
    from tensorboardX import record_writer

    root = tmp_path / "bucket_store"
    root.mkdir()
    monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", FakeBucketBackend(str(root)))
    monkeypatch.setenv("EPATH_USE_TF", "0")  # with TensorFlow installed, epath would take gfile for gs:// instead

    def kvstore(path):  # TensorStore's gcs driver -> its file driver on the same folder
        name, rest = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
        return {"driver": "file", "path": os.path.join(str(root), name, rest)}

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)  # would ask GCS
    # The metrics writer registers its epath event writer for gs://; put tensorboardX's own back afterwards.
    monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs", record_writer.REGISTERED_FACTORIES.get("gs"))
    return root


# ------------------------------------------------------------------------------------------------ shared inputs






@pytest.fixture(autouse=True)
def _no_xdg_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))


def _train_args(workdir, corpus, data_dir, tokenizer, *, config, steps, extra=()):
    return [
        "--config", config, "--workdir", str(workdir), "--data", corpus, "--tokenizer", tokenizer,
        "--steps", str(steps), "--batch-size", "8", "--seq-len", "32",
        "--set", "model.dim=32", "model.num_layers=1", "model.vocab_size=300", "train.log_every=1",
        "train.eval_batches=2", "train.sample_tokens=0", "train.checkpoint_every=2", f"train.data_dir={data_dir}",
        "train.memory_stats=false",
        *extra,
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------ workdirs anywhere
def test_a_workdir_on_a_bucket_trains_resumes_samples_and_exports(tmp_path, monkeypatch, capsys, bucket, corpus,
                                                                 data_dir, sp_model):
    cwd = tmp_path / "cwd"  # where a URL mistaken for a local path would land
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run, exported = "gs://bkt/runs/a", "gs://bkt/exports/a"

    assert train_main(_train_args(run, corpus, data_dir, sp_model, config="tiny-transformer", steps=4)) == 0
    # Started again with more steps: config.json and the checkpoint are read back from the bucket, metrics continue.
    assert train_main(["--workdir", run, "--steps", "6"]) == 0
    assert "resumed from step 4 of gs://bkt/runs/a/checkpoints" in capsys.readouterr().err

    assert sample_main(["--workdir", run, "--prompt", "the king", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("the king")
    assert export_main(["--workdir", run, "--out", exported, "--dtype", "bfloat16"]) == 0
    assert f"exported step 6 of {run} to {exported} (bfloat16)" in capsys.readouterr().out
    assert sample_main(["--workdir", exported, "--prompt", "the king", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("the king")

    store = bucket / "bkt"
    steps = [(r["step"], "val_loss" in r) for r in read_metrics(store / "runs/a/metrics.jsonl")]
    assert steps == [(1, False), (2, False), (3, False), (4, False), (4, True), (5, False), (6, False), (6, True)]
    assert json.loads((store / "runs/a/config.json").read_text())["train"]["steps"] == 6
    assert len(list((store / "runs/a/tb").glob("events.out.tfevents.*"))) == 2  # one per run, written through epath
    assert (store / "runs/a/checkpoints/6/commit_success.txt").exists()  # orbax's GCS commit, not a rename
    assert (store / "exports/a/commit_success.txt").exists() and (store / "exports/a/tokenizer/sp300.model").exists()
    # The export's tokenizer was read from the bucket through a local cache copy named by its content.
    cached = list(pathlib.Path(os.environ["XDG_CACHE_HOME"]).rglob("sp300.model"))
    assert len(cached) == 1 and open(cached[0], "rb").read() == open(sp_model, "rb").read()
    # Nothing landed on the local disk under a folder named after the URL.
    local = [p for p in tmp_path.rglob("*") if not p.is_relative_to(bucket)]
    assert not [p for p in local if p.name in ("gs:", "bkt") or "gs:" in p.parts], local
    assert not os.path.exists("gs:") and list(cwd.iterdir()) == []


# ------------------------------------------------------------------------------------------------ export and load
_LOAD_CHILD = """
import sys
import numpy as np
import titans_jax

out_dir, prompt, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
for i, path in enumerate(paths):
    model, config, tokenizer = titans_jax.load_model(path)
    logits = np.asarray(model(np.asarray([tokenizer.encode(prompt)], np.int32)))
    np.save(f"{out_dir}/logits{i}.npy", logits)
    print(type(tokenizer).__name__, tokenizer.vocab_size, config.variant, config.vocab_size)
"""


@pytest.mark.slow
def test_export_loads_in_a_fresh_process_with_the_training_runs_logits(tmp_path, corpus, data_dir, sp_model):
    """Train a few steps (a memory variant: W_0's per-matrix list of parameters must round trip), export as float32
    and bfloat16, delete the run and its tokenizer file, then load both exports in a new process: float32 gives the
    logits of the training run's model (restored with its optimizer, as a resume would) to float precision;
    bfloat16 loads and runs close to them."""
    tokenizer = tmp_path / "tok.model"
    shutil.copy(sp_model, tokenizer)
    run = tmp_path / "run"
    # memory_remat_every=1 halves the memory backward's compile time (docs/architecture.md); the values are the same.
    assert train_main(_train_args(run, corpus, data_dir, str(tokenizer), config="tiny-lmm", steps=3,
                                  extra=("model.memory_remat_every=1",))) == 0

    # The training run's model: its whole train state (model and optimizer) restored the way a resume does.
    cfg = load_config(str(run / "config.json"))
    tx, _ = make_optimizer(cfg.train)
    from titans_jax.sharding import make_mesh

    mesh = make_mesh(None, devices=jax.local_devices())
    graphdef, abstract = abstract_train_state(titans_model_fn(cfg.model, cfg.train.seed), tx, mesh)
    with Checkpointer(run / "checkpoints", read_only=True) as ckpt:
        state, _ = ckpt.restore(3, abstract)
    from titans_jax.data import get_tokenizer

    ids = np.asarray([get_tokenizer(str(tokenizer)).encode(PROMPT)], np.int32)
    trained = np.asarray(model_of(graphdef, state)(ids))
    # load_model on the workdir itself reads the parameters alone and agrees.
    model, config, tok = titans_jax.load_model(run)
    np.testing.assert_array_equal(np.asarray(model(ids)), trained)
    assert config == cfg.model and tok.vocab_size == 300

    e32, e16, e2 = tmp_path / "export32", tmp_path / "export16", tmp_path / "export_step2"
    assert export_main(["--workdir", str(run), "--out", str(e32)]) == 0
    assert export_main(["--workdir", str(run), "--out", str(e16), "--dtype", "bfloat16"]) == 0
    assert export_main(["--workdir", str(run), "--out", str(e2), "--step", "2"]) == 0
    assert [read_export_meta(e)["source"]["step"] for e in (e32, e16, e2)] == [3, 3, 2]
    assert [read_export_meta(e)["dtype"] for e in (e32, e16)] == ["float32", "bfloat16"]
    assert not np.array_equal(np.asarray(load_model(e2)[0](ids)), trained)
    # Parameters only: no optimizer state in the export, and bfloat16 halves the arrays.
    keys = json.loads((e32 / "params" / "_METADATA").read_text())["tree_metadata"]
    assert keys and not [k for k in keys if "opt_state" in k or "'mu'" in k]
    assert any("memory_init" in k for k in keys)

    def size(d):
        return sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and "tokenizer" not in p.parts)

    assert size(e16 / "params") < 0.75 * size(e32 / "params")
    with pytest.raises(ValueError, match="an export"):
        load_model(e32, step=3)

    # A fresh process, without the run, its tokenizer file or any data.
    shutil.rmtree(run)
    tokenizer.unlink()
    env = {**os.environ, "TITANS_JAX_DATA_DIR": str(tmp_path / "no_data"), "XLA_FLAGS": ""}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    proc = subprocess.run([sys.executable, "-c", _LOAD_CHILD, str(tmp_path), PROMPT, str(e32), str(e16)],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["SentencePieceTokenizer 300 lmm 300"] * 2
    logits32, logits16 = np.load(tmp_path / "logits0.npy"), np.load(tmp_path / "logits1.npy")
    scale = np.abs(trained).max()
    np.testing.assert_allclose(logits32, trained, rtol=0, atol=1e-6 * scale)
    assert np.isfinite(logits16).all() and logits16.shape == trained.shape
    assert 0 < np.abs(logits16 - trained).max() < 0.05 * scale  # the same parameters, rounded to bfloat16
    assert not (tmp_path / "no_data").exists()


def test_export_and_load_errors(tmp_path, capsys):
    assert export_main(["--workdir", str(tmp_path / "none"), "--out", str(tmp_path / "out")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert export_main(["--workdir", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2  # --out exists
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="neither a training workdir"):
        load_model(tmp_path)
