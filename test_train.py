"""train.py end to end: download -> checksum -> parse -> train -> eval -> PNG -> kill -> resume,
on one and two devices, and every kind of bad input. Small models on tiny data; each run of
train.py is a few seconds, mostly compilation (shared between runs by a persistent cache)."""

import dataclasses
import errno
import fcntl
import json
import math
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import re
import time
import types
import zlib
from xml.etree import ElementTree

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bench
import checkpoints
import cluster
import data
import evaluation
import jet
import pictures
import presets
import timing
import train
from conftest import make_cifar_tar, random_params, serve

HERE = os.path.dirname(os.path.abspath(__file__))
SVG = "{http://www.w3.org/2000/svg}"
# 3 couplings of width 16 on 32x32 CIFAR-layout images: compiles in seconds.
SMALL = ["--preset", "tiny", "--depth", "3", "--emb_dim", "16", "--num_heads", "2",
         "--batch_size", "16", "--eval_batch_size", "24", "--log_every", "2"]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent XLA cache shared by this module's in-process and subprocess runs."""
    path = str(tmp_path_factory.mktemp("xla_cache"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield path
    jax.config.update("jax_compilation_cache_dir", None)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory, compile_cache):
    """A 160-train / 32-test-record archive in the real CIFAR-10 binary layout and its md5."""
    root = tmp_path_factory.mktemp("cifar")
    return root, make_cifar_tar(root / "cifar-10-binary.tar.gz", n=32)


def run_train(*argv):
    """train.main in this process; returns its result dict."""
    return train.main([str(a) for a in argv])


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def comparable(records):
    """metrics.jsonl's records without the ones that measure this machine's speed."""
    return [{k: v for k, v in r.items() if k not in ("img_per_s", "time_s")} for r in records]


def subprocess_env(env_extra=None) -> dict:
    """This environment, with the module's compilation cache, plus `env_extra`."""
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **(env_extra or {}))


def run_subprocess(argv, env_extra=None, **kwargs):
    return subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=subprocess_env(env_extra), cwd=HERE, **kwargs)


# ------------------------------------------------------------------------------------------
# The whole path, interrupted and resumed


