"""Why Jet looks the way it does: the paper's design findings, checked on a CPU across compute.

Each experiment trains variants of a fixed model (ABLATION_BASE: train.py's `cpu` preset as it
was when the study began) for an equal number of training FLOPs (computed from each variant's
configuration: 3x the forward pass's matmul and convolution FLOPs per image), at each of
several budgets, with 2 seeds (a third where two rows are too close to call), and reports a
markdown table and an SVG picture (test bits/dim against training FLOPs) per experiment.

  python ablate.py --list
  python ablate.py [--experiment NAME] [--budgets 1,4,16] [--costs]   # runs, then the report
  python ablate.py --report          # seconds: every table and picture, from the results alone
  python ablate.py --quick           # seconds: the whole path, tiny models, synthetic data
  python ablate.py --where_bits RUN  # a trained run's bits/dim: exact zeros against the rest

Training, data and evaluation are train.py's (train.main with a `model`); the flows Jet leaves
out are in variants.py. Each finished run is one line of docs/ablations/results.jsonl (commit
it as the study goes); a run already there (same variant flags, seed, budget, dataset, and a
digest of its images) is read back instead of trained again, so an interrupted study resumes
where it stopped, on this machine or another, and experiments share their common baseline.
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time

import jax
import numpy as np

import bits
import checkpoints
import data
import jet
import pictures
import presets
import timing
import train
from variants import Variant, forward_flops, make_model


# ------------------------------------------------------------------------------------------
# Experiments: one per claim of the paper, each at the budgets that answer it

BUDGETS = (1.0, 4.0, 16.0)  # training TFLOP a run: about 0.12, 0.5 and 2 epochs of the base
QUICK_BUDGETS = (2e-5, 8e-5)  # --quick: a few steps of its tiny models
BASE = Variant("base: 24 couplings x 1 ViT block, width 32, P=4")
# name: (claim, "all" budgets or the "middle" one, variants: the first is what the rest face)
EXPERIMENTS = {
    "coupling_net": ("ViT coupling networks beat CNN ones", "all", (
        BASE,
        Variant("CNN, 1 residual block, FLOPs of the ViT", net="cnn"),
        Variant("CNN, 2 residual blocks, FLOPs of the ViT", net="cnn", cnn_blocks=2))),
    "depth_tradeoff": ("at fixed compute, many couplings of depth-1 ViTs are unfavourable", "all", (
        BASE,
        Variant("48 couplings x 1 block", (("depth", 48),)),
        Variant("24 couplings x 2 blocks", (("block_depth", 2),)),
        Variant("12 couplings x 4 blocks", (("depth", 12), ("block_depth", 4))),
        Variant("12 couplings x 2 blocks", (("depth", 12), ("block_depth", 2))))),
    "coupling_kinds": ("mixing channel and spatial couplings beats one kind alone", "middle", (
        BASE,
        Variant("channel couplings only", (("kinds", "channels"),)),
        Variant("spatial couplings only, all six patterns",
                (("kinds", "spatial"), ("spatial_projs", jet.SPATIAL_PROJS))),
        Variant("official mix: 4 channel : 1 spatial, all six patterns",
                (("kinds", presets.OFFICIAL_KINDS), ("spatial_projs", jet.SPATIAL_PROJS))))),
    "removed_components": ("ActNorm and invertible dense layers bring Jet no gain", "all", (
        BASE,
        Variant("+ ActNorm before each coupling", actnorm=True),
        Variant("+ invertible dense before each coupling", dense=True),
        Variant("+ both", actnorm=True, dense=True))),
    "patch_size": ("patch size sets the token count, hence the cost of every ViT", "middle", (
        BASE,
        Variant("P=8: 16 tokens of 192 dims", (("patch_size", 8),)),
        Variant("P=2: 256 tokens of 12 dims (the paper's token count)",
                (("patch_size", 2),)))),
    "multiscale": ("multiscale factoring brings Jet no gain", "all", (
        BASE,
        Variant("+ factor out half of each token's dims after 12 couplings, standard normal "
                "(Real NVP)", multiscale="normal"),
        Variant("+ the same with Glow's split2d prior", multiscale="split2d"))),
}
# The cost table's extra row: the ViT on the variants' plain scan, beside jet.forward's path.
PLAIN_VIT = Variant("base on the plain path (variants.flow_forward)", plain=True)
# --quick: a seconds-long smoke run of the whole path on train.py's synthetic 16x16 images.
QUICK = dict(emb_dim=8, num_heads=2, batch_size=8, eval_batch_size=128, log_every=1)


# The model every experiment varies, spelled out so that docs/ablations.md stays reproducible
# whatever the `cpu` preset becomes: that preset before its re-tune (2:1 kinds, lr 1e-3).
ABLATION_BASE = {"preset": "cpu", "patch_size": 4, "depth": 24, "block_depth": 1, "emb_dim": 32,
                 "num_heads": 2, "batch_size": 64, "kinds": "channels,channels,spatial",
                 "spatial_projs": "checkerboard,checkerboard-inv", "lr": 1e-3}


def run_flags(v: Variant, quick: bool) -> dict:
    flags = ABLATION_BASE | dict(v.flags)
    if quick:
        flags |= QUICK | {"depth": max(1, int(flags.get("depth", 24)) // 6),
                          "patch_size": min(int(flags.get("patch_size", 4)), 8)}
    return flags


def experiment_budgets(when: str, budgets: tuple) -> tuple:
    """The budgets an experiment runs at: all of them, or the middle one."""
    return tuple(budgets) if when == "all" else (sorted(budgets)[len(budgets) // 2],)


# ------------------------------------------------------------------------------------------
# Running: each (variant, seed, budget) is one train.py run of budget / (FLOPs x batch) steps

def run_key(v: Variant, seed: int, budget: float, args, digest: str) -> dict:
    """What determines a run's result (not its name), `digest` that of the images
    (data.digest): runs with equal keys are shared. Fields a variant leaves at their defaults
    (multiscale, plain) are left out, so the runs of other variants keep their ids."""
    key = {"flags": run_flags(v, args.quick), "net": v.net, "cnn_blocks": v.cnn_blocks,
           "actnorm": v.actnorm, "dense": v.dense, "seed": seed, "budget": budget,
           "dataset": args.dataset, "data": digest, "quick": args.quick}
    if v.multiscale:
        key |= {"multiscale": v.multiscale, "factor_after": v.factor_after}
    if v.plain:
        key |= {"plain": True}
    return json.loads(json.dumps(key))  # as read back from results.jsonl (tuples as lists)


def read_results(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_variant(v: Variant, seed: int, budget: float | None, args, image_shape, digest: str,
                regime: dict | None = None) -> dict:
    """Trains one (variant, seed, budget) with train.main, or returns its stored result.
    regime: train.py flags of a data regime, part of the run's key (see REGIME_FIELDS): a
    small training set (scarce_regime: budget None, its epochs instead; the test figure is the
    best held-out checkpoint's), other images (pretraining: "dataset", and "data", their
    digest), or a start from another run's params ("init_from": that run's id)."""
    regime = regime or {}
    key = run_key(v, seed, budget, args, digest) | regime
    run_id = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    done = next((r for r in read_results(args.results) if r.get("id") == run_id), None)
    if done:
        return done
    flags = run_flags(v, args.quick)
    cfg = presets.make_config(flags, image_shape)
    flops = 3 * forward_flops(cfg, v)  # training step ~ forward + backward (2x forward)
    batch = int(flags["batch_size"])
    per_epoch = None  # a held-out regime's steps per epoch
    if budget:
        steps = every = max(2, round(budget * 1e12 / (flops * batch)))
    else:
        per_epoch = data.steps_per_epoch(regime["train_images"], batch)
        steps, every = regime["epochs"] * per_epoch, regime["eval_epochs"] * per_epoch
    workdir = os.path.join(args.workdir, "runs", run_id)
    argv = [f"--{k}={','.join(x) if isinstance(x, tuple) else x}" for k, x in flags.items()]
    argv += [f"--dataset={regime.get('dataset', args.dataset)}", f"--seed={seed}",
             f"--steps={steps}", f"--eval_every={every}", f"--ckpt_every={max(1, steps // 5)}",
             f"--log_every={flags.get('log_every', max(1, steps // 10))}",
             f"--workdir={workdir}"]
    argv += [f"--{k}={regime[k]}" for k in ("train_images", "validation") if k in regime]
    if "init_from" in regime:
        argv.append(f"--init_from={os.path.join(args.workdir, 'runs', regime['init_from'])}")
    argv += [f"--{k}={getattr(args, k)}" for k in ("data_dir", "data_md5")
             if getattr(args, k) and "dataset" not in regime]
    length = f"{budget:g} TFLOP" if budget else f"{regime['epochs']} epochs"
    print(f"\n=== {v.name} | seed {seed} | {length}: {steps} steps of {batch} | "
          f"{flops * 1e-9:.3f} GFLOP per training image | {regime or ''} | {workdir}",
          flush=True)
    model = make_model(v)
    start = time.time()
    out = train.main(argv, model)
    if "validation" in regime:
        out = held_out_result(workdir, out, model, per_epoch)
    wall = time.time() - start
    params = jax.eval_shape(lambda: model["init"](jax.random.key(0), cfg)[0])
    record = {"id": run_id, "variant": v.name, "seed": seed,
              "params": sum(x.size for x in jax.tree.leaves(params)),
              "train_gflop_per_image": flops * 1e-9, "steps": steps, "batch_size": batch,
              "train_tflop": flops * steps * batch * 1e-12, "wall_s": wall,
              "test_bpd": out["test_bpd"], "train_eval_bpd": out["train_eval_bpd"],
              **{k: out[k] for k in ("last_test_bpd", "best_epoch", "curve") if k in out},
              **key}
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "a") as f:  # one line a run, so a killed study loses one run
        f.write(json.dumps(record) + "\n")
    return record


def held_out_result(workdir: str, out: dict, model: dict, per_epoch: int) -> dict:
    """A run with a held-out set, judged as early stopping would: its best held-out
    checkpoint's test bits/dim (train.py --eval_only on a copy in <workdir>/best), the epoch
    of that best, and the learning curve [(epoch, held-out bpd, training-slice bpd)]."""
    best = os.path.join(workdir, "best")
    os.makedirs(best, exist_ok=True)
    shutil.copyfile(os.path.join(workdir, "checkpoint_best.npz"),
                    os.path.join(best, "checkpoint.npz"))
    evaluated = train.main(["--eval_only", f"--workdir={best}"], model)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        curve = [(r["step"] / per_epoch, r["validation_bpd"], r["train_eval_bpd"])
                 for line in f if "validation_bpd" in (r := json.loads(line))]
    return out | {"test_bpd": evaluated["test_bpd"], "last_test_bpd": out["test_bpd"],
                  "best_epoch": evaluated["step"] / per_epoch, "curve": curve}


def close_call(first: list[dict], runs: list[dict]) -> bool:
    """A gap between two rows' means within twice the larger seed spread: too close to call
    on their seeds, so both get one more."""
    a, b = [r["test_bpd"] for r in first], [r["test_bpd"] for r in runs]
    spread = max(max(a) - min(a), max(b) - min(b))
    return abs(np.mean(a) - np.mean(b)) <= 2 * spread


def run_study(names: list[str], args, image_shape, digest: str) -> None:
    """Every run of the experiments `names`, the smallest budget first (so the pictures fill
    in across compute as the study goes); a third seed where a row is a close call."""
    def run(v, seed, budget):
        return run_variant(v, seed, budget, args, image_shape, digest)
    for budget in sorted(args.budgets):
        for name in names:
            claim, when, variants = EXPERIMENTS[name]
            if budget not in experiment_budgets(when, args.budgets):
                continue
            runs = [[run(v, seed, budget) for seed in range(args.seeds)] for v in variants]
            for v, rows in zip(variants[1:], runs[1:]):
                if args.seeds >= 2 and close_call(runs[0], rows):
                    run(variants[0], args.seeds, budget)
                    run(v, args.seeds, budget)


# ------------------------------------------------------------------------------------------
# Scarce data (the paper's named weak point: overfitting) and its cure: pretraining on more
# images, then fine-tuning

SCARCE_VARIANTS = (BASE, *EXPERIMENTS["removed_components"][2][1:3],
                   EXPERIMENTS["coupling_net"][2][1])  # + ActNorm, + dense, the one-block CNN
# The first 2,000 training images left after a fixed held-out 5,000 (data.validation_split);
# evaluated every eval_epochs. A 120-epoch pilot of the base never turned up (held-out 4.3209
# at the end, its best; gap 0.0145; test 4.3208), so 60 epochs: what fits the 8-hour study.
SCARCE = {"train_images": 2000, "validation": 5000, "epochs": 60, "eval_epochs": 4}
QUICK_SCARCE = {"train_images": 64, "validation": 128, "epochs": 6, "eval_epochs": 2}
PRETRAIN_TFLOP = 32.0  # the base on Tiny ImageNet at 32x32: ~1.9 epochs of its 100,000 images
QUICK_PRETRAIN_TFLOP = 1e-4
PRETRAIN_DATA = "npz:~/.cache/jet-data/tiny-imagenet-32.npz"  # see docs/ablations.md, "Data"
JPEG_DATA = "npz:~/.cache/jet-data/cifar10-jpeg.npz"  # the JPEG-decoded copy of CIFAR-10
SCARCE_CLAIM = ("Jet overfits small datasets; a removed component, or a CNN's locality, may "
                "help there")
TRANSFER_CLAIM = ("pretraining on more images is the cure for scarce data (the paper's 3.02 "
                  "on CIFAR-10 comes from ImageNet-21k)")
EXTRA_STUDIES = {"scarce_data": SCARCE_CLAIM, "transfer": TRANSFER_CLAIM}


def scarce_regime(args) -> dict:
    return dict(QUICK_SCARCE if args.quick else SCARCE)


def pretrain_regime(records: list[dict], args) -> dict:
    """The pretraining run's data: --pretrain_data and its images' digest (from the stored
    runs, so that --report needs no data; else from the images)."""
    stored = {r["data"] for r in records if is_run(r) and r["dataset"] == args.pretrain_data}
    if len(stored) > 1:
        raise ValueError(f"{args.results} holds pretraining runs on {len(stored)} image sets "
                         f"of {args.pretrain_data}; keep one set's lines.")
    digest = stored.pop() if stored else data.digest(data.load(args.pretrain_data))
    return {"dataset": args.pretrain_data, "data": digest}


def transfer_runs(records: list[dict], args, image_shape, digest: str,
                  run_missing: bool = True) -> dict:
    """The transfer experiment's runs by row: the base pretrained on --pretrain_data, then
    from scratch and fine-tuned from it (--init_from) on the scarce set and on the whole
    training set (at the largest budget). run_missing False: only look them up."""
    def get(budget, regime, seeds=range(args.seeds)) -> list[dict]:
        if run_missing:
            return [run_variant(BASE, s, budget, args, image_shape, digest, regime) for s in seeds]
        return [r for r in stored_runs(records, BASE, budget, args, digest, regime)
                if r["seed"] in seeds]
    pre = get(QUICK_PRETRAIN_TFLOP if args.quick else PRETRAIN_TFLOP,
              pretrain_regime(records, args), seeds=[0])
    rows = {"pretrained": pre}
    for name, budget, regime in (("2000", None, scarce_regime(args)),
                                 ("all", max(args.budgets), {})):
        rows[f"scratch {name}"] = get(budget, regime)
        rows[f"tuned {name}"] = get(budget, regime | {"init_from": pre[0]["id"]}) if pre else []
    return rows


def evaluate_on(run: dict, args, name: str, images: np.ndarray) -> dict:
    """A stored eval record: run's checkpoint (the best held-out one where it has one) on
    `images`, the dataset `name`, with fixed noise, so two image sets compare pair by pair."""
    done = next((r for r in read_results(args.results) if r.get("kind") == "eval"
                 and r["run"] == run["id"] and r["images"] == name), None)
    if done:
        return done
    path = os.path.join(args.workdir, "runs", run["id"], "best" if "curve" in run else "")
    state, cfg, meta = checkpoints.read_run(path)
    evaluate = train.make_evaluate(
        train.make_batch_stats(cfg, meta["flags"], jet.forward), images,
        np.zeros(len(images), np.int64), meta["flags"]["eval_batch_size"], jax.numpy.asarray)
    record = {"kind": "eval", "run": run["id"], "images": name,
              "data": data.digest({"test": images}),
              "bpd": evaluate(state, jax.random.key(0))["bpd"]}
    with open(args.results, "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def run_scarce(args, image_shape, digest: str) -> None:
    """Each variant of the scarce-data table on the scarce set (a third seed on close calls)."""
    def run(v, seed):
        return run_variant(v, seed, None, args, image_shape, digest, scarce_regime(args))
    runs = [[run(v, seed) for seed in range(args.seeds)] for v in SCARCE_VARIANTS]
    for v, rows in zip(SCARCE_VARIANTS[1:], runs[1:]):
        if args.seeds >= 2 and close_call(runs[0], rows):
            run(SCARCE_VARIANTS[0], args.seeds)
            run(v, args.seeds)


def run_transfer(args, image_shape, digest: str, test: np.ndarray) -> None:
    """Every run of the transfer table, then each one's bits/dim on the test images of
    --dataset (`test`) and of --jpeg_data (the JPEG-decoded copy), pair by pair."""
    rows = transfer_runs([], args, image_shape, digest)
    tests = {args.dataset: test, args.jpeg_data: data.load(args.jpeg_data)["test"]}
    for runs in rows.values():
        for run in runs:
            for name, images in tests.items():
                evaluate_on(run, args, name, images)


# ------------------------------------------------------------------------------------------
# Cost: parameters, FLOPs, time and memory of one training step, measured on this machine

def measure_cost(v: Variant, args, image_shape, steps: int = 20) -> dict:
    """One variant's training step at its batch: parameters, forward GFLOP per image, median
    ms per step over `steps` steps after 3 warm-up calls (the first compiles; the next ones
    still allocate), and XLA's memory for the compiled step
    (arguments, outputs and temporaries: the step's peak, on any machine of this kind)."""
    flags = run_flags(v, args.quick)
    cfg = presets.make_config(flags, image_shape)
    model = make_model(v)
    params, perms = model["init"](jax.random.key(0), cfg)
    f = presets.RECIPE | flags | {"steps": 1000, "remat": False}
    step_fn = train.make_train_step(cfg, f, model["forward"])
    state = train.new_state(params, perms, train.make_optimizer(f))
    batch = int(flags["batch_size"])
    images = np.random.default_rng(0).integers(0, 256, (batch, *image_shape), np.uint8)
    key = jax.random.key(0)
    memory = step_fn.lower(state, images, 0, key).compile().memory_analysis()
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        state, metrics = step_fn(state, images, i, key)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    peak = math.nan if memory is None else (
        memory.argument_size_in_bytes + memory.output_size_in_bytes
        + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    return {"kind": "cost", "variant": v.name, "plain": v.plain, "batch_size": batch,
            "params": sum(x.size for x in jax.tree.leaves(params)),
            "gflop_per_image": forward_flops(cfg, v) * 1e-9,
            "ms_per_step": 1e3 * float(np.median(times[3:])), "memory_mb": peak / 2 ** 20,
            "key": run_key(v, 0, 0.0, args, "")}


def measure_costs(names: list[str], args, image_shape) -> None:
    """Each variant of the experiments once (and the ViT on the plain path), appended to the
    results file as "cost" records; variants already measured are skipped."""
    seen = {json.dumps(r["key"], sort_keys=True) for r in read_results(args.results)
            if r.get("kind") == "cost"}
    variants = [v for name in names if name in EXPERIMENTS
                for v in EXPERIMENTS[name][2]] + [PLAIN_VIT]
    for v in variants:
        key = json.dumps(run_key(v, 0, 0.0, args, ""), sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        record = measure_cost(v, args, image_shape)
        print(f"{v.name}: {record['ms_per_step']:.1f} ms/step, {record['memory_mb']:.0f} MB",
              flush=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------
# The report: tables and pictures from the results file alone (no data, no training)

REGIME_FIELDS = ("train_images", "validation", "epochs", "eval_epochs", "init_from")


def is_run(record: dict) -> bool:
    return "kind" not in record  # the other lines are "cost" and "eval" records


def stored_runs(records: list[dict], v: Variant, budget: float | None, args, digest: str,
                regime: dict | None = None) -> list:
    """v's runs at this budget (and data regime) on the images `digest`, by seed: records
    whose key is v's but for the seed (a field run_key leaves out for v must be absent from
    the record too)."""
    want = run_key(v, 0, budget, args, digest) | (regime or {})
    fields = (set(want) | {"multiscale", "factor_after", "plain", *REGIME_FIELDS}) - {"seed"}
    runs = [r for r in records if is_run(r) and all(r.get(k) == want.get(k) for k in fields)]
    return sorted(runs, key=lambda r: r["seed"])


def the_digest(records: list[dict], args) -> str:
    """The images the stored runs were trained on: one set, or the report would mix them."""
    digests = {r["data"] for r in records if is_run(r)
               and r["dataset"] == args.dataset and r["quick"] == args.quick}
    if len(digests) > 1:
        raise ValueError(f"{args.results} holds {args.dataset} runs on {len(digests)} different "
                         f"image sets (digests {sorted(digests)}); keep one set's lines, or "
                         "give each set its own --results file.")
    return digests.pop() if digests else ""


def mean_spread(runs: list[dict]) -> tuple[float, float]:
    bpd = [r["test_bpd"] for r in runs]
    return float(np.mean(bpd)), max(bpd) - min(bpd)


def table(claim: str, rows: list[tuple[Variant, float, list[dict]]]) -> str:
    """Markdown: one row per (variant, budget) with runs, seeds aggregated (mean, and spread =
    max - min), each compared with the experiment's first variant at the same budget."""
    lines = [f"Claim: {claim}.", "",
             "| variant | TFLOP | params | train GFLOP/img | steps | wall/run | "
             "test bpd per seed | mean | spread | vs first row |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |"]
    firsts = {}
    for v, budget, runs in sorted(rows, key=lambda row: row[1]):
        if not runs:
            continue
        mean, spread = mean_spread(runs)
        versus = ""
        if budget not in firsts:
            firsts[budget] = (mean, spread)
        else:
            delta = mean - firsts[budget][0]
            beyond = abs(delta) > max(spread, firsts[budget][1])
            versus = f"{delta:+.3f} ({'beyond' if beyond else 'within'} the seed spread)"
        r, seeds = runs[0], " ".join(f"{x['test_bpd']:.3f}" for x in runs)
        lines.append(
            f"| {v.name} | {budget:g} | {r['params']:,} | {r['train_gflop_per_image']:.3f} "
            f"| {r['steps']} | {np.mean([r['wall_s'] for r in runs]) / 60:.1f} min "
            f"| {seeds} | {mean:.3f} | {spread:.3f} "
            f"| {versus} |")
    return "\n".join(lines)


def cost_table(records: list[dict], names: list[str], args, digest: str) -> str:
    """Markdown: each variant's measured step beside its bits/dim at equal FLOPs (the largest
    budget it ran at) and at equal wall-clock: its bits/dim interpolated, in log training time
    (ms per step x steps), at the base's training time of that budget."""
    costs = {json.dumps(r["key"], sort_keys=True): r for r in records if r.get("kind") == "cost"}
    lines = ["| variant | params | GFLOP/img | ms/step | memory | TFLOP | bpd, equal FLOPs | "
             "bpd, the base's training time |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: "
             "| ---: |"]
    variants = list(dict.fromkeys(v for name in names if name in EXPERIMENTS
                                  for v in EXPERIMENTS[name][2]))
    for v in variants + [PLAIN_VIT]:
        cost = costs.get(json.dumps(run_key(v, 0, 0.0, args, ""), sort_keys=True))
        if cost is None:
            continue
        curve = [(b, stored_runs(records, v, b, args, digest)) for b in sorted(args.budgets)]
        curve = [(cost["ms_per_step"] * runs[0]["steps"] / 1e3, mean_spread(runs)[0], b)
                 for b, runs in curve if runs]
        top = max(curve, key=lambda c: c[2], default=None)
        equal = ""
        base_runs = stored_runs(records, BASE, top[2], args, digest) if top else []
        base_cost = costs.get(json.dumps(run_key(BASE, 0, 0.0, args, ""), sort_keys=True))
        if base_runs and base_cost and len(curve) >= 2:
            equal = at_time(curve, base_cost["ms_per_step"] * base_runs[0]["steps"] / 1e3)
        lines.append(f"| {v.name} | {cost['params']:,} | {cost['gflop_per_image']:.3f} | "
                     f"{cost['ms_per_step']:.0f} | {cost['memory_mb']:.0f} MB | "
                     f"{f'{top[2]:g}' if top else ''} | {f'{top[1]:.3f}' if top else ''} | "
                     f"{equal} |")
    return "\n".join(lines)


def at_time(curve: list[tuple[float, float, float]], seconds: float) -> str:
    """bits/dim at `seconds` of training, linear in log time between the two nearest of the
    (seconds, bpd, budget) points; beyond them, extended from the end pair, marked '(extrap.)'."""
    curve = sorted(curve)
    i = min(max(np.searchsorted([c[0] for c in curve], seconds), 1), len(curve) - 1)
    (t0, b0, _), (t1, b1, _) = curve[i - 1], curve[i]
    bpd = b0 + (b1 - b0) * math.log(seconds / t0) / math.log(t1 / t0)
    inside = curve[0][0] <= seconds <= curve[-1][0]
    return f"{bpd:.3f}" + ("" if inside else " (extrap.)")


def shape_label(run: dict) -> str:
    """"couplings x blocks" of a run, from its flags."""
    return f"{run['flags']['depth']}x{run['flags']['block_depth']}"


def report(records: list[dict], names: list[str], args, digest: str | None = None) -> dict:
    """Every table (markdown, returned and printed) and picture (SVG, in args.figures) of the
    experiments `names` from the stored records alone."""
    digest = the_digest(records, args) if digest is None else digest
    os.makedirs(args.figures, exist_ok=True)
    tables = {}
    for name in [n for n in names if n in EXPERIMENTS]:
        claim, when, variants = EXPERIMENTS[name]
        rows = [(v, b, stored_runs(records, v, b, args, digest)) for v in variants
                for b in experiment_budgets(when, args.budgets)]
        tables[name] = table(claim, rows)
        series = [(v.name, [(b, [r["test_bpd"] for r in runs]) for w, b, runs in rows
                            if w == v and runs]) for v in variants]
        pictures.write_study(os.path.join(args.figures, f"{name}.svg"), series,
                             f"{name}: {claim}", "training TFLOP a run (log scale)")
    if "depth_tradeoff" in names:
        _, _, shapes = EXPERIMENTS["depth_tradeoff"]
        series = [(f"{b:g} TFLOP", [(r[0]["train_gflop_per_image"] / 3, [x["test_bpd"] for x in r],
                                     shape_label(r[0]))
                                    for v in shapes
                                    if (r := stored_runs(records, v, b, args, digest))])
                  for b in args.budgets]
        pictures.write_study(os.path.join(args.figures, "depth_tradeoff_frontier.svg"), series,
                             "couplings x ViT depth: bits/dim against the cost of an image "
                             "(line: the best at that cost or less)",
                             "forward GFLOP per image (log scale)", frontier=True)
    if "scarce_data" in names:
        tables["scarce_data"] = scarce_report(records, args, digest)
    if "transfer" in names:
        tables["transfer"] = transfer_report(records, args, digest)
    tables["costs"] = cost_table(records, names, args, digest)
    for name, text in tables.items():
        print(f"\n## {name}\n\n{text}", flush=True)
    return tables


def scarce_report(records: list[dict], args, digest: str) -> str:
    """Markdown of the scarce-data runs, and their held-out learning curves (an SVG)."""
    regime = scarce_regime(args)
    lines = [f"Claim: {SCARCE_CLAIM}. Trained on the first {regime['train_images']:,} training "
             f"images for {regime['epochs']} epochs, {regime['validation']:,} held out; test "
             "figures from the best held-out checkpoint.", "",
             "| variant | test bpd per seed | mean | spread | vs first row | best held-out "
             "at epoch | end: train / held-out bpd | gap | test bpd at the end | wall/run |",
             "| --- | --- | ---: | ---: | --- | --- | --- | ---: | ---: | ---: |"]
    series, first = [], None
    for v in SCARCE_VARIANTS:
        runs = stored_runs(records, v, None, args, digest, regime)
        if not runs:
            continue
        mean, spread = mean_spread(runs)
        versus = ""
        if first is None:
            first = (mean, spread)
        else:
            beyond = abs(mean - first[0]) > max(spread, first[1])
            versus = f"{mean - first[0]:+.3f} ({'beyond' if beyond else 'within'} the spread)"
        held, trained = (np.mean([r["curve"][-1][i] for r in runs]) for i in (1, 2))
        seeds = " ".join(f"{r['test_bpd']:.3f}" for r in runs)
        epochs = ", ".join(f"{r['best_epoch']:g}" for r in runs)
        lines.append(
            f"| {v.name} | {seeds} | {mean:.3f} | {spread:.3f} | {versus} | {epochs} | "
            f"{trained:.3f} / {held:.3f} | {held - trained:.3f} | "
            f"{np.mean([r['last_test_bpd'] for r in runs]):.3f} | "
            f"{np.mean([r['wall_s'] for r in runs]) / 60:.1f} min |")
        by_epoch = {}
        for r in runs:
            for epoch, bpd, _ in r["curve"]:
                by_epoch.setdefault(epoch, []).append(bpd)
        series.append((v.name, sorted(by_epoch.items())))
    pictures.write_study(os.path.join(args.figures, "scarce_data.svg"), series,
                         f"{regime['train_images']:,} training images: held-out bits/dim "
                         "during training", "epoch", log_x=False, y_label="held-out bits/dim")
    return "\n".join(lines)


def transfer_report(records: list[dict], args, digest: str) -> str:
    """Markdown of the transfer runs: test bits/dim from scratch and fine-tuned, what
    pretraining buys at each data size, and each model on the lossless and the JPEG test."""
    rows = transfer_runs(records, args, None, digest, run_missing=False)
    evals = {(r["run"], r["images"]): r["bpd"] for r in records if r.get("kind") == "eval"}
    pre_budget, top = QUICK_PRETRAIN_TFLOP if args.quick else PRETRAIN_TFLOP, max(args.budgets)
    scarce = f"{scarce_regime(args)['train_images']:,}"
    names = {"pretrained": (f"pretrained on {args.pretrain_data} ({pre_budget:g} TFLOP), "
                            "not fine-tuned", "none"),
             "scratch 2000": ("from scratch (best held-out checkpoint)", scarce),
             "tuned 2000": ("pretrained, fine-tuned (best held-out checkpoint)", scarce),
             "scratch all": (f"from scratch, {top:g} TFLOP", "all"),
             "tuned all": (f"pretrained, fine-tuned {top:g} TFLOP", "all")}
    lines = [f"Claim: {TRANSFER_CLAIM}.", "",
             "| model | CIFAR-10 training images | test bpd per seed | mean | pretraining buys "
             f"| {args.dataset} test, fixed noise | {args.jpeg_data} test | JPEG - lossless |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    means = {}
    for row, runs in rows.items():
        lossless = [evals.get((r["id"], args.dataset)) for r in runs]
        jpeg = [evals.get((r["id"], args.jpeg_data)) for r in runs]
        if not runs or None in lossless + jpeg:
            continue
        bpd = lossless if row == "pretrained" else [r["test_bpd"] for r in runs]
        means[row] = float(np.mean(bpd))
        scratch = means.get(row.replace("tuned", "scratch"))
        buys = f"{scratch - means[row]:.3f}" if row.startswith("tuned") and scratch else ""
        lines.append(f"| {names[row][0]} | {names[row][1]} | {' '.join(f'{b:.3f}' for b in bpd)} "
                     f"| {means[row]:.3f} | {buys} | {np.mean(lossless):.3f} | "
                     f"{np.mean(jpeg):.3f} | {np.mean(jpeg) - np.mean(lossless):+.3f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# The command

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--list", action="store_true", help="list the experiments and their variants, then exit")
    a("--experiment", action="append", choices=sorted(EXPERIMENTS) + sorted(EXTRA_STUDIES),
      help="run this experiment (repeatable; default: all of them)")
    a("--budgets", type=presets.floats, metavar="TFLOP,...",
      help=f"training TFLOPs a run, per variant and seed (default {','.join(map(str, BUDGETS))})")
    a("--seeds", type=int, default=2, help="seeds per variant (default 2; a third where two "
      "rows' gap is within twice their seeds' spread)")
    a("--quick", action="store_true", help="smoke run: a few steps of tiny models on "
      "synthetic data (seconds per variant), for the tests")
    a("--dataset", help="train.py --dataset (default cifar10; synthetic with --quick)")
    a("--data_dir", help="train.py --data_dir")
    a("--data_md5", help="train.py --data_md5 (a cifar10 archive you trust)")
    a("--workdir", default="runs/ablate", help="one folder per run (checkpoints, metrics)")
    a("--results", help="the study's results, one JSON line a run (default "
      "docs/ablations/results.jsonl; with --quick, <workdir>/results.jsonl)")
    a("--figures", help="where --report writes its pictures (default: beside --results)")
    a("--report", action="store_true", help="only print the tables and write the pictures "
      "from --results: no data, no training")
    a("--costs", action="store_true", help="also time each variant's training step here and "
      "store it for the cost table")
    a("--pretrain_data", default=PRETRAIN_DATA, help="transfer: the images the base is "
      f"pretrained on, a train.py --dataset (default {PRETRAIN_DATA})")
    a("--jpeg_data", default=JPEG_DATA, help="transfer: a second test set every model is "
      f"scored on, a train.py --dataset (default {JPEG_DATA})")
    a("--where_bits", metavar="RUN", help="instead: a trained run's bits, exact zeros vs the rest")
    a("--images", type=int, default=1000, help="test images for --where_bits (default 1000)")
    args = p.parse_args(argv)
    args.dataset = args.dataset or ("synthetic" if args.quick else "cifar10")
    args.budgets = tuple(args.budgets or (QUICK_BUDGETS if args.quick else BUDGETS))
    args.results = args.results or (os.path.join(args.workdir, "results.jsonl") if args.quick
                                    else os.path.join("docs", "ablations", "results.jsonl"))
    args.figures = args.figures or os.path.dirname(os.path.abspath(args.results))
    if not all(b > 0 and math.isfinite(b) for b in args.budgets) or args.seeds < 1:
        p.error(f"--budgets must be positive numbers and --seeds >= 1, got "
                f"{','.join(map(str, args.budgets))} and {args.seeds}.")
    return args


def main(argv=None) -> dict[str, str]:
    args = parse_args(argv)
    if args.where_bits:
        print(where := bits.where_bits(args.where_bits, args.images, args.data_dir))
        return {"where_bits": where}
    names = args.experiment or [*EXPERIMENTS, *EXTRA_STUDIES]
    if args.list:
        for name in names:
            if name in EXTRA_STUDIES:
                print(f"{name}: {EXTRA_STUDIES[name]}")
                continue
            claim, when, variants = EXPERIMENTS[name]
            at = ", ".join(map(str, experiment_budgets(when, args.budgets)))
            print(f"{name}: {claim} (at {at} TFLOP)")
            for v in variants:
                print(f"  - {v.name}")
        return {}
    if args.report:
        return report(read_results(args.results), names, args)
    image_shape = data.image_shape(args.dataset)
    dataset = data.load(args.dataset, args.data_dir, md5=args.data_md5)
    digest = data.digest(dataset)
    start = time.time()
    if args.costs:
        measure_costs(names, args, image_shape)
    run_study([n for n in names if n in EXPERIMENTS], args, image_shape, digest)
    if "scarce_data" in names:
        run_scarce(args, image_shape, digest)
    if "transfer" in names:
        run_transfer(args, image_shape, digest, dataset["test"])
    print(f"ablate.py: {len(names)} experiment(s) in {timing.format_seconds(time.time() - start)}"
          f" (runs already in {args.results} were not repeated).")
    return report(read_results(args.results), names, args, digest)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FloatingPointError) as e:  # bad flags or data: one line, no traceback
        sys.exit(f"ablate.py: error: {e}")
