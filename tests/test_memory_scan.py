"""The chunked memory recurrence against the token-by-token oracle (paper Sec. 3.2; docs/architecture.md, "The memory
recurrence").

Tolerances. In float64 every implementation differs from the oracle only by summation order, so they agree to ~1e-12
(the deep memory's LayerNorm amplifies rounding by 1/sigma, hence 1e-9 rather than 1e-14): these are the tight checks.
In float32 a fixed tolerance is a coin toss across CPUs (how much rounding a case suffers depends on its conditioning and
on the machine's kernels), so float32 results are held to the float64 truth relative to the float32 oracle's own error
on the same inputs (``memory_cases.assert_as_accurate_as_oracle``): a fast path may be at most ``ORACLE_FACTOR`` times
less accurate than the oracle. Real formula errors show up at 1e-2 of the scale or worse.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from memory_cases import as_float64, assert_as_accurate_as_oracle, assert_close_scaled, make_inputs, outer_loss

from titans_jax.memory import (
    MemoryState,
    associative_loss,
    linear_memory,
    memory_scan,
    memory_scan_reference,
    mlp_memory,
)
from titans_jax.memory.dual import key_path_autodiff
from titans_jax.memory.networks import MemoryNet

NETS = {"linear": linear_memory(8), "mlp2": mlp_memory(8, 2, 2), "mlp3": mlp_memory(8, 3, 2)}


def _truth64(net, chunk, params, args, grads=True):
    """The oracle in float64 on the same (float32-valued) inputs: outputs, state and the outer loss's gradients."""
    ref = functools.partial(memory_scan_reference, chunk_size=chunk)
    with jax.enable_x64(True):
        params, args = as_float64((params, args))
        out = jax.jit(lambda *a: ref(net, params, *a))(*args)
        if not grads:
            return out, None
        return out, jax.jit(jax.grad(lambda *a: outer_loss(ref, net, *a), tuple(range(7))))(params, *args)


@functools.cache
def _oracle(net_name, chunk, t_len, seed):
    """Inputs, the float32 oracle and the float64 truth of one float32 case: shared by the impls compared to them."""
    net = NETS[net_name]
    params = net.init(jax.random.key(1 + seed))
    args = make_inputs(t_len, 8, seed=seed)  # theta <= 0.1 as the layer produces it; the float64 grid goes to 0.3
    ref = functools.partial(memory_scan_reference, chunk_size=chunk)
    out_r = jax.jit(lambda *a: ref(net, params, *a))(*args)
    g_r = jax.jit(jax.grad(lambda *a: outer_loss(ref, net, *a), tuple(range(7))))(params, *args)
    return params, args, (out_r, g_r), _truth64(net, chunk, params, args)


def _check_float32(variant, net_name, chunk, impl, t_len=37, seed=0):
    net = NETS[net_name]
    params, args, (out_r, g_r), (out_t, g_t) = _oracle(net_name, chunk, t_len, seed)
    fast = functools.partial(memory_scan, chunk_size=chunk, impl=impl)
    out = variant(lambda *a: fast(net, params, *a))(*args)
    g = variant(jax.grad(lambda *a: outer_loss(fast, net, *a), tuple(range(7))))(params, *args)
    assert_as_accurate_as_oracle(out[0], out_r[0], out_t[0], "outputs")
    assert_as_accurate_as_oracle(out[1], out_r[1], out_t[1], "final state")
    for name, a, r, t in zip(("params", "q", "k", "v", "lr", "momentum", "decay"), g, g_r, g_t, strict=True):
        assert_as_accurate_as_oracle(a, r, t, f"gradient wrt {name}")