@pytest.mark.slow
def test_download_train_eval_png_kill_resume(cifar, tmp_path):
    """Served over HTTP on 127.0.0.1 the archive is downloaded and checked, training logs and
    evaluates and writes PNG grids and checkpoints; a run SIGKILLed mid-way and re-run with the
    same command ends with exactly the metrics and test bpd of an uninterrupted run."""
    root, md5 = cifar
    data_dir = tmp_path / "data"
    with serve(root) as base:
        common = [*SMALL, "--dataset", "cifar10", "--data_dir", data_dir, "--data_md5", md5,
                  "--data_url", f"{base}/cifar-10-binary.tar.gz", "--steps", 16,
                  "--eval_every", 8, "--ckpt_every", 4, "--log_every", 3]
        reference = run_train(*common, "--workdir", tmp_path / "reference")
    # cached, beside the histogram baseline of its test set; nothing else
    assert sorted(os.listdir(data_dir)) == ["baselines.json", "cifar-10-binary.tar.gz"]
    records = metrics(tmp_path / "reference")
    assert records[0] == {"step": 0, "baseline_test_bpd": pytest.approx(8.148, abs=1e-3)}
    assert [r["step"] for r in records if "test_bpd" in r] == [8, 16]
    assert records[-1]["test_bpd"] == reference["test_bpd"]
    assert {"epoch", "train_bpd", "lr", "grad_norm", "img_per_s", "time_s"} <= set(records[1])
    assert sorted(p for p in os.listdir(tmp_path / "reference") if p.endswith(".png")) == [
        "samples_0000008.png", "samples_0000016.png"]
    assert curve_points(tmp_path / "reference" / "curve.svg") == {
        "train": [(r["step"], r["train_bpd"]) for r in records if "train_bpd" in r],
        "held": [(r["step"], r["test_bpd"]) for r in records if "test_bpd" in r],
        "baseline": [(0, records[0]["baseline_test_bpd"]),
                     (16, records[0]["baseline_test_bpd"])]}

    # The same command, killed after step 9 (the server is gone: data comes from the cache).
    # Checkpoints (every 4) fall inside log windows (every 3), which must survive the resume.
    workdir = tmp_path / "killed"
    argv = [*common, "--workdir", workdir]
    proc = run_subprocess(argv)
    for line in proc.stdout:
        if line.startswith("step 9/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 8 <= json.loads(str(np.load(workdir / "checkpoint.npz")["meta"]))["step"] <= 12
    with open(workdir / "checkpoint.npz.tmp", "wb") as f:  # as if killed while writing
        f.write(b"PK\x03\x04 half a checkpoint")
    resumed = run_train(*argv)
    assert resumed["test_bpd"] == reference["test_bpd"]
    assert comparable(metrics(workdir)) == comparable(records)

    # The finished run answers --eval_only and --sample from its checkpoint alone.
    again = run_train("--workdir", workdir, "--eval_only")
    assert again == {"step": 16, "test_bpd": reference["test_bpd"]}
    out = run_train("--workdir", workdir, "--sample", 10, "--temperature", 0.8)
    # 3 rows of 4, each 32x32 image upscaled 4x (to ~512 pixels across) with 2-pixel gaps
    assert png_size(out["samples"]) == (3 * 130 + 2, 4 * 130 + 2)


@pytest.mark.slow
def test_interrupted_checkpoint_write_resumes_exactly(cifar, tmp_path, monkeypatch):
    """Interrupted between writing a checkpoint's temporary file and renaming it, a run
    resumes from the previous checkpoint and still ends exactly like an uninterrupted one."""
    root, md5 = cifar
    argv = [*SMALL, "--dataset", "cifar10", "--data_dir", root, "--data_md5", md5,
            "--steps", 8, "--eval_every", 8, "--ckpt_every", 3]
    reference = run_train(*argv, "--workdir", tmp_path / "reference")
    calls = []

    def replace_then_die(src, dst):
        if str(dst).endswith("checkpoint.npz"):
            calls.append(dst)
            if len(calls) == 2:
                raise KeyboardInterrupt  # the process dies here, the .tmp is complete
        return os.rename(src, dst)
    monkeypatch.setattr(checkpoints.os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_train(*argv, "--workdir", tmp_path / "run")
    monkeypatch.undo()
    meta = json.loads(str(np.load(tmp_path / "run" / "checkpoint.npz")["meta"]))
    assert meta["step"] == 3
    assert run_train(*argv, "--workdir", tmp_path / "run") == reference


@pytest.mark.slow
def test_two_devices_give_the_losses_of_one(tmp_path):
    """Data parallel over 2 (forced host) devices: the same losses and test bpd as 1 device,
    within float tolerance; a batch that does not split over the devices is refused."""
    argv = [*SMALL, "--dataset", "synthetic", "--steps", 6, "--eval_every", 6]
    results = {}
    for n in (1, 2):
        proc = run_subprocess([*argv, "--workdir", tmp_path / str(n)], env_extra={
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"})
        output = proc.communicate()[0]
        assert proc.returncode == 0, output
        assert f"{n} cpu device(s)" in output
        results[n] = metrics(tmp_path / str(n))
    for one, two in zip(results[1], results[2]):
        for key in ("train_bpd", "test_bpd", "grad_norm"):
            if key in one:
                np.testing.assert_allclose(two[key], one[key], rtol=2e-5)
    proc = run_subprocess([*argv, "--batch_size", 15, "--workdir", tmp_path / "odd"],
                          env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    output = proc.communicate()[0]
    assert proc.returncode == 1 and "not divisible by the 2 devices" in output


# ------------------------------------------------------------------------------------------
# What clusters do to runs: many processes, preemption, full disks, two runs in one workdir

# docs/training.md's two-process command: a few dozen steps of a tiny model on synthetic images.
TWO_PROCESS = [*SMALL, "--dataset", "synthetic", "--steps", 48, "--eval_every", 24,
               "--ckpt_every", 7]
PROCESS_TIMEOUT_S = 300  # a hung collective fails the test instead of hanging CI


def permissions_apply() -> bool:
    """Whether a read-only directory keeps this process out (root overrides permissions)."""
    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o500)
        try:
            return not os.access(d, os.W_OK)
        finally:
            os.chmod(d, 0o700)


PERMISSIONS_APPLY = permissions_apply()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(argv, logs, n=2) -> list[subprocess.Popen]:
    """train.py as the n processes of one run on 127.0.0.1, one CPU device each (no forced
    host devices), process i writing its output to logs/process<i>.log."""
    port, procs = free_port(), []
    for i in range(n):
        with open(logs / f"process{i}.log", "w") as log:
            procs.append(subprocess.Popen(
                [sys.executable, os.path.join(HERE, "train.py"), *map(str, argv),
                 "--distributed", "--coordinator_address", f"127.0.0.1:{port}",
                 "--num_processes", str(n), "--process_id", str(i)],
                stdout=log, stderr=subprocess.STDOUT, cwd=HERE,
                env=subprocess_env({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})))
    return procs


def wait_all(procs, logs) -> list[str]:
    """Every process's output once all have ended; all are killed if one outlives the
    timeout."""
    deadline = time.time() + PROCESS_TIMEOUT_S
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [(logs / f"process{i}.log").read_text() for i in range(len(procs))]


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_two_devices(tmp_path, compile_cache):
    """Two processes on 127.0.0.1 (one CPU device each, gloo collectives), the second sent
    SIGTERM mid-run: both stop after the same step with exit code 143, and the same commands
    resume them. The run ends with the metrics.jsonl losses and test bits/dim of one process
    holding two forced host devices, to float32 tolerance, and process 0 alone wrote the
    workdir: the same files, one record per event."""
    proc = run_subprocess([*TWO_PROCESS, "--workdir", tmp_path / "one"],
                          env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    output = proc.communicate(timeout=PROCESS_TIMEOUT_S)[0]
    assert proc.returncode == 0, output
    argv = [*TWO_PROCESS, "--workdir", tmp_path / "two"]
    procs, deadline = start_processes(argv, tmp_path), time.time() + PROCESS_TIMEOUT_S
    while "\nstep 4/" not in (tmp_path / "process0.log").read_text():
        assert procs[0].poll() is None and time.time() < deadline, wait_all(procs, tmp_path)
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    outputs = wait_all(procs, tmp_path)
    assert [p.returncode for p in procs] == [143, 143], outputs
    stops = [[line for line in out.splitlines() if "stopped by" in line] for out in outputs]
    assert len(stops[0]) == 1 and stops[0] == stops[1], stops
    step = int(stops[0][0].split(" at step ")[1].split("/")[0])
    assert 4 <= step < 48
    assert json.loads(str(np.load(tmp_path / "two" / "checkpoint.npz")["meta"]))["step"] == step

    procs = start_processes(argv, tmp_path)
    outputs = wait_all(procs, tmp_path)
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert all(f"Resuming {tmp_path / 'two'} at step {step}." in out for out in outputs)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [sorted(r) for r in two] == [sorted(r) for r in one]
    for a, b in zip(one, two):
        assert a["step"] == b["step"]
        for key in ("train_bpd", "grad_norm", "test_bpd", "train_eval_bpd"):
            if key in a:
                np.testing.assert_allclose(b[key], a[key], rtol=2e-5, err_msg=key)
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_at_a_checkpoint_and_the_same_command_resumes(
        tmp_path, monkeypatch, capsys, compile_cache, signum, request):
    """SIGTERM (preemption) or SIGINT (Ctrl-C) at a random step: that step finishes and is
    checkpointed, one line says where the run stopped and how to resume, the exit code is
    128 + the signal's number, and the previous signal handlers are back. The same command
    then ends with exactly the figures of an uninterrupted run."""
    argv = [*SMALL, "--dataset", "synthetic", "--steps", 12, "--eval_every", 6,
            "--ckpt_every", 5]
    reference = run_train(*argv, "--workdir", tmp_path / "reference")
    at, steps, agreed_stop = random.randrange(1, 12), [], cluster.agreed_stop

    def signal_at(stop, put_batch):  # asked after every step: the n-th time after step n
        steps.append(len(steps) + 1)
        if steps[-1] == at:
            os.kill(os.getpid(), signum)
        return agreed_stop(stop, put_batch)
    monkeypatch.setattr(cluster, "agreed_stop", signal_at)
    if signal.getsignal(signum) is signal.SIG_IGN:  # a shell's background job ignores Ctrl-C,
        previous = signal.signal(signum, signal.default_int_handler)  # and so would train.py
        request.addfinalizer(lambda: signal.signal(signum, previous))
    handlers = [signal.getsignal(s) for s in cluster.STOP_SIGNALS]
    with pytest.raises(SystemExit) as exit_info:
        run_train(*argv, "--workdir", tmp_path / "run")
    monkeypatch.undo()
    assert exit_info.value.code == 128 + signum, f"signal at step {at}"
    assert [signal.getsignal(s) for s in cluster.STOP_SIGNALS] == handlers
    checkpoint = tmp_path / "run" / "checkpoint.npz"
    assert (f"train.py: stopped by {signum.name} at step {at}/12; checkpoint written to "
            f"{checkpoint}; run the same command to resume.\n") in capsys.readouterr().out
    assert json.loads(str(np.load(checkpoint)["meta"]))["step"] == at
    assert run_train(*argv, "--workdir", tmp_path / "run") == reference, f"signal at {at}"
    assert comparable(metrics(tmp_path / "run")) == comparable(metrics(tmp_path / "reference"))


def test_stop_signals_ask_once_then_exit_and_leave_handlers_as_they_were():
    """Inside stop_signals a first SIGTERM or SIGINT only sets the stop flag and a second one
    exits at once (128 + its number); a signal the process ignores stays ignored; on leaving,
    the previous handlers are back."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        before = [signal.getsignal(s) for s in cluster.STOP_SIGNALS]
        with cluster.stop_signals() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop["signal"] == signal.SIGTERM
            with pytest.raises(SystemExit) as exit_info:
                os.kill(os.getpid(), signal.SIGTERM)
            assert exit_info.value.code == 128 + signal.SIGTERM
        assert [signal.getsignal(s) for s in cluster.STOP_SIGNALS] == before
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
@pytest.mark.parametrize("cause", ["ENOSPC", "EACCES"])
def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_last(
        tmp_path, monkeypatch, capsys, compile_cache, cause):
    """A disk that fills up while a checkpoint is written (ENOSPC, after its first bytes), or
    a workdir that refuses the rename (EACCES): the run stops with an error naming the file
    and the cause, the previous checkpoint is intact and no temporary file is left. Once the
    disk is fixed, the same command ends like an uninterrupted run."""
    argv = [*SMALL, "--dataset", "synthetic", "--steps", 8, "--eval_every", 8,
            "--ckpt_every", 3]
    reference = run_train(*argv, "--workdir", tmp_path / "reference")
    path = str(tmp_path / "run" / "checkpoint.npz")
    savez, replace, written = np.savez, os.replace, []

    def full_disk(file, **arrays):
        if file.name == f"{path}.tmp":
            written.append(path)
            if len(written) == 2 and cause == "ENOSPC":
                file.write(b"PK\x03\x04 the first bytes of a checkpoint")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        savez(file, **arrays)

    def denied(src, dst):
        if str(dst) == path and len(written) == 2 and cause == "EACCES":
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        replace(src, dst)
    monkeypatch.setattr(np, "savez", full_disk)
    monkeypatch.setattr(checkpoints.os, "replace", denied)
    expect_error(capsys, f"cannot write the checkpoint {path}: "
                 f"{os.strerror(getattr(errno, cause))} ({cause}); the previous one is untouched",
                 *argv, "--workdir", tmp_path / "run")
    monkeypatch.undo()
    assert json.loads(str(np.load(path)["meta"]))["step"] == 3
    assert not [name for name in os.listdir(tmp_path / "run") if name.endswith(".tmp")]
    assert run_train(*argv, "--workdir", tmp_path / "run") == reference
    assert comparable(metrics(tmp_path / "run")) == comparable(metrics(tmp_path / "reference"))


@pytest.mark.slow
@pytest.mark.skipif(not PERMISSIONS_APPLY, reason="this process writes in read-only "
                    "directories (root); the test above simulates the same failure")
def test_a_workdir_made_read_only_stops_the_run_and_keeps_the_last_checkpoint(
        tmp_path, monkeypatch, capsys):
    """A workdir made read-only (chmod 500) before the second checkpoint: the run stops with
    EACCES naming the file; the first checkpoint is intact and no temporary file is left."""
    argv = [*SMALL, "--dataset", "synthetic", "--steps", 8, "--eval_every", 8,
            "--ckpt_every", 3, "--workdir", tmp_path / "run"]
    save, calls = checkpoints.save, []

    def read_only_then_save(path, state, meta):
        calls.append(path)
        if len(calls) == 2:
            os.chmod(tmp_path / "run", 0o500)
        save(path, state, meta)
    monkeypatch.setattr(checkpoints, "save", read_only_then_save)
    try:
        expect_error(capsys, "checkpoint.npz: Permission denied (EACCES); the previous one is "
                     "untouched", *argv)
    finally:
        os.chmod(tmp_path / "run", 0o700)
    assert json.loads(str(np.load(tmp_path / "run" / "checkpoint.npz")["meta"]))["step"] == 3
    assert not [name for name in os.listdir(tmp_path / "run") if name.endswith(".tmp")]


def test_a_workdir_held_by_a_live_run_is_refused_and_a_stale_lock_is_taken(tmp_path, capsys):
    """While another open file holds the workdir's lock (flock), a run there is refused at once,
    naming the holder written in the lock file; a lock file nobody holds (its run died) is
    taken over, with this process's pid."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    with open(workdir / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on elsewhere, since 2025-01-01 00:00:00\n")
        held.flush()
        expect_error(capsys, "in use by another train.py (pid 4242 on elsewhere, since",
                     *SMALL, "--dataset", "synthetic", "--workdir", workdir)
    assert os.listdir(workdir) == [".lock"]  # still the holder's: nothing was written
    with cluster.workdir_lock(str(workdir), training=True):
        assert (workdir / ".lock").read_text().startswith(f"pid {os.getpid()} on ")


@pytest.mark.slow
def test_a_killed_run_does_not_block_its_workdir(tmp_path, capsys, compile_cache):
    """A live process holding a workdir refuses a second run, which names its pid; SIGKILLed
    (no chance to clean up), it leaves its lock file behind, and that no longer blocks."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, cluster\n"
         "with cluster.workdir_lock(sys.argv[1], training=True):\n"
         "    print('held', flush=True)\n    time.sleep(600)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, cwd=HERE, env=subprocess_env())
    argv = [*SMALL, "--dataset", "synthetic", "--steps", 2, "--eval_every", 2,
            "--workdir", tmp_path]
    try:
        assert holder.stdout.readline() == "held\n"
        expect_error(capsys, f"in use by another train.py (pid {holder.pid} on ", *argv)
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / ".lock").exists()
    assert run_train(*argv)["step"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--workdir", "{file}"], "is a file; pass a directory"),
    (["--workdir", "{file}/run"], "cannot be created: {file} is a file"),
    (["--data_md5", "zzz"], "--data_md5 must be an md5 checksum (32 hex digits), got 'zzz'"),
    (["--coordinator_address", "127.0.0.1:1234"], "only apply with --distributed"),
    (["--distributed", "--num_processes", 2], "go together: got only --num_processes"),
    (["--distributed", "--coordinator_address", "127.0.0.1", "--num_processes", 2,
      "--process_id", 0], "--coordinator_address must be HOST:PORT"),
    (["--distributed", "--coordinator_address", "127.0.0.1:1234", "--num_processes", 2,
      "--process_id", 2], "--process_id in [0, --num_processes), got 2 and 2"),
])
def test_bad_paths_checksums_and_process_flags_are_refused_before_any_work(
        tmp_path, capsys, argv, message):
    """A --workdir that is (or lies under) a file, a --data_md5 that is not an md5 and
    inconsistent multi-process flags exit with a message naming them before any work; nothing
    is written."""
    file = tmp_path / "file"
    file.write_text("not a directory")
    argv = [str(a).format(file=file) for a in argv]
    expect_error(capsys, message.format(file=file), "--dataset", "synthetic",
                 "--workdir", tmp_path / "w", *argv)
    assert os.listdir(tmp_path) == ["file"]


@pytest.mark.skipif(not PERMISSIONS_APPLY, reason="this process writes in read-only "
                    "directories (root)")
def test_an_unwritable_workdir_is_refused_before_any_work(tmp_path, capsys):
    os.chmod(tmp_path, 0o500)
    try:
        expect_error(capsys, "this user cannot write in", "--dataset", "synthetic",
                     "--workdir", tmp_path / "w")
    finally:
        os.chmod(tmp_path, 0o700)


# ------------------------------------------------------------------------------------------
# Bad input: a clear one-line error, and nothing changed


def expect_error(capsys, message, *argv, error=ValueError):
    """train.main raises `error` with `message` (the command line prints it as one line)."""
    with pytest.raises(error) as info:
        run_train(*argv)
    assert message in str(info.value), info.value


def test_bad_input_is_refused_clearly(cifar, tmp_path, capsys):
    """Checksum mismatch (nothing cached), unknown dataset, patch size that does not divide
    the image, --eval_only without a checkpoint."""
    root, md5 = cifar
    data_dir = tmp_path / "data"
    expect_error(capsys, "md5", "--dataset", "cifar10", "--data_dir", data_dir,
                 "--data_url", (root / "cifar-10-binary.tar.gz").as_uri(),
                 "--data_md5", "0" * 32, "--workdir", tmp_path / "w")
    assert not data_dir.exists() or os.listdir(data_dir) == []
    expect_error(capsys, "unknown dataset 'cifar100'", "--dataset", "cifar100",
                 "--workdir", tmp_path / "w")
    expect_error(capsys, "patch_size=5 must divide", *SMALL, "--dataset", "synthetic",
                 "--patch_size", 5, "--workdir", tmp_path / "w")
    expect_error(capsys, "need a checkpoint", "--workdir", tmp_path / "none", "--eval_only")
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_checkpoint_problems_are_refused(cifar, tmp_path, capsys):
    """Resuming with another model, a truncated checkpoint and a foreign .npz all refuse."""
    argv = [*SMALL, "--dataset", "synthetic", "--steps", 2, "--eval_every", 2]
    run_train(*argv, "--workdir", tmp_path / "run")
    expect_error(capsys, "changes the model", *argv, "--emb_dim", 32,
                 "--workdir", tmp_path / "run")
    expect_error(capsys, "changes {'lr'", *argv, "--lr", 0.1, "--workdir", tmp_path / "run")
    expect_error(capsys, "changes {'preset': ('tiny', 'cpu')", *argv, "--preset", "cpu",
                 "--workdir", tmp_path / "run")
    expect_error(capsys, "changes {'dataset': ('synthetic', 'cifar10')", *argv, "--dataset",
                 "cifar10", "--workdir", tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoint.npz"
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[: len(good) // 2])
    expect_error(capsys, "not a readable Jet checkpoint", *argv, "--workdir", tmp_path / "run")
    np.savez(ckpt, meta=np.array(json.dumps({"step": 1, "flags": {}, "config": {}})))  # foreign
    expect_error(capsys, "not a readable Jet checkpoint", "--workdir", tmp_path / "run",
                 "--eval_only")
    with open(ckpt, "wb") as f:
        f.write(open(os.path.join(HERE, "testdata", "big_vision_jet_a.npz"), "rb").read())
    expect_error(capsys, "not a readable Jet checkpoint", "--workdir", tmp_path / "run",
                 "--eval_only")


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    """An absurd learning rate blows the loss up; training stops naming the step and the
    checkpoint on disk is one from before it."""
    argv = [*SMALL, "--dataset", "synthetic", "--steps", 40, "--lr", 1e12, "--warmup", 0,
            "--ckpt_every", 1, "--eval_every", 100, "--workdir", tmp_path]
    with pytest.raises(FloatingPointError) as info:
        run_train(*argv)
    message = str(info.value)
    assert "became" in message and "at step" in message
    bad_step = int(message.split("at step ")[1].split(";")[0])
    meta = json.loads(str(np.load(tmp_path / "checkpoint.npz")["meta"]))
    assert meta["step"] == bad_step - 1


@pytest.mark.slow
def test_validation_split_is_evaluated_during_training_and_test_once(tmp_path):
    """With --validation, evaluations during training report the held-out set and the
    training slice; the test set is evaluated once, at the last step; the best checkpoint is
    chosen by validation bits/dim; --eval_only reports both."""
    argv = [*SMALL, "--dataset", "synthetic", "--steps", 6, "--eval_every", 3,
            "--validation", 100, "--workdir", tmp_path]
    run_train(*argv)
    evals = [r for r in metrics(tmp_path) if "train_eval_bpd" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert "test_bpd" not in evals[0] and {"validation_bpd", "test_bpd"} <= set(evals[1])
    best = json.loads(str(np.load(tmp_path / "checkpoint_best.npz")["meta"]))
    assert best["validation_bpd"] == min(r["validation_bpd"] for r in evals)
    out = run_train("--workdir", tmp_path, "--eval_only")
    assert out["test_bpd"] == pytest.approx(evals[1]["test_bpd"], abs=1e-5)
    assert out["validation_bpd"] == pytest.approx(evals[1]["validation_bpd"], abs=1e-5)


COND_CFG = jet.Config(image_shape=(8, 8, 3), patch_size=4, depth=2, emb_dim=8, num_heads=2,
                      context_dim=4)


def test_classification_by_likelihood_is_the_argmin_over_classes():
    """The conditional evaluation's figures on a batch built so that the answers are known: the
    bits/dim under the true label, the accuracy of the class of least bits/dim (half the
    labels are that class, half another one: accuracy exactly 1/2) and the bits/dim under the
    zero context all equal a brute force over jet.forward, masked rows left out."""
    params, perms = random_params(COND_CFG, 3)
    K, B = COND_CFG.context_dim, 8
    images = np.random.default_rng(0).integers(0, 256, (B, 8, 8, 3), np.uint8)
    key = jax.random.key(1)
    x = jet.dequantize(key, jnp.asarray(images))

    def bpd(context):
        return jet.bits_per_dim(*jet.forward(params, perms, x, COND_CFG, context=context))
    every = np.stack([bpd(jax.nn.one_hot(np.full(B, c), K)[:, None]) for c in range(K)])
    best = every.argmin(0)
    labels = np.where(np.arange(B) % 2 == 0, best, (best + 1) % K)
    mask = np.ones(B, np.float32)
    mask[-2:] = 0  # padding rows: one right, one wrong, both left out
    stats = evaluation.make_batch_stats(COND_CFG, {}, jet.forward)(
        params, perms, images, labels, mask, key, classify=True)
    n = mask.sum()
    true = every[labels, np.arange(B)]
    zero = bpd(jnp.zeros((B, 1, K)))
    np.testing.assert_allclose(stats["bpd"] / n, (true * mask).sum() / n, rtol=1e-5)
    assert float(stats["accuracy"]) == ((best == labels) * mask).sum() == 3
    np.testing.assert_allclose(stats["unconditional_bpd"] / n, (zero * mask).sum() / n,
                               rtol=1e-5)


def test_label_dropout_drops_at_its_rate_to_exactly_the_zero_context():
    """A dropped label is exactly the zero context, a kept one exactly its one-hot; in the
    train step, with --label_dropout 0.3 on a batch of 4,000 labels, the share of examples
    whose context the model sees as zero is 0.3 within four standard errors, and a new step
    drops others. (A stand-in model whose log-det is 1 for every example with a non-zero
    context, checked to be exactly one-hot, reads that share off the loss.)"""
    labels = jnp.array([0, 3, 1, 2])
    drop = jnp.array([True, False, True, False])
    context = evaluation.class_context(labels, 4, drop)
    np.testing.assert_array_equal(context[:, 0], np.where(drop[:, None], 0.0,
                                                          np.eye(4)[np.asarray(labels)]))
    B, K, rate = 4000, 4, 0.3
    labels = jnp.asarray(np.arange(B) % K)

    def forward(params, perms, x, cfg, *, remat, compute_dtype, context):
        kept = context.sum((1, 2))  # 1 kept, 0 dropped
        exact = (context[:, 0] == jax.nn.one_hot(labels, K)).all(1) | (kept == 0)
        return jnp.zeros_like(x), jnp.where(exact, kept, jnp.nan) + params["w"] * 0
    cfg = dataclasses.replace(COND_CFG, image_shape=(1, 1, 2), patch_size=1, context_dim=K)
    f = presets.RECIPE | {"steps": 10, "remat": False, "label_dropout": rate}
    step = train.make_train_step(cfg, f, forward)
    state = train.new_state({"w": jnp.zeros(())}, jnp.zeros((1, 2), jnp.int32),
                            train.make_optimizer(f))
    images = jnp.zeros((B, 1, 1, 2), jnp.uint8)
    base = float(jet.bits_per_dim(jnp.zeros((1, 1, 1, 2)), jnp.zeros(1))[0])
    shares = []
    for i in range(2):
        state, out = step(state, images, i, jax.random.key(0), labels)
        kept = (base - float(out["loss"])) * 2 * math.log(2)  # mean log-det
        shares.append(1 - kept)
    for share in shares:
        assert abs(share - rate) <= 4 * math.sqrt(rate * (1 - rate) / B), shares
    assert shares[0] != shares[1]


@pytest.mark.slow
def test_conditional_run_classifies_and_samples_each_class(tmp_path):
    """--conditional trains p(x | label) with the one-hot label as context: its last
    evaluation reports test bits/dim under the true label, the accuracy of classifying by
    likelihood and the bits/dim under the zero context, as --eval_only does from the
    checkpoint; --sample writes one row per class plus the unconditional row (trained with
    label dropout) per temperature, or the rows of --labels; --init_from keeps the context."""
    argv = [*SMALL, "--dataset", "synthetic", "--conditional", "--steps", 4, "--eval_every", 4]
    out = run_train(*argv, "--workdir", tmp_path / "run")
    assert 0 <= out["test_accuracy"] <= 1 and out["test_unconditional_bpd"] > 0
    meta = json.loads(str(np.load(tmp_path / "run" / "checkpoint.npz")["meta"]))
    assert meta["config"]["context_dim"] == 10 and meta["flags"]["label_dropout"] == 0.1
    again = run_train("--workdir", tmp_path / "run", "--eval_only")
    for key in ("test_bpd", "test_accuracy", "test_unconditional_bpd"):
        assert again[key] == pytest.approx(out[key], abs=1e-5)
    grid = run_train("--workdir", tmp_path / "run", "--sample", 3, "--temperature", "0.7,1")
    scale = pictures.grid_scale(3, 16)
    side = 16 * scale + max(1, scale // 2)
    assert png_size(grid["samples"]) == (2 * 11 * side + side - 16 * scale,
                                         3 * side + side - 16 * scale)
    picked = run_train("--workdir", tmp_path / "run", "--sample", 3, "--labels", "3,5")
    assert png_size(picked["samples"])[0] == 3 * side + side - 16 * scale
    fine = run_train(*argv, "--steps", 1, "--init_from", tmp_path / "run", "--workdir",
                     tmp_path / "fine")
    assert fine["step"] == 1


@pytest.mark.slow
def test_conditional_needs_labels_in_range(tmp_path, capsys):
    """Labels are checked before any work: a dataset without them, a negative label, label
    dropout without --conditional and --labels on an unconditional run are refused."""
    images = np.zeros((8, 4, 4, 1), np.uint8)
    np.savez(tmp_path / "nolabels.npz", train=images, test=images)
    np.savez(tmp_path / "negative.npz", train=images, test=images,
             train_labels=np.arange(8) - 1, test_labels=np.arange(8))
    argv = [*SMALL, "--patch_size", 2, "--conditional", "--steps", 1]
    expect_error(capsys, "needs labels", *argv, "--dataset", f"npz:{tmp_path / 'nolabels.npz'}",
                 "--workdir", tmp_path / "a")
    expect_error(capsys, "outside the", *argv, "--dataset", f"npz:{tmp_path / 'negative.npz'}",
                 "--workdir", tmp_path / "b")
    expect_error(capsys, "--conditional runs only", *SMALL, "--dataset", "synthetic",
                 "--label_dropout", 0.2, "--workdir", tmp_path / "c")
    run_train(*SMALL, "--dataset", "synthetic", "--steps", 1, "--workdir", tmp_path / "d")
    expect_error(capsys, "needs a conditional run", "--workdir", tmp_path / "d", "--sample", 2,
                 "--labels", 1)


@pytest.mark.slow
def test_init_from_copies_params_and_perms_only(tmp_path, capsys):
    """--init_from starts a new run (step 0, fresh optimizer) from another run's params and
    permutations; a different model is refused."""
    argv = [*SMALL, "--dataset", "synthetic", "--eval_every", 100]
    run_train(*argv, "--steps", 3, "--workdir", tmp_path / "pre")
    run_train(*argv, "--steps", 1, "--lr", 0, "--weight_decay", 0, "--init_from", tmp_path / "pre",
              "--workdir", tmp_path / "fine")
    pre = np.load(tmp_path / "pre" / "checkpoint.npz")
    fine = np.load(tmp_path / "fine" / "checkpoint.npz")
    assert json.loads(str(fine["meta"]))["step"] == 1
    for name in pre.files:
        if name.startswith("['params']") or name.startswith("['perms']"):
            np.testing.assert_array_equal(fine[name], pre[name], err_msg=name)
    expect_error(capsys, "pass the same model flags", *argv, "--depth", 2, "--steps", 1,
                 "--init_from", tmp_path / "pre", "--workdir", tmp_path / "other")


@pytest.mark.slow
def test_an_exported_model_loads_everywhere_and_checks_itself(tmp_path, capsys):
    """--export writes a run's model without its optimizer state, its metrics and check.npz
    (the first test images and their bits/dim under the noise of jax.random.key(0)), which
    jet.forward reproduces; the export samples (--sample), evaluates as the run did
    (--eval_only), seeds a new run (--init_from), and refuses to resume training, naming the
    fix."""
    argv = [*SMALL, "--dataset", "synthetic", "--eval_every", 3]
    run_train(*argv, "--steps", 3, "--workdir", tmp_path / "run")
    out = tmp_path / "shipped"
    exported = run_train("--workdir", tmp_path / "run", "--export", out)
    assert sorted(os.listdir(out)) == ["check.npz", "checkpoint.npz", "curve.svg",
                                       "metrics.jsonl"]
    assert "opt_state" not in " ".join(np.load(out / "checkpoint.npz").files)
    state, cfg, meta = checkpoints.read_run(str(out))
    check = np.load(out / "check.npz")
    assert len(check["images"]) == train.CHECK_IMAGES and meta["step"] == exported["step"] == 3
    x = jet.dequantize(jax.random.key(0), jnp.asarray(check["images"]))
    bpd = jet.bits_per_dim(*jet.forward(state["params"], state["perms"], x, cfg)).mean()
    assert float(bpd) == pytest.approx(float(check["bpd"]), abs=1e-6)
    assert run_train("--workdir", out, "--eval_only")["test_bpd"] == pytest.approx(
        run_train("--workdir", tmp_path / "run", "--eval_only")["test_bpd"], abs=1e-6)
    assert os.path.exists(run_train("--workdir", out, "--sample", 4)["samples"])
    run_train(*argv, "--steps", 1, "--init_from", out, "--workdir", tmp_path / "tuned")
    expect_error(capsys, f"--init_from {out} --workdir NEW_DIR", *argv, "--steps", 4,
                 "--workdir", out)


@pytest.mark.parametrize("name", ["cifar10-cpu", "fashion-mnist-cpu"])
def test_a_shipped_model_scores_what_it_recorded(name):
    """The trained flows in the box (trained/NAME: `python train.py --dataset D` for 30 minutes,
    then --export) load as any run does and score, on the test images shipped beside them
    (check.npz) under the fixed noise of jax.random.key(0), the bits/dim recorded there to
    1e-4: a change to the model's function shows here, no dataset needed."""
    path = os.path.join(HERE, "trained", name)
    state, cfg, meta = checkpoints.read_run(path)
    check = np.load(os.path.join(path, "check.npz"))
    x = jet.dequantize(jax.random.key(0), jnp.asarray(check["images"]))
    z, logdet = jax.jit(jet.forward)(state["params"], state["perms"], x, cfg)
    assert float(jet.bits_per_dim(z, logdet).mean()) == pytest.approx(float(check["bpd"]),
                                                                      abs=1e-4)
    assert meta["flags"]["preset"] in ("cpu", "fashion_mnist_cpu") and "opt_state" not in str(
        np.load(os.path.join(path, "checkpoint.npz")).files)


# ------------------------------------------------------------------------------------------
# Pieces


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])[::-1]  # (height, width)


def decode_png(path):
    """A minimal independent PNG decoder for 8-bit, filter-0 images."""
    with open(path, "rb") as f:
        blob = f.read()
    pos, chunks = 8, {}
    while pos < len(blob):
        length, tag = struct.unpack(">I4s", blob[pos:pos + 8])
        body = blob[pos + 8:pos + 8 + length]
        assert zlib.crc32(tag + body) == struct.unpack(">I", blob[pos + 8 + length:][:4])[0]
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + length
    width, height, _, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    channels = {0: 1, 2: 3}[color]
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8)
    rows = raw.reshape(height, 1 + width * channels)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(height, width, channels)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("scale", [1, 3])
def test_png_grid_holds_the_images(tmp_path, channels, scale):
    """write_png lays rows of images on white, each upscaled `scale` times by repetition, with
    gaps of max(1, scale // 2) pixels; a short row leaves white behind it."""
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 256, (n, 4, 6, channels), dtype=np.uint8) for n in (3, 2)]
    pictures.write_png(tmp_path / "g.png", rows, scale)
    grid = decode_png(tmp_path / "g.png")
    gap, h, w = max(1, scale // 2), 4 * scale, 6 * scale
    assert grid.shape == (2 * (h + gap) + gap, 3 * (w + gap) + gap, channels)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            top, left = gap + r * (h + gap), gap + c * (w + gap)
            np.testing.assert_array_equal(grid[top:top + h, left:left + w],
                                          image.repeat(scale, 0).repeat(scale, 1))
    assert (grid[:gap] == 255).all() and (grid[:, :gap] == 255).all()
    assert (grid[h + 2 * gap:, 2 * (w + gap) + gap:] == 255).all()  # the missing 6th image


def curve_points(path) -> dict:
    """The (step, bits/dim) points of curve.svg's lines, read back from the SVG: its data group
    holds them in data units."""
    group = next(g for g in ElementTree.parse(path).getroot().iter(f"{SVG}g")
                 if g.get("class") == "data")
    lines = {line.get("class"): [(float(line.get("x1")), float(line.get("y1"))),
                                 (float(line.get("x2")), float(line.get("y2")))]
             for line in group.iter(f"{SVG}line")}
    return lines | {p.get("class"): [tuple(float(v) for v in point.split(","))
                                     for point in p.get("points").split()]
                    for p in group.iter(f"{SVG}polyline")}


def test_curve_plots_the_metrics_inside_its_axes(tmp_path):
    """curve.svg holds the training losses, the held-out figures (validation when the run has
    them) and the baseline at their exact values, drawn inside the plot area: the group's
    transform maps (0, lowest) and (last step, highest) into the frame."""
    records = [{"step": 0, "baseline_validation_bpd": 7.9, "baseline_test_bpd": 7.8},
               {"step": 10, "train_bpd": 6.5, "time_s": 30.0},
               {"step": 20, "train_bpd": 5.25, "time_s": 60.0},
               {"step": 20, "validation_bpd": 5.5, "train_eval_bpd": 5.4, "time_s": 65.0},
               {"step": 30, "train_bpd": 4.75, "time_s": 90.0},
               {"step": 30, "validation_bpd": 4.875, "test_bpd": 4.9, "time_s": 95.0}]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    pictures.write_curve(tmp_path / "metrics.jsonl", tmp_path / "curve.svg", "a <run> & more")
    assert curve_points(tmp_path / "curve.svg") == {
        "train": [(10, 6.5), (20, 5.25), (30, 4.75)], "held": [(20, 5.5), (30, 4.875)],
        "baseline": [(0, 7.9), (30, 7.9)]}
    root = ElementTree.parse(tmp_path / "curve.svg").getroot()
    width, height = float(root.get("width")), float(root.get("height"))
    group = next(g for g in root.iter(f"{SVG}g") if g.get("class") == "data")
    (tx, ty), (sx, sy) = (tuple(map(float, re.search(rf"{name}\(([^ ]+) ([^)]+)\)",
                                                     group.get("transform")).groups()))
                          for name in ("translate", "scale"))
    for step, bpd in ((0, 4.75), (30, 7.9)):  # the corners of the data
        assert 0 < tx + sx * step < width and 0 < ty + sy * bpd < height
    texts = "".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "validation" in texts and "7.900" in texts and "(2 min)" in texts  # 95 s, rounded


def test_grid_scale_reaches_the_grid_width():
    """Grids are upscaled by the smallest integer that makes them about GRID_WIDTH wide."""
    assert pictures.grid_scale(8, 32) == 2 and pictures.grid_scale(8, 28) == 3
    assert pictures.grid_scale(64, 64) == 1


def test_optimizer_is_big_vision_chain():
    """One update equals -schedule(t) * (lr * adam(g) + wd * p), with clipping first; the
    schedule warms up linearly from 0 and decays by a cosine to 0."""
    f = dict(presets.RECIPE, steps=100, lr=0.01, weight_decay=0.1, clip=1.0)
    tx = train.make_optimizer(f)
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = {"w": jnp.array([30.0, 40.0, 0.0])}  # norm 50 -> clipped to norm 1
    state = tx.init(params)
    for step in range(12):
        updates, state = tx.update(grads, state, params)
        sched = float(train.schedule(step, 100, 10))
        # Adam with a constant gradient g: m_hat = g, v_hat = g^2, so the step is sign-like.
        g = grads["w"] / 50.0
        adam = g / (jnp.abs(g) + 1e-8)
        np.testing.assert_allclose(updates["w"], -sched * (0.01 * adam + 0.1 * params["w"]),
                                   rtol=1e-5, atol=1e-7)
    assert float(train.schedule(0, 100, 10)) == 0.0
    assert float(train.schedule(10, 100, 10)) == pytest.approx(1.0)
    assert float(train.schedule(55, 100, 10)) == pytest.approx(0.5)
    assert float(train.schedule(100, 100, 10)) == pytest.approx(0.0, abs=1e-7)


def test_forward_flops_matches_xla_count():
    """The analytic matmul FLOPs per image agree with XLA's cost analysis of jet.forward."""
    # One coupling of one block: XLA counts a scanned loop body once, not once per iteration.
    cfg = jet.Config(image_shape=(16, 16, 3), patch_size=2, depth=1, block_depth=1,
                     emb_dim=32, num_heads=4)
    params, perms = jax.eval_shape(lambda: jet.init(jax.random.key(0), cfg))
    x = jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32)
    cost = jax.jit(jet.forward).lower(params, perms, x, cfg).compile()
    analysis = cost.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    per_image = analysis["flops"] / 8
    assert timing.forward_flops(cfg) == pytest.approx(per_image, rel=0.1)


