"""Checkpoints: one .npz per state (no pickle), written whole or not at all; reading one back
into a state of known shapes; the metrics log (metrics.jsonl), trimmed to the step a run
resumes from; the params of another run for --init_from.

A checkpoint holds every leaf of the training state under its pytree path
("['params']['final_proj']['kernel']", ...) and "meta", a JSON string: the format, model name,
step, jet.Config, the run's flags, the data position and the loop's log window.
"""

import contextlib
import errno
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import jet

FORMAT = "jet-train-checkpoint-v1"  # in every checkpoint's metadata


def os_error(e: OSError) -> str:
    """An OSError's cause in words and by name, e.g. "No space left on device (ENOSPC)"."""
    return f"{e.strerror or e} ({errno.errorcode.get(e.errno, 'unknown error')})"


# ------------------------------------------------------------------------------------------
# Writing and reading


def to_host(leaf) -> np.ndarray:
    """A replicated device array (or host value) as NumPy; this process's copy suffices."""
    return np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)


def flatten(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): to_host(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def save(path: str, state: dict, meta: dict) -> None:
    """Writes `path` whole or not at all: a temporary file, fsynced, then renamed. A write that
    fails (disk full, permission denied, the workdir gone) leaves the previous checkpoint as it
    was and no temporary file, and raises a ValueError naming the path and the cause."""
    arrays = flatten(state) | {"meta": np.array(json.dumps(meta))}
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: a reader sees the old or the new checkpoint, never half
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        kept = ("the previous one is untouched" if os.path.exists(path) else
                "there is no earlier one")
        raise ValueError(f"cannot write the checkpoint {path}: {os_error(e)}; {kept}. Free "
                         "space or fix the permissions, then run the same command to resume "
                         "from the last checkpoint.") from e
    if os.name == "posix":  # the rename itself survives a power cut once its directory is synced
        dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """All arrays and the metadata of a checkpoint; a clear error if it is not one of ours."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays.pop("meta")))
        if meta.get("format") != FORMAT:
            raise KeyError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
    except Exception as e:  # zip, CRC, JSON and key errors all mean the same to the user
        raise ValueError(f"{path} is not a readable Jet checkpoint ({type(e).__name__}: {e}). "
                         "Delete it to start over, or point --workdir elsewhere.") from e
    return arrays, meta


def state_template(cfg: jet.Config, tx, init=jet.init) -> dict:
    """Shapes and dtypes of a state (tx=None: without optimizer state), to restore into."""
    params = jax.eval_shape(lambda: init(jax.random.key(0), cfg)[0])
    perms = jax.ShapeDtypeStruct((cfg.depth, cfg.num_tokens * cfg.token_dim), jnp.int32)
    rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    return {"params": params, "perms": perms, "rng": rng,
            **({"opt_state": jax.eval_shape(tx.init, params)} if tx else {})}


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
# Resuming


def open_workdir(workdir: str, model_name: str, needed: bool) -> dict:
    """The workdir's checkpoint: {"path", "arrays", "meta"} (arrays and meta None when there is
    none; `needed`: that is an error)."""
    path = os.path.join(workdir, "checkpoint.npz")
    arrays, meta = read(path) if os.path.exists(path) else (None, None)
    if needed and meta is None:
        raise ValueError(f"--eval_only/--sample need a checkpoint, but {path} does not "
                         "exist; train first or pass the right --workdir (or --dataset and "
                         "--preset, which name the default one).")
    if meta and meta.get("model", "jet") != model_name:
        raise ValueError(f"{workdir} holds a run of model {meta.get('model', 'jet')!r}, "
                         f"not {model_name!r}; use another --workdir.")
    return {"path": path, "arrays": arrays, "meta": meta}


def append_record(path: str, record: dict) -> None:
    """One JSON line more in metrics.jsonl."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def start_metrics(path: str, step: int | None, first: dict) -> None:
    """metrics.jsonl as a run starts: resumed at `step`, without the records an interrupted
    run wrote after it; new (step None), holding only the record `first`."""
    lines = [json.dumps(first) + "\n"]
    if step is not None and os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(f"{path}.tmp", "w") as f:
        f.writelines(lines)
    os.replace(f"{path}.tmp", path)


def load_params(path: str, template: dict, cfg: jet.Config):
    """Params and perms of another run (a checkpoint file or its workdir), for fine-tuning."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.npz")
    arrays, meta = read(path)
    if jet.Config(**meta["config"]) != cfg:
        raise ValueError(f"--init_from {path} has model {jet.Config(**meta['config'])}, but "
                         f"this run builds {cfg}; pass the same model flags.")
    restored = restore(arrays, template, path)
    print(f"Initialised params from {path} (step {meta['step']}).", flush=True)
    return restored["params"], restored["perms"]


def read_run(run: str) -> tuple[dict, jet.Config, dict]:
    """A trained unconditional run's params and perms ({"params", "perms", "rng"}), its
    jet.Config and its metadata, from the run's workdir (or its checkpoint file)."""
    path = os.path.join(run, "checkpoint.npz") if os.path.isdir(run) else run
    if not os.path.exists(path):
        raise ValueError(f"{path} does not exist: pass a training run's --workdir (it holds "
                         "checkpoint.npz) or the checkpoint file itself.")
    arrays, meta = read(path)
    cfg = jet.Config(**meta["config"])
    if cfg.context_dim:
        raise ValueError(f"{path} is a conditional model; this reads unconditional ones.")
    if meta.get("model", "jet") != "jet":
        raise ValueError(f"{path} holds model {meta['model']!r}, not jet; this reads Jet runs.")
    return restore(arrays, state_template(cfg, None), path), cfg, meta
