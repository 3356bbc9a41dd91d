"""ablate.py: the CNN coupling, the bijections Jet removed and the multiscale flow get the
properties the ViT coupling has (exact inverse in float32 with every layer perturbed away from
its identity init, log-det = slogdet of the autodiff Jacobian in float64); the composed flow
reduces to jet.forward, and the multiscale flow starts as single-scale Jet; FLOP counts agree
with XLA's; and `ablate.py --quick` runs every experiment through train.py."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ablate
import ablation_report
import checkpoints
import data
import jet
import presets
import timing
import train
import variants
from conftest import (check_logdet_against_jacobian, check_round_trip, configs, images,
                      random_params)

VARIANTS = (variants.Variant("cnn", net="cnn"),
            variants.Variant("cnn, 2 blocks, actnorm, dense", net="cnn", cnn_blocks=2,
                           actnorm=True, dense=True),
            variants.Variant("actnorm", actnorm=True),
            variants.Variant("dense", dense=True))
forward = jax.jit(variants.flow_forward, static_argnames="v")
inverse = jax.jit(variants.flow_inverse, static_argnames="v")


def random_flow_params(cfg, v, seed, dtype=np.float32):
    """Every leaf random (zero-initialised output layers included), so each layer really moves
    its input; dense kernels are random rotations plus noise, so they stay well conditioned.
    The split2d layer (no depth axis) gets small weights: its exp(log_scale) stays moderate."""
    shapes = jax.eval_shape(lambda: variants.make_model(v)["init"](jax.random.key(0), cfg)[0])
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name, shape = jax.tree_util.keystr(path), shape.shape
        if "['dense']" in name:
            rotations = np.linalg.qr(rng.normal(size=shape))[0]
            value = rotations + 0.1 * rng.normal(size=shape) / np.sqrt(shape[-1])
        elif "['split2d']" in name:
            value = 0.3 * rng.normal(size=shape) / np.sqrt(shape[0])
        elif "scale" in name and "log_scale" not in name:  # layer norm
            value = 1 + 0.1 * rng.normal(size=shape)
        elif "kernel" in name:  # fan-in: all but the output axis (and the depth axis)
            value = rng.normal(size=shape) / np.sqrt(np.prod(shape[1:-1]))
        else:
            value = 0.3 * rng.normal(size=shape)
        return jnp.asarray(value, dtype)
    params = jax.tree_util.tree_map_with_path(leaf, shapes)
    if v.multiscale:
        key = jax.random.key(seed)
        return params, variants.multiscale_perms(key, cfg, variants.factor_point(cfg, v))
    return params, jet.init_perms(jax.random.key(seed), cfg)


# ------------------------------------------------------------------------------------------
# The new bijections and the CNN coupling: the properties of jet's couplings


def variant_round_trip(forward, inverse, cfg, v, seed):
    """conftest.check_round_trip with every parameter random; the layers really move x."""
    params, perms = random_flow_params(cfg, v, seed)
    x, fx = check_round_trip(forward, inverse, params, perms, cfg, seed, v=v)
    assert float(jnp.abs(fx - x).max()) > 1e-3


def variant_logdet(forward, inverse, cfg, v, seed):
    """conftest.check_logdet_against_jacobian with every parameter random, in float64."""
    params, perms = random_flow_params(cfg, v, seed, np.float64)
    check_logdet_against_jacobian(forward, inverse, params, perms, cfg, seed, v=v)


@given(configs(max_depth=3), st.sampled_from(VARIANTS), st.integers(0, 2 ** 31 - 1))
def test_variant_flows_are_invertible_in_float32(cfg, v, seed):
    """flow_inverse(flow_forward(x)) = x and back from z, to the bound jet's couplings meet
    (per layer, relative to the magnitudes involved); inverse log-det = minus forward's."""
    variant_round_trip(forward, inverse, cfg, v, seed)


@given(configs(max_depth=2), st.sampled_from(VARIANTS), st.integers(0, 2 ** 31 - 1))
def test_variant_logdet_equals_slogdet_of_jacobian(x64, cfg, v, seed):
    """log-det = log|det J|, J = jax.jacfwd of the map, in float64, forward and inverse."""
    variant_logdet(forward, inverse, cfg, v, seed)


@pytest.mark.parametrize("bijection", ["actnorm", "dense"])
def test_each_removed_component_alone(x64, bijection):
    """ActNorm and the token-wise dense layer on [B, N, D]: exact inverse, log-det = slogdet."""
    cfg = jet.Config(image_shape=(4, 6, 2), patch_size=2, depth=1, emb_dim=8)
    v = variants.Variant(bijection, **{bijection: True})
    p = jax.tree.map(lambda a: a[0], random_flow_params(cfg, v, 0, np.float64)[0])[bijection]
    fwd, inv = {"actnorm": (variants.actnorm_forward, variants.actnorm_inverse),
                "dense": (variants.token_dense_forward, variants.token_dense_inverse)}[bijection]
    h = jax.random.normal(jax.random.key(1), (1, cfg.num_tokens, cfg.token_dim), jnp.float64)
    y, logdet = fwd(p, h)
    h_back, logdet_back = inv(p, y)
    np.testing.assert_allclose(h_back, h, atol=1e-12)
    np.testing.assert_allclose(logdet_back, -logdet, atol=1e-12)
    jacobian = jax.jacfwd(lambda u: fwd(p, u.reshape(h.shape))[0].reshape(-1))(h.reshape(-1))
    np.testing.assert_allclose(logdet[0], jnp.linalg.slogdet(jacobian)[1], rtol=1e-10)


