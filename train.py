"""Train Jet with the official recipe; evaluate bits/dim; write samples, curves and checkpoints.

  python train.py --dataset cifar10                # sized to the machine: 30 min on a CPU,
                                                   # the paper-scale preset on a GPU or TPU
  python train.py --dataset cifar10 --preset tiny  # a couple of minutes on a laptop CPU
  python train.py --dataset cifar10 --eval_only    # test bpd of runs/cifar10-cpu's checkpoint
  python train.py --workdir runs/x --sample 64     # a grid of 64 samples from runs/x

The same command resumes from the last checkpoint in its --workdir (runs/<dataset>-<preset>,
with -conditional after it for --conditional) exactly; SIGTERM or Ctrl-C first checkpoints the
step in flight. Data-parallel over the devices of one process, or of one process per host with
--distributed.
"""

import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import checkpoints
import cluster
import data
import evaluation
import jet
import pictures
import presets
import timing

PROGRESS_SECONDS = 30  # a stdout line at least this often, besides the --log_every lines
GRID = 64  # samples in the grid written at every evaluation (conditional: 8 per class)
LABEL_DROPOUT_STREAM = 1  # label dropout's key: fold_in(the step's noise key, this)


# ------------------------------------------------------------------------------------------
# Optimizer: big_vision's chain (clip, Adam, lr, decoupled weight decay, schedule)


def schedule(step, total_steps, warmup_steps, since=(0, 0.0)):
    """Multiplier in [0, 1]: linear warmup from 0, then cosine decay to 0 (big_vision). A
    budgeted run that changes its step count at step s goes on from where its cosine was,
    progress p (since = (s, p)): the rest of the cosine is compressed or stretched to end at
    the new total_steps, so the rate never jumps and still reaches 0 at the last step."""
    progress = schedule_progress(step, total_steps, warmup_steps, since)
    warm = jnp.minimum(1.0, step / warmup_steps) if warmup_steps else 1.0
    return 0.5 * (1 + jnp.cos(jnp.pi * progress)) * warm


def schedule_progress(step, total_steps, warmup_steps, since=(0, 0.0)):
    """How far the cosine has gone at `step`, in [0, 1]: p at step s (since), then linearly to
    1 at total_steps; 0 through the warmup. since = (0, 0): the plain schedule."""
    s, p = since
    start = max(s, warmup_steps)
    return p + (1 - p) * jnp.clip((step - start) / max(total_steps - start, 1), 0.0, 1.0)


def run_schedule(f: dict):
    """This run's schedule: step -> multiplier of the peak learning rate f["lr"]. A re-timed
    budget keeps its first warmup length and goes on from where the cosine was
    (timing.retime_run sets warmup_steps and schedule_from)."""
    return functools.partial(schedule, total_steps=f["steps"], since=tuple(
        f.get("schedule_from", (0, 0.0))), warmup_steps=f.get(
        "warmup_steps", round(f["warmup"] * f["steps"])))


def run_progress(f: dict, step: int) -> float:
    """Where this run's cosine is at `step` (schedule_progress on run_schedule's arguments)."""
    return float(schedule_progress(step, **run_schedule(f).keywords))


def make_optimizer(f: dict) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(f["clip"]),
        optax.scale_by_adam(b1=f["b1"], b2=f["b2"]),
        optax.scale(f["lr"]),
        optax.add_decayed_weights(f["weight_decay"]),  # not multiplied by lr, as big_vision
        optax.scale_by_schedule(run_schedule(f)),
        optax.scale(-1.0))


# ------------------------------------------------------------------------------------------
# The training step


def run_keys(rng: jax.Array) -> dict[str, jax.Array]:
    """Every random stream of a run, derived from the one key stored in its checkpoints."""
    return dict(zip(("init", "noise", "eval", "sample"), jax.random.split(rng, 4)))


def new_state(params, perms, tx, rng=None) -> dict:
    """A training state at step 0: parameters, permutations, fresh optimizer state, run key."""
    state = {"params": params, "perms": perms, "opt_state": tx.init(params)}
    return state if rng is None else state | {"rng": rng}


