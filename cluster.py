"""What keeps a run alive where clusters run it: devices and processes (data parallelism, one
process per host, agreement between processes), the workdir (checked before any work, locked
while a run trains there, written by process 0 alone) and stop signals (SIGTERM from a
scheduler, Ctrl-C), which end a run at a checkpoint instead of losing its work.
"""

import contextlib
import os
import signal
import socket
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from checkpoints import os_error


# ------------------------------------------------------------------------------------------
# Devices and processes


def start_distributed(args) -> None:
    """--distributed: joins the run's other processes (jax.distributed.initialize) at the
    coordinator the three flags name, or where JAX's auto-detection finds it without them
    (SLURM, Open MPI, Cloud TPU). Bad flags are refused before anything starts."""
    given = {"coordinator_address": args.coordinator_address,
             "num_processes": args.num_processes, "process_id": args.process_id}
    named = [f"--{k}" for k, v in given.items() if v is not None]
    if not args.distributed:
        if named:
            raise ValueError(f"{', '.join(named)} only apply with --distributed; add it, or "
                             "drop them for a one-process run.")
        return
    if named and len(named) < 3:
        raise ValueError("--coordinator_address, --num_processes and --process_id go together:"
                         f" got only {', '.join(named)}. Pass all three, or none where JAX "
                         "detects the cluster (SLURM, Cloud TPU).")
    if named:
        check_coordinator(**given)
    # The CPU backend runs collectives across processes only with an implementation chosen
    # before it starts (gloo ships with jaxlib); GPU and TPU backends do not read the setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**given)


def check_coordinator(coordinator_address: str, num_processes: int, process_id: int) -> None:
    host, _, port = coordinator_address.rpartition(":")
    if not (host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"--coordinator_address must be HOST:PORT, process 0's host and a free "
                         f"port on it (e.g. 10.0.0.1:1234), got {coordinator_address!r}.")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"--num_processes must be >= 1 and --process_id in [0, "
                         f"--num_processes), got {num_processes} and {process_id}.")


def data_parallel(batch_sizes: dict[str, int]):
    """Data parallelism over every device: (put_batch, replicate). put_batch shards a global
    batch over a one-axis mesh, each process giving its slice; replicate copies a pytree (the
    state) to every device. Each named batch size must split evenly over the devices."""
    n_dev, n_proc = jax.device_count(), jax.process_count()
    for name, size in batch_sizes.items():
        if size % n_dev:
            raise ValueError(f"--{name} {size} is not divisible by the {n_dev} devices; "
                             f"use a multiple of {n_dev}.")
    mesh = jax.make_mesh((n_dev,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))

    def put_batch(global_batch: np.ndarray) -> jax.Array:
        local = np.array_split(global_batch, n_proc)[jax.process_index()]
        return jax.make_array_from_process_local_data(batch_sharding, local, global_batch.shape)

    def replicate(tree):
        return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
    return put_batch, replicate


def agree_on_error(error: Exception | None) -> None:
    """Raises `error`, and on every other process a ValueError, when it occurred on any: in a
    multi-process run a process that stopped alone would leave the others waiting in their
    next collective, and itself in JAX's shutdown barrier, for minutes."""
    if jax.process_count() > 1:
        failed = multihost_utils.process_allgather(np.int32(error is not None))
        if error is None and failed.any():
            error = ValueError(f"process {int(np.argmax(failed))} stopped with an error (its "
                               "output says which), so this process stops too.")
    if error is not None:
        raise error


def on_main(write, *args) -> None:
    """write(*args) on process 0, the one process that writes files. Every process calls it,
    so that a failure (disk full, permission denied, a vanished workdir) stops all of them
    with a ValueError that names the file and the cause."""
    error = None
    if jax.process_index() == 0:
        try:
            write(*args)
        except OSError as e:
            error = ValueError(f"cannot write {e.filename or 'in the workdir'}: {os_error(e)}. "
                               "Free space or fix the permissions, then run the same command "
                               "to resume from the last checkpoint.")
        except ValueError as e:
            error = e
    agree_on_error(error)


def from_process_0(values: dict) -> dict:
    """Process 0's values (ints) on every process."""
    if jax.process_count() == 1:
        return values
    return {k: v.item() for k, v in multihost_utils.broadcast_one_to_all(values).items()}


def check_same_checkpoint(workdir: str, meta: dict | None) -> None:
    """Every process reads the checkpoint itself, so all must have found the same one."""
    if jax.process_count() > 1:
        steps = multihost_utils.process_allgather(np.int64(-1 if meta is None else meta["step"]))
        if len(set(steps.tolist())) > 1:
            raise ValueError(f"the processes found different checkpoints in {workdir} (steps "
                             f"{steps.tolist()} by process, -1: none); --workdir must be one "
                             "directory that every host sees (a shared filesystem).")


# ------------------------------------------------------------------------------------------
# The workdir: writable, and one training run at a time


