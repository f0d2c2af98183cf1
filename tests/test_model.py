"""TitansLM, its mixers and the NeuralMemory layer: causality, streaming == parallel, MAC's memory tokens, gate
granularities, shapes, parameter layout and counts, baselines, bad configs.

Compiled functions are shared: ``_forward`` and ``TitansLM.step`` are jitted once (module level, and per model structure),
and tests that use the same config and shapes (``small(variant)``, batch 2, T = 29 or pieces of 1 / 7 / 12 tokens) hit
their caches.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from titans_jax import MemoryConfig, NeuralMemory, TitansLM, count_params, get_config
from titans_jax.configs import PAPER_SIZES, ModelConfig

T = 29  # crosses chunk (4), segment (8) and window (8) boundaries, and is a multiple of none of them

# Streaming and parallel logits differ by float32 reordering only (observed <= 1.1e-5 at logits of scale ~4, the
# memory's chunk-parallel form against its token-by-token update, summed over 2 layers): 2e-4 leaves a 20x margin.
STREAM_ATOL = 2e-4
# Logits at positions <= t do not depend on later tokens at all: the same operations on the same inputs, masked terms
# exactly zero. Any leak moves them by ~1e-2 or more.
CAUSAL_ATOL = 1e-5

# MAC's memory tokens per segment of 8: one per token (r = 1, the computation before N_l was offered), the default
# segment_len // 2 (r = 2) and one per segment (r = 8: only the segment's last token sees it).
MAC_CASES = {"mac-r1": dict(mac_memory_tokens=8), "mac-r2": {}, "mac-r8": dict(mac_memory_tokens=1)}
CASES = {"lmm": ("lmm", {}), **{k: ("mac", v) for k, v in MAC_CASES.items()}, "mag": ("mag", {}), "mal": ("mal", {}),
         "transformer": ("transformer", {}), "swa": ("swa", {})}


def small(variant, **kw):
    """A small model of ``variant``. The memory keeps every chunk-start state (``memory_remat_every=1``): larger remat
    groups are traced out chunk by chunk and compile slower, and they compute the same values (held together in
    tests/test_memory_scan.py and tests/test_dual_vjp.py, and at model level by the manual-backward test below)."""
    base = dict(dim=32, num_layers=2, num_heads=2, chunk_size=4, segment_len=8, window=8, num_persistent=2,
                max_seq_len=64, memory_expansion=2, memory_remat_every=1)
    base.update(kw)
    return get_config(f"tiny-{variant}", **base)


def tokens(seed=0, b=2, t=T):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, 256, jnp.int32)


_forward = jax.jit(lambda m, x: m(x))
_resumed = jax.jit(lambda m, x, st: m(x, state=st))
_from_fresh = jax.jit(lambda m, x: m(x, return_state=True))


def stream(model, toks, pieces):
    """Logits and final state of ``model.step`` over ``pieces``: one token takes the per-token path, more the parallel
    path from the state."""
    state = model.init_state(toks.shape[0])
    out, i = [], 0
    for n in pieces:
        logits, state = model.step(toks[:, i : i + n], state)
        out.append(logits)
        i += n
    assert i == toks.shape[1]
    return jnp.concatenate(out, axis=1), state


def assert_states_close(a, b, atol, what):
    """Every leaf of two decoding states: integer leaves (positions, slot positions) exactly, float leaves to atol."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.issubdtype(x.dtype, jnp.integer):
            np.testing.assert_array_equal(x, y, err_msg=what)
        else:
            np.testing.assert_allclose(x, y, atol=atol, err_msg=what)


