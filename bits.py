"""Where a trained flow spends its bits: each coupling's state, its log-det, and each
dimension's bits, expansion and room (`python inside.py RUN` draws them; `python ablate.py
--where_bits RUN` splits them between exact zeros and the other pixels, as docs/cpu-preset.md
does on Fashion-MNIST)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

import checkpoints
import data
import jet


def tracking_affine(p, x1, x2, k, *, net, context=None):
    """jet.affine_forward on the first quarter of the batch [4B, N, D/2]; the other three
    quarters carry, for each dimension, the sum of its log-scales, the number of couplings that
    transformed it, and how many of those scales were past 0.99 k. Splits and merges move every
    example's values alike, so what is stacked on the batch axis follows its dimension."""
    B = x1.shape[0] // 4
    b, s = net(p, x1[:B])  # unconditional: context is None
    scale, logdet = jet.coupling_scale(s, k)
    h2, log_scale, room, saturated = jnp.split(x2, 4)
    y2 = jnp.concatenate([(h2 + b) * scale, log_scale + jnp.log(scale), room + 1,
                          saturated + (scale > 0.99 * k)])
    return y2, jnp.tile(logdet, 4)


def trace(params, perms, x, cfg: jet.Config) -> dict[str, jax.Array]:
    """jet.plain_forward on x [B, H, W, C], coupling by coupling: "states" [depth + 1, B, H, W,
    C] (x, then the state after each coupling; the last is z), "logdets" [depth, B] (each
    coupling's log|det|, nats), and per dimension [B, H, W, C]: "bits" it costs (their mean is
    jet.bits_per_dim), "expansion" (its log-scales, in bits), "room" (the couplings that
    transform it, 1 bit each at k = 2), "saturated" (the share of its scales past 0.99 k)."""
    h = jet.patchify(x, cfg.patch_size)  # [B, N, D]
    stacked = jnp.concatenate([h, jnp.zeros_like(h), jnp.zeros_like(h), jnp.zeros_like(h)])
    B, image = x.shape[0], lambda t: jet.unpatchify(t, cfg.patch_size, cfg.image_shape)  # noqa: E731
    states, logdets = [x], []
    for stacked, logdet in jet.plain_couplings(params, perms, stacked, cfg,
                                               affine=tracking_affine):
        states.append(image(stacked[:B]))
        logdets.append(logdet[:B])
    z, log_scale, room, saturated = (image(t) for t in jnp.split(stacked, 4))
    nats = 0.5 * jnp.square(z) + 0.5 * math.log(2 * math.pi) + math.log(127.5) - log_scale
    return {"states": jnp.stack(states), "logdets": jnp.stack(logdets),
            "bits": nats / math.log(2), "expansion": log_scale / math.log(2), "room": room,
            "saturated": saturated / jnp.maximum(room, 1)}


def where_bits(run: str, num_images: int, data_dir: str | None = None) -> str:
    """A markdown report of run's bits/dim on its dataset's first num_images test images, exact
    zeros against the rest."""
    state, cfg, meta = checkpoints.read_run(run)
    images = data.load(meta["flags"]["dataset"], data_dir)["test"][:num_images]
    x = jet.dequantize(jax.random.key(0), jnp.asarray(images))
    out = jax.jit(trace)(state["params"], state["perms"], x, cfg)
    zero = images == 0
    rows = [f"{run} (step {meta['step']}, {len(images)} test images): "
            f"{float(out['bits'].mean()):.3f} bits/dim", "",
            "| pixels | share | bits each | expansion, bits | room, bits | saturated scales |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name, mask in (("exactly 0", zero), ("1 to 255", ~zero)):
        if mask.any():
            bits, gain, room, sat = (float(np.asarray(out[k])[mask].mean())
                                     for k in ("bits", "expansion", "room", "saturated"))
            rows.append(f"| {name} | {mask.mean():.3f} | {bits:.3f} | {gain:.2f} | {room:.1f} "
                        f"| {sat:.3f} |")
    return "\n".join(rows)
