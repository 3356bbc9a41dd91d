"""The flows Jet leaves out, for ablate.py to train against it: a CNN coupling network,
the bijections earlier flows put between couplings (Glow's ActNorm, an invertible dense layer
over each token's D values) and multiscale factoring (Real NVP, Glow: half of each token's dims
leave the flow part-way). Each is a Variant of Jet; make_model(variant) is what train.main
trains, with jet.forward's signature, so training, evaluation, checkpoints and sampling are
train.py's.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

import jet
import timing
import train

HIGHEST = jax.lax.Precision.HIGHEST
VIT_FORWARD = functools.partial(jet.coupling_forward, net=jet.coupling_net)
VIT_INVERSE = functools.partial(jet.coupling_inverse, net=jet.coupling_net)


# ------------------------------------------------------------------------------------------
# A CNN coupling network, interchangeable with the ViT (jet.coupling_net): x1 -> (b, s)

def init_cnn(key, cfg: jet.Config, width: int, blocks: int, dtype=jnp.float32) -> dict:
    """One coupling's CNN: 1x1 projection of (x1, mask) to `width` channels, `blocks` residual
    blocks of two 3x3 convolutions, LayerNorm, zero 1x1 projection to (b, s): identity at init."""
    D = cfg.token_dim
    k_in, k_blocks, k_out = jax.random.split(key, 3)
    conv_init = jax.nn.initializers.lecun_normal()  # flax nn.Conv default, fans include 3x3

    def block(k):
        k1, k2 = jax.random.split(k)
        conv = lambda k: {"kernel": conv_init(k, (3, 3, width, width), dtype),  # noqa: E731
                          "bias": jnp.zeros((width,), dtype)}
        return {"ln1": jet.init_layer_norm(width, dtype=dtype), "conv1": conv(k1),
                "ln2": jet.init_layer_norm(width, dtype=dtype), "conv2": conv(k2)}
    return {"in": jet.init_dense(k_in, 2 * D, width, dtype=dtype),
            "blocks": jax.vmap(block)(jax.random.split(k_blocks, blocks)),
            "norm": jet.init_layer_norm(width, dtype=dtype),
            "out": jet.init_dense(k_out, width, 2 * D, kernel_init=jax.nn.initializers.zeros,
                                  dtype=dtype)}


def conv3x3(p, h, grid):
    """[B, N, W] read as the (H/P, W/P) patch grid -> [B, N, W'], zero ('SAME') padding.
    As one matmul over the 9 shifted copies of h (im2col): on CPUs several times faster than
    lax.conv for these few channels, and the same FLOPs."""
    (B, N, W), (nh, nw) = h.shape, grid
    padded = jnp.pad(h.reshape(B, nh, nw, W), ((0, 0), (1, 1), (1, 1), (0, 0)))
    shifted = [padded[:, i:i + nh, j:j + nw] for i in range(3) for j in range(3)]
    patches = jnp.concatenate(shifted, axis=-1).reshape(B, N, 9 * W)  # (i, j, channel) order
    kernel = p["kernel"].reshape(9 * W, -1)  # HWIO [3, 3, W, W'] in the same order
    return jet.dense({"kernel": kernel, "bias": p["bias"]}, patches)


def cnn_net(p, x1, index, grid):
    """x1 [B, N, D/2] -> b, s [B, N, D/2], as jet.coupling_net. x1 goes back to its places on
    the patch grid [B, N, D] with x2's places zero, beside a 0/1 mask of which is which (Real
    NVP's masked convolution, so spatial couplings stay spatial); b, s are read at x2's places."""
    zeros = jnp.zeros_like(x1)
    h = jet.merge(x1, zeros, index)  # [B, N, D]
    mask = jnp.broadcast_to(jet.merge(jnp.ones_like(x1[:1]), zeros[:1], index), h.shape)
    h = jet.dense(p["in"], jnp.concatenate([h, mask], axis=-1))  # [B, N, 2D] -> [B, N, W]
    for i in range(p["blocks"]["ln1"]["scale"].shape[0]):
        q = jax.tree.map(lambda a: a[i], p["blocks"])
        r = conv3x3(q["conv1"], jax.nn.relu(jet.layer_norm(q["ln1"], h)), grid)
        h = h + conv3x3(q["conv2"], jax.nn.relu(jet.layer_norm(q["ln2"], r)), grid)
    out = jet.dense(p["out"], jax.nn.relu(jet.layer_norm(p["norm"], h)))  # [B, N, 2D]
    b, s = jnp.split(out, 2, axis=-1)  # each [B, N, D], one value per place on the grid
    return jet.split(b, index)[1], jet.split(s, index)[1]  # x2's places: [B, N, D/2]


def cnn_flops(cfg: jet.Config, width: int, blocks: int) -> int:
    """Forward FLOPs (2x multiply-adds) of one coupling's CNN on one image."""
    N, D = cfg.num_tokens, cfg.token_dim
    return 2 * N * (2 * D * width + blocks * 2 * 9 * width * width + width * 2 * D)


def cnn_width(cfg: jet.Config, blocks: int) -> int:
    """The width whose CNN costs closest to the ViT it replaces (FLOPs per coupling)."""
    vit = timing.forward_flops(cfg) / cfg.depth
    return min(range(1, 1025), key=lambda w: abs(cnn_flops(cfg, w, blocks) - vit))


# ------------------------------------------------------------------------------------------
# Bijections Jet removed, each on the flow's tokens [B, N, D] with its log-det [B]

def init_actnorm(cfg: jet.Config, dtype=jnp.float32) -> dict:
    D = cfg.token_dim
    return {"bias": jnp.zeros((D,), dtype), "log_scale": jnp.zeros((D,), dtype)}


def actnorm_forward(p, h):
    """Glow's ActNorm: y = (h + bias) * exp(log_scale), one pair per token dim (shared by the N
    tokens, as Glow shares it over pixels); log|det| = N * sum(log_scale)."""
    B, N, _ = h.shape
    y = (h + p["bias"][None, None]) * jnp.exp(p["log_scale"])[None, None]
    return y, jnp.full((B,), N * p["log_scale"].sum())


def actnorm_inverse(p, y):
    B, N, _ = y.shape
    h = y * jnp.exp(-p["log_scale"])[None, None] - p["bias"][None, None]
    return h, jnp.full((B,), -N * p["log_scale"].sum())


def actnorm_data_init(h) -> dict:
    """Glow's data-dependent init: the ActNorm's output on batch h [B, N, D] has zero mean and
    unit variance in every dim."""
    return {"bias": -h.mean((0, 1)), "log_scale": -jnp.log(h.std((0, 1)) + 1e-6)}


def init_token_dense(key, cfg: jet.Config, dtype=jnp.float32) -> dict:
    """A random rotation of the D dims: invertible, log|det| = 0 at init."""
    D = cfg.token_dim
    return {"kernel": jax.nn.initializers.orthogonal()(key, (D, D), dtype)}


def token_dense_forward(p, h):
    """Invertible dense layer over each token's D values (Glow's 1x1 convolution on patches):
    y = h W; log|det| = N * log|det W| (explicit slogdet: D x D is small)."""
    N = h.shape[1]
    y = jnp.einsum("bnd,de->bne", h, p["kernel"], precision=HIGHEST)
    return y, jnp.full((h.shape[0],), N * jnp.linalg.slogdet(p["kernel"])[1])


def token_dense_inverse(p, y):
    N = y.shape[1]
    h = jnp.einsum("bne,ed->bnd", y, jnp.linalg.inv(p["kernel"]), precision=HIGHEST)
    return h, jnp.full((y.shape[0],), -N * jnp.linalg.slogdet(p["kernel"])[1])


# ------------------------------------------------------------------------------------------
# Variants and the flow they define: [ActNorm] [dense] coupling, repeated `depth` times

# How a multiscale flow scores the factored-out dims: "normal", a standard normal (Real NVP,
# JetFormer); "split2d", a Gaussian whose mean and scale a layer reads from the kept dims (Glow).
MULTISCALE_PRIORS = ("", "normal", "split2d")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One arm of an experiment: train.py flags over ABLATION_BASE, plus what jet.py lacks."""

    name: str
    flags: tuple = ()  # (train.py flag, value) pairs, e.g. (("depth", 12), ("block_depth", 2))
    net: str = "vit"  # the coupling network: "vit" (jet.coupling_net) or "cnn" (cnn_net)
    cnn_blocks: int = 1  # residual blocks of the CNN; its width matches the ViT's FLOPs
    actnorm: bool = False  # an ActNorm before every coupling
    dense: bool = False  # an invertible dense layer over each token before every coupling
    multiscale: str = ""  # factor out half of each token's dims: "normal" or "split2d" prior
    factor_after: int | None = None  # couplings before the factoring; None: depth // 2
    plain: bool = False  # the ViT flow on flow_forward's scan instead of jet.forward (costs)

    def __post_init__(self):
        if self.multiscale not in MULTISCALE_PRIORS:
            raise ValueError(f"Variant {self.name!r}: multiscale={self.multiscale!r} must be "
                             f"one of {MULTISCALE_PRIORS} ('' is the single-scale flow).")
        if self.multiscale and (self.net != "vit" or self.actnorm or self.dense):
            raise ValueError(f"Variant {self.name!r}: multiscale factoring runs on the plain "
                             "ViT flow only; drop net, actnorm and dense, or multiscale.")
        if self.factor_after is not None and not self.multiscale:
            raise ValueError(f"Variant {self.name!r}: factor_after={self.factor_after} needs "
                             "multiscale='normal' or 'split2d'.")

    @property
    def is_jet(self) -> bool:
        return self.net == "vit" and not (self.actnorm or self.dense or self.multiscale
                                          or self.plain)


def coupling_network(v: Variant, cfg: jet.Config, index):
    if v.net == "vit":
        return jet.coupling_net
    return functools.partial(cnn_net, index=index, grid=cfg.grid)


def init_flow(key, cfg: jet.Config, v: Variant) -> tuple[dict, jax.Array]:
    """Params with a leading [depth] axis, as jet.init's, and jet's split indices."""
    k_params, k_perms = jax.random.split(key)  # as jet.init
    keys = jax.random.split(k_params, cfg.depth)
    if v.net == "vit":
        sizes = cfg.coupling_net_sizes()
        couplings = jax.vmap(lambda k: jet.init_coupling_net(k, **sizes))(keys)
    else:
        width = cnn_width(cfg, v.cnn_blocks)
        couplings = jax.vmap(lambda k: init_cnn(k, cfg, width, v.cnn_blocks))(keys)
    params = {"coupling": couplings}
    if v.actnorm:
        params["actnorm"] = jax.vmap(lambda _: init_actnorm(cfg))(keys)
    if v.dense:
        dense_keys = jax.random.split(jax.random.fold_in(k_params, 1), cfg.depth)
        params["dense"] = jax.vmap(lambda k: init_token_dense(k, cfg))(dense_keys)
    return params, jet.init_perms(k_perms, cfg)


def _check_args(compute_dtype, context=None):
    if compute_dtype is not None:
        raise ValueError("ablation variants run in float32 only; drop --dtype.")
    if context is not None:
        raise ValueError("ablation variants are unconditional; drop --conditional.")


def layer_forward(p, index, h, cfg: jet.Config, v: Variant):
    """[ActNorm] -> [dense] -> coupling on h [B, N, D]; returns y, log|det| [B]."""
    logdet = jnp.zeros((h.shape[0],), h.dtype)
    for name, bijection in (("actnorm", actnorm_forward), ("dense", token_dense_forward)):
        if name in p:
            h, ld = bijection(p[name], h)
            logdet = logdet + ld
    y, ld = jet.coupling_forward(p["coupling"], index, h, cfg.scale_factor,
                                 net=coupling_network(v, cfg, index))
    return y, logdet + ld


def layer_inverse(p, index, y, cfg: jet.Config, v: Variant):
    """The exact inverse of layer_forward, in reverse order."""
    h, logdet = jet.coupling_inverse(p["coupling"], index, y, cfg.scale_factor,
                                     net=coupling_network(v, cfg, index))
    for name, bijection in (("dense", token_dense_inverse), ("actnorm", actnorm_inverse)):
        if name in p:
            h, ld = bijection(p[name], h)
            logdet = logdet + ld
    return h, logdet


def coupling_scan(params, indices, h, k, coupling, remat=False, reverse=False):
    """h [B, N, D'] through the couplings params[i] with split indices indices[i] [L, N*D'], in
    order (reverse: last first, for the inverse); returns h and the summed log-det [B]."""
    def step(h, layer):
        p, index = layer
        return coupling(p, index, h, k)
    step = jax.checkpoint(step, policy=jet.remat_policy(remat))
    h, logdets = jax.lax.scan(step, h, (params, indices), reverse=reverse)  # logdets [L, B]
    return h, logdets.sum(0)


def flow_forward(params, perms, x, cfg: jet.Config, *, remat=False, compute_dtype=None,
                 v: Variant):
    """x [B, H, W, C] -> z, log|det dz/dx| [B]: layer_forward as each of jet's couplings, in one
    scan; jet.forward's signature (for train.py)."""
    _check_args(compute_dtype)
    jet.check_input(x, perms, cfg, "x")
    h, logdet = coupling_scan(params, perms, jet.patchify(x, cfg.patch_size), cfg.scale_factor,
                              lambda p, index, h, k: layer_forward(p, index, h, cfg, v), remat)
    return jet.unpatchify(h, cfg.patch_size, cfg.image_shape), logdet


def flow_inverse(params, perms, z, cfg: jet.Config, *, compute_dtype=None, context=None,
                 v: Variant):
    _check_args(compute_dtype, context)
    jet.check_input(z, perms, cfg, "z")
    h, logdet = coupling_scan(params, perms, jet.patchify(z, cfg.patch_size), cfg.scale_factor,
                              lambda p, index, y, k: layer_inverse(p, index, y, cfg, v),
                              reverse=True)
    return jet.unpatchify(h, cfg.patch_size, cfg.image_shape), logdet


def flow_data_init(params, perms, x, cfg: jet.Config, *, v: Variant) -> dict:
    """Each ActNorm initialised from the batch x as it arrives there, in flow order (Glow)."""
    layer = jax.jit(lambda p, index, h: layer_forward(p, index, h, cfg, v)[0])
    h = jet.patchify(x, cfg.patch_size)
    for i in range(cfg.depth):
        init = actnorm_data_init(h)
        params["actnorm"] = jax.tree.map(lambda a, b: a.at[i].set(b), params["actnorm"], init)
        h = layer(jax.tree.map(lambda a: a[i], params), perms[i], h)
    return params


# ------------------------------------------------------------------------------------------
# Multiscale factoring: F couplings on [B, N, D], then half of each token's dims leaves the
# flow, then the other depth - F couplings on the kept [B, N, D/2]
#
# The whole is one bijection x [B, H, W, C] -> z [B, H, W, C] with N(0, I) on all of z, so
# train.py's loss (jet.bits_per_dim) and sampling apply unchanged: z's tokens are (stage-2
# output, eps), where eps is the factored-out half, standardised under its prior (Glow's
# split2d: eps = (out - mean) / scale, whose log-det turns N(eps; 0, I) into N(out; mean, scale)).

def factor_point(cfg: jet.Config, v: Variant) -> int:
    """F, the number of couplings before the factoring, checked against the Config."""
    F = cfg.depth // 2 if v.factor_after is None else v.factor_after
    if not 1 <= F < cfg.depth:
        raise ValueError(f"Variant {v.name!r}: factoring after {F} of depth={cfg.depth} "
                         "couplings; it needs couplings on both sides (1 <= factor_after < "
                         "depth): raise depth or change factor_after.")
    if cfg.token_dim % 4:
        raise ValueError(f"Variant {v.name!r}: the couplings after the factoring split the "
                         f"kept D/2 = {cfg.token_dim // 2} dims of each token in two; use a "
                         "patch_size and channel count with P*P*C divisible by 4.")
    return F


def multiscale_perms(key, cfg: jet.Config, F: int) -> jax.Array:
    """int32 [depth, N*D]: one array of jet's shape rather than a pytree of two stages, because
    train.py restores checkpoints into that shape (state_template), so multiscale runs resume,
    evaluate and sample as jet's do. Rows :F are jet.init_perms's; row i >= F holds coupling
    i's split index over the kept [N, D/2] tokens (channels: a random permutation of D/2 dims;
    spatial: jet's pattern, on whole tokens) in its first N*D/2 entries, padded with
    N*D/2 + arange(N*D/2) so that every row is still a permutation of N*D, as in jet."""
    N, half = cfg.num_tokens, cfg.token_dim // 2
    rows = [jet.split_index(jax.random.fold_in(key, i), kind, proj, cfg, half)  # as init_perms
            for i, (kind, proj) in enumerate(cfg.couplings()[F:], start=F)]
    rest = N * half + jnp.arange(N * half)  # the factored-out values: never read
    stage2 = jnp.stack([jnp.concatenate([row, rest]) for row in rows])
    return jnp.concatenate([jet.init_perms(key, cfg)[:F], stage2.astype(jnp.int32)])


def init_narrow_coupling_net(key, cfg: jet.Config, width: int) -> dict:
    """One coupling's ViT as jet.init_coupling_net, for tokens of `width` dims: its input layer
    reads width/2 dims, its zero output layer writes b and s of width/2 each."""
    k_net, k_in, k_out = jax.random.split(key, 3)
    p = jet.init_coupling_net(k_net, **cfg.coupling_net_sizes())
    p["init_proj"] = jet.init_dense(k_in, width // 2, cfg.emb_dim)
    p["final_proj"] = jet.init_dense(k_out, cfg.emb_dim, width,
                                     kernel_init=jax.nn.initializers.zeros)
    return p


def init_multiscale(key, cfg: jet.Config, v: Variant) -> tuple[dict, jax.Array]:
    """Params {"stage1": [F] coupling nets, "stage2": [depth - F] narrow ones[, "split2d": a
    zero dense layer D/2 -> D]} and multiscale_perms. At init the flow is the identity (k = 2)."""
    F, D = factor_point(cfg, v), cfg.token_dim
    k_params, k_perms = jax.random.split(key)  # as jet.init
    keys = jax.random.split(k_params, cfg.depth)
    params = {"stage1": jax.vmap(lambda k: jet.init_coupling_net(
        k, **cfg.coupling_net_sizes()))(keys[:F]),
              "stage2": jax.vmap(lambda k: init_narrow_coupling_net(k, cfg, D // 2))(keys[F:])}
    if v.multiscale == "split2d":  # zero: mean 0, scale 1 at init, as Glow's Conv2dZeros
        params["split2d"] = jet.init_dense(jax.random.fold_in(k_params, 1), D // 2, D,
                                           kernel_init=jax.nn.initializers.zeros)
    return params, multiscale_perms(k_perms, cfg, F)


def factor_out(p, h):
    """h [B, N, D] -> kept [B, N, D/2], eps [B, N, D/2], log|det| [B]. The last D/2 dims of
    each token leave, a fixed half as in Glow: the random permutations of the channel couplings
    before it make no half special. p None: eps = out (standard normal prior); p a dense layer
    (split2d): mean, log_scale = p(kept), eps = (out - mean) / exp(log_scale)."""
    kept, out = jnp.split(h, 2, axis=-1)
    if p is None:
        return kept, out, jnp.zeros(h.shape[:1], h.dtype)
    mean, log_scale = jnp.split(jet.dense(p, kept), 2, axis=-1)
    return kept, (out - mean) * jnp.exp(-log_scale), -log_scale.sum((1, 2))


def factor_in(p, kept, eps):
    """The exact inverse of factor_out: kept, eps [B, N, D/2] -> h [B, N, D], log|det| [B]."""
    if p is None:
        return jnp.concatenate([kept, eps], axis=-1), jnp.zeros(kept.shape[:1], kept.dtype)
    mean, log_scale = jnp.split(jet.dense(p, kept), 2, axis=-1)
    out = eps * jnp.exp(log_scale) + mean
    return jnp.concatenate([kept, out], axis=-1), log_scale.sum((1, 2))


def multiscale_forward(params, perms, x, cfg: jet.Config, *, remat=False, compute_dtype=None,
                       v: Variant):
    """x [B, H, W, C] -> z [B, H, W, C], log|det dz/dx| [B]; jet.forward's signature."""
    _check_args(compute_dtype)
    jet.check_input(x, perms, cfg, "x")
    F, P, k = factor_point(cfg, v), cfg.patch_size, cfg.scale_factor
    half = cfg.num_tokens * cfg.token_dim // 2  # stage 2 reads this much of its perms rows
    h, logdet1 = coupling_scan(params["stage1"], perms[:F], jet.patchify(x, P), k,
                               VIT_FORWARD, remat)  # [B, N, D]
    kept, eps, logdet2 = factor_out(params.get("split2d"), h)  # each [B, N, D/2]
    y, logdet3 = coupling_scan(params["stage2"], perms[F:, :half], kept, k,
                               VIT_FORWARD, remat)  # [B, N, D/2]
    z = jet.unpatchify(jnp.concatenate([y, eps], axis=-1), P, cfg.image_shape)
    return z, logdet1 + logdet2 + logdet3


def multiscale_inverse(params, perms, z, cfg: jet.Config, *, compute_dtype=None, context=None,
                       v: Variant):
    """z [B, H, W, C] -> x, log|det dx/dz| [B]: multiscale_forward's steps undone, last first."""
    _check_args(compute_dtype, context)
    jet.check_input(z, perms, cfg, "z")
    F, P, k = factor_point(cfg, v), cfg.patch_size, cfg.scale_factor
    half = cfg.num_tokens * cfg.token_dim // 2
    y, eps = jnp.split(jet.patchify(z, P), 2, axis=-1)  # each [B, N, D/2]
    kept, logdet3 = coupling_scan(params["stage2"], perms[F:, :half], y, k,
                                  VIT_INVERSE, reverse=True)
    h, logdet2 = factor_in(params.get("split2d"), kept, eps)  # [B, N, D]
    x, logdet1 = coupling_scan(params["stage1"], perms[:F], h, k, VIT_INVERSE, reverse=True)
    return jet.unpatchify(x, P, cfg.image_shape), logdet3 + logdet2 + logdet1


# ------------------------------------------------------------------------------------------
# A variant as train.py's model, and its cost

def model_name(v: Variant) -> str:
    """Recorded in checkpoints: a workdir refuses to resume as another model."""
    factor = f"+factor{v.factor_after or ''}-{v.multiscale}" if v.multiscale else ""
    return (f"ablate:{v.net}{v.cnn_blocks if v.net == 'cnn' else ''}"
            f"{'+actnorm' * v.actnorm}{'+dense' * v.dense}{factor}")


def make_model(v: Variant) -> dict:
    """What train.main trains for this variant: jet itself, or one of the flows above."""
    if v.is_jet:
        return train.JET
    init, forward, inverse = ((init_multiscale, multiscale_forward, multiscale_inverse)
                              if v.multiscale else (init_flow, flow_forward, flow_inverse))
    model = {"name": model_name(v),
             "init": functools.partial(init, v=v),
             "forward": functools.partial(forward, v=v),
             "sample": jax.jit(functools.partial(jet.sample, flow_inverse=functools.partial(
                 inverse, v=v)), static_argnames=("n", "compute_dtype"))}
    if v.actnorm:
        model["data_init"] = functools.partial(flow_data_init, v=v)
    return model


def forward_flops(cfg: jet.Config, v: Variant) -> int:
    """Forward FLOPs per image: coupling networks, plus the dense layers' matmuls. A multiscale
    flow's couplings after the factoring have input and output layers for D/2-wide tokens
    (D/4 -> E and E -> D/2 instead of D/2 -> E and E -> D); split2d adds its D/2 -> D layer."""
    N, D, E = cfg.num_tokens, cfg.token_dim, cfg.emb_dim
    if v.net == "vit":
        flops = timing.forward_flops(cfg)
    else:
        flops = cfg.depth * cnn_flops(cfg, cnn_width(cfg, v.cnn_blocks), v.cnn_blocks)
    if v.multiscale:
        flops -= 2 * (cfg.depth - factor_point(cfg, v)) * N * E * (D // 4 + D // 2)
        flops += (v.multiscale == "split2d") * 2 * N * (D // 2) * D
    return flops + v.dense * cfg.depth * 2 * N * D ** 2