class MemoryScanMatchesReference(chex.TestCase):
    @parameterized.parameters(
        ("linear", 3, "dual"), ("linear", 16, "dual"), ("mlp2", 3, "dual"), ("mlp2", 16, "dual"),
        ("linear", 3, "associative"), ("mlp2", 3, "associative"), ("mlp2", 16, "dual_autodiff"),
    )
    def test_float32_outputs_states_gradients(self, net, chunk, impl):
        _check_float32(jax.jit, net, chunk, impl)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(("linear", 3), ("mlp2", 4))
    def test_with_and_without_jit(self, net, chunk):
        _check_float32(self.variant, net, chunk, "dual", t_len=10)

    @parameterized.parameters(
        *[(net, chunk, "dual") for net in ("linear", "mlp2") for chunk in (1, 3, 16)],
        ("mlp2", 3, "associative"), ("linear", 16, "associative"), ("mlp3", 3, "dual"), ("mlp2", 3, "dual_autodiff"),
    )
    def test_float64(self, net, chunk, impl):
        net = NETS[net]
        with jax.enable_x64(True):
            params = net.init(jax.random.key(1), jnp.float64)
            args = make_inputs(37, 8, jnp.float64, lr_scale=0.3)
            fast = functools.partial(memory_scan, chunk_size=chunk, impl=impl)
            ref = functools.partial(memory_scan_reference, chunk_size=chunk)
            y, st = jax.jit(lambda *a: fast(net, params, *a))(*args)
            y_r, st_r = jax.jit(lambda *a: ref(net, params, *a))(*args)
            self.assertEqual(y.dtype, jnp.float64)
            self.assertEqual(st.weights[0].dtype, jnp.float64)
            chex.assert_trees_all_close(y, y_r, atol=1e-9, rtol=1e-9)
            chex.assert_trees_all_close(st, st_r, atol=1e-9, rtol=1e-9)
            g = jax.jit(jax.grad(lambda *a: outer_loss(fast, net, *a), tuple(range(7))))(params, *args)
            g_r = jax.jit(jax.grad(lambda *a: outer_loss(ref, net, *a), tuple(range(7))))(params, *args)
            # Per leaf, relative to its scale: float64 sums err relative to their largest terms (gradients reach 1e5).
            assert_close_scaled(g, g_r, 1e-10, "gradients")


def _exact_recurrence(net, params, q, k, v, lr, mom, dec):
    """Token by token with the gradient at W_{t-1}: paper Eq. 13-14 without any chunking, as a Python loop."""
    w, s = list(params), [jnp.zeros_like(p) for p in params]
    ys = []
    for t in range(q.shape[0]):
        u = jax.grad(lambda w_: associative_loss(net, w_, k[t : t + 1], v[t : t + 1]))(tuple(w))
        s = [mom[t] * s_l - lr[t] * u_l for s_l, u_l in zip(s, u, strict=True)]
        w = [(1 - dec[t]) * w_l + s_l for w_l, s_l in zip(w, s, strict=True)]
        ys.append(net.apply(w, q[t : t + 1])[0])
    return jnp.stack(ys), MemoryState(tuple(w), tuple(s))


@pytest.mark.parametrize("net", ["linear", "mlp2"])
def test_chunk_size_one_is_the_exact_recurrence(net):
    net = NETS[net]
    with jax.enable_x64(True):
        params = net.init(jax.random.key(2), jnp.float64)
        args = make_inputs(11, 8, jnp.float64, seed=3)
        y, st = memory_scan(net, params, *args, chunk_size=1)
        y_e, st_e = _exact_recurrence(net, params, *args)
        chex.assert_trees_all_close((y, st), (y_e, st_e), atol=1e-10)


@pytest.mark.parametrize("net", ["linear", "mlp2"])
@pytest.mark.parametrize("impl", ["dual", "associative"])
def test_state_chaining_equals_one_call(net, impl):
    net = NETS[net]
    params = net.init(jax.random.key(4))
    args = make_inputs(53, 8, seed=5)
    y, st = memory_scan(net, params, *args, chunk_size=4, impl=impl)
    cut = 20  # a multiple of the chunk: boundaries fall at the same places
    y1, st1 = memory_scan(net, params, *(a[:cut] for a in args), chunk_size=4, impl=impl)
    y2, st2 = memory_scan(net, params, *(a[cut:] for a in args), chunk_size=4, impl=impl, state=st1)
    chex.assert_trees_all_close(jnp.concatenate([y1, y2]), y, atol=1e-4)
    chex.assert_trees_all_close(st2, st, atol=1e-4)


