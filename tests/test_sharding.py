"""Mesh parsing, logical-axis rules, divisibility fallback, the replication audit, and distributed helpers."""

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any backend use; conftest sets the same

import re  # noqa: E402

import chex  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from titans_jax import TitansLM, distributed, sharding  # noqa: E402
from titans_jax.configs import MEMORY_VARIANTS, VARIANTS, get_config  # noqa: E402


# ---------------------------------------------------------------------------------------------------------- meshes
@pytest.mark.parametrize(
    "spec, expected",
    [
        ("data=2,fsdp=2,tensor=2", {"data": 2, "fsdp": 2, "tensor": 2}),
        ("tensor=2, data=4", {"data": 4, "fsdp": 1, "tensor": 2}),
        ("fsdp=-1", {"data": 1, "fsdp": -1, "tensor": 1}),
        ("", {"data": 1, "fsdp": 1, "tensor": 1}),
    ],
)
def test_parse_mesh(spec, expected):
    assert sharding.parse_mesh(spec) == expected


def test_parse_mesh_resolves_minus_one():
    assert sharding.parse_mesh("data=-1,tensor=2", num_devices=8) == {"data": 4, "fsdp": 1, "tensor": 2}


@pytest.mark.parametrize(
    "spec, match",
    [
        ("model=2", "unknown axis 'model'"),
        ("data=0", "positive integer"),
        ("data=two", "positive integer"),
        ("data=1.5", "positive integer"),
        ("data=-2", "positive integer"),
        ("data=-1,fsdp=-1", "at most one"),
        ("data=2,data=4", "twice"),
        ("data", "axis=size"),
    ],
)
def test_parse_mesh_errors(spec, match):
    with pytest.raises(ValueError, match=match) as e:
        sharding.parse_mesh(spec)
    assert "--mesh" in str(e.value)


@pytest.mark.parametrize(
    "spec, shape",
    [
        (None, (8, 1, 1)),
        ("", (8, 1, 1)),
        ("data=2,fsdp=2,tensor=2", (2, 2, 2)),
        ("fsdp=-1,tensor=2", (1, 4, 2)),
        ({"data": 4, "tensor": 2}, (4, 1, 2)),
    ],
)
def test_make_mesh(spec, shape):
    mesh = sharding.make_mesh(spec)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == shape
    assert mesh.axis_types == (AxisType.Auto,) * 3


def test_make_mesh_subset_of_devices():
    mesh = sharding.make_mesh("tensor=2", devices=jax.devices()[:2])
    assert mesh.devices.size == 2


@pytest.mark.parametrize(
    "spec, match",
    [("data=4", "multiply to 4 but there are 8"), ("data=3,fsdp=-1", "do not divide"), ({"pipe": 8}, "unknown")],
)
def test_make_mesh_errors(spec, match):
    with pytest.raises(ValueError, match=match) as e:
        sharding.make_mesh(spec)
    assert "--mesh" in str(e.value)


# ------------------------------------------------------------------------------------------------ logical rules
# The activation names the model applies (with_logical_constraint); the parameter names come from the models' own
# out_sharding metadata, collected below.
ACTIVATION_NAMES = {"batch", "seq", "act_embed", "act_heads", "head_dim"}


def _param_logical_names(config) -> set[str]:
    with nnx.use_eager_sharding(False):
        state = nnx.state(nnx.eval_shape(lambda: TitansLM(config, rngs=nnx.Rngs(0))))
    names = set()
    for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        names.update(n for n in (sharding.variable_logical_names(v) or ()) if n is not None)
    return names


def test_rules_name_exactly_what_the_model_uses():
    """Every logical name a parameter or activation carries has a rule, and every rule is used by something: a rule
    nobody applies would read as a decision that is not in effect."""
    used = set(ACTIVATION_NAMES)
    for variant in VARIANTS:
        used |= _param_logical_names(get_config(f"tiny-{variant}"))
    table = sharding.rules_table()
    assert set(table) == used
    for value in table.values():  # every target is a mesh axis
        assert set(sharding._as_axes(value)) <= set(sharding.MESH_AXES)


def test_rules_table_refuses_duplicates_and_unknown_mesh_axes():
    with pytest.raises(ValueError, match="logical axis 'batch' appears twice"):
        sharding.rules_table((("batch", "data"), ("seq", None), ("batch", ("data", "fsdp"))))
    with pytest.raises(ValueError, match="'embed' appears twice"):  # not silently overwritten by the later entry
        sharding.logical_to_spec(("embed",), (("embed", "fsdp"), ("embed", "tensor")))
    with pytest.raises(ValueError, match="'model', which is not a mesh axis"):
        sharding.rules_table((("heads", "model"),))
    assert sharding.rules_table() == dict(sharding.LOGICAL_AXIS_RULES)  # the default table is valid


