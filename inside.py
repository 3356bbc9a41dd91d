"""What a Jet does, drawn: its splits, an image turning into noise coupling by coupling, where
its bits go, and walks through its latent space (docs/inside.md shows them beside the paper).

  python inside.py runs/cifar10-cpu       # a trained run: pictures in runs/cifar10-cpu/inside/
  python inside.py trained/cifar10-cpu --test_images trained/cifar10-cpu/check.npz
                                          # the shipped model, on its 32 shipped test images
  python inside.py --dataset cifar10      # no run: a fresh model, its output layers perturbed
                                          # (at init every coupling is the identity)

Writes splits.svg, stages.svg, values.svg, bits.svg, couplings.svg, latent.svg (each
labelled: rows, columns, colour scales), summary.md (every number the pictures show) and
figures.npz (the arrays behind the bit pictures) into --out. Standard library + NumPy
pictures (pictures.py); every random draw derives from one fixed key, so a run's pictures
repeat.
"""

import argparse
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import bits
import checkpoints
import data
import jet
import pictures
import presets

KEY = 0  # every random draw below folds a stream number into jax.random.key(KEY)
IMAGES = 6  # test images drawn: the first IMAGES of the test set
TEMPERATURES = (0.0, 0.5, 0.7, 0.85, 1.0)  # prior temperatures of the sample rows
FRAMES = 8  # interpolation frames, both ends included
SCALE = 3.0  # the stage pictures map [-SCALE, SCALE] to [0, 255], one scale for all stages
PERTURB = 0.05  # without a run: std of the output layers (zero at init) of the fresh model
BATCH = 250  # images a batch for the test-set pass
# Compiled once a Config for every caller (a Config is static; jet.py never jits itself).
FORWARD = jax.jit(jet.forward)
INVERSE = jax.jit(jet.inverse)
TRACE = jax.jit(bits.trace)


# ------------------------------------------------------------------------------------------
# The model and its images


def fresh_model(key, cfg: jet.Config) -> tuple[dict, jax.Array]:
    """jet.init with every coupling's zero output layer (final_proj) drawn from N(0, PERTURB^2)
    instead, so that the pictures show couplings that do something."""
    params, perms = jet.init(key, cfg)
    k_kernel, k_bias = jax.random.split(jax.random.fold_in(key, 1))
    out = params["final_proj"]
    params["final_proj"] = {
        "kernel": PERTURB * jax.random.normal(k_kernel, out["kernel"].shape),
        "bias": PERTURB * jax.random.normal(k_bias, out["bias"].shape)}
    return params, perms


def cell_centres(images: np.ndarray) -> jax.Array:
    """uint8 -> the centre of each value's dequantization cell, (q + 0.5) / 127.5 - 1: a point
    that jet.quantize maps back to q even after float error, unlike a cell's noisy sample."""
    return (jnp.asarray(images, jnp.float32) + 0.5) / 127.5 - 1.0


