"""Test-wide settings (silent rank promotion is an error; hypothesis fast and stable) and the
helpers several test files share: strategies of valid Configs, random parameters, files in the
real CIFAR-10 layout and a local HTTP server."""

import contextlib
import functools
import hashlib
import http.server
import io
import os
import tarfile
import threading

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import jet

jax.config.update("jax_numpy_rank_promotion", "raise")
# The suite's programs are small and each runs a few times (the slow tests train for seconds),
# so LLVM's optimisation passes cost more than they save: they are skipped, in this process
# and in the processes tests start. XLA's HLO passes, fusion included, still run, so the
# computation is the same.
os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
jax.config.update("jax_disable_most_optimizations", True)

# Each drawn configuration compiles its own XLA program, so examples are few and slow.
settings.register_profile("dev", max_examples=8, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow,
                                                 HealthCheck.function_scoped_fixture])
settings.register_profile("ci", parent=settings.get_profile("dev"), derandomize=True,
                          print_blob=True)
for name in ("dev", "ci"):  # the fast tier: every property, on one drawn example (of 8)
    settings.register_profile(f"{name}-fast", parent=settings.get_profile(name), max_examples=1)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: trains, starts processes or runs end to end; "
                            "python -m pytest -m 'not slow' is the fast tier")
    if config.getoption("markexpr") == "not slow":
        settings.load_profile(("ci" if os.environ.get("CI") else "dev") + "-fast")


@pytest.fixture
def x64():
    """Runs a test with float64 enabled (and restores the default afterwards)."""
    with jax.enable_x64(True):
        yield


# ------------------------------------------------------------------------------------------
# The model: configurations, parameters and inputs

ROUND_TRIP_BOUND = 5e-5  # per coupling, relative to max(1, largest value): 10x the worst
# of 150 random configurations (python test_jet.py prints it for 40)


@st.composite
def configs(draw, even_grid=False, max_depth=4, context_dims=st.none()):
    """Small valid Configs covering every kind, projection, patch size and channel count;
    context_dim drawn from `context_dims` (st.integers(1, 5): class-conditional Configs)."""
    C = draw(st.integers(1, 3))
    P = draw(st.sampled_from([p for p in (1, 2, 3, 4) if p * p * C % 2 == 0]))
    nh, nw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    if even_grid:
        nh, nw = 2 * nh, 2 * nw
    balanced = [p for p in jet.SPATIAL_PROJS
                if {"c": nh * nw, "h": nh, "v": nw}[p[0]] % 2 == 0]
    kinds = draw(st.lists(st.sampled_from(jet.KINDS if balanced else ["channels"]),
                          min_size=1, max_size=3))
    heads = draw(st.sampled_from([1, 2]))
    return jet.Config(
        image_shape=(P * nh, P * nw, C), patch_size=P,
        depth=draw(st.integers(1, max_depth)), block_depth=draw(st.integers(1, 2)),
        emb_dim=heads * draw(st.sampled_from([4, 8])), num_heads=heads,
        mlp_dim=draw(st.sampled_from([None, 12])),
        scale_factor=draw(st.floats(0.5, 4.0)), kinds=tuple(kinds),
        spatial_projs=tuple(draw(st.lists(st.sampled_from(balanced or ["checkerboard"]),
                                          min_size=1, max_size=4))),
        context_dim=draw(context_dims))


def random_params(cfg, seed, dtype=np.float32):
    """Parameters with every leaf random, the zero-initialised output layers included, so that
    every coupling really moves its input (at init the flow is the identity and proves nothing).

    Built with NumPy on the shapes of jet.init: compiling init's random initialisers for every
    drawn configuration would dominate the test time."""
    shapes = jax.eval_shape(lambda: jet.init(jax.random.key(0), cfg)[0])
    rng = np.random.default_rng(seed)

    def leaf(path, shape):
        names = [k.key for k in path]
        if "scale" in names:  # layer norm
            value = 1 + 0.1 * rng.normal(size=shape.shape)
        elif "kernel" in names:  # attention: [E, heads, head_dim] or [heads, head_dim, E]
            fan_in = cfg.emb_dim if any("attention" in n for n in names) else shape.shape[-2]
            if names[0] == "context_attention" and names[1] in ("key", "value"):
                fan_in = cfg.context_dim  # [C_ctx, heads, head_dim]
            value = rng.normal(size=shape.shape) / np.sqrt(fan_in)
        else:
            value = 0.3 * rng.normal(size=shape.shape)
        return jnp.asarray(value, dtype)
    params = jax.tree_util.tree_map_with_path(leaf, shapes)
    return params, jet.init_perms(jax.random.key(seed), cfg)


def images(key, cfg, batch=2, dtype=jnp.float32):
    return jax.random.uniform(key, (batch, *cfg.image_shape), dtype, -1.0, 1.0)


