"""Checkpointer: round trip with resharding, meta, pruning, crash atomicity, partial restore, read-only use;
preemption (PreemptionWatch: JAX's sync point and the SigtermHandler fallback)."""

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any backend use; conftest sets the same

import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import chex  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from titans_jax import sharding  # noqa: E402
from titans_jax.checkpoint import Checkpointer, PreemptionWatch, SigtermHandler  # noqa: E402

META = {"data": {"epoch": 1, "index": 123, "seed": 0}, "config": {"d_model": 16, "name": "tiny-mac", "lr": 3e-4}}


def _tree(mesh):
    w = jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16) / 7
    b = (jnp.arange(16, dtype=jnp.float32) / 3).astype(jnp.bfloat16)
    return {
        "w": jax.device_put(w, NamedSharding(mesh, P("fsdp", "tensor"))),
        "b": jax.device_put(b, NamedSharding(mesh, P("tensor"))),
        "step": jnp.asarray(7, jnp.int32),
    }


def _abstract(tree, mesh, specs):
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, specs[k])) for k, v in tree.items()}


def test_roundtrip_reshards_onto_another_mesh(tmp_path):
    mesh_a = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    tree = _tree(mesh_a)
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(10, tree, META)
        ckpt.wait()
        assert ckpt.latest_step() == 10

    mesh_b = sharding.make_mesh("data=4,tensor=2")
    specs = {"w": P(None, ("data", "tensor")), "b": P(), "step": P()}
    with Checkpointer(tmp_path) as ckpt:
        restored, meta = ckpt.restore(abstract_state=_abstract(tree, mesh_b, specs))
    assert meta == META
    chex.assert_trees_all_equal(restored, tree)  # same values, same dtypes (bfloat16 survives)
    assert restored["b"].dtype == jnp.bfloat16
    for k, spec in specs.items():
        assert restored[k].sharding == NamedSharding(mesh_b, spec), k


def test_nnx_state_roundtrip_onto_another_mesh(tmp_path):
    def make():
        init = nnx.initializers.normal(0.02)
        return nnx.Linear(
            8, 16, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16, kernel_init=nnx.with_partitioning(init, ("embed", "mlp"))
        )

    graphdef, state, _ = sharding.init_sharded(make, sharding.make_mesh("data=2,fsdp=2,tensor=2"))
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, {"ok": True})
    mesh_b = sharding.make_mesh("fsdp=8")
    _, target = sharding.abstract_state(make, mesh_b)
    with Checkpointer(tmp_path) as ckpt:
        restored, meta = ckpt.restore(1, target)
    assert meta == {"ok": True}
    kernel = restored["kernel"][...]
    assert kernel.dtype == jnp.bfloat16 and kernel.sharding == NamedSharding(mesh_b, P("fsdp", "tensor"))
    chex.assert_trees_all_equal(nnx.merge(graphdef, restored).kernel[...], state["kernel"][...])


def test_max_to_keep_latest_step_and_repeated_save(tmp_path):
    tree = {"x": jnp.ones((4,))}
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None
        assert [ckpt.save(s, tree, {"s": s}) for s in (2, 4, 6, 7)] == [True, True, True, True]
        assert not ckpt.save(7, tree, {"s": 7})  # already saved: skipped, not an error
        ckpt.wait()
        assert ckpt.all_steps() == [6, 7] and ckpt.latest_step() == 7
        assert ckpt.restore(6)[1] == {"s": 6}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["6", "7"]


def test_restore_without_checkpoint_and_bad_meta(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(FileNotFoundError):
            ckpt.restore()
        with pytest.raises(TypeError):
            ckpt.save(1, {"x": jnp.ones(2)}, {"bad": object()})
        assert ckpt.latest_step() is None


def test_fake_half_written_checkpoint_is_ignored(tmp_path):
    """A tmp-suffixed step directory, even a complete one holding commit_success.txt, is not a checkpoint."""
    tree = {"x": jnp.arange(4.0)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, tree, {"s": 1})
    shutil.copytree(tmp_path / "1", tmp_path / "2.orbax-checkpoint-tmp")
    assert (tmp_path / "2.orbax-checkpoint-tmp" / "commit_success.txt").exists()
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
        restored, meta = ckpt.restore()
        assert meta == {"s": 1}
        chex.assert_trees_all_equal(restored, tree)


# The child saves step 1, then SIGKILLs itself during step 2 at the worst moment: every file, commit_success.txt
# included, is written and only the final rename of the step directory is left.
_CHILD = """
import os, signal, sys
import jax, jax.numpy as jnp
from orbax.checkpoint._src.path import async_path
from titans_jax.checkpoint import Checkpointer

rename = async_path.rename

async def rename_then_die(src, dst, *a, **k):
    if dst.name.isdigit():  # the commit of a step directory
        os.kill(os.getpid(), signal.SIGKILL)
    return await rename(src, dst, *a, **k)

ckpt = Checkpointer(sys.argv[1])
ckpt.save(1, {"x": jnp.arange(4.0)}, {"s": 1})
ckpt.wait()
async_path.rename = rename_then_die
ckpt.save(2, {"x": jnp.arange(4.0) + 100}, {"s": 2})
ckpt.wait()
print("not killed")
"""


def test_process_killed_mid_save_leaves_no_valid_checkpoint(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr[-3000:]
    assert not (tmp_path / "2").exists()
    tmp_step = tmp_path / "2.orbax-checkpoint-tmp"
    assert (tmp_step / "commit_success.txt").exists()  # the marker alone does not commit on a local disk

    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
        restored, meta = ckpt.restore()
        assert meta == {"s": 1}
        np.testing.assert_array_equal(np.asarray(restored["x"]), np.arange(4.0))
        # The run resumes and saves step 2 again; the leftover tmp directory is cleaned up first.
        assert ckpt.save(2, {"x": jnp.arange(4.0) + 2}, {"s": 2})
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2]
    assert not tmp_step.exists()


def test_sigterm_handler_records_and_restores():
    def previous(signum, frame):
        raise AssertionError("the previous handler must not run inside the context")

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with SigtermHandler() as stop:
            assert not stop.requested
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # Python runs signal handlers between bytecodes of the main thread
                if stop.requested:
                    break
                time.sleep(0.01)
            assert stop.requested and stop.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, old)