def test_presets_build_valid_configs():
    """Every preset gives a valid Config for the image size of its dataset."""
    for name, preset in presets.PRESETS.items():
        cfg = jet.Config(image_shape=bench.image_shape(name),
                         **{k: v for k, v in preset.items() if k in presets.MODEL_FLAGS})
        assert cfg.num_tokens % 2 == 0
    big = presets.PRESETS["imagenet64"]
    assert (big["depth"], big["block_depth"], big["emb_dim"], big["num_heads"],
            big["patch_size"], big["batch_size"]) == (32, 2, 512, 8, 4, 1024)


# ------------------------------------------------------------------------------------------
# No newcomer traps: workdirs that cannot collide, model flags checked before any download,
# errors as exceptions, imports without POSIX-only modules


def test_default_workdirs_differ_by_dataset_and_preset():
    """Without --workdir a run lives in runs/<dataset>-<preset>, so the README's tiny run and
    the 30-minute run of the same dataset never meet, nor a conditional run and an
    unconditional one; an npz dataset goes by its file name."""
    def workdir(*argv):
        return presets.default_workdir(presets.parse_args(list(argv)), "cpu")
    assert workdir() == workdir("--dataset", "cifar10") == os.path.join("runs", "cifar10-cpu")
    assert workdir("--dataset", "cifar10", "--preset", "tiny") == os.path.join(
        "runs", "cifar10-tiny")
    assert workdir("--dataset", "fashion_mnist") == os.path.join("runs",
                                                                 "fashion_mnist-fashion_mnist_cpu")
    assert workdir("--dataset", "cifar10", "--conditional") == os.path.join(
        "runs", "cifar10-cpu-conditional")
    assert workdir("--dataset", "npz:~/d/faces.npz") == os.path.join("runs", "npz-faces-tiny")
    assert presets.default_workdir(presets.parse_args(["--dataset", "cifar10"]), "gpu") == \
        os.path.join("runs", "cifar10-cifar10")