def test_identity_at_init():
    """Zero output layers, zero ActNorm and (at init) the ActNorm data init aside, a CNN flow
    with k = 2 maps x to itself with log-det 0, as jet does."""
    cfg = jet.Config(image_shape=(8, 8, 3), patch_size=2, depth=3, emb_dim=8,
                     kinds=("channels", "spatial"))
    v = variants.Variant("cnn + actnorm", net="cnn", actnorm=True)
    params, perms = variants.init_flow(jax.random.key(0), cfg, v)
    x = images(jax.random.key(1), cfg)
    z, logdet = forward(params, perms, x, cfg, v=v)
    np.testing.assert_allclose(z, x, atol=1e-6)
    np.testing.assert_allclose(logdet, 0.0, atol=1e-4)


def test_actnorm_data_init_normalises_each_layer_input():
    """After flow_data_init, every ActNorm's output on the init batch has zero mean and unit
    variance in each of the D dims (Glow), layer after layer."""
    cfg = jet.Config(image_shape=(8, 8, 3), patch_size=2, depth=3, emb_dim=8)
    v = variants.Variant("actnorm", actnorm=True)
    params, perms = random_flow_params(cfg, v, 3)
    x = 0.3 * images(jax.random.key(2), cfg, batch=16) + 0.2
    params = variants.flow_data_init(params, perms, x, cfg, v=v)
    h = jet.patchify(x, cfg.patch_size)
    for i in range(cfg.depth):
        p = jax.tree.map(lambda a: a[i], params)
        normalised, _ = variants.actnorm_forward(p["actnorm"], h)
        np.testing.assert_allclose(normalised.mean((0, 1)), 0.0, atol=1e-5)
        np.testing.assert_allclose(normalised.std((0, 1)), 1.0, atol=1e-4)
        h, _ = variants.layer_forward(p, perms[i], h, cfg, v)


@given(configs(), st.integers(0, 2 ** 31 - 1))
def test_plain_vit_flow_is_jet_forward(cfg, seed):
    """With the ViT and nothing between couplings, the composed flow is exactly jet's."""
    v = variants.Variant("vit")
    params, perms = random_params(cfg, seed)
    x = images(jax.random.key(seed), cfg)
    z, logdet = forward({"coupling": params}, perms, x, cfg, v=v)
    z_jet, logdet_jet = jax.jit(jet.forward)(params, perms, x, cfg)
    np.testing.assert_allclose(z, z_jet, atol=1e-5)
    np.testing.assert_allclose(logdet, logdet_jet, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("v", VARIANTS[:2], ids=lambda v: v.name)
def test_variant_flops_match_xla_count(v):
    """forward_flops agrees with XLA's cost analysis (one layer: a scan body counts once), and
    cnn_width gives a CNN within 10% of the ViT's FLOPs at the cpu preset's size."""
    cfg = jet.Config(image_shape=(16, 16, 3), patch_size=2, depth=1, emb_dim=32, num_heads=2)
    params, perms = jax.eval_shape(lambda: variants.init_flow(jax.random.key(0), cfg, v))
    x = jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32)
    analysis = forward.lower(params, perms, x, cfg, v=v).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    assert variants.forward_flops(cfg, v) == pytest.approx(analysis["flops"] / 8, rel=0.15)
    base = presets.make_config(ablate.STUDY_BASE, (32, 32, 3))  # the model it varies
    assert variants.forward_flops(base, v) == pytest.approx(timing.forward_flops(base), rel=0.1)


# ------------------------------------------------------------------------------------------
# Multiscale factoring: one bijection x -> z, with half of each token factored out part-way

ms_forward = jax.jit(variants.multiscale_forward, static_argnames="v")
ms_inverse = jax.jit(variants.multiscale_inverse, static_argnames="v")
MS_CFG = jet.Config(image_shape=(8, 12, 3), patch_size=2, depth=4, emb_dim=8, num_heads=2,
                    kinds=("channels", "spatial"))  # a 4x6 grid of 12-dim tokens


@st.composite
def multiscale_cases(draw, max_depth=3):
    """(cfg, Variant): a drawn Config with depth >= 2 and P*P*C divisible by 4, either prior,
    the factoring after any number of couplings that leaves some on both sides."""
    cfg = draw(configs(max_depth=max_depth).filter(lambda c: c.token_dim % 4 == 0))
    cfg = dataclasses.replace(cfg, depth=max(2, cfg.depth))
    prior = draw(st.sampled_from(["normal", "split2d"]))
    F = draw(st.integers(1, cfg.depth - 1))
    return cfg, variants.Variant(prior, multiscale=prior, factor_after=F)


@given(multiscale_cases(), st.integers(0, 2 ** 31 - 1))
def test_multiscale_flow_is_invertible_in_float32(case, seed):
    """x is recovered from z, which holds the later couplings' output and the factored-out
    eps, and z from x, to the bound jet's couplings meet (per coupling, relative to the
    magnitudes involved); inverse log-det = minus forward's."""
    cfg, v = case
    variant_round_trip(ms_forward, ms_inverse, cfg, v, seed)