@pytest.mark.parametrize("case", list(CASES))
def test_causal_and_streaming_equals_parallel(case):
    variant, kw = CASES[case]
    model = TitansLM(small(variant, **kw), rngs=nnx.Rngs(1))
    toks = tokens()
    logits = _forward(model, toks)
    chex.assert_shape(logits, (2, T, 256))
    chex.assert_tree_all_finite(logits)
    assert logits.dtype == jnp.float32
    # Causality: changing every token after t leaves the logits at positions <= t unchanged.
    for t in (0, 9, 17):
        other = toks.at[:, t + 1 :].set((toks[:, t + 1 :] + 7) % 256)
        changed = _forward(model, other)
        np.testing.assert_allclose(changed[:, : t + 1], logits[:, : t + 1], atol=CAUSAL_ATOL)
        assert not np.allclose(changed[:, t + 1 :], logits[:, t + 1 :], atol=1e-3)
    # Streaming in pieces of 1, of 7, and of mixed sizes (one of them longer than a segment, chunk and window, the
    # others starting at every phase of them) equals the parallel call, and leaves the same state as token by token.
    _, state_tokens = stream(model, toks, [1] * T)
    for pieces in ([1] * T, [7, 7, 7, 7, 1], [1, 12, 7, 1, 7, 1]):
        streamed, state = stream(model, toks, pieces)
        np.testing.assert_allclose(streamed, logits, atol=STREAM_ATOL, err_msg=str(pieces[:5]))
        assert_states_close(state, state_tokens, STREAM_ATOL, f"state after {pieces[:5]}")
    # The parallel call carrying its state across two pieces (split inside a chunk, segment and window).
    first, state = _from_fresh(model, toks[:, :7])
    second, state = _resumed(model, toks[:, 7:], state)
    np.testing.assert_allclose(jnp.concatenate([first, second], axis=1), logits, atol=STREAM_ATOL)
    assert_states_close(state, state_tokens, STREAM_ATOL, "state after model(x, state=...)")


@pytest.mark.parametrize("mac_memory_tokens", [8, 4], ids=["r1", "r2"])
def test_gradient_causality_mac(mac_memory_tokens):
    """The gradient of the loss at position t with respect to the embeddings of later tokens is exactly zero."""
    model = TitansLM(small("mac", mac_memory_tokens=mac_memory_tokens), rngs=nnx.Rngs(2))
    toks = tokens(3, b=1)
    t = 12  # inside the second segment, at the first token of its group when r = 2: h of that group is not visible yet

    graphdef, embed, rest = nnx.split(model, lambda path, _: path[0] == "embed", ...)
    g = jax.jit(jax.grad(lambda e: nnx.merge(graphdef, e, rest)(toks)[0, t].sum()))(embed)["embed"][...]
    later = np.setdiff1d(np.asarray(toks[0, t + 1 :]), np.asarray(toks[0, : t + 1]))
    assert later.size > 0
    np.testing.assert_array_equal(np.asarray(g)[later], 0.0)
    assert np.abs(np.asarray(g)[np.asarray(toks[0, : t + 1])]).sum() > 0


@pytest.mark.parametrize(("variant", "remat_every"), [("lmm", 3), ("mac", 1)])
def test_model_gradients_with_manual_memory_vjp_equal_autodiff(variant, remat_every):
    """The whole model (layers scanned, memory vmapped over (batch, heads), MAC's segment scan around it) with the
    memory's hand-written backward (``memory_impl="dual"``) against JAX's autodiff of the same forward
    (``"dual_autodiff"``), in float64 end to end (activations too: with float32 activations the two programs' float32
    reductions outside the memory may be ordered differently, a 1-ulp difference that says nothing of the backward)."""
    with jax.enable_x64(True):
        toks = tokens(3)
        results = {}
        for impl in ("dual", "dual_autodiff"):
            model = TitansLM(small(variant, num_layers=1, memory_remat_every=remat_every, memory_impl=impl,
                                   dtype="float64"), rngs=nnx.Rngs(0))
            graphdef, params = nnx.split(model)
            params = jax.tree.map(lambda a: a.astype(jnp.float64), params)

            def loss(p, graphdef=graphdef):
                return jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p)(toks)) ** 2)

            results[impl] = jax.jit(jax.value_and_grad(loss))(params)
        # float64: the two backward passes agree to rounding (<= 1.3e-15 of scale measured); 1e-9 still flags any
        # missing or wrong term, which moves a gradient by O(1) of its scale.
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(results["dual"]),
                                jax.tree.leaves(results["dual_autodiff"]), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-9 * float(jnp.max(jnp.abs(b)) + 1e-30),
                                       err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("variant", ["mac", "mag"])
def test_bfloat16_compute(variant):
    model = TitansLM(small(variant, dtype="bfloat16"), rngs=nnx.Rngs(0))
    logits = _forward(model, tokens())
    chex.assert_tree_all_finite(logits)
    assert logits.dtype == jnp.float32
    params = nnx.state(model, nnx.Param)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    ref = _forward(TitansLM(small(variant), rngs=nnx.Rngs(0)), tokens())
    # bfloat16 keeps 8 bits of mantissa (relative rounding 4e-3 per op) through 2 layers: a mean error of 10% of the
    # logits' mean size would be a dtype bug (a float32-only path fed bfloat16), not rounding.
    assert float(jnp.mean(jnp.abs(logits - ref))) < 0.1 * float(jnp.mean(jnp.abs(ref)))