def make_train_step(cfg: jet.Config, f: dict, forward=jet.forward):
    """One jitted update with f's optimizer (its schedule fixed at f["steps"]): dequantize with
    noise key fold_in(key, step), loss = mean bits/dim. A conditional model (cfg.context_dim)
    reads each example's label, dropped to the zero context with probability --label_dropout,
    independently per example."""
    tx, remat, dtype = make_optimizer(f), bool(f["remat"]), presets.compute_dtype(f)
    label_dropout = f.get("label_dropout", 0.0)

    @functools.partial(jax.jit, donate_argnums=0)
    def train_step(state, images, step, noise_key, labels=None):
        key = jax.random.fold_in(noise_key, step)
        context = {}
        if cfg.context_dim:
            drop = jax.random.bernoulli(jax.random.fold_in(key, LABEL_DROPOUT_STREAM),
                                        label_dropout, labels.shape)
            context = {"context": evaluation.class_context(labels, cfg.context_dim, drop)}

        def loss_fn(params):
            x = jet.dequantize(key, images)
            z, logdet = forward(params, state["perms"], x, cfg, remat=remat, compute_dtype=dtype,
                                **context)
            return jet.bits_per_dim(z, logdet).mean()
        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return ({**state, "params": params, "opt_state": opt_state},
                {"loss": loss, "grad_norm": optax.tree.norm(grads)})
    return train_step


def read_losses(pending: list, workdir: str) -> list[tuple[float, float]]:
    """(loss, grad norm) of the steps taken since the last read, as host floats; the first
    non-finite loss stops the run, naming its step (no state after it is ever written)."""
    losses = [(float(metrics["loss"]), float(metrics["grad_norm"])) for _, metrics in pending]
    for (step, _), (loss, _) in zip(pending, losses):
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the training loss became {loss} at step {step}; stopping. The last good "
                f"checkpoint in {workdir} is kept. Try a lower --lr or a smaller --clip.")
    pending.clear()
    return losses


# ------------------------------------------------------------------------------------------
# Samples


sample_jit = jax.jit(jet.sample, static_argnames=("n", "compute_dtype"))
# The flow main() trains; ablate.py's variants add "data_init" (params, perms, x, cfg) -> params.
JET = {"name": "jet", "init": jet.init, "forward": jet.forward, "sample": sample_jit}


