"""Scripts that would otherwise rot: the accelerator check (on CPU with --smoke), the inference benchmark it calls, and
the memory-core profiler."""

import json
import os
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_check_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("TITANS_BENCH_DIR", str(tmp_path))
    import experiments.bench_common as common

    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
    from experiments import device_check

    report = device_check.main(["--smoke", "--variants", "mac", "transformer"])
    assert {name: s["status"] for name, s in report["sections"].items()} == dict.fromkeys(device_check.SECTIONS, "ok")
    assert report["memory_paths_ok"]
    assert {r["variant"] for r in report["train"]} == {"mac", "transformer"}
    for row in report["train"]:
        assert row["batch"] >= 1 and row["tokens_per_s"] > 0 and row["peak_mem_bytes"] > 0
    # Inference: a prefill row per variant (prefill and forward agree on the last logits), a decode row per context.
    prefill = {r["variant"]: r for r in report["inference"] if r["bench"] == "prefill"}
    assert set(prefill) == {"mac", "transformer"}
    for row in prefill.values():
        assert row["prefill_tokens_per_s"] > 0 and row["forward_tokens_per_s"] > 0 and row["ratio"] > 0
        assert row["last_logits_rel_diff"] < 1e-4
    decode = [r for r in report["inference"] if r["bench"] == "decode"]
    assert sorted((r["variant"], r["context"]) for r in decode) == [(v, c) for v in ("mac", "transformer")
                                                                     for c in (32, 64)]
    for row in decode:
        assert row["decode_tokens_per_s"] > 0 and row["build_tokens_per_s"] > 0 and row["ratio"] > 0
        assert row["max_seq_len"] >= row["context"] + 8
    # The transformer's KV cache is sized per context; MAC's state is not, so one model serves both contexts.
    assert {r["max_seq_len"] for r in decode if r["variant"] == "transformer"} == {40, 72}
    assert [r["decode_compile_s"] is None for r in decode if r["variant"] == "mac"] == [False, True]
    (eager,) = report["eager"]
    assert eager["calls"] >= 1 and eager["ms_per_call_median"] > 0
    with open(tmp_path / "device_check.json") as f:
        assert json.load(f)["inference"] == json.loads(json.dumps(report["inference"]))


def test_device_check_records_a_failing_section_and_goes_on(tmp_path, monkeypatch):
    """An exception in one section is recorded in the JSON and the next section runs; the JSON is written as rows come."""
    from experiments import bench_inference, device_check

    def broken(*args, **kwargs):
        raise RuntimeError("no such device")

    seen_on_disk = []

    def fake_run(settings, variants, *, measures, deadline, on_row, **kwargs):
        on_row({"bench": "prefill", "variant": variants[0]})
        with open(tmp_path / "dc.json") as f:
            seen_on_disk.append(json.load(f)["inference"])
        return []

    monkeypatch.setattr(device_check, "check_memory_paths", broken)
    monkeypatch.setattr(bench_inference, "run", fake_run)
    report = device_check.main(["--smoke", "--variants", "lmm", "--sections", "memory_paths", "inference",
                                "--out-dir", str(tmp_path), "--out", "dc"])
    assert report["sections"]["memory_paths"]["status"] == "error"
    assert "no such device" in report["sections"]["memory_paths"]["error"]
    assert report["memory_paths_ok"] is None
    assert report["sections"]["inference"]["status"] == "ok" and "train" not in report["sections"]
    assert seen_on_disk == [[{"bench": "prefill", "variant": "lmm"}]]
    with open(tmp_path / "dc.json") as f:
        assert json.load(f)["sections"]["memory_paths"]["status"] == "error"


def test_device_check_budget_skips_sections(tmp_path):
    """With no time left every section is recorded as skipped (nothing compiles), and the JSON still comes out."""
    from experiments import device_check

    t0 = time.perf_counter()
    report = device_check.main(["--budget-s", "0", "--out-dir", str(tmp_path)])
    assert time.perf_counter() - t0 < 10
    assert {name: s["status"] for name, s in report["sections"].items()} == dict.fromkeys(device_check.SECTIONS,
                                                                                          "skipped")
    assert os.path.exists(tmp_path / "device_check.json")


def test_inference_rows_skip_past_their_deadline():
    from experiments import bench_inference

    bench = bench_inference.InferenceBench(bench_inference.Settings.for_smoke())
    past = time.perf_counter() - 1
    assert "skipped" in bench.prefill_row("lmm", deadline=past)
    assert "skipped" in bench.decode_row("lmm", 32, deadline=past)
    assert "skipped" in bench.eager_row("lmm", deadline=past)


_BLOCKER = """
import sys

BLOCKED = {blocked!r}


class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, Block())
"""


def _run_blocked(blocked, body):
    script = _BLOCKER.format(blocked=blocked) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=120)


def test_device_check_imports_without_data_dependencies():
    """An accelerator's image has jax, flax, optax, orbax and chex but not this repository's data dependencies: the
    device check (and the train step it compiles) must import without them."""
    out = _run_blocked(("grain", "tensorflow_datasets", "array_record", "tqdm"), """
        from experiments import device_check

        assert device_check.IMPORT_ERROR is None, device_check.IMPORT_ERROR
        assert callable(device_check.compile_train_step)
        from titans_jax.train import step
        assert callable(step.compile_run_train_step)
        assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        print("ok")
    """)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_device_check_reports_a_failed_import(tmp_path):
    """Where the project does not import (here: optax missing), the JSON still says which machine, which versions and
    why, and the run exits non-zero."""
    out = _run_blocked(("optax",), f"""
        from experiments import device_check

        device_check.main(["--out-dir", {str(tmp_path)!r}])
    """)
    assert out.returncode != 0
    with open(tmp_path / "device_check.json") as f:
        report = json.load(f)
    assert "optax" in report["import_error"] and report["machine"]["jax"] and report["versions"]["jax"]


def test_profile_memory_reads_its_own_trace(tmp_path, monkeypatch):
    """The profiling script finds the executed HLO ops in the trace and sorts them into kinds, matmuls among them."""
    import experiments.bench_common as common

    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
    from experiments import profile_memory

    by_kind = profile_memory.main(["--length", "32", "--top", "3"])
    assert by_kind["matmul, [b, d]-sized"] > 0 and sum(by_kind.values()) > by_kind["matmul, [b, d]-sized"]
    assert os.path.exists(tmp_path / "profile_memory_dual.json")