def split_masks(perms, cfg: jet.Config) -> list[tuple[int, str, str, np.ndarray]]:
    """(coupling index, kind, projection, bool mask [H, W, C]: True where a value is in x1) for
    the first coupling of each (kind, projection), in the run's order. x1 is the first half of
    the coupling's split index (jet.split)."""
    masks, seen = [], set()
    ND = cfg.num_tokens * cfg.token_dim
    for i, couple in enumerate(cfg.couplings()):
        if couple in seen:
            continue
        seen.add(couple)
        flat = np.zeros(ND, bool)
        flat[np.asarray(perms[i])[:ND // 2]] = True  # [N*D] in patch layout
        mask = jet.unpatchify(flat.reshape(1, cfg.num_tokens, cfg.token_dim), cfg.patch_size,
                              cfg.image_shape)[0]
        masks.append((i, *couple, np.asarray(mask)))
    return masks


def stage_indices(depth: int) -> list[int]:
    """The couplings after which a stage is drawn: 0 (the image), L/4, L/2, 3L/4 and L (z)."""
    return [round(depth * q / 4) for q in range(5)]


# ------------------------------------------------------------------------------------------
# The latent space


def slerp(a: jax.Array, b: jax.Array, t: float) -> jax.Array:
    """The point at t in [0, 1] of the great-circle walk from a to b (angles over all dims;
    the radius interpolated linearly), exactly a at t = 0 and b at t = 1."""
    ra, rb = jnp.linalg.norm(a), jnp.linalg.norm(b)
    omega = jnp.arccos(jnp.clip(jnp.vdot(a, b) / (ra * rb), -1.0, 1.0))
    if t in (0.0, 1.0):
        return a if t == 0.0 else b
    return (jnp.sin((1 - t) * omega) * a + jnp.sin(t * omega) * b) / jnp.sin(omega)


def walks(params, perms, cfg: jet.Config, pair: np.ndarray) -> dict[str, np.ndarray]:
    """Two uint8 images [2, H, W, C] -> their z, decoded along the straight line and along the
    great circle, FRAMES each: uint8 [FRAMES, H, W, C] per walk."""
    z, _ = FORWARD(params, perms, cell_centres(pair), cfg)
    ts = np.linspace(0.0, 1.0, FRAMES)
    zs = {"linear": jnp.stack([(1 - t) * z[0] + t * z[1] if 0 < t < 1 else z[int(t)]
                               for t in ts]),
          "spherical": jnp.stack([slerp(z[0], z[1], float(t)) for t in ts])}
    return {name: np.asarray(jet.quantize(INVERSE(params, perms, w, cfg)[0]))
            for name, w in zs.items()}


def temperature_rows(params, perms, cfg: jet.Config, key, n: int) -> list[np.ndarray]:
    """One noise draw eps [n, H, W, C], decoded at each temperature T: x = f^-1(T eps)."""
    eps = jax.random.normal(key, (n, *cfg.image_shape))
    return [np.asarray(jet.quantize(INVERSE(params, perms, T * eps, cfg)[0]))
            for T in TEMPERATURES]


def exactness(params, perms, cfg: jet.Config, images: np.ndarray) -> dict:
    """The largest |x - f^-1(f(x))| over the images' cell centres, and whether their uint8
    values come back equal through quantize."""
    x = cell_centres(images)
    z, _ = FORWARD(params, perms, x, cfg)
    back, _ = INVERSE(params, perms, z, cfg)
    return {"max_abs_error": float(jnp.max(jnp.abs(back - x))),
            "uint8_equal": bool(np.array_equal(np.asarray(jet.quantize(back)), images))}


# ------------------------------------------------------------------------------------------
# Where the bits go, over the whole test set


def bit_budget(out: dict, cfg: jet.Config) -> dict:
    """A trace's bits/dim [B] as a sum: the Gaussian term (the prior's -log N(z) and the cells'
    log 127.5, over dims) plus each coupling's share, -log|det| / (dims ln 2), [depth, B]."""
    dims = math.prod(cfg.image_shape)
    couplings = -out["logdets"] / (dims * math.log(2))
    return {"couplings": couplings, "gaussian": out["bits"].mean((1, 2, 3)) - couplings.sum(0)}


@jax.jit
def batch_bits(params, perms, x, cfg: jet.Config) -> dict:
    """Sums over the batch x: bits per pixel [H, W] (summed over channels), each coupling's
    bits/dim [depth], the Gaussian term, bits/dim, and each image's share of its bits in its
    most expensive 10% of pixels."""
    out = bits.trace(params, perms, x, cfg)
    budget = bit_budget(out, cfg)
    per_pixel = out["bits"].sum(-1)  # [B, H, W]
    ranked = jnp.sort(per_pixel.reshape(len(x), -1), axis=1)[:, ::-1]
    top = ranked[:, :max(1, ranked.shape[1] // 10)].sum(1) / ranked.sum(1)
    return {"pixels": per_pixel.sum(0), "couplings": budget["couplings"].sum(1),
            "gaussian": budget["gaussian"].sum(), "bpd": out["bits"].mean((1, 2, 3)).sum(),
            "top10": top.sum()}


def test_set_bits(params, perms, cfg: jet.Config, images: np.ndarray, key) -> dict:
    """batch_bits' figures as means over all `images`, batch i dequantized with noise from
    fold_in(key, i): the mean bits per pixel [H, W], each coupling's mean bits/dim [depth], the
    Gaussian term, bits/dim, and the mean share of an image's bits in its top 10% of pixels."""
    totals = None
    for i in range(0, len(images), BATCH):
        x = jet.dequantize(jax.random.fold_in(key, i), jnp.asarray(images[i:i + BATCH]))
        sums = jax.tree.map(np.asarray, batch_bits(params, perms, x, cfg))
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    return jax.tree.map(lambda t: t / len(images), totals)


# ------------------------------------------------------------------------------------------
# The pictures


def rgb(images: np.ndarray) -> np.ndarray:
    """uint8 [..., C] -> [..., 3]: grey images repeated into three channels."""
    return images if images.shape[-1] == 3 else np.repeat(images, 3, axis=-1)


def token_grid(image: np.ndarray, P: int) -> np.ndarray:
    """The image [H, W, C] with every other P x P patch darkened: the token grid it becomes."""
    row, col = np.mgrid[:image.shape[0], :image.shape[1]]
    odd = ((row // P + col // P) % 2 == 1)[..., None]
    return np.where(odd, image * 0.55, image).astype(np.uint8)


def splits_rows(image: np.ndarray, masks: list, cfg: jet.Config) -> list[np.ndarray]:
    """The first row: the image and its token grid. Then one row a coupling kind: its x1 mask
    for each colour channel (white: x1, kept and read by the ViT; black: x2, transformed), and
    the image with x2 blanked to grey."""
    C = cfg.image_shape[2]
    rows = [np.stack([image, token_grid(image, cfg.patch_size)])]
    for _, _, _, mask in masks:
        channels = [np.repeat(255 * mask[..., c:c + 1], C, -1).astype(np.uint8)
                    for c in range(C)]
        rows.append(np.stack(channels + [np.where(mask, image, 128).astype(np.uint8)]))
    return rows


def to_picture(state: np.ndarray) -> np.ndarray:
    """A flow state [..., H, W, C] on the one shared scale [-SCALE, SCALE] -> uint8."""
    return np.round(np.clip((state + SCALE) / (2 * SCALE), 0, 1) * 255).astype(np.uint8)


def grey(values: np.ndarray) -> np.ndarray:
    """Values on the stages' scale [-SCALE, SCALE] [n] -> the grey uint8 RGB they are drawn in."""
    return np.repeat(to_picture(values)[:, None], 3, axis=1)


def draw(out_dir: str, f: dict) -> None:
    """Every picture from the figures `f` (see figures()), each labelled: rows, columns and,
    where colour stands for a number, its scale."""
    def svg(name, text):
        with open(os.path.join(out_dir, name), "w") as file:
            file.write(text)
    C = f["images"].shape[-1]
    channels = ["R", "G", "B"] if C == 3 else [f"channel {c + 1}" for c in range(C)]
    svg("splits.svg", pictures.labelled_grid_svg(
        f["splits_rows"], "which values each kind of coupling keeps (x1, white) and transforms",
        ["image | its token grid"] + f["split_labels"],
        [f"x1 of {c}" for c in channels] + ["x1 only"]))
    stages = f["stage_couplings"]
    svg("stages.svg", pictures.labelled_grid_svg(
        list(to_picture(f["stages"]).transpose(1, 0, 2, 3, 4)),
        "test images turning into noise, coupling by coupling",
        [f"test image {i + 1}" for i in range(len(f["images"]))],
        ["the image x" if s == 0 else f"after {s}" for s in stages],
        (-SCALE, SCALE, "value (clipped)", grey)))
    svg("values.svg", pictures.histograms_svg(
        [(f"after {s} couplings" if s else "the image x", f["stages"][i])
         for i, s in enumerate(stages)], "values of the drawn images at each stage, "
        "against N(0, 1) (red)"))
    hi = float(np.percentile(f["pixel_bits"], 99))
    heat = pictures.heat_map(np.concatenate([f["pixel_bits"], f["mean_pixel_bits"][None]]), hi)
    pairs = [np.stack([rgb(image), h]) for image, h in zip(f["images"], heat)]
    svg("bits.svg", pictures.labelled_grid_svg(
        pairs + [heat[-1:]], "where the bits go: bits per pixel (its channels summed)",
        [f"test image {i + 1}" for i in range(len(pairs))]
        + [f"mean of {f['test_images']:,} test images"], ["image", "bits"],
        (0.0, hi, "bits per pixel", lambda v: pictures.heat_map(v, hi))))
    colors = {"channels": "#1f77b4", "spatial": "#ff7f0e"}
    kinds = [kind for kind, _ in f["couplings_order"]]
    svg("couplings.svg", pictures.bars_svg(
        list(f["coupling_bits"]), [colors[k] for k in kinds],
        [(colors["channels"], "channel coupling"), (colors["spatial"], "spatial coupling")],
        f"each coupling's share of bits/dim: {f['gaussian']:.3f} (Gaussian term) "
        f"{f['coupling_bits'].sum():+.3f} (couplings) = {f['bpd']:.3f}", "bits/dim"))
    rows = [rgb(f["walks"]["linear"]), rgb(f["walks"]["spherical"])]
    svg("latent.svg", pictures.labelled_grid_svg(
        rows + [rgb(r) for r in f["temperature_rows"]],
        "walks between two test images' latents, and samples at each temperature",
        ["straight line in z", "great circle in z"] + [f"sample, T = {T:g}"
                                                       for T in TEMPERATURES],
        [f"{i + 1}" for i in range(FRAMES)]))


# ------------------------------------------------------------------------------------------
# The figures, the summary and the command


def figures(params, perms, cfg: jet.Config, test: np.ndarray) -> dict:
    """Everything the pictures show, as arrays and numbers, for the model on its test images
    `test` (uint8 [M, H, W, C]); the first IMAGES of them are drawn."""
    key = jax.random.key(KEY)
    images = test[:IMAGES]
    x = jet.dequantize(jax.random.fold_in(key, 0), jnp.asarray(images))
    out = TRACE(params, perms, x, cfg)
    stages = stage_indices(cfg.depth)
    masks = split_masks(perms, cfg)
    whole = test_set_bits(params, perms, cfg, test, jax.random.fold_in(key, 1))
    return {
        "images": images, "splits_rows": splits_rows(images[0], masks, cfg),
        "split_labels": [f"coupling {i + 1}: {kind}, {proj}" for i, kind, proj, _ in masks],
        "couplings_order": cfg.couplings(),
        "stage_couplings": stages, "stages": np.asarray(out["states"])[stages],
        "pixel_bits": np.asarray(out["bits"].sum(-1)), "mean_pixel_bits": whole["pixels"],
        "coupling_bits": whole["couplings"], "gaussian": float(whole["gaussian"]),
        "bpd": float(whole["bpd"]), "top10": float(whole["top10"]), "test_images": len(test),
        "walks": walks(params, perms, cfg, test[:2]),
        "temperature_rows": temperature_rows(params, perms, cfg, jax.random.fold_in(key, 2),
                                             FRAMES),
        "exactness": exactness(params, perms, cfg, images)}


def summary(f: dict, source: str) -> str:
    """The numbers behind the pictures, as markdown."""
    kinds = np.array([kind for kind, _ in f["couplings_order"]])
    share = {k: float(f["coupling_bits"][kinds == k].sum()) for k in ("channels", "spatial")}
    stats = [f"after {s}: mean {v.mean():+.3f}, std {v.std():.3f}"
             for s, v in zip(f["stage_couplings"], f["stages"])]
    e = f["exactness"]
    return "\n".join([
        f"# Inside {source}", "",
        f"- bits/dim over {f['test_images']:,} test images (noise key {KEY}): **{f['bpd']:.4f}**"
        f" = {f['gaussian']:.4f} (Gaussian term) {f['coupling_bits'].sum():+.4f} (the "
        f"{len(kinds)} couplings: channel {share['channels']:+.4f}, spatial "
        f"{share['spatial']:+.4f})",
        f"- the most expensive 10% of an image's pixels hold {100 * f['top10']:.1f}% of its bits"
        " (test-set mean)",
        f"- the drawn images' states (couplings applied): {'; '.join(stats)}",
        f"- round trip over the {len(f['images'])} drawn images: largest |x - f^-1(f(x))| = "
        f"{e['max_abs_error']:.2e}; uint8 images back equal: {'yes' if e['uint8_equal'] else 'NO'}",
        f"- interpolation ends equal the two test images: "
        f"{'yes' if ends_equal(f) else 'NO'}", ""])


def ends_equal(f: dict) -> bool:
    return all(np.array_equal(w[[0, -1]], f["walks_pair"]) for w in f["walks"].values())


def model_and_data(args) -> tuple[dict, jax.Array, jet.Config, np.ndarray, str]:
    """A trained run's model and its test images, or a fresh model on --dataset's."""
    if args.run:
        state, cfg, meta = checkpoints.read_run(args.run)
        if args.test_images:
            test = test_images(args.test_images, cfg)
        else:
            test = data.load(meta["flags"]["dataset"], args.data_dir,
                             md5=meta["flags"].get("data_md5"))["test"]
        return state["params"], state["perms"], cfg, test, f"{args.run} (step {meta['step']})"
    dataset = args.dataset or "cifar10"
    test = data.load(dataset, args.data_dir, md5=args.data_md5)["test"]
    preset = presets.CPU_PRESET.get(dataset, "tiny")
    cfg = presets.make_config({"preset": preset}, test.shape[1:])
    params, perms = fresh_model(jax.random.key(KEY), cfg)
    return params, perms, cfg, test, f"a fresh {preset}-preset model on {dataset}"


def test_images(path: str, cfg: jet.Config) -> np.ndarray:
    """The uint8 `images` [M, H, W, C] of an .npz (an exported model's check.npz), checked
    against the model's image shape."""
    try:
        with np.load(path) as f:
            images = f["images"]
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"--test_images {path}: not an .npz with an `images` array ({e}).")
    if images.dtype != np.uint8 or images.shape[1:] != cfg.image_shape or len(images) < 2:
        raise ValueError(f"--test_images {path}: images are {images.dtype}{list(images.shape)}; "
                         f"the model needs uint8 [M >= 2, {', '.join(map(str, cfg.image_shape))}].")
    return images


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("run", nargs="?", help="a training run's workdir (or checkpoint.npz); without it, a fresh "
      "model with perturbed output layers")
    a("--out", help="where the pictures go (default RUN/inside, or runs/inside-<dataset>)")
    a("--dataset", help="without RUN: the dataset (default cifar10)")
    a("--data_dir", help=f"dataset location (default {data.DEFAULT_DATA_DIR})")
    a("--data_md5", help="without RUN: md5 of a cifar10 archive you trust (e.g. a subset)")
    a("--images", type=int, help="test images for the bit figures (default: the whole test set)")
    a("--test_images", metavar="NPZ", help="with RUN: test images from this .npz (uint8 "
      "`images` [M, H, W, C]) instead of the run's dataset; an exported model's check.npz "
      "draws its pictures without the dataset")
    args = p.parse_args(argv)
    if args.run and (args.dataset or args.data_md5):
        p.error("--dataset and --data_md5 are for a fresh model; a run names its own dataset.")
    if args.test_images and not args.run:
        p.error("--test_images needs RUN: a fresh model draws its --dataset's test images.")
    if args.images is not None and args.images < 2:
        p.error(f"--images must be at least 2 (the walks join two test images), got {args.images}.")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    params, perms, cfg, test, source = model_and_data(args)
    test = test[:args.images] if args.images else test
    out_dir = args.out or (os.path.join(args.run, "inside") if args.run
                           else os.path.join("runs", f"inside-{args.dataset or 'cifar10'}"))
    os.makedirs(out_dir, exist_ok=True)
    f = figures(params, perms, cfg, test) | {"walks_pair": test[:2]}
    draw(out_dir, f)
    text = summary(f, source)
    with open(os.path.join(out_dir, "summary.md"), "w") as file:
        file.write(text)
    np.savez(os.path.join(out_dir, "figures.npz"), mean_pixel_bits=f["mean_pixel_bits"],
             coupling_bits=f["coupling_bits"], pixel_bits=f["pixel_bits"], stages=f["stages"])
    print(text + f"\nPictures in {out_dir}/: splits.svg stages.svg values.svg bits.svg "
          "couplings.svg latent.svg", flush=True)
    return f | {"out": out_dir, "summary": text}


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # bad arguments, a missing run or data: one line, no traceback
        sys.exit(f"inside.py: error: {e}")