def test_model_flags_are_checked_before_any_download(tmp_path):
    """A model that cannot be built (a width that does not split into the heads) is refused
    before the dataset is read: nothing is downloaded (the URL would fail) or written."""
    argv = ["--dataset", "cifar10", "--emb_dim", 30, "--num_heads", 4, "--data_dir",
            tmp_path / "data", "--data_url", "http://127.0.0.1:9/nothing-here.tar.gz",
            "--workdir", tmp_path / "run"]
    with pytest.raises(ValueError, match="num_heads"):
        run_train(*argv)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, message", [
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
])
def test_bad_flags_raise_instead_of_exiting(argv, message):
    """train.main called from Python (a notebook, another script) raises ValueError on a bad
    flag, where argparse would have exited the interpreter."""
    with pytest.raises(ValueError, match=message):
        train.main(argv)


def test_the_command_line_prints_one_line_and_exits_1():
    proc = subprocess.run([sys.executable, "train.py", "--steps", "many"], capture_output=True,
                          text=True, cwd=HERE, env=subprocess_env())
    assert proc.returncode == 1
    assert proc.stderr == "train.py: error: argument --steps: invalid int value: 'many'\n"


def test_every_module_imports_without_fcntl(tmp_path):
    """With no fcntl (Windows), train, ablate and bench still import, and a training run's
    workdir is used unlocked, with a warning that says so."""
    code = ("import sys\nsys.modules['fcntl'] = None  # import fcntl now fails, as on Windows\n"
            "import ablate, bench, cluster, train\n"
            f"with cluster.workdir_lock({str(tmp_path / 'w')!r}, training=True):\n"
            "    print('trained')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE,
                         env=subprocess_env())
    assert out.returncode == 0, out.stderr
    assert "no fcntl" in out.stdout and "is not locked" in out.stdout and "trained" in out.stdout