def check_workdir(workdir: str, writes: bool) -> None:
    """--workdir is a directory (or can be made one) that this user can write when the command
    `writes`: found out before any work, not when the first checkpoint is due."""
    path = os.path.abspath(workdir)
    while not os.path.exists(path):  # the nearest existing ancestor
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        problem = ("is a file" if path == os.path.abspath(workdir) else
                   f"cannot be created: {path} is a file")
        raise ValueError(f"--workdir {workdir} {problem}; pass a directory (it is created if "
                         "missing).")
    if writes and not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--workdir {workdir}: this user cannot write in {path} (permission "
                         "denied); fix its permissions or pass another --workdir.")


LOCK = ".lock"  # in the workdir while a run trains there: that process's pid and host


def take_lock(workdir: str) -> int | None:
    """A descriptor of <workdir>/.lock holding an exclusive flock, with this process's pid and
    host written in it; a ValueError naming the holder when a live process holds it. The
    kernel drops a flock when its process dies, however it dies (SIGKILL, power loss), so a
    lock file left behind never blocks the next run. Without fcntl (Windows) there is no
    lock: a warning says so and None is returned."""
    try:
        import fcntl  # POSIX only
    except ImportError:
        print(f"WARNING: this platform has no fcntl, so {workdir} is not locked: make sure no "
              "other train.py uses it.", flush=True)
        return None
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(os.path.join(workdir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 256).decode(errors="replace").strip() or "pid not yet written"
        os.close(fd)
        raise ValueError(f"{workdir} is in use by another train.py ({holder}); two runs in one "
                         "workdir would overwrite each other's checkpoints. Wait for it to end,"
                         " stop it, or pass another --workdir.") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    return fd


@contextlib.contextmanager
def workdir_lock(workdir: str, training: bool):
    """Holds the workdir's lock (take_lock) while a training run uses it. Process 0 takes it
    for the whole run, and its refusal stops every process. A workdir made here and still
    empty at the end (the run stopped on bad input) is removed again."""
    fd, error, made = None, None, not os.path.isdir(workdir)
    if training and jax.process_index() == 0:
        try:
            fd = take_lock(workdir)
        except OSError as e:  # e.g. a filesystem without locks
            error = ValueError(f"cannot lock {workdir}/{LOCK}: {os_error(e)}.")
        except ValueError as e:
            error = e
    try:
        agree_on_error(error)
        yield
    finally:
        if fd is not None:
            if made and os.listdir(workdir) == [LOCK]:
                os.remove(os.path.join(workdir, LOCK))
                os.rmdir(workdir)
            os.close(fd)  # after the removal: no other run can hold the lock in between


# ------------------------------------------------------------------------------------------
# Stop signals: finish the step, checkpoint it, exit


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; what a scheduler sends to preempt


@contextlib.contextmanager
def stop_signals():
    """While it lasts, SIGINT and SIGTERM only ask the training loop to stop (the yielded
    dict's "signal"): it finishes the step in flight, checkpoints it and exits. A second one
    exits at once. Afterwards the previous handlers are back. A signal that this process
    ignores stays ignored (a shell's background job ignores Ctrl-C); handlers can only be set
    from the main thread, so elsewhere nothing changes."""
    stop = {"signal": 0, "flags": {}, "sent": []}
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def ask(signum, frame):
        if stop["signal"]:
            raise SystemExit(128 + signum)
        stop["signal"] = signum
    if threading.current_thread() is not threading.main_thread():
        previous = {}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, ask)
    try:
        yield stop
    finally:
        for s, handler in previous.items():  # None: a handler set outside Python (JAX's)
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


max_jit = jax.jit(jnp.max)  # the stop agreement's all-reduce
STOP_LAG = 2  # steps from sending a stop flag to reading the agreement: by then it has run


def agreed_stop(stop: dict, put_batch) -> int:
    """The signal on which every process stops after this step; 0: go on. One process reads
    its own flag. Several agree on the largest flag with a tiny all-reduce, sent after every
    step and read STOP_LAG steps later: it runs behind the training steps instead of stalling
    the host, and every process reads the same value after the same step."""
    if jax.process_count() == 1:
        return stop["signal"]
    if stop["signal"] not in stop["flags"]:  # one transfer per value, not one per step
        stop["flags"][stop["signal"]] = put_batch(
            np.full(jax.device_count(), stop["signal"], np.int32))
    stop["sent"].append(max_jit(stop["flags"][stop["signal"]]))
    return int(stop["sent"].pop(0)) if len(stop["sent"]) > STOP_LAG else 0


def stopped(signum: int, step: int, total: int, checkpoint: str) -> SystemExit:
    """The exit of a run stopped by a signal, after its checkpoint: one line saying where it
    stopped and how to resume; exit code 128 + the signal's number (130 for SIGINT, 143 for
    SIGTERM), as a process killed by it would have."""
    print(f"train.py: stopped by {signal.Signals(signum).name} at step {step}/{total}; "
          f"checkpoint written to {checkpoint}; run the same command to resume.", flush=True)
    return SystemExit(128 + signum)
