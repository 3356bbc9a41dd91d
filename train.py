"""Train Jet with the official recipe; evaluate test bits/dim; write samples and checkpoints.

  python train.py --dataset cifar10                      # the cifar10 preset, one GPU
  python train.py --dataset cifar10 --preset tiny        # a couple of minutes on a laptop CPU
  python train.py --workdir runs/x --eval_only           # test bpd of the latest checkpoint
  python train.py --workdir runs/x --sample 64           # a grid of 64 samples from it

Re-running the same command in the same --workdir resumes from the last checkpoint and sees
exactly the batches and noise an uninterrupted run would. Data-parallel over jax.devices().
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import struct
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

import data
import jet

# ------------------------------------------------------------------------------------------
# Presets. Explicit flags override them.

MODEL_FLAGS = ("patch_size", "depth", "block_depth", "emb_dim", "num_heads", "mlp_dim",
               "scale_factor", "kinds", "channel_projs", "spatial_projs")
# big_vision configs/proj/jet/imagenet64.py: Adam(b1 0.9, b2 0.95), lr 3e-4 with 10% linear
# warmup then cosine decay, decoupled weight decay 1e-5, global-norm clipping 1.0.
RECIPE = dict(lr=3e-4, warmup=0.1, weight_decay=1e-5, clip=1.0, b1=0.9, b2=0.95, seed=0)
ALL_SIX = ("checkerboard", "checkerboard-inv", "vstripes", "vstripes-inv", "hstripes",
           "hstripes-inv")
PRESETS = {
    # CPU run of a few minutes: 64 tokens of 48 dims, 12 narrow couplings. Depth matters more
    # than width here: a coupling can at most double a dim (k = 2), i.e. gain 1 bit, so 4 wide
    # couplings plateau near 6.4 bpd where 12 narrow ones keep improving (README has figures).
    "tiny": dict(patch_size=4, depth=12, block_depth=1, emb_dim=32, num_heads=2, batch_size=64,
                 steps=500, lr=1e-3, log_every=25, eval_every=250, ckpt_every=100,
                 remat=True),
    # The official imagenet64 model (32 couplings, block depth 2, width 512, 8 heads, 4 channel
    # couplings then 1 spatial, all six spatial projections) on the paper's 256-token grid:
    # P=2 on 32x32. Batch 256 instead of 1024 so that it fits one GPU.
    "cifar10": dict(patch_size=2, depth=32, block_depth=2, emb_dim=512, num_heads=8,
                    kinds=("channels",) * 4 + ("spatial",), spatial_projs=ALL_SIX,
                    batch_size=256, epochs=200, log_every=100, eval_every=5000,
                    ckpt_every=1000, remat=True),
    # big_vision configs/proj/jet/imagenet64.py, exactly (P=4 -> 256 tokens, batch 1024).
    "imagenet64": dict(patch_size=4, depth=32, block_depth=2, emb_dim=512, num_heads=8,
                       kinds=("channels",) * 4 + ("spatial",), spatial_projs=ALL_SIX,
                       batch_size=1024, epochs=200, log_every=50, eval_every=5000,
                       ckpt_every=5000, remat=True),
    # Fashion-MNIST 28x28x1: P=2 gives a 14x14 grid of 4-dim tokens (even, so every spatial
    # split halves it); a smaller model than the cifar10 preset for 60k grey images.
    "fashion_mnist": dict(patch_size=2, depth=16, block_depth=1, emb_dim=256, num_heads=4,
                          batch_size=256, epochs=50, log_every=100, eval_every=2000,
                          ckpt_every=1000, remat=True),
}
PRESETS["imagenet32"] = PRESETS["cifar10"] | dict(batch_size=1024, epochs=40)
DEFAULT_PRESET = {"cifar10": "cifar10", "imagenet64": "imagenet64", "imagenet32": "imagenet32",
                  "mnist": "fashion_mnist", "fashion_mnist": "fashion_mnist"}  # else "tiny"
RECIPE_FLAGS = ("dataset", "preset", "batch_size", "steps", "lr", "warmup", "weight_decay",
                "clip", "b1", "b2", "seed")  # a resumed run must use the same values
GRID = 64  # samples in the grid written at every evaluation
CHECKPOINT_FORMAT = "jet-train-checkpoint-v1"  # in every checkpoint's metadata


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--dataset", help="cifar10, mnist, fashion_mnist, imagenet32, imagenet64, npz:PATH or "
      "synthetic (default: the checkpoint's, else cifar10)")
    a("--data_dir", help=f"dataset cache / location (default {data.DEFAULT_DATA_DIR})")
    a("--data_url", help="download from this URL instead of the official one (a mirror)")
    a("--data_md5", help="expected md5 of a cifar10 archive you trust (e.g. a subset)")
    a("--workdir", default="runs/jet", help="checkpoint, metrics.jsonl and sample grids")
    a("--preset", choices=sorted(PRESETS), help="named settings (default: per dataset)")
    for name, kind in (("patch_size", int), ("depth", int), ("block_depth", int),
                       ("emb_dim", int), ("num_heads", int), ("mlp_dim", int),
                       ("scale_factor", float)):
        a(f"--{name}", type=kind, help=f"jet.Config.{name}")
    for name in ("kinds", "channel_projs", "spatial_projs"):
        a(f"--{name}", type=lambda s: tuple(s.split(",")), help=f"jet.Config.{name}, commas")
    a("--remat", action=argparse.BooleanOptionalAction, help="recompute coupling activations "
      "in backprop, as big_vision does: less memory for one more forward pass")
    a("--dtype", choices=("float32", "bfloat16"), help="dtype of the ViT matmuls (default "
      "float32); bfloat16 is for accelerators: params, coupling arithmetic, log-det and loss "
      "stay float32 and the flow stays exactly invertible")
    a("--batch_size", type=int, help="global batch, split over all devices")
    a("--steps", type=int, help="training steps (overrides --epochs)")
    a("--epochs", type=float, help="training epochs (drop-remainder batches)")
    a("--lr", type=float, help=f"peak learning rate (default {RECIPE['lr']})")
    a("--warmup", type=float, help="fraction of steps of linear warmup before cosine decay")
    a("--weight_decay", type=float, help="big_vision's decoupled wd: p -= schedule * wd * p")
    a("--clip", type=float, help="global gradient-norm clipping threshold")
    a("--b1", type=float, help="Adam beta1")
    a("--b2", type=float, help="Adam beta2")
    a("--seed", type=int, help="seed of init, batch order and dequantization noise")
    a("--log_every", type=int, help="steps between log lines")
    a("--eval_every", type=int, help="steps between test evaluations (and sample grids)")
    a("--ckpt_every", type=int, help="steps between checkpoints")
    a("--eval_batch_size", type=int, help="batch for evaluation (default --batch_size)")
    a("--init_from", help="fine-tune: start from the params of this checkpoint or workdir")
    a("--sample", type=int, default=0, metavar="N",
      help="write a grid of N samples from the latest checkpoint and exit")
    a("--temperature", type=float, default=1.0, help="prior temperature T for samples")
    a("--eval_only", action="store_true", help="evaluate the latest checkpoint and exit")
    a("--distributed", action="store_true", help="call jax.distributed.initialize() first "
      "(multi-host; one process per host)")
    return p.parse_args(argv)


ACTION_FLAGS = ("workdir", "sample", "temperature", "eval_only", "distributed")  # not settings


def resolve(args, saved: dict | None) -> dict:
    """Flags > the checkpoint's flags (when resuming) > preset > recipe defaults."""
    explicit = {k: v for k, v in vars(args).items() if v is not None and k not in ACTION_FLAGS}
    if saved is not None:
        base = dict(saved)
    else:
        dataset = explicit.get("dataset", "cifar10")
        preset = explicit.get("preset") or DEFAULT_PRESET.get(dataset, "tiny")
        base = RECIPE | dict(preset=preset, dataset=dataset) | PRESETS[preset]
        if "steps" in explicit or "epochs" in explicit:
            base.pop("steps", None), base.pop("epochs", None)
    flags = base | explicit
    if saved is None:
        flags.setdefault("eval_batch_size", flags["batch_size"])
    return flags


