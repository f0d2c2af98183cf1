"""The paper's experiments in miniature run end to end in their --quick form: train through the trainer, evaluate
with titans_jax.eval, write the JSON and the plots (the full runs' results are committed under experiments/results)."""

import json

import pytest

from experiments import ablations, babilong, memory_depth, niah


@pytest.mark.parametrize("experiment", [niah, babilong, ablations, memory_depth], ids=lambda m: m.__name__)
def test_quick_experiment_writes_results_and_plots(experiment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the shakespeare cache and any stray output stay in tmp
    out = tmp_path / "out"
    name = experiment.__name__.split(".")[-1]
    assert experiment.main(["--quick", "--workdir-root", str(tmp_path / "runs"), "--out-dir", str(out)]) == 0
    doc = json.loads((out / f"{name}.json").read_text())
    assert doc["experiment"] == name and doc["environment"]["jax"]
    pngs = list(out.rglob("*.png"))
    assert pngs and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    if name == "niah":
        r = doc["runs"]["mac"]["tasks"]["niah-passkey"]
        assert {x["length"] for x in r["results"]} == {512, 1024} and all(0 <= x["accuracy"] <= 1 for x in r["results"])
    elif name == "babilong":
        assert set(doc["runs"]["mac"]["tasks"]) == {"babilong-qa1", "babilong-qa2"}
    elif name == "ablations":
        rows = doc["rows"]
        assert list(rows) == ["LMM"] and all(r["val_bpb"] > 0 for r in rows.values())
        assert all(0 <= r["long_context_accuracy"] <= 1 for r in rows.values())
    else:
        assert set(doc["depths"]) == {"1"} and all(r["tokens_per_s"] > 0 for r in doc["throughput"])
        ppl = doc["depths"]["1"]["ppl"]["results"]
        assert {x["length"] for x in ppl} == {64, 128} and all(x["bits_per_byte"] > 0 for x in ppl)
