"""Properties of the Jet flow, each stated in its test's docstring.

Run: pytest -q  (conftest.py makes silent rank promotion an error and configures hypothesis).
"""

import ast
import dataclasses
import functools
import itertools
import json
import math
import pathlib
import re
import textwrap

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import jet
import official
from conftest import (ROUND_TRIP_BOUND, check_logdet_against_jacobian, check_round_trip, configs,
                      contexts, images, random_params, round_trip_errors)

TESTDATA = pathlib.Path(__file__).parent / "testdata"
GOLDEN = sorted(TESTDATA.glob("big_vision_jet_*.npz"))

SMALL = jet.Config(image_shape=(8, 8, 3), patch_size=2, depth=3, emb_dim=16, num_heads=2)
SMALL_CTX = dataclasses.replace(SMALL, context_dim=4)  # class-conditional, e.g. 4 classes

# Compiled once per (Config, shape); eager execution would re-trace the scans on every call.
init = jax.jit(jet.init, static_argnames="dtype")
forward = jax.jit(jet.forward, static_argnames=("remat", "compute_dtype"))
inverse = jax.jit(jet.inverse, static_argnames="compute_dtype")
plain_forward = jax.jit(jet.plain_forward)
plain_inverse = jax.jit(jet.plain_inverse)


# ------------------------------------------------------------------------------------------
# Strategies and helpers


def load_golden(path):
    d = np.load(path)
    flat = {k: d[k] for k in d.files if k.startswith("params/")}
    params, perms, cfg = official.from_big_vision(flat, d["x"].shape[1:],
                                                  **json.loads(str(d["config"])))
    return params, perms, cfg, d


# ------------------------------------------------------------------------------------------
# Patches and splits


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 4),
       st.integers(1, 3))
def test_patchify_layout_and_round_trip(B, nh, nw, P, C):
    """Token t = i*(W/P) + j holds pixel block (i, j), flattened in (row, col, channel) order;
    unpatchify inverts it exactly, for non-square images too."""
    x = np.random.default_rng(0).normal(size=(B, nh * P, nw * P, C)).astype(np.float32)
    tokens = np.asarray(jet.patchify(jnp.asarray(x), P))
    assert tokens.shape == (B, nh * nw, P * P * C)
    for i in range(nh):
        for j in range(nw):
            block = x[:, i * P:(i + 1) * P, j * P:(j + 1) * P, :].reshape(B, -1)
            np.testing.assert_array_equal(tokens[:, i * nw + j], block)
    np.testing.assert_array_equal(jet.unpatchify(tokens, P, x.shape[1:]), x)


def test_spatial_pattern_pictures():
    """The six spatial projections on a 4x6 token grid (1 = token goes to x1)."""
    checkerboard = np.array([[1, 0, 1, 0, 1, 0],
                             [0, 1, 0, 1, 0, 1],
                             [1, 0, 1, 0, 1, 0],
                             [0, 1, 0, 1, 0, 1]])
    vstripes = np.array([[1, 0, 1, 0, 1, 0]] * 4)
    hstripes = np.array([[1] * 6, [0] * 6, [1] * 6, [0] * 6])
    for name, picture in [("checkerboard", checkerboard), ("vstripes", vstripes),
                          ("hstripes", hstripes)]:
        np.testing.assert_array_equal(jet.spatial_pattern(name, 4, 6), picture == 1)
        np.testing.assert_array_equal(jet.spatial_pattern(name + "-inv", 4, 6), picture == 0)


def test_spatial_pattern_on_odd_width():
    """Row/column parity also on an odd-width grid, where big_vision's flat-index formulas
    would turn checkerboard into vertical stripes and vstripes into a checkerboard."""
    np.testing.assert_array_equal(jet.spatial_pattern("checkerboard", 2, 3),
                                  np.array([[1, 0, 1], [0, 1, 0]]) == 1)
    np.testing.assert_array_equal(jet.spatial_pattern("vstripes", 4, 3),
                                  np.array([[1, 0, 1]] * 4) == 1)


