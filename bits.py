"""Where a trained flow spends its bits: its bits/dim split by dimension, with the expansion
each dimension received from the couplings and the room they had for it (`python ablate.py
--where_bits RUN`; docs/cpu-preset.md uses it on Fashion-MNIST's exact zeros)."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

import checkpoints
import data
import jet


def bits_by_dimension(params, perms, x, cfg: jet.Config) -> dict[str, jax.Array]:
    """jet.plain_forward's loop tracking each dimension's log-scales, all [B, H, W, C]: "bits"
    it costs (their mean is bits_per_dim), "expansion" (its log-scales, in bits), "room" (the
    couplings that transform it, 1 bit each at k = 2), "saturated" (its scales past 0.99 k)."""
    h = jet.patchify(x, cfg.patch_size)  # [B, N, D]
    logs, room, saturated = jnp.zeros_like(h), jnp.zeros_like(h[:1]), jnp.zeros_like(h)
    for i in range(cfg.depth):
        p = jax.tree.map(lambda leaf: leaf[i], params)
        (x1, x2), (l1, l2), (s1, s2) = (jet.split(v, perms[i]) for v in (h, logs, saturated))
        b, s = jet.coupling_net(p, x1)
        scale, _ = jet.coupling_scale(s, cfg.scale_factor)
        h = jet.merge(x1, (x2 + b) * scale, perms[i])
        logs = jet.merge(l1, l2 + jnp.log(scale), perms[i])
        saturated = jet.merge(s1, s2 + (scale > 0.99 * cfg.scale_factor), perms[i])
        room = room + jet.merge(jnp.zeros_like(x1[:1]), jnp.ones_like(x2[:1]), perms[i])
    z, logs, saturated, room = (jet.unpatchify(v, cfg.patch_size, cfg.image_shape)
                                for v in (h, logs, saturated, room))
    nats = 0.5 * jnp.square(z) + 0.5 * math.log(2 * math.pi) + math.log(127.5) - logs
    return {"bits": nats / math.log(2), "expansion": logs / math.log(2),
            "room": jnp.broadcast_to(room, x.shape), "saturated": saturated / room}


def where_bits(run: str, num_images: int, data_dir: str | None = None) -> str:
    """A markdown report of run's bits/dim on its dataset's first num_images test images, exact
    zeros against the rest."""
    path = os.path.join(run, "checkpoint.npz")
    arrays, meta = checkpoints.read(path)
    cfg = jet.Config(**meta["config"])
    if cfg.context_dim:
        raise ValueError(f"{path} is a conditional model; --where_bits reads unconditional ones.")
    state = checkpoints.restore(arrays, checkpoints.state_template(cfg, None), path)
    images = data.load(meta["flags"]["dataset"], data_dir)["test"][:num_images]
    x = jet.dequantize(jax.random.key(0), jnp.asarray(images))
    out = jax.jit(bits_by_dimension, static_argnums=3)(state["params"], state["perms"], x, cfg)
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
