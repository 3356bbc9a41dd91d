"""inside.py and bits.py: each picture's data, not its pixels. The split picture's x1 sets are
the couplings' split indices; the per-pixel bits average to jet.bits_per_dim and the couplings'
shares sum to the log-det; the last stage is jet.forward's z; interpolation ends decode to the
original images exactly; the command runs end to end on a mini CIFAR-10 archive."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import inside
import jet
import train
from conftest import configs, images, make_cifar_tar, random_params


@given(configs(), st.integers(0, 2 ** 31 - 1))
def test_split_masks_are_the_split_indices(cfg, seed):
    """Each mask's True values are exactly the values jet.split puts in x1 for that coupling
    (the values of an image holding its own flat positions), one mask a (kind, projection)."""
    perms = jet.init_perms(jax.random.key(seed), cfg)
    H, W, C = cfg.image_shape
    positions = np.arange(H * W * C).reshape(1, H, W, C)
    masks = inside.split_masks(perms, cfg)
    assert [(kind, proj) for _, kind, proj, _ in masks] == list(dict.fromkeys(cfg.couplings()))
    for i, kind, proj, mask in masks:
        x1, x2 = jet.split(jet.patchify(jnp.asarray(positions), cfg.patch_size), perms[i])
        assert set(np.asarray(x1).ravel()) == set(positions[0][mask])
        assert set(np.asarray(x2).ravel()) == set(positions[0][~mask])
        assert mask.sum() == mask.size // 2


@given(configs(max_depth=2), st.integers(0, 2 ** 31 - 1))
def test_trace_adds_up_to_the_flow(x64, cfg, seed):
    """The trace's per-dimension bits average to jet.bits_per_dim, its couplings' log-dets sum
    to jet.forward's log-det and its last state is jet.forward's z; its expansions sum to the
    log-det, its room counts the couplings that transform each dim (half the dims each); the
    bit budget (Gaussian term + each coupling's share) is the bits/dim again."""
    params, perms = random_params(cfg, seed, np.float64)
    x = images(jax.random.key(seed), cfg, dtype=jnp.float64)
    out = inside.TRACE(params, perms, x, cfg)
    z, logdet = inside.FORWARD(params, perms, x, cfg)
    bpd = jet.bits_per_dim(z, logdet)
    np.testing.assert_allclose(out["bits"].mean((1, 2, 3)), bpd, rtol=1e-10)
    np.testing.assert_allclose(out["logdets"].sum(0), logdet, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(out["states"][-1], z, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(out["states"][0], x)
    np.testing.assert_allclose(out["expansion"].sum((1, 2, 3)) * np.log(2), logdet,
                               rtol=1e-10, atol=1e-10)
    room = np.asarray(out["room"][0])
    assert room.sum() == cfg.depth * room.size / 2 and room.min() >= 0
    saturated = np.asarray(out["saturated"])
    assert ((0 <= saturated) & (saturated <= 1)).all()
    budget = inside.bit_budget(out, cfg)
    np.testing.assert_allclose(budget["gaussian"] + budget["couplings"].sum(0), bpd, rtol=1e-10)
    dims = math.prod(cfg.image_shape)
    np.testing.assert_allclose(budget["couplings"], -out["logdets"] / (dims * np.log(2)))


CFG = jet.Config(image_shape=(8, 8, 3), patch_size=4, depth=3, emb_dim=8, num_heads=2)


def test_test_set_bits_average_the_batches():
    """test_set_bits over a set in several batches (the last one short) gives the per-image
    mean of one trace over the whole set, with the same noise."""
    cfg = CFG
    params, perms = random_params(cfg, 0)
    test = np.random.default_rng(0).integers(0, 256, (7, 8, 8, 3), np.uint8)
    key = jax.random.key(5)
    old, inside.BATCH = inside.BATCH, 3
    try:
        got = inside.test_set_bits(params, perms, cfg, test, key)
    finally:
        inside.BATCH = old
    x = jnp.concatenate([jet.dequantize(jax.random.fold_in(key, i), test[i:i + 3])
                         for i in range(0, 7, 3)])
    out = inside.TRACE(params, perms, x, cfg)
    z, logdet = inside.FORWARD(params, perms, x, cfg)
    np.testing.assert_allclose(got["bpd"], jet.bits_per_dim(z, logdet).mean(), rtol=1e-5)
    np.testing.assert_allclose(got["pixels"], out["bits"].sum(-1).mean(0), rtol=1e-5)
    np.testing.assert_allclose(got["gaussian"] + got["couplings"].sum(), got["bpd"], rtol=1e-5)
    assert 0.1 <= got["top10"] <= 1


def test_walks_start_and_end_at_the_two_images():
    """Both interpolations decode, at their ends, to the two uint8 images exactly; the middle
    frames differ from both; temperature 0 decodes z = 0 for every draw alike."""
    cfg = CFG
    params, perms = inside.fresh_model(jax.random.key(0), cfg)
    pair = np.random.default_rng(1).integers(0, 256, (2, 8, 8, 3), np.uint8)
    for name, frames in inside.walks(params, perms, cfg, pair).items():
        assert frames.shape == (inside.FRAMES, 8, 8, 3) and frames.dtype == np.uint8, name
        np.testing.assert_array_equal(frames[[0, -1]], pair)
        assert not np.array_equal(frames[inside.FRAMES // 2], pair[0])
    rows = inside.temperature_rows(params, perms, cfg, jax.random.key(2), 3)
    assert len(rows) == len(inside.TEMPERATURES) and (rows[0] == rows[0][:1]).all()
    e = inside.exactness(params, perms, cfg, pair)
    assert e["uint8_equal"] and e["max_abs_error"] < 1e-4


def test_fresh_model_moves_its_input():
    """The fresh model's couplings are not the identity (jet.init's are): the pictures of a
    model without a run show something."""
    cfg = CFG
    params, perms = inside.fresh_model(jax.random.key(0), cfg)
    x = images(jax.random.key(1), cfg)
    z, logdet = inside.FORWARD(params, perms, x, cfg)
    assert float(jnp.abs(z - x).max()) > 1e-2 and float(jnp.abs(logdet).max()) > 1e-2


@pytest.mark.slow
def test_inside_draws_a_trained_run_and_a_fresh_model(tmp_path):
    """python inside.py on a (2-step) trained run of the mini archive, without a run, and on the
    run's export with its shipped test images (no dataset): every picture is written, and the
    summary reports an exact round trip and exact walk ends."""
    md5 = make_cifar_tar(tmp_path / "cifar-10-binary.tar.gz", n=12)
    data_flags = ["--data_dir", str(tmp_path), "--data_md5", md5]
    run = str(tmp_path / "run")
    train.main(["--dataset", "cifar10", "--preset", "tiny", "--depth", "4", "--steps", "2",
                "--batch_size", "8", "--eval_every", "2", "--workdir", run, *data_flags])
    names = {"splits.svg", "stages.svg", "values.svg", "bits.svg", "couplings.svg",
             "latent.svg", "summary.md"}
    shipped = str(tmp_path / "shipped")
    train.main(["--workdir", run, "--export", shipped, "--data_dir", str(tmp_path)])
    for argv in ([run, "--data_dir", str(tmp_path)], [*data_flags, "--out", str(tmp_path / "f")],
                 [shipped, "--test_images", os.path.join(shipped, "check.npz")]):
        f = inside.main(argv)
        assert names <= set(os.listdir(f["out"]))
        assert "uint8 images back equal: yes" in f["summary"]
        assert "interpolation ends equal the two test images: yes" in f["summary"]
        assert f["stages"].shape[0] == 5 and f["test_images"] == 12