def sample_rows(run: dict, state: dict, n=None, temperatures=None, classes=None) -> list:
    """Rows of samples for a grid, drawn with the run's sample key (the same noise every time),
    one block per temperature (default the run's): an unconditional model's n samples (default
    GRID), ceil(sqrt(n)) a row; a conditional model's n (default GRID / 8) per class of
    `classes` (default: every class if there are at most 20, else classes 0-9), then n from
    the zero context if it was trained with label dropout. Every row of a block starts from
    the same noise: a column shows one latent per label."""
    cfg, f, sample = run["cfg"], run["f"], run["model"]["sample"]
    key = run_keys(jax.random.wrap_key_data(state["rng"]))["sample"]
    K, rows, n = cfg.context_dim, [], n or (GRID // 8 if cfg.context_dim else GRID)
    draw = lambda t, **c: checkpoints.to_host(sample(  # noqa: E731
        state["params"], state["perms"], key, n, cfg, temperature=t,
        compute_dtype=presets.compute_dtype(f), **c))
    for t in temperatures or run["temperature"]:
        if not K:
            images, cols = draw(t), math.ceil(math.sqrt(n))
            rows += [images[i:i + cols] for i in range(0, n, cols)]
            continue
        contexts = [evaluation.class_context(jnp.full((n,), c), K) for c in
                    (classes or (range(K) if K <= 20 else range(10)))]
        if f.get("label_dropout"):
            contexts.append(jnp.zeros((n, 1, K)))
        rows += [draw(t, context=context) for context in contexts]
    return rows


# ------------------------------------------------------------------------------------------
# The loop


def train(run: dict, state: dict, step: int, plan: dict | None) -> dict:
    """Steps from `step` to f["steps"]: one jitted update per batch; a log line every
    --log_every steps (a shorter one when PROGRESS_SECONDS pass without one); an evaluation
    every --eval_every; a checkpoint every --ckpt_every; each also at the last step. Asked to
    stop (SIGTERM, Ctrl-C), it checkpoints the step just taken and exits. A budgeted run
    (plan) is re-timed on a fixed cadence until near its end (timing.retime_due)."""
    f, cfg, put = run["f"], run["cfg"], run["put_batch"]
    images, labels = run["sets"]["train"], run["sets"].get("train_labels")
    noise_key, meta = run_keys(jax.random.wrap_key_data(state["rng"]))["noise"], run["meta"] or {}
    train_step = make_train_step(cfg, f, run["model"]["forward"])
    # What a checkpoint keeps of the loop: the losses since the last log line (a resumed run
    # logs the same means) and the best held-out bits/dim so far.
    carried = {"window": [tuple(p) for p in meta.get("log_window", [])],
               "best": meta.get("best_bpd", meta.get("best_test_bpd", math.inf))}
    pending, clock, last_line, result = [], None, time.time(), {"step": step}
    if step >= f["steps"]:
        print(f"{run['workdir']} has finished its {f['steps']} steps; see --eval_only.")
    else:
        print("Compiling the training step...", flush=True)
    with cluster.stop_signals() as stop:
        while step < f["steps"]:
            index = data.batch_indices(len(images), f["batch_size"], f["seed"], step)
            state, metrics = train_step(state, put(images[index]), step, noise_key,
                                        put(labels[index]) if cfg.context_dim else None)
            step += 1
            pending.append((step, metrics))  # read when needed: no stall on every step
            due = [n for n in ("log_every", "eval_every", "ckpt_every")
                   if step % f[n] == 0 or step == f["steps"]]
            talk = clock is not None and time.time() - last_line >= PROGRESS_SECONDS
            if clock is None or due or talk:
                carried["window"] += read_losses(pending, run["workdir"])
            if clock is None:
                clock = timing.start_clock(step)
                print(f"Step {step} done in {clock['start'] - last_line:.1f} s, compilation "
                      "included.", flush=True)
            if "log_every" in due or talk:
                last_line = log_line(run, step, carried, clock, full="log_every" in due)
            if step == clock["step"] + 3:
                timing.warn_if_slow(f, clock, step, presets.CPU_PRESET.get(f["dataset"], "tiny"))
            if "eval_every" in due:
                result |= evaluate_at(run, state, step, carried, clock, plan)
            if "ckpt_every" in due:
                save(run, state, step, carried)
            if plan and timing.retime_due(plan, step, f["steps"]):
                if timing.retime_run(f, plan, clock, step, run_progress(f, step)):
                    train_step = timing.pausing(make_train_step(cfg, f, run["model"]["forward"]),
                                                clock)
            if (signum := cluster.agreed_stop(stop, put)) and step < f["steps"]:
                carried["window"] += read_losses(pending, run["workdir"])
                if "ckpt_every" not in due:
                    save(run, state, step, carried)
                raise cluster.stopped(signum, step, f["steps"], in_workdir(run))
    return result | {"step": step}


def log_line(run: dict, step: int, carried: dict, clock: dict, full: bool) -> float:
    """The --log_every line (full: stdout and metrics.jsonl; the window starts again), else the
    shorter stdout line of a long stretch without one. Returns when it was printed."""
    f, (losses, norms) = run["f"], zip(*carried["window"])
    rate = timing.steps_per_s(clock, step)
    eta = timing.format_seconds((f["steps"] - step) / rate if rate else math.inf)
    if not full:
        print(f"step {step}/{f['steps']} | train {np.mean(losses):.4f} bpd (last {len(losses)} "
              f"steps) | {rate * f['batch_size']:.1f} img/s | ETA {eta}", flush=True)
        return time.time()
    lr = f["lr"] * float(run_schedule(f)(step - 1))
    epoch = step / data.steps_per_epoch(len(run["sets"]["train"]), f["batch_size"])
    record = {"step": step, "epoch": epoch, "train_bpd": float(np.mean(losses)), "lr": lr,
              "grad_norm": float(np.mean(norms)), "img_per_s": rate * f["batch_size"],
              "time_s": time.time() - run["started"]}
    print(f"step {step}/{f['steps']} | epoch {epoch:.2f} | train {record['train_bpd']:.4f} bpd "
          f"| lr {lr:.2e} | grad {record['grad_norm']:.3f} | {record['img_per_s']:.1f} img/s | "
          f"ETA {eta}", flush=True)
    cluster.on_main(checkpoints.append_record, in_workdir(run, "metrics.jsonl"), record)
    carried["window"] = []
    timing.mark(clock, step)
    return time.time()


def evaluate_at(run: dict, state: dict, step: int, carried: dict, clock: dict, plan) -> dict:
    """Held-out and training-slice bits/dim (same noise), a sample grid, the learning curve,
    and checkpoint_best.npz when the held-out figure is the best so far. At the last step the
    test set in full (once more after a validation set) and a conditional model's accuracy of
    classifying by likelihood and bits/dim under the zero context, on the first
    --classify_images test images. Its time is not training time (clock); a budget learns
    what it costs (plan)."""
    f, evaluators, since, held = run["f"], run["evaluators"], time.time(), run["held"]
    key, test = run_keys(jax.random.wrap_key_data(state["rng"]))["eval"], evaluators["test"]
    classify = min(f.get("classify_images") or test.size, test.size) * (step == f["steps"])
    record = {"step": step}
    for name in (held, "train") + (("test",) if classify and held != "test" else ()):
        stats = evaluators[name](state, key, classify=name == "test" and classify == test.size)
        record |= {f"{'train_eval' if name == 'train' else name}_{k}": v for k, v in stats.items()}
    if run["cfg"].context_dim and 0 < classify < test.size:  # on a subset: a short budget's
        stats = test(state, key, classify=True, limit=classify)
        record |= {"test_accuracy": stats["accuracy"], "test_classified": classify,
                   "test_unconditional_bpd": stats["unconditional_bpd"]}
    print(f"step {step}/{f['steps']} | " + evaluation.eval_line(record), flush=True)
    cluster.on_main(checkpoints.append_record, in_workdir(run, "metrics.jsonl"),
                    record | {"time_s": time.time() - run["started"]})
    cluster.on_main(pictures.write_grid, in_workdir(run, f"samples_{step:07d}.png"),
                    sample_rows(run, state))
    cluster.on_main(pictures.write_curve, in_workdir(run, "metrics.jsonl"),
                    in_workdir(run, "curve.svg"), f"{f['dataset']}, preset {f['preset']}")
    if record[f"{held}_bpd"] < carried["best"]:
        carried["best"] = record[f"{held}_bpd"]
        save(run, state, step, carried, "checkpoint_best.npz")
    timing.pause(clock, since)
    timing.mark(clock, step)  # img/s counts training only
    if plan:
        plan["evals_s"].append(time.time() - since)
    return record


def in_workdir(run: dict, name: str = "checkpoint.npz") -> str:
    return os.path.join(run["workdir"], name)


def save(run: dict, state: dict, step: int, carried: dict, name="checkpoint.npz") -> None:
    """A checkpoint (process 0 writes it; a failed write stops every process)."""
    f = run["f"]
    meta = {"format": checkpoints.FORMAT, "model": run["model"]["name"], "step": step,
            "config": dataclasses.asdict(run["cfg"]), "flags": f,
            "data": {"seed": f["seed"], "next_batch": step}, "log_window": carried["window"],
            "best_bpd": carried["best"], "time_s": time.time() - run["started"]}
    if name == "checkpoint_best.npz":
        meta[f"{run['held']}_bpd"] = carried["best"]
    cluster.on_main(checkpoints.save, in_workdir(run, name), state, meta)


# ------------------------------------------------------------------------------------------
# The commands: train (new or resumed), --eval_only, --sample


def main(argv=None, model=None, restart: bool = False) -> dict:
    """train.py's command line (default sys.argv[1:]); bad flags, data or checkpoints raise
    ValueError, a non-finite loss FloatingPointError. restart: the command line's call, which
    may restart with huge pages and whose time counts from the process's start."""
    started = timing.process_start() if restart else time.time()
    args = presets.parse_args(argv, __doc__)
    if restart and args.huge_pages and not args.distributed:
        timing.restart_with_huge_pages(__file__, "train")
    cluster.start_distributed(args)
    args.workdir = args.workdir or presets.default_workdir(args, jax.default_backend())
    cluster.check_workdir(args.workdir, writes=not args.eval_only)
    with cluster.workdir_lock(args.workdir, training=not (args.sample or args.eval_only)):
        return command(args, model or JET, started)


def command(args, model: dict, started: float) -> dict:
    """What the flags ask for: --sample, --eval_only, or training. started: when the command
    began, which a --time_budget counts from (a resumed run: its checkpoint's time before)."""
    ckpt = checkpoints.open_workdir(args.workdir, model["name"], args.sample or args.eval_only)
    if (ckpt["meta"] or {}).get("exported_from") and not (args.sample or args.eval_only
                                                          or args.export):
        raise ValueError(f"{args.workdir} holds an exported model (weights only, no optimizer "
                         f"state): it cannot resume training. Start a run from it with "
                         f"--init_from {args.workdir} --workdir NEW_DIR.")
    cluster.check_same_checkpoint(args.workdir, ckpt["meta"])
    f, cfg = presets.settings(args, ckpt["meta"], jax.default_backend())
    run = {"f": f, "cfg": cfg, "meta": ckpt["meta"], "model": model, "workdir": args.workdir,
           "temperature": args.temperature,
           "started": time.time() - ckpt["meta"]["time_s"] if ckpt["meta"] else started}
    if args.sample:
        return from_checkpoint(run, ckpt, args)
    run["sets"], K = data.load_for_run(f, cfg.image_shape)
    if args.export:
        return export(run, ckpt, args.export)
    if K and not ckpt["meta"]:  # an npz dataset's classes are known once its labels are read
        run["cfg"] = cfg = dataclasses.replace(cfg, context_dim=K)
    if "steps" not in f and not f.get("time_budget"):
        f["steps"] = max(1, round(f["epochs"] * data.steps_per_epoch(len(run["sets"]["train"]),
                                                                     f["batch_size"])))
    run["put_batch"], run["replicate"] = cluster.data_parallel(
        {k: run["f"][k] for k in ("batch_size", "eval_batch_size")})
    run["evaluators"] = evaluation.make_evaluators(run)
    run["held"] = "validation" if "validation" in run["sets"] else "test"  # what picks the best
    if args.eval_only:
        return from_checkpoint(run, ckpt, args)
    run["args"], run["baseline"] = args, data.histogram_baselines(
        run["sets"], f["dataset"], f.get("data_dir"), f.get("validation"), f.get("train_images"))
    state, plan = initial_state(run, ckpt)
    del ckpt["arrays"]  # the host copy of a restored state is no longer needed
    print(json.dumps({"flags": f, "config": dataclasses.asdict(cfg)}), flush=True)
    print(timing.run_line(f, cfg, state["params"], run["sets"], run["baseline"]), flush=True)
    return train(run, run["replicate"](state), run["meta"]["step"] if run["meta"] else 0, plan)


def initial_state(run: dict, ckpt: dict) -> tuple[dict, dict | None]:
    """The state training starts from: the checkpoint's, or a new one (random init, or
    --init_from another run's params; a model with "data_init" then initialises from the first
    batch). A new --time_budget run first times this machine for its step count (trial_plan).
    metrics.jsonl keeps the records up to the step training starts from."""
    f, cfg, model, meta = run["f"], run["cfg"], run["model"], run["meta"]
    cluster.on_main(checkpoints.start_metrics, in_workdir(run, "metrics.jsonl"),
                    meta["step"] if meta else None, {"step": 0} | {
                        f"baseline_{k}_bpd": v for k, v in run["baseline"].items()})
    if meta:
        print(f"Resuming {run['workdir']} at step {meta['step']}.", flush=True)
        template = checkpoints.state_template(cfg, make_optimizer(f), model["init"])
        return checkpoints.restore(ckpt["arrays"], template, ckpt["path"]), None
    rng = jax.random.key_data(jax.random.key(f["seed"]))
    key = run_keys(jax.random.wrap_key_data(rng))["init"]
    if f.get("init_from"):
        params, perms = checkpoints.load_params(
            f["init_from"], checkpoints.state_template(cfg, None, model["init"]), cfg)
    else:
        params, perms = jax.jit(model["init"])(key, cfg)
    if "data_init" in model and not f.get("init_from"):  # e.g. ActNorm: the first batch's stats
        first = run["sets"]["train"][data.batch_indices(len(run["sets"]["train"]),
                                                        f["batch_size"], f["seed"], 0)]
        params = model["data_init"](params, perms, jet.dequantize(key, first), cfg)
    params, perms = run["replicate"]((params, perms))
    plan = trial_plan(run, params, perms, rng) if "steps" not in f else None
    return new_state(params, perms, make_optimizer(f), rng), plan


def trial_plan(run: dict, params, perms, rng) -> dict:
    """--time_budget: times this machine with a trial step, the run's evaluations and sample
    grid on a copy of the initial state, laid out as the loop's (so the evaluations and grid
    compile once, for the trial and the run), then sets the step count and the cadences the
    command left open (timing.plan_budget)."""
    trial = run["f"] | {"steps": 10 ** 6}  # any schedule: the steps' cost is the same
    model = run["replicate"]({"params": params, "perms": perms, "rng": rng})
    state = run["replicate"](new_state(*jax.tree.map(jnp.copy, (params, perms)),
                                       make_optimizer(trial), jnp.copy(rng)))  # to be donated
    return timing.plan_budget(run, make_train_step(run["cfg"], trial, run["model"]["forward"]),
                              state, model, lambda: sample_rows(run, model))


def from_checkpoint(run: dict, ckpt: dict, args) -> dict:
    """--sample N: a grid of samples from the workdir's latest checkpoint (see sample_rows).
    --eval_only: its test (and validation) bits/dim; for a conditional run also the accuracy
    of classifying by likelihood and the bits/dim under the zero context."""
    state = checkpoints.restore(ckpt["arrays"], checkpoints.state_template(
        run["cfg"], None, run["model"]["init"]), ckpt["path"])
    if args.sample:
        presets.check_label_flag(args.labels, run["cfg"].context_dim)
        labels = "_labels" + ",".join(map(str, args.labels)) if args.labels else ""
        temperatures = ",".join(f"{t:g}" for t in args.temperature)
        path = in_workdir(run, f"samples_T{temperatures}_n{args.sample}{labels}.png")
        cluster.on_main(pictures.write_grid, path,
                        sample_rows(run, state, args.sample, args.temperature, args.labels))
        print(f"Wrote samples to {path}.", flush=True)
        return {"samples": path}
    state, result = run["replicate"](state), {"step": ckpt["meta"]["step"]}
    for name in ("validation", "test"):
        if name in run["evaluators"]:
            stats = run["evaluators"][name](state, run_keys(jax.random.wrap_key_data(
                state["rng"]))["eval"], classify=name == "test")
            result |= {f"{name}_{stat}": v for stat, v in stats.items()}
    print(f"step {result['step']} | " + evaluation.eval_line(result), flush=True)
    return result


CHECK_IMAGES = 32  # test images an exported model carries, with their bits/dim (check.npz)


def export(run: dict, ckpt: dict, out: str) -> dict:
    """--export DIR: the workdir's latest model without its optimizer state, DIR/checkpoint.npz
    (with the run's metadata), its metrics.jsonl and curve.svg, and DIR/check.npz: the first
    CHECK_IMAGES test images (and labels) with their mean bits/dim under the noise of
    jax.random.key(0) (a conditional model: given their labels), so that a copy of the model
    can be checked without the dataset."""
    cfg, model, meta = run["cfg"], run["model"], ckpt["meta"]
    state = checkpoints.restore(ckpt["arrays"], checkpoints.state_template(
        cfg, None, model["init"]), ckpt["path"])
    os.makedirs(out, exist_ok=True)
    checkpoints.save(os.path.join(out, "checkpoint.npz"), state,
                     meta | {"log_window": [], "exported_from": run["workdir"]})
    images = run["sets"]["test"][:CHECK_IMAGES]
    labels = run["sets"].get("test_labels", np.zeros(len(images), np.int64))[:CHECK_IMAGES]
    context = ({"context": evaluation.class_context(labels, cfg.context_dim)}
               if cfg.context_dim else {})
    x = jet.dequantize(jax.random.key(0), jnp.asarray(images))
    z, logdet = jax.jit(model["forward"])(state["params"], state["perms"], x, cfg, **context)
    bpd = float(jet.bits_per_dim(z, logdet).mean())
    np.savez(os.path.join(out, "check.npz"), images=images, labels=labels, bpd=np.float64(bpd))
    for name in ("metrics.jsonl", "curve.svg"):
        if os.path.exists(in_workdir(run, name)):
            shutil.copyfile(in_workdir(run, name), os.path.join(out, name))
    print(f"Exported {ckpt['path']} (step {meta['step']}) to {out}: {CHECK_IMAGES} test images "
          f"score {bpd:.4f} bits/dim under fixed noise (check.npz).", flush=True)
    return {"export": out, "check_bpd": bpd, "step": meta["step"]}


if __name__ == "__main__":
    try:
        main(restart=True)
    except (ValueError, FloatingPointError) as e:  # one clear line, no traceback
        sys.exit(f"train.py: error: {e}")