def test_restore_subtree_reads_the_model_without_the_optimizer(tmp_path):
    """A train-state-like tree {0: model, 1: optimizer}: restoring {0: ...} alone gives the model, in host memory or
    on a mesh, cast to the target's dtype."""
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    model = _tree(mesh)
    opt = {"mu": {k: v + 1 for k, v in model.items() if k != "step"}, "count": jnp.asarray(3, jnp.int32)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, {0: model, 1: opt}, {"s": 5})
    host_target = {0: {"w": jax.ShapeDtypeStruct((8, 16), jnp.bfloat16), "b": jax.ShapeDtypeStruct((16,), jnp.float32),
                       "step": jax.ShapeDtypeStruct((), jnp.int32)}}
    with Checkpointer(tmp_path, read_only=True) as ckpt:
        host = ckpt.restore_subtree(5, host_target)
        assert set(host) == {0}
        assert isinstance(host[0]["w"], np.ndarray) and host[0]["w"].dtype == jnp.bfloat16
        np.testing.assert_array_equal(host[0]["w"], np.asarray(model["w"]).astype(jnp.bfloat16))
        np.testing.assert_array_equal(host[0]["b"], np.asarray(model["b"], np.float32))  # bfloat16 widened exactly
        specs = {"w": P("fsdp", None), "b": P(), "step": P()}
        placed = ckpt.restore_subtree(5, {0: _abstract(model, mesh, specs)})
        chex.assert_trees_all_equal(placed[0], model)
        assert placed[0]["w"].sharding == NamedSharding(mesh, specs["w"])
        with pytest.raises(FileNotFoundError):
            ckpt.restore_subtree(6, host_target)


def test_read_only_checkpointer_creates_and_removes_nothing(tmp_path):
    """Sampling or exporting from a run that is still training must not delete its save in progress."""
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, {"x": jnp.arange(4.0)}, {"s": 1})
    in_progress = tmp_path / "ckpt" / "2.orbax-checkpoint-tmp"
    in_progress.mkdir()
    with Checkpointer(tmp_path / "ckpt", read_only=True) as ckpt:
        assert ckpt.latest_step() == 1 and ckpt.restore(1)[1] == {"s": 1}
        with pytest.raises(ValueError, match="read-only"):
            ckpt.save(3, {"x": jnp.arange(4.0)}, {"s": 3})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1", "2.orbax-checkpoint-tmp"]
    with Checkpointer(tmp_path / "missing", read_only=True) as ckpt:
        assert ckpt.latest_step() is None
    assert not (tmp_path / "missing").exists()


def test_preemption_watch_falls_back_to_sigterm_without_jax_distributed(tmp_path):
    """A single process without jax.distributed has no preemption sync manager (orbax's reached_preemption is always
    False): PreemptionWatch records SIGTERM itself and restores the previous handler on exit."""
    previous = signal.getsignal(signal.SIGTERM)
    with Checkpointer(tmp_path) as ckpt, PreemptionWatch(ckpt) as watch:
        assert watch.mode == "signal" and not watch.reached(1) and not ckpt.reached_preemption(1)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # Python runs signal handlers between bytecodes of the main thread
            if watch.reached(2):
                break
            time.sleep(0.01)
        assert watch.reached(2) and watch.reason == f"signal {int(signal.SIGTERM)}"
    assert signal.getsignal(signal.SIGTERM) is previous


# One process with a coordinator: jax.distributed starts JAX's preemption sync manager, whose notifier owns SIGTERM.
_SYNC_CHILD = """
import os, signal, socket, sys, time
import jax
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
jax.distributed.initialize(f"127.0.0.1:{port}", 1, 0)
from titans_jax.checkpoint import Checkpointer, PreemptionWatch
with Checkpointer(sys.argv[1]) as ckpt, PreemptionWatch(ckpt) as watch:
    assert watch.mode == "sync_point", watch.mode
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # no Python handler over JAX's notifier
    for step in range(1, 3000):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        if watch.reached(step):
            print("sync point", step, watch.reason)
            break
        time.sleep(0.005)
"""


def test_preemption_watch_uses_jax_sync_point_with_jax_distributed(tmp_path):
    for _ in range(3):  # the free port may be taken by another process before the coordinator binds it: retry
        proc = subprocess.run([sys.executable, "-c", _SYNC_CHILD, str(tmp_path)], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        if "Failed to start RPC server" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    step = int(proc.stdout.split("sync point ")[1].split()[0])
    assert step > 3 and "JAX's preemption sync point" in proc.stdout
