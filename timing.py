"""How long a run takes: FLOPs per image and the estimate they give on an accelerator; the
--time_budget planner, which times this machine, sets the step count and re-times it while the
run goes; the clock that separates training time from evaluations and recompilations; and the
restart with huge pages that makes CPU steps faster.
"""

import math
import os
import platform
import sys
import time

import jax
import numpy as np

import cluster
import data
import jet


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "unknown"
    days, rest = divmod(int(seconds), 86400)
    return (f"{days}d " if days else "") + time.strftime("%H:%M:%S", time.gmtime(rest))


# ------------------------------------------------------------------------------------------
# FLOPs


def forward_flops(cfg: jet.Config) -> int:
    """Multiply-adds x 2 of one image's forward pass (matmuls only; ~99% of the work)."""
    N, D, E = cfg.num_tokens, cfg.token_dim, cfg.emb_dim
    M = cfg.mlp_dim or 4 * E
    block = 4 * N * E * E + 2 * N * N * E + 2 * N * E * M  # q, k, v, out; scores, mix; MLP
    # A class context (one token of context_dim): queries and output, keys and values, mix.
    context = 2 * N * E * E + 2 * (cfg.context_dim or 0) * E + 2 * N * E if cfg.context_dim else 0
    return 2 * cfg.depth * (N * (D // 2) * E + context + cfg.block_depth * block + N * E * D)


# Dense bfloat16 matmul peaks in TFLOP/s (vendors' data sheets), by device_kind substring.
PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125,
               "V100": 125, "T4": 65, "TPU v4": 275, "TPU v5 lite": 197, "TPU v5p": 459,
               "TPU v6 lite": 918}
UTILISATION = 0.5  # of that peak, for the estimate: what a well-fed transformer step reaches


def estimate_line(f: dict, cfg: jet.Config) -> str | None:
    """The run's time at UTILISATION of the devices' bf16 peak, from its FLOPs: a training
    image costs 3x the forward pass, 4x with remat (the forward runs twice)."""
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    if jax.default_backend() == "cpu" or peak is None:
        return None
    flop = (4 if f["remat"] else 3) * forward_flops(cfg) * f["steps"] * f["batch_size"]
    seconds = flop / (UTILISATION * peak * 1e12 * jax.device_count())
    fp32 = " (float32 matmuls: several times longer)" if f.get("dtype") == "float32" else ""
    return (f"Estimate: {flop / 1e18:.2f} EFLOP at {UTILISATION:.0%} of {jax.device_count()} x "
            f"{kind}'s {peak} TFLOP/s bf16 peak: {format_seconds(seconds)}{fp32}.")


def run_line(f: dict, cfg: jet.Config, params, sets: dict, baseline: dict) -> str:
    """A run's sizes on one line: parameters, FLOPs per image, devices, images and steps; the
    trivial baseline's bits/dim (data.histogram_baselines) on the next; on an accelerator a
    third with the run's estimated time."""
    flops, count = forward_flops(cfg), sum(x.size for x in jax.tree.leaves(params))
    lines = [f"{count:,} parameters | {flops / 1e9:.3f} GFLOP/image forward, ~"
             f"{3 * flops / 1e9:.3f} to train | {jax.device_count()} "
             f"{jax.devices()[0].platform} device(s) | {len(sets['train'])} train / "
             f"{len(sets.get('validation', ()))} validation / {len(sets['test'])} test images | "
             f"{f['steps']} steps of {f['batch_size']}",
             "A per-pixel histogram of the training images (no model) scores " + " and ".join(
                 f"{v:.3f} bits/dim on the {k} set" for k, v in baseline.items())]
    return "\n".join(lines + [line for line in [estimate_line(f, cfg)] if line])


# ------------------------------------------------------------------------------------------
# The clock: training time, without the evaluations and recompilations between steps

IMPORTED = time.time()


def process_start() -> float:
    """When this process started, as time.time(): what a --time_budget counts from, imports,
    data loading and the huge-page restart (an exec: the same process) included. Read from
    Linux's /proc (to the clock tick); elsewhere, or if that reads wrong, when this module
    was imported."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        start = boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return IMPORTED
    return start if IMPORTED - 600 < start <= IMPORTED + 1 else IMPORTED


def start_clock(step: int) -> dict:
    """Started after the first step (which compiles): time and step of the start, the seconds
    since spent on other things (`pause`), and a mark (time, step, paused) that log lines
    measure their rate from."""
    now = time.time()
    return {"start": now, "step": step, "paused": 0.0, "mark": (now, step, 0.0)}


def pause(clock: dict, since: float) -> None:
    """Counts the time since `since` (an evaluation, a recompilation) as not training."""
    clock["paused"] += time.time() - since


def mark(clock: dict, step: int) -> None:
    clock["mark"] = (time.time(), step, clock["paused"])


def seconds_per_step(clock: dict, step: int) -> float:
    """Training seconds per step since the clock started."""
    return (time.time() - clock["start"] - clock["paused"]) / max(step - clock["step"], 1)


def steps_per_s(clock: dict, step: int) -> float:
    """Training steps per second since the mark."""
    t, s, paused = clock["mark"]
    return (step - s) / max(time.time() - t - (clock["paused"] - paused), 1e-9)


# ------------------------------------------------------------------------------------------
# --time_budget: the step count that fills the budget on this machine

# The share of the budget that is planned; the re-timing: every `every` steps (the first
# checkpoint interval of the plan, about a 30th of the run) until the last RETIME_LAST of
# those intervals, the count is corrected when it is more than RETIME_CHANGE off: shortened as
# far as the time left needs, lengthened by at most RETIME_MAX at once and never past what
# fits. The rate it projects is that of the last RATE_WINDOW intervals, so a host that slows
# down late is caught late. The learning-rate schedule continues from where it was
# (train.schedule), so a new count never makes it jump.
BUDGET_USED, RETIME_CHANGE, RETIME_MAX, RETIME_LAST, RATE_WINDOW = 0.95, 0.02, 0.25, 2, 3
EVALS = 6  # evaluations in a budgeted run at most; 30 checkpoints, 100 log lines
EVAL_SHARE, FINAL_SHARE = 0.1, 0.15  # of a budget, for the periodic evaluations and for the
# last evaluation's classification by likelihood (a conditional model's: a pass per class)


def time_machine(step, evaluate, grid, eval_images: int, seconds: float) -> dict:
    """Times this machine for a budget: step(i) dispatches training step i and returns its
    output; evaluate(n) evaluates the first n images of every periodic set and returns how
    many images that was in all; grid() draws a sample grid. Each is called once to compile,
    then timed warm: the steps and the evaluation for about `seconds` each, the steps
    dispatched back to back as the training loop does. Returns seconds of compilation, a
    step, an evaluated image and a grid."""
    t0 = time.time()
    jax.block_until_ready(step(0))
    compile_s = time.time() - t0
    jax.block_until_ready(step(1))  # its output's layout may differ from the fresh state's
    t0 = time.time()
    jax.block_until_ready(step(2))
    n = max(3, int(seconds / (time.time() - t0)))
    t0 = time.time()
    jax.block_until_ready([step(i) for i in range(3, 3 + n)][-1])
    step_s = (time.time() - t0) / n
    evaluate(eval_images)  # compiles
    t0 = time.time()
    evaluate(eval_images)
    n = max(eval_images, int(eval_images * seconds / (time.time() - t0)))  # ~`seconds` more
    t0 = time.time()
    count = evaluate(n)  # every set's images: the held-out set's and the training slice's
    image_s = (time.time() - t0) / count
    grid()  # compiles
    t0 = time.time()
    grid()
    return {"compile_s": compile_s, "step_s": step_s, "image_s": image_s,
            "grid_s": time.time() - t0}


def time_classification(test, model: dict, key, batch: int, seconds: float) -> float:
    """Seconds per image of a conditional model's classification by likelihood (the passes
    under every class, the true label and the zero context) by the test evaluator `test`,
    timed warm over about `seconds` of whole batches."""
    test(model, key, classify=True, limit=batch)  # compiles
    t0 = time.time()
    test(model, key, classify=True, limit=batch)
    n = batch * max(1, int(seconds / (time.time() - t0)))
    t0 = time.time()
    test(model, key, classify=True, limit=n)
    return (time.time() - t0) / n


def plan_budget(run: dict, step_fn, state: dict, model: dict, grid) -> dict:
    """The plan of a budgeted run (plan), from the training step step_fn on `state` (a copy of
    the initial state), the run's evaluators on `model` (params, perms and the run's key) and
    grid() (a sample grid); sets f's step count and the cadences the command left open."""
    f, cfg, evaluators, put = run["f"], run["cfg"], run["evaluators"], run["put_batch"]
    print(f"Timing this machine for --time_budget {f['time_budget']:g} min...", flush=True)
    images, bs, held = run["sets"]["train"], f["batch_size"], run["held"]
    labels = put(np.zeros(bs, np.int64)) if cfg.context_dim else None
    # Keys laid out as the run's (from its replicated key): the evaluations compile once.
    keys = dict(zip(("noise", "eval"), jax.random.split(jax.random.wrap_key_data(model["rng"]))))

    def step(i):
        nonlocal state
        batch = images[data.batch_indices(len(images), bs, 0, i)]
        state, out = step_fn(state, put(batch), i, keys["noise"], labels)
        return out

    def evaluate(n):
        for name in (held, "train"):
            evaluators[name](model, keys["eval"], limit=n)
        return sum(min(n, evaluators[name].size) for name in (held, "train"))
    seconds = min(5.0, 0.01 * 60 * f["time_budget"])
    measured = time_machine(step, evaluate, grid, 2 * f["eval_batch_size"], seconds)
    if cfg.context_dim:  # the last evaluation's classification: compiled, then timed
        measured["classify_s"] = time_classification(evaluators["test"], model, keys["eval"],
                                                     f["eval_batch_size"], seconds)
    result = plan(f, measured, run["started"], {
        "periodic": evaluators[held].size + evaluators["train"].size,
        "test": evaluators["test"].size, "test_again": held != "test",
        "classes": cfg.context_dim or 0})
    # Process 0's plan is every process's: the same steps, the same images classified.
    agreed = cluster.from_process_0({"steps": result.pop("steps"),
                                     "classify": result["classify_images"]})
    if cfg.context_dim and run["args"].classify_images is None:
        f["classify_images"] = result["classify_images"] = agreed["classify"]
    result["own_cadences"] = [k for k in ("log_every", "eval_every", "ckpt_every")
                              if getattr(run["args"], k) is None]
    set_steps(f, result, agreed["steps"])
    result["every"] = f["ckpt_every"]  # the re-timing cadence: fixed, whatever the count becomes
    return result