def test_batch_and_memory_axes_come_from_the_rules():
    assert sharding.batch_spec() == P(("data", "fsdp")) == sharding.logical_to_spec(("batch",))
    assert sharding.memory_shard_axes() == (("data", "fsdp"), ("tensor",))
    rules = (("batch", "data"), ("act_heads", ("tensor", "data")))
    assert sharding.batch_spec(rules) == P("data")
    assert sharding.memory_shard_axes(rules) == (("data",), ("tensor",))  # data is the batch's: not reused for heads


def test_logical_to_spec_defaults():
    assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("layers", "embed", "heads", "head_dim")) == P(None, "fsdp", "tensor", None)
    assert sharding.logical_to_spec(("batch", "seq", "act_embed")) == P(("data", "fsdp"), None, None)
    assert sharding.logical_to_spec((None, "tensor")) == P(None, "tensor")  # mesh axes pass through
    assert sharding.logical_to_spec(None) == P()


def test_logical_to_spec_drops_later_duplicates():
    # fsdp is taken by "batch", so "embed" (-> fsdp) must be replicated; tensor likewise.
    assert sharding.logical_to_spec(("batch", "embed")) == P(("data", "fsdp"), None)
    assert sharding.logical_to_spec(("heads", "mlp", "fsdp")) == P("tensor", None, "fsdp")
    rules = (("a", ("fsdp", "tensor")), ("b", ("tensor", "data")))
    assert sharding.logical_to_spec(("a", "b"), rules) == P(("fsdp", "tensor"), "data")


def test_logical_to_spec_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown logical axis 'embd'"):
        sharding.logical_to_spec(("embd",))


def test_fit_spec_divisibility_fallback():
    mesh_shape = {"data": 2, "fsdp": 2, "tensor": 2}
    assert sharding.fit_spec(P("fsdp", "tensor"), (8, 6), mesh_shape) == P("fsdp", "tensor")
    assert sharding.fit_spec(P("fsdp", "tensor"), (3, 5), mesh_shape) == P(None, None)
    # Longest dividing prefix of a multi-axis entry: batch 2 goes on data only.
    assert sharding.fit_spec(P(("data", "fsdp")), (2, 7), mesh_shape) == P("data")
    assert sharding.fit_spec(P(("data", "fsdp")), (12,), mesh_shape) == P(("data", "fsdp"))
    with pytest.raises(ValueError, match="more entries"):
        sharding.fit_spec(P("fsdp", "tensor"), (4,), mesh_shape)


class _Tiny(nnx.Module):
    """Parameters annotated the way the model does (Flax 0.12: ``out_sharding`` metadata)."""

    def __init__(self, vocab: int, embed: int, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Param(init(rngs.params(), (vocab, embed)), out_sharding=("vocab", "embed"))
        self.proj = nnx.Linear(
            embed,
            4 * embed,
            rngs=rngs,
            kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("mlp",)),
        )
        self.scale = nnx.Param(jnp.ones((embed,)), out_sharding=("norm",))
        self.plain = nnx.Param(jnp.zeros((3,)))  # no annotation: replicated


def test_shard_state_specs_follows_annotations_and_divisibility():
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    with nnx.use_eager_sharding(False):
        state = nnx.state(nnx.eval_shape(lambda: _Tiny(vocab=9, embed=8, rngs=nnx.Rngs(0))))
    specs = jax.tree.map(lambda s: s.spec, sharding.shard_state_specs(state, mesh))
    assert specs["embed"].get_value() == P(None, "fsdp")  # vocab 9 does not divide by tensor=2: replicated
    assert specs["proj"]["kernel"].get_value() == P("fsdp", "tensor")
    assert specs["proj"]["bias"].get_value() == P("tensor")
    assert specs["scale"].get_value() == P(None)
    assert specs["plain"].get_value() == P()


def test_shard_state_specs_plain_arrays_are_replicated():
    mesh = sharding.make_mesh(None)
    tree = {"a": jnp.zeros((4, 4)), "b": jax.ShapeDtypeStruct((2,), jnp.float32)}
    out = sharding.shard_state_specs(tree, mesh)
    assert out["a"] == NamedSharding(mesh, P()) and out["b"] == NamedSharding(mesh, P())


