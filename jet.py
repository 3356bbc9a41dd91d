"""Jet: a normalizing flow made only of ViT-parameterised affine couplings, in pure JAX.

Kolesnikov, Susano Pinto, Tschannen. "Jet: A Modern Transformer-Based Normalizing Flow",
arXiv 2412.15129 (TMLR 2025). Semantics follow the official code, big_vision
`models/proj/jet/jet.py`; every difference is listed in README.md.

Notation (used in every comment and name below):
  B      batch size
  H W C  image height, width, channels; images live in [-1, 1]
  P      patch size; the image becomes a grid of (H/P) x (W/P) patches
  N      number of tokens (patches), N = (H/P) * (W/P)
  D      dims per token, D = P * P * C
  x1 x2  the two halves of a coupling's input; x1 passes through unchanged
  b s    bias and raw scale predicted from x1 by a ViT
  k      scale factor: y2 = (x2 + b(x1)) * sigmoid(s(x1)) * k
  E      ViT width (emb_dim)
  T_ctx  context tokens, C_ctx features per context token: a class-conditional model takes a
         context [B, T_ctx, C_ctx] (the official trainer's: a one-hot label, T_ctx = 1,
         C_ctx = classes), and then b, s = b(x1, context), s(x1, context)

The flow z = f(x) patchifies x and applies `depth` couplings; z ~ N(0, I). A conditional flow
is a different bijection for each context (every coupling's ViT attends to it), with the same
N(0, I) on z: its change of variables gives p(x | context).
Every coupling sees N tokens of width D/2 (x1) and predicts N tokens of width D (b and s),
whatever its kind, so all couplings share shapes and run under one `jax.lax.scan`.
`plain_forward` / `plain_inverse` are the flow as the paper writes it; `forward` / `inverse`
compute the same map faster (one gather per coupling instead of two) and are what training uses.

Arguments, everywhere: params first (what jax.grad differentiates), then the PRNG key of a
function that draws (init, dequantize, sample), then the data, then the static Config; every
option after those is keyword-only (remat, compute_dtype, context, precision, ...). A Config
is a static pytree, so jax.jit(jet.forward) needs no static_argnums. Every function here is
usable on its own: its docstring names the other definitions it needs ("Needs:"), and
nothing here calls jit.

Usage (test_jet.py runs it):

    import jax, numpy as np, jet
    cfg = jet.Config(image_shape=(16, 16, 3), patch_size=4, depth=4, emb_dim=32, num_heads=2)
    params, perms = jet.init(jax.random.key(0), cfg)  # perms: fixed splits, never trained
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), np.uint8)

    def loss(params, key):  # mean bits/dim of the batch: the training loss
        x = jet.dequantize(key, images)  # uint8 -> [-1, 1 + 1/127.5), uniform noise added
        z, logdet = jet.forward(params, perms, x, cfg)  # z ~ N(0, I) once trained
        return jet.bits_per_dim(z, logdet).mean()
    bpd, grads = jax.jit(jax.value_and_grad(loss))(params, jax.random.key(1))

    x = jet.dequantize(jax.random.key(2), images)
    z, logdet = jax.jit(jet.forward)(params, perms, x, cfg)
    x_back, _ = jax.jit(jet.inverse)(params, perms, z, cfg)  # x again, to float rounding
    samples = jax.jit(jet.sample, static_argnames="n")(params, perms, jax.random.key(3), 4,
                                                       cfg, temperature=0.8)  # uint8 [4, ...]
"""

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("channels", "spatial")
CHANNEL_PROJS = ("random",)
SPATIAL_PROJS = ("checkerboard", "checkerboard-inv", "vstripes", "vstripes-inv",
                 "hstripes", "hstripes-inv")