def contexts(key, cfg, batch=2, tokens=2, dtype=jnp.float32):
    """A context [batch, T_ctx, C_ctx] of arbitrary features, for a conditional cfg."""
    return jax.random.normal(key, (batch, tokens, cfg.context_dim), dtype)


# ------------------------------------------------------------------------------------------
# The two properties every flow here must have, for any (forward, inverse) pair with
# jet.forward's signature (keyword arguments `kw` passed to both)


def round_trip_errors(forward, inverse, params, perms, cfg, x, z, **kw):
    """Errors of x -> f -> f^-1 and of z -> f^-1 -> f, each divided by depth * max(1, largest
    value the trip passes through): float32 loses precision in proportion to magnitude, and
    every coupling adds its rounding. Also returns both pairs of log-dets (the inverse's and
    minus the forward's at corresponding points) and f(x), to see that the flow moves x."""
    fx, logdet = forward(params, perms, x, cfg, **kw)
    x_back, logdet_back = inverse(params, perms, fx, cfg, **kw)
    iz, inv_logdet = inverse(params, perms, z, cfg, **kw)
    z_back, inv_logdet_back = forward(params, perms, iz, cfg, **kw)

    def error(got, want, through):
        scale = max(1.0, float(jnp.abs(want).max()), float(jnp.abs(through).max()))
        return float(jnp.abs(got - want).max()) / (cfg.depth * scale)
    return (error(x_back, x, fx), error(z_back, z, iz),
            [(logdet_back, -logdet), (inv_logdet_back, -inv_logdet)], fx)


def check_round_trip(forward, inverse, params, perms, cfg, seed, **kw):
    """inverse(forward(x)) = x and forward(inverse(z)) = z to ROUND_TRIP_BOUND per coupling
    (relative to the magnitudes involved), the inverse log-det minus the forward one, for x
    uniform in [-1, 1] and z standard normal drawn from `seed`; returns (x, f(x))."""
    k_x, k_z = jax.random.split(jax.random.key(seed))
    x = images(k_x, cfg)
    x_error, z_error, logdets, fx = round_trip_errors(
        forward, inverse, params, perms, cfg, x, jax.random.normal(k_z, x.shape), **kw)
    assert x_error <= ROUND_TRIP_BOUND and z_error <= ROUND_TRIP_BOUND
    for back, expected in logdets:
        np.testing.assert_allclose(back, expected, rtol=1e-5, atol=1e-3)
    return x, fx


def check_logdet_against_jacobian(forward, inverse, params, perms, cfg, seed, **kw):
    """log-det = log|det J| with J = jax.jacfwd of the map, forward and inverse, at an x drawn
    from `seed` in the parameters' dtype (float64 makes the comparison exact to 1e-9)."""
    dtype = jax.tree.leaves(params)[0].dtype
    x = images(jax.random.key(seed), cfg, batch=1, dtype=dtype)
    for fn in (forward, inverse):
        def flat_map(u):
            return fn(params, perms, u.reshape(x.shape), cfg, **kw)[0].reshape(-1)
        sign, expected = jnp.linalg.slogdet(jax.jit(jax.jacfwd(flat_map))(x.reshape(-1)))
        assert sign != 0
        np.testing.assert_allclose(fn(params, perms, x, cfg, **kw)[1][0], expected,
                                   rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------------
# Data: CIFAR-10 archives in the real layout, served from 127.0.0.1

CIFAR_NAMES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


def cifar_bytes(index: int, n: int = 10) -> tuple[bytes, np.ndarray, np.ndarray]:
    """n records of file `index` in the CIFAR-10 binary layout; also the expected HWC images."""
    rng = np.random.default_rng(index)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = (np.arange(n) + index) % 10
    records = [bytes([label]) + image.transpose(2, 0, 1).tobytes()  # R plane, G plane, B plane
               for label, image in zip(labels, images)]
    return b"".join(records), images, labels


def add_member(tar: tarfile.TarFile, name: str, payload: bytes = b"", **fields) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(payload))


def make_cifar_tar(path, n: int = 10, drop=(), cut=None, extra=()) -> str:
    """Writes a CIFAR-10 binary archive and returns its md5; `cut` = (name, bytes to remove)."""
    with tarfile.open(path, "w:gz") as tar:
        for i, name in enumerate(CIFAR_NAMES):
            payload = cifar_bytes(i, n)[0]
            if cut and cut[0] == name:
                payload = payload[:-cut[1]]
            if name not in drop:
                add_member(tar, f"cifar-10-batches-bin/{name}", payload)
        add_member(tar, "cifar-10-batches-bin/batches.meta.txt", b"airplane\n")
        for name, fields in extra:
            add_member(tar, name, b"evil", **fields)
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


@contextlib.contextmanager
def serve(directory):
    """An HTTP server for `directory` on 127.0.0.1, ephemeral port, in a thread."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
