"""Scripts that would otherwise rot: the accelerator check (on CPU with --smoke) and the memory-core profiler."""

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


def test_profile_memory_reads_its_own_trace(tmp_path, monkeypatch):
    """The profiling script finds the executed HLO ops in the trace and sorts them into kinds, matmuls among them."""
    import experiments.bench_common as common

    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
    from experiments import profile_memory

    by_kind = profile_memory.main(["--length", "32", "--top", "3"])
    assert by_kind["matmul, [b, d]-sized"] > 0 and sum(by_kind.values()) > by_kind["matmul, [b, d]-sized"]
    assert os.path.exists(tmp_path / "profile_memory_dual.json")
