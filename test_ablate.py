"""ablate.py: the CNN coupling and the bijections Jet removed get the properties the ViT coupling
has (exact inverse in float32 with every layer perturbed away from its identity init, log-det =
slogdet of the autodiff Jacobian in float64); the composed flow reduces to jet.forward; FLOP
counts agree with XLA's; and `ablate.py --quick` runs every experiment through train.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import ablate
import jet
import train
from conftest import ROUND_TRIP_BOUND, configs, images, random_params

VARIANTS = (ablate.Variant("cnn", net="cnn"),
            ablate.Variant("cnn, 2 blocks, actnorm, dense", net="cnn", cnn_blocks=2,
                           actnorm=True, dense=True),
            ablate.Variant("actnorm", actnorm=True),
            ablate.Variant("dense", dense=True))
forward = jax.jit(ablate.flow_forward, static_argnums=3, static_argnames="v")
inverse = jax.jit(ablate.flow_inverse, static_argnums=3, static_argnames="v")


def random_flow_params(cfg, v, seed, dtype=np.float32):
    """Every leaf random (zero-initialised output layers included), so each layer really moves
    its input; dense kernels are random rotations plus noise, so they stay well conditioned."""
    shapes, perms = jax.eval_shape(lambda: ablate.init_flow(jax.random.key(0), cfg, v))
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        name, shape = jax.tree_util.keystr(path), shape.shape
        if "['dense']" in name:
            rotations = np.linalg.qr(rng.normal(size=shape))[0]
            value = rotations + 0.1 * rng.normal(size=shape) / np.sqrt(shape[-1])
        elif "scale" in name and "log_scale" not in name:  # layer norm
            value = 1 + 0.1 * rng.normal(size=shape)
        elif "kernel" in name:  # fan-in: all but the output axis (and the depth axis)
            value = rng.normal(size=shape) / np.sqrt(np.prod(shape[1:-1]))
        else:
            value = 0.3 * rng.normal(size=shape)
        return jnp.asarray(value, dtype)
    params = jax.tree_util.tree_map_with_path(leaf, shapes)
    return params, jet.init_perms(jax.random.key(seed), cfg)


# ------------------------------------------------------------------------------------------
# The new bijections and the CNN coupling: the properties of jet's couplings


@pytest.mark.slow
@given(configs(max_depth=3), st.sampled_from(VARIANTS), st.integers(0, 2 ** 31 - 1))
def test_variant_flows_are_invertible_in_float32(cfg, v, seed):
    """flow_inverse(flow_forward(x)) = x and back from z, to the bound jet's couplings meet
    (per layer, relative to the magnitudes involved); inverse log-det = minus forward's."""
    params, perms = random_flow_params(cfg, v, seed)
    k_x, k_z = jax.random.split(jax.random.key(seed))
    x = images(k_x, cfg)
    z = jax.random.normal(k_z, x.shape)
    fx, logdet = forward(params, perms, x, cfg, v=v)
    x_back, logdet_back = inverse(params, perms, fx, cfg, v=v)
    iz, inv_logdet = inverse(params, perms, z, cfg, v=v)
    z_back, inv_logdet_back = forward(params, perms, iz, cfg, v=v)
    for got, want, through in ((x_back, x, fx), (z_back, z, iz)):
        scale = max(1.0, float(jnp.abs(want).max()), float(jnp.abs(through).max()))
        assert float(jnp.abs(got - want).max()) / (cfg.depth * scale) <= ROUND_TRIP_BOUND
    np.testing.assert_allclose(logdet_back, -logdet, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(inv_logdet_back, -inv_logdet, rtol=1e-5, atol=1e-3)
    assert float(jnp.abs(fx - x).max()) > 1e-3  # the layers really move x


@pytest.mark.slow
@given(configs(max_depth=2), st.sampled_from(VARIANTS), st.integers(0, 2 ** 31 - 1))
def test_variant_logdet_equals_slogdet_of_jacobian(x64, cfg, v, seed):
    """log-det = log|det J|, J = jax.jacfwd of the map, in float64, forward and inverse."""
    params, perms = random_flow_params(cfg, v, seed, np.float64)
    x = images(jax.random.key(seed), cfg, batch=1, dtype=jnp.float64)
    for fn in (forward, inverse):
        def flat_map(u):
            return fn(params, perms, u.reshape(x.shape), cfg, v=v)[0].reshape(-1)
        sign, expected = jnp.linalg.slogdet(jax.jit(jax.jacfwd(flat_map))(x.reshape(-1)))
        assert sign != 0
        np.testing.assert_allclose(fn(params, perms, x, cfg, v=v)[1][0], expected,
                                   rtol=1e-9, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("bijection", ["actnorm", "dense"])
def test_each_removed_component_alone(x64, bijection):
    """ActNorm and the token-wise dense layer on [B, N, D]: exact inverse, log-det = slogdet."""
    cfg = jet.Config(image_shape=(4, 6, 2), patch_size=2, depth=1, emb_dim=8)
    v = ablate.Variant(bijection, **{bijection: True})
    p = jax.tree.map(lambda a: a[0], random_flow_params(cfg, v, 0, np.float64)[0])[bijection]
    fwd, inv = {"actnorm": (ablate.actnorm_forward, ablate.actnorm_inverse),
                "dense": (ablate.token_dense_forward, ablate.token_dense_inverse)}[bijection]
    h = jax.random.normal(jax.random.key(1), (1, cfg.num_tokens, cfg.token_dim), jnp.float64)
    y, logdet = fwd(p, h)
    h_back, logdet_back = inv(p, y)
    np.testing.assert_allclose(h_back, h, atol=1e-12)
    np.testing.assert_allclose(logdet_back, -logdet, atol=1e-12)
    jacobian = jax.jacfwd(lambda u: fwd(p, u.reshape(h.shape))[0].reshape(-1))(h.reshape(-1))
    np.testing.assert_allclose(logdet[0], jnp.linalg.slogdet(jacobian)[1], rtol=1e-10)


@pytest.mark.slow
def test_identity_at_init():
    """Zero output layers, zero ActNorm and (at init) the ActNorm data init aside, a CNN flow
    with k = 2 maps x to itself with log-det 0, as jet does."""
    cfg = jet.Config(image_shape=(8, 8, 3), patch_size=2, depth=3, emb_dim=8,
                     kinds=("channels", "spatial"))
    v = ablate.Variant("cnn + actnorm", net="cnn", actnorm=True)
    params, perms = ablate.init_flow(jax.random.key(0), cfg, v)
    x = images(jax.random.key(1), cfg)
    z, logdet = forward(params, perms, x, cfg, v=v)
    np.testing.assert_allclose(z, x, atol=1e-6)
    np.testing.assert_allclose(logdet, 0.0, atol=1e-4)


@pytest.mark.slow
def test_actnorm_data_init_normalises_each_layer_input():
    """After flow_data_init, every ActNorm's output on the init batch has zero mean and unit
    variance in each of the D dims (Glow), layer after layer."""
    cfg = jet.Config(image_shape=(8, 8, 3), patch_size=2, depth=3, emb_dim=8)
    v = ablate.Variant("actnorm", actnorm=True)
    params, perms = random_flow_params(cfg, v, 3)
    x = 0.3 * images(jax.random.key(2), cfg, batch=16) + 0.2
    params = ablate.flow_data_init(params, perms, x, cfg, v=v)
    h = jet.patchify(x, cfg.patch_size)
    for i in range(cfg.depth):
        p = jax.tree.map(lambda a: a[i], params)
        normalised, _ = ablate.actnorm_forward(p["actnorm"], h)
        np.testing.assert_allclose(normalised.mean((0, 1)), 0.0, atol=1e-5)
        np.testing.assert_allclose(normalised.std((0, 1)), 1.0, atol=1e-4)
        h, _ = ablate.layer_forward(p, perms[i], h, cfg, v)


@pytest.mark.slow
@given(configs(), st.integers(0, 2 ** 31 - 1))
def test_plain_vit_flow_is_jet_forward(cfg, seed):
    """With the ViT and nothing between couplings, the composed flow is exactly jet's."""
    v = ablate.Variant("vit")
    params, perms = random_params(cfg, seed)
    x = images(jax.random.key(seed), cfg)
    z, logdet = forward({"coupling": params}, perms, x, cfg, v=v)
    z_jet, logdet_jet = jax.jit(jet.forward, static_argnums=3)(params, perms, x, cfg)
    np.testing.assert_allclose(z, z_jet, atol=1e-5)
    np.testing.assert_allclose(logdet, logdet_jet, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("v", VARIANTS[:2], ids=lambda v: v.name)
def test_variant_flops_match_xla_count(v):
    """forward_flops agrees with XLA's cost analysis (one layer: a scan body counts once), and
    cnn_width gives a CNN within 10% of the ViT's FLOPs at the cpu preset's size."""
    cfg = jet.Config(image_shape=(16, 16, 3), patch_size=2, depth=1, emb_dim=32, num_heads=2)
    params, perms = jax.eval_shape(lambda: ablate.init_flow(jax.random.key(0), cfg, v))
    x = jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32)
    analysis = forward.lower(params, perms, x, cfg, v=v).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    assert ablate.forward_flops(cfg, v) == pytest.approx(analysis["flops"] / 8, rel=0.15)
    cpu = train.make_config({"preset": "cpu"}, (32, 32, 3))
    assert ablate.forward_flops(cpu, v) == pytest.approx(train.forward_flops(cpu), rel=0.1)


def test_every_experiment_builds_on_cifar10():
    """Each variant of each experiment is a valid model on 32x32x3 with a sensible step count at
    the default budget (no training: configuration only)."""
    args = ablate.parse_args([])
    for claim, variants in ablate.EXPERIMENTS.values():
        for v in variants:
            cfg = train.make_config(ablate.run_flags(v, False), (32, 32, 3))
            steps = args.budget * 1e12 / (3 * ablate.forward_flops(cfg, v) * 64)
            assert 30 <= steps <= 3000, (v.name, steps)


# ------------------------------------------------------------------------------------------
# The script


@pytest.mark.slow
def test_quick_runs_every_experiment_then_reuses_its_results(tmp_path, monkeypatch):
    """--quick trains every variant of every experiment through train.py and prints a table per
    experiment; a second call reads every result back instead of training; a run's workdir
    refuses to be resumed as another model."""
    argv = ["--quick", "--seeds", "1", "--workdir", str(tmp_path)]
    tables = ablate.main(argv)
    assert set(tables) == set(ablate.EXPERIMENTS)
    with open(tmp_path / "results.jsonl") as f:
        records = [json.loads(line) for line in f]
    unique = {json.dumps(ablate.run_key(v, 0, ablate.parse_args(argv)), sort_keys=True)
              for _, variants in ablate.EXPERIMENTS.values() for v in variants}
    assert len(records) == len(unique)  # the shared baseline trained once
    for r in records:
        assert np.isfinite(r["test_bpd"]) and r["steps"] == 2 and r["params"] > 0
    for name, (claim, variants) in ablate.EXPERIMENTS.items():
        assert claim in tables[name] and all(v.name in tables[name] for v in variants)

    def no_training(*args, **kwargs):
        raise AssertionError("a stored result was trained again")
    monkeypatch.setattr(train, "main", no_training)
    assert ablate.main(argv) == tables

    cnn = next(r for r in records if r["net"] == "cnn")
    workdir = tmp_path / "runs" / cnn["id"]
    with pytest.raises(ValueError, match="holds a run of model 'ablate:cnn1'"):
        train.run(train.parse_args(["--dataset", "synthetic", "--workdir", str(workdir)]))


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit):
        ablate.main(["--budget", "-1"])
    assert "--budget must be a positive number" in capsys.readouterr().err
    assert ablate.main(["--list"]) == {}
    out = capsys.readouterr().out
    assert all(name in out for name in ablate.EXPERIMENTS)
