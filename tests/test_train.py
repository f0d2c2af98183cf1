"""Trainer: optimiser, overrides, sharded step = single-device step, resume after kill -9 / SIGTERM equals an
uninterrupted run (the SigtermHandler path), JAX's preemption sync point saves and resumes, bad input refused before
training, NaN stops with the last good checkpoint kept or (train.nonfinite="skip") is skipped and counted, each
preset's learning rate and the paper-preset warnings, sampling.

CLI runs go through subprocesses (a fresh JAX per run, as a user runs it) sharing one persistent compilation cache,
so the identical programs of the resume test compile once. Tiny shapes keep each run to seconds.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any backend use; conftest sets the same

import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import chex  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from titans_jax import distributed, sharding  # noqa: E402
from titans_jax.configs import get_config  # noqa: E402
from titans_jax.sample import main as sample_main  # noqa: E402
from titans_jax.train import step as step_lib  # noqa: E402
from titans_jax.train.__main__ import main as train_main  # noqa: E402
from titans_jax.train.config import RunConfig, TrainConfig, apply_overrides, load_config, parse_value  # noqa: E402
from titans_jax.train.metrics import read_metrics  # noqa: E402
from titans_jax.train.optim import decay_mask, make_optimizer, make_schedule  # noqa: E402
from titans_jax.train.state import abstract_train_state, create_train_state, titans_model_fn  # noqa: E402

# A model small enough to compile in seconds: one layer of width 32 (4 heads of 8).
TINY_MODEL = ["model.dim=32", "model.num_layers=1"]







@pytest.fixture(scope="session")
def jit_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jit_cache"))






def _cli_args(workdir, corpus, data_dir, *extra_set, config="tiny-mac", steps=4, batch=8, seq_len=32, flags=()):
    return [
        "--config", config, "--workdir", str(workdir), "--data", corpus, "--steps", str(steps),
        "--batch-size", str(batch), "--seq-len", str(seq_len), *flags,
        "--set", *TINY_MODEL, "train.log_every=1", "train.eval_batches=2", "train.sample_tokens=0",
        "train.memory_stats=false",
        f"train.data_dir={data_dir}", *extra_set,
    ]  # fmt: skip


def _env(jit_cache, **extra):
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": jit_cache, "XLA_FLAGS": "", **extra}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    return env


def _popen(args, jit_cache, **kw):
    return subprocess.Popen([sys.executable, "-m", "titans_jax.train", *args], env=_env(jit_cache),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _run(args, jit_cache, timeout=180):
    p = _popen(args, jit_cache)
    out = p.communicate(timeout=timeout)[0]
    return p.returncode, out


def _train_records(workdir):
    """metrics.jsonl without the wall-clock field, for comparing runs."""
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


def _assert_same_metrics(a, b, atol):
    assert [sorted(r) for r in a] == [sorted(r) for r in b], "different records"
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        for k in ra:
            np.testing.assert_allclose(ra[k], rb[k], rtol=atol, atol=atol, err_msg=f"step {ra['step']} {k}")


# ------------------------------------------------------------------------------------------------ optimiser
def test_schedule_warmup_cosine_to_ten_percent():
    sched = make_schedule(TrainConfig(lr=1.0, steps=110, warmup=10))
    lrs = np.array([float(sched(i)) for i in range(120)])
    np.testing.assert_allclose(lrs[:10], np.arange(1, 11) / 10, rtol=1e-6)  # linear warm-up, none wasted at 0
    assert np.all(np.diff(lrs[10:110]) <= 1e-7)  # cosine decay
    np.testing.assert_allclose(lrs[60], 0.1 + 0.9 * 0.5, rtol=1e-5)  # half way: mid of peak and floor
    np.testing.assert_allclose(lrs[110:], 0.1, rtol=1e-6)  # floor: 10% of the peak
    short = make_schedule(TrainConfig(lr=1.0, steps=4, warmup=100))  # warm-up capped at the run length
    assert float(short(3)) == pytest.approx(1.0)


def test_decay_mask_on_the_real_model():
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(titans_model_fn(get_config("tiny-mac"), 0))
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(
        decay_mask(nnx.as_pure(nnx.state(model, nnx.Param))))}
    off = {p for p, m in flat.items() if not m}
    assert any("norm" in p for p in off) and any("bias" in p for p in off) and any("persistent" in p for p in off)
    assert any("memory_init" in p for p in off)  # W_0 (docs/architecture.md, "Training stability")
    assert all(any(k in p for k in ("norm", "bias", "persistent", "memory_init")) for p in off)
    assert flat["['embed']"] and flat["['unembed']"]


def test_adamw_settings():
    tx, _ = make_optimizer(TrainConfig(lr=1e-3, steps=10, warmup=0, clip=1.0))
    params = {"w": jnp.ones((3,)), "norm": jnp.ones((3,))}
    state = tx.init(params)
    updates, _ = tx.update({"w": jnp.zeros((3,)), "norm": jnp.zeros((3,))}, state, params)
    # Zero gradient: only decoupled weight decay moves w (by lr * 0.1 * w); the norm scale is not decayed.
    np.testing.assert_allclose(updates["w"], -1e-3 * 0.1 * np.ones(3), rtol=1e-5)
    np.testing.assert_allclose(updates["norm"], 0.0)


# ------------------------------------------------------------------------------------------------ config
def test_overrides_parse_and_apply():
    cfg = apply_overrides(load_config("tiny-mac"), [
        "model.dim=64", "train.lr=1e-3", "model.variant=mag", "train.clip=null", "train.data_dir=None",
        "train.sample_prompt=123", "warmup=7",
    ])  # fmt: skip
    assert cfg.model.dim == 64 and cfg.model.variant == "mag"
    assert cfg.train.lr == 1e-3 and cfg.train.clip is None and cfg.train.data_dir is None
    assert cfg.train.sample_prompt == "123" and cfg.train.warmup == 7
    assert apply_overrides(cfg, ["train.lr=1"]).train.lr == 1.0  # int accepted for a float field
    # Never evaluated: a would-be expression stays a string.
    assert parse_value("__import__('os').getcwd()") == "__import__('os').getcwd()"


@pytest.mark.parametrize(
    "item, match",
    [
        ("model.nope=1", r"unknown key 'model.nope'.*model\.dim.*train\.lr"),
        ("nope=1", "unknown key 'nope'"),
        ("model.dim", "expected key=value"),
        ("model.dim=abc", "expected int"),
        ("train.steps=1.5", "expected int"),
        ("model.dim=true", "expected int"),
        ("model.dim=30", "divisible by num_heads"),
    ],
)
def test_override_errors(item, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(load_config("tiny-mac"), [item])


def test_config_round_trip_and_default_lr(tmp_path):
    cfg = apply_overrides(load_config("tiny-mag"), ["model.dim=64", "train.steps=9"]).resolved()
    assert cfg.train.lr == 3e-3  # tiny models: the tuned default
    assert load_config("170m-mac").resolved().train.lr == 3e-3 and load_config("340m-mac").resolved().train.lr == 1.5e-3
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert load_config(str(path)) == cfg
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        RunConfig.from_dict({"model": "tiny-mac", "train": {"stepz": 1}})


# ------------------------------------------------------------------------------------------------ steps
def _batch(batch_size=8, seq_len=32, vocab=256, seed=0):
    return {"tokens": np.random.default_rng(seed).integers(0, vocab, (batch_size, seq_len + 1)).astype(np.int32)}


def _one_step(mesh, model_cfg, train_cfg, batches):
    tx, schedule = make_optimizer(train_cfg)
    model_fn = titans_model_fn(model_cfg, 0)
    graphdef, abstract = abstract_train_state(model_fn, tx, mesh)
    _, state, _ = create_train_state(model_fn, tx, mesh)
    fn = step_lib.compile_train_step(
        step_lib.make_train_step(graphdef, schedule, train_cfg.grad_accum, mesh=mesh), abstract,
        step_lib.abstract_batch(mesh, train_cfg.batch_size, train_cfg.seq_len, False), mesh)
    metrics = []
    for b in batches:
        state, m = fn(state, distributed.global_batch_from_local(b, mesh))
        metrics.append(jax.device_get(m))
    return state, metrics, fn


@pytest.mark.slow
def test_sharded_step_equals_single_device_step():
    """data=2, fsdp=2, tensor=2 on 8 devices gives the single-device loss, gradient norm and parameters."""
    model_cfg = get_config("tiny-mac", dim=32, num_layers=1)
    # Adam's first steps are sign-like (g / (|g| + eps)): with the default eps = 1e-8, a weight whose gradient is
    # ~1e-9 moves by a full +-lr step on float rounding alone, so the two runs' parameters can differ by ~lr for
    # reasons unrelated to sharding. eps = 1e-3 keeps the whole step (AdamW, decay mask, clipping, schedule) while
    # making the comparison well conditioned (measured: 3e-7).
    train_cfg = TrainConfig(lr=3e-3, steps=10, warmup=0, batch_size=8, seq_len=32, eps=1e-3)
    batches = [_batch(seed=i) for i in range(2)]
    mesh8 = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    state8, m8, fn8 = _one_step(mesh8, model_cfg, train_cfg, batches)
    state1, m1, _ = _one_step(sharding.make_mesh(None, devices=jax.devices()[:1]), model_cfg, train_cfg, batches)
    for a, b in zip(m8, m1, strict=True):
        for k in ("loss", "grad_norm", "lr"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    chex.assert_trees_all_close(jax.device_get(state8), jax.device_get(state1), rtol=1e-5, atol=1e-5)
    # The parameters really are split: a projection kernel is sharded over fsdp and tensor.
    specs = {jax.tree_util.keystr(p): x.sharding.spec for p, x in jax.tree_util.tree_leaves_with_path(state8[0])}
    assert any("fsdp" in str(s) and "tensor" in str(s) for s in specs.values()), specs
    assert step_lib.memory_report(fn8)["temp"] > 0  # the ahead-of-time memory analysis the loop logs


def test_grad_accumulation_equals_full_batch():
    mesh = sharding.make_mesh(None, devices=jax.devices()[:1])
    model_cfg = get_config("tiny-transformer", dim=32, num_layers=1)
    base = TrainConfig(lr=3e-3, steps=10, warmup=0, batch_size=8, seq_len=16)
    batches = [_batch(seq_len=16, seed=3)]
    s1, m1, _ = _one_step(mesh, model_cfg, base, batches)
    s2, m2, _ = _one_step(mesh, model_cfg, base.replace(grad_accum=2), batches)
    np.testing.assert_allclose(m1[0]["loss"], m2[0]["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1[0]["grad_norm"], m2[0]["grad_norm"], rtol=1e-5)
    chex.assert_trees_all_close(jax.device_get(s1), jax.device_get(s2), rtol=1e-5, atol=1e-6)


def test_non_finite_step_keeps_the_state():
    mesh = sharding.make_mesh(None, devices=jax.devices()[:1])
    model_cfg = get_config("tiny-transformer", dim=32, num_layers=1)
    cfg = TrainConfig(lr=1e30, steps=10, warmup=0, batch_size=4, seq_len=16)
    tx, schedule = make_optimizer(cfg)
    model_fn = titans_model_fn(model_cfg, 0)
    graphdef, state, _ = create_train_state(model_fn, tx, mesh)
    fn = jax.jit(step_lib.make_train_step(graphdef, schedule))
    b = {"tokens": jnp.asarray(_batch(4, 16)["tokens"])}
    for _ in range(4):
        before = jax.device_get(state)
        state, m = fn(state, b)
        if not m["ok"]:
            break
        assert np.isfinite(m["loss"])
    assert not m["ok"]  # the huge learning rate overflows the parameters within a few steps
    chex.assert_trees_all_equal(jax.device_get(state), before)  # the bad update was dropped in-graph
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state)))


def test_token_byte_lengths_for_bits_per_byte(sp_model):
    from titans_jax.data import get_tokenizer

    assert step_lib.token_byte_lengths(get_tokenizer("bytes")) is None  # one byte per token: bpb = loss / ln 2
    tok = get_tokenizer(sp_model)
    table = step_lib.token_byte_lengths(tok)
    for text in ("the king doth love my sweet queen and thou art good", "Zebra\n\u00e9t\u00e9 {x}"):  # + byte fallback
        ids = tok.encode(text)
        assert abs(table[ids].sum() - len(text.encode())) <= 1, text  # up to the leading word-boundary space


# ------------------------------------------------------------------------------------------------ CLI: bad input
def _main_error(capsys, args):
    code = train_main(args)
    return code, capsys.readouterr().err


def test_cli_bad_inputs_are_caught_before_training(tmp_path, capsys, corpus, data_dir):
    def run(*extra_set, data=corpus, flags=()):
        wd = tmp_path / f"wd{len(list(tmp_path.iterdir()))}"
        code, err = _main_error(capsys, _cli_args(wd, data, data_dir, *extra_set, config="tiny-transformer",
                                                  flags=flags))
        assert not (wd / "checkpoints").exists() or not os.listdir(wd / "checkpoints"), "trained anyway"
        return code, err

    code, err = run(data=str(tmp_path / "missing.txt"))
    assert code == 2 and "does not exist" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    code, err = run(data=str(empty))
    assert code == 2 and "empty" in err
    code, err = run("model.vocab_size=100")
    assert code == 2 and "256 tokens but model.vocab_size=100" in err
    code, err = run(flags=("--mesh", "data=3"))
    assert code == 2 and "--mesh" in err and "8 devices" in err
    code, err = run("model.dimm=3")
    assert code == 2 and "unknown key 'model.dimm'" in err and "train.lr" in err
    code, err = run(flags=("--mesh", "data=4,fsdp=2", "--batch-size", "6"))
    assert code == 2 and "not divisible" in err


def test_cli_sentencepiece_vocab_larger_than_model(tmp_path, capsys, corpus, data_dir, sp_model):
    code, err = _main_error(capsys, _cli_args(tmp_path / "wd", corpus, data_dir, config="tiny-transformer",
                                              flags=("--tokenizer", sp_model)))
    assert code == 2 and "300 tokens but model.vocab_size=256" in err and "model.vocab_size=300" in err


def test_cli_nan_stops_and_keeps_last_good_checkpoint(tmp_path, capsys, corpus, data_dir):
    wd = tmp_path / "nan"
    code, err = _main_error(capsys, _cli_args(wd, corpus, data_dir, "train.lr=1e30", "train.warmup=0",
                                              "train.checkpoint_every=1", config="tiny-transformer", steps=6))
    assert code == 1 and "non-finite training" in err, err
    bad_step = int(err.split(" at step ")[1].split(":")[0])
    steps = sorted(int(d) for d in os.listdir(wd / "checkpoints") if d.isdigit())
    assert steps and max(steps) == bad_step - 1 and f"Last good checkpoint: step {bad_step - 1}" in err
    records = read_metrics(wd / "metrics.jsonl")
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r) and max(r["step"] for r in records) < bad_step


# ------------------------------------------------------------------------------------------------ CLI: resume
def _steps_in(ckpt_dir):
    return [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []


def _wait_for_new_checkpoint(proc, ckpt_dir, timeout=150):
    """Waits until the run commits a checkpoint newer than those present now (so its loop, and its SIGTERM
    handler, are running), without letting it finish."""
    before = max(_steps_in(ckpt_dir), default=0)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before it could be interrupted:\n{proc.communicate()[0][-3000:]}")
        if max(_steps_in(ckpt_dir), default=0) > before:
            return
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
def test_resume_after_kill_and_sigterm_equals_uninterrupted_then_sample(tmp_path, capsys, corpus, data_dir, jit_cache):
    """kill -9, resume, SIGTERM, resume: metrics.jsonl equals an uninterrupted run's. Then the finished run, started
    again, only reports (final bpb and a sample), and python -m titans_jax.sample restores it and generates."""
    # 40 steps with a checkpoint every 5: each interruption below comes right after a checkpoint appears, with 25 or
    # more steps (each a few ms, plus saves and evaluations) still to go, so the run cannot finish first.
    steps = 40
    extra = ("train.checkpoint_every=5", "train.eval_every=10")

    def args(workdir, *more):
        return _cli_args(workdir, corpus, data_dir, *extra, *more, config="tiny-transformer", steps=steps)

    ref, run = tmp_path / "ref", tmp_path / "run"
    code, out = _run(args(ref), jit_cache)
    assert code == 0, out[-3000:]
    assert f"final validation at step {steps}" in out

    # 1. kill -9 once a checkpoint exists; metrics lines after it must not survive the resume.
    p = _popen(args(run), jit_cache)
    _wait_for_new_checkpoint(p, run / "checkpoints")
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert p.returncode == -signal.SIGKILL
    # A half-written save (what a kill mid-save leaves) must be ignored.
    fake = run / "checkpoints" / f"{steps - 5}.orbax-checkpoint-tmp"  # a step the resumed run saves again
    fake.mkdir(parents=True)
    (fake / "junk").write_text("partial")

    # 2. resume (automatically), then SIGTERM: it saves where it stands and exits cleanly.
    p = _popen(args(run), jit_cache)
    _wait_for_new_checkpoint(p, run / "checkpoints")
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0, out[-3000:]
    assert "resumed from step" in out and "stopped by signal" in out

    # 3. resume to the end.
    code, out = _run(args(run), jit_cache)
    assert code == 0, out[-3000:]
    assert "resumed from step" in out and f"final validation at step {steps}" in out
    assert not fake.exists()
    _assert_same_metrics(_train_records(ref), _train_records(run), atol=1e-6)
    assert len(_train_records(ref)) == steps + steps // 10

    # 4. A finished run started again (config from its config.json) only reports: no metrics are added.
    code, out = _run(["--workdir", str(run), "--set", "train.sample_tokens=8", "train.sample_prompt='the king'"],
                     jit_cache)
    assert code == 0 and f"final validation at step {steps}" in out and "sample:\nthe king" in out, out[-3000:]
    assert len(_train_records(run)) == steps + steps // 10
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["dim"] == 32 and cfg["train"]["steps"] == steps and cfg["train"]["lr"] == 3e-3

    # 5. Sampling from the workdir.
    p = subprocess.run([sys.executable, "-m", "titans_jax.sample", "--workdir", str(run), "--prompt", "the king",
                        "--max-new-tokens", "8", "--top-k", "5", "--seed", "1"],
                       env=_env(jit_cache), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.startswith("the king") and len(p.stdout.encode()) > len("the king")
    # A directory that is not a workdir: refused before anything is built (in-process: no JAX program runs).
    capsys.readouterr()
    assert sample_main(["--workdir", str(tmp_path / "none")]) == 2 and "config.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ presets: lr, warnings
def test_each_preset_carries_its_learning_rate_and_nothing_is_guessed():
    from titans_jax.configs import PRESET_PEAK_LR, PRESETS, ModelConfig

    assert set(PRESET_PEAK_LR) == set(PRESETS)
    for name, lr in {"tiny-mac": 3e-3, "170m-lmm": 3e-3, "340m-mag-matched": 1.5e-3, "760m-deltanet": 1.25e-3,
                     "1.3b-transformer": 7e-4}.items():
        assert PRESET_PEAK_LR[name] == lr and load_config(name).resolved().train.lr == lr, name
    # The preset's rate survives overrides of the shape (a 1.3b preset made narrower keeps 7e-4) ...
    assert apply_overrides(load_config("1.3b-mac"), ["model.dim=256"]).resolved().train.lr == 7e-4
    # ... an explicit rate wins, a run file names its preset as model or base, and config.json keeps it.
    assert apply_overrides(load_config("170m-mac"), ["train.lr=1e-4"]).resolved().train.lr == 1e-4
    assert RunConfig.from_dict({"model": {"base": "340m-mag", "dim": 64}}).resolved().train.lr == 1.5e-3
    cfg = load_config("760m-mal").resolved()
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg and cfg.preset == "760m-mal"
    # A model given by its fields has no stored rate: never guessed from its shape, even the paper's 170M shape.
    shaped_like_170m = get_config("170m-mac").to_dict()
    for cfg in (RunConfig(ModelConfig(), TrainConfig()), RunConfig.from_dict({"model": shaped_like_170m})):
        with pytest.raises(ValueError, match="train.lr is not set and the model is not a preset"):
            cfg.resolved()
    assert RunConfig.from_dict({"model": shaped_like_170m, "train": {"lr": 2e-3}}).resolved().train.lr == 2e-3


def test_paper_preset_with_bytes_or_the_tiny_corpus_warns(caplog, corpus):
    from titans_jax.train.config import setup_warnings
    from titans_jax.train.trainer import check_setup

    both = setup_warnings(load_config("170m-mac"))  # defaults: bytes and shakespeare
    assert len(both) == 2 and "'bytes'" in both[0] and "'shakespeare'" in both[1]
    assert len(setup_warnings(apply_overrides(load_config("1.3b-lmm-matched"), [f"train.data={corpus}"]))) == 1
    assert setup_warnings(apply_overrides(load_config("340m-mag"), [f"train.data={corpus}",
                                                                    "train.tokenizer=sp.model"])) == []
    assert setup_warnings(load_config("tiny-mac")) == []  # the tiny presets are meant for bytes and Shakespeare
    # The trainer logs them when it checks the settings (before any data or model is built).
    with caplog.at_level("WARNING", logger="titans_jax.train"):
        check_setup(load_config("340m-transformer").resolved(), sharding.make_mesh(None), _ByteTok())
    assert sum("one of the paper's sizes" in r.getMessage() for r in caplog.records) == 2


class _ByteTok:
    vocab_size = 256


# ------------------------------------------------------------------------------------------------ non-finite: skip
def _nan_mask_batch(seed, poisoned, batch_size=4, seq_len=16):
    """A batch with a loss mask; a NaN mask makes the loss and every gradient NaN without touching the model."""
    b = _batch(batch_size, seq_len, seed=seed)
    b["mask"] = np.full((batch_size, seq_len), np.nan if poisoned else 1.0, np.float32)
    return b


def test_skip_mode_skips_non_finite_steps_up_to_the_limit():
    """train.nonfinite="skip": a step with NaN gradients leaves the state as it was (parameters, moments, AdamW's
    count) and is counted; the count limit lets the next one through, which the step then refuses (ok = False)."""
    mesh = sharding.make_mesh(None, devices=jax.devices()[:1])
    model_cfg = get_config("tiny-transformer", dim=32, num_layers=1)
    cfg = TrainConfig(lr=1e-3, steps=10, warmup=2, batch_size=4, seq_len=16, nonfinite="skip",
                      max_consecutive_nonfinite=2)
    tx, schedule = make_optimizer(cfg)
    graphdef, state, _ = create_train_state(titans_model_fn(model_cfg, 0), tx, mesh)
    fn = jax.jit(step_lib.make_train_step(graphdef, schedule, skip_nonfinite=True))
    poisoned = [False, True, True, False, True, True, True]
    params = lambda s: jax.device_get(s[0])  # noqa: E731
    seen, lrs = [], []
    for i, bad in enumerate(poisoned):
        before = jax.device_get(state)
        state, m = fn(state, {k: jnp.asarray(v) for k, v in _nan_mask_batch(i, bad).items()})
        m = jax.device_get(m)
        seen.append((bool(m["ok"]), int(m["skipped"]), int(m["skipped_total"])))
        lrs.append(float(m["lr"]))
        if bad and m["ok"]:  # skipped: the model and the optimizer's moments are untouched
            chex.assert_trees_all_equal(params(state), params(before))
            chex.assert_trees_all_equal(jax.device_get(state[1]["opt_state"].inner_state),
                                        jax.device_get(before[1]["opt_state"].inner_state))
        if not bad:
            assert not jax.tree.all(jax.tree.map(np.array_equal, params(state), params(before)))
    # Steps 2-3 skipped (2 in a row = the limit); step 4 trains; 5-6 skipped; the 3rd in a row (7) is let through by
    # apply_if_finite, overflows the parameters and is refused in-graph: the state stays that of step 6.
    assert seen == [(True, 0, 0), (True, 1, 1), (True, 1, 2), (True, 0, 2), (True, 1, 3), (True, 1, 4), (False, 0, 5)]
    chex.assert_trees_all_equal(jax.device_get(state), before)
    # The learning rate follows applied updates only: step 4 is the 2nd applied update, so it used the schedule's 2nd
    # value (the end of the warm-up: the peak), not the 4th.
    assert lrs[0] == pytest.approx(float(schedule(0))) and lrs[3] == pytest.approx(float(schedule(1))) == 1e-3


class _PoisonedData:
    """Resumable batches {"tokens", "mask"} whose mask is NaN at the given 1-based steps (what `train(data=...)`
    takes: `next`, `get_state`, `set_state`)."""

    def __init__(self, poisoned_steps, batch_size=8, seq_len=32):
        self.poisoned, self.i, self.shape = set(poisoned_steps), 0, (batch_size, seq_len)

    def __next__(self):
        self.i += 1
        return _nan_mask_batch(self.i, self.i in self.poisoned, *self.shape)

    def get_state(self):
        return {"i": self.i}

    def set_state(self, s):
        self.i = s["i"]


def _skip_run_config(steps, *extra):
    cfg = apply_overrides(load_config("tiny-transformer"), [
        *TINY_MODEL, f"train.steps={steps}", "train.batch_size=8", "train.seq_len=32", "train.log_every=1",
        "train.eval_every=0", "train.checkpoint_every=2", "train.sample_tokens=0", "train.nonfinite=skip",
        "train.data=mqar", *extra])  # fmt: skip
    return cfg, [_nan_mask_batch(100, False, 8, 32)]


def test_trainer_skips_non_finite_steps_and_counts_them(tmp_path):
    """The trainer goes on past skipped steps, writing the running count in every metrics record; past the limit it
    stops like the stop mode, keeping the last good checkpoint."""
    from titans_jax.train.trainer import TrainingDiverged, train

    cfg, eval_data = _skip_run_config(6)
    result = train(cfg, tmp_path / "skip", data=(_PoisonedData({2, 4, 5}), eval_data))
    assert result["status"] == "done" and math.isfinite(result["val_loss"])
    records = [r for r in read_metrics(tmp_path / "skip" / "metrics.jsonl") if "loss" in r]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 2, 3, 3]
    assert [math.isfinite(float(r["loss"])) for r in records] == [True, False, True, False, False, True]  # "nan"

    cfg, eval_data = _skip_run_config(6, "train.max_consecutive_nonfinite=1")
    with pytest.raises(TrainingDiverged, match=r"more than train.max_consecutive_nonfinite=1 .* at step 5:.*"
                                               r"Last good checkpoint: step 4"):
        train(cfg, tmp_path / "stop", data=(_PoisonedData({4, 5}), eval_data))


# ------------------------------------------------------------------------------------------------ preemption: JAX's path
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_preemption_sync_point_saves_and_resumes(tmp_path, corpus, data_dir, jit_cache):
    """With jax.distributed (here one process with a coordinator), SIGTERM goes to JAX's preemption notifier, not to a
    Python handler: the loop asks orbax's reached_preemption at every step, saves the sync-point step and exits 0,
    and the next run resumes from that checkpoint. (test_resume_after_kill_and_sigterm_... covers the other path: a
    single process without jax.distributed, where SigtermHandler records the signal.)"""
    run = tmp_path / "run"
    steps = 2000  # the sync point comes about a second after the signal: far fewer steps than this
    for attempt in range(3):
        # A free port can be taken by another test's process before the coordinator binds it: then try another.
        flags = ("--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "1", "--process-id", "0")
        p = _popen(_cli_args(run, corpus, data_dir, "train.checkpoint_every=50", "train.eval_every=0",
                             config="tiny-transformer", steps=steps, flags=flags), jit_cache)
        try:
            _wait_for_new_checkpoint(p, run / "checkpoints")
            break
        except AssertionError as e:
            if attempt == 2 or "Failed to start RPC server" not in str(e):
                raise
    p.send_signal(signal.SIGTERM)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 0, out[-3000:]
    assert "preemption: JAX's preemption sync point" in out
    stopped = int(out.split("stopped by JAX's preemption sync point at step ")[1].split()[0])
    assert 50 < stopped < steps and max(_steps_in(run / "checkpoints")) == stopped
    assert max(r["step"] for r in read_metrics(run / "metrics.jsonl")) == stopped

    code, out = _run(_cli_args(run, corpus, data_dir, "train.checkpoint_every=50", "train.eval_every=0",
                               config="tiny-transformer", steps=stopped + 1, flags=("--resume",)), jit_cache)
    assert code == 0 and f"resumed from step {stopped}" in out and f"final validation at step {stopped + 1}" in out, out


def test_a_checkpoint_of_another_layout_is_refused_clearly_but_its_parameters_still_load(tmp_path):
    """A train state saved with an optimizer not wrapped in apply_if_finite (before train.nonfinite existed) cannot
    be resumed (a clear error, not orbax's tree diff alone), but its model parameters still restore (load_model,
    export)."""
    import optax

    from titans_jax.checkpoint import Checkpointer
    from titans_jax.train.state import abstract_model, model_part
    from titans_jax.train.trainer import restore

    cfg = apply_overrides(load_config("tiny-transformer"), TINY_MODEL).resolved()
    mesh = sharding.make_mesh(None, devices=jax.devices()[:1])
    model_fn = titans_model_fn(cfg.model, 0)
    old_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    _, old_state, _ = create_train_state(model_fn, old_tx, mesh)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, old_state, {"step": 1, "config": cfg.to_dict(), "data": {}})
    _, abstract = abstract_train_state(model_fn, make_optimizer(cfg.train)[0], mesh)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match="another layout .* cannot be resumed"):
            restore(ckpt, 1, abstract, cfg, None)
        _, model_target = abstract_model(model_fn)
        params = ckpt.restore_subtree(1, model_part(model_target))[0]
    chex.assert_trees_all_equal(params, jax.device_get(old_state[0]))