def test_only_train_py_run_as_a_program_restarts_itself(monkeypatch):
    """The huge-page restart re-executes the process only when train.py is its program
    (`python train.py`, `python -m train`): not when imported by another program, read from
    stdin, or run by an interactive interpreter or a notebook's %run."""
    path = os.path.join(HERE, "train.py")

    def main_module(file=None, spec=None):
        module = types.ModuleType("__main__")
        module.__file__, module.__spec__ = file, spec
        monkeypatch.setitem(sys.modules, "__main__", module)
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    main_module(path)
    assert timing.is_the_program(path, "train")
    main_module(os.path.join(HERE, "..", os.path.basename(HERE), "train.py"))  # another spelling
    assert timing.is_the_program(path, "train")
    main_module(path, types.SimpleNamespace(name="train"))  # python -m train
    assert timing.is_the_program(path, "train")
    for file, spec in ((os.path.join(HERE, "ablate.py"), None), ("<stdin>", None), (None, None),
                       (path, types.SimpleNamespace(name="ablate"))):
        main_module(file, spec)
        assert not timing.is_the_program(path, "train")
    main_module(path)
    monkeypatch.setitem(sys.modules, "IPython", types.ModuleType("IPython"))
    assert not timing.is_the_program(path, "train")


# ------------------------------------------------------------------------------------------
# The first run on any machine: presets by device, progress, time budget, flag validation


