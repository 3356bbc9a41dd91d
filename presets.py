"""What a run is: the official recipe, the named presets, train.py's command-line flags, and how
flags, a checkpoint's settings and a preset resolve into one flat dict of settings and a
jet.Config.

Flags > the checkpoint's settings (when resuming) > the preset > RECIPE. Every number is checked
here, before any data is read or any program compiled.
"""

import argparse
import math
import os
import re

import jax.numpy as jnp

import data
import jet


# ------------------------------------------------------------------------------------------
# The recipe and the presets


def _names(text: str) -> tuple[str, ...]:
    return tuple(text.split(","))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


CONFIG_FLAG_TYPES = {"patch_size": int, "depth": int, "block_depth": int, "emb_dim": int,
                     "num_heads": int, "mlp_dim": int, "scale_factor": float, "kinds": _names,
                     "channel_projs": _names, "spatial_projs": _names}  # jet.Config fields
MODEL_FLAGS = tuple(CONFIG_FLAG_TYPES)
# big_vision configs/proj/jet/imagenet64.py: Adam(b1 0.9, b2 0.95), lr 3e-4 with 10% linear
# warmup then cosine decay, decoupled weight decay 1e-5, global-norm clipping 1.0.
RECIPE = dict(lr=3e-4, warmup=0.1, weight_decay=1e-5, clip=1.0, b1=0.9, b2=0.95, seed=0)
OFFICIAL_KINDS = ("channels",) * 4 + ("spatial",)  # big_vision imagenet64: 4 channel : 1 spatial
PRESETS = {
    # CPU run of a few minutes: 64 tokens of 48 dims, 12 narrow couplings. Depth matters more
    # than width here: a coupling can at most double a dim (k = 2), i.e. gain 1 bit, so 4 wide
    # couplings plateau near 6.4 bpd where 12 narrow ones keep improving.
    "tiny": dict(patch_size=4, depth=12, block_depth=1, emb_dim=32, num_heads=2, batch_size=64,
                 steps=500, lr=1e-3, log_every=25, eval_every=250, ckpt_every=100,
                 remat=True),
    # The official imagenet64 model (32 couplings, block depth 2, width 512, 8 heads, 4 channel
    # couplings then 1 spatial, all six spatial projections) on the paper's 256-token grid:
    # P=2 on 32x32. Batch 256 instead of 1024 so that it fits one GPU. 5,000 training images
    # are held out to choose the best checkpoint (docs/accelerator.md sizes the run: about
    # 2.3 h on one H100-class GPU in bfloat16).
    "cifar10": dict(patch_size=2, depth=32, block_depth=2, emb_dim=512, num_heads=8,
                    kinds=OFFICIAL_KINDS, spatial_projs=jet.SPATIAL_PROJS,
                    batch_size=256, epochs=200, log_every=100, eval_every=5000,
                    ckpt_every=1000, remat=True, validation=5000),
    # big_vision configs/proj/jet/imagenet64.py, exactly (P=4 -> 256 tokens, batch 1024).
    "imagenet64": dict(patch_size=4, depth=32, block_depth=2, emb_dim=512, num_heads=8,
                       kinds=OFFICIAL_KINDS, spatial_projs=jet.SPATIAL_PROJS,
                       batch_size=1024, epochs=200, log_every=50, eval_every=5000,
                       ckpt_every=5000, remat=True),
    # Fashion-MNIST 28x28x1: P=2 gives a 14x14 grid of 4-dim tokens (even, so every spatial
    # split halves it); a smaller model than the cifar10 preset for 60k grey images.
    "fashion_mnist": dict(patch_size=2, depth=16, block_depth=1, emb_dim=256, num_heads=4,
                          batch_size=256, epochs=50, log_every=100, eval_every=2000,
                          ckpt_every=1000, remat=True),
}
# The cifar10 model on downsampled ImageNet 32x32 (it holds out 5,000 images too).
PRESETS["imagenet32"] = PRESETS["cifar10"] | dict(batch_size=1024, epochs=40)
# CPU presets: sized by wall time (--time_budget) rather than steps, chosen on a held-out
# slice of the training set (docs/cpu-preset.md). Their cadences apply with an explicit
# --steps; a time budget sets its own (timing.set_steps). No remat: memory is not what limits
# a CPU run.
# CIFAR-10: P=4 (64 tokens of 48 values), 24 couplings of width 32, batch 32: twice the steps
# of batch 64 at 0.85x the images a second, 0.10 bpd better on validation; evaluation stays at
# 64 a batch. P=8 with width 64 won a 10-minute comparison but lost over 30 minutes
# (docs/cpu-preset.md).
PRESETS["cpu"] = dict(patch_size=4, depth=24, block_depth=1, emb_dim=32, num_heads=2,
                      kinds=OFFICIAL_KINDS, spatial_projs=jet.SPATIAL_PROJS,
                      batch_size=32, eval_batch_size=64, time_budget=30, lr=1.6e-2,
                      remat=False, log_every=50, eval_every=1000, ckpt_every=200)
