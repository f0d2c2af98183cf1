"""TitansLM and its layers: causality, streaming == parallel, shapes, parameter counts, baselines, bad configs."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import titans_jax.nn.memory_layer as memory_layer
from titans_jax import NeuralMemory, TitansLM, count_params, generate, get_config
from titans_jax.configs import PAPER_SIZES, VARIANTS, ModelConfig
from titans_jax.generate import _step
from titans_jax.memory import memory_scan

T = 29  # crosses chunk (4), segment (8) and window (8) boundaries, and is a multiple of none of them


def small(variant, **kw):
    base = dict(dim=32, num_layers=2, num_heads=2, chunk_size=4, segment_len=8, window=8, num_persistent=2,
                max_seq_len=64, memory_expansion=2)
    base.update(kw)
    return get_config(f"tiny-{variant}", **base)


def tokens(seed=0, b=2, t=T):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, 256, jnp.int32)


def stream(model, toks, pieces):
    graphdef, params = nnx.split(model)
    state = model.init_state(toks.shape[0])
    out, i = [], 0
    for n in pieces:
        logits, state = _step(graphdef, params, toks[:, i : i + n], state)
        out.append(logits)
        i += n
    assert i == toks.shape[1]
    return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_and_streaming_equals_parallel(variant):
    model = TitansLM(small(variant), nnx.Rngs(1))
    toks = tokens()
    fwd = jax.jit(lambda m, x: m(x))
    logits = fwd(model, toks)
    chex.assert_shape(logits, (2, T, 256))
    chex.assert_tree_all_finite(logits)
    assert logits.dtype == jnp.float32
    # Causality: changing every token after t leaves the logits at positions <= t unchanged.
    for t in (0, 9, 17):
        other = toks.at[:, t + 1 :].set((toks[:, t + 1 :] + 7) % 256)
        np.testing.assert_allclose(fwd(model, other)[:, : t + 1], logits[:, : t + 1], atol=1e-5)
        assert not np.allclose(fwd(model, other)[:, t + 1 :], logits[:, t + 1 :], atol=1e-3)
    # Streaming in pieces of 1, of 7, and of mixed sizes equals the parallel call.
    for pieces in ([1] * T, [7, 7, 7, 7, 1], [3, 1, 8, 5, 12]):
        np.testing.assert_allclose(stream(model, toks, pieces), logits, atol=2e-4, err_msg=str(pieces[:5]))


def test_gradient_causality_mac():
    """The gradient of the loss at position t with respect to the embeddings of later tokens is exactly zero."""
    model = TitansLM(small("mac"), nnx.Rngs(2))
    toks = tokens(3, b=1)
    t = 12

    graphdef, state = nnx.split(model)
    g = jax.grad(lambda s: nnx.merge(graphdef, s)(toks)[0, t].sum())(state)["embed"][...]
    later = np.setdiff1d(np.asarray(toks[0, t + 1 :]), np.asarray(toks[0, : t + 1]))
    assert later.size > 0
    np.testing.assert_array_equal(np.asarray(g)[later], 0.0)
    assert np.abs(np.asarray(g)[np.asarray(toks[0, : t + 1])]).sum() > 0


@pytest.mark.parametrize(("variant", "remat_every"), [("lmm", 3), ("mac", 1)])
def test_model_gradients_with_manual_memory_vjp_equal_autodiff(variant, remat_every, monkeypatch):
    """The whole model (layers scanned, memory vmapped over (batch, heads), MAC's segment scan around it) with the
    memory's hand-written backward against JAX's autodiff of the same forward, in float64."""
    with jax.enable_x64(True):
        model = TitansLM(small(variant, num_layers=1, memory_remat_every=remat_every), nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        toks = tokens(3)

        def loss(p):
            return jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p)(toks)) ** 2)

        results = {}
        for vjp in ("manual", "autodiff"):
            monkeypatch.setattr(memory_layer, "memory_scan", functools.partial(memory_scan, vjp=vjp))
            results[vjp] = jax.jit(jax.value_and_grad(loss))(params)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(results["manual"]),
                                jax.tree.leaves(results["autodiff"]), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-9 * float(jnp.max(jnp.abs(b)) + 1e-30),
                                       err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("variant", ["mac", "mag"])
def test_bfloat16_compute(variant):
    model = TitansLM(small(variant, dtype="bfloat16"), nnx.Rngs(0))
    logits = jax.jit(lambda m, x: m(x))(model, tokens())
    chex.assert_tree_all_finite(logits)
    assert logits.dtype == jnp.float32
    params = nnx.state(model, nnx.Param)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    ref = jax.jit(lambda m, x: m(x))(TitansLM(small(variant), nnx.Rngs(0)), tokens())
    assert float(jnp.mean(jnp.abs(logits - ref))) < 0.1 * float(jnp.mean(jnp.abs(ref)))


def _param_paths(model):
    return ["/".join(map(str, path)) for path, _ in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))]


def test_baselines_are_configs():
    transformer = TitansLM(small("transformer"), nnx.Rngs(0))
    assert not any("memory" in p or "persistent" in p for p in _param_paths(transformer))
    gdn = get_config("tiny-gated-deltanet")
    assert (gdn.variant, gdn.memory_depth, gdn.memory_momentum, gdn.memory_decay) == ("lmm", 1, False, True)
    dn = get_config("tiny-deltanet")
    assert (dn.memory_depth, dn.memory_momentum, dn.memory_decay) == (1, False, False)
    paths = _param_paths(TitansLM(small("lmm", memory_depth=1, memory_momentum=False, memory_decay=False)))
    assert not any("momentum_gate" in p or "decay_gate" in p for p in paths)


def test_linear_memory_without_momentum_and_decay_is_the_delta_rule():
    """W_t = W_{t-1} - lr_t * 2 (W_{t-1} k_t - v_t) k_t^T (row convention: W <- W - 2 lr k (k W - v)), read y_t = q_t W_t."""
    layer = NeuralMemory(8, heads=2, chunk_size=1, depth=1, rngs=nnx.Rngs(0), momentum=False, decay=False)
    x = jax.random.normal(jax.random.key(1), (1, 11, 8))
    p, _ = layer.project(x)
    y, st = layer.run_memory(p)
    for h in range(2):
        w = np.asarray(layer.initial_weights()[0][h], np.float64)
        for t in range(11):
            k, v, q = (np.asarray(a[0, t, h], np.float64) for a in (p.k, p.v, p.q))
            lr = float(p.lr[0, t, h, 0])
            w = w - 2 * lr * np.outer(k, k @ w - v)
            np.testing.assert_allclose(np.asarray(y[0, t, h]), q @ w, atol=1e-5)
        np.testing.assert_allclose(np.asarray(st.weights[0][0, h]), w, atol=1e-5)


def test_layer_gate_granularity_and_chunk_constant_gates():
    x = jax.random.normal(jax.random.key(2), (2, 13, 16))
    per_layer = NeuralMemory(16, heads=2, chunk_size=4, depth=2, expansion=2, rngs=nnx.Rngs(0), gate_granularity="layer")
    p, _ = per_layer.project(x)
    chex.assert_shape(p.lr, (2, 13, 2, 2))
    chex.assert_tree_all_finite(per_layer(x))
    const = NeuralMemory(16, heads=2, chunk_size=4, depth=2, expansion=2, rngs=nnx.Rngs(0), chunk_constant_gates=True)
    chex.assert_tree_all_finite(const(x))
    with pytest.raises(ValueError, match="cannot be streamed"):
        const.step(x[:, :1], const.init_stream(2))


def test_paper_preset_parameter_counts():
    """Counts from nnx.eval_shape against the closed form of the architecture (untied embeddings)."""
    for size, shape in PAPER_SIZES.items():
        d, layers, h = shape["dim"], shape["num_layers"], shape["num_heads"]
        cfg = get_config(f"{size}-transformer")
        hidden = cfg.mlp_hidden
        dense = 4 * d * d + 3 * d * hidden + 2 * d  # attention, SwiGLU, two norms
        expected = 2 * 32000 * d + d + layers * dense
        assert count_params(cfg) == expected, size
        mem = get_config(f"{size}-lmm")
        dh = d // h
        memory = 5 * d * d + 3 * (d * h + h) + 3 * 4 * d + h * 2 * dh * 4 * dh + d  # proj, gates, convs, W_0, out norm
        lmm_layer = memory + 3 * d * hidden + 2 * d + 128 * d
        assert count_params(mem) == 2 * 32000 * d + d + layers * lmm_layer, size
    # Sanity against the nominal sizes: the transformer is within 10% of its name.
    assert abs(count_params(get_config("340m-transformer")) / 340e6 - 1) < 0.1


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"dim": 30, "num_heads": 4}, "dim"),
        ({"window": 0}, "window"),
        ({"segment_len": -1}, "segment_len"),
        ({"variant": "rnn"}, "variant"),
        ({"variant": "mac", "chunk_size": 32, "segment_len": 16}, "chunk_size"),
        ({"variant": "mac", "chunk_size": 16, "segment_len": 40}, "segment_len"),
        ({"gate_granularity": "token"}, "gate_granularity"),
    ],
)
def test_invalid_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=f"ModelConfig.{field}"):
        ModelConfig(**{**ModelConfig().to_dict(), **overrides})


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown config"):
        get_config("tiny-rnn")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        get_config("tiny-mac", dimension=3)


def test_generate_greedy_is_deterministic_and_matches_argmax():
    model = TitansLM(small("mag"), nnx.Rngs(0))
    prompt = tokens(5, b=1, t=6)
    out = generate(model, prompt, 5, temperature=0.0)
    chex.assert_shape(out, (1, 11))
    np.testing.assert_array_equal(out[:, :6], prompt)
    # Each greedy token is the argmax of the parallel logits at the previous position (causal, so one call suffices).
    np.testing.assert_array_equal(out[0, 6:], jnp.argmax(model(out)[0, 5:10], axis=-1))
    sampled = generate(model, prompt, 5, temperature=1.0, top_k=3, rng=jax.random.key(1))
    np.testing.assert_array_equal(sampled, generate(model, prompt, 5, temperature=1.0, top_k=3, rng=jax.random.key(1)))
    with pytest.raises(ValueError, match="top_k"):
        generate(model, prompt, 2, top_k=0)


def test_bad_tokens():
    model = TitansLM(small("lmm"), nnx.Rngs(0))
    with pytest.raises(ValueError, match="tokens must be an int array"):
        model(jnp.ones((2, 3)))