# ------------------------------------------------------------------------------------------
# Optimizer: big_vision's chain (clip, Adam, lr, decoupled weight decay, schedule)


def schedule(step, total_steps, warmup_steps):
    """Multiplier in [0, 1]: linear warmup from 0, then cosine decay to 0 (big_vision)."""
    progress = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
    warm = jnp.minimum(1.0, step / warmup_steps) if warmup_steps else 1.0
    return 0.5 * (1 + jnp.cos(jnp.pi * progress)) * warm


def make_optimizer(f: dict) -> optax.GradientTransformation:
    warmup_steps = round(f["warmup"] * f["steps"])
    return optax.chain(
        optax.clip_by_global_norm(f["clip"]),
        optax.scale_by_adam(b1=f["b1"], b2=f["b2"]),
        optax.scale(f["lr"]),
        optax.add_decayed_weights(f["weight_decay"]),  # not multiplied by lr, as big_vision
        optax.scale_by_schedule(lambda s: schedule(s, f["steps"], warmup_steps)),
        optax.scale(-1.0))


# ------------------------------------------------------------------------------------------
# Checkpoints: one .npz (no pickle), written to a temporary file, fsynced, then renamed


def to_host(leaf) -> np.ndarray:
    """A replicated device array (or host value) as NumPy; this process's copy suffices."""
    return np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)