# Fashion-MNIST: P=14 (4 tokens of 196 values), 32 couplings of width 64: each pixel passes
# through 16 of them, room for the ~8 bits of expansion an exact 0 needs
# (docs/cpu-preset.md#fashion-mnist).
PRESETS["fashion_mnist_cpu"] = PRESETS["cpu"] | dict(patch_size=14, depth=32, emb_dim=64,
                                                      batch_size=64, lr=8e-3)
# Without --preset a dataset gets the preset sized to the machine: paper scale on a GPU or TPU,
# a model trained in --time_budget minutes on a CPU. Other datasets default to "tiny".
ACCELERATOR_PRESET = {"cifar10": "cifar10", "imagenet32": "imagenet32",
                      "imagenet64": "imagenet64", "mnist": "fashion_mnist",
                      "fashion_mnist": "fashion_mnist"}
CPU_PRESET = {"cifar10": "cpu", "imagenet32": "cpu", "imagenet64": "cpu",
              "mnist": "fashion_mnist_cpu", "fashion_mnist": "fashion_mnist_cpu"}
# A resumed run must use the same values of these.
RECIPE_FLAGS = ("dataset", "preset", "batch_size", "steps", "lr", "warmup", "weight_decay",
                "clip", "b1", "b2", "seed", "validation", "train_images", "conditional",
                "label_dropout")


# ------------------------------------------------------------------------------------------
# The command line