def _param_paths(model):
    def name(k):
        return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))

    return ["/".join(map(name, path)) for path, _ in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))]


def test_baselines_are_configs():
    transformer = TitansLM(small("transformer"), rngs=nnx.Rngs(0))
    assert not any("memory" in p or "persistent" in p for p in _param_paths(transformer))
    gdn = get_config("tiny-gated-deltanet")
    assert (gdn.variant, gdn.memory_depth, gdn.memory_momentum, gdn.memory_decay) == ("lmm", 1, False, True)
    dn = get_config("tiny-deltanet")
    assert (dn.memory_depth, dn.memory_momentum, dn.memory_decay) == (1, False, False)
    # Like the published models: an empty initial memory (no learned W_0) and no persistent tokens, at every size.
    for size in ("tiny", *PAPER_SIZES):
        for name in ("gated-deltanet", "deltanet"):
            cfg = get_config(f"{size}-{name}")
            assert (cfg.memory_learned_init, cfg.num_persistent) == (False, 0), (size, name)
    paths = _param_paths(TitansLM(get_config("tiny-gated-deltanet", dim=32, num_layers=1), rngs=nnx.Rngs(0)))
    assert not any("memory_init" in p or "persistent" in p for p in paths)
    paths = _param_paths(TitansLM(small("lmm", memory_depth=1, memory_momentum=False, memory_decay=False),
                                  rngs=nnx.Rngs(0)))
    assert not any("momentum_gate" in p or "decay_gate" in p for p in paths)


def test_parameter_layout():
    """Block parameters sit under ``blocks/{mixer_norm, mixer, mlp_norm, mlp}``; W_0 of memory matrix l is
    ``blocks/mixer/memory/memory_init/l`` (an ``nnx.List``), and is no parameter at all with ``learned_init=False``."""
    paths = _param_paths(TitansLM(small("mag", memory_depth=2), rngs=nnx.Rngs(0)))
    tops = {p.split("/")[0] for p in paths}
    assert tops == {"embed", "blocks", "final_norm", "unembed"}, tops
    assert {p.split("/")[1] for p in paths if p.startswith("blocks/")} == {"mixer_norm", "mixer", "mlp_norm", "mlp"}
    for l in range(2):
        assert f"blocks/mixer/memory/memory_init/{l}/value" in paths, paths
    for name in ("persistent", "attn_out_norm", "memory_out_norm"):
        assert f"blocks/mixer/{name}/value" in paths


def test_rngs_are_required():
    with pytest.raises(TypeError, match=r"rngs=nnx.Rngs\(seed\)"):
        TitansLM(small("lmm"))


def test_linear_memory_without_momentum_and_decay_is_the_delta_rule():
    """W_t = W_{t-1} - lr_t * 2 (W_{t-1} k_t - v_t) k_t^T (row convention: W <- W - 2 lr k (k W - v)), read y_t = q_t W_t."""
    layer = NeuralMemory(8, MemoryConfig(heads=2, chunk_size=1, depth=1, momentum=False, decay=False),
                         rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 11, 8))

    @jax.jit
    def run(layer, x):
        p, _ = layer.project(x)
        return p, layer.run_memory(p)

    p, (y, st) = run(layer, x)
    for h in range(2):
        w = np.asarray(layer.initial_weights()[0][h], np.float64)
        for t in range(11):
            k, v, q = (np.asarray(a[0, t, h], np.float64) for a in (p.k, p.v, p.q))
            lr = float(p.lr[0, t, h, 0])
            w = w - 2 * lr * np.outer(k, k @ w - v)
            np.testing.assert_allclose(np.asarray(y[0, t, h]), q @ w, atol=1e-5)
        np.testing.assert_allclose(np.asarray(st.weights[0][0, h]), w, atol=1e-5)


def _layer_outputs(layer, x):
    """The layer's parallel output, its streamed output and the projected gates. Streamed in pieces of 1, 5, 1 and the
    rest: single tokens take the per-token update, longer pieces the chunked path from the stream (both starting
    inside a chunk of 4)."""
    @jax.jit
    def run(layer, x):
        p, _ = layer.project(x)
        y_par = layer(x)
        st = layer.init_stream(x.shape[0])
        ys = []
        for lo, hi in ((0, 1), (1, 6), (6, 7), (7, x.shape[1])):
            y, st = layer.step(x[:, lo:hi], st)
            ys.append(y)
        return p, y_par, jnp.concatenate(ys, axis=1)

    return run(layer, x)