def test_init_sharded_places_tiny_and_optimizer_state():
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")

    def make():
        # vocab=5 is not divisible by tensor=2; eager sharding would raise IndivisibleError here.
        model = _Tiny(vocab=5, embed=6, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    graphdef, state, shardings = sharding.init_sharded(make, mesh)
    model_state, opt_state = state[0], state[1]  # nnx.split of a tuple: a State keyed 0, 1
    assert model_state["proj"]["kernel"][...].sharding.spec == P("fsdp", "tensor")
    assert model_state["embed"][...].sharding.spec == P(None, "fsdp")  # vocab=5 fell back to replicated
    # Adam moments copy the parameter metadata, so they shard like the parameters.
    assert opt_state["opt_state"][0]["mu"]["proj"]["kernel"][...].sharding.spec == P("fsdp", "tensor")
    model, _ = nnx.merge(graphdef, state)
    chex.assert_trees_all_close(model.scale[...], jnp.ones((6,)))

    _, abstract = sharding.abstract_state(make, mesh)
    assert jax.tree.map(lambda a: a.sharding, abstract) == jax.tree.map(lambda a: a.sharding, state)


def test_with_logical_constraint():
    x = jnp.ones((8, 4, 6))
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    assert sharding.with_logical_constraint(x, ("batch", "seq", "act_embed"), None) is x  # no mesh: identity
    one = sharding.make_mesh(None, devices=jax.devices()[:1])
    assert sharding.with_logical_constraint(x, ("batch", "seq", "act_embed"), one) is x
    with jax.set_mesh(mesh):  # an ambient mesh is never looked up
        assert sharding.with_logical_constraint(x, ("batch", "seq", "act_embed"), None) is x
    y = jax.jit(lambda a: sharding.with_logical_constraint(a * 2, ("batch", "seq", "act_heads"), mesh))(x)
    assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")
    # 3 heads do not divide tensor=2: that axis stays replicated instead of failing.
    z = jax.jit(lambda a: sharding.with_logical_constraint(a, ("batch", "act_heads"), mesh))(jnp.ones((8, 3)))
    assert z.sharding.spec in (P(("data", "fsdp")), P(("data", "fsdp"), None))


_CONSTRAINT = re.compile(r"sdy\.sharding_constraint %[\w#.]+ <@\w+, \[(.*?)\]> : tensor<([0-9x]+)x[a-z]+[0-9]*>")


def _constraints(lowered_text: str) -> set[tuple[tuple[int, ...], str]]:
    """(shape, per-dimension mesh axes) of every sharding constraint in lowered StableHLO (Shardy) text."""
    return {(tuple(int(d) for d in shape.split("x")), spec.replace('"', "").replace(" ", ""))
            for spec, shape in _CONSTRAINT.findall(lowered_text)}


RESIDUAL_AXES = "{data,fsdp},{},{}"  # ("batch", "seq", "act_embed")
QKV_AXES = "{data,fsdp},{},{tensor},{}"  # ("batch", "seq", "act_heads", "head_dim")


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_applies_the_activation_rules(variant):
    """The model's forward pass on a mesh constrains the residual stream between blocks and the q/k/v inputs of
    attention and memory as the rules say; without a mesh argument nothing is constrained, even under
    an ambient mesh; a memory variant runs its recurrence under shard_map only when given the mesh."""
    cfg = get_config(f"tiny-{variant}")
    b, t = 4, 32
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(TitansLM(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.zeros((b, t), jnp.int32)

    def lower(mesh_arg):  # the forward pass: the backward's constraints are their transposes, added by JAX
        return jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, mesh=mesh_arg)).lower(state, tokens).as_text()

    text = lower(mesh)
    assert ("sdy.manual_computation" in text) == (variant in MEMORY_VARIANTS)  # the memory under shard_map
    found = _constraints(text)
    assert ((b, t, cfg.dim), RESIDUAL_AXES) in found, sorted(found)
    head_dim = cfg.dim // cfg.num_heads
    qkv = {shape for shape, axes in found if axes == QKV_AXES}
    assert any(s[0] == b and s[2:] == (cfg.num_heads, head_dim) for s in qkv), sorted(found)
    with jax.set_mesh(mesh):
        text = lower(None)
    assert not _constraints(text) and "sdy.manual_computation" not in text


# ------------------------------------------------------------------------------------------------------ audit
def _audit_tree(mesh, kernel_spec):
    arrays = {"kernel": jax.ShapeDtypeStruct((64, 64), jnp.float32), "scale": jax.ShapeDtypeStruct((64,), jnp.bfloat16)}
    shardings = {"kernel": NamedSharding(mesh, kernel_spec), "scale": NamedSharding(mesh, P())}
    return shardings, arrays


def test_replicated_bytes_report():
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    report = sharding.replicated_bytes_report(*_audit_tree(mesh, P("fsdp", "tensor")))
    assert report["total_bytes"] == 64 * 64 * 4 + 64 * 2
    assert report["replicated_bytes"] == 64 * 2
    assert report["per_device_bytes"] == 32 * 32 * 4 + 64 * 2
    assert report["ideal_per_device_bytes"] == report["total_bytes"] / 4  # fsdp x tensor; data is replication
    assert report["largest_replicated"] == [("['scale']", 128)]


def test_audit_replication_raises_and_passes():
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    sharding.audit_replication(*_audit_tree(mesh, P("fsdp", "tensor")), max_fraction=0.05)
    with pytest.raises(ValueError, match=r"replicated.*\['kernel'\]"):
        sharding.audit_replication(*_audit_tree(mesh, P()), max_fraction=0.05)
    # Replication over "data" is data parallelism, not waste: a pure data-parallel mesh passes.
    dp = sharding.make_mesh(None)
    assert sharding.audit_replication(*_audit_tree(dp, P()), max_fraction=0.0)["replicated_bytes"] == 0
    with pytest.raises(ValueError):
        sharding.audit_replication(*_audit_tree(dp, P()), max_fraction=0.0, ignore_axes=())


def test_audit_on_nnx_state():
    mesh = sharding.make_mesh("fsdp=4,tensor=2")
    _, abstract = sharding.abstract_state(lambda: _Tiny(vocab=16, embed=16, rngs=nnx.Rngs(0)), mesh)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    report = sharding.audit_replication(shardings, abstract, max_fraction=0.1)
    assert report["replicated_bytes"] == 16 * 4 + 3 * 4  # the norm scale and the unannotated vector
    assert {p for p, _ in report["largest_replicated"]} == {"['scale']", "['plain']"}


def test_rules_table_works_with_flax_logical_axis_rules():
    """The table has Flax's LogicalRules format, so Flax's own helpers agree with logical_to_spec."""
    with nnx.use_eager_sharding(False):
        state = nnx.state(nnx.eval_shape(lambda: _Tiny(vocab=16, embed=16, rngs=nnx.Rngs(0))))
    with nnx.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        flax_specs = nnx.get_partition_spec(state)
    assert flax_specs["proj"]["kernel"].get_value() == sharding.logical_to_spec(("embed", "mlp"))
    assert flax_specs["embed"].get_value() == P("tensor", "fsdp")


# ---------------------------------------------------------------------------------------------- distributed
@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, "slurm"),
        ({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, None),
        ({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}, "tpu"),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
        ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, "tpu"),
        ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "2"}, "mpi"),
        ({"TITANS_DISTRIBUTED": "auto"}, "forced"),
        ({"TITANS_DISTRIBUTED": "0", "SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, None),
    ],
)
def test_detect_cluster(env, expected):
    assert distributed.detect_cluster(env) == expected


