"""Why Jet looks the way it does: the paper's design findings, checked on a CPU across compute.

Each experiment trains variants of STUDY_BASE (train.py's `cpu` preset at batch 64) for equal
training FLOPs (3x the forward's matmul and convolution FLOPs per image) at each of its
budgets, every variant at its own lr (swept at the middle budget, re-checked at the top), 2
seeds a row (3 on a close call); ablation_report.py turns the rows into tables and pictures.

  python ablate.py [--experiment NAME] [--max_budget TFLOP] [--costs]  # runs, then the report
  python ablate.py --report | --quick | --list | --where_bits RUN      # see --help

Training, data and evaluation are train.py's; the flows Jet leaves out are in variants.py.
Each finished run is a line of docs/ablations/results.jsonl; a run already there (same flags,
lr, seed, budget, dataset and images' digest) is read back, not trained again, so a study
resumes where it stopped and experiments share runs.
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

import ablation_report
import bench
import bits
import checkpoints
import data
import evaluation
import jet
import presets
import timing
import train
from variants import Variant, forward_flops, make_model


# ------------------------------------------------------------------------------------------
# Experiments: one per claim of the paper, each at the budgets that answer it

# The model every experiment varies: the `cpu` preset (test_study_base_is_the_cpu_preset) at
# batch 64 (more images a second than 32); every lr is chosen on 5,000 held-out images.
STUDY_BASE = {"preset": "cpu", "patch_size": 4, "depth": 24, "block_depth": 1, "emb_dim": 32,
              "num_heads": 2, "kinds": ",".join(presets.OFFICIAL_KINDS),
              "spatial_projs": ",".join(jet.SPATIAL_PROJS), "batch_size": 64,
              "validation": 5000}
BASE = Variant("base: the cpu preset's 24 couplings x 1 ViT block, width 32, P=4")
# Learning rates: a sweep starts at LR_GRID (the cpu preset's 1.6e-2 among them) and widens
# by factors of 2 within LR_BOUNDS until its best held-out figure is inside.
LR_GRID, LR_BOUNDS = (4e-3, 8e-3, 1.6e-2, 3.2e-2), (2.5e-4, 0.256)
# name: the claim; a picture's question; budgets (TFLOP a run); how the variants fare against
# the first if the claim holds ("behind", "not ahead", "ahead"; None: it is about cost); how
# many of the best others run beyond the middle budget (None: all); the variants.
EXPERIMENTS = {
    "coupling_net": dict(
        claim="ViT coupling networks beat CNN ones", question="Do ViT couplings beat CNN ones?",
        budgets=(4.0, 16.0, 64.0), expect="behind", finalists=1, variants=(
            BASE,
            Variant("CNN, 1 residual block, FLOPs of the ViT", net="cnn"),
            Variant("CNN, 2 residual blocks, FLOPs of the ViT", net="cnn", cnn_blocks=2))),
    "removed_components": dict(
        claim="ActNorm and invertible dense layers bring Jet no gain",
        question="Do ActNorm or invertible dense layers help Jet?",
        budgets=(1.0, 4.0, 16.0), expect="not ahead", finalists=None, variants=(
            BASE,
            Variant("+ ActNorm before each coupling", actnorm=True),
            Variant("+ invertible dense before each coupling", dense=True),
            Variant("+ both", actnorm=True, dense=True))),
    "depth_tradeoff": dict(
        claim="at fixed compute, many couplings of depth-1 ViTs are unfavourable",
        question="Do fewer, deeper ViT couplings beat many depth-1 ones at equal FLOPs?",
        budgets=(4.0, 16.0, 64.0), expect="ahead", finalists=2, variants=(
            BASE,
            Variant("48 couplings x 1 block", (("depth", 48),)),
            Variant("24 couplings x 2 blocks", (("block_depth", 2),)),
            Variant("12 couplings x 4 blocks", (("depth", 12), ("block_depth", 4))),
            Variant("12 couplings x 2 blocks", (("depth", 12), ("block_depth", 2))))),
    "multiscale": dict(
        claim="multiscale factoring brings Jet no gain",
        question="Does multiscale factoring help Jet?",
        budgets=(1.0, 4.0, 16.0), expect="not ahead", finalists=None, variants=(
            BASE,
            Variant("+ factor out half of each token's dims after 12 couplings, standard "
                    "normal (Real NVP)", multiscale="normal"),
            Variant("+ the same with Glow's split2d prior", multiscale="split2d"))),
    "coupling_kinds": dict(
        claim="mixing channel and spatial couplings beats one kind alone",
        question="Does the 4:1 mix of channel and spatial couplings beat one kind alone?",
        budgets=(4.0,), expect="behind", finalists=None, variants=(
            BASE,
            Variant("channel couplings only", (("kinds", "channels"),)),
            Variant("spatial couplings only, all six patterns", (("kinds", "spatial"),)))),
    "patch_size": dict(
        claim="patch size sets the token count, hence the cost of every ViT",
        question="What does the patch size buy at equal FLOPs?",
        budgets=(4.0,), expect=None, finalists=None, variants=(
            BASE,
            Variant("P=8: 16 tokens of 192 dims", (("patch_size", 8),)),
            Variant("P=2: 256 tokens of 12 dims (the paper's token count)",
                    (("patch_size", 2),)))),
}
# The cost table's extra row: the ViT on the variants' plain scan, the path they train on.
PLAIN_VIT = Variant("base on the plain path (variants.flow_forward)", plain=True)
# --quick: a seconds-long smoke run of the whole path on train.py's synthetic 16x16 images.
QUICK = dict(emb_dim=8, num_heads=2, batch_size=8, eval_batch_size=128, log_every=1,
             validation=64)
QUICK_SCALE = 2e-5  # --quick: every budget times this (a few steps of its tiny models)
QUICK_LR_GRID = QUICK_LR_BOUNDS = (1e-3, 2e-3)


def run_flags(v: Variant, lr: float | None, quick: bool) -> dict:
    """train.py's flags of v's runs at learning rate lr (None: no lr, for costs)."""
    flags = STUDY_BASE | dict(v.flags) | ({} if lr is None else {"lr": lr})
    if quick:
        flags |= QUICK | {"depth": max(1, int(flags.get("depth", 24)) // 6),
                          "patch_size": min(int(flags.get("patch_size", 4)), 8)}
    return flags


def budgets(name: str, args) -> tuple[float, ...]:
    """An experiment's budgets in TFLOP up to --max_budget (--quick: scaled down)."""
    scale = QUICK_SCALE if args.quick else 1.0
    return tuple(b * scale for b in EXPERIMENTS[name]["budgets"] if b <= args.max_budget)