def test_presets_follow_the_machine():
    """Without --preset a dataset gets its CPU-sized preset on a CPU and its paper-scale one on
    a GPU or TPU; an explicit --preset always wins; a resumed run keeps its checkpoint's."""
    def preset(argv, platform, saved=None):
        return presets.resolve(presets.parse_args(argv), saved, platform)[0]["preset"]
    for dataset, cpu, accelerator in (("cifar10", "cpu", "cifar10"),
                                      ("imagenet64", "cpu", "imagenet64"),
                                      ("fashion_mnist", "fashion_mnist_cpu", "fashion_mnist"),
                                      ("mnist", "fashion_mnist_cpu", "fashion_mnist"),
                                      ("synthetic", "tiny", "tiny")):
        assert preset(["--dataset", dataset], "cpu") == cpu
        assert preset(["--dataset", dataset], "gpu") == accelerator
        assert preset(["--dataset", dataset], "tpu") == accelerator
    assert preset(["--dataset", "cifar10", "--preset", "cifar10"], "cpu") == "cifar10"
    assert preset(["--dataset", "cifar10", "--preset", "cpu"], "gpu") == "cpu"
    saved, _ = presets.resolve(presets.parse_args(["--dataset", "cifar10"]), None, "cpu")
    assert preset([], "gpu", saved) == "cpu"
    # the CPU preset is sized by time; an explicit length replaces the budget
    assert saved["time_budget"] == 30 and "steps" not in saved
    explicit, _ = presets.resolve(presets.parse_args(["--dataset", "cifar10", "--steps", "7"]),
                                  None, "cpu")
    assert explicit["steps"] == 7 and "time_budget" not in explicit


@pytest.mark.parametrize("flag, value", [
    ("steps", -3), ("steps", 0), ("epochs", 0), ("batch_size", 0), ("eval_batch_size", -8),
    ("lr", -1e-3), ("warmup", 1), ("warmup", -0.1), ("weight_decay", -1), ("clip", 0),
    ("b1", 1), ("b2", -0.5), ("log_every", 0), ("eval_every", 0), ("ckpt_every", -1),
    ("time_budget", 0), ("depth", 0), ("scale_factor", "nan"), ("sample", -1),
    ("temperature", 0)])