def test_bfloat16_inputs_stay_close_to_float32():
    """bfloat16 inputs (8 mantissa bits: ~4e-3 relative rounding of q, k, v and gates) with float32 accumulation stay
    within 5e-2 of the float32 run; the state is float32 either way."""
    net = NETS["mlp2"]
    params = net.init(jax.random.key(6))
    args = make_inputs(48, 8, seed=7)
    y32, st32 = memory_scan(net, params, *args)
    y16, st16 = memory_scan(net, params, *(a.astype(jnp.bfloat16) for a in args))
    assert y16.dtype == jnp.bfloat16
    assert all(w.dtype == jnp.float32 for w in st16.weights)
    assert_close_scaled(y16.astype(jnp.float32), y32, 5e-2, "bf16 outputs")
    assert_close_scaled(st16, st32, 5e-2, "bf16 state")


class GateEdges(chex.TestCase):
    def setUp(self):
        self.net = NETS["mlp2"]
        self.params = self.net.init(jax.random.key(8))
        self.q, self.k, self.v, self.lr, self.mom, self.dec = make_inputs(19, 8, seed=9)

    def _run(self, lr, mom, dec, chunk=4):
        return memory_scan(self.net, self.params, self.q, self.k, self.v, lr, mom, dec, chunk_size=chunk)

    def test_lr_zero_never_writes(self):
        zeros = jnp.zeros_like(self.lr)
        y, st = self._run(zeros, self.mom, zeros)
        chex.assert_trees_all_close(st.weights, self.params)
        chex.assert_trees_all_close(y, self.net.apply(self.params, self.q), atol=1e-6)
        chex.assert_trees_all_equal(st.momentum, jax.tree.map(jnp.zeros_like, self.params))

    def test_decay_one_wipes_to_the_momentum(self):
        """alpha = 1: W_t = 0 * W_{t-1} + S_t, so after the call W equals S exactly.

        Ill-conditioned in float32 by construction: the wiped deep memory's last matrix is S alone (~theta), and the
        LayerNorm divides by its small spread. This case failed a fixed 1e-4 tolerance on an AMD EPYC (1.3e-4); it is
        held to the oracle's own float32 error instead, and exactly in float64."""
        ones = jnp.ones_like(self.dec)
        y, st = self._run(self.lr, self.mom, ones)
        chex.assert_trees_all_close(st.weights, st.momentum, atol=1e-7)
        args = (self.q, self.k, self.v, self.lr, self.mom, ones)
        ref = memory_scan_reference(self.net, self.params, *args, chunk_size=4)
        (y_t, st_t), _ = _truth64(self.net, 4, self.params, args, grads=False)
        assert_as_accurate_as_oracle((y, st), ref, (y_t, st_t), "alpha = 1")
        with jax.enable_x64(True):
            params, args = as_float64((self.params, args))
            fast = memory_scan(self.net, params, *args, chunk_size=4)
            chex.assert_trees_all_close(fast, memory_scan_reference(self.net, params, *args, chunk_size=4), atol=1e-9)
            chex.assert_trees_all_close(fast[1].weights, fast[1].momentum, atol=1e-15)

    def test_gradients_at_the_gate_edges(self):
        """alpha = 1 and eta = 0 are factors of exactly 0 in the within-chunk products; the derivative there is the
        product of the other factors, not 0 (products taken through logs once returned 0: found 2026-11-29 by
        experiments/probe_float32_error.py). Every input's gradient against the oracle, float64."""
        with jax.enable_x64(True):
            params, (q, k, v, lr, mom, dec) = as_float64((self.params, (self.q, self.k, self.v, self.lr, self.mom,
                                                                          self.dec)))
            grad_fns = [jax.jit(jax.grad(lambda *a, fn=fn: outer_loss(functools.partial(fn, chunk_size=4), self.net, *a),
                                         tuple(range(7)))) for fn in (memory_scan, memory_scan_reference)]
            for mom_, dec_ in ((mom, jnp.ones_like(dec)), (jnp.zeros_like(mom), dec), (mom.at[::3].set(0.0),
                                                                                         dec.at[1::4].set(1.0))):
                grads = [g(params, q, k, v, lr, mom_, dec_) for g in grad_fns]
                assert float(jnp.max(jnp.abs(grads[1][6]))) > 1.0  # the decay gradient is not zero there
                chex.assert_trees_all_close(grads[0], grads[1], atol=1e-8, rtol=1e-8)

    def test_decay_zero_momentum_zero_is_plain_minibatch_sgd(self):
        """eta = 0, alpha = 0: every chunk is one step of per-sample-weighted mini-batch SGD from its start."""
        zeros = jnp.zeros_like(self.lr)
        _, st = self._run(self.lr, zeros, zeros, chunk=19)
        u = jax.vmap(
            lambda k_t, v_t: jax.grad(lambda w: associative_loss(self.net, w, k_t[None], v_t[None]))(self.params)
        )(self.k, self.v)
        expect = tuple(p - jnp.einsum("t,t...->...", self.lr, g) for p, g in zip(self.params, u, strict=True))
        chex.assert_trees_all_close(st.weights, expect, atol=1e-4)

    def test_momentum_zero_keeps_only_the_last_chunk_surprise(self):
        zeros = jnp.zeros_like(self.lr)
        _, st = self._run(self.lr, zeros, self.dec, chunk=19)
        u_last = jax.grad(lambda w: associative_loss(self.net, w, self.k[-1:], self.v[-1:]))(self.params)
        chex.assert_trees_all_close(st.momentum, tuple(-self.lr[-1] * g for g in u_last), atol=1e-6)