def sweep_budget(name: str, args) -> float:
    """Where an experiment's learning rates are swept: the middle of all its budgets."""
    every = sorted(EXPERIMENTS[name]["budgets"])
    return every[len(every) // 2] * (QUICK_SCALE if args.quick else 1.0)


# ------------------------------------------------------------------------------------------
# Running: each (variant, lr, seed, budget) is a train.py run of budget / (FLOPs x batch) steps

def run_key(v: Variant, lr: float | None, seed: int, budget: float | None, args,
            digest: str) -> dict:
    """What determines a run's result (not its name), `digest` that of the images
    (data.digest): runs with equal keys are shared. Fields a variant leaves at their defaults
    (multiscale, plain) are left out, so the runs of other variants keep their ids."""
    key = {"flags": run_flags(v, lr, args.quick), "net": v.net, "cnn_blocks": v.cnn_blocks,
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


def append_result(path: str, record: dict) -> None:
    """One line a record, so a killed study loses at most the run in flight."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def run_variant(v: Variant, lr: float, seed: int, budget: float, args, image_shape,
                digest: str, regime: dict | None = None) -> dict:
    """Trains one (variant, lr, seed, budget) with train.main, or returns its stored result.
    A run whose loss became non-finite is stored as diverged (no figures). regime: train.py
    flags of a data regime, part of the run's key (see REGIME_FIELDS): a small training set
    ("train_images"; "evals" evaluations, the test figure then the best held-out
    checkpoint's), other images (pretraining: "dataset", and "data", their digest), or a start
    from another run's params ("init_from": that run's id)."""
    regime = regime or {}
    key = run_key(v, lr, seed, budget, args, digest) | regime
    run_id = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    done = next((r for r in read_results(args.results) if r.get("id") == run_id), None)
    if done:
        return done
    flags = run_flags(v, lr, args.quick)
    cfg = presets.make_config(flags, image_shape)
    flops = 3 * forward_flops(cfg, v)  # training step ~ forward + backward (2x forward)
    batch = int(flags["batch_size"])
    steps = max(2, round(budget * 1e12 / (flops * batch)))
    every = -(-steps // regime["evals"]) if "evals" in regime else steps
    workdir = os.path.join(args.workdir, "runs", run_id)
    argv = [f"--{k}={','.join(x) if isinstance(x, tuple) else x}" for k, x in flags.items()]
    argv += [f"--dataset={regime.get('dataset', args.dataset)}", f"--seed={seed}",
             f"--steps={steps}", f"--eval_every={every}", f"--ckpt_every={max(1, steps // 5)}",
             f"--log_every={flags.get('log_every', max(1, steps // 10))}",
             f"--workdir={workdir}"]
    argv += [f"--train_images={regime['train_images']}"] if "train_images" in regime else []
    argv += ([f"--init_from={os.path.join(args.workdir, 'runs', regime['init_from'])}"]
             if "init_from" in regime else [])
    argv += [f"--{k}={getattr(args, k)}" for k in ("data_dir", "data_md5")
             if getattr(args, k) and "dataset" not in regime]
    print(f"\n=== {v.name} | lr {lr:g} | seed {seed} | {budget:g} TFLOP: {steps} steps of "
          f"{batch} | {flops * 1e-9:.3f} GFLOP per training image | {regime or ''} | "
          f"{workdir}", flush=True)
    model = make_model(v)
    try:
        out = train.main(argv, model)
    except FloatingPointError as e:  # this lr is too high for v: a result of the sweep
        out = {"diverged": str(e), "test_bpd": None, "validation_bpd": None,
               "train_eval_bpd": None}
    if "evals" in regime and "diverged" not in out:
        out = held_out_result(workdir, out, model,
                              data.steps_per_epoch(regime["train_images"], batch))
    params = jax.eval_shape(lambda: model["init"](jax.random.key(0), cfg)[0])
    record = {"id": run_id, "variant": v.name, "lr": lr, "seed": seed,
              "params": sum(x.size for x in jax.tree.leaves(params)),
              "train_gflop_per_image": flops * 1e-9, "steps": steps, "batch_size": batch,
              "train_tflop": flops * steps * batch * 1e-12, "wall_s": run_seconds(workdir),
              **{k: out[k] for k in ("test_bpd", "validation_bpd", "train_eval_bpd",
                                     "diverged", "last_test_bpd", "best_epoch", "curve")
                 if k in out},
              **key}
    append_result(args.results, record)
    return record


def run_seconds(workdir: str) -> float:
    """A run's wall time, its resumed parts included: the last time in its metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return max(json.loads(line).get("time_s", 0.0) for line in f if line.strip())


def held_out_result(workdir: str, out: dict, model: dict, per_epoch: int) -> dict:
    """A run evaluated along the way, judged as early stopping would: its best held-out
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
                  "validation_bpd": evaluated["validation_bpd"],
                  "best_epoch": evaluated["step"] / per_epoch, "curve": curve}


# ------------------------------------------------------------------------------------------
# Learning rates: each variant's own, from its runs

def next_lr(scores: dict[float, float], bounds: tuple[float, float]) -> float | None:
    """The next learning rate a sweep needs, from scores {lr: held-out bpd} (inf where the
    run diverged): a factor 2 beyond the best where the best is at an end of those tried,
    within bounds; None when the best is inside (or at a bound: the sweep cannot widen)."""
    lrs, best = sorted(scores), best_lr(scores)
    if best == lrs[0] and best / 2 >= bounds[0]:
        return best / 2
    if best == lrs[-1] and best * 2 <= bounds[1]:
        return best * 2
    return None


def best_lr(scores: dict[float, float]) -> float:
    """The lr of the lowest held-out bpd (of equal ones, the smallest lr)."""
    return min(scores, key=lambda lr: (scores[lr], lr))


def score(run: dict) -> float:
    """A run's held-out bits/dim, the figure learning rates are chosen on (inf: diverged)."""
    return math.inf if run.get("diverged") else run["validation_bpd"]


def tune(v: Variant, budget: float, start: tuple, get, args) -> float | None:
    """Seed-0 runs of v at `budget` from the learning rates `start` (those inside the bounds),
    widened by next_lr until the best is inside; the best lr. get(v, lr, seed, budget) runs or
    looks up a run (None where missing: the sweep then stops where the stored runs stop)."""
    bounds = QUICK_LR_BOUNDS if args.quick else LR_BOUNDS
    todo, scores = [lr for lr in start if bounds[0] <= lr <= bounds[1]], {}
    while todo:
        for lr in todo:
            if (run := get(v, lr, 0, budget)) is None:
                return best_lr(scores) if scores else None
            scores[lr] = score(run)
        todo = [lr] if (lr := next_lr(scores, bounds)) else []
    return best_lr(scores) if scores else None


def seed0_scores(records: list[dict], v: Variant, budget: float, args, digest: str) -> dict:
    """{lr: held-out bpd} of v's seed-0 runs at `budget`: its sweep there, if it had one."""
    return {r["lr"]: score(r) for r in stored_runs(records, v, budget, args, digest)
            if r["seed"] == 0}


def chosen_lr(records: list[dict], v: Variant, budget: float, args, digest: str):
    """The lr v trains at at `budget`: the best of its sweep at that budget, else of its sweep
    at the nearest budget (in log FLOPs; of two as near, the larger) where it had one. A sweep:
    seed-0 runs at 3 or more learning rates (--quick: 2). None: v has no sweep yet."""
    least = len(QUICK_LR_GRID) if args.quick else 3
    swept = {b: s for b in {r["budget"] for r in records if is_run(r)}
             if len(s := seed0_scores(records, v, b, args, digest)) >= least}
    if not swept:
        return None
    nearest = min(swept, key=lambda b: (abs(math.log(b / budget)), -b))
    return best_lr(swept[nearest])


# ------------------------------------------------------------------------------------------
# The study: sweeps at the middle budget, re-checks at the top, then the seeds, budget by
# budget

def finalists(name: str, records: list[dict], args, digest: str) -> list[Variant]:
    """The variants that run at every budget of an experiment: the base and its `finalists`
    best others by their best held-out figure in the sweep (all where finalists is None)."""
    first, *others = EXPERIMENTS[name]["variants"]
    count, budget = EXPERIMENTS[name]["finalists"], sweep_budget(name, args)
    best = {v: min(seed0_scores(records, v, budget, args, digest).values(), default=math.inf)
            for v in others}
    ranked = sorted(others, key=lambda v: best[v])
    return [first, *(ranked if count is None else ranked[:count])]


def closest_competitor(name: str, records: list[dict], args, digest: str) -> Variant | None:
    """The finalist (not the base) whose best held-out figure in the sweep is nearest the
    base's: its optimum, and the base's, are re-checked at the top budget."""
    first, *others = finalists(name, records, args, digest)
    budget = sweep_budget(name, args)
    best = {v: min(seed0_scores(records, v, budget, args, digest).values(), default=math.inf)
            for v in (first, *others)}
    return min(others, key=lambda v: abs(best[v] - best[first]), default=None)


def close_call(first: list[dict], runs: list[dict]) -> bool:
    """A gap between two rows' means within twice the larger seed spread: too close to call
    on their seeds, so both get one more."""
    a = [r["test_bpd"] for r in first if r["test_bpd"] is not None]
    b = [r["test_bpd"] for r in runs if r["test_bpd"] is not None]
    if len(a) < 2 or len(b) < 2:
        return False
    spread = max(max(a) - min(a), max(b) - min(b))
    return abs(np.mean(a) - np.mean(b)) <= 2 * spread


def run_study(names: list[str], args, image_shape, digest: str) -> None:
    """Every run of the experiments `names`: (1) each variant's sweep at its experiment's
    middle budget; (2) budget by budget, smallest first: at an experiment's top budget the
    base's and its closest competitor's optimum re-checked (3 learning rates around it,
    widened as a sweep); then each finalist's seeds at its chosen lr, a third seed for both
    rows of a close call."""
    def get(v, lr, seed, budget):
        return run_variant(v, lr, seed, budget, args, image_shape, digest)

    def lr(v, budget):
        return chosen_lr(read_results(args.results), v, budget, args, digest)
    grid = QUICK_LR_GRID if args.quick else LR_GRID
    for name in names:
        for v in EXPERIMENTS[name]["variants"]:
            tune(v, sweep_budget(name, args), grid, get, args)
    for budget in sorted({b for name in names for b in budgets(name, args)}):
        for name in [n for n in names if budget in budgets(n, args)]:
            records = read_results(args.results)
            if budget == max(budgets(name, args)) != sweep_budget(name, args):
                for v in (EXPERIMENTS[name]["variants"][0],
                          closest_competitor(name, records, args, digest)):
                    tune(v, budget, (lr(v, budget) / 2, lr(v, budget), 2 * lr(v, budget)),
                         get, args)
            first, *others = finalists(name, records, args, digest)
            rows = {v: [get(v, lr(v, budget), seed, budget) for seed in range(args.seeds)]
                    for v in (first, *others)}
            for v in others:
                if args.seeds >= 2 and close_call(rows[first], rows[v]):
                    if len(rows[first]) == args.seeds:
                        rows[first].append(get(first, lr(first, budget), args.seeds, budget))
                    get(v, lr(v, budget), args.seeds, budget)


# ------------------------------------------------------------------------------------------
# Scarce data (the paper's named weak point: overfitting) and its cure: pretraining on more
# images, then fine-tuning. Every run at its variant's chosen lr and at equal FLOPs.

SCARCE_VARIANTS = (BASE, *EXPERIMENTS["removed_components"]["variants"][1:3],
                   EXPERIMENTS["coupling_net"]["variants"][1])  # + ActNorm, + dense, 1-block CNN
# The first 2,000 training images left after the 5,000 held out (data.validation_split),
# 20 TFLOP a run (about 58 epochs of the base), the held-out set evaluated 15 times.
SCARCE = {"train_images": 2000, "evals": 15}
SCARCE_TFLOP, PRETRAIN_TFLOP = 20.0, 32.0  # pretraining: ~1.9 epochs of Tiny ImageNet's 100,000
QUICK_SCARCE = {"train_images": 64, "evals": 3}
PRETRAIN_DATA = "npz:~/.cache/jet-data/tiny-imagenet-32.npz"  # see docs/ablations.md, "Data"
SCARCE_CLAIM = ("Jet overfits small datasets; a removed component, or a CNN's locality, may "
                "help there")
TRANSFER_CLAIM = ("pretraining on more images is the cure for scarce data (the paper's 3.02 "
                  "on CIFAR-10 comes from ImageNet-21k)")
EXTRA_STUDIES = {"scarce_data": SCARCE_CLAIM, "transfer": TRANSFER_CLAIM}


def scarce_regime(args) -> dict:
    return dict(QUICK_SCARCE if args.quick else SCARCE)


def scaled(tflop: float, args) -> float:
    return tflop * (QUICK_SCALE if args.quick else 1.0)


def pretrain_regime(records: list[dict], args) -> dict:
    """The pretraining runs' data: --pretrain_data and its images' digest (from the stored
    runs, so that --report needs no data; else from the images, or none under --report)."""
    stored = {r["data"] for r in records if is_run(r) and r["dataset"] == args.pretrain_data}
    if len(stored) > 1:
        raise ValueError(f"{args.results} holds pretraining runs on {len(stored)} image sets "
                         f"of {args.pretrain_data}; keep one set's lines.")
    digest = (stored.pop() if stored else "" if args.report
              else data.digest(data.load(args.pretrain_data)))
    return {"dataset": args.pretrain_data, "data": digest}


def transfer_rows(records: list[dict], args, digest: str, get) -> dict[str, list]:
    """The transfer experiment's rows, each a list of runs by seed: the base pretrained on
    --pretrain_data (seed s), fine-tuned from pretraining seed s (--init_from) on the scarce
    set and on the whole training set, and from scratch on each at the fine-tuning's FLOPs and
    at pretraining + fine-tuning's (equal compute). get(budget, regime, seed) runs or looks
    up a run of the base (None where missing)."""
    scarce, whole = scaled(SCARCE_TFLOP, args), max(budgets("removed_components", args))
    pre_tflop = scaled(PRETRAIN_TFLOP, args)
    pre = [get(pre_tflop, pretrain_regime(records, args), s) for s in range(args.seeds)]
    rows = {"pretrained": pre}
    for name, budget, regime in (("2000", scarce, scarce_regime(args)), ("all", whole, {})):
        rows[f"scratch {name}"] = [get(budget, regime, s) for s in range(args.seeds)]
        rows[f"tuned {name}"] = [get(budget, regime | {"init_from": p["id"]}, s) if p else None
                                 for s, p in enumerate(pre)]
        rows[f"scratch {name}, equal compute"] = [get(budget + pre_tflop, regime, s)
                                                  for s in range(args.seeds)]
    return rows


def evaluate_on(run: dict, args, name: str, images: np.ndarray) -> dict:
    """A stored eval record: run's checkpoint (the best held-out one where it has one) on
    `images`, the dataset `name`, with fixed noise: a pretrained model scored on the
    fine-tuning set's test images."""
    done = next((r for r in read_results(args.results) if r.get("kind") == "eval"
                 and r["run"] == run["id"] and r["images"] == name), None)
    if done:
        return done
    path = os.path.join(args.workdir, "runs", run["id"], "best" if "curve" in run else "")
    state, cfg, meta = checkpoints.read_run(path)
    evaluate = evaluation.make_evaluate(
        evaluation.make_batch_stats(cfg, meta["flags"], jet.forward), images,
        np.zeros(len(images), np.int64), meta["flags"]["eval_batch_size"], jax.numpy.asarray)
    record = {"kind": "eval", "run": run["id"], "images": name,
              "data": data.digest({"test": images}),
              "bpd": evaluate(state, jax.random.key(0))["bpd"]}
    append_result(args.results, record)
    return record


def run_scarce(args, image_shape, digest: str) -> None:
    """Each variant of the scarce-data table on the scarce set at equal FLOPs (a third seed on
    close calls)."""
    budget = scaled(SCARCE_TFLOP, args)

    def run(v, seed):
        lr = chosen_lr(read_results(args.results), v, budget, args, digest)
        if lr is None:
            raise ValueError(f"scarce_data runs {v.name!r} at its tuned learning rate, and it "
                             "has no sweep yet: run the coupling_net and removed_components "
                             "experiments first.")
        return run_variant(v, lr, seed, budget, args, image_shape, digest, scarce_regime(args))
    runs = [[run(v, seed) for seed in range(args.seeds)] for v in SCARCE_VARIANTS]
    for v, rows in zip(SCARCE_VARIANTS[1:], runs[1:]):
        if args.seeds >= 2 and close_call(runs[0], rows):
            run(SCARCE_VARIANTS[0], args.seeds)
            run(v, args.seeds)


def run_transfer(args, image_shape, digest: str, test: np.ndarray) -> None:
    """Every run of the transfer table, then each pretrained model's bits/dim on the test
    images of --dataset (`test`)."""
    def get(budget, regime, seed):
        lr = chosen_lr(read_results(args.results), BASE, budget, args, digest)
        return run_variant(BASE, lr, seed, budget, args, image_shape, digest, regime)
    for run in transfer_rows(read_results(args.results), args, digest, get)["pretrained"]:
        evaluate_on(run, args, args.dataset, test)
# ------------------------------------------------------------------------------------------
# Cost: parameters, FLOPs, time and memory of one training step, measured on this machine

def measure_costs(names: list[str], args, image_shape) -> None:
    """Each variant's training step at its batch (bench.time_variant_step), the experiments'
    and the ViT's on the plain path, appended to the results file as "cost" records; variants
    already measured are skipped."""
    seen = {json.dumps(r["key"], sort_keys=True) for r in read_results(args.results)
            if r.get("kind") == "cost"}
    for v in study_variants(names) + [PLAIN_VIT]:
        if (key := json.dumps(cost_key(v, args), sort_keys=True)) in seen:
            continue
        seen.add(key)
        flags = run_flags(v, None, args.quick)
        record = {"kind": "cost", "variant": v.name, "batch_size": flags["batch_size"],
                  "path": "jet.forward (fused)" if v.is_jet else "variants' scan (plain)",
                  **bench.time_variant_step(v, flags, image_shape), "key": cost_key(v, args)}
        print(f"{v.name}: {record['ms_per_step']:.1f} ms/step, {record['memory_mb']:.0f} MB",
              flush=True)
        append_result(args.results, record)


def cost_key(v: Variant, args) -> dict:
    """What a cost record is of: v's flags without a learning rate (which costs nothing)."""
    return run_key(v, None, 0, None, args, "")


def study_variants(names: list[str]) -> list[Variant]:
    """The variants of the experiments `names`, each once, in order."""
    return list(dict.fromkeys(v for name in names if name in EXPERIMENTS
                              for v in EXPERIMENTS[name]["variants"]))


# ------------------------------------------------------------------------------------------
# The report's rows, from the results file alone (no data, no training); ablation_report.py
# turns them into tables, verdicts and pictures

REGIME_FIELDS = ("train_images", "evals", "init_from")


def is_run(record: dict) -> bool:
    return "kind" not in record  # the other lines are "cost" and "eval" records


def stored_runs(records: list[dict], v: Variant, budget: float | None, args, digest: str,
                regime: dict | None = None, lr: float | None = None) -> list:
    """v's runs at this budget (and data regime; lr None: at any learning rate) on the images
    `digest`, by seed then lr: records whose key is v's but for the seed and lr (a field
    run_key leaves out for v must be absent from the record too)."""
    want = run_key(v, lr, 0, budget, args, digest) | (regime or {})
    fields = (set(want) | {"multiscale", "factor_after", "plain", *REGIME_FIELDS}) - {"seed"}
    flags = {k: x for k, x in want.pop("flags").items() if lr is not None or k != "lr"}
    fields.discard("flags")
    runs = [r for r in records if is_run(r) and all(r.get(k) == want.get(k) for k in fields)
            and {k: x for k, x in r["flags"].items() if lr is not None or k != "lr"} == flags]
    return sorted(runs, key=lambda r: (r["seed"], r["lr"]))


def the_digest(records: list[dict], args) -> str:
    """The images the stored runs were trained on: one set, or the report would mix them."""
    digests = {r["data"] for r in records if is_run(r)
               and r["dataset"] == args.dataset and r["quick"] == args.quick}
    if len(digests) > 1:
        raise ValueError(f"{args.results} holds {args.dataset} runs on {len(digests)} different "
                         f"image sets (digests {sorted(digests)}); keep one set's lines, or "
                         "give each set its own --results file.")
    return digests.pop() if digests else ""


def row(v: Variant, budget: float, lr, runs: list[dict], ms: float | None = None) -> dict:
    """One table row for ablation_report: v at `budget` and `lr`, its runs' figures by seed
    (and a held-out run's learning curve), its training time at `ms` a step."""
    done = [r for r in runs if not r.get("diverged")]
    return {"variant": v.name, "budget": budget, "lr": lr, "diverged": len(runs) - len(done),
            "bpd": [r["test_bpd"] for r in done], "held_out": [r["validation_bpd"] for r in done],
            "curves": [r["curve"] for r in done if "curve" in r],
            **({k: runs[0][k] for k in ("params", "train_gflop_per_image", "steps")}
               if runs else {}),
            "wall_min": float(np.mean([r["wall_s"] for r in runs])) / 60 if runs else None,
            "train_s": ms * runs[0]["steps"] / 1e3 if runs and ms else None}


def experiment_rows(name: str, records: list[dict], args, digest: str) -> dict:
    """An experiment's report data: its rows (each finalist at each budget, at its chosen
    lr), its sweeps ({variant name: {budget: {lr: held-out bpd}}}), and each row's training
    time on the path its flow trains on (ms a step from the cost records x steps) beside the
    base's on the same path."""
    e, costs = EXPERIMENTS[name], {json.dumps(r["key"], sort_keys=True): r["ms_per_step"]
                                   for r in records if r.get("kind") == "cost"}
    ms = lambda v: costs.get(json.dumps(cost_key(v, args), sort_keys=True))  # noqa: E731
    chosen = finalists(name, records, args, digest)
    rows, sweeps = [], {}
    for v in e["variants"]:
        for budget in budgets(name, args):
            scores = seed0_scores(records, v, budget, args, digest)
            if len(scores) >= 2:
                sweeps.setdefault(v.name, {})[budget] = scores
            lr = chosen_lr(records, v, budget, args, digest)
            runs = stored_runs(records, v, budget, args, digest, lr=lr) if lr else []
            if v in chosen and runs:
                # the base's time on the variants' path where they train on it
                same_path = ms(PLAIN_VIT) if v is BASE and not all(
                    w.is_jet for w in e["variants"]) else ms(v)
                rows.append(row(v, budget, lr, runs, ms=ms(v)) | {"train_s_same_path": (
                    same_path * runs[0]["steps"] / 1e3 if same_path else None)})
    return {"rows": rows, "sweeps": sweeps, "sweep_budget": sweep_budget(name, args)}


def report(records: list[dict], names: list[str], args, digest: str | None = None) -> dict:
    """Every table with its verdicts (markdown, returned and printed) and picture (SVG, in
    args.figures) of the experiments `names`, from the stored records alone."""
    digest = the_digest(records, args) if digest is None else digest
    os.makedirs(args.figures, exist_ok=True)
    tables = {}
    for name in [n for n in names if n in EXPERIMENTS]:
        tables[name] = ablation_report.experiment(name, EXPERIMENTS[name], experiment_rows(
            name, records, args, digest), args.figures)
    if "scarce_data" in names:
        budget, regime = scaled(SCARCE_TFLOP, args), scarce_regime(args)
        rows = [row(v, budget, lr, stored_runs(records, v, budget, args, digest, regime, lr))
                for v in SCARCE_VARIANTS
                if (lr := chosen_lr(records, v, budget, args, digest)) is not None]
        tables["scarce_data"] = ablation_report.scarce(SCARCE_CLAIM, rows, scarce_regime(args),
                                                       args.figures)
    if "transfer" in names:
        def lookup(budget, regime, seed):
            lr = chosen_lr(records, BASE, budget, args, digest)
            runs = stored_runs(records, BASE, budget, args, digest, regime, lr) if lr else []
            return next((r for r in runs if r["seed"] == seed), None)
        rows = transfer_rows(records, args, digest, lookup)
        evals = {r["run"]: r["bpd"] for r in records
                 if r.get("kind") == "eval" and r["images"] == args.dataset}
        tables["transfer"] = ablation_report.transfer(TRANSFER_CLAIM, rows, evals)
    keys = {json.dumps(cost_key(v, args), sort_keys=True)
            for v in study_variants(names) + [PLAIN_VIT]}
    tables["costs"] = ablation_report.costs([r for r in records if r.get("kind") == "cost"
                                             and json.dumps(r["key"], sort_keys=True) in keys])
    for name, text in tables.items():
        print(f"\n## {name}\n\n{text}", flush=True)
    return tables


# ------------------------------------------------------------------------------------------
# The command

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--list", action="store_true", help="list the experiments and their variants, then exit")
    a("--experiment", action="append", choices=sorted(EXPERIMENTS) + sorted(EXTRA_STUDIES),
      help="run this experiment (repeatable; default: all of them, in the study's order)")
    a("--max_budget", type=float, default=math.inf, metavar="TFLOP",
      help="leave out the budgets above this many training TFLOP a run (default: none)")
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
    a("--where_bits", metavar="RUN", help="instead: a trained run's bits, exact zeros vs the rest")
    a("--images", type=int, default=1000, help="test images for --where_bits (default 1000)")
    args = p.parse_args(argv)
    args.dataset = args.dataset or ("synthetic" if args.quick else "cifar10")
    args.results = args.results or (os.path.join(args.workdir, "results.jsonl") if args.quick
                                    else os.path.join("docs", "ablations", "results.jsonl"))
    args.figures = args.figures or os.path.dirname(os.path.abspath(args.results))
    if not args.max_budget > 0 or args.seeds < 1:
        p.error(f"--max_budget must be a positive number and --seeds >= 1, got "
                f"{args.max_budget} and {args.seeds}.")
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
            e = EXPERIMENTS[name]
            print(f"{name}: {e['claim']} (at {', '.join(f'{b:g}' for b in budgets(name, args))}"
                  f" TFLOP, learning rates swept at {sweep_budget(name, args):g})")
            for v in e["variants"]:
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
