"""python -m titans_jax.plot: curves and memory statistics of synthetic metrics.jsonl files into PNGs; clear errors."""

import json

import pytest

pytest.importorskip("matplotlib")

from titans_jax.plot import load_run, main, plot_runs  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(path, layers, scale=1.0):
    path.mkdir(parents=True)
    lines = []
    for step in (10, 20, 30):
        rec = {"step": step, "loss": scale * 5 / step, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 5000.0}
        for layer in range(layers):
            rec.update({f"memory/layer{layer}/{k}": v for k, v in dict(
                theta=0.05, eta=0.9, alpha=0.001 * step, loss_before=20.0 - step / 10, loss_after=18.0 - step / 10,
                w_norm=90.0 + step, s_norm=0.1).items()})
        lines.append(rec)
        if step % 20 == 0:
            lines.append({"step": step, "val_loss": scale * 4 / step, "val_bpb": scale * 6 / step})
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4')  # torn line


def test_two_runs_into_pngs(tmp_path, capsys):
    _write_run(tmp_path / "mac", layers=2)
    _write_run(tmp_path / "swa", layers=0, scale=1.5)  # no memory: curves only
    out = tmp_path / "plots"
    assert main([str(tmp_path / "mac"), str(tmp_path / "swa"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / "curves.png"), str(out / "memory.png")]
    for p in printed:
        with open(p, "rb") as f:
            assert f.read(8) == PNG_MAGIC
    run = load_run(str(tmp_path / "mac" / "metrics.jsonl"))  # the file itself works too
    assert run.name == "mac" and run.series("val_loss") == ([20], [0.2])
    assert run.memory_layers == [0, 1] and run.memory_series(1, "alpha") == ([10, 20, 30], [0.01, 0.02, 0.03])
    # Only the curves asked for; no memory statistics, no memory figure.
    assert [p.name for p in plot_runs([str(tmp_path / "swa")], tmp_path / "one", ["loss", "tokens_per_s"])] == [
        "curves.png"]


def test_errors_name_the_run_and_the_metric(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "has no metrics.jsonl" in err
    _write_run(tmp_path / "run", layers=1)
    with pytest.raises(ValueError, match="--metrics val_acc: not in any run's metrics.jsonl; available: .*val_bpb"):
        plot_runs([str(tmp_path / "run")], tmp_path / "out", ["val_acc"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match="holds no metrics record"):
        load_run(str(tmp_path / "empty"))