@given(configs())
def test_perms_are_bijections_of_whole_tokens_or_within_tokens(cfg):
    """Every split index is a permutation of the N*D patch-grid elements; a channel coupling
    keeps each element inside its token, a spatial one moves whole tokens and puts N/2 of them
    (both halves) in x1."""
    perms = jet.init_perms(jax.random.key(0), cfg)
    N, D = cfg.num_tokens, cfg.token_dim
    assert perms.dtype == jnp.int32 and perms.shape == (cfg.depth, N * D)
    for index, (kind, proj) in zip(np.asarray(perms), cfg.couplings()):
        np.testing.assert_array_equal(np.sort(index), np.arange(N * D))
        source_token = (index // D).reshape(2, N, D // 2)  # [x1/x2, token, dim]
        if kind == "channels":
            np.testing.assert_array_equal(source_token, np.broadcast_to(
                np.arange(N)[None, :, None], (2, N, D // 2)))
        else:
            x1_tokens = np.unique(source_token[0])
            mask = jet.spatial_pattern(proj, *cfg.grid).reshape(-1)
            np.testing.assert_array_equal(x1_tokens, np.flatnonzero(mask))


def test_spatial_split_reads_whole_patches_as_two_tokens():
    """A spatial split on a 2x2 grid with D = 4: x1 holds patches 0 and 3 (checkerboard), each
    patch read as two consecutive tokens of width 2."""
    cfg = jet.Config(image_shape=(2, 2, 4), patch_size=1, depth=1, kinds=("spatial",),
                     emb_dim=4, num_heads=1)
    perms = jet.init_perms(jax.random.key(0), cfg)
    x = jnp.arange(16.0).reshape(1, 4, 4)  # token t holds 4t .. 4t+3
    x1, x2 = jet.split(x, perms[0])
    np.testing.assert_array_equal(x1[0], [[0, 1], [2, 3], [12, 13], [14, 15]])
    np.testing.assert_array_equal(x2[0], [[4, 5], [6, 7], [8, 9], [10, 11]])
    np.testing.assert_array_equal(jet.merge(x1, x2, perms[0]), x)


# ------------------------------------------------------------------------------------------
# ViT pieces


def plain_standardize(x, eps):
    """LayerNorm's normalisation in its plain form (divide by the root), left to autodiff."""
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(jnp.square(x - mean).mean(-1, keepdims=True) + eps)


@functools.partial(jax.jit, static_argnums=(0, 1))
def derivatives(standardize, eps, x, t, c):
    """Value, JVP along t, VJP of c, and Hessian of sum(c * sin(standardize(x)))."""
    f = functools.partial(standardize, eps=eps)
    return (*jax.jvp(f, (x,), (t,)), jax.vjp(f, x)[1](c)[0],
            jax.hessian(lambda v: jnp.sum(c * jnp.sin(f(v))))(x))


@given(st.integers(1, 3), st.integers(1, 9), st.floats(-3, 3), st.floats(1e-6, 1e3),
       st.sampled_from([1e-6, 1e-2]), st.integers(0, 2 ** 31 - 1))
def test_standardize_closed_form_derivative_is_autodiffs(x64, rows, width, offset, spread,
                                                          eps, seed):
    """jet.standardize's hand-written JVP (and so its transpose, the backward) equals autodiff of
    the plain formula, first and second order, in float64, for rows from near-constant (where
    eps dominates) to wide; the values equal the plain formula's."""
    kx, kt, kc = jax.random.split(jax.random.key(seed), 3)
    x = offset + spread * jax.random.normal(kx, (rows, width), jnp.float64)
    t, c = (jax.random.normal(k, x.shape, jnp.float64) for k in (kt, kc))
    got = derivatives(jet.standardize, eps, x, t, c)
    want = derivatives(plain_standardize, eps, x, t, c)
    # Terms of the order-k derivative are of size (1/std)^k |t|, and the tolerance scales with
    # them: at width 2 they cancel to a derivative of ~1e-8, which a relative bound cannot judge.
    r = float(jnp.max(jax.lax.rsqrt(jnp.var(x, axis=-1) + eps)))
    size = float(jnp.maximum(jnp.abs(t).max(), jnp.abs(c).max()))
    for order, g, w in zip((0, 1, 1, 2), got, want):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12 * max(1.0, r) ** order * size)


# ------------------------------------------------------------------------------------------
# The flow is a bijection with the right log-determinant


@given(configs(), st.integers(0, 2 ** 31 - 1))
def test_invertible_in_float32(cfg, seed):
    """inverse(forward(x)) = x and forward(inverse(z)) = z to float32 precision (ROUND_TRIP_BOUND
    per coupling, relative to the magnitudes involved), and the inverse log-det is minus the
    forward one at corresponding points."""
    check_round_trip(forward, inverse, *random_params(cfg, seed), cfg, seed)


@given(configs(), st.integers(0, 2 ** 31 - 1))
def test_invertible_in_bfloat16_mode(cfg, seed):
    """With the ViT matmuls in bfloat16 (compute_dtype), f is a bijection to the same bound as
    in float32: y1 = x1 is copied exactly, so the inverse recomputes exactly the forward's b and
    s. The mode really changes the map (z differs from float32's)."""
    params, perms = random_params(cfg, seed)
    x, z_bf16 = check_round_trip(forward, inverse, params, perms, cfg, seed,
                                 compute_dtype=jnp.bfloat16)
    assert float(jnp.abs(z_bf16 - forward(params, perms, x, cfg)[0]).max()) > 0


@given(configs(max_depth=3), st.integers(0, 2 ** 31 - 1))
def test_logdet_equals_slogdet_of_jacobian(x64, cfg, seed):
    """logdet = log|det J| with J = jax.jacfwd of the map, in float64, forward and inverse."""
    check_logdet_against_jacobian(forward, inverse, *random_params(cfg, seed, np.float64), cfg,
                                  seed)


@given(configs(max_depth=1), st.integers(0, 2 ** 31 - 1))
def test_logdet_in_bfloat16_mode_is_that_of_its_map(x64, cfg, seed):
    """With bfloat16 matmuls the log-det is still log|det J| of the map that mode computes.
    One coupling at a time: the map rounds x1 to bfloat16 on its way into the ViT, and autodiff
    passes tangents through that rounding, so a Jacobian of several couplings chained by
    autodiff is not exactly the product of theirs (the flow's log-det is their sum, tested in
    float64 above)."""
    check_logdet_against_jacobian(forward, inverse, *random_params(cfg, seed, np.float64), cfg,
                                  seed, compute_dtype=jnp.bfloat16)


@given(configs(), st.integers(0, 2 ** 31 - 1))
def test_fast_path_equals_plain_flow(cfg, seed):
    """forward and inverse, which fuse each merge with the next split into one gather over a
    [N*D, B] state, compute the plain flow: split, the coupling's equation and merge, coupling
    after coupling (the inverse: last first)."""
    params, perms = random_params(cfg, seed)
    x = images(jax.random.key(seed), cfg)
    for fast, plain in ((forward, plain_forward), (inverse, plain_inverse)):
        out, logdet = fast(params, perms, x, cfg)
        plain_out, plain_logdet = plain(params, perms, x, cfg)
        np.testing.assert_allclose(out, plain_out, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(logdet, plain_logdet, rtol=1e-5, atol=1e-4)


def test_identity_at_init():
    """With the zero-initialised output layers and k = 2, every coupling is the identity."""
    cfg = SMALL
    params, perms = init(jax.random.key(1), cfg)
    x = images(jax.random.key(2), cfg)
    z, logdet = forward(params, perms, x, cfg)
    np.testing.assert_array_equal(z, x)
    np.testing.assert_array_equal(logdet, np.zeros(2))


@given(configs(), st.integers(0, 2 ** 31 - 1))
def test_examples_are_independent_of_their_batch(cfg, seed):
    """An example's z and logdet do not depend on the other examples in its batch, up to float32
    rounding (matmul kernels block a batch of 1 and of 3 differently), which each coupling adds
    to and scales: 2e-5 per coupling relative to the largest value (worst seen: 2.7e-6)."""
    params, perms = random_params(cfg, seed)
    x = images(jax.random.key(seed), cfg, batch=3)
    z, logdet = forward(params, perms, x, cfg)
    for i in range(3):
        zi, logdet_i = forward(params, perms, x[i:i + 1], cfg)
        bound = 2e-5 * cfg.depth * max(1.0, float(jnp.abs(z[i]).max()))
        np.testing.assert_allclose(zi[0], z[i], rtol=0, atol=bound)
        np.testing.assert_allclose(logdet_i[0], logdet[i], rtol=1e-5, atol=1e-4)


def test_jit_equals_eager():
    """jax.jit of forward and inverse computes the same values as eager execution."""
    cfg = SMALL
    params, perms = random_params(cfg, 3)
    x = images(jax.random.key(4), cfg)
    for fn in (jet.forward, jet.inverse):
        eager = fn(params, perms, x, cfg)
        jitted = jax.jit(fn)(params, perms, x, cfg)
        for a, b in zip(eager, jitted):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_remat_changes_memory_not_values():
    """forward(remat=True) gives the same outputs and gradients as remat=False."""
    cfg = SMALL
    params, perms = random_params(cfg, 11)
    x = images(jax.random.key(12), cfg)

    def loss(params, remat):
        return jet.bits_per_dim(*jet.forward(params, perms, x, cfg, remat=remat)).mean()
    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (plain, g_plain), (rematted, g_remat) = grad(params, False), grad(params, True)
    np.testing.assert_allclose(rematted, plain, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@settings(max_examples=min(3, settings.default.max_examples))  # the fast tier: fewer
@given(configs(context_dims=st.one_of(st.none(), st.integers(1, 3))), st.integers(0, 2 ** 31 - 1))
def test_every_parameter_receives_a_gradient(cfg, seed):
    """Once the flow is not the identity, every parameter leaf of every coupling (the context's
    attention included) gets a finite gradient of the loss, mean bits/dim, that is not all zero:
    all of it is wired into the map. The one exception is exact: an attention's key bias adds
    the same q.b to a query's scores over every key, which softmax ignores, so its gradient is
    zero (in big_vision too). With a single token attention has nothing to choose between."""
    hypothesis.assume(cfg.num_tokens >= 2)
    params, perms = random_params(cfg, seed)
    k_x, k_c = jax.random.split(jax.random.key(seed))
    x, context = images(k_x, cfg, batch=4), None
    if cfg.context_dim:
        context = contexts(k_c, cfg, batch=4)

    def loss(params):
        return jet.bits_per_dim(*forward(params, perms, x, cfg, context=context)).mean()
    grads = jax.jit(jax.grad(loss))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        name = jax.tree_util.keystr(path)
        assert bool(jnp.isfinite(g).all()), name
        for i in range(cfg.depth):  # in every coupling
            largest = float(jnp.abs(g[i]).max())
            if name.endswith("['key']['bias']"):
                assert largest < 1e-6, name
            else:
                assert largest > 0, f"coupling {i}: {name}"


# ------------------------------------------------------------------------------------------
# Class conditioning: every coupling's ViT also attends to a context [B, T_ctx, C_ctx]

# Each drawn configuration compiles its own programs: few examples keep the fast tier fast,
# and the test of the official formulation draws conditional configurations too.
CONDITIONAL = configs(context_dims=st.integers(1, 5))
TOKENS = st.integers(1, 3)  # T_ctx
SEEDS = st.integers(0, 2 ** 31 - 1)


@settings(max_examples=min(3, settings.default.max_examples))  # the fast tier: fewer
@given(CONDITIONAL, TOKENS, st.sampled_from([None, jnp.bfloat16]), SEEDS)
def test_invertible_with_a_context(cfg, tokens, compute_dtype, seed):
    """Given a context of arbitrary features, f is a bijection to ROUND_TRIP_BOUND (float32, or
    with bfloat16 matmuls) and the inverse log-det is minus the forward one: b and s depend on
    x1 and the context, which the inverse sees unchanged."""
    context = contexts(jax.random.fold_in(jax.random.key(seed), 2), cfg, tokens=tokens)
    check_round_trip(forward, inverse, *random_params(cfg, seed), cfg, seed,
                     compute_dtype=compute_dtype, context=context)


@settings(max_examples=2)
@given(configs(max_depth=2, context_dims=st.integers(1, 5)), TOKENS, SEEDS)
def test_logdet_equals_slogdet_of_jacobian_with_a_context(x64, cfg, tokens, seed):
    """Given a context, logdet = log|det dz/dx| (slogdet of the float64 autodiff Jacobian of
    x -> z at that context), forward and inverse, every output layer random."""
    key = jax.random.fold_in(jax.random.key(seed), 1)
    context = contexts(key, cfg, batch=1, tokens=tokens, dtype=jnp.float64)
    check_logdet_against_jacobian(forward, inverse, *random_params(cfg, seed, np.float64), cfg,
                                  seed, context=context)


@settings(max_examples=2)
@given(CONDITIONAL, TOKENS, SEEDS)
def test_fast_path_equals_plain_flow_with_a_context(cfg, tokens, seed):
    """forward and inverse, which hold the context as a constant of their fused scan, compute
    the plain flow, which hands it to every coupling's equation."""
    params, perms = random_params(cfg, seed)
    x = images(jax.random.key(seed), cfg)
    context = contexts(jax.random.fold_in(jax.random.key(seed), 1), cfg, tokens=tokens)
    for fast, plain in ((forward, plain_forward), (inverse, plain_inverse)):
        out, logdet = fast(params, perms, x, cfg, context=context)
        plain_out, plain_logdet = plain(params, perms, x, cfg, context=context)
        np.testing.assert_allclose(out, plain_out, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(logdet, plain_logdet, rtol=1e-5, atol=1e-4)


@settings(max_examples=2)
@given(CONDITIONAL, TOKENS, SEEDS)
def test_examples_are_independent_of_their_batch_with_a_context(cfg, tokens, seed):
    """Example i's z and logdet depend only on x[i] and context[i]: run alone, with its own
    context, it gives what it gives in the batch (same float32 bound as without a context)."""
    params, perms = random_params(cfg, seed)
    x = images(jax.random.key(seed), cfg, batch=3)
    context = contexts(jax.random.fold_in(jax.random.key(seed), 1), cfg, 3, tokens)
    z, logdet = forward(params, perms, x, cfg, context=context)
    for i in range(3):
        zi, logdet_i = forward(params, perms, x[i:i + 1], cfg, context=context[i:i + 1])
        bound = 2e-5 * cfg.depth * max(1.0, float(jnp.abs(z[i]).max()))
        np.testing.assert_allclose(zi[0], z[i], rtol=0, atol=bound)
        np.testing.assert_allclose(logdet_i[0], logdet[i], rtol=1e-5, atol=1e-4)


def test_conditional_model_at_init_is_the_unconditional_one():
    """jet.init of a conditional Config, with the unconditional one's key, draws the same
    parameters and perms plus `context_attention` (flax MultiHeadDotProductAttention's
    defaults: lecun_normal query, key and value kernels, zero biases; its output kernel zero,
    as big_vision's). So, whatever the rest of the model, its map ignores the context: it is
    the unconditional map, until training moves the output kernel."""
    params, perms = init(jax.random.key(1), SMALL)
    params_ctx, perms_ctx = init(jax.random.key(1), SMALL_CTX)
    np.testing.assert_array_equal(perms_ctx, perms)
    added = params_ctx["context_attention"]
    rest = {name: p for name, p in params_ctx.items() if name != "context_attention"}
    jax.tree.map(np.testing.assert_array_equal, rest, params)
    E, heads, C = SMALL.emb_dim, SMALL.num_heads, SMALL_CTX.context_dim
    for name, fan_in in (("query", E), ("key", C), ("value", C)):
        kernel = np.asarray(added[name]["kernel"])
        assert kernel.shape == (SMALL.depth, fan_in, heads, E // heads)
        assert 0.7 < kernel.std() * math.sqrt(fan_in) < 1.3  # lecun_normal: variance 1/fan_in
    assert added["out"]["kernel"].shape == (SMALL.depth, heads, E // heads, E)
    for leaf in (added["out"]["kernel"], *(added[n]["bias"] for n in added)):
        np.testing.assert_array_equal(leaf, 0)
    trained, _ = random_params(SMALL, 2)  # any unconditional model, not the identity
    x = images(jax.random.key(3), SMALL)
    z, logdet = forward(trained, perms, x, SMALL)
    for context in (contexts(jax.random.key(4), SMALL_CTX, tokens=1),  # T_ctx = 1: one compile
                    jax.nn.one_hot([[1], [3]], C)):
        z_ctx, logdet_ctx = forward({**trained, "context_attention": added}, perms, x,
                                    SMALL_CTX, context=context)
        np.testing.assert_allclose(z_ctx, z, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(logdet_ctx, logdet, rtol=1e-6, atol=1e-5)


def test_the_context_changes_the_map():
    """Once context_attention's output kernel is non-zero, z and logdet depend on the context:
    the same images given another one-hot class, or given zero, map elsewhere."""
    params, perms = random_params(SMALL_CTX, 5)
    x = images(jax.random.key(6), SMALL_CTX)
    outputs = [forward(params, perms, x, SMALL_CTX, context=context) for context in (
        jax.nn.one_hot([[0], [0]], 4), jax.nn.one_hot([[2], [2]], 4), jnp.zeros((2, 1, 4)))]
    for (z, logdet), (z_other, logdet_other) in itertools.combinations(outputs, 2):
        assert np.abs(z - z_other).max(axis=(1, 2, 3)).min() > 1e-2
        assert np.abs(logdet - logdet_other).min() > 1e-3


# ------------------------------------------------------------------------------------------
# Likelihood and sampling


def test_bits_per_dim_known_value_and_independent_computation():
    """z = 0, logdet = 0 costs log2(sqrt(2 pi) * 127.5) bits per dim; in general bits/dim equals
    -log2 of the Gaussian density plus the dequantization volume, computed here with NumPy."""
    z = np.zeros((1, 4, 4, 3))
    assert float(jet.bits_per_dim(jnp.asarray(z), jnp.zeros(1))[0]) == pytest.approx(
        math.log2(math.sqrt(2 * math.pi) * 127.5), rel=1e-6)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 4, 5, 2))
    logdet = rng.normal(size=3) * 10
    density = np.exp(-z ** 2 / 2) / np.sqrt(2 * np.pi)
    expected = (-np.log2(density / 127.5).sum(axis=(1, 2, 3)) - logdet / np.log(2)) / 40
    got = jet.bits_per_dim(jnp.asarray(z, jnp.float32), jnp.asarray(logdet, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_dequantize_stays_in_its_cell():
    """Every dequantized pixel lies in its integer's cell [q/127.5 - 1, (q+1)/127.5 - 1), and
    the noise covers the cell."""
    q = jnp.tile(jnp.arange(256, dtype=jnp.uint8), 200).reshape(1, 200, 256, 1)
    x = jet.dequantize(jax.random.key(0), q)
    lower = q.astype(jnp.float32) / 127.5 - 1
    noise = np.asarray(x - lower)
    assert x.dtype == jnp.float32 and noise.min() >= 0 and noise.max() <= 1 / 127.5 + 1e-6
    assert noise.max() > 0.95 / 127.5 and noise.min() < 0.05 / 127.5
    with pytest.raises(ValueError, match="uint8"):
        jet.dequantize(jax.random.key(0), q.astype(jnp.float32))


def test_sample_is_the_inverse_of_gaussian_noise():
    """sample() = floor((f^-1(T z) + 1) * 127.5) clipped to uint8, reproducible per key."""
    cfg = SMALL
    params, perms = random_params(cfg, 8)
    key = jax.random.key(9)
    out = jet.sample(params, perms, key, 5, cfg, temperature=0.7)
    assert out.dtype == jnp.uint8 and out.shape == (5, 8, 8, 3)
    x, _ = inverse(params, perms, 0.7 * jax.random.normal(key, out.shape), cfg)
    expected = np.clip(np.floor((np.asarray(x) + 1) * 127.5), 0, 255)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(jet.sample(params, perms, key, 5, cfg, temperature=0.7), out)


def test_conditional_sample_is_the_inverse_of_gaussian_noise():
    """With a context, sample() = quantize(f^-1(T z)) given that context: image i is drawn given
    context[i], here one-hot classes."""
    params, perms = random_params(SMALL_CTX, 8)
    key, context = jax.random.key(9), jax.nn.one_hot(jnp.array([[0], [3]]), 4)  # [n, 1, 4]
    sample = jax.jit(jet.sample, static_argnames="n")
    out = sample(params, perms, key, 2, SMALL_CTX, temperature=0.7, context=context)
    x, _ = inverse(params, perms, 0.7 * jax.random.normal(key, out.shape), SMALL_CTX,
                   context=context)
    np.testing.assert_array_equal(out, jet.quantize(x))


# ------------------------------------------------------------------------------------------
# Parity with the official implementation


def golden_errors(params, perms, cfg, d, flow=(forward, inverse)):
    """Largest error relative to the largest official magnitude, per official output of golden
    file d: z, logdet = forward(x) and x_from_noise, logdet_from_noise = inverse(z_noise), given
    the file's context if it has one, and then also z_zero_context, logdet_zero_context =
    forward(x) given zero times that context."""
    context = jnp.asarray(d["context"]) if "context" in d.files else None
    runs = [(flow[0], "x", context, ("z", "logdet")),
            (flow[1], "z_noise", context, ("x_from_noise", "logdet_from_noise"))]
    if context is not None:
        runs.append((flow[0], "x", 0 * context, ("z_zero_context", "logdet_zero_context")))
    errors = {}
    for fn, inp, ctx, names in runs:
        for got, name in zip(fn(params, perms, jnp.asarray(d[inp]), cfg, context=ctx), names):
            assert got.dtype == jnp.float64
            errors[name] = float(np.abs(got - d[name]).max() / np.abs(d[name]).max())
    return errors


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
def test_golden_parity_with_big_vision(x64, path):
    """Official parameters and outputs (big_vision jet.Model, float64, random output layers):
    forward, inverse and both log-dets agree within 1e-5 relative to the largest magnitude.
    A file with a context holds a class-conditional model, loaded as one; it is run given that
    context and given zero times it, by the fast path and by the plain flow."""
    params, perms, cfg, d = load_golden(path)
    assert (cfg.context_dim is None) == ("context" not in d.files)
    flows = [(forward, inverse)] + [(plain_forward, plain_inverse)] * bool(cfg.context_dim)
    for flow in flows:
        errors = golden_errors(params, perms, cfg, d, flow)
        assert max(errors.values()) <= 1e-5, errors


def test_golden_files_cover_every_projection():
    """The golden files together use every spatial projection and both kinds."""
    used = set()
    for path in GOLDEN:
        used.update(load_golden(path)[2].couplings())
    assert {proj for kind, proj in used if kind == "spatial"} == set(jet.SPATIAL_PROJS)
    assert ("channels", "random") in used


def official_masks(cfg, rng):
    """One-hot masks by big_vision's own formulas (flat-index stripes and checkerboard)."""
    N, D, nw = cfg.num_tokens, cfg.token_dim, cfg.grid[1]
    c, s = np.zeros((cfg.depth, D, D)), np.zeros((cfg.depth, N, N))
    for i, (kind, proj) in enumerate(cfg.couplings()):
        if kind == "channels":
            c[i, rng.permutation(D), np.arange(D)] = 1
            continue
        n = np.arange(N)
        base = proj.removesuffix("-inv")
        parity = {"vstripes": n, "hstripes": n // nw,
                  "checkerboard": n + n // nw}[base] % 2
        idx1, idx2 = np.flatnonzero(parity == 0), np.flatnonzero(parity == 1)
        if proj.endswith("-inv"):
            idx1, idx2 = idx2, idx1
        s[i, idx1, np.arange(N // 2)] = 1
        s[i, idx2, np.arange(N // 2, N)] = 1
    return c, s


def official_params(cfg, rng):
    """Random parameters under big_vision's flax paths and shapes; a conditional cfg adds the
    DNN's own attention to the context (keys and values from C_ctx = context_dim features)."""
    L, N, D, E = cfg.depth, cfg.num_tokens, cfg.token_dim, cfg.emb_dim
    h, M = cfg.num_heads, cfg.mlp_dim or 4 * cfg.emb_dim
    shapes = {"init_proj/kernel": (D // 2, E), "init_proj/bias": (E,), "posemb": (1, N, E),
              "vit/encoder_norm/scale": (E,), "vit/encoder_norm/bias": (E,),
              "final_proj/kernel": (E, D), "final_proj/bias": (D,)}

    def mha(path, kv_dim):  # flax nn.MultiHeadDotProductAttention, qkv and out features E
        out = {}
        for name, d_in in (("query", E), ("key", kv_dim), ("value", kv_dim)):
            out |= {f"{path}/{name}/kernel": (d_in, h, E // h), f"{path}/{name}/bias": (h, E // h)}
        return out | {f"{path}/out/kernel": (h, E // h, E), f"{path}/out/bias": (E,)}
    for b in range(cfg.block_depth):
        blk = f"vit/encoderblock_{b}"
        for ln in ("LayerNorm_0", "LayerNorm_1"):
            shapes |= {f"{blk}/{ln}/scale": (E,), f"{blk}/{ln}/bias": (E,)}
        shapes |= mha(f"{blk}/MultiHeadDotProductAttention_0", E)
        mlp = f"{blk}/MlpBlock_0"
        shapes |= {f"{mlp}/Dense_0/kernel": (E, M), f"{mlp}/Dense_0/bias": (M,),
                   f"{mlp}/Dense_1/kernel": (M, E), f"{mlp}/Dense_1/bias": (E,)}
    if cfg.context_dim:
        shapes |= mha("MultiHeadDotProductAttention_0", cfg.context_dim)
    flat = {}
    for path, shape in shapes.items():
        fan_in = shape[0] if "kernel" in path and len(shape) > 1 else 1
        offset = 1.0 if path.endswith("scale") else 0.0
        scale = 0.5 / np.sqrt(fan_in)
        flat[f"couplings/dnn/{path}"] = offset + rng.normal(size=(L, *shape)) * scale
    return flat


def official_forward(flat, c_masks, s_masks, x, cfg, inverse=False, context=None):
    """big_vision's Jet in NumPy float64: one-hot einsum splits, the `cut` reshape, flax-layout
    attention, and with a context [B, T_ctx, C_ctx] the DNN's attention to it after the position
    embedding; written independently of jet.py (which uses gathers and its own layout)."""
    P, (H, W, C), N, D = cfg.patch_size, cfg.image_shape, cfg.num_tokens, cfg.token_dim
    B = x.shape[0]
    x = x.reshape(B, H // P, P, W // P, P, C).transpose(0, 1, 3, 2, 4, 5).reshape(B, N, D)
    g = lambda name, i: flat[f"couplings/dnn/{name}"][i]

    def layer_norm(v, path, i):
        mu = v.mean(-1, keepdims=True)
        sigma = np.sqrt(((v - mu) ** 2).mean(-1, keepdims=True) + 1e-6)
        return (v - mu) / sigma * g(f"{path}/scale", i) + g(f"{path}/bias", i)

    def dense(v, path, i):
        return v @ g(f"{path}/kernel", i) + g(f"{path}/bias", i)

    def mha(y, kv, path, i):  # flax MultiHeadDotProductAttention()(y, kv)
        def proj(a, name):  # [B, T, C] -> [B, T, heads, head_dim]
            kernel, bias = g(f"{path}/{name}/kernel", i), g(f"{path}/{name}/bias", i)
            return np.einsum("bte,ehd->bthd", a, kernel) + bias
        q, k, val = proj(y, "query"), proj(kv, "key"), proj(kv, "value")
        logits = np.einsum("bqhd,bkhd->bhqk", q / np.sqrt(q.shape[-1]), k)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        y = np.einsum("bhqk,bkhd->bqhd", w, val)
        return np.einsum("bqhd,hde->bqe", y, g(f"{path}/out/kernel", i)) + g(f"{path}/out/bias", i)

    def dnn(v, i):
        v = dense(v, "init_proj", i) + g("posemb", i)
        if context is not None:
            v = v + mha(v, context, "MultiHeadDotProductAttention_0", i)
        for b in range(cfg.block_depth):
            blk = f"vit/encoderblock_{b}"
            y = layer_norm(v, f"{blk}/LayerNorm_0", i)
            v = v + mha(y, y, f"{blk}/MultiHeadDotProductAttention_0", i)
            y = layer_norm(v, f"{blk}/LayerNorm_1", i)
            y = dense(y, f"{blk}/MlpBlock_0/Dense_0", i)
            y = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))
            v = v + dense(y, f"{blk}/MlpBlock_0/Dense_1", i)
        out = dense(layer_norm(v, "vit/encoder_norm", i), "final_proj", i)
        return out[..., :D // 2], out[..., D // 2:]

    total = np.zeros(B)
    order = range(cfg.depth - 1, -1, -1) if inverse else range(cfg.depth)
    for i in order:
        channels = cfg.couplings()[i][0] == "channels"
        if channels:
            x1, x2 = np.split(np.einsum("ntk,km->ntm", x, c_masks[i]), 2, axis=-1)
        else:
            x1, x2 = np.split(np.einsum("ntk,tm->nmk", x, s_masks[i]), 2, axis=-2)
            x1, x2 = x1.reshape(B, N, D // 2), x2.reshape(B, N, D // 2)
        bias, raw = dnn(x1, i)
        scale = cfg.scale_factor / (1 + np.exp(-raw))
        logdet = np.log(scale).sum(axis=(1, 2))
        x2 = x2 / scale - bias if inverse else (x2 + bias) * scale
        total += -logdet if inverse else logdet
        if channels:
            x = np.einsum("ntk,km->ntm", np.concatenate([x1, x2], -1), c_masks[i].T)
        else:
            x12 = np.concatenate([x1.reshape(B, N // 2, D), x2.reshape(B, N // 2, D)], axis=1)
            x = np.einsum("ntk,tm->nmk", x12, s_masks[i].T)
    x = x.reshape(B, H // P, W // P, P, P, C).transpose(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
    return x, total


@given(configs(even_grid=True, max_depth=5, context_dims=st.none() | st.integers(1, 5)),
       st.integers(1, 3), st.integers(0, 2 ** 31 - 1))
def test_from_big_vision_matches_official_formulation(x64, cfg, tokens, seed):
    """For any configuration on an even token grid, official parameters and one-hot masks loaded
    with from_big_vision compute what big_vision's formulation computes (NumPy oracle above),
    and the loaded spatial splits are exactly those that jet.init builds. A checkpoint with the
    DNN's context attention loads as a conditional Config (context_dim from its key kernel)
    and computes the official map given any context of T_ctx tokens."""
    cfg = dataclasses.replace(cfg, mlp_dim=None)  # big_vision's DNN always uses 4 * emb_dim
    rng = np.random.default_rng(seed)
    flat = official_params(cfg, rng)
    c_masks, s_masks = official_masks(cfg, rng)
    flat["channel_coupling_masks-FREEZE_ME"] = c_masks
    flat["spatial_coupling_masks-FREEZE_ME"] = s_masks
    kwargs = dict(depth=cfg.depth, block_depth=cfg.block_depth, emb_dim=cfg.emb_dim,
                  num_heads=cfg.num_heads, scale_factor=cfg.scale_factor, ps=cfg.patch_size,
                  kinds=list(cfg.kinds), channels_coupling_projs=list(cfg.channel_projs),
                  spatial_coupling_projs=list(cfg.spatial_projs))
    params, perms, loaded_cfg = official.from_big_vision(flat, cfg.image_shape, **kwargs)
    assert loaded_cfg == cfg
    our_perms = jet.init_perms(jax.random.key(0), cfg)
    for i, (kind, _) in enumerate(cfg.couplings()):
        if kind == "spatial":
            np.testing.assert_array_equal(perms[i], our_perms[i])
    x = rng.uniform(-1, 1, size=(2, *cfg.image_shape))
    context = rng.normal(size=(2, tokens, cfg.context_dim)) if cfg.context_dim else None
    for backward, fn in ((False, forward), (True, inverse)):
        expected, expected_logdet = official_forward(flat, c_masks, s_masks, x, cfg, backward,
                                                     context)
        got, got_logdet = fn(params, perms, jnp.asarray(x), cfg,
                             context=None if context is None else jnp.asarray(context))
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(got_logdet, expected_logdet, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------
# Invalid input


@pytest.mark.parametrize("kwargs, message", [
    (dict(image_shape=(30, 32, 3), patch_size=4), "must divide"),
    (dict(image_shape=(12, 12, 3), patch_size=3), "odd number"),
    (dict(image_shape=(12, 12, 2), patch_size=4), "checkerboard"),  # 3x3 grid: N = 9
    (dict(image_shape=(12, 16, 2), patch_size=4, spatial_projs=("hstripes",)), "token rows"),
    (dict(image_shape=(16, 12, 2), patch_size=4, spatial_projs=("vstripes",)), "token columns"),
    (dict(emb_dim=30, num_heads=4), "divisible"),
    (dict(kinds=("channel",)), "kinds"),
    (dict(kinds=()), "kinds"),
    (dict(channel_projs=("checkerboard",)), "channel_projs"),
    (dict(spatial_projs=("random",)), "spatial_projs"),
    (dict(depth=0), "depth"),
    (dict(block_depth=-1), "block_depth"),
    (dict(patch_size=2.0), "patch_size"),
    (dict(mlp_dim=0), "mlp_dim"),
    (dict(context_dim=0), "context_dim"),
    (dict(context_dim=10.0), "context_dim"),
    (dict(context_dim=True), "context_dim"),
    (dict(scale_factor=0.0), "scale_factor"),
    (dict(scale_factor=float("nan")), "scale_factor"),
    (dict(image_shape=(32, 32)), "image_shape"),
    (dict(image_shape=(32, 0, 3)), "image_shape"),
])
def test_invalid_config_raises(kwargs, message):
    """Every invalid combination fails at construction with a message naming the problem."""
    with pytest.raises(ValueError, match=message):
        jet.Config(**kwargs)


def test_odd_grid_is_fine_without_spatial_couplings():
    """An odd token count only matters when a spatial coupling is actually scheduled."""
    jet.Config(image_shape=(12, 12, 2), patch_size=4, kinds=("channels",))
    jet.Config(image_shape=(12, 12, 2), patch_size=4, depth=2)  # spatial would be 3rd


def test_config_is_hashable_and_accepts_lists():
    """Config is a static jit argument (hashable) and round-trips through JSON (lists)."""
    cfg = jet.Config(kinds=["channels", "spatial"])
    assert hash(cfg) == hash(jet.Config(kinds=("channels", "spatial")))
    assert jet.Config(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def test_wrong_input_shapes_raise():
    """Images or perms that do not match the Config are rejected before any computation."""
    cfg = SMALL
    params, perms = random_params(cfg, 0)
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        forward(params, perms, jnp.zeros((2, 8, 8, 1)), cfg)
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        inverse(params, perms, jnp.zeros((8, 8, 3)), cfg)
    with pytest.raises(ValueError, match="perms"):
        forward(params, perms[:2], jnp.zeros((2, 8, 8, 3)), cfg)


@pytest.mark.parametrize("cfg, context, message", [
    (SMALL_CTX, None, "class-conditional"),
    (SMALL, np.zeros((2, 1, 4)), "unconditional"),
    (SMALL_CTX, np.zeros((2, 4)), r"got shape \(2, 4\)"),
    (SMALL_CTX, np.zeros((3, 1, 4)), r"\[2, T_ctx >= 1, 4\].*got shape \(3, 1, 4\)"),
    (SMALL_CTX, np.zeros((2, 1, 5)), r"\[2, T_ctx >= 1, 4\].*got shape \(2, 1, 5\)"),
    (SMALL_CTX, np.zeros((2, 0, 4)), r"T_ctx >= 1.*got shape \(2, 0, 4\)"),
    (SMALL_CTX, np.zeros((2, 1, 4), np.int32), "floating point"),
], ids=["missing", "unconditional", "rank", "batch", "features", "no tokens", "dtype"])
def test_invalid_context_raises(cfg, context, message):
    """A conditional Config without a context, a context for an unconditional one, and a context
    of the wrong rank, batch, feature size, token count or dtype are rejected before any
    computation, by the fast path and the plain flow, forward and inverse, naming the problem."""
    params, perms = random_params(cfg, 0)
    x = jnp.zeros((2, *cfg.image_shape))
    for fn in (forward, inverse, plain_forward, plain_inverse):
        with pytest.raises(ValueError, match=message):
            fn(params, perms, x, cfg, context=context)


def test_params_must_match_the_configs_conditioning():
    """Unconditional params with a conditional Config, or the reverse, are named as such."""
    params, perms = random_params(SMALL, 0)
    params_ctx, _ = random_params(SMALL_CTX, 0)
    x = jnp.zeros((2, *SMALL.image_shape))
    with pytest.raises(ValueError, match="lack `context_attention`"):
        forward(params, perms, x, SMALL_CTX, context=np.zeros((2, 1, 4)))
    with pytest.raises(ValueError, match="have `context_attention`"):
        inverse(params_ctx, perms, x, SMALL)


def test_from_big_vision_rejects_bad_checkpoints():
    """Unknown arguments, missing parameters and wrong shapes are named."""
    params, perms, cfg, d = load_golden(TESTDATA / "big_vision_jet_a.npz")
    flat = {k: d[k] for k in d.files if k.startswith("params/")}
    kwargs = json.loads(str(d["config"]))
    with pytest.raises(ValueError, match="Unknown"):
        official.from_big_vision(flat, (16, 16, 3), **kwargs, dropout=0.1)
    with pytest.raises(ValueError, match="Missing"):
        official.from_big_vision({k: v for k, v in flat.items() if "posemb" not in k},
                            (16, 16, 3), **kwargs)
    with pytest.raises(ValueError, match="shape"):
        official.from_big_vision(flat, (16, 16, 3), **{**kwargs, "emb_dim": 64, "num_heads": 4})


def test_every_fix_an_error_proposes_builds(x64):
    """A Config the image cannot take names configurations that work for it (other patch sizes,
    only the spatial patterns that halve its grid, or no spatial couplings), and each one, built
    from the failing arguments with that change, is a valid Config."""
    failing = [dict(image_shape=(28, 28, 1), patch_size=4),  # 7x7 grid: no spatial halves
               dict(image_shape=(28, 28, 1), patch_size=7),  # D = 49, odd
               dict(image_shape=(32, 32, 3), patch_size=3),  # does not divide 32
               dict(image_shape=(12, 16, 3), patch_size=4, kinds=("spatial",),
                    spatial_projs=("hstripes", "vstripes"))]  # 3x4: only vstripes halves
    for kwargs in failing:
        with pytest.raises(ValueError, match="These work for") as error:
            jet.Config(**kwargs)
        fixes = str(error.value).split("These work for ")[1].split(": ", 1)[1]
        fixes = fixes.removesuffix(".").split("; ")
        assert fixes, kwargs
        for fix in fixes:
            changes = dict(re.match(r"(\w+)=(.+)", part).groups()
                           for part in re.split(r", (?=\w+=)", fix))
            jet.Config(**kwargs | {k: ast.literal_eval(v) for k, v in changes.items()})


def test_usage_example_runs():
    """jet.py's docstring opens with a usage example (init, dequantize, jit, loss, grad,
    inverse, sample); it runs as written, and what it computes is what it says."""
    code = textwrap.dedent(jet.__doc__.split("Usage (test_jet.py runs it):")[1])
    scope = {}
    exec(compile(code, "jet.py usage", "exec"), scope)
    assert math.isfinite(float(scope["bpd"])) and jax.tree.structure(scope["grads"]) == \
        jax.tree.structure(scope["params"])
    assert float(jnp.abs(scope["x_back"] - scope["x"]).max()) < 1e-5
    assert scope["samples"].shape == (4, 16, 16, 3) and scope["samples"].dtype == jnp.uint8


def test_options_are_keyword_only():
    """The options after the data cannot be passed by position: each old positional form
    (remat or compute_dtype fifth, temperature sixth, a context third) is a TypeError, never a
    silent change of meaning; the coupling's network is always named."""
    params, perms = random_params(SMALL, 0)
    x = jnp.zeros((2, *SMALL.image_shape))
    x1 = jnp.zeros((2, SMALL.num_tokens, SMALL.token_dim // 2))
    p0 = jax.tree.map(lambda a: a[0], params)
    calls = [lambda: jet.forward(params, perms, x, SMALL, jnp.bfloat16),
             lambda: jet.inverse(params, perms, x, SMALL, jnp.bfloat16),
             lambda: jet.sample(params, perms, jax.random.key(0), 2, SMALL, 0.8),
             lambda: jet.plain_forward(params, perms, x, SMALL, None),
             lambda: jet.coupling_net(p0, x1, None),
             lambda: jet.affine_forward(p0, x1, x1, 2.0),
             lambda: jet.coupling_forward(p0, perms[0], jet.patchify(x, 2), 2.0, jet.coupling_net),
             lambda: jet.dequantize(jax.random.key(0), np.zeros((1, 2, 2, 1), np.uint8), 256)]
    for call in calls:
        with pytest.raises(TypeError):
            call()


def test_matmul_precision_is_a_parameter():
    """forward's matmuls run at Precision.HIGHEST unless told otherwise; precision=None leaves
    them to jax.default_matmul_precision (every dot_general in the traced map says which)."""
    params, perms = random_params(SMALL, 0)
    x = jnp.zeros((2, *SMALL.image_shape))

    def dots(**kw):  # each dot_general's parameters, up to its preferred_element_type
        jaxpr = str(jax.make_jaxpr(lambda p: jet.forward(p, perms, x, SMALL, **kw))(params))
        return [eqn.split("preferred_element_type")[0] for eqn in jaxpr.split("dot_general[")[1:]]
    assert dots() and all("precision=(Precision.HIGHEST, Precision.HIGHEST)" in d
                          for d in dots())
    assert len(dots(precision=None)) == len(dots())
    assert not any("precision" in d for d in dots(precision=None))


@given(st.integers(0, 2 ** 31 - 1))
def test_units_are_stated_and_consistent(x64, seed):
    """dequantize and bits_per_dim take the data's levels and range: images on [0, 1] instead of
    [-1, 1] are the same images, and a density on them scores the same bits/dim once the flow's
    log-det carries the change of units (log 2 per dimension). Other levels and ranges are
    checked, non-uint8 images refused, and mis-shaped outputs named."""
    key = jax.random.key(seed)
    q = jnp.asarray(np.random.default_rng(seed).integers(0, 256, (2, 4, 4, 3), np.uint8))
    x, x01 = jet.dequantize(key, q), jet.dequantize(key, q, data_range=(0.0, 1.0))
    np.testing.assert_allclose(x01, (x + 1) / 2, atol=1e-6)
    z = jax.random.normal(key, q.shape)
    logdet = jax.random.normal(jax.random.fold_in(key, 1), (2,))
    dims = math.prod(q.shape[1:])
    np.testing.assert_allclose(jet.bits_per_dim(z, logdet + dims * math.log(2),
                                                data_range=(0.0, 1.0)),
                               jet.bits_per_dim(z, logdet), rtol=1e-12)
    four = jet.dequantize(key, q // 64, levels=4)  # 2-bit images: cells of 2/3
    assert float(four.min()) >= -1 and float(four.max()) < 1 + 2 / 3
    for bad in (dict(levels=257), dict(levels=1), dict(data_range=(1.0, 0.0)),
                dict(data_range=(0.0, math.inf))):
        with pytest.raises(ValueError, match="levels|data_range"):
            jet.dequantize(key, q, **bad)
        with pytest.raises(ValueError, match="levels|data_range"):
            jet.bits_per_dim(z, logdet, **bad)
    with pytest.raises(ValueError, match="uint8"):
        jet.dequantize(key, q.astype(jnp.float32) / 255)
    with pytest.raises(ValueError, match=r"z \[B, H, W, C\] and logdet \[B\]"):
        jet.bits_per_dim(z, logdet[:1])  # or arguments swapped, or a flat z


# ------------------------------------------------------------------------------------------
# Each piece lifts alone: with jax, numpy, math and functools, and the definitions its
# docstring names ("Needs:"), and nothing else of jet.py


def lifted(*names: str) -> dict:
    """A fresh namespace holding jax, jnp, np, math and functools, in which only the source of
    `names` and of what their docstrings' "Needs:" name (and so on) was run, in jet.py's order."""
    text = pathlib.Path(jet.__file__).read_text()
    source = {}  # name -> (line, source with decorators, node)
    for node in ast.parse(text).body:
        if isinstance(node, (ast.FunctionDef, ast.Assign)):
            name = node.name if isinstance(node, ast.FunctionDef) else node.targets[0].id
            decorators = "".join(f"@{ast.get_source_segment(text, d)}\n"
                                 for d in getattr(node, "decorator_list", []))
            source[name] = (node.lineno, decorators + ast.get_source_segment(text, node), node)
    needed, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        node = source[name][2]
        doc = ast.get_docstring(node) if isinstance(node, ast.FunctionDef) else ""
        if doc and "Needs:" in doc:
            listed = doc.split("Needs:")[1].split(".")[0]
            todo += [n.strip() for n in listed.replace("\n", " ").split(",")
                     if n.strip() and n.strip() != "nothing"]
    scope = {"jax": jax, "jnp": jnp, "np": np, "math": math, "functools": functools}
    for _, code, _ in sorted(source[n] for n in needed):
        exec(code, scope)
    return scope


def test_each_piece_lifts_alone():
    """patchify/unpatchify, split/merge, affine_forward/inverse, coupling_forward/inverse, the
    ViT block with its init, dequantize and bits_per_dim each run from their own source and the
    definitions their docstrings name, in a namespace with nothing else of jet.py, and compute
    what jet's own do."""
    params, perms = random_params(SMALL, 5)
    x = images(jax.random.key(6), SMALL)
    h = jet.patchify(x, 2)
    p0 = jax.tree.map(lambda a: a[0], params)
    x1, x2 = jet.split(h, perms[0])

    def net(p, x1):  # any network with the coupling net's interface
        return jnp.tanh(x1) * 0.3, jnp.cos(x1)
    checks = {
        ("patchify", "unpatchify"): lambda f: (f["patchify"](x, 2),
                                               f["unpatchify"](h, 2, SMALL.image_shape)),
        ("split", "merge"): lambda f: (*f["split"](h, perms[1]), f["merge"](x1, x2, perms[0])),
        ("affine_forward", "affine_inverse"): lambda f: (
            *f["affine_forward"](p0, x1, x2, 2.0, net=net),
            *f["affine_inverse"](p0, x1, x2, 2.0, net=net)),
        ("coupling_forward", "coupling_inverse"): lambda f: (
            *f["coupling_forward"](p0, perms[2], h, 2.0, net=net),
            *f["coupling_inverse"](p0, perms[2], h, 2.0, net=net)),
        ("vit_block", "init_vit_block"): lambda f: (
            f["init_vit_block"](jax.random.key(1), 16, 2),
            f["vit_block"](jax.tree.map(lambda a: a[0, 0], params["blocks"]),
                           jax.random.normal(jax.random.key(2), (2, 16, 16)))),
        ("dequantize",): lambda f: f["dequantize"](jax.random.key(3), (x * 100 + 128).astype(
            jnp.uint8)),
        ("bits_per_dim",): lambda f: f["bits_per_dim"](x, jnp.ones(2)),
    }
    for names, run in checks.items():
        got, want = run(lifted(*names)), run(vars(jet))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b, err_msg=str(names))


# ------------------------------------------------------------------------------------------
# `python test_jet.py` prints the figures the README quotes (the tests only assert bounds).


def report(draws=40):
    with jax.enable_x64(True):
        for path in GOLDEN:
            params, perms, cfg, d = load_golden(path)
            flows = {"": (forward, inverse), " (plain flow)": (plain_forward, plain_inverse)}
            for name, flow in list(flows.items())[:1 + bool(cfg.context_dim)]:
                errors = golden_errors(params, perms, cfg, d, flow)
                print(f"{path.stem}{name}: relative error " + ", ".join(
                    f"{key} {error:.1e}" for key, error in errors.items()))
    worst = 0.0
    for seed in range(draws):  # hypothesis draws: the worst case varies a little per run
        cfg = configs().example()
        params, perms = random_params(cfg, seed)
        k_x, k_z = jax.random.split(jax.random.key(seed))
        x = images(k_x, cfg)
        worst = max(worst, *round_trip_errors(forward, inverse, params, perms, cfg, x,
                                              jax.random.normal(k_z, x.shape))[:2])
    print(f"float32 round trip, {draws} random configurations: worst error {worst:.1e} per "
          f"coupling, relative to max(1, largest value) (test bound {ROUND_TRIP_BOUND:.0e})")


if __name__ == "__main__":
    report()