def test_per_leaf_gates_and_chunk_constant_gates_match_reference():
    net = NETS["mlp2"]
    params = net.init(jax.random.key(10))
    q, k, v, lr, mom, dec = make_inputs(29, 8, seed=11)
    lr2 = (lr, 0.5 * lr[::-1])
    dec2 = (dec, jnp.zeros_like(dec))
    for kw in ({}, {"chunk_constant_gates": True}):
        y, st = memory_scan(net, params, q, k, v, lr2, mom, dec2, chunk_size=8, **kw)
        y_r, st_r = memory_scan_reference(net, params, q, k, v, lr2, mom, dec2, chunk_size=8, **kw)
        chex.assert_trees_all_close((y, st), (y_r, st_r), atol=1e-4)
    # Chunk-constant gates are the chunk means fed to the per-token recurrence.
    means = [jnp.concatenate([jnp.full(8, g[i : i + 8].mean()) for i in range(0, 29, 8)])[:29] for g in (lr, mom, dec)]
    y_c, _ = memory_scan(net, params, q, k, v, lr, mom, dec, chunk_size=8, chunk_constant_gates=True)
    y_m, _ = memory_scan_reference(net, params, q, k, v, *means, chunk_size=8)
    chex.assert_trees_all_close(y_c, y_m, atol=1e-4)
    # Per-leaf gates that are all equal reproduce the shared gate.
    y_s, _ = memory_scan(net, params, q, k, v, lr, mom, dec, chunk_size=8)
    y_l, _ = memory_scan(net, params, q, k, v, (lr, lr), (mom, mom), (dec, dec), chunk_size=8)
    chex.assert_trees_all_close(y_s, y_l, atol=1e-6)


