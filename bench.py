"""Training throughput of Jet: images/s, FLOP/s and the fraction of a given peak.

  python bench.py --preset tiny                       # CPU
  python bench.py --preset imagenet64 --batch_size 256 --peak_tflops 989  # e.g. one H100 (bf16 dense)

Times train.py's own jitted step (forward + backward + optimizer) on random uint8 images of the
preset's dataset shape, after one compiling step, and prints one summary line per run.
"""

import argparse
import time

import jax
import numpy as np

import jet
import train

SHAPES = {"tiny": (32, 32, 3), "cifar10": (32, 32, 3), "imagenet32": (32, 32, 3),
          "imagenet64": (64, 64, 3), "fashion_mnist": (28, 28, 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(train.PRESETS),
                   help="model and batch size of this train.py preset")
    p.add_argument("--batch_size", type=int, help="override the preset's batch size")
    p.add_argument("--steps", type=int, default=10, help="timed steps after the compiling one")
    p.add_argument("--remat", action=argparse.BooleanOptionalAction,
                   help="override the preset's remat")
    p.add_argument("--peak_tflops", type=float,
                   help="the machine's peak TFLOP/s, to print the fraction reached")
    args = p.parse_args(argv)

    preset = train.PRESETS[args.preset]
    flags = train.RECIPE | preset | {"steps": 1000}
    batch = args.batch_size or preset["batch_size"]
    remat = preset["remat"] if args.remat is None else args.remat
    cfg = jet.Config(image_shape=SHAPES[args.preset],
                     **{k: v for k, v in preset.items() if k in train.MODEL_FLAGS})
    tx = train.make_optimizer(flags)
    params, perms = jax.jit(jet.init, static_argnums=1)(jax.random.key(0), cfg)
    state = {"params": params, "perms": perms, "opt_state": tx.init(params)}
    step_fn = train.make_train_step(cfg, tx, remat)
    images = np.random.default_rng(0).integers(0, 256, (batch, *cfg.image_shape), np.uint8)
    images = jax.device_put(images)
    noise = jax.random.key(1)

    t0 = time.perf_counter()
    state, out = step_fn(state, images, 0, noise)
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        state, out = step_fn(state, images, step, noise)
    jax.block_until_ready((state, out))
    seconds = (time.perf_counter() - t0) / args.steps

    # Model FLOPs: forward + backward (about twice the forward). Remat's recomputation is
    # real work but not counted, as is usual for utilisation figures.
    flops = train.forward_flops(cfg) * 3 * batch
    result = {"preset": args.preset, "batch": batch, "remat": remat,
              "devices": f"{jax.device_count()} {jax.devices()[0].device_kind}",
              "params": train.num_params(params), "compile_s": compile_s,
              "step_s": seconds, "img_per_s": batch / seconds,
              "tflops": flops / seconds / 1e12}
    line = (f"{args.preset}: batch {batch}, remat {remat}, {result['devices']}, "
            f"{result['params']:,} params | compile {compile_s:.1f} s | {seconds * 1e3:.1f} ms/step"
            f" | {result['img_per_s']:.1f} img/s | {result['tflops'] * 1e3:.1f} model GFLOP/s")
    if args.peak_tflops:
        result["fraction_of_peak"] = result["tflops"] / args.peak_tflops
        line += f" | {100 * result['fraction_of_peak']:.1f}% of {args.peak_tflops:g} TFLOP/s"
    print(line, flush=True)
    return result


if __name__ == "__main__":
    main()