@given(multiscale_cases(max_depth=2), st.integers(0, 2 ** 31 - 1))
def test_multiscale_logdet_equals_slogdet_of_jacobian(x64, case, seed):
    """log-det = log|det J|, J = jax.jacfwd of the whole map x -> z (factoring and either
    prior included), in float64, forward and inverse."""
    cfg, v = case
    variant_logdet(ms_forward, ms_inverse, cfg, v, seed)


def test_factoring_step_alone(x64):
    """factor_out / factor_in on [B, N, D]: exact inverses; log-det = slogdet of the Jacobian
    of h -> (kept, eps); under split2d, N(eps; 0, I) with that log-det is Glow's Gaussian
    N(out; mean, exp(log_scale)) on the factored-out half."""
    B, N, D = 2, 3, 8
    h = jax.random.normal(jax.random.key(0), (B, N, D), jnp.float64)
    dense = {"kernel": 0.3 * jax.random.normal(jax.random.key(1), (D // 2, D), jnp.float64),
             "bias": 0.3 * jax.random.normal(jax.random.key(2), (D,), jnp.float64)}
    for p in (None, dense):
        kept, eps, logdet = variants.factor_out(p, h)
        h_back, logdet_back = variants.factor_in(p, kept, eps)
        np.testing.assert_allclose(h_back, h, atol=1e-12)
        np.testing.assert_allclose(logdet_back, -logdet, atol=1e-12)

        def flat_map(u):
            return jnp.concatenate(variants.factor_out(p, u.reshape(1, N, D))[:2], -1).reshape(-1)
        jacobian = jax.jacfwd(flat_map)(h[:1].reshape(-1))
        np.testing.assert_allclose(logdet[0], jnp.linalg.slogdet(jacobian)[1], atol=1e-10)
    mean, log_scale = jnp.split(h[..., :D // 2] @ dense["kernel"] + dense["bias"][None, None],
                                2, axis=-1)
    out = h[..., D // 2:]
    glow = jnp.sum(jax.scipy.stats.norm.logpdf(out, mean, jnp.exp(log_scale)), axis=(1, 2))
    ours = jnp.sum(jax.scipy.stats.norm.logpdf(eps), axis=(1, 2)) + logdet
    np.testing.assert_allclose(ours, glow, rtol=1e-12)


def test_multiscale_starts_as_single_scale_jet():
    """At init (zero output layers, zero split2d layer, k = 2) the multiscale flow is the
    identity, as single-scale jet is (test_jet.py: test_identity_at_init): the same z = x,
    log-det 0, hence exactly jet's bits/dim at init, under either prior."""
    x = images(jax.random.key(1), MS_CFG)
    z_jet, logdet_jet = x, jnp.zeros(x.shape[:1])
    split2d = variants.Variant("split2d", multiscale="split2d")
    params, perms = jax.jit(variants.init_multiscale, static_argnums=(1, 2))(
        jax.random.key(0), MS_CFG, split2d)
    for prior in ("normal", "split2d"):  # the normal prior's params: split2d's without its layer
        v = variants.Variant(prior, multiscale=prior)
        z, logdet = ms_forward({k: p for k, p in params.items() if k in ("stage1", "stage2")
                                or prior == "split2d"}, perms, x, MS_CFG, v=v)
        np.testing.assert_array_equal(z, z_jet)
        np.testing.assert_array_equal(jet.bits_per_dim(z, logdet),
                                      jet.bits_per_dim(z_jet, logdet_jet))


def test_multiscale_perms_fit_train_checkpoints():
    """multiscale_perms has train.state_template's perms shape and dtype; rows before the
    factoring are jet.init_perms's; every row is a permutation of N*D whose first N*D/2
    entries are a coupling's split of the kept [N, D/2] tokens, as that coupling's kind says."""
    cfg, F = MS_CFG, 2
    perms = variants.multiscale_perms(jax.random.key(3), cfg, F)
    template = checkpoints.state_template(cfg, None, variants.make_model(
        variants.Variant("ms", multiscale="normal", factor_after=F))["init"])["perms"]
    assert (perms.shape, perms.dtype) == (template.shape, template.dtype)
    np.testing.assert_array_equal(perms[:F], jet.init_perms(jax.random.key(3), cfg)[:F])
    N, half = cfg.num_tokens, cfg.token_dim // 2
    for row, (kind, proj) in zip(np.asarray(perms[F:]), cfg.couplings()[F:]):
        np.testing.assert_array_equal(np.sort(row), np.arange(N * 2 * half))
        row = row[:N * half]  # indices into the kept [N, D/2], flat
        if kind == "channels":  # x1 [N, D/4] and x2 [N, D/4]: row n holds token n's dims,
            x1, x2 = row.reshape(2, N, half // 2)  # in the same order for every token
            for part in (x1, x2):
                np.testing.assert_array_equal(part // half, np.arange(N)[:, None].repeat(
                    half // 2, 1))
                np.testing.assert_array_equal(part % half, part[:1].repeat(N, 0) % half)
        else:  # whole kept tokens, x1 the pattern's
            blocks = row.reshape(N, half)
            tokens = blocks[:, 0] // half
            np.testing.assert_array_equal(blocks, tokens[:, None] * half + np.arange(half))
            pattern = jet.spatial_pattern(proj, *cfg.grid).reshape(-1)
            assert set(tokens[:N // 2]) == set(np.flatnonzero(pattern))


@pytest.mark.slow
@pytest.mark.parametrize("prior", ["normal", "split2d"])
def test_multiscale_samples_invert_the_flow_on_noise(prior):
    """The model's sampler draws z ~ N(0, T^2 I) and returns quantize(f^-1(z)): uint8
    [n, H, W, C]; f maps those x back to z."""
    v = variants.Variant(prior, multiscale=prior)
    params, perms = random_flow_params(MS_CFG, v, 5)
    key, n, T = jax.random.key(6), 5, 0.7
    samples = variants.make_model(v)["sample"](params, perms, key, n, MS_CFG, temperature=T)
    assert samples.dtype == jnp.uint8 and samples.shape == (n, *MS_CFG.image_shape)
    z = T * jax.random.normal(key, (n, *MS_CFG.image_shape))
    x, _ = ms_inverse(params, perms, z, MS_CFG, v=v)
    np.testing.assert_array_equal(samples, jet.quantize(x))
    z_back, _ = ms_forward(params, perms, x, MS_CFG, v=v)
    np.testing.assert_allclose(z_back, z, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("prior", ["normal", "split2d"])
def test_multiscale_flops_match_xla_count(prior):
    """forward_flops of a multiscale flow agrees with XLA's cost analysis (one coupling on each
    side of the factoring: a scan body counts once), and at the cpu preset's size it is within
    5% of Jet's (narrower input and output layers after the factoring)."""
    v = variants.Variant(prior, multiscale=prior)
    cfg = jet.Config(image_shape=(16, 16, 3), patch_size=2, depth=2, emb_dim=32, num_heads=2)
    params, perms = jax.eval_shape(lambda: variants.init_multiscale(jax.random.key(0), cfg, v))
    x = jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32)
    analysis = ms_forward.lower(params, perms, x, cfg, v=v).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    assert variants.forward_flops(cfg, v) == pytest.approx(analysis["flops"] / 8, rel=0.15)
    base = presets.make_config(ablate.STUDY_BASE, (32, 32, 3))  # the model it varies
    assert variants.forward_flops(base, v) == pytest.approx(timing.forward_flops(base), rel=0.05)


def test_invalid_multiscale_variants_raise():
    """Unknown priors, multiscale with other variant options, factor_after alone, factoring
    with no coupling on one side, tokens whose kept half is odd, and perms of jet's layout
    for another Config are refused, naming what to change."""
    with pytest.raises(ValueError, match="must be one of"):
        variants.Variant("x", multiscale="glow")
    with pytest.raises(ValueError, match="plain ViT flow only"):
        variants.Variant("x", net="cnn", multiscale="normal")
    with pytest.raises(ValueError, match="needs multiscale"):
        variants.Variant("x", factor_after=3)
    normal = variants.Variant("x", multiscale="normal")
    for bad, match in ((dataclasses.replace(MS_CFG, depth=1), "raise depth"),
                       (jet.Config(image_shape=(4, 4, 2), patch_size=1, depth=2, emb_dim=8),
                        "divisible by 4")):
        with pytest.raises(ValueError, match=match):
            variants.init_multiscale(jax.random.key(0), bad, normal)
    with pytest.raises(ValueError, match="factor_after < depth"):
        variants.forward_flops(MS_CFG, variants.Variant("x", multiscale="normal", factor_after=4))
    params, perms = jax.eval_shape(lambda: variants.init_multiscale(jax.random.key(0), MS_CFG,
                                                                  normal))
    x = jax.ShapeDtypeStruct((2, *MS_CFG.image_shape), jnp.float32)
    other = jax.ShapeDtypeStruct((MS_CFG.depth, perms.shape[1] - 2), perms.dtype)
    with pytest.raises(ValueError, match="were they made for another Config"):
        jax.eval_shape(lambda: variants.multiscale_forward(params, other, x, MS_CFG, v=normal))
    wrong = jax.ShapeDtypeStruct((2, 4, *MS_CFG.image_shape[1:]), jnp.float32)
    with pytest.raises(ValueError, match=r"must be \[B, H, W, C\]"):
        jax.eval_shape(lambda: variants.multiscale_inverse(params, perms, wrong, MS_CFG, v=normal))


def test_every_experiment_builds_on_cifar10():
    """Each variant of each experiment is a valid model on 32x32x3 with a sensible step count at
    each of its budgets (no training: configuration only); the experiments the paper's claims
    turn on span 16x of compute up to the 64 TFLOP a 30-minute run trains, learning rates are
    swept at the middle budget, and the frontier has a shape of >= 32 couplings."""
    args = ablate.parse_args([])
    for name, e in ablate.EXPERIMENTS.items():
        for v in e["variants"]:
            cfg = presets.make_config(ablate.run_flags(v, 1e-3, False), (32, 32, 3))
            for budget in ablate.budgets(name, args):
                steps = budget * 1e12 / (3 * variants.forward_flops(cfg, v) * 64)
                assert 30 <= steps <= 8000, (v.name, budget, steps)
        every = e["budgets"]
        assert ablate.sweep_budget(name, args) == sorted(every)[len(every) // 2]
        if name in ("coupling_net", "depth_tradeoff", "removed_components", "multiscale"):
            assert max(every) / min(every) >= 16
    assert max(ablate.EXPERIMENTS["coupling_net"]["budgets"]) == 64
    shapes = ablate.EXPERIMENTS["depth_tradeoff"]["variants"]
    assert max(dict(ablate.run_flags(v, 1e-3, False))["depth"] for v in shapes) >= 32
    capped = ablate.parse_args(["--max_budget", "16"])
    assert ablate.budgets("coupling_net", capped) == (4.0, 16.0)


def test_study_base_is_the_cpu_preset():
    """The study's base is train.py's `cpu` preset (its model, kinds and patterns, no remat) at
    batch 64, with 5,000 images held out for choosing learning rates."""
    cpu = presets.PRESETS["cpu"]
    base = presets.make_config(ablate.STUDY_BASE, (32, 32, 3))
    assert base == presets.make_config({"preset": "cpu"}, (32, 32, 3))
    assert ablate.STUDY_BASE["batch_size"] == 64 and ablate.STUDY_BASE["validation"] == 5000
    assert not cpu["remat"] and ablate.STUDY_BASE["preset"] == "cpu"


def test_close_calls_get_a_third_seed():
    """Two rows whose means differ by at most twice the larger spread are a close call; a row
    with fewer than two finished runs is none."""
    rows = lambda *bpd: [{"test_bpd": b} for b in bpd]  # noqa: E731
    assert ablate.close_call(rows(4.00, 4.02), rows(4.04, 4.05))  # gap 0.035 <= 2 x 0.02
    assert not ablate.close_call(rows(4.00, 4.02), rows(4.10, 4.11))  # gap 0.095 > 0.04
    assert ablate.close_call(rows(4.0, 4.0), rows(4.0, 4.0))
    assert not ablate.close_call(rows(4.0, None), rows(4.0, 4.01))


def test_a_sweep_widens_until_its_best_is_inside():
    """tune: the start values, then a factor 2 beyond whichever end holds the best held-out
    figure, until the best is inside (or at a bound); a diverged run counts as worst. It stops
    where the stored runs stop when it may only look them up."""
    args = ablate.parse_args([])
    calls = []

    def get(optimum, diverge_above=1.0):
        def run(v, lr, seed, budget):
            calls.append(lr)
            if lr > diverge_above:
                return {"diverged": "nan at step 3"}
            return {"validation_bpd": 4.0 + math.log2(lr / optimum) ** 2}
        return run
    assert ablate.tune(ablate.BASE, 16.0, ablate.LR_GRID, get(1.6e-2), args) == 1.6e-2
    assert calls == list(ablate.LR_GRID)
    calls.clear()
    assert ablate.tune(ablate.BASE, 16.0, ablate.LR_GRID, get(1e-3), args) == 1e-3
    assert calls == [4e-3, 8e-3, 1.6e-2, 3.2e-2, 2e-3, 1e-3, 5e-4]
    calls.clear()  # the best at the top bound: the sweep cannot widen, and stops
    assert ablate.tune(ablate.BASE, 16.0, ablate.LR_GRID, get(1.0), args) == 0.256
    assert calls[-1] == 0.256 and len(calls) == 7
    calls.clear()  # everything above 1e-2 diverges: the best is 8e-3, inside
    assert ablate.tune(ablate.BASE, 16.0, ablate.LR_GRID, get(1.0, 1e-2), args) == 8e-3
    assert ablate.next_lr({1e-3: math.inf, 2e-3: math.inf}, (1e-4, 1.0)) == 5e-4
    stored = {4e-3: 4.3, 8e-3: 4.2}
    lookup = lambda v, lr, seed, b: ({"validation_bpd": stored[lr]}  # noqa: E731
                                     if lr in stored else None)
    assert ablate.tune(ablate.BASE, 16.0, ablate.LR_GRID, lookup, args) == 8e-3


def test_each_variant_trains_at_its_nearest_sweep():
    """chosen_lr: a variant's best held-out lr at the budget where it was swept (3 or more
    learning rates), else at the nearest such budget in log FLOPs; none before any sweep."""
    args = ablate.parse_args([])

    def run(v, lr, budget, held, seed=0):
        return ablate.run_key(v, lr, seed, budget, args, "d") | {
            "lr": lr, "validation_bpd": held, "test_bpd": held}
    cnn = ablate.EXPERIMENTS["coupling_net"]["variants"][1]
    records = [run(cnn, lr, 16.0, held) for lr, held in ((4e-3, 4.3), (8e-3, 4.2), (1.6e-2, 4.4))]
    records += [run(cnn, 4e-3, 16.0, 4.0, seed=1)]  # other seeds are no sweep
    records += [run(cnn, 8e-3, 4.0, 5.0)]  # one run at 4: no sweep there
    assert ablate.chosen_lr(records, cnn, 4.0, args, "d") == 8e-3
    assert ablate.chosen_lr(records, cnn, 64.0, args, "d") == 8e-3
    records += [run(cnn, lr, 64.0, held) for lr, held in ((4e-3, 4.0), (8e-3, 4.1), (2e-3, 4.2))]
    assert ablate.chosen_lr(records, cnn, 64.0, args, "d") == 4e-3
    assert ablate.chosen_lr(records, cnn, 32.0, args, "d") == 4e-3  # 16 and 64: the larger
    assert ablate.chosen_lr(records, ablate.BASE, 16.0, args, "d") is None


# ------------------------------------------------------------------------------------------
# The report's rules, fed made-up rows


def test_the_verdict_rule_judges_by_both_spreads():
    """A gap counts when it exceeds both rows' seed spreads; the claim's verdict follows what
    it predicts; one seed is judged by nothing."""
    assert ablation_report.compare([4.00, 4.02], [4.10, 4.11]) == ("behind", pytest.approx(0.095))
    assert ablation_report.compare([4.00, 4.02], [3.90, 3.91])[0] == "ahead"
    assert ablation_report.compare([4.00, 4.10], [4.05, 4.06])[0] == "a tie"
    assert ablation_report.compare([4.00], [4.50])[0] == "one seed"
    assert ablation_report.verdict("behind", "behind") == "agrees"
    assert ablation_report.verdict("behind", "a tie") == "a tie"
    assert ablation_report.verdict("not ahead", "a tie") == "agrees"
    assert ablation_report.verdict("not ahead", "ahead") == "disagrees"
    assert ablation_report.verdict("ahead", "behind") == "disagrees"
    assert ablation_report.verdict(None, "ahead") == ""
    assert ablation_report.verdict("behind", "one seed") == ""


def test_the_trend_rule_says_halves_only_when_every_step_halves():
    """The trend across budgets 4x apart: "halves or more" only when every factor is at most
    0.5, "shrinks" when every one is below 1, "grows" when above, "both ways" otherwise, "the
    lines cross" when the variant is ahead beyond the spreads at one budget and behind at
    another; a 16x step counts as two 4x steps. And the summary of several variants says
    "every" only when it holds for each."""
    trend = ablation_report.trend
    side = ["behind"] * 3
    assert "halves or more" in trend([(4, 0.4), (16, 0.2), (64, 0.1)], side)
    assert "shrinks by ×0.50–0.71" in trend([(4, 0.4), (16, 0.2), (64, 0.142)], side)
    assert "halves" not in trend([(4, 0.4), (16, 0.2), (64, 0.142)], side)
    assert "grows" in trend([(4, 0.1), (16, 0.2), (64, 0.3)], side)
    assert "both ways" in trend([(4, 0.1), (16, 0.2), (64, 0.1)], side)
    assert "the lines cross between 4 and 64" in trend([(4, 0.3), (16, 0.0), (64, -0.1)],
                                                      ["behind", "a tie", "ahead"])
    assert "changes sign within" in trend([(4, 0.01), (16, -0.01)], ["a tie", "a tie"])
    assert "halves or more per 4x of compute (×0.50" in trend([(1, 0.4), (16, 0.1)], side[:2])
    assert trend([(4, 0.4)], side[:1]) == ""
    halving = trend([(4, 0.4), (16, 0.2)], side[:2])
    slower = trend([(4, 0.4), (16, 0.3)], side[:2])
    assert ablation_report.every([halving, halving]) == \
        "Every variant's gap halves or more per 4x of compute."
    assert ablation_report.every([halving, slower]) == \
        "Every variant's gap shrinks per 4x of compute."
    assert ablation_report.every([halving, trend([(4, 0.1), (16, 0.2)], side[:2])]) == ""


def test_equal_time_compares_on_the_same_path():
    """A variant at the base's training time: its bits/dim interpolated in log time between
    its budgets (extended beyond them, and said so), against the base's mean by its spread."""
    assert ablation_report.at_time([(10.0, 5.0), (40.0, 4.0), (160.0, 3.5)], 20.0) == (
        pytest.approx(4.5), True)
    assert ablation_report.at_time([(10.0, 5.0), (40.0, 4.0)], 80.0) == (pytest.approx(3.5), False)
    base = {"budget": 16, "bpd": [4.0, 4.02], "train_s_same_path": 40.0}
    rows = [{"train_s": 20.0, "bpd": [4.5]}, {"train_s": 80.0, "bpd": [3.9]}]
    assert ablation_report.equal_time(base, rows).endswith("behind (+0.190)")
    assert ablation_report.equal_time(base | {"train_s_same_path": None}, rows) == ""


# ------------------------------------------------------------------------------------------
# The script


# One experiment with every model kind ablate.py builds (CNN, ActNorm and dense, multiscale)
# and the base, at three budgets: sweeps, a re-check at the top, finalists; the experiments
# themselves only differ in their variants (test_every_experiment_builds_on_cifar10).
LOAD, DIGEST, TRAIN_MAIN = data.load, data.digest, train.main  # as the tests found them
QUICK_EXPERIMENT = {"every_kind": dict(
    claim="a claim", question="A question?", budgets=(1.0, 4.0, 16.0), expect="behind",
    finalists=1, variants=(ablate.BASE, ablate.EXPERIMENTS["coupling_net"]["variants"][1],
                           ablate.EXPERIMENTS["removed_components"]["variants"][3],
                           ablate.EXPERIMENTS["multiscale"]["variants"][1]))}


@pytest.mark.slow
def test_quick_study_then_reports_from_the_file_alone(tmp_path, monkeypatch):
    """--quick trains an experiment with every model kind through train.py: each variant swept
    at the middle budget (seed 0 at every learning rate of the quick grid), the base's optimum
    re-checked at the top, each finalist at every budget at its chosen learning rate, with
    more steps at larger budgets; --report re-prints the same tables and pictures from
    results.jsonl with no data and no training; a second study reads every result back unless
    the images differ (their digest is in each run's key); a run's workdir refuses to be
    resumed as another model; a multiscale run's checkpoint restores (--eval_only gives its
    figure again) and samples."""
    monkeypatch.setattr(ablate, "EXPERIMENTS", QUICK_EXPERIMENT)
    argv = ["--quick", "--seeds", "1", "--workdir", str(tmp_path), "--costs",
            "--experiment=every_kind"]
    tables = ablate.main(argv)
    assert set(tables) == {"every_kind", "costs"}
    records = ablate.read_results(str(tmp_path / "results.jsonl"))
    runs = [r for r in records if ablate.is_run(r)]
    args, digest = ablate.parse_args(argv), data.digest(data.load("synthetic"))
    for r in runs:
        assert r["diverged"] if "diverged" in r else np.isfinite(r["test_bpd"])
        assert r["train_tflop"] == pytest.approx(r["budget"], rel=0.5) and r["params"] > 0
    for name in QUICK_EXPERIMENT:
        middle = ablate.sweep_budget(name, args)
        for v in ablate.EXPERIMENTS[name]["variants"]:
            swept = ablate.seed0_scores(records, v, middle, args, digest)
            assert set(swept) == set(ablate.QUICK_LR_GRID), v.name
        for v in ablate.finalists(name, records, args, digest):
            for budget in ablate.budgets(name, args):
                lr = ablate.chosen_lr(records, v, budget, args, digest)
                assert ablate.stored_runs(records, v, budget, args, digest, lr=lr), v.name
        e = ablate.EXPERIMENTS[name]
        assert e["claim"] in tables[name] and all(v.name in tables[name] for v in e["variants"])
        assert all(f"| {b:g} |" in tables[name] for b in ablate.budgets(name, args))
        for picture in (f"{name}.svg", f"{name}_sweep.svg"):
            assert os.path.exists(tmp_path / picture)
    steps = {r["budget"]: r["steps"] for r in runs if r["variant"] == ablate.BASE.name}
    assert steps[max(steps)] > steps[min(steps)] >= 2
    top = {r["lr"] for r in runs if r["variant"] == ablate.BASE.name and r["budget"] == max(
        ablate.budgets("every_kind", args))}
    assert len(top) == 2  # the base's optimum re-checked at the top budget (the quick bounds)
    costs = [r for r in records if r.get("kind") == "cost"]
    assert len(costs) == 5 and all(r["ms_per_step"] > 0 and r["memory_mb"] > 0 for r in costs)
    assert ablate.PLAIN_VIT.name in tables["costs"]

    def no_training(*args, **kwargs):
        raise AssertionError("a stored result was trained again")
    monkeypatch.setattr(train, "main", no_training)
    monkeypatch.setattr(data, "load", lambda *a, **k: pytest.fail("--report read the data"))
    assert ablate.main(argv + ["--report"]) == tables
    monkeypatch.setattr(data, "load", LOAD)
    assert ablate.main(argv) == tables
    monkeypatch.setattr(data, "digest", lambda dataset: "other pixels")
    with pytest.raises(AssertionError, match="trained again"):
        ablate.main(argv)
    monkeypatch.setattr(data, "digest", DIGEST)
    monkeypatch.setattr(train, "main", TRAIN_MAIN)

    cnn = next(r for r in runs if r["net"] == "cnn")
    workdir = tmp_path / "runs" / cnn["id"]
    with pytest.raises(ValueError, match="holds a run of model 'ablate:cnn1'"):
        train.main(["--dataset", "synthetic", "--workdir", str(workdir)])

    for v in QUICK_EXPERIMENT["every_kind"]["variants"][3:]:
        run = next(r for r in runs if r.get("multiscale") == v.multiscale)
        workdir = str(tmp_path / "runs" / run["id"])
        flags = ["--dataset", "synthetic", "--workdir", workdir]
        evaluated = train.main([*flags, "--eval_only"], variants.make_model(v))
        assert evaluated["test_bpd"] == run["test_bpd"]
        sampled = train.main([*flags, "--sample", "4"], variants.make_model(v))
        assert os.path.exists(sampled["samples"])


@pytest.mark.slow
def test_quick_scarce_data_and_transfer_then_report(tmp_path, monkeypatch, capsys):
    """--quick scarce_data and transfer, after the sweeps they take their learning rates from:
    a scarce run trains its variant's FLOPs on the small set, and its test figure is its best
    held-out checkpoint's, from the epoch of the held-out minimum (--eval_only on it gives
    both figures again); transfer pretrains on an npz set, fine-tunes from its params
    (--init_from), trains from scratch at pretraining + fine-tuning's FLOPs, and scores the
    pretrained model on the fine-tuning set's test images; --report gives the same tables from
    the results file alone."""
    monkeypatch.setattr(ablate, "SCARCE_VARIANTS", ablate.SCARCE_VARIANTS[:2])  # base, ActNorm
    removed = ablate.EXPERIMENTS["removed_components"]  # swept for the scarce runs' lrs
    monkeypatch.setitem(ablate.EXPERIMENTS, "removed_components",
                        removed | {"variants": removed["variants"][:2]})
    synthetic, rng = data.load("synthetic"), np.random.default_rng(0)
    noisy = np.clip(synthetic["train"] + rng.integers(-20, 21, synthetic["train"].shape), 0, 255)
    np.savez(tmp_path / "pre.npz", train=noisy.astype(np.uint8), test=synthetic["test"])
    argv = ["--quick", "--seeds", "1", "--workdir", str(tmp_path), "--max_budget", "16",
            f"--pretrain_data=npz:{tmp_path / 'pre.npz'}"]
    with pytest.raises(ValueError, match="has no sweep yet"):
        ablate.main(argv + ["--experiment=scarce_data"])
    ablate.main(argv + ["--experiment=removed_components"])
    argv += ["--experiment=scarce_data", "--experiment=transfer"]
    tables = ablate.main(argv)
    records = ablate.read_results(str(tmp_path / "results.jsonl"))
    runs = [r for r in records if ablate.is_run(r)]
    regime = ablate.QUICK_SCARCE
    for r in (r for r in runs if r.get("train_images")):
        assert len(r["curve"]) == regime["evals"]
        epoch, held, _ = min(r["curve"], key=lambda c: c[1])
        assert r["best_epoch"] == pytest.approx(epoch)
        v = next(v for v in ablate.SCARCE_VARIANTS if v.name == r["variant"])
        again = train.main(["--eval_only", f"--workdir={tmp_path / 'runs' / r['id'] / 'best'}"],
                           variants.make_model(v))
        assert again["validation_bpd"] == pytest.approx(held, rel=1e-6)
        assert again["test_bpd"] == r["test_bpd"]
    pre = next(r for r in runs if r["dataset"].startswith("npz:"))
    assert pre["data"] == data.digest(data.load(f"npz:{tmp_path / 'pre.npz'}"))
    tuned = [r for r in runs if r.get("init_from")]
    assert len(tuned) == 2 and all(r["init_from"] == pre["id"] for r in tuned)
    started = f"Initialised params from {tmp_path / 'runs' / pre['id']}"
    assert capsys.readouterr().out.count(started) == 2
    scale = ablate.QUICK_SCALE
    equal = [r for r in runs if r["budget"] in (
        pytest.approx((ablate.SCARCE_TFLOP + ablate.PRETRAIN_TFLOP) * scale),
        pytest.approx((16 + ablate.PRETRAIN_TFLOP) * scale))]
    assert len(equal) == 2 and not any(r.get("init_from") for r in equal)
    evals = [r for r in records if r.get("kind") == "eval"]
    assert [e["run"] for e in evals] == [pre["id"]]
    assert tables["transfer"].count("from scratch, pretraining's FLOPs added") == 2
    with open(tmp_path / "scarce_data.svg") as f:
        assert f.read().count("<circle") == 2 * regime["evals"]

    monkeypatch.setattr(train, "main", lambda *a, **k: pytest.fail("a stored run was retrained"))
    monkeypatch.setattr(data, "load", lambda *a, **k: pytest.fail("--report read the data"))
    assert ablate.main(argv + ["--report"]) == tables


def test_report_refuses_mixed_images(tmp_path):
    """A results file with runs on two image sets is refused by --report, not averaged."""
    args = ablate.parse_args(["--quick", "--workdir", str(tmp_path)])
    with open(args.results, "w") as f:
        for digest in ("a", "b"):
            f.write(json.dumps(ablate.run_key(ablate.BASE, 1e-3, 0, 1e-4, args, digest)) + "\n")
    with pytest.raises(ValueError, match="2 different image sets"):
        ablate.main(["--quick", "--workdir", str(tmp_path), "--report"])


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        ablate.main(["--max_budget", "-1"])
    assert "--max_budget must be a positive number" in capsys.readouterr().err
    assert ablate.main(["--list"]) == {}
    out = capsys.readouterr().out
    assert all(name in out for name in ablate.EXPERIMENTS)


# ------------------------------------------------------------------------------------------
# Where the bits go (--where_bits)


@pytest.mark.slow
def test_where_bits_reads_a_trained_run(tmp_path, capsys):
    """--where_bits on a finished run: a table of the kinds of pixels present (synthetic
    images have no zeros) whose shares add up to 1, under the run's overall bits/dim."""
    flags = ["--dataset", "synthetic", "--preset", "tiny", "--depth", "2", "--emb_dim", "8",
             "--num_heads", "1", "--steps", "2", "--eval_every", "2", "--workdir", str(tmp_path)]
    train.main(flags)
    table = ablate.main(["--where_bits", str(tmp_path), "--images", "16"])["where_bits"]
    assert table in capsys.readouterr().out
    assert "(step 2, 16 test images)" in table
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| exactly")
            or line.startswith("| 1 to")]
    assert 1 <= len(rows) <= 2 and sum(float(r[1]) for r in rows) == pytest.approx(1, abs=2e-3)


def test_an_empty_results_file_reports_no_runs_yet(tmp_path, monkeypatch):
    """Before any run, --report names each experiment's command instead of printing tables
    with no rows (or a sweep table whose header has no learning rates)."""
    args = ablate.parse_args(["--workdir", str(tmp_path), "--report"])  # and no data here
    monkeypatch.setattr(ablate.data, "load", lambda *a, **k: pytest.fail("loaded data"))
    tables = ablate.report([], list(ablate.EXPERIMENTS) + ["scarce_data", "transfer"], args,
                           digest="none")
    for name, text in tables.items():
        assert "|" not in text, name
        if name != "costs":
            assert f"No runs yet: `python ablate.py --experiment {name}`." in text, name
    assert "--costs" in tables["costs"]
