"""notebooks/quickstart.ipynb runs top to bottom in QUICK mode (TITANS_NOTEBOOK_QUICK=1), committed without outputs,
and shows what it promises: a parameter count, a training curve, the accuracy table and heatmap, the memory
statistics, a greedy answer and stateful calls that agree with one call."""

import json
import pathlib
import re
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def _kernel_on_this_interpreter(root: pathlib.Path) -> None:
    """A python3 kernelspec on sys.executable, found first through JUPYTER_PATH (a user-wide python3 spec could point
    at another interpreter without titans_jax)."""
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (titans_jax tests)", "language": "python"}))


def _texts(nb) -> list[str]:
    """Every code cell's printed text (streams and text/plain results), one string per cell."""
    out = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        parts = []
        for o in cell.outputs:
            if o.output_type == "stream":
                parts.append(o.text)
            elif "data" in o and "text/plain" in o["data"]:
                parts.append(o["data"]["text/plain"])
        out.append("".join(parts))
    return out


def test_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    assert all(c.outputs == [] and c.execution_count is None for c in code), "commit the notebook without outputs"


def test_quickstart_runs_top_to_bottom(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    _kernel_on_this_interpreter(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("TITANS_NOTEBOOK_QUICK", "1")
    scratch = tmp_path / "tmp"  # the notebook's tempfile.mkdtemp workdir lands here, never in the repo
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = "\n".join(_texts(nb))

    workdir = pathlib.Path(re.search(r"QUICK=True: 6 steps of 4 x 448 tokens into (\S+)", text).group(1))
    assert workdir.is_relative_to(scratch) and (workdir / "metrics.jsonl").exists()
    assert not any(cwd.iterdir()), "QUICK mode must leave the working directory alone"

    params = int(re.search(r"parameters: ([\d,]+)", text).group(1).replace(",", ""))
    import titans_jax

    assert params == titans_jax.count_params(titans_jax.get_config("tiny-mac"))
    assert "tokens (1, 41) -> logits (1, 41, 256)" in text

    # The accuracy table: 2 lengths x 2 depths, then one row per length over all depths.
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines)
                  if line.split() == ["length", "depth", "accuracy", "samples", "needle_depth"])
    rows = [line.split() for line in lines[header + 2: header + 8]]
    assert [(r[0], r[1]) for r in rows] == [("448", "0.000"), ("448", "1.000"), ("896", "0.000"), ("896", "1.000"),
                                            ("448", "all"), ("896", "all")]
    assert all(0.0 <= float(r[2]) <= 1.0 for r in rows) and [r[3] for r in rows] == ["2"] * 4 + ["4"] * 2

    # Memory statistics per layer (tiny-mac has 2), then the greedy answer and the stateful check.
    stats_header = next(line.split() for line in lines if line.startswith("layer ") and "loss_before" in line)
    assert {"theta", "eta", "alpha", "loss_before", "loss_after", "w_norm", "s_norm"} <= set(stats_header)
    assert re.search(r"model's answer: '.*'; the pass key: '\d{7}'", text)
    diff = float(re.search(r"max \|difference\| = (\S+)", text).group(1))
    assert diff < 1e-4

    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # training loss, heatmap, memory bars, memory curves
