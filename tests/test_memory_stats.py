"""Memory statistics (docs/architecture.md, "Memory statistics"): the pure function against the token-by-token
reference recurrence, chunk by chunk (float64); pooling; the model-level walk (finite values for every layer, the
gates at their initial values, the same logits as the model); the trainer writes them into metrics.jsonl."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from memory_cases import make_inputs

from titans_jax.configs import get_config
from titans_jax.diagnostics import STAT_NAMES, layers_of, memory_stats, stat_key
from titans_jax.memory import associative_loss, linear_memory, memory_scan_reference, mlp_memory
from titans_jax.memory.stats import ScanStats, memory_scan_stats, pool
from titans_jax.model import TitansLM
from titans_jax.train.config import TrainConfig, apply_overrides, load_config
from titans_jax.train.metrics import read_metrics

T, CHUNK, DIM = 11, 4, 8  # chunks of 4, 4 and a last partial one of 3

# Jitted (the net and the chunk size static): one compile per shape instead of op-by-op dispatch.
_stats = jax.jit(memory_scan_stats, static_argnums=0, static_argnames="chunk_size")
_reference = jax.jit(memory_scan_reference, static_argnums=0, static_argnames="chunk_size")


def _token_loss(net, weights, k, v):
    """Mean over tokens of the per-token associative loss (paper Eq. 12), computed directly."""
    return float(associative_loss(net, weights, k, v)) / k.shape[0]


def _norm(tree):
    return math.sqrt(sum(float(jnp.sum(x * x)) for x in tree))


@pytest.mark.parametrize("net", [linear_memory(DIM), mlp_memory(DIM, 2, 2)], ids=["linear", "mlp"])
def test_stats_equal_a_direct_computation_with_the_reference(net):
    with jax.enable_x64(True):
        params = net.init(jax.random.key(1), jnp.float64)
        q, k, v, lr, mom, dec = make_inputs(T, DIM, jnp.float64, seed=2)
        y, state, stats = _stats(net, params, q, k, v, lr, mom, dec, chunk_size=CHUNK)

        # Chunk by chunk with the oracle: its state after a chunk is the next chunk's start W_c.
        w_c, st, before, after = params, None, [], []
        for lo in range(0, T, CHUNK):
            sl = slice(lo, lo + CHUNK)
            _, st = _reference(net, params, q[sl], k[sl], v[sl], lr[sl], mom[sl], dec[sl],
                                          chunk_size=CHUNK, state=st)
            n = k[sl].shape[0]
            before.append(n * _token_loss(net, w_c, k[sl], v[sl]))
            after.append(n * _token_loss(net, st.weights, k[sl], v[sl]))
            w_c = st.weights
        y_ref, st_ref = _reference(net, params, q, k, v, lr, mom, dec, chunk_size=CHUNK)

        np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)  # the outputs and state of memory_scan
        for a, b in zip(state.weights + state.momentum, st_ref.weights + st_ref.momentum, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(stats.loss_before, sum(before) / T, rtol=1e-10)
        np.testing.assert_allclose(stats.loss_after, sum(after) / T, rtol=1e-10)
        np.testing.assert_allclose([stats.theta, stats.eta, stats.alpha], [lr.mean(), mom.mean(), dec.mean()],
                                   rtol=1e-12)
        np.testing.assert_allclose(stats.w_norm, _norm(st_ref.weights), rtol=1e-10)
        np.testing.assert_allclose(stats.s_norm, _norm(st_ref.momentum), rtol=1e-10)
        assert float(stats.tokens) == T

        # One chunk: the loss before is the loss at W_0, the loss after the loss at the weights after the chunk.
        _, st1, one = _stats(net, params, q[:CHUNK], k[:CHUNK], v[:CHUNK], lr[:CHUNK], mom[:CHUNK],
                                        dec[:CHUNK], chunk_size=CHUNK)
        np.testing.assert_allclose(one.loss_before, _token_loss(net, params, k[:CHUNK], v[:CHUNK]), rtol=1e-10)
        np.testing.assert_allclose(one.loss_after, _token_loss(net, st1.weights, k[:CHUNK], v[:CHUNK]), rtol=1e-10)
        assert float(one.loss_after) < float(one.loss_before)  # one chunk of gradient steps on its own keys

        # length=n counts the first n tokens only and leaves the state where the n-th token left it.
        n = 6
        _, st_n, part = _stats(net, params, q, k, v, lr, mom, dec, chunk_size=CHUNK, length=n)
        _, st_cut, cut = _stats(net, params, q[:n], k[:n], v[:n], lr[:n], mom[:n], dec[:n],
                                           chunk_size=CHUNK)
        for name in ScanStats._fields:
            np.testing.assert_allclose(getattr(part, name), getattr(cut, name), rtol=1e-10, err_msg=name)
        for a, b in zip(st_n.weights + st_n.momentum, st_cut.weights + st_cut.momentum, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_per_matrix_gates_and_channel_wise_forgetting():
    """Gate means cover every column: one gate set per memory matrix, one alpha per output channel."""
    net = mlp_memory(DIM, 2, 2)
    with jax.enable_x64(True):
        params = net.init(jax.random.key(3), jnp.float64)
        q, k, v, lr, mom, _ = make_inputs(T, DIM, jnp.float64, seed=4)
        lr2, mom2 = (lr, 0.5 * lr), (mom, 0.5 * mom)
        dec = tuple(0.1 * jax.random.uniform(jax.random.key(5 + l), (T, o), jnp.float64)
                    for l, (_, o) in enumerate(net.layer_shapes))
        y, _, stats = _stats(net, params, q, k, v, lr2, mom2, dec, chunk_size=CHUNK)
        y_ref, st_ref = _reference(net, params, q, k, v, lr2, mom2, dec, chunk_size=CHUNK)
        np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(stats.w_norm, _norm(st_ref.weights), rtol=1e-10)
        np.testing.assert_allclose(stats.theta, 0.75 * lr.mean(), rtol=1e-12)
        np.testing.assert_allclose(stats.eta, 0.75 * mom.mean(), rtol=1e-12)
        all_alpha = np.concatenate([np.asarray(d).ravel() for d in dec])
        np.testing.assert_allclose(stats.alpha, all_alpha.mean(), rtol=1e-12)


def test_pool_weights_by_tokens():
    s = ScanStats(*(jnp.asarray(x, jnp.float32) for x in (
        [1.0, 3.0], [0.5, 0.5], [0.0, 0.2], [4.0, 1.0], [2.0, 1.0], [10.0, 20.0], [1.0, 2.0], [1.0, 3.0])))
    mean = pool(s)
    np.testing.assert_allclose([mean.theta, mean.alpha, mean.loss_before, mean.tokens], [2.5, 0.15, 1.75, 4.0])
    np.testing.assert_allclose([mean.w_norm, mean.s_norm], [15.0, 1.5])
    last = pool(s, norms="last")
    np.testing.assert_allclose([last.w_norm, last.s_norm, last.theta], [20.0, 2.0, 2.5])
    with pytest.raises(ValueError, match="norms must be"):
        pool(s, norms="first")


def _small(variant):
    # MAC: T = 29 leaves the last of 4 segments of 8 padded (its padding must not count).
    return get_config(f"tiny-{variant}", dim=32, num_layers=2, num_heads=2, chunk_size=4, segment_len=8, window=8,
                      num_persistent=2, max_seq_len=64, memory_expansion=2, memory_remat_every=1)


@pytest.mark.parametrize("variant", ["lmm", "mac"])
def test_model_stats_for_every_layer(variant):
    model = TitansLM(_small(variant), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 29), 0, 256, jnp.int32)
    stats = memory_stats(model, tokens)
    assert sorted(stats) == sorted(stat_key(layer, name) for layer in range(2) for name in STAT_NAMES)
    assert all(math.isfinite(v) for v in stats.values()), stats
    for layer, s in layers_of(stats).items():
        # The gates' initial values (docs/architecture.md, "NeuralMemory layer"): weights N(0, 0.02^2) around them.
        np.testing.assert_allclose([s["theta"], s["eta"], s["alpha"]], [0.05, 0.9, 0.001], rtol=0.05,
                                   err_msg=f"layer {layer}")
        assert 0 < s["loss_after"] < s["loss_before"], s
        assert s["w_norm"] > 0 and s["s_norm"] > 0
    # The walk computes what the model computes: the same logits.
    logits, _ = jax.jit(lambda m, x: m.forward_with_memory_stats(x))(model, tokens)
    np.testing.assert_allclose(logits, jax.jit(lambda m, x: m(x))(model, tokens), rtol=1e-5, atol=1e-5)


def test_model_without_memory_and_bad_tokens():
    with pytest.raises(ValueError, match="has none"):
        memory_stats(TitansLM(_small("swa"), rngs=nnx.Rngs(0)), jnp.zeros((1, 8), jnp.int32))
    with pytest.raises(ValueError, match=r"tokens_BxT must be an int array of shape \[batch, time\]"):
        memory_stats(TitansLM(_small("lmm"), rngs=nnx.Rngs(0)), jnp.zeros((8,), jnp.int32))


def test_flag_and_overrides():
    cfg = load_config("tiny-mac")
    assert cfg.train.memory_stats is True
    assert apply_overrides(cfg, ["train.memory_stats=false"]).train.memory_stats is False
    with pytest.raises(ValueError, match="TrainConfig.memory_stats"):
        TrainConfig(memory_stats="yes")


class _Batches:
    """A resumable iterator of fixed batches (what the trainer's data must offer)."""

    def __init__(self, batch):
        self.batch, self.i = batch, 0

    def __next__(self):
        self.i += 1
        return self.batch

    def get_state(self):
        return {"i": self.i}

    def set_state(self, s):
        self.i = s["i"]


def test_training_writes_memory_stats(tmp_path):
    """Every log step's record holds every memory layer's statistics (the trainer's mesh puts the batch on 8 devices,
    so the memory runs under shard_map; seq_len 32 < segment_len 64 pads MAC's one segment; with gradient
    accumulation the statistics take the first micro-batch)."""
    from titans_jax.train.trainer import train

    cfg = apply_overrides(load_config("tiny-mac"), [
        "model.dim=32", "model.num_layers=1", "train.steps=2", "train.batch_size=8", "train.seq_len=32",
        "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=0", "train.sample_tokens=0",
        "train.grad_accum=2"])
    batch = {"tokens": np.random.default_rng(0).integers(0, 256, (8, 33), dtype=np.int32)}
    train(cfg, tmp_path / "run", data=(_Batches(batch), [batch]))
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        layers = layers_of(r)
        assert list(layers) == [0] and sorted(layers[0]) == sorted(STAT_NAMES), r
        assert all(math.isfinite(v) for v in layers[0].values()), r
