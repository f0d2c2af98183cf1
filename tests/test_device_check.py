"""The accelerator script runs on CPU with --smoke, so it cannot rot between the sessions that have a GPU."""

import os


def test_device_check_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("TITANS_BENCH_DIR", str(tmp_path))
    import experiments.bench_common as common

    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
    from experiments import device_check

    report = device_check.main(["--smoke", "--variants", "mac", "transformer"])
    assert report["memory_paths_ok"]
    assert {r["variant"] for r in report["train"]} == {"mac", "transformer"}
    for row in report["train"]:
        assert row["batch"] >= 1 and row["tokens_per_s"] > 0 and row["peak_mem_bytes"] > 0
    assert os.path.exists(tmp_path / "device_check.json")