def test_invalid_numbers_are_refused_before_any_work(tmp_path, capsys, flag, value):
    """Every numeric flag out of range exits with a message naming it, before data or
    compilation; nothing is written."""
    expect_error(capsys, f"--{flag}", "--dataset", "synthetic", f"--{flag}", value,
                 "--workdir", tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_bench_refuses_bad_numbers():
    for argv, flag in ((["--batch_size", "0"], "--batch_size"), (["--steps", "-1"], "--steps"),
                       (["--depth", "0"], "depth")):
        with pytest.raises(ValueError, match=flag):
            bench.main(argv)


@pytest.mark.slow
def test_progress_lines_leave_metrics_alone(tmp_path, capsys, monkeypatch):
    """A line at least every PROGRESS_SECONDS of wall time: with a step slower than that
    (here: PROGRESS_SECONDS = 0) every step prints one, on stdout only; metrics.jsonl is the
    same as a run that printed none. Compilation is announced and timed."""
    argv = [*SMALL, "--dataset", "synthetic", "--steps", 6, "--log_every", 3,
            "--eval_every", 6]
    run_train(*argv, "--workdir", tmp_path / "quiet")
    quiet = capsys.readouterr().out
    monkeypatch.setattr(train, "PROGRESS_SECONDS", 0)
    run_train(*argv, "--workdir", tmp_path / "chatty")
    chatty = capsys.readouterr().out
    assert "(last" not in quiet
    assert [line.split(" |")[0] for line in chatty.splitlines() if "(last" in line] == [
        "step 2/6", "step 4/6", "step 5/6"]  # 1 says how long it took; 3 and 6 log
    assert "Compiling the training step" in chatty and "compilation included" in chatty
    assert "Preset 'tiny': chosen with --preset; the time it needs is printed" in chatty
    assert comparable(metrics(tmp_path / "chatty")) == comparable(metrics(tmp_path / "quiet"))


def test_retiming_sets_the_steps_that_end_on_the_budget(monkeypatch, capsys):
    """Re-timing a --time_budget run: 100 steps in 20 s since the first (0.2 s a step) and 70 s
    to the planned end, 10 of them reserved for evaluations, leave time for 300 more steps, or
    290 after the 2 s recompilation that a new count (a new schedule) costs; the cadences the
    command did not set follow the new count, the warmup keeps its length and the cosine goes
    on from where it was. Time spent evaluating does not count as training, and the
    evaluations' measured cost replaces the timed one. A count that is off by less than its
    recompilation would cost is kept; no re-timing lengthens the count by more than RETIME_MAX
    at once, while a count that cannot end on time is cut as far as needed; the rate is that
    of the last RATE_WINDOW intervals."""
    monkeypatch.setattr(timing.time, "time", lambda: 1000.0)
    f = {"steps": 500, "eval_every": 84, "ckpt_every": 16, "log_every": 5, "warmup": 0.1}
    plan = {"end": 1070.0, "eval_s": 1.0, "final_s": 4.0, "step_s": 0.3, "evals_s": [],
            "evals": 6, "compile_s": 2.0, "own_cadences": ["eval_every", "ckpt_every"],
            "checks": []}
    clock = {"start": 980.0, "step": 1, "paused": 0.0}
    assert timing.retime_run(f, plan, clock, 101, 0.125)
    assert f == {"steps": 391, "eval_every": 66, "ckpt_every": 13, "log_every": 5,
                 "warmup": 0.1, "warmup_steps": 50, "schedule_from": [101, 0.125]}
    assert plan["checks"] == [(1000.0, 101, 0.0)]
    assert "Re-timed at step 101: 200 ms/step lately (the timing phase measured 300): 391 " \
           "steps instead of 500, ending about" in capsys.readouterr().out
    plan["checks"] = []
    # An evaluation took 3 s of the 20: at 0.17 s a step 454 fit, 4 more than 450 (0.7 s).
    assert not timing.retime_run(f | {"steps": 450}, plan, clock | {"paused": 3.0}, 101, 0.1)
    assert capsys.readouterr().out == ""
    plan["checks"] = []
    # One evaluation took 5 s as well: 12 s / 100 steps = 0.12 s a step; 5 more evaluations
    # at 5 s and the last one's extra 4 s leave 41 s, 39 s after the recompilation: 325 steps.
    assert timing.retime(plan | {"evals_s": [5.0]}, clock | {"paused": 8.0}, 101, 500) == 426
    # Lengthened by a quarter at most; shortened as far as the time left needs.
    assert timing.retime(plan, clock, 101, 200) == 250
    assert timing.retime(plan, clock, 101, 1000) == 391
    late = plan | {"end": 990.0}  # past the planned end
    assert timing.retime(late, clock, 101, 500) == 102  # never at or below the current step
    assert timing.retime(late, clock | {"step": 0}, 2, 6) == 6  # at least one step per eval
    # Steps 51 to 101 took 20 s, 0.4 s a step, twice the run's average: 145 steps fit.
    slow = plan | {"checks": [(950.0, 1, 0.0), (980.0, 51, 0.0), (990.0, 76, 0.0),
                              (995.0, 88, 0.0)]}
    assert timing.retime(slow, clock, 101, 500) == 246


def simulate_budget(monkeypatch, speed, minutes=30.0, step_s=0.15) -> tuple[float, dict, int]:
    """A --time_budget run on a simulated clock, through the same calls as train.train: the
    plan (20 s after the command started), evaluations (held-out and training slice, the last
    with the test set), re-timings with their recompilations. A step takes step_s x
    speed(fraction of the budget gone). Returns the end as a fraction of the budget, the
    run's flags, and the planned step count."""
    now = [20.0]
    monkeypatch.setattr(timing.time, "time", lambda: now[0])
    budget_s = 60 * minutes
    f = {"time_budget": minutes, "eval_batch_size": 64, "warmup": 0.1}
    measured = {"compile_s": 5.0, "step_s": step_s, "image_s": 0.002, "grid_s": 1.0}
    plan = timing.plan(f, measured, 0.0, {"periodic": 7000, "test": 10000, "test_again": True,
                                          "classes": 0})
    plan["own_cadences"] = ["log_every", "eval_every", "ckpt_every"]
    planned = plan.pop("steps")
    timing.set_steps(f, plan, planned)
    plan["every"] = f["ckpt_every"]
    now[0] += measured["compile_s"] + step_s  # the first step compiles
    clock, step = timing.start_clock(1), 1
    while step < f["steps"]:
        now[0] += step_s * speed(now[0] / budget_s)
        step += 1
        if step % f["eval_every"] == 0 or step == f["steps"]:
            since = now[0]
            now[0] += 7000 * measured["image_s"] + measured["grid_s"]
            now[0] += plan["final_s"] * (step == f["steps"])
            timing.pause(clock, since)
            plan["evals_s"].append(now[0] - since)
        if timing.retime_due(plan, step, f["steps"]):
            lr = train.run_schedule(f)(step)
            if timing.retime_run(f, plan, clock, step, train.run_progress(f, step)):
                assert float(train.run_schedule(f)(step)) == pytest.approx(float(lr), abs=1e-6)
                since = now[0]
                now[0] += measured["compile_s"]
                timing.pause(clock, since)
    return now[0] / budget_s, f, planned


@pytest.mark.parametrize("case", ["steady", "slows by 25% at 60%", "speeds up 25% at 60%"])
def test_a_budget_holds_on_a_host_whose_speed_changes(monkeypatch, capsys, case):
    """Re-timing through the run: a host that slows by 25% at 60% of the budget still ends by
    102% of it, a host that speeds up by 25% uses at least 90% of it, and a steady host keeps
    its planned count to 2%. Each ends with the learning rate at 0 on its last step, and no
    re-timing makes the rate jump (simulate_budget)."""
    speed = {"steady": lambda t: 1.0, "slows by 25% at 60%": lambda t: 1.25 if t > 0.6 else 1.0,
             "speeds up 25% at 60%": lambda t: 0.8 if t > 0.6 else 1.0}[case]
    end, f, planned = simulate_budget(monkeypatch, speed)
    assert end <= 1.02 and end >= 0.9, end
    if case == "steady":
        assert abs(f["steps"] - planned) <= 0.02 * planned
    assert float(train.run_schedule(f)(f["steps"])) == 0.0
    assert float(train.run_schedule(f)(f["steps"] - 1)) < 1e-4
    assert "planned end" in capsys.readouterr().out


def test_a_new_step_pauses_the_clock_only_for_its_compilation(monkeypatch):
    """timing.pausing: the first call of a recompiled step is not training time, but the steps
    dispatched before it are: it waits for them before it starts timing the compilation."""
    events, now = [], [100.0]

    def block(state):
        events.append("queued steps done")
        now[0] += 2.0

    def step(state, batch):
        events.append("step")
        now[0] += 5.0 if events.count("step") == 1 else 0.1  # compiles, then runs
        return state + 1
    monkeypatch.setattr(timing.time, "time", lambda: now[0])
    monkeypatch.setattr(timing.jax, "block_until_ready", block)
    clock = timing.start_clock(1)
    call = timing.pausing(step, clock)
    assert call(0, None) == 1 and call(1, None) == 2
    assert events == ["queued steps done", "step", "step"]
    assert clock["paused"] == pytest.approx(5.0)


def test_the_timing_phase_prices_every_evaluated_image(monkeypatch):
    """time_machine's cost of an evaluated image: evaluate(n) evaluates n images of the
    held-out set and n of the training slice (at most its 500) at 2 ms each, and says how many
    that was; a step takes 0.1 s. The price is 2 ms, not the 4 ms of dividing by n."""
    now = [0.0]

    def step(i):
        now[0] += 0.1

    def evaluate(n):
        count = min(n, 1000) + min(n, 500)
        now[0] += 0.002 * count
        return count
    monkeypatch.setattr(timing.time, "time", lambda: now[0])
    monkeypatch.setattr(timing.jax, "block_until_ready", lambda x: x)
    measured = timing.time_machine(step, evaluate, lambda: None, 10, 1.0)
    assert measured["step_s"] == pytest.approx(0.1)
    assert measured["image_s"] == pytest.approx(0.002)


def test_a_budget_keeps_evaluations_to_a_share_of_it(monkeypatch, capsys):
    """The plan of a budget: 30 minutes fit six evaluations of 25 s; 8 minutes only one (at
    most a tenth of the budget goes to them), and a conditional model's last evaluation
    classifies 3,000 of its 10,000 test images (at most 15%: 12 passes of 2 ms an image),
    so that the run still trains most of its time; twice as many where timed at half that cost."""
    monkeypatch.setattr(timing.time, "time", lambda: 1000.0)
    measured = {"compile_s": 4.0, "step_s": 0.25, "image_s": 0.002, "grid_s": 1.0}
    images = {"periodic": 12000, "test": 10000, "test_again": False, "classes": 0}
    plan = timing.plan({"time_budget": 30, "eval_batch_size": 64}, measured, 1000.0, images)
    assert (plan["evals"], plan["classify_images"], plan["steps"]) == (6, 0, 6224)  # 1556 s
    plan = timing.plan({"time_budget": 8, "eval_batch_size": 64}, measured, 1000.0,
                       images | {"classes": 10})
    assert (plan["evals"], plan["classify_images"], plan["final_s"]) == (1, 3000, 72.0)
    assert plan["steps"] == 1420  # 456 s - compilation 4 - evaluation 25 - classification 72
    assert "1 evaluation of 25 s (the last one 97 s)" in capsys.readouterr().out
    plan = timing.plan({"time_budget": 8, "eval_batch_size": 64, "classify_images": 500},
                       measured, 1000.0, images | {"classes": 10, "test_again": True})
    assert plan["classify_images"] == 500 and plan["final_s"] == pytest.approx(20 + 12)
    timed = measured | {"classify_s": 0.012}  # the timed classification: 12 ms an image
    plan = timing.plan({"time_budget": 8, "eval_batch_size": 64}, timed, 1000.0,
                       images | {"classes": 10})
    assert (plan["classify_images"], plan["final_s"]) == (6000, 72.0)


@pytest.mark.slow
def test_time_budget_fixes_and_stores_the_step_count(tmp_path, capsys):
    """--time_budget times this machine, sets steps and cadences before training, re-times them
    at its early checkpoints and stores them, so re-running the command resumes that run
    exactly; the best checkpoint by test bpd is kept beside the latest, and train and test bpd
    are logged side by side."""
    argv = [*SMALL, "--dataset", "synthetic", "--time_budget", 0.6, "--workdir", tmp_path]
    result = run_train(*argv)
    out = capsys.readouterr().out
    assert "steps fit in 0.6 min" in out
    meta = json.loads(str(np.load(tmp_path / "checkpoint.npz")["meta"]))
    steps = meta["flags"]["steps"]
    assert result["step"] == steps == meta["step"] >= 6
    assert meta["flags"]["eval_every"] == -(-steps // 6)
    evals = [r for r in metrics(tmp_path) if "test_bpd" in r]
    assert all("train_eval_bpd" in r for r in evals)
    best = json.loads(str(np.load(tmp_path / "checkpoint_best.npz")["meta"]))
    assert best["test_bpd"] == min(r["test_bpd"] for r in evals)
    assert best["step"] == min(evals, key=lambda r: r["test_bpd"])["step"]
    assert run_train(*argv)["step"] == steps  # finished: nothing re-timed or re-run
    assert "Timing this machine" not in capsys.readouterr().out


@pytest.mark.slow
def test_a_conditional_time_budget_follows_its_plan(tmp_path, capsys, monkeypatch):
    """A budgeted conditional run with a held-out set, whose last evaluation classifies test
    images under every label, runs its plan: the plan fits the budget, the run ends at the
    step count of its last re-timing (each at the re-timing cadence, before the last
    RETIME_LAST intervals, lengthening the count by at most a quarter), evaluates as often as
    planned and classifies as many images as planned. Nothing here depends on how fast this
    machine is."""
    budget = 0.75  # minutes
    plans = []
    real_plan = timing.plan
    def plan(*args):  # the plan as made (timing.plan_budget then takes its steps out)
        plans.append(real_plan(*args))
        plans.append(dict(plans[-1]))
        return plans[-2]
    monkeypatch.setattr(timing, "plan", plan)
    argv = [*SMALL, "--dataset", "synthetic", "--conditional", "--validation", 100,
            "--time_budget", budget, "--log_every", 50, "--workdir", tmp_path]
    result, out = run_train(*argv), capsys.readouterr().out
    kept, plan = plans
    plan["every"] = kept["every"]  # the re-timing cadence, set on the kept plan
    planned = (plan["compile_s"] + plan["evals"] * plan["eval_s"] + plan["final_s"]
               + plan["steps"] * plan["step_s"])
    assert planned <= timing.BUDGET_USED * 60 * budget
    steps = plan["steps"]
    for line in out.splitlines():
        if line.startswith("Re-timed at step"):
            at, new, old = map(int, re.search(
                r"step (\d+):.*: (\d+) steps instead of (\d+), ending about", line).groups())
            assert old == steps and new - old <= timing.RETIME_MAX * old + 1, line
            assert at % plan["every"] == 0 and old - at > timing.RETIME_LAST * plan["every"]
            steps = new
    assert result["step"] == steps
    evals = [r for r in metrics(tmp_path) if "validation_bpd" in r]
    assert abs(len(evals) - plan["evals"]) <= 1 and evals[-1]["step"] == steps  # a re-timing
    # may move the cadence after an evaluation at the old one
    [last] = [r for r in metrics(tmp_path) if "test_accuracy" in r]
    everything = len(data.load("synthetic")["test"])  # recorded only when a subset is classified
    assert last.get("test_classified", everything) == plan["classify_images"] > 0
    assert 0 <= last["test_accuracy"] <= 1


# ------------------------------------------------------------------------------------------
# Huge pages: the restart with glibc's tunable

MADVISE = "always [madvise] never\n"


@pytest.mark.parametrize("environ, thp_mode, libc, tunables", [
    ({}, MADVISE, ("glibc", "2.36"), "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, MADVISE, ("glibc", "2.35"),
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),  # the user's tunables are kept
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, MADVISE, ("glibc", "2.36"), None),  # chosen
    ({}, "[always] madvise never\n", ("glibc", "2.36"), None),  # huge pages already
    ({}, "always madvise [never]\n", ("glibc", "2.36"), None),  # no huge pages at all
    ({}, MADVISE, ("glibc", "2.34"), None),  # no such tunable
    ({}, MADVISE, ("", ""), None),  # musl: glibc's tunables mean nothing
])
def test_huge_pages_env_only_where_it_changes_something(environ, thp_mode, libc, tunables):
    env = timing.huge_pages_env({"PATH": "/bin", **environ}, thp_mode, libc)
    assert env == (
        None if tunables is None else {"PATH": "/bin", "GLIBC_TUNABLES": tunables})


@pytest.mark.slow
def test_the_command_restarts_once_with_huge_pages(tmp_path, compile_cache):
    """`python train.py` restarts itself once with the tunable where it helps (one line says
    so, the run then proceeds); --no-huge_pages and the tunable already set do not restart."""
    try:
        with open(timing.THP_MODE_FILE) as f:
            thp_mode = f.read()
    except OSError:
        thp_mode = ""
    if timing.huge_pages_env({}, thp_mode, timing.platform.libc_ver()) is None:
        pytest.skip("this machine's kernel or libc gives no huge pages through glibc's tunable")
    argv = [*SMALL, "--dataset", "synthetic", "--steps", 1, "--eval_every", 1]
    env = {k: v for k, v in subprocess_env().items() if k != "GLIBC_TUNABLES"}
    for extra, restarts in (([], 1), (["--no-huge_pages"], 0)):
        proc = subprocess.Popen([sys.executable, "train.py", *map(str, argv), *extra,
                                 "--workdir", tmp_path / str(restarts)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=HERE)
        output = proc.communicate()[0]
        assert proc.returncode == 0, output
        assert output.count("Restarting with GLIBC_TUNABLES=glibc.malloc.hugetlb=1") == restarts
        assert "step 1/1 | test" in output
