"""The trainer's command line beyond training itself: `--help` (every flag, the presets, the data sources),
`--dry-run` (resolves and compiles, writes nothing), `--profile-steps` (a jax.profiler trace whose ops carry the
model's named scopes), `--wandb` (offline W&B logging, resumed with the run; a clear error without the package), and
the paper's run files in experiments/train_configs/ (each loads and resolves to the paper's recipe).

Training runs are in-process and tiny (one layer of width 32), so each compiles in seconds.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any backend use; conftest sets the same

import glob  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import types  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from titans_jax import TitansLM  # noqa: E402
from titans_jax.configs import PAPER_SIZES, PRESET_PEAK_LR, PRESETS  # noqa: E402
from titans_jax.data import SYNTHETIC_TASKS  # noqa: E402
from titans_jax.train.__main__ import FLAG_FIELDS, build_parser  # noqa: E402
from titans_jax.train.__main__ import main as train_main  # noqa: E402
from titans_jax.train.config import (  # noqa: E402
    TrainConfig,
    apply_overrides,
    load_config,
    parse_profile_steps,
    valid_keys,
)
from titans_jax.train.metrics import MetricsWriter, StepProfiler, WandbLogger, read_metrics  # noqa: E402
from titans_jax.train.trainer import check_placeholders  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_FILES = sorted(glob.glob(os.path.join(REPO, "experiments", "train_configs", "*.json")))
TINY_MODEL = ["model.dim=32", "model.num_layers=1"]






def _args(workdir, corpus, *extra_set, config="tiny-transformer", steps=3, flags=()):
    return [
        "--config", config, "--workdir", str(workdir), "--data", corpus, "--steps", str(steps),
        "--batch-size", "8", "--seq-len", "32", *flags,
        "--set", *TINY_MODEL, "train.log_every=1", "train.eval_batches=1", "train.sample_tokens=0", *extra_set,
        "train.memory_stats=false",
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------------ --help
def test_help_documents_every_flag_the_presets_and_the_data_sources(capsys):
    parser = build_parser()
    for action in parser._actions:
        assert action.help and action.help.strip(), f"{action.option_strings} has no help"
    for flag in ("--mesh", "--set", "--profile-steps", "--wandb", "--coordinator", "--dry-run", "--data", "--tokenizer",
                 "--cpu-devices"):  # the non-obvious ones show an example
        (action,) = [a for a in parser._actions if flag in a.option_strings]
        assert "e.g." in action.help, flag
    assert all(key in valid_keys() for key in FLAG_FIELDS.values())

    with pytest.raises(SystemExit) as exit_:
        train_main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    for name in PRESETS:  # each preset: its size's line names its variant
        size, variant = name.split("-", 1)
        block = "\n".join(lines[next(i for i, line in enumerate(lines) if line.startswith(f"  {size}-{{")):][:3])
        assert variant.removesuffix("-matched") in block, name
        assert f"{PRESET_PEAK_LR[name]:g}" in block, name
        if variant.endswith("-matched"):
            assert f"{size}-{{...}}-matched" in block, name
    for source in ("shakespeare", "titans_jax.data.prepare", ".jsonl", *SYNTHETIC_TASKS):
        assert source in text, source
    assert "experiments/train_configs/" in text


def test_workdir_is_required_except_for_a_dry_run(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_main(["--config", "tiny-mac"])
    assert exit_.value.code == 2 and "--workdir is required" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ --dry-run
def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys, corpus):
    wd = tmp_path / "never"
    code = train_main(_args(wd, corpus, flags=("--dry-run", "--mesh", "data=4,tensor=2")))
    out = capsys.readouterr().out
    assert code == 0, out
    assert not wd.exists(), "a dry run wrote into the workdir"
    config = json.loads(out[out.index("{"):out.index("\n}\n") + 2])
    assert config["model"]["dim"] == 32 and config["train"]["mesh"] == "data=4,tensor=2"
    assert config["train"]["lr"] == PRESET_PEAK_LR["tiny-transformer"]  # resolved
    assert "mesh: {'data': 4, 'fsdp': 1, 'tensor': 2} over 8 cpu device(s)" in out
    assert "parameters: " in out and "train state (parameters + optimizer): " in out
    assert "memory per device (compiled.memory_analysis()): argument " in out and " temp " in out
    assert "batch: 8 x 32 = 256 tokens per step" in out and "a run would start afresh" in out
    assert "nothing was trained or written" in out

    from titans_jax.train.trainer import dry_run

    cfg = apply_overrides(load_config("tiny-transformer"), [*TINY_MODEL, "train.batch_size=8", "train.seq_len=32"])
    with open(os.devnull, "w") as devnull:
        result = dry_run(cfg, out=devnull)
    model = TitansLM(cfg.model, rngs=nnx.Rngs(0))
    assert result["params"] == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert result["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1} and result["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert result["step_memory_total"] > 0 and result["resume_step"] is None


# ------------------------------------------------------------------------------------------------ --profile-steps
def test_parse_profile_steps():
    assert parse_profile_steps("") is None
    assert parse_profile_steps("2:3") == (2, 3) and parse_profile_steps("5") == (5, 5)
    for bad in ("3:2", "0:1", "a:b", "1:", ":2"):
        with pytest.raises(ValueError, match="A:B"):
            parse_profile_steps(bad)
    with pytest.raises(ValueError, match="TrainConfig.profile_steps"):
        TrainConfig(profile_steps="4:1")
    assert apply_overrides(load_config("tiny-mac"), ["train.profile_steps=7"]).train.profile_steps == "7"


def test_step_profiler_traces_its_range_and_stages_other_dirs(tmp_path):
    """Steps outside the range run untraced; a staged trace (what a non-local workdir gets) lands in the target
    through epath and its local temporary folder is removed."""
    f = jax.jit(lambda x: jnp.sin(x) * 2)
    x = jnp.arange(8.0)
    f(x).block_until_ready()
    staging = os.path.join(tempfile.gettempdir(), "titans_jax_profile_*")
    staged_before = set(glob.glob(staging))
    with StepProfiler(tmp_path / "tb", (2, 3), stage_locally=True) as prof:
        for step in range(1, 6):
            with prof.step(step):
                assert prof.active == (2 <= step <= 3)
                y = f(x)
            prof.step_done(step, y)
            assert prof.active == (step == 2)
    names = [p.name for p in prof.written]
    assert any(n.endswith(".xplane.pb") for n in names) and "perfetto_trace.json.gz" in names
    assert all(p.exists() and str(p).startswith(str(tmp_path / "tb" / "plugins" / "profile")) for p in prof.written)
    assert set(glob.glob(staging)) == staged_before, "the local staging folder was left behind"

    with StepProfiler(tmp_path / "none", None) as prof:  # no range: a no-op
        with prof.step(1):
            pass
        assert not prof.active and not (tmp_path / "none").exists()


# ------------------------------------------------------------------------------------------------ W&B
class _FakeRun:
    def __init__(self, calls):
        self.calls = calls

    def define_metric(self, name, **kw):
        self.calls.append(("define_metric", name, kw))

    def log(self, record):
        self.calls.append(("log", record))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_logger_through_a_fake_module(tmp_path, monkeypatch):
    """The calls W&B gets, with a stand-in module (runs whether or not wandb is installed)."""
    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or _FakeRun(calls))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    writer = MetricsWriter(tmp_path, 0, wandb=WandbLogger("team/proj", "abc123", name="run", config={"a": 1},
                                                          directory=str(tmp_path)))
    writer.write(1, loss=2.5, lr=1e-3)
    writer.write(2, val_loss=float("nan"))
    writer.close()
    assert calls[0] == ("init", dict(project="proj", entity="team", id="abc123", resume="allow", name="run",
                                     config={"a": 1}, dir=str(tmp_path)))
    assert calls[1:3] == [("define_metric", "step", {}), ("define_metric", "*", {"step_metric": "step"})]
    assert calls[3] == ("log", {"step": 1, "loss": 2.5, "lr": 1e-3})
    assert calls[4][1]["step"] == 2 and np.isnan(calls[4][1]["val_loss"]) and calls[5] == ("finish",)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]  # the file is written as before
    assert WandbLogger("proj", "x").run is not None and calls[-3][1]["entity"] is None


def test_wandb_missing_is_a_clear_error_before_training(tmp_path, capsys, monkeypatch, corpus):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    code = train_main(_args(tmp_path / "wd", corpus, flags=("--wandb", "proj")))
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'titans_jax[wandb]'" in err, err
    assert not (tmp_path / "wd" / "checkpoints").exists()


def _wandb_records(run_file):
    """The strings of an offline W&B run file (a log of protobuf records): enough to find keys and values."""
    with open(run_file, "rb") as f:
        return f.read()


def test_profile_steps_and_wandb_offline_in_a_training_run(tmp_path, capsys, monkeypatch, corpus):
    """One tiny MAG run (attention and the memory): the trace of steps 2..3 is in WORKDIR/tb with the model's named
    scopes on its ops; the metrics go to an offline W&B run whose id the checkpoints keep, and a resumed run logs to
    the same W&B run."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wd = tmp_path / "run"
    args = _args(wd, corpus, "train.checkpoint_every=3", config="tiny-mag",
                 flags=("--profile-steps", "2:3", "--wandb", "titans-test"))
    assert train_main(args) == 0, capsys.readouterr().err

    traces = glob.glob(str(wd / "tb" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1 and glob.glob(str(wd / "tb" / "plugins" / "profile" / "*" / "perfetto_trace.json.gz"))
    with open(traces[0], "rb") as f:
        trace = f.read()
    for scope in ("memory_project", "memory_scan", "memory_output", "attention", "mlp"):  # memory_read: MAC's
        assert scope.encode() in trace, scope

    meta = json.loads((wd / "checkpoints" / "3" / "meta" / "metadata").read_text())
    run_id = meta["wandb_run_id"]
    (first,) = glob.glob(str(wd / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    data = _wandb_records(first)
    for key in (b"loss", b"grad_norm", b"tokens_per_s", b"val_bpb", b"titans-test", b"tiny-mag"):
        assert key in data, key

    assert train_main([*args[:args.index("--steps")], "--steps", "4", *args[args.index("--steps") + 2:]]) == 0
    runs = glob.glob(str(wd / "wandb" / "offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(run_id) for r in runs), runs  # the same W&B run, resumed
    assert [r["step"] for r in read_metrics(wd / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    assert len(glob.glob(str(wd / "tb" / "plugins" / "profile" / "*" / "*.xplane.pb"))) == 1  # 2:3 is behind it


# ------------------------------------------------------------------------------------------------ run files
PAPER_TOKENS = {"170m": 15e9, "340m": 15e9, "760m": 30e9, "1.3b": 100e9}  # the revision's Table 5


def test_every_paper_run_file_loads_and_resolves_to_the_papers_recipe():
    names = {os.path.basename(f) for f in RUN_FILES}
    assert names >= {f"paper-{s}-{v}.json" for s in PAPER_SIZES for v in ("mac", "mag", "mal", "lmm", "transformer")}
    for path in RUN_FILES:
        size, variant = os.path.basename(path)[len("paper-"):-len(".json")].split("-", 1)
        cfg = load_config(path)
        assert cfg.preset == f"{size}-{variant}" and cfg.model == PRESETS[cfg.preset], path
        cfg = cfg.resolved()
        t, m = cfg.train, cfg.model
        assert t.lr == PRESET_PEAK_LR[cfg.preset], path
        assert t.batch_size * t.seq_len == 2**19 and t.seq_len == 4096 == m.max_seq_len, path  # 0.5M tokens, 4K
        assert abs(t.steps * 2**19 / PAPER_TOKENS[size] - 1) < 1e-3, path
        assert (t.weight_decay, t.b1, t.b2, t.min_lr_ratio, t.clip) == (0.1, 0.9, 0.95, 0.1, 1.0), path
        assert m.dtype == "bfloat16" and m.vocab_size == 32000 and m.variant == variant, path
        if variant in ("mag", "mal"):
            assert m.window == 2048, path
        with pytest.raises(ValueError, match="pass --data DIR"):
            check_placeholders(cfg)
        given = apply_overrides(cfg, ['train.data="/data/fw"', 'train.tokenizer="/data/fw"'])
        check_placeholders(given)


def test_a_run_file_without_data_stops_before_anything_is_written(tmp_path, capsys):
    code = train_main(["--config", RUN_FILES[0], "--workdir", str(tmp_path / "wd"), "--tokenizer", "bytes"])
    err = capsys.readouterr().err
    assert code == 2 and "train.data is the run file's placeholder" in err and "pass --data DIR" in err, err
    assert not (tmp_path / "wd").exists()