def test_initialize_single_process_is_noop():
    assert distributed.initialize(env={}) is False


@pytest.mark.parametrize(
    "kwargs, missing",
    [
        ({"coordinator": "127.0.0.1:1234"}, "--num_processes, --process_id"),
        ({"num_processes": 2, "process_id": 0}, "--coordinator"),
    ],
)
def test_initialize_partial_flags(kwargs, missing):
    with pytest.raises(ValueError, match=f"without {missing}"):
        distributed.initialize(**kwargs)


def test_initialize_bad_flags():
    with pytest.raises(ValueError, match="--process_id"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="host:port"):
        distributed.initialize("localhost", 2, 0)


def test_global_batch_from_local_single_process():
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    local = {"tokens": np.arange(8 * 5, dtype=np.int32).reshape(8, 5)}
    out = distributed.global_batch_from_local(local, mesh, P(("data", "fsdp")))
    assert out["tokens"].shape == (8, 5)
    assert out["tokens"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(out["tokens"]), local["tokens"])
    default = distributed.global_batch_from_local(local, mesh)  # the rules' "batch"
    assert default["tokens"].sharding.spec == sharding.batch_spec()
    np.testing.assert_array_equal(np.asarray(default["tokens"]), local["tokens"])
    assert distributed.any_process(True) and not distributed.any_process(False)


_WORKER = """
import sys, jax
jax.config.update("jax_num_cpu_devices", 2)
import numpy as np
from jax.sharding import PartitionSpec as P
from titans_jax import distributed, sharding
port, pid = sys.argv[1], int(sys.argv[2])
assert distributed.initialize(f"127.0.0.1:{port}", 2, pid)
mesh = sharding.make_mesh("data=2,fsdp=-1")
local = {"x": np.full((2, 3), pid, np.int32)}  # each process owns 2 of the 4 global rows
batch = distributed.global_batch_from_local(local, mesh, P(("data", "fsdp")))
assert batch["x"].shape == (4, 3), batch["x"].shape
total = jax.jit(lambda x: x.sum(), out_shardings=jax.sharding.NamedSharding(mesh, P()))(batch["x"])
assert int(total) == 6, int(total)  # rows of process 1 count once each: 2 rows * 3 cols * 1
assert distributed.any_process(pid == 1)
print("ok", pid)
"""


@pytest.mark.slow
def test_two_processes_gloo(tmp_path):
    """Two CPU processes join through initialize() and build one global batch (the pod path, on one machine)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(port), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0 and f"ok {i}" in out, out[-3000:]