# ---- Config ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    """Static model description; frozen and hashable, so it can be a static jit argument."""

    image_shape: tuple[int, int, int] = (32, 32, 3)  # (H, W, C)
    patch_size: int = 4  # P
    depth: int = 8  # number of couplings
    block_depth: int = 1  # ViT blocks inside each coupling
    emb_dim: int = 256  # ViT width
    num_heads: int = 4  # attention heads; must divide emb_dim
    mlp_dim: int | None = None  # ViT MLP hidden width; None means 4 * emb_dim (big_vision)
    scale_factor: float = 2.0  # k: the coupling scale sigmoid(s) * k lies in (0, k)
    kinds: tuple[str, ...] = ("channels", "channels", "spatial")  # cycled over couplings
    channel_projs: tuple[str, ...] = ("random",)  # cycled over channel couplings
    spatial_projs: tuple[str, ...] = ("checkerboard", "checkerboard-inv")  # cycled, spatial
    context_dim: int | None = None  # C_ctx of a class-conditional model; None: unconditional

    def __post_init__(self):
        for name in ("image_shape", "kinds", "channel_projs", "spatial_projs"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # lists from JSON
        _validate(self)

    @property
    def grid(self) -> tuple[int, int]:  # token grid (H/P, W/P)
        return self.image_shape[0] // self.patch_size, self.image_shape[1] // self.patch_size

    @property
    def num_tokens(self) -> int:  # N
        return self.grid[0] * self.grid[1]

    @property
    def token_dim(self) -> int:  # D
        return self.patch_size ** 2 * self.image_shape[2]

    def coupling_net_sizes(self) -> dict:
        """init_coupling_net's sizes for this Config's couplings."""
        return {"num_tokens": self.num_tokens, "token_dim": self.token_dim,
                "emb_dim": self.emb_dim, "num_heads": self.num_heads,
                "block_depth": self.block_depth, "mlp_dim": self.mlp_dim,
                "context_dim": self.context_dim}

    def couplings(self) -> tuple[tuple[str, str], ...]:
        """(kind, projection) of each coupling, cycled as big_vision's _interleave_couplings."""
        kinds, cp, sp = map(itertools.cycle, (self.kinds, self.channel_projs, self.spatial_projs))
        return tuple((kind, next(cp) if kind == "channels" else next(sp))
                     for kind in itertools.islice(kinds, self.depth))


jax.tree_util.register_static(Config)  # jit treats a Config argument as static, no leaves


def _validate(cfg: Config) -> None:
    """Raises ValueError naming the field to change; run once, at construction."""
    def fail(msg):
        raise ValueError(f"Invalid jet.Config: {msg}")

    def positive(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0
    if len(cfg.image_shape) != 3 or not all(map(positive, cfg.image_shape)):
        fail(f"image_shape must be three positive ints (H, W, C), got {cfg.image_shape}.")
    for name in ("patch_size", "depth", "block_depth", "emb_dim", "num_heads", "mlp_dim",
                 "context_dim"):
        value = getattr(cfg, name)
        if not positive(value) and not (name in ("mlp_dim", "context_dim") and value is None):
            optional = " or None" if name in ("mlp_dim", "context_dim") else ""
            fail(f"{name} must be a positive int{optional}, got {value!r}.")
    if not (isinstance(cfg.scale_factor, (int, float)) and 0 < cfg.scale_factor < math.inf):
        fail(f"scale_factor must be a positive finite number, got {cfg.scale_factor!r}.")
    if cfg.emb_dim % cfg.num_heads:
        fail(f"emb_dim={cfg.emb_dim} is not divisible by num_heads={cfg.num_heads}.")
    H, W, C = cfg.image_shape
    P = cfg.patch_size
    if H % P or W % P:
        fail(f"patch_size={P} must divide the image height and width, got H={H}, W={W}. "
             + _fixes_line(cfg))
    if cfg.token_dim % 2:
        fail(f"a token has D = P*P*C = {P}*{P}*{C} = {cfg.token_dim} dims, an odd number, "
             "but every coupling feeds D/2 dims to its ViT. " + _fixes_line(cfg))
    for field, allowed in (("kinds", KINDS), ("channel_projs", CHANNEL_PROJS),
                           ("spatial_projs", SPATIAL_PROJS)):
        values = getattr(cfg, field)
        if not values or any(v not in allowed for v in values):
            fail(f"{field}={values}: each entry must be one of {allowed} (at least one).")
    nh, nw = cfg.grid
    for proj in {proj for kind, proj in cfg.couplings() if kind == "spatial"}:
        if not _halves(proj, nh, nw):
            n1 = int(spatial_pattern(proj, nh, nw).sum())
            needs = {"h": "token rows (H/P)", "v": "token columns (W/P)", "c": "tokens"}[proj[0]]
            fail(f"spatial projection {proj!r} splits the {nh}x{nw} token grid into {n1} and "
                 f"{nh * nw - n1} tokens, not two equal halves: it needs an even number of "
                 f"{needs}. " + _fixes_line(cfg))


def _halves(proj: str, nh: int, nw: int) -> bool:
    """Whether a spatial pattern splits an nh x nw token grid into two equal halves."""
    return 2 * int(spatial_pattern(proj, nh, nw).sum()) == nh * nw


def _fixes(cfg: Config) -> list[dict]:
    """Changes of an invalid Config's fields that make it valid for its image (as far as the
    image is concerned): another patch size whose grid every spatial projection in use halves;
    only the spatial projections that halve this grid; or no spatial couplings."""
    (H, W, C), P = cfg.image_shape, cfg.patch_size
    projs = {proj for kind, proj in cfg.couplings() if kind == "spatial"}

    def fits(p):  # p divides the image, D is even
        return H % p == 0 and W % p == 0 and p * p * C % 2 == 0
    fixes = [{"patch_size": p} for p in range(1, min(H, W) + 1) if p != P and fits(p)
             and all(_halves(proj, H // p, W // p) for proj in projs)]
    if fits(P) and projs:
        fixes.append({"kinds": ("channels",)})
        kept = tuple(proj for proj in cfg.spatial_projs if _halves(proj, H // P, W // P))
        if kept:
            fixes.append({"spatial_projs": kept})
    return fixes


def _fixes_line(cfg: Config) -> str:
    """The fixes, as the error states them: each one change of fields (test_jet.py builds
    each)."""
    fixes = "; ".join(", ".join(f"{k}={v!r}" for k, v in fix.items()) for fix in _fixes(cfg))
    return (f"These work for image_shape={cfg.image_shape}: {fixes}." if fixes else
            f"No patch size fits image_shape={cfg.image_shape} with an even D; pad the image.")


# ---- Patches: "b (h P) (w P) c -> b (h w) (P P c)" ---------------------------------------

def patchify(x: jax.Array, patch_size: int) -> jax.Array:
    """[B, H, W, C] -> [B, N, D], patches in row-major order, each flattened (P, P, C).
    Needs: nothing."""
    (B, H, W, C), P = x.shape, patch_size
    x = x.reshape(B, H // P, P, W // P, P, C)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(B, (H // P) * (W // P), P * P * C)


def unpatchify(x: jax.Array, patch_size: int, image_shape: tuple[int, int, int]) -> jax.Array:
    """[B, N, D] -> [B, H, W, C]; the exact inverse of `patchify` (non-square images too).
    Needs: nothing."""
    (H, W, C), P = image_shape, patch_size
    x = x.reshape(x.shape[0], H // P, W // P, P, P, C)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(x.shape[0], H, W, C)


# ---- Splits: which half of the patch grid is x1 and which is x2 --------------------------

def spatial_pattern(proj: str, nh: int, nw: int) -> np.ndarray:
    """Bool [nh, nw], True where a token goes to x1: checkerboard (row + col) even, vstripes col
    even, hstripes row even; "-inv" swaps the halves. Needs: nothing."""
    row, col = np.mgrid[:nh, :nw]
    base = {"checkerboard": row + col, "vstripes": col, "hstripes": row}[proj.removesuffix("-inv")]
    return (base % 2 == 0) != proj.endswith("-inv")


def channel_split_index(perm: jax.Array, num_tokens: int) -> jax.Array:
    """Index [N*D] into the flat [N, D] patch grid: x1 = dims perm[:D/2] of every token laid out
    [N, D/2], then x2 = dims perm[D/2:] likewise. Needs: nothing."""
    D = perm.shape[0]
    index = jnp.arange(num_tokens)[:, None] * D + perm[None, :]  # [N, D], dims in perm order
    return index.reshape(num_tokens, 2, D // 2).transpose(1, 0, 2).reshape(-1)


def spatial_split_index(tokens: jax.Array, token_dim: int) -> jax.Array:
    """Index [N*D]: x1 = whole tokens tokens[:N/2], x2 = tokens[N/2:]. As in big_vision, each
    token of width D is read as two consecutive tokens of width D/2, so x1 and x2 are [N, D/2]
    exactly as in a channel coupling. Needs: nothing."""
    return (tokens[:, None] * token_dim + jnp.arange(token_dim)[None, :]).reshape(-1)


def split_index(key: jax.Array, kind: str, proj: str, cfg: Config, token_dim: int) -> jax.Array:
    """The split index [N*token_dim] of one coupling: a channel coupling's from a random
    permutation (drawn from key) of each token's token_dim values, a spatial one's from its
    pattern over the token grid. Needs: channel_split_index, spatial_pattern,
    spatial_split_index."""
    if kind == "channels":  # proj == "random"
        return channel_split_index(jax.random.permutation(key, token_dim), cfg.num_tokens)
    mask = spatial_pattern(proj, *cfg.grid).reshape(-1)
    tokens = np.concatenate([np.flatnonzero(mask), np.flatnonzero(~mask)])
    return spatial_split_index(jnp.asarray(tokens), token_dim)


def init_perms(key: jax.Array, cfg: Config) -> jax.Array:
    """int32 [depth, N*D]: row i is the split index of coupling i, its channel permutation drawn
    from fold_in(key, i). Fixed, never trained. Needs: split_index."""
    return jnp.stack([split_index(jax.random.fold_in(key, i), kind, proj, cfg, cfg.token_dim)
                      for i, (kind, proj) in enumerate(cfg.couplings())]).astype(jnp.int32)


def halves(x: jax.Array, num_tokens: int) -> tuple[jax.Array, jax.Array]:
    """[B, N*D] in a coupling's split order -> x1, x2, each [B, N, D/2]. Needs: nothing."""
    return tuple(h.reshape(x.shape[0], num_tokens, -1) for h in jnp.split(x, 2, axis=1))


def inverse_permutation(index: jax.Array) -> jax.Array:
    """argsort of a permutation [n], computed as a scatter: exact, and no sort. Needs: nothing."""
    return jnp.zeros_like(index).at[index].set(jnp.arange(index.shape[0], dtype=index.dtype))


def split(x: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, N, D] -> x1, x2, each [B, N, D/2], by one exact gather with a split index [N*D]
    (a row of init_perms). Needs: halves."""
    B, N, D = x.shape
    return halves(jnp.take(x.reshape(B, N * D), index, axis=1), N)


def merge(x1: jax.Array, x2: jax.Array, index: jax.Array) -> jax.Array:
    """x1, x2 [B, N, D/2] -> [B, N, D]; the exact inverse of `split`. Needs:
    inverse_permutation."""
    B, N, half = x1.shape
    x = jnp.concatenate([x1.reshape(B, N * half), x2.reshape(B, N * half)], axis=1)
    return jnp.take(x, inverse_permutation(index), axis=1).reshape(B, N, 2 * half)


# ---- ViT pieces (pre-LN blocks as big_vision's vit.Encoder1DBlock), on [B, N, E] activations ---
#
# precision: of every matmul, jax.lax.Precision (default HIGHEST: float32 stays float32 where
# GPUs would use TF32); None follows jax.default_matmul_precision.

_lecun_normal = jax.nn.initializers.lecun_normal()  # flax nn.Dense default
_xavier_uniform = jax.nn.initializers.xavier_uniform()  # big_vision ViT kernels
HIGHEST = jax.lax.Precision.HIGHEST


def init_dense(key, d_in, d_out, *, kernel_init=_lecun_normal, bias_std=0.0, dtype=jnp.float32):
    """{"kernel": [d_in, d_out], "bias": [d_out]}. Needs: _lecun_normal."""
    kb, kk = jax.random.split(key)
    return {"kernel": kernel_init(kk, (d_in, d_out), dtype),
            "bias": bias_std * jax.random.normal(kb, (d_out,), dtype)}


def matmul(spec: str, x: jax.Array, w: jax.Array, *, precision=HIGHEST) -> jax.Array:
    """einsum of activations x and weights w in w's dtype (bfloat16 in bf16 mode), accumulated
    and returned in x's dtype. Needs: HIGHEST."""
    return jnp.einsum(spec, x.astype(w.dtype), w, precision=precision,
                      preferred_element_type=x.dtype)


def dense(p, x, *, precision=HIGHEST):
    """[..., d_in] -> [..., d_out] as one [M, d_in] matmul over all leading positions: XLA:CPU
    then reads the weight gradient's cotangent in place (a [B, N, d] einsum transposed it).
    Needs: matmul."""
    y = matmul("mi,io->mo", x.reshape(-1, x.shape[-1]), p["kernel"], precision=precision)
    y = y + p["bias"][None]
    return y.reshape(*x.shape[:-1], -1)


def init_layer_norm(d, *, dtype=jnp.float32):
    """{"scale": ones [d], "bias": zeros [d]}. Needs: nothing."""
    return {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)}


def _standardize(x, eps):
    mean = x.mean(-1, keepdims=True)
    r = jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + eps)  # 1 / std
    return (x - mean) * r, r


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def standardize(x, eps):
    """xhat = (x - mean) / sqrt(var + eps) over the last axis; LayerNorm without scale and bias.
    Needs: _standardize, _standardize_jvp."""
    return _standardize(x, eps)[0]


@standardize.defjvp
def _standardize_jvp(eps, primals, tangents):
    """dxhat = (dx - mean(dx) - xhat mean(xhat dx)) / std, autodiff's derivative in closed form:
    its transpose, the backward, is shorter, and XLA:CPU fuses it better (docs/speed.md)."""
    xhat, r = _standardize(primals[0], eps)
    dx = tangents[0] - tangents[0].mean(-1, keepdims=True)  # centred first: faster on XLA:CPU
    return xhat, r * (dx - xhat * (xhat * dx).mean(-1, keepdims=True))


def layer_norm(p, x, *, eps=1e-6):  # eps: flax nn.LayerNorm default
    """standardize(x) * scale + bias over the last axis. Needs: standardize."""
    scale, bias = (p[n].reshape((1,) * (x.ndim - 1) + (-1,)) for n in ("scale", "bias"))
    return standardize(x, eps) * scale + bias


def init_attention(key, emb_dim, num_heads, *, dtype=jnp.float32, kv_dim=None,
                   kernel_init=_xavier_uniform, out_init=None):
    """Per-head projections shaped as flax MultiHeadDotProductAttention's: query [E, heads,
    E/heads], key and value [kv_dim, heads, E/heads] (kv_dim: the keys' and values' input width,
    E for self-attention), out [heads, E/heads, E]; biases zero. Kernels are drawn as flax draws
    them, on the flat [fan_in, fan_out] matrix; out_init defaults to kernel_init. Needs:
    _xavier_uniform."""
    head_dim = emb_dim // num_heads
    kv_dim = kv_dim or emb_dim
    keys = jax.random.split(key, 4)

    def proj(init, k, d_in, d_out, shape):
        return init(k, (d_in, d_out), dtype).reshape(shape)
    p = {name: {"kernel": proj(kernel_init, k, d_in, emb_dim, (d_in, num_heads, head_dim)),
                "bias": jnp.zeros((num_heads, head_dim), dtype)}
         for name, k, d_in in zip(("query", "key", "value"), keys, (emb_dim, kv_dim, kv_dim))}
    p["out"] = {"kernel": proj(out_init or kernel_init, keys[3], emb_dim, emb_dim,
                               (num_heads, head_dim, emb_dim)),
                "bias": jnp.zeros((emb_dim,), dtype)}
    return p


def attention(p, x, kv=None, *, precision=HIGHEST):
    """Multi-head attention, queries from x [B, N, E], keys and values from kv [B, T, C]
    (self-attention when kv is None: kv = x) -> [B, N, E]; query scaled by head_dim^-1/2.
    Needs: dense, matmul."""
    B, N, E = x.shape
    kv = x if kv is None else kv

    def heads(name, v):  # [B, T, C] -> [B, heads, T, head_dim]; heads-major: fast matmuls
        w = p[name]["kernel"]  # [C, heads, head_dim]
        y = dense({"kernel": w.reshape(w.shape[0], -1), "bias": p[name]["bias"].reshape(-1)}, v,
                  precision=precision)
        return y.reshape(*v.shape[:2], *w.shape[1:]).transpose(0, 2, 1, 3)
    q, k, v = heads("query", x), heads("key", kv), heads("value", kv)
    q = q / math.sqrt(q.shape[-1])
    mm = p["out"]["kernel"].dtype  # the matmul dtype
    logits = matmul("bhqd,bhkd->bhqk", q, k.astype(mm), precision=precision)  # [B, h, N, T]
    # softmax(logits) @ v with the normalisation applied after the product (on [B, h, N, d],
    # not [B, h, N, T]); the max shift cancels exactly, so it needs no gradient.
    e = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
    out = matmul("bhqk,bhkd->bhqd", e, v.astype(mm), precision=precision) / e.sum(
        -1, keepdims=True)
    out = out.transpose(0, 2, 1, 3).reshape(B, N, -1)  # heads side by side again
    w = p["out"]["kernel"]  # [heads, head_dim, E]
    return dense({"kernel": w.reshape(-1, w.shape[-1]), "bias": p["out"]["bias"]}, out,
                 precision=precision)


def init_mlp(key, emb_dim, mlp_dim, *, dtype=jnp.float32):
    """Two dense layers, E -> mlp_dim -> E. Needs: init_dense, _xavier_uniform."""
    k1, k2 = jax.random.split(key)
    return {"fc1": init_dense(k1, emb_dim, mlp_dim, kernel_init=_xavier_uniform, bias_std=1e-6,
                              dtype=dtype),
            "fc2": init_dense(k2, mlp_dim, emb_dim, kernel_init=_xavier_uniform, bias_std=1e-6,
                              dtype=dtype)}


def mlp(p, x, *, precision=HIGHEST):
    """[..., E] -> [..., mlp_dim] -> [..., E], tanh-approximated GELU (flax nn.gelu).
    Needs: dense."""
    h = jax.nn.gelu(dense(p["fc1"], x, precision=precision), approximate=True)
    return dense(p["fc2"], h, precision=precision)


def init_vit_block(key, emb_dim: int, num_heads: int, *, mlp_dim: int | None = None,
                   dtype=jnp.float32) -> dict:
    """One pre-LN ViT block of width emb_dim (mlp_dim None: 4 * emb_dim, as big_vision).
    Needs: init_layer_norm, init_attention, init_mlp."""
    ka, km = jax.random.split(key)
    return {"ln1": init_layer_norm(emb_dim, dtype=dtype),
            "attention": init_attention(ka, emb_dim, num_heads, dtype=dtype),
            "ln2": init_layer_norm(emb_dim, dtype=dtype),
            "mlp": init_mlp(km, emb_dim, mlp_dim or 4 * emb_dim, dtype=dtype)}


def vit_block(p, x, *, precision=HIGHEST):
    """Pre-LN transformer block with residuals, [B, N, E]: x + attn(LN(x)), then + mlp(LN(.)).
    The residual stream runs as [B*N, E] rows, which XLA:CPU differentiates faster. Needs:
    layer_norm, attention, mlp."""
    B, N, E = x.shape
    h = x.reshape(B * N, E)
    a = attention(p["attention"], layer_norm(p["ln1"], h).reshape(B, N, E), precision=precision)
    h = h + a.reshape(B * N, E)
    h = h + mlp(p["mlp"], layer_norm(p["ln2"], h), precision=precision)
    return h.reshape(B, N, E)


# ---- Coupling net: x1 [B, N, D/2] -> b, s [B, N, D/2] (big_vision's DNN) -----------------

def init_coupling_net(key, *, num_tokens: int, token_dim: int, emb_dim: int, num_heads: int,
                      block_depth: int = 1, mlp_dim: int | None = None,
                      context_dim: int | None = None, dtype=jnp.float32) -> dict:
    """Parameters of one coupling's ViT for N = num_tokens tokens of D = token_dim values (it
    reads D/2, writes b and s, D/2 each); the output layer is zero, so the coupling starts as
    y2 = x2 * sigmoid(0) * k, which is the identity for the default k = 2. A context_dim adds
    `context_attention` (flax MultiHeadDotProductAttention's defaults: lecun_normal kernels,
    zero biases; its output kernel zero as in big_vision, so the model starts as the
    unconditional one). Needs: init_dense, init_vit_block, init_layer_norm, init_attention,
    _lecun_normal."""
    N, D, E = num_tokens, token_dim, emb_dim
    k_in, k_pos, k_blocks, k_out = jax.random.split(key, 4)
    block_keys = jax.random.split(k_blocks, block_depth)
    p = {"init_proj": init_dense(k_in, D // 2, E, dtype=dtype),
         "posemb": jax.random.normal(k_pos, (N, E), dtype) / math.sqrt(E),
         "blocks": jax.vmap(lambda k: init_vit_block(k, E, num_heads, mlp_dim=mlp_dim,
                                                     dtype=dtype))(block_keys),
         "encoder_norm": init_layer_norm(E, dtype=dtype),
         "final_proj": init_dense(k_out, E, D, kernel_init=jax.nn.initializers.zeros,
                                  dtype=dtype)}
    if context_dim:
        k_ctx = jax.random.fold_in(key, 4)  # a fifth key: the four above, and so the other
        # parameters, stay those of the unconditional model
        p["context_attention"] = init_attention(
            k_ctx, E, num_heads, dtype=dtype, kv_dim=context_dim, kernel_init=_lecun_normal,
            out_init=jax.nn.initializers.zeros)
    return p


def coupling_net(p, x1, *, context=None, precision=HIGHEST):
    """x1 [B, N, D/2] -> b, s [B, N, D/2]: dense + position embedding, [the patches attending to
    the context [B, T_ctx, C_ctx]], `block_depth` ViT blocks, LN, dense to (b, s). The context
    attention is big_vision's DNN's: a residual, with no LayerNorm before it. Needs: dense,
    attention, vit_block, layer_norm."""
    h = dense(p["init_proj"], x1, precision=precision) + p["posemb"][None]  # [B, N, E]
    if context is not None:  # keys and values from context [B, T_ctx, C_ctx]
        h = h + attention(p["context_attention"], h, context, precision=precision)
    for i in range(p["blocks"]["ln1"]["scale"].shape[0]):  # unrolled: few, and faster
        h = vit_block(jax.tree.map(lambda a: a[i], p["blocks"]), h, precision=precision)
    out = dense(p["final_proj"], layer_norm(p["encoder_norm"], h), precision=precision)
    b, s = jnp.split(out, 2, axis=-1)  # [B, N, D] -> 2 x [B, N, D/2]
    return b, s


# ---- Coupling: y1 = x1, y2 = (x2 + b(x1)) * sigmoid(s(x1)) * k ---------------------------

def coupling_scale(s, k):
    """Scale sigmoid(s) * k and its log-det, summed per example: [B, N, D/2] -> [B].
    Needs: nothing."""
    logdet = jnp.sum(jax.nn.log_sigmoid(s) + math.log(k), axis=(1, 2))
    return jax.nn.sigmoid(s) * k, logdet


def affine_forward(p, x1, x2, k, *, net, context=None):
    """The coupling's equation on the halves [B, N, D/2]: y2 = (x2 + b(x1)) * sigmoid(s(x1)) * k;
    returns y2 and log|det dy/dx| [B]. `net(p, x1[, context=...])` gives (b, s): the ViT
    (coupling_net), or any other network with that interface (variants.py's CNN); any such
    net keeps the coupling invertible. Needs: coupling_scale."""
    b, s = net(p, x1) if context is None else net(p, x1, context=context)
    scale, logdet = coupling_scale(s, k)
    return (x2 + b) * scale, logdet


def affine_inverse(p, y1, y2, k, *, net, context=None):
    """x2 = y2 / (sigmoid(s(y1)) * k) - b(y1), and log|det dx/dy| [B]. y1 = x1 and the context
    is the same, so b and s are exactly the forward's. Needs: coupling_scale."""
    b, s = net(p, y1) if context is None else net(p, y1, context=context)
    scale, logdet = coupling_scale(s, k)
    return y2 / scale - b, -logdet


def coupling_forward(p, index, x, k, *, net, context=None):
    """One coupling, [B, N, D] -> y [B, N, D], log|det dy/dx| [B], with split index `index`
    [N*D] and the network `net` (affine_forward). `forward` runs the same couplings with each
    merge and the next split fused into one gather. Needs: split, merge, affine_forward."""
    x1, x2 = split(x, index)
    y2, logdet = affine_forward(p, x1, x2, k, net=net, context=context)
    return merge(x1, y2, index), logdet


def coupling_inverse(p, index, y, k, *, net, context=None):
    """[B, N, D] -> x [B, N, D], log|det dx/dy| [B] (= minus the forward's). Needs: split,
    merge, affine_inverse."""
    y1, y2 = split(y, index)
    x2, logdet = affine_inverse(p, y1, y2, k, net=net, context=context)
    return merge(y1, x2, index), logdet


# ---- Flow, plain: z = f(x), the couplings applied one after the other -------------------

def init(key: jax.Array, cfg: Config, *, dtype=jnp.float32) -> tuple[dict, jax.Array]:
    """Returns (params, perms): params a nested dict whose leaves have a leading [depth] axis
    (one slice per coupling), perms int32 [depth, N*D] split indices (data, not trained).
    Needs: init_coupling_net, init_perms."""
    k_params, k_perms = jax.random.split(key)
    net_keys = jax.random.split(k_params, cfg.depth)
    sizes = cfg.coupling_net_sizes()
    params = jax.vmap(lambda k: init_coupling_net(k, **sizes, dtype=dtype))(net_keys)
    return params, init_perms(k_perms, cfg)


def check_input(x, perms, cfg, name, context=None):
    """Raises ValueError, at trace time, for inputs that do not match the Config."""
    expected = (cfg.depth, cfg.num_tokens * cfg.token_dim)
    if x.ndim != 4 or tuple(x.shape[1:]) != cfg.image_shape:
        raise ValueError(f"{name} must be [B, H, W, C] with (H, W, C) = {cfg.image_shape} from "
                         f"the Config, got shape {tuple(x.shape)}.")
    if tuple(perms.shape) != expected:
        raise ValueError(f"perms has shape {tuple(perms.shape)} but this Config needs "
                         f"{expected}; were they made for another Config?")
    _check_context(context, x.shape[0], cfg)


def _check_context(context, batch, cfg):
    C = cfg.context_dim
    if C is None:
        if context is not None:
            raise ValueError("A context was given but this Config is unconditional "
                             "(context_dim=None); set Config.context_dim to the context's "
                             "feature size C_ctx, or call without a context.")
        return
    if context is None:
        raise ValueError(f"This Config is class-conditional (context_dim={C}): pass "
                         f"context=[B, T_ctx, {C}], e.g. jax.nn.one_hot(labels, {C})[:, None].")
    shape = tuple(context.shape)
    if len(shape) != 3 or shape[0] != batch or shape[1] < 1 or shape[2] != C:
        raise ValueError(f"context must be [B, T_ctx, C_ctx] = [{batch}, T_ctx >= 1, {C}] "
                         f"(B from the images, C_ctx = Config.context_dim), got shape {shape}.")
    if not jnp.issubdtype(context.dtype, jnp.floating):
        raise ValueError(f"context must be floating point, got {context.dtype}; for labels "
                         f"use jax.nn.one_hot(labels, {C})[:, None].")


def plain_forward(params: dict, perms: jax.Array, x: jax.Array, cfg: Config, *,
                  context=None, net=coupling_net):
    """The flow as the paper writes it: x [B, H, W, C] -> z [B, H, W, C], log|det dz/dx| [B].

    Patchify; then for each coupling i: split the tokens by its index perms[i], transform x2
    with its parameters params[i], merge; unpatchify. The log-det of the composition is the sum
    of the couplings' log-dets. `net` is each coupling's network (affine_forward); another
    network of its interface takes the ViT's place. A conditional Config needs context
    [B, T_ctx, C_ctx], which every coupling receives. Needs: check_input, patchify,
    plain_couplings, unpatchify."""
    check_input(x, perms, cfg, "x", context)
    h = patchify(x, cfg.patch_size)  # [B, N, D]
    logdet = jnp.zeros(x.shape[:1], x.dtype)
    for h, coupling_logdet in plain_couplings(params, perms, h, cfg, context=context, net=net):
        logdet = logdet + coupling_logdet
    return unpatchify(h, cfg.patch_size, cfg.image_shape), logdet


def plain_couplings(params, perms, h, cfg: Config, *, context=None, net=coupling_net,
                    affine=affine_forward):
    """plain_forward's couplings on the tokens h [B, N, D], one at a time: yields, for each
    coupling i in order, the tokens after it [B, N, D] and its log|det| [B] (inside.py draws
    these intermediate states; bits.py traces them through its own `affine`, an equation of
    affine_forward's signature). Needs: split, affine_forward, merge."""
    for i in range(cfg.depth):
        p = jax.tree.map(lambda leaf: leaf[i], params)  # coupling i's ViT
        x1, x2 = split(h, perms[i])  # [B, N, D] -> 2 x [B, N, D/2]
        y2, logdet = affine(p, x1, x2, cfg.scale_factor, net=net, context=context)
        h = merge(x1, y2, perms[i])  # y1 = x1
        yield h, logdet


def plain_inverse(params: dict, perms: jax.Array, z: jax.Array, cfg: Config, *,
                  context=None, net=coupling_net):
    """x = f^-1(z), log|det dx/dz| [B]: plain_forward's steps undone, last coupling first, each
    given the same context. Needs: check_input, patchify, split, affine_inverse, merge,
    unpatchify."""
    check_input(z, perms, cfg, "z", context)
    h = patchify(z, cfg.patch_size)  # [B, N, D]
    logdet = jnp.zeros(z.shape[:1], z.dtype)
    for i in reversed(range(cfg.depth)):
        p = jax.tree.map(lambda leaf: leaf[i], params)
        y1, y2 = split(h, perms[i])
        x2, coupling_logdet = affine_inverse(p, y1, y2, cfg.scale_factor, net=net,
                                             context=context)
        h = merge(y1, x2, perms[i])
        logdet = logdet + coupling_logdet
    return unpatchify(h, cfg.patch_size, cfg.image_shape), logdet


# ---- Flow, fast path: the same map with each merge and the next split fused ------------
#
# plain_forward gathers twice per coupling (merge, then the next coupling's split) over a
# [B, N, D] state. forward/inverse compose the two into one gather of the flat state, kept as
# [N*D, B] so that each gather, and its gradient (a scatter-add), moves whole rows of B values.
# Same couplings, same values (test_jet.py: test_fast_path_equals_plain_flow); training,
# evaluation and sampling use this path. Measurements: docs/speed.md.

def remat_policy(remat: bool):
    """What backprop keeps of each coupling: remat=True only its input, recomputing its ViT (as
    big_vision does); remat=False also the outputs of the ViT's dense layers (matmuls without
    batch dimensions); attention's batched matmuls and the cheap rest are recomputed."""
    policies = jax.checkpoint_policies
    return policies.nothing_saveable if remat else policies.dots_with_no_batch_dims_saveable


def chain_indices(perms: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Split indices [L, N*D] of L couplings, in running order -> (first, moves). `forward` keeps
    the state flat (x1 then x2) in the split order of the coupling about to run:
    merge_i then split_{i+1} is one gather by moves[i] = argsort(perms[i])[perms[i+1]], and
    moves[-1] = argsort(perms[-1]) merges the last. Needs: inverse_permutation."""
    inverse = jax.vmap(inverse_permutation)(perms)
    between = jnp.take_along_axis(inverse[:-1], perms[1:], axis=1)
    return perms[0], jnp.concatenate([between, inverse[-1:]], axis=0)


def _couplings(affine, params, perms, x, cfg, reverse, remat, compute_dtype, context, net):
    """patchify, the couplings in order (reverse: last first), unpatchify. The state is kept
    flat in the split order of the coupling about to run (see chain_indices), as [N*D, B]:
    each gather then moves rows of B values, and so does its gradient, a scatter. The context
    is the same for every coupling: a constant of the scan."""
    B, N = x.shape[0], cfg.num_tokens
    first, moves = chain_indices(perms[::-1] if reverse else perms)
    h = jnp.take(patchify(x, cfg.patch_size).reshape(B, -1).T, first, axis=0)
    if compute_dtype and context is not None:  # an input of the ViT's matmuls, as its weights
        context = context.astype(compute_dtype)

    def step(h, layer):  # h = x1 then x2 of this coupling; y1 = x1 is never touched
        p, move = layer
        if compute_dtype:  # bf16 mode: the ViT's weights, hence its matmuls, in compute_dtype
            p = jax.tree.map(lambda a: a.astype(compute_dtype), p)
        y2, logdet = affine(p, *halves(h.T, N), cfg.scale_factor, net=net, context=context)
        y = jnp.concatenate([h[:h.shape[0] // 2], y2.reshape(B, -1).T], axis=0)
        return jnp.take(y, move, axis=0), logdet
    step = jax.checkpoint(step, policy=remat_policy(remat))
    h, logdets = jax.lax.scan(step, h, (params, moves[::-1] if reverse else moves),
                              reverse=reverse)  # logdets [depth, B]
    return unpatchify(h.T.reshape(B, N, -1), cfg.patch_size, cfg.image_shape), logdets.sum(0)


def _check_params(params, cfg):
    if (cfg.context_dim is None) == ("context_attention" in params):
        have = "have" if "context_attention" in params else "lack"
        raise ValueError(f"params {have} `context_attention` but the Config has context_dim="
                         f"{cfg.context_dim}; were they made by jet.init with another Config?")


def forward(params: dict, perms: jax.Array, x: jax.Array, cfg: Config, *, remat: bool = False,
            compute_dtype=None, context=None, precision=HIGHEST):
    """x [B, H, W, C] in [-1, 1] -> z [B, H, W, C], log|det dz/dx| [B]. remat: see
    remat_policy. compute_dtype=jnp.bfloat16 runs the ViT matmuls in bfloat16; the coupling
    arithmetic and log-det stay in the parameters' dtype, so f stays invertible. A conditional
    Config (context_dim set) needs context [B, T_ctx, C_ctx]; an unconditional one, none.
    precision: of the ViT's matmuls (jax.lax.Precision; None: jax's default). Needs:
    check_input, chain_indices, halves, affine_forward, coupling_net, remat_policy, patchify,
    unpatchify."""
    check_input(x, perms, cfg, "x", context)
    _check_params(params, cfg)
    net = functools.partial(coupling_net, precision=precision)
    return _couplings(affine_forward, params, perms, x, cfg, False, remat, compute_dtype,
                      context, net)


def inverse(params: dict, perms: jax.Array, z: jax.Array, cfg: Config, *, compute_dtype=None,
            context=None, precision=HIGHEST):
    """z [B, H, W, C] -> x [B, H, W, C], log|det dx/dz| [B]; couplings in reverse order, each
    given the same context as in forward. Needs: as forward, affine_inverse for
    affine_forward."""
    check_input(z, perms, cfg, "z", context)
    _check_params(params, cfg)
    net = functools.partial(coupling_net, precision=precision)
    return _couplings(affine_inverse, params, perms, z, cfg, True, False, compute_dtype, context,
                      net)


# ---- Likelihood: uniform dequantization and bits per dimension ---------------------------
#
# Images of `levels` integer levels q = 0 .. levels-1 are mapped onto data_range = (lo, hi) in
# steps of (hi - lo) / (levels - 1); each level owns a cell of that width. The defaults are
# big_vision's: 8-bit images on [-1, 1], cells of 1/127.5. dequantize and bits_per_dim must
# be given the same levels and range: a density over other units scores other bits.

def _cells_per_unit(levels: int, data_range: tuple[float, float]) -> float:
    """1 / cell width for `levels` levels on data_range, after checking both."""
    lo, hi = data_range
    if not (isinstance(levels, int) and 2 <= levels <= 256):
        raise ValueError(f"levels must be an int from 2 to 256 (uint8 images), got {levels!r}.")
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"data_range must be (lo, hi) with finite lo < hi, got {data_range}.")
    return (levels - 1) / (hi - lo)


def dequantize(key: jax.Array, images: jax.Array, *, levels: int = 256,
               data_range: tuple[float, float] = (-1.0, 1.0)) -> jax.Array:
    """uint8 [B, H, W, C] -> float32 x = lo + q/s + u, u ~ U[0, 1/s), s = (levels-1)/(hi-lo): by
    default x = q/127.5 - 1 + u, in [-1, 1 + 1/127.5).

    Integer q owns the cell [lo + q/s, lo + (q+1)/s). A density p on x gives q the probability
    P(q) = integral of p over its cell, and fitting p to the noisy x maximises a lower bound on
    log P(q) (Theis et al. 2016; see bits_per_dim). This is the official trainer's noise.
    Needs: _cells_per_unit.
    """
    if images.dtype != jnp.uint8:
        raise ValueError(f"dequantize expects uint8 images, got {images.dtype}.")
    s = _cells_per_unit(levels, data_range)
    x = images.astype(jnp.float32) / s + data_range[0]
    return x + jax.random.uniform(key, images.shape, jnp.float32, 0.0, 1.0 / s)


def bits_per_dim(z: jax.Array, logdet: jax.Array, *, levels: int = 256,
                 data_range: tuple[float, float] = (-1.0, 1.0)) -> jax.Array:
    """Per-example bits/dim of images dequantized with these levels and data_range (dequantize's
    defaults: 8-bit images on [-1, 1]), z [B, H, W, C], logdet [B] -> [B].

    Change of variables: -log p(x) = -log N(z; 0, I) - log|det dz/dx|, with
    -log N(z; 0, I) = sum(z^2/2 + log(2 pi)/2). With x = lo + q/s + u and cells of volume
    s^-(H*W*C), Jensen's inequality gives -log P(q) <= E_u[-log p(x)] + H*W*C * log s:
    this per-example bound, divided by H*W*C * ln 2 to turn nats into bits per dimension.
    Needs: _cells_per_unit.
    """
    if z.ndim != 4 or logdet.shape != z.shape[:1]:
        raise ValueError(f"bits_per_dim expects z [B, H, W, C] and logdet [B] (forward's "
                         f"outputs), got shapes {z.shape} and {logdet.shape}.")
    dims = math.prod(z.shape[1:])
    s = _cells_per_unit(levels, data_range)
    nll = jnp.sum(0.5 * jnp.square(z), axis=(1, 2, 3)) + dims * (0.5 * math.log(2 * math.pi)
                                                                 + math.log(s))
    return (nll - logdet) / (dims * math.log(2))


# ---- Sampling ----------------------------------------------------------------------------

def sample(params: dict, perms: jax.Array, key: jax.Array, n: int, cfg: Config, *,
           temperature: float = 1.0, compute_dtype=None, context=None, precision=HIGHEST,
           flow_inverse=None) -> jax.Array:
    """n images, uint8 [n, H, W, C]: z ~ N(0, T^2 I), x = f^-1(z) in one parallel pass, then
    `quantize`d (clipped: flows put some mass outside [-1, 1]). A conditional model samples
    image i given context[i], context [n, T_ctx, C_ctx] (e.g. one-hot classes). flow_inverse
    replaces `inverse` with another flow's of the same signature (variants.py's; precision
    then stays its own). Under jit, n is static (jax.jit(jet.sample, static_argnames="n")).
    Needs: inverse, quantize."""
    if flow_inverse is not None and precision is not HIGHEST:
        raise ValueError("sample's precision applies to jet.inverse; give flow_inverse its own "
                         "precision (functools.partial) instead.")
    dtype = jax.tree.leaves(params)[0].dtype
    z = temperature * jax.random.normal(key, (n, *cfg.image_shape), dtype)
    flow_inverse = flow_inverse or functools.partial(inverse, precision=precision)
    x, _ = flow_inverse(params, perms, z, cfg, compute_dtype=compute_dtype, context=context)
    return quantize(x)


def quantize(x: jax.Array) -> jax.Array:
    """[-1, 1] -> uint8: the integer whose dequantization cell holds x, clipped to [0, 255].
    Needs: nothing."""
    return jnp.clip(jnp.floor((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