def plan(f: dict, measured: dict, start_time: float, images: dict) -> dict:
    """The plan of a budgeted run: training + `evals` evaluations (images["periodic"] images
    and a grid each) + the last one's extra passes + the margin = the budget. The extra passes:
    the test set (images["test"] images) once more after a held-out set, and for a conditional
    model (images["classes"] > 0) the classification, a pass per class, one with the true label
    and one with the zero context over the `classify_images` first test images
    (measured["classify_s"] an image where timed, else image_s a pass). The periodic
    evaluations take at most EVAL_SHARE of the budget (1 to EVALS of them), the classification
    at most FINAL_SHARE (a batch of images at least): on a short budget the run trains most of
    the time."""
    budget_s, image_s = 60 * f["time_budget"], measured["image_s"]
    eval_s = image_s * images["periodic"] + measured["grid_s"]
    evals = int(min(EVALS, max(1, EVAL_SHARE * budget_s // eval_s)))
    final_s, classify = image_s * images["test"] * images["test_again"], 0
    if images["classes"]:
        per_image = measured.get("classify_s", image_s * (images["classes"] + 2))
        classify = min(images["test"], f.get("classify_images") or images["test"],
                       max(f["eval_batch_size"], int(FINAL_SHARE * budget_s / per_image)))
        final_s += per_image * classify
    end = start_time + BUDGET_USED * budget_s
    left = end - time.time() - measured["compile_s"] - evals * eval_s - final_s
    steps = max(evals, int(left / measured["step_s"]))
    print(f"{measured['step_s'] * 1e3:.0f} ms/step, {evals} evaluation{'s' * (evals > 1)} of "
          f"{eval_s:.0f} s (the last one {eval_s + final_s:.0f} s), compilation "
          f"{measured['compile_s']:.0f} s: {steps} steps fit in {f['time_budget']:g} min "
          f"({time.time() - start_time:.0f} s of it gone since the command started); planned "
          f"end {clock_time(end)}, the budget's {clock_time(start_time + budget_s)}.",
          flush=True)
    return {"steps": steps, "evals": evals, "classify_images": classify, "end": end,
            "step_s": measured["step_s"], "eval_s": eval_s, "final_s": final_s,
            "compile_s": measured["compile_s"], "evals_s": [], "checks": []}


def clock_time(seconds: float) -> str:
    """A time.time() instant as the local time of day, HH:MM:SS."""
    return time.strftime("%H:%M:%S", time.localtime(seconds))


def set_steps(f: dict, plan: dict, steps: int) -> None:
    """A budgeted run's step count, and the cadences that follow from it (plan["evals"]
    evaluations, 30 checkpoints, 100 log lines) where the command did not set them."""
    cadences = {"eval_every": -(-steps // plan["evals"]), "ckpt_every": max(1, steps // 30),
                "log_every": max(1, steps // 100)}
    f.update({"steps": steps} | {k: cadences[k] for k in plan["own_cadences"]})


def retime_due(plan: dict, step: int, steps: int) -> bool:
    """Whether a budgeted run re-times at `step` of its `steps`: every plan["every"] steps,
    until its last RETIME_LAST intervals."""
    return step % plan["every"] == 0 and steps - step > RETIME_LAST * plan["every"]


def recent_seconds_per_step(plan: dict, clock: dict, step: int) -> float:
    """Training seconds per step over the last RATE_WINDOW re-timing intervals (from
    plan["checks"], the (time, step, paused) of each re-timing; since the first step where
    fewer have passed)."""
    checks = plan["checks"]
    then = checks[-RATE_WINDOW] if len(checks) >= RATE_WINDOW else (
        clock["start"], clock["step"], 0.0)
    return (time.time() - then[0] - (clock["paused"] - then[2])) / max(step - then[1], 1)


def reserve_s(plan: dict) -> float:
    """Seconds the rest of the run needs besides training: the evaluations to come, at the
    measured cost of those done (the timed one before any), and the last one's extra passes."""
    eval_s = sum(plan["evals_s"]) / len(plan["evals_s"]) if plan["evals_s"] else plan["eval_s"]
    return max(plan["evals"] - len(plan["evals_s"]), 0) * eval_s + plan["final_s"]


def retime(plan: dict, clock: dict, step: int, steps: int) -> int:
    """The step count that ends the run at the plan's end, from the recent rate of training
    (recent_seconds_per_step) and what the rest needs besides (reserve_s). A new count
    changes the schedule, so the step recompiles: `steps`, the current count, is kept unless
    it is off by more than that recompilation costs. A new count pays for it; it is shortened
    as far as the time left needs, lengthened by at most RETIME_MAX and never past what fits,
    and it is at least one step more than `step` and one step per evaluation. The timing
    phase sees a fresh process, which can be a fifth off the speed of training under way."""
    rate = recent_seconds_per_step(plan, clock, step)
    left = plan["end"] - time.time() - reserve_s(plan)  # for training
    if abs(step + left / rate - steps) * rate <= plan["compile_s"]:
        return steps
    fit = step + int((left - plan["compile_s"]) / rate)
    return max(min(fit, round((1 + RETIME_MAX) * steps)), step + 1, plan["evals"])


def retime_run(f: dict, plan: dict, clock: dict, step: int, progress: float) -> bool:
    """Re-times a budgeted run (retime; process 0's count in a multi-process run) and applies
    the new count, and the cadences that follow from it, when it is more than RETIME_CHANGE
    off; True then: the training step's schedule changes, so it must be rebuilt (pausing).
    The schedule goes on from `progress`, where its cosine is at this step
    (train.schedule_progress), and its warmup keeps its length."""
    rate = recent_seconds_per_step(plan, clock, step)
    steps = cluster.from_process_0({"steps": retime(plan, clock, step, f["steps"])})["steps"]
    plan["checks"].append((time.time(), step, clock["paused"]))
    if abs(steps - f["steps"]) <= RETIME_CHANGE * f["steps"]:
        return False
    ends = time.time() + plan["compile_s"] + (steps - step) * rate + reserve_s(plan)
    print(f"Re-timed at step {step}: {rate * 1e3:.0f} ms/step lately (the timing phase "
          f"measured {plan['step_s'] * 1e3:.0f}): {steps} steps instead of {f['steps']}, "
          f"ending about {clock_time(ends)}.", flush=True)
    f["warmup_steps"] = f.get("warmup_steps", round(f["warmup"] * f["steps"]))
    f["schedule_from"] = [step, progress]
    set_steps(f, plan, steps)
    return True


def pausing(step_fn, clock: dict):
    """step_fn(state, ...), whose first call (a new step's compilation) is not counted as
    training time; the steps dispatched before it are, so they finish before it starts."""
    compiled = False

    def call(state, *args):
        nonlocal compiled
        if not compiled:
            jax.block_until_ready(state)
        since = time.time()
        out = step_fn(state, *args)
        if not compiled:
            pause(clock, since)
            compiled = True
        return out
    return call


def warn_if_slow(f: dict, clock: dict, step: int, cpu_preset: str) -> None:
    """A warning after the first steps when the run would take more than a day here."""
    eta = (f["steps"] - step) * seconds_per_step(clock, step)
    if eta > 24 * 3600:
        print(f"WARNING: this run needs {format_seconds(eta)} more on {jax.device_count()} "
              f"{jax.devices()[0].platform} device(s). On this machine use --preset "
              f"{cpu_preset} (or --time_budget MINUTES).", flush=True)


# ------------------------------------------------------------------------------------------
# Huge pages: glibc's malloc asks for them only if told so when the process starts

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_env(environ, thp_mode: str, libc: tuple[str, str]) -> dict | None:
    """The environment that gives glibc's malloc transparent huge pages, or None where it would
    change nothing. XLA:CPU's buffers are returned and faulted in again every step; in huge
    pages each fault brings 2 MB instead of 4 KB: the cpu preset trains ~17% faster
    (docs/speed.md). Nothing to do when the kernel's THP mode (THP_MODE_FILE) is not
    `madvise` (`always` gives them already, `never` never), glibc is older than 2.35 (no
    such tunable) or GLIBC_TUNABLES already names the tunable (the user chose, or this is
    the restarted process)."""
    name, version = libc
    tunables = environ.get("GLIBC_TUNABLES", "")
    if ("[madvise]" not in thp_mode or name != "glibc" or "glibc.malloc.hugetlb" in tunables
            or tuple(int(v) for v in version.split(".")[:2]) < (2, 35)):
        return None
    return dict(environ, GLIBC_TUNABLES=":".join(filter(None, (tunables, HUGE_PAGES_TUNABLE))))


def is_the_program(path: str, module: str) -> bool:
    """Whether the file `path` (module `module`) is the program this process runs, started as
    `python path ...` or `python -m module ...`: not imported by another program, not run by
    an interactive interpreter or a notebook (IPython's %run), not read from stdin."""
    if sys.flags.interactive or hasattr(sys, "ps1") or "IPython" in sys.modules:
        return False
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None:
        return spec.name == module
    main_file = getattr(main, "__file__", None)
    return bool(main_file) and os.path.realpath(main_file) == os.path.realpath(path)


def restart_with_huge_pages(path: str, module: str) -> None:
    """The program `path` (is_the_program) restarts itself once on a CPU backend, same
    arguments, same process id, in huge_pages_env's environment, and says so. The tunable is
    read only when glibc starts, so a running process cannot set it for itself."""
    try:
        with open(THP_MODE_FILE) as f:
            thp_mode = f.read()
    except OSError:  # not Linux, or no THP
        return
    env = huge_pages_env(os.environ, thp_mode, platform.libc_ver())
    if env is None or not is_the_program(path, module) or jax.default_backend() != "cpu":
        return
    print(f"Restarting with GLIBC_TUNABLES={env['GLIBC_TUNABLES']}: transparent huge pages "
          "for malloc, ~17% faster on a CPU (docs/speed.md); --no-huge_pages runs without.",
          flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