def parse_args(argv=None, description: str = "") -> argparse.Namespace:
    """train.py's flags; a bad one raises ValueError (argparse would exit the interpreter)."""
    p = argparse.ArgumentParser(prog="train.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = refuse
    a = p.add_argument
    _add_data_flags(a)
    a("--workdir", help="checkpoint, metrics.jsonl, curve.svg and sample grids (default "
      "runs/<dataset>-<preset>)")
    a("--preset", choices=sorted(PRESETS), help="named settings (default: the dataset's "
      "preset for this machine: CPU-sized without a GPU/TPU, paper-scale with one)")
    for name, kind in CONFIG_FLAG_TYPES.items():
        a(f"--{name}", type=kind, help=f"jet.Config.{name}" + (", commas" * (kind is _names)))
    a("--remat", action=argparse.BooleanOptionalAction, help="recompute coupling activations "
      "in backprop, as big_vision does: less memory for one more forward pass")
    a("--dtype", choices=("float32", "bfloat16"), help="dtype of the ViT matmuls (default: "
      "bfloat16 on a GPU or TPU, float32 on a CPU, where bfloat16 is emulated): params, "
      "coupling arithmetic, log-det and loss stay float32 and the flow stays exactly "
      "invertible")
    a("--batch_size", type=int, help="global batch, split over all devices")
    a("--steps", type=int, help="training steps (overrides --epochs and --time_budget)")
    a("--epochs", type=float, help="training epochs (drop-remainder batches)")
    a("--time_budget", type=float, metavar="MINUTES", help="size the run to this wall time on "
      "this machine, counted from the command's start, compilation and evaluations included: "
      "the step count is set from timed steps before training, re-timed on a fixed cadence "
      "until near the end and stored, so a resumed run is exact")
    a("--lr", type=float, help=f"peak learning rate (default {RECIPE['lr']})")
    a("--warmup", type=float, help="fraction of steps of linear warmup before cosine decay")
    a("--weight_decay", type=float, help="big_vision's decoupled wd: p -= schedule * wd * p")
    a("--clip", type=float, help="global gradient-norm clipping threshold")
    a("--b1", type=float, help="Adam beta1")
    a("--b2", type=float, help="Adam beta2")
    a("--seed", type=int, help="seed of init, batch order and dequantization noise")
    a("--log_every", type=int, help="steps between log lines")
    a("--eval_every", type=int, help="steps between evaluations (and sample grids)")
    a("--ckpt_every", type=int, help="steps between checkpoints")
    a("--eval_batch_size", type=int, help="batch for evaluation (default --batch_size)")
    a("--conditional", action="store_true", default=None, help="learn p(x | label): every "
      "coupling reads the one-hot label through cross-attention (big_vision's context)")
    a("--label_dropout", type=float, help="conditional runs: probability that an example's "
      "label is replaced by the zero context, which trains the unconditional model alongside "
      "(default 0.1, as big_vision)")
    a("--classify_images", type=int, metavar="N", help="conditional runs: the last evaluation "
      "classifies the first N test images by likelihood, a pass per class (default: all, or "
      "what fits 15%% of a --time_budget)")
    a("--init_from", help="fine-tune: start from the params of this checkpoint or workdir")
    _add_command_flags(a)
    args = p.parse_args(argv)
    if args.sample < 0 or not all(math.isfinite(t) and t > 0 for t in args.temperature):
        raise ValueError(f"--sample must be >= 0 and every --temperature a positive number, "
                         f"got {args.sample} and {','.join(map(str, args.temperature))}.")
    return args


def _add_data_flags(a) -> None:
    """The images a run reads: the dataset, where it is, and how it is split."""
    a("--dataset", help="cifar10, mnist, fashion_mnist, imagenet32, imagenet64, npz:PATH or "
      "synthetic (default: the checkpoint's, else cifar10)")
    a("--data_dir", help=f"dataset cache / location (default {data.DEFAULT_DATA_DIR})")
    a("--data_url", help="download from this URL instead of the official one (a mirror)")
    a("--data_md5", help="expected md5 of a cifar10 archive you trust (e.g. a subset)")
    a("--validation", type=int, metavar="N", help="hold out N training images (the last N of a "
      "fixed permutation): evaluations during training report their bits/dim and choose the "
      "best checkpoint; the test set is evaluated once, at the end")
    a("--train_images", type=int, metavar="N", help="train on the first N training images "
      "left after --validation's hold-out, the rest unused: the small-data regime")


def refuse(message: str):
    """argparse's error handler: a ValueError, which train.main's callers can catch."""
    raise ValueError(message)


def _add_command_flags(a) -> None:
    """The flags that choose what train.py does, not the run's settings (ACTION_FLAGS)."""
    a("--sample", type=int, default=0, metavar="N",
      help="write a grid of N samples from the latest checkpoint and exit (conditional runs: "
      "N per class row, plus an unconditional row when trained with label dropout)")
    a("--labels", type=_ints, help="conditional --sample: the classes to draw, commas "
      "(default: every class when there are at most 20, else classes 0-9)")
    a("--temperature", type=floats, default=(1.0,), help="prior temperature T for samples; "
      "several, commas (e.g. 0.7,0.85,1.0), give one block of rows each")
    a("--eval_only", action="store_true", help="evaluate the latest checkpoint and exit")
    a("--export", metavar="DIR", help="write the latest checkpoint's model to DIR and exit: "
      "params and perms without optimizer state (DIR/checkpoint.npz, which --init_from, "
      "--sample, --eval_only and inside.py read), its metrics.jsonl and curve.svg, and "
      "DIR/check.npz, the first test images with their bits/dim under fixed noise")
    a("--distributed", action="store_true", help="call jax.distributed.initialize() first "
      "(multi-host; one process per host): with the three flags below, or without them where "
      "JAX detects the cluster (SLURM, Open MPI, Cloud TPU)")
    a("--coordinator_address", metavar="HOST:PORT", help="--distributed: process 0's host and "
      "a free port on it, the same for every process")
    a("--num_processes", type=int, help="--distributed: how many processes the run has")
    a("--process_id", type=int, help="--distributed: this process's number, 0 to "
      "--num_processes - 1; process 0 writes the workdir")
    a("--huge_pages", action=argparse.BooleanOptionalAction, default=True, help="on Linux and "
      "a CPU, restart once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 where that gives glibc's "
      "malloc transparent huge pages (~17%% faster); --no-huge_pages runs as started")


ACTION_FLAGS = ("workdir", "sample", "labels", "temperature", "eval_only", "export",
                "distributed",
                "coordinator_address", "num_processes", "process_id",
                "huge_pages")  # not settings


def check_label_flag(labels, num_classes: int | None) -> None:
    """--labels name classes of a conditional run's model."""
    if labels and not num_classes:
        raise ValueError("--labels needs a conditional run (trained with --conditional).")
    bad = [c for c in labels or () if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--labels {bad} out of range: this run has classes 0 .. "
                         f"{num_classes - 1}.")


# ------------------------------------------------------------------------------------------
# Resolution: flags, checkpoint, preset


def default_preset(dataset: str, platform: str) -> tuple[str, str]:
    """The preset a dataset gets without --preset on this platform, and a line saying why."""
    if dataset not in ACCELERATOR_PRESET:
        return "tiny", f"the default for --dataset {dataset}"
    if platform == "cpu":
        return CPU_PRESET[dataset], (
            f"no GPU or TPU was found, so the CPU-sized model; the paper-scale model is "
            f"--preset {ACCELERATOR_PRESET[dataset]} (it needs an accelerator)")
    return ACCELERATOR_PRESET[dataset], (
        f"a {platform.upper()} is present, so the paper-scale model; --preset "
        f"{CPU_PRESET[dataset]} is the one sized for a CPU")


def default_workdir(args, platform: str) -> str:
    """runs/<dataset>-<preset>[-conditional] (an npz file by its name): runs of different
    datasets, presets or kinds never share a workdir by default."""
    dataset = args.dataset or "cifar10"
    preset = args.preset or default_preset(dataset, platform)[0]
    if dataset.startswith("npz:"):
        dataset = "npz-" + os.path.splitext(os.path.basename(dataset[len("npz:"):]))[0]
    return os.path.join("runs", f"{dataset}-{preset}" + ("-conditional" if args.conditional
                                                            else ""))


def resolve(args, saved: dict | None, platform: str = "cpu") -> tuple[dict, str]:
    """Flags > the checkpoint's flags (when resuming) > preset > recipe defaults; and a line
    saying where the preset came from."""
    explicit = {k: v for k, v in vars(args).items() if v is not None and k not in ACTION_FLAGS}
    if saved is not None:
        base, why = dict(saved), "kept from the checkpoint being resumed"
    else:
        dataset = explicit.get("dataset", "cifar10")
        preset, why = explicit.get("preset"), "chosen with --preset"
        if preset is None:
            preset, why = default_preset(dataset, platform)
        base = RECIPE | dict(preset=preset, dataset=dataset) | PRESETS[preset]
        if {"steps", "epochs", "time_budget"} & set(explicit):
            for name in ("steps", "epochs", "time_budget"):
                base.pop(name, None)
    flags = base | explicit
    if saved is None:
        flags.setdefault("eval_batch_size", flags["batch_size"])
        # float32 matmuls at full precision are several times slower than bfloat16 on GPUs and
        # TPUs; the flow stays exactly invertible in bfloat16 mode (jet.forward).
        flags.setdefault("dtype", "float32" if platform == "cpu" else "bfloat16")
        if flags.get("conditional"):
            flags.setdefault("label_dropout", 0.1)
        elif "label_dropout" in flags:
            raise ValueError("--label_dropout applies to --conditional runs only; add "
                             "--conditional or drop it.")
    validate(flags)
    return flags, why


def settings(args, meta: dict | None, platform: str) -> tuple[dict, jet.Config]:
    """The run's flags and jet.Config, checked before any data is read: a resumed run's
    against its checkpoint (check_same_run), a new run's built for the dataset's image shape
    (a conditional npz dataset's class count is only known once its labels are read). Says
    which preset was chosen, and why."""
    f, why = resolve(args, meta and meta["flags"], platform)
    if meta:
        cfg = check_same_run(args, meta, f)
    else:
        K = data.NUM_CLASSES.get(f["dataset"], 2) if f.get("conditional") else None
        cfg = make_config(f, data.image_shape(f["dataset"]), K)
    if not (args.sample or args.eval_only or args.export):
        length = (f"sized to {f['time_budget']:g} minutes of wall time on this machine"
                  if f.get("time_budget") and "steps" not in f else
                  "the time it needs is printed after its first steps")
        print(f"Preset {f['preset']!r}: {why}; {length}.", flush=True)
    return f, cfg


def check_same_run(args, meta: dict, f: dict) -> jet.Config:
    """The checkpoint's Config, after checking that this command asks for the same run: the
    same model and the same RECIPE_FLAGS (dataset and preset among them)."""
    cfg = jet.Config(**meta["config"])
    asked = jet.Config(**{**meta["config"], **{
        k: v for k, v in vars(args).items() if k in MODEL_FLAGS and v is not None}})
    changed = {k: (meta["flags"].get(k), f.get(k)) for k in RECIPE_FLAGS
               if meta["flags"].get(k) != f.get(k)}
    if asked != cfg or changed:
        what = (f"{changed} (the checkpoint's value, then this command's)" if changed else
                f"the model to {asked}")
        raise ValueError(f"{args.workdir} holds a run of {cfg} with flags {meta['flags']}; this "
                         f"command changes {what}. Resume with the same flags, use a new "
                         "--workdir, or start a new run from it with --init_from.")
    return cfg


def validate(f: dict) -> None:
    """Every numeric setting in its range, or a ValueError naming the flag."""
    def check(name, ok, what):
        value = f.get(name)
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)
                                      and ok(value)):
            raise ValueError(f"--{name} must be {what}, got {value!r}.")
    for name in ("steps", "batch_size", "eval_batch_size", "log_every", "eval_every",
                 "ckpt_every", "validation", "train_images", "depth", "patch_size",
                 "block_depth", "emb_dim", "num_heads", "mlp_dim", "classify_images"):
        check(name, lambda v: v == int(v) and v >= 1, "a positive integer")
    for name in ("epochs", "time_budget", "clip", "scale_factor"):
        check(name, lambda v: v > 0, "a positive number")
    check("lr", lambda v: v >= 0, "a number >= 0")
    check("weight_decay", lambda v: v >= 0, "a number >= 0")
    for name in ("warmup", "b1", "b2", "label_dropout"):
        check(name, lambda v: 0 <= v < 1, "in [0, 1)")
    md5 = f.get("data_md5")
    if md5 is not None and not re.fullmatch(r"[0-9a-fA-F]{32}", md5):
        raise ValueError(f"--data_md5 must be an md5 checksum (32 hex digits), got {md5!r}.")


def compute_dtype(f: dict):
    """The --dtype flag as jet's compute_dtype (None: the parameters' dtype)."""
    return {"float32": None, "bfloat16": jnp.bfloat16}[f.get("dtype") or "float32"]


# ------------------------------------------------------------------------------------------
# The model a preset describes


def make_config(flags: dict, image_shape, context_dim: int | None = None) -> jet.Config:
    """The jet.Config that these settings describe: each model flag from `flags`, else from the
    preset flags["preset"]; command-line strings ("12", "channels,spatial") are parsed."""
    values = {"context_dim": context_dim} if context_dim else {}
    for name, kind in CONFIG_FLAG_TYPES.items():
        value = flags.get(name, PRESETS[flags["preset"]].get(name))
        if value is not None:
            values[name] = kind(value) if isinstance(value, str) else value
    return jet.Config(image_shape=tuple(image_shape), **values)


def preset_settings(preset: str, overrides: dict, image_shape) -> tuple[jet.Config, dict]:
    """(jet.Config, flags) of a preset with overrides: recipe < preset < overrides (bench.py)."""
    flags = RECIPE | {"preset": preset} | PRESETS[preset] | overrides
    return make_config(flags, image_shape), flags