@pytest.mark.parametrize("impl", ["dual", "associative"])
def test_channel_wise_decay_matches_reference(impl):
    """The revision's channel-wise forgetting: one alpha per output channel of each weight matrix (decay ``[T, d_out]``
    per leaf). Outputs, state and gradients of all inputs against the oracle in float64; a last partial chunk (T = 23)."""
    net = NETS["mlp2"]
    with jax.enable_x64(True):
        params = net.init(jax.random.key(21), jnp.float64)
        q, k, v, lr, mom, _ = make_inputs(23, 8, jnp.float64, seed=22, lr_scale=0.3)
        keys = jax.random.split(jax.random.key(23), net.depth)
        dec = tuple(0.2 * jax.random.uniform(kk, (23, shape[1]), jnp.float64)
                    for kk, shape in zip(keys, net.layer_shapes, strict=True))
        args = (q, k, v, lr, mom, dec)
        fast = functools.partial(memory_scan, chunk_size=4, impl=impl)
        ref = functools.partial(memory_scan_reference, chunk_size=4)
        chex.assert_trees_all_close(jax.jit(lambda *a: fast(net, params, *a))(*args),
                                    jax.jit(lambda *a: ref(net, params, *a))(*args), atol=1e-9, rtol=1e-9)
        g = jax.jit(jax.grad(lambda *a: outer_loss(fast, net, *a), tuple(range(7))))(params, *args)
        g_r = jax.jit(jax.grad(lambda *a: outer_loss(ref, net, *a), tuple(range(7))))(params, *args)
        chex.assert_trees_all_close(g, g_r, atol=1e-8, rtol=1e-8)
        # Every channel equal: the per-leaf gate of one alpha per token.
        same = tuple(jnp.broadcast_to(d[:, :1], d.shape) for d in dec)
        chex.assert_trees_all_close(fast(net, params, *args[:5], same),
                                    fast(net, params, *args[:5], tuple(d[:, 0] for d in dec)), atol=1e-12)


def test_channel_wise_decay_of_wrong_width_is_refused():
    net = NETS["mlp2"]
    q, k, v, lr, mom, dec = make_inputs(10, 8)
    with pytest.raises(ValueError, match="channel-wise forgetting"):
        memory_scan(net, net.init(jax.random.key(0)), q, k, v, lr, mom, (jnp.zeros((10, 8)), jnp.zeros((10, 8))))


