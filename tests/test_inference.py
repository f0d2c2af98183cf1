"""Stateful use of TitansLM beyond streaming == parallel (tests/test_model.py holds that for every variant):
inputs as embeddings, the compiled ``step`` (bounded memory over many eager calls, the same inside an outer jit), and
the stateful parallel call on a mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from titans_jax import TitansLM, get_config
from titans_jax.model import _step
from titans_jax.sharding import make_mesh

ATOL = 2e-4  # float32 reordering between the parallel and streaming forms (tests/test_model.py, STREAM_ATOL)


@functools.cache
def _model(variant="lmm"):
    cfg = get_config(f"tiny-{variant}", dim=32, num_layers=1, num_heads=2, chunk_size=4, segment_len=8, window=8,
                     num_persistent=2, max_seq_len=64, memory_expansion=2, memory_remat_every=1)
    return TitansLM(cfg, rngs=nnx.Rngs(0))


def _tokens(b=2, t=13, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, 256, jnp.int32)


def test_embeddings_in_place_of_tokens():
    """``embeddings=`` feeds vectors past the token embedding: the embedded ids give the ids' logits, in the parallel
    call and in ``step``; exactly one of the two inputs is accepted."""
    model = _model("mac")
    toks = _tokens()
    emb = model.embed[...][toks]
    np.testing.assert_allclose(jax.jit(lambda m, e: m(embeddings=e))(model, emb), jax.jit(lambda m, t: m(t))(model, toks),
                               atol=1e-6)
    st = model.init_state(2)
    a, _ = model.step(None, st, embeddings=emb[:, :5])
    b, _ = model.step(toks[:, :5], st)
    np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one of tokens"):
        model(toks, embeddings=emb)
    with pytest.raises(ValueError, match=r"embeddings must be \[batch, time, dim=32\]"):
        model(embeddings=emb[..., :8])


def _rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_eager_step_compiles_once_and_memory_stays_flat():
    """1,000 single-token ``step`` calls from Python (as a notebook user streams text): one compilation, and the
    resident size after 1,000 calls within 50 MiB of that after 100 (each call used to trace and compile again, adding
    about 8 MiB)."""
    model = _model("lmm")
    state = model.init_state(1)
    tok = jnp.zeros((1, 1), jnp.int32)
    logits, state = model.step(tok, state)
    compiled = _step._cache_size()
    for i in range(1000):
        logits, state = model.step(tok, state)
        if i == 99:
            jax.block_until_ready(logits)
            after_100 = _rss_mib()
    jax.block_until_ready(logits)
    grew = _rss_mib() - after_100
    assert _step._cache_size() == compiled, "step was traced and compiled again"
    assert grew < 50, f"resident size grew by {grew:.1f} MiB between call 100 and call 1,000"
    assert int(state.memory.pos[0]) == 1001 + model.config.num_persistent  # the memory read the persistent tokens first


def test_step_inside_an_outer_jit_equals_eager():
    model = _model("mag")
    toks = _tokens(t=6)
    st = model.init_state(2)
    eager = model.step(toks[:, :1], st)[0], model.step(toks, st)[0]
    outer = jax.jit(lambda m, t, s: (m.step(t[:, :1], s)[0], m.step(t, s)[0]))(model, toks, st)
    for a, b in zip(eager, outer, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_stateful_call_on_a_mesh_equals_one_device():
    """The stateful parallel call runs the memory under ``shard_map`` on a mesh (batch over data, heads over tensor)
    and gives the single-device results."""
    model = _model("mal")
    toks = _tokens(b=4, t=11)
    mesh = make_mesh("data=2,tensor=2", devices=jax.devices()[:4])
    run = jax.jit(lambda m, a, b, mesh=None: _two_pieces(m, a, b, mesh), static_argnames="mesh")
    plain = run(model, toks[:, :6], toks[:, 6:])
    sharded = run(model, toks[:, :6], toks[:, 6:], mesh=mesh)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL)


def _two_pieces(model, a, b, mesh):
    la, st = model(a, return_state=True, mesh=mesh)
    lb, st = model(b, state=st, mesh=mesh)
    return la, lb, st


def test_stateful_errors_name_the_problem():
    """A state of another batch size, an empty piece, and more tokens than a transformer's cache has slots."""
    model = _model("lmm")
    toks = _tokens(b=2, t=6)
    with pytest.raises(ValueError, match=r"batch size 3 but tokens have batch size 2.*init_state\(2\)"):
        model(toks, state=model.init_state(3))
    with pytest.raises(ValueError, match="tokens must hold at least one position"):
        model.step(toks[:, :0], model.init_state(2))
    transformer = _model("transformer")
    with pytest.raises(ValueError, match="do not fit the transformer's KV cache of max_seq_len=64"):
        transformer(_tokens(b=1, t=65), state=transformer.init_state(1))


def test_float64_mac_continues_from_a_state():
    """A float64 model (the tight checks' dtype) keeps every carry in float64 and its positions in int32 under
    ``jax_enable_x64``: MAC read in two pieces equals one call to rounding."""
    with jax.enable_x64(True):
        cfg = _model("mac").config.replace(dtype="float64")
        model = TitansLM(cfg, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(model)
        model = nnx.merge(graphdef, jax.tree.map(
            lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a, state))
        toks = _tokens(t=13)
        whole = jax.jit(lambda m, t: m(t))(model, toks)
        first, st = jax.jit(lambda m, t: m(t, return_state=True))(model, toks[:, :5])
        second, st = jax.jit(lambda m, t, s: m(t, state=s))(model, toks[:, 5:], st)
        np.testing.assert_allclose(jnp.concatenate([first, second], axis=1), whole, atol=1e-10)
        assert st.memory.pos.dtype == jnp.int32 and st.x_cache.slot_pos.dtype == jnp.int32