def test_empty_initial_memory():
    """``learned_init=False`` (the DeltaNet baselines): no W_0 parameter, every sequence starts from W_0 = 0, and the
    layer streams like its parallel form."""
    empty = NeuralMemory(16, MemoryConfig(heads=2, chunk_size=4, depth=1, momentum=False, learned_init=False),
                         rngs=nnx.Rngs(0))
    assert not any("memory_init" in p for p in _param_paths(empty))
    assert all(not np.any(np.asarray(w)) for w in empty.initial_weights())
    _, y, y_stream = _layer_outputs(empty, jax.random.normal(jax.random.key(3), (2, 13, 16)))
    np.testing.assert_allclose(y_stream, y, atol=STREAM_ATOL)


def test_gate_granularities_and_chunk_constant_gates():
    """Per-layer gates (one theta, eta, alpha per memory matrix) and channel-wise forgetting (one alpha per output
    channel of every matrix, theta and eta per head) run, stream like their parallel form, and chunk-constant gates
    refuse to stream."""
    x = jax.random.normal(jax.random.key(2), (2, 13, 16))
    base = MemoryConfig(heads=2, chunk_size=4, depth=2, expansion=2)
    per_layer = NeuralMemory(16, dataclasses.replace(base, gate_granularity="layer"), rngs=nnx.Rngs(0))
    p, y, y_stream = _layer_outputs(per_layer, x)
    chex.assert_shape((p.lr, p.momentum, p.decay), (2, 13, 2, 2))
    chex.assert_tree_all_finite(y)
    np.testing.assert_allclose(y_stream, y, atol=STREAM_ATOL)
    channel = NeuralMemory(16, dataclasses.replace(base, gate_granularity="channel"), rngs=nnx.Rngs(0))
    d_out = 2 * 8 + 8  # head dim 8, expansion 2: W_1 [8, 16], W_2 [16, 8]
    chex.assert_shape(channel.decay_gate.kernel[...], (16, 2 * d_out))
    p, y, y_stream = _layer_outputs(channel, x)
    chex.assert_shape((p.lr, p.momentum), (2, 13, 2, 1))
    chex.assert_shape(p.decay, (2, 13, 2, d_out))
    chex.assert_tree_all_finite(y)
    np.testing.assert_allclose(y_stream, y, atol=STREAM_ATOL)
    const = NeuralMemory(16, dataclasses.replace(base, chunk_constant_gates=True), rngs=nnx.Rngs(0))
    chex.assert_tree_all_finite(jax.jit(lambda m, x: m(x))(const, x))
    with pytest.raises(ValueError, match="cannot be streamed"):
        const.step(x[:, :1], const.init_stream(2))
    with pytest.raises(ValueError, match="cannot be continued from a state"):
        const(x, state=const.init_stream(2))


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
        ({"mac_memory_tokens": 0}, "mac_memory_tokens"),
        ({"mac_memory_tokens": 1024, "segment_len": 512}, "mac_memory_tokens"),
        ({"mac_memory_tokens": 96, "segment_len": 512}, "mac_memory_tokens"),
        ({"variant": "mac", "chunk_size": 1, "segment_len": 15}, "mac_memory_tokens"),
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


def test_bad_tokens():
    model = TitansLM(small("lmm"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tokens must be an int array"):
        model(jnp.ones((2, 3)))


def test_size_matched_presets_land_within_ten_percent_of_their_size():
    """Every ``<size>-<variant>-matched`` preset counts within 10% of its nominal size, and its width follows the rule
    (the multiple of 64 whose count is closest to the size: the neighbours are farther; checked at 340m)."""
    from titans_jax.configs import MATCHED_DIMS, NOMINAL_SIZES

    assert len(MATCHED_DIMS) == len(PAPER_SIZES) * 8
    for (size, variant), dim in MATCHED_DIMS.items():
        cfg = get_config(f"{size}-{variant}-matched")
        assert cfg == get_config(f"{size}-{variant}", dim=dim)
        miss = abs(count_params(cfg) / NOMINAL_SIZES[size] - 1)
        assert miss < 0.1, (size, variant, miss)
        if size == "340m":
            for other in (dim - 64, dim + 64):
                assert abs(count_params(get_config(f"{size}-{variant}", dim=other)) / NOMINAL_SIZES[size] - 1) >= miss