def test_vmap_over_batch_and_heads_equals_a_loop():
    net = NETS["mlp2"]
    params = net.init(jax.random.key(12))
    batch = [make_inputs(21, 8, seed=s) for s in range(4)]
    stacked = [jnp.stack(x).reshape(2, 2, *x[0].shape) for x in zip(*batch, strict=True)]
    fn = functools.partial(memory_scan, net, params, chunk_size=5)
    y = jax.jit(jax.vmap(jax.vmap(lambda *a: fn(*a)[0])))(*stacked)
    for i, args in enumerate(batch):
        chex.assert_trees_all_close(y[i // 2, i % 2], fn(*args)[0], atol=1e-5, rtol=1e-5)


def test_remat_changes_nothing():
    """Remat groups recompute the same float32 operations in the same order: 1e-4 of scale is a loose bound."""
    net = NETS["mlp2"]
    params = net.init(jax.random.key(13))
    args = make_inputs(50, 8, seed=14)
    base = jax.jit(jax.grad(lambda p: outer_loss(functools.partial(memory_scan, chunk_size=4), net, p, *args)))(params)
    for kw in ({"remat_every": 1}, {"remat_every": 3}):
        fn = functools.partial(memory_scan, chunk_size=4, **kw)
        g = jax.jit(jax.grad(lambda p, fn=fn: outer_loss(fn, net, p, *args)))(params)
        assert_close_scaled(g, base, 1e-4, str(kw))


def test_second_order_gradients_match_reference():
    """Differentiable twice: a Hessian-vector product of the outer loss wrt the keys matches the oracle's."""
    net = NETS["mlp2"]
    with jax.enable_x64(True):
        params = net.init(jax.random.key(15), jnp.float64)
        q, k, v, lr, mom, dec = make_inputs(13, 8, jnp.float64, seed=16)
        direction = jax.random.normal(jax.random.key(17), k.shape, jnp.float64)

        def hvp(fn):
            loss_k = lambda k_: outer_loss(functools.partial(fn, chunk_size=4), net, params, q, k_, v, lr, mom, dec)
            return jax.jit(lambda k_, d: jax.jvp(jax.grad(loss_k), (k_,), (d,))[1])(k, direction)

        chex.assert_trees_all_close(hvp(memory_scan), hvp(memory_scan_reference), atol=1e-8)


@pytest.mark.parametrize("net", ["linear", "mlp2", "mlp3"])
def test_hand_derived_key_path_equals_backprop(net):
    net = NETS[net]
    with jax.enable_x64(True):
        params = net.init(jax.random.key(18), jnp.float64)
        _, k, v, *_ = make_inputs(7, 8, jnp.float64, seed=19)
        chex.assert_trees_all_close(net.key_path(params, k, v), key_path_autodiff(net, params, k, v), atol=1e-12)


def test_any_length_and_tiny_inputs():
    net = NETS["linear"]
    params = net.init(jax.random.key(20))
    for t_len in (1, 2, 15, 16, 17):
        args = make_inputs(t_len, 8, seed=t_len)
        y, st = memory_scan(net, params, *args, chunk_size=16)
        y_r, st_r = memory_scan_reference(net, params, *args, chunk_size=16)
        chex.assert_shape(y, (t_len, 8))
        chex.assert_trees_all_close((y, st), (y_r, st_r), atol=1e-4)
    assert np.isfinite(np.asarray(y)).all()


class BadArguments(parameterized.TestCase):
    def setUp(self):
        self.net = NETS["mlp2"]
        self.params = self.net.init(jax.random.key(0))
        self.args = list(make_inputs(10, 8))

    def _call(self, **changes):
        names = ["q", "k", "v", "lr", "momentum", "decay"]
        kw = dict(zip(names, self.args, strict=True))
        chunk = changes.pop("chunk_size", 4)
        params = changes.pop("params", self.params)
        kw.update(changes)
        return memory_scan(self.net, params, **kw, chunk_size=chunk)

    @parameterized.parameters(
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": 2.5}, "chunk_size"),
        ({"k": jnp.ones((9, 8))}, "same length"),
        ({"q": jnp.ones((10, 7))}, "q must have shape"),
        ({"v": jnp.ones((10,))}, "v must have shape"),
        ({"lr": jnp.ones((9,))}, "lr must be"),
        ({"decay": jnp.ones((10, 2))}, "decay must be"),
        ({"momentum": (jnp.ones(10),)}, "momentum must be"),
        ({"q": jnp.ones((10, 8), jnp.int32)}, "q must be a floating-point"),
        ({"lr": jnp.ones((10,), jnp.int32)}, "lr must be a floating-point"),
        ({"params": (jnp.ones((8, 8)),)}, "params must hold"),
    )
    def test_value_error_names_the_argument(self, change, message):
        with pytest.raises(ValueError, match=message):
            self._call(**change)

    def test_bad_impl_and_remat(self):
        with pytest.raises(ValueError, match="impl"):
            memory_scan(self.net, self.params, *self.args, impl="fast")
        with pytest.raises(ValueError, match="remat_every"):
            memory_scan(self.net, self.params, *self.args, remat_every=0)
        with pytest.raises(ValueError, match="mlp_memory needs depth"):
            mlp_memory(8, depth=1)


def test_deep_memory_init_sets_inner_curvature_not_the_function():
    """W_L's initial scale (``out_init_std``) leaves M_W unchanged (LayerNorm) but scales the inner gradient like
    1 / std: the reason it is not fan-in (docs/architecture.md, "Training stability")."""
    net = mlp_memory(16, 2, 4)
    params = net.init(jax.random.key(3))
    assert abs(float(jnp.std(params[-1])) - net.out_init_std) < 0.15 * net.out_init_std
    assert abs(float(jnp.std(params[0])) - 16**-0.5) < 0.15 * 16**-0.5
    k, v = (jax.random.normal(jax.random.key(s), (8, 16)) for s in (4, 5))
    small = params[:-1] + (params[-1] / 8.0,)
    np.testing.assert_allclose(net.apply(small, k), net.apply(params, k), rtol=1e-4, atol=1e-4)
    g_small, g = (jax.grad(lambda p: associative_loss(net, p, k, v))(p)[-1] for p in (small, params))
    np.testing.assert_allclose(jnp.linalg.norm(g_small), 8.0 * jnp.linalg.norm(g), rtol=1e-3)
    with pytest.raises(ValueError, match="out_init_std"):
        MemoryNet(dim=16, out_init_std=0.0)


def test_model_configs_name_every_impl():
    """``MemoryConfig.impl`` is validated against its own tuple (configs.py imports nothing from memory/): the two agree."""
    from titans_jax.configs import MEMORY_IMPLS
    from titans_jax.memory import IMPLS

    assert MEMORY_IMPLS == IMPLS