def flatten(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): to_host(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def save_checkpoint(path: str, state: dict, meta: dict) -> None:
    arrays = flatten(state) | {"meta": np.array(json.dumps(meta))}
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a reader sees the old or the new checkpoint, never half
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """All arrays and the metadata of a checkpoint; a clear error if it is not one of ours."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays.pop("meta")))
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise KeyError(f"format is {meta.get('format')!r}, not {CHECKPOINT_FORMAT!r}")
    except Exception as e:  # zip, CRC, JSON and key errors all mean the same to the user
        raise ValueError(f"{path} is not a readable Jet checkpoint ({type(e).__name__}: {e}). "
                         "Delete it to start over, or point --workdir elsewhere.") from e
    return arrays, meta


def restore(arrays: dict[str, np.ndarray], template, path: str):
    """Fills `template` (a pytree of shapes) from checkpoint arrays, checking every leaf."""
    leaves = []
    for key_path, want in jax.tree_util.tree_leaves_with_path(template):
        name = jax.tree_util.keystr(key_path)
        got = arrays.get(name)
        if got is None or got.shape != want.shape or got.dtype != want.dtype:
            found = "missing" if got is None else f"{got.dtype}{list(got.shape)}"
            raise ValueError(f"{path}: {name} is {found}, expected "
                             f"{want.dtype}{list(want.shape)}; the checkpoint is from another "
                             "model or version. Use another --workdir.")
        leaves.append(got)
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


# ------------------------------------------------------------------------------------------
# Sample grids as PNG (zlib + struct: no imaging library)


def write_png(path: str, images: np.ndarray) -> None:
    """uint8 [n, H, W, C] (C = 1 or 3) -> one PNG grid, ceil(sqrt(n)) images per row."""
    n, H, W, C = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (H + 1) + 1, cols * (W + 1) + 1, C), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        grid[1 + r * (H + 1):(r + 1) * (H + 1), 1 + c * (W + 1):(c + 1) * (W + 1)] = image
    raw = b"".join(b"\x00" + row.tobytes() for row in grid)  # filter type 0 on every row

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(
            ">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", grid.shape[1], grid.shape[0], 8, {1: 0, 3: 2}[C], 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


# ------------------------------------------------------------------------------------------
# Training


def num_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def forward_flops(cfg: jet.Config) -> int:
    """Multiply-adds x 2 of one image's forward pass (matmuls only; ~99% of the work)."""
    N, D, E = cfg.num_tokens, cfg.token_dim, cfg.emb_dim
    M = cfg.mlp_dim or 4 * E
    block = 4 * N * E * E + 2 * N * N * E + 2 * N * E * M  # q, k, v, out; scores, mix; MLP
    return 2 * cfg.depth * (N * (D // 2) * E + cfg.block_depth * block + N * E * D)


def compute_dtype(f: dict):
    """The --dtype flag as jet's compute_dtype (None: the parameters' dtype)."""
    return {"float32": None, "bfloat16": jnp.bfloat16}[f.get("dtype") or "float32"]


def make_train_step(cfg: jet.Config, tx, remat: bool, dtype=None):
    """One jitted update: dequantize with noise key fold_in(key, step), loss = mean bits/dim."""
    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, images, step, noise_key):
        def loss_fn(params):
            x = jet.dequantize(jax.random.fold_in(noise_key, step), images)
            z, logdet = jet.forward(params, state["perms"], x, cfg, remat, dtype)
            return jet.bits_per_dim(z, logdet).mean()
        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return ({**state, "params": params, "opt_state": opt_state},
                {"loss": loss, "grad_norm": optax.tree.norm(grads)})
    return train_step


def make_evaluate(cfg: jet.Config, test: np.ndarray, batch_size: int, put_batch, dtype=None):
    """Mean test bits/dim over the whole test split (last batch padded and masked), with the
    noise of batch i fixed to fold_in(key, i) so the figure is reproducible."""
    @jax.jit
    def batch_sum(params, perms, images, mask, key):
        x = jet.dequantize(key, images)
        z, logdet = jet.forward(params, perms, x, cfg, compute_dtype=dtype)
        return jnp.sum(jet.bits_per_dim(z, logdet) * mask)

    def evaluate(state, key) -> float:
        total = 0.0
        for i in range(0, len(test), batch_size):
            chunk = test[i:i + batch_size]
            pad = batch_size - len(chunk)
            images = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.uint8)])
            mask = (np.arange(batch_size) < len(chunk)).astype(np.float32)
            total += float(batch_sum(state["params"], state["perms"], put_batch(images),
                                     put_batch(mask), jax.random.fold_in(key, i // batch_size)))
        return total / len(test)
    return evaluate


def run_keys(rng: jax.Array) -> dict[str, jax.Array]:
    """Every random stream of a run, derived from the one key stored in its checkpoints."""
    return dict(zip(("init", "noise", "eval", "sample"), jax.random.split(rng, 4)))


_sample = jax.jit(jet.sample, static_argnums=(3, 4, 6))


def write_samples(path: str, state: dict, cfg: jet.Config, n: int, temperature: float,
                  dtype=None) -> None:
    """A PNG grid of n samples, drawn with the run's sample key (the same noise every time)."""
    key = run_keys(jax.random.wrap_key_data(state["rng"]))["sample"]
    images = _sample(state["params"], state["perms"], key, n, cfg, temperature, dtype)
    write_png(path, to_host(images))


def state_template(cfg: jet.Config, tx) -> dict:
    params = jax.eval_shape(lambda: jet.init(jax.random.key(0), cfg)[0])
    perms = jax.ShapeDtypeStruct((cfg.depth, cfg.num_tokens * cfg.token_dim), jnp.int32)
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    return {"params": params, "perms": perms, "rng": rng,
            **({"opt_state": jax.eval_shape(tx.init, params)} if tx else {})}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.distributed:
        jax.distributed.initialize()
    try:
        return run(args)
    except ValueError as e:  # bad flags, data or checkpoint: one clear line, no traceback
        sys.exit(f"train.py: error: {e}")


def run(args) -> dict:
    ckpt_path = os.path.join(args.workdir, "checkpoint.npz")
    arrays, meta = read_checkpoint(ckpt_path) if os.path.exists(ckpt_path) else (None, None)
    if (args.eval_only or args.sample) and meta is None:
        raise ValueError(f"--eval_only/--sample need a checkpoint, but {ckpt_path} does not "
                         "exist; train first or pass the right --workdir.")
    f = resolve(args, meta and meta["flags"])
    cfg = meta and check_same_run(args, meta, f)
    if args.sample:
        path = os.path.join(args.workdir, f"samples_T{args.temperature:g}_n{args.sample}.png")
        state = restore(arrays, state_template(cfg, None), ckpt_path)
        write_samples(path, state, cfg, args.sample, args.temperature, compute_dtype(f))
        print(f"Wrote {args.sample} samples to {path}.", flush=True)
        return {"samples": path}

    dataset = data.load(f["dataset"], f.get("data_dir"), url=f.get("data_url"),
                        md5=f.get("data_md5"))
    train, test = dataset["train"], dataset["test"]
    if cfg is None:
        cfg = jet.Config(image_shape=tuple(train.shape[1:]),
                         **{k: f[k] for k in MODEL_FLAGS if k in f})
        if "steps" not in f:
            epoch = data.steps_per_epoch(len(train), f["batch_size"])
            f["steps"] = max(1, round(f["epochs"] * epoch))
    elif tuple(train.shape[1:]) != cfg.image_shape:
        raise ValueError(f"dataset {f['dataset']} has images {train.shape[1:]}, the checkpoint "
                         f"expects {cfg.image_shape}.")

    n_dev, n_proc = jax.device_count(), jax.process_count()
    for name in ("batch_size", "eval_batch_size"):
        if f[name] % n_dev:
            raise ValueError(f"--{name} {f[name]} is not divisible by the {n_dev} devices; "
                             f"use a multiple of {n_dev}.")
    mesh = jax.make_mesh((n_dev,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))

    def put_batch(global_batch: np.ndarray) -> jax.Array:  # each process gives its slice
        local = np.array_split(global_batch, n_proc)[jax.process_index()]
        return jax.make_array_from_process_local_data(batch_sharding, local,
                                                       global_batch.shape)

    tx = make_optimizer(f)
    if meta is not None:
        state, step = restore(arrays, state_template(cfg, tx), ckpt_path), meta["step"]
        print(f"Resuming {args.workdir} at step {step}.", flush=True)
    else:
        rng = jax.random.key_data(jax.random.key(f["seed"]))
        if f.get("init_from"):
            params, perms = load_params(f["init_from"], state_template(cfg, None), cfg)
        else:
            params, perms = jax.jit(jet.init, static_argnums=1)(
                run_keys(jax.random.wrap_key_data(rng))["init"], cfg)
        state = {"params": params, "perms": perms, "rng": rng, "opt_state": tx.init(params)}
        step = 0
    del arrays
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))  # replicated
    keys = run_keys(jax.random.wrap_key_data(state["rng"]))
    evaluate = make_evaluate(cfg, test, f["eval_batch_size"], put_batch, compute_dtype(f))
    if args.eval_only:
        test_bpd = evaluate(state, keys["eval"])
        print(f"step {step} | test {test_bpd:.4f} bpd", flush=True)
        return {"step": step, "test_bpd": test_bpd}

    flops = forward_flops(cfg)
    print(json.dumps({"flags": f, "config": dataclasses.asdict(cfg)}), flush=True)
    print(f"{num_params(state['params']):,} parameters | {flops / 1e9:.3f} GFLOP/image forward,"
          f" ~{3 * flops / 1e9:.3f} to train | {n_dev} {jax.devices()[0].platform} device(s) | "
          f"{len(train)} train / {len(test)} test images", flush=True)
    is_main = jax.process_index() == 0
    metrics_path = os.path.join(args.workdir, "metrics.jsonl")
    if is_main:
        os.makedirs(args.workdir, exist_ok=True)
        keep_metrics_up_to(metrics_path, step)  # drop records of steps a crash has undone

    def log(record):
        if is_main:
            with open(metrics_path, "a") as out:
                out.write(json.dumps(record) + "\n")

    train_step = make_train_step(cfg, tx, bool(f["remat"]), compute_dtype(f))
    total, bs = f["steps"], f["batch_size"]
    steps_per_epoch = data.steps_per_epoch(len(train), bs)
    # Losses since the last log line; kept in checkpoints so a resumed run logs the same means.
    window = [tuple(pair) for pair in (meta or {}).get("log_window", [])]
    test_bpd, timer, prev = None, None, None
    if step >= total:
        print(f"{args.workdir} has finished its {total} steps; see --eval_only.", flush=True)
    while step < total:
        batch = put_batch(train[data.batch_indices(len(train), bs, f["seed"], step)])
        state, out = train_step(state, batch, step, keys["noise"])
        step += 1
        # The previous step's loss is read while this one runs (no stall); the first step (it
        # compiles, so timing starts after it) and every log/eval/checkpoint step are read at
        # once, so no state with a non-finite loss is ever logged or written.
        if prev:
            window.append(check_finite(*prev, args.workdir))
        prev = (step, out)
        if timer is None or step == total or any(
                step % f[n] == 0 for n in ("log_every", "eval_every", "ckpt_every")):
            window.append(check_finite(*prev, args.workdir))
            prev, timer = None, timer or (time.time(), step)
        if (step % f["log_every"] == 0 or step == total) and window:
            rate = (step - timer[1]) * bs / max(time.time() - timer[0], 1e-9)
            eta = (total - step) * bs / rate if rate else 0.0
            lr = f["lr"] * float(schedule(step - 1, total, round(f["warmup"] * total)))
            losses, norms = zip(*window)
            record = {"step": step, "epoch": step / steps_per_epoch,
                      "train_bpd": float(np.mean(losses)), "lr": lr,
                      "grad_norm": float(np.mean(norms)), "img_per_s": rate}
            print(f"step {step}/{total} | epoch {record['epoch']:.2f} | train "
                  f"{record['train_bpd']:.4f} bpd | lr {lr:.2e} | grad {record['grad_norm']:.3f}"
                  f" | {rate:.1f} img/s | ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}",
                  flush=True)
            log(record)
            window, timer = [], (time.time(), step)
        if step % f["eval_every"] == 0 or step == total:
            test_bpd = evaluate(state, keys["eval"])
            print(f"step {step}/{total} | test {test_bpd:.4f} bpd", flush=True)
            log({"step": step, "test_bpd": test_bpd})
            if is_main:
                write_samples(os.path.join(args.workdir, f"samples_{step:07d}.png"), state, cfg,
                              GRID, args.temperature, compute_dtype(f))
            timer = (time.time(), step)  # img/s counts training only
        if (step % f["ckpt_every"] == 0 or step == total) and is_main:
            save_checkpoint(ckpt_path, state, {
                "format": CHECKPOINT_FORMAT, "step": step, "config": dataclasses.asdict(cfg),
                "flags": f, "data": {"seed": f["seed"], "next_batch": step},
                "log_window": window})
    return {"step": step, "test_bpd": test_bpd}


def check_same_run(args, meta: dict, f: dict) -> jet.Config:
    """The checkpoint's Config, after checking that this command asks for the same run."""
    cfg = jet.Config(**meta["config"])
    asked = jet.Config(**{**meta["config"], **{k: v for k, v in vars(args).items()
                                                if k in MODEL_FLAGS and v is not None}})
    changed = {k: (meta["flags"].get(k), f.get(k)) for k in RECIPE_FLAGS
               if meta["flags"].get(k) != f.get(k)}
    if asked != cfg or changed:
        what = changed or f"the model to {asked}"
        raise ValueError(f"{args.workdir} holds a run of {cfg} with flags {meta['flags']}; this "
                         f"command changes {what}. Resume with the same flags, use a new "
                         "--workdir, or start a new run from it with --init_from.")
    return cfg


def check_finite(step: int, out: dict, workdir: str) -> tuple[float, float]:
    loss, grad_norm = float(out["loss"]), float(out["grad_norm"])
    if not math.isfinite(loss):
        sys.exit(f"train.py: the training loss became {loss} at step {step}; stopping. The last "
                 f"good checkpoint in {workdir} is kept. Try a lower --lr or a smaller --clip.")
    return loss, grad_norm


def keep_metrics_up_to(path: str, step: int) -> None:
    """After a resume at `step`, forget the records an interrupted run wrote after it."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(f"{path}.tmp", "w") as f:
        f.writelines(lines)
    os.replace(f"{path}.tmp", path)


def load_params(path: str, template: dict, cfg: jet.Config):
    """Params and perms of another run (a checkpoint file or its workdir), for fine-tuning."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.npz")
    arrays, meta = read_checkpoint(path)
    if jet.Config(**meta["config"]) != cfg:
        raise ValueError(f"--init_from {path} has model {jet.Config(**meta['config'])}, but "
                         f"this run builds {cfg}; pass the same model flags.")
    restored = restore(arrays, template, path)
    print(f"Initialised params from {path} (step {meta['step']}).", flush=True)
    return restored["params"], restored["perms"]


if __name__ == "__main__":
    main()
