"""Speed of Jet on this machine: training, evaluation and sampling throughput, compile time,
memory, and model FLOP utilisation against the measured matmul peak.

  python bench.py --preset tiny                     # CPU
  python bench.py --preset cifar10 --dtype bfloat16 # an accelerator
  python bench.py --patch_size 4 --depth 8 --emb_dim 128 --num_heads 4 --batch_size 64 --json

Times train.py's own jitted step (dequantize, forward, bits/dim, gradient, optimizer update),
evaluation (forward + bits/dim) and sampling (one inverse pass) on random uint8 images of the
preset's image shape, each after one compiling call. Model FLOPs count matmuls only; a
training step counts 3x the forward (remat's recomputation is real work but not counted, as is
usual for utilisation figures).
"""

import argparse
import dataclasses
import functools
import itertools
import json
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import data
import jet
import presets
import timing
import train
import variants

def image_shape(preset: str) -> tuple[int, int, int]:
    """The image shape of the dataset a preset is for: its own name's, else that of the dataset
    whose CPU preset it is, else CIFAR-10's (tiny)."""
    dataset = preset if preset in data.IMAGE_SHAPES else next(
        (d for d, p in presets.CPU_PRESET.items() if p == preset), "cifar10")
    return data.image_shape(dataset)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(presets.PRESETS),
                   help="model and batch size of this train.py preset")
    p.add_argument("--image_shape", type=lambda s: tuple(int(v) for v in s.split(",")),
                   help="H,W,C (default: the preset's dataset shape)")
    for name, kind in presets.CONFIG_FLAG_TYPES.items():
        p.add_argument(f"--{name}", type=kind, help=f"override jet.Config.{name}")
    p.add_argument("--batch_size", type=int, help="override the preset's batch size")
    p.add_argument("--steps", type=int, default=10, help="timed calls of each kind")
    p.add_argument("--remat", action=argparse.BooleanOptionalAction,
                   help="time only this remat setting (default: both)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the ViT matmuls (train.py --dtype)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.error = presets.refuse
    args = p.parse_args(argv)
    for name in ("batch_size", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be a positive integer, got {getattr(args, name)}.")
    return args


def timed(fn, *args, steps: int) -> tuple[float, float]:
    """(seconds of the first call, which compiles; median seconds of the next `steps` calls)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times))


def matmul_peak(dtype) -> float:
    """Measured FLOP/s of a large square matmul on the default device: the practical peak."""
    n = 2048 if jax.default_backend() == "cpu" else 8192
    a = jnp.ones((n, n), dtype)
    mm = jax.jit(lambda a: jnp.dot(a, a, precision=jax.lax.Precision.HIGHEST))
    _, seconds = timed(mm, a, steps=5)
    return 2 * n ** 3 / seconds


def peak_memory_bytes() -> dict:
    """Peak host RSS of this process, and the device's peak if its backend reports one."""
    out = {"host_rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["device_peak"] = stats["peak_bytes_in_use"]
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    overrides = {k: getattr(args, k) for k in presets.CONFIG_FLAG_TYPES
                 if getattr(args, k) is not None}
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    cfg, flags = presets.preset_settings(args.preset, overrides | {"steps": 1000},
                                         args.image_shape or image_shape(args.preset))
    batch, dtype = flags["batch_size"], presets.compute_dtype({"dtype": args.dtype})
    params, perms = jax.jit(jet.init)(jax.random.key(0), cfg)
    images = jax.device_put(
        np.random.default_rng(0).integers(0, 256, (batch, *cfg.image_shape), np.uint8))
    result = {"config": dataclasses.asdict(cfg), "batch": batch, "dtype": args.dtype,
              "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
              "params": sum(x.size for x in jax.tree.leaves(params)),
              "gflop_per_image_forward": timing.forward_flops(cfg) / 1e9,
              "gflop_per_image_train": 3 * timing.forward_flops(cfg) / 1e9}
    peak = {"float32": matmul_peak(jnp.float32)}
    if jax.default_backend() != "cpu":  # bf16 matmuls are emulated on most CPUs
        peak["bfloat16"] = matmul_peak(jnp.bfloat16)
    result["matmul_peak_tflops"] = {k: v / 1e12 for k, v in peak.items()}
    peak_flops = peak["bfloat16" if args.dtype == "bfloat16" and "bfloat16" in peak
                      else "float32"]
    for remat in ([args.remat] if args.remat is not None else [True, False]):
        result[f"train_remat_{'on' if remat else 'off'}"] = time_training(
            cfg, flags | {"remat": remat, "dtype": args.dtype}, (params, perms), images,
            args.steps, peak_flops)
    result |= time_inference(cfg, params, perms, images, dtype, args.steps)
    result["memory_bytes"] = peak_memory_bytes()
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print_report(result, args, overrides)
    return result


def stepping(step_fn, state, images):
    """train.py's step (step_fn) as a call of no arguments for `timed`, which threads the
    donated state through the calls, one step number after another."""
    count, noise = itertools.count(), jax.random.key(1)

    def step():
        nonlocal state
        state, out = step_fn(state, images, next(count), noise)
        return out
    return step


def time_training(cfg, flags, model, images, steps, peak_flops) -> dict:
    """train.py's jitted step: compile time, img/s and the fraction of the matmul peak."""
    step_fn = train.make_train_step(cfg, flags)
    state = train.new_state(*jax.tree.map(jnp.copy, model), train.make_optimizer(flags))
    compile_s, seconds = timed(stepping(step_fn, state, images), steps=steps)
    batch = images.shape[0]
    return {"compile_s": compile_s, "img_per_s": batch / seconds,
            "utilisation": 3 * timing.forward_flops(cfg) * batch / seconds / peak_flops}


def time_variant_step(v: variants.Variant, flags: dict, image_shape, steps: int = 20) -> dict:
    """One of ablate.py's variants' training step (train.py flags `flags`, no remat):
    parameters, forward GFLOP per image, median ms per step over `steps` steps after 3 warm-up
    calls (the first compiles; the next ones still allocate), and XLA's memory for the
    compiled step (arguments, outputs and temporaries: its peak, on any machine of this
    kind)."""
    cfg = presets.make_config(flags, image_shape)
    model = variants.make_model(v)
    params, perms = model["init"](jax.random.key(0), cfg)
    f = presets.RECIPE | flags | {"steps": 1000, "remat": False}
    step_fn = train.make_train_step(cfg, f, model["forward"])
    state = train.new_state(params, perms, train.make_optimizer(f))
    images = np.random.default_rng(0).integers(0, 256, (int(flags["batch_size"]),
                                                        *image_shape), np.uint8)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    memory = step_fn.lower(state, images, 0, jax.random.key(1)).compile().memory_analysis()
    step = stepping(step_fn, state, images)
    jax.block_until_ready((step(), step()))  # 2 warm-up calls (the first compiles): 3 with timed's
    _, seconds = timed(step, steps=steps)
    peak = float("nan") if memory is None else (
        memory.argument_size_in_bytes + memory.output_size_in_bytes
        + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    return {"params": n_params, "gflop_per_image": variants.forward_flops(cfg, v) * 1e-9,
            "ms_per_step": 1e3 * seconds, "memory_mb": peak / 2 ** 20}


def time_inference(cfg, params, perms, images, dtype, steps) -> dict:
    """Evaluation (forward + bits/dim) and sampling (one inverse pass) img/s."""
    noise, batch = jax.random.key(1), images.shape[0]
    x = jet.dequantize(noise, images)
    evaluate = jax.jit(lambda p, x: jet.bits_per_dim(*jet.forward(p, perms, x, cfg,
                                                                  compute_dtype=dtype)))
    _, eval_s = timed(evaluate, params, x, steps=steps)
    sample = functools.partial(train.sample_jit, n=batch, compute_dtype=dtype)
    _, sample_s = timed(lambda p: sample(p, perms, noise, cfg=cfg), params, steps=steps)
    return {"eval_img_per_s": batch / eval_s, "sample_img_per_s": batch / sample_s}


def print_report(result: dict, args, overrides: dict) -> None:
    overrides = {k: v for k, v in overrides.items() if k != "batch_size"}
    name = f"{args.preset} preset with {overrides}" if overrides else f"{args.preset} preset"
    print(f"{name}: batch {result['batch']}, {args.dtype} matmuls, {result['device']}, "
          f"{result['params']:,} params, {result['gflop_per_image_forward']:.3f} GFLOP/image "
          f"forward ({result['gflop_per_image_train']:.3f} per training image)")
    print("matmul peak: " + ", ".join(f"{k} {v:.3f} TFLOP/s"
                                      for k, v in result["matmul_peak_tflops"].items()))
    for key in ("train_remat_on", "train_remat_off"):
        if key in result:
            r = result[key]
            print(f"{key}: {r['img_per_s']:.1f} img/s, {100 * r['utilisation']:.1f}% of the "
                  f"matmul peak, compile {r['compile_s']:.1f} s")
    print(f"evaluation: {result['eval_img_per_s']:.1f} img/s | sampling: "
          f"{result['sample_img_per_s']:.1f} img/s | peak memory: " + ", ".join(
              f"{k} {v / 2 ** 30:.2f} GiB" for k, v in result["memory_bytes"].items()),
          flush=True)


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # a bad setting: one line, no traceback
        sys.exit(f"bench.py: error: {e}")
