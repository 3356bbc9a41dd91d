"""Evaluation: bits/dim over a whole set with a fixed noise key, and a conditional model's
classification by likelihood; a label as big_vision's context. What train.py reports at every
evaluation, --eval_only and the budget's timing phase measure, and ablate.py scores with.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import data
import jet
import presets

PROGRESS_SECONDS = 30  # a stdout line at least this often during a long evaluation


def class_context(labels: jax.Array, num_classes: int, drop=None) -> jax.Array:
    """Labels [B] -> big_vision's context, one-hot [B, 1, num_classes]; where drop [B] is True,
    the zero context (the unconditional model)."""
    context = jax.nn.one_hot(labels, num_classes)[:, None, :]
    return context if drop is None else jnp.where(drop[:, None, None], 0.0, context)


def make_batch_stats(cfg: jet.Config, f: dict, forward):
    """Jitted (params, perms, images, labels, mask, key, classify) -> masked sums over one
    batch: "bpd" (conditional models: under the true label); with classify, also "accuracy"
    (argmax over classes of log p(x | y), every class evaluated on the same noise) and
    "unconditional_bpd" (under the zero context)."""
    dtype = presets.compute_dtype(f)

    def bpd(params, perms, x, context=None):
        kwargs = {} if context is None else {"context": context}
        z, logdet = forward(params, perms, x, cfg, compute_dtype=dtype, **kwargs)
        return jet.bits_per_dim(z, logdet)  # [B]

    @functools.partial(jax.jit, static_argnames="classify")
    def batch_stats(params, perms, images, labels, mask, key, classify=False):
        x = jet.dequantize(key, images)
        K = cfg.context_dim
        if not K:
            return {"bpd": jnp.sum(bpd(params, perms, x) * mask)}
        stats = {"bpd": jnp.sum(bpd(params, perms, x, class_context(labels, K)) * mask)}
        if classify:
            every = jax.lax.map(  # [K, B]: bits/dim of each example under each class
                lambda c: bpd(params, perms, x, class_context(jnp.full_like(labels, c), K)),
                jnp.arange(K))
            stats["accuracy"] = jnp.sum((jnp.argmin(every, axis=0) == labels) * mask)
            zero = jnp.zeros((x.shape[0], 1, K), x.dtype)
            stats["unconditional_bpd"] = jnp.sum(bpd(params, perms, x, zero) * mask)
        return stats
    return batch_stats


def make_evaluators(run: dict) -> dict:
    """name -> evaluate(state, key, classify=False, limit=None) -> {"bpd", ...} over "test",
    "validation" (with --validation) and "train", a fixed slice of the training set as large
    as the held-out set (at most 2,000 images), where overfitting shows."""
    f, sets = run["f"], run["sets"]
    batch_stats = make_batch_stats(run["cfg"], f, run["model"]["forward"])
    size = min(len(sets["train"]), len(sets.get("validation", sets["test"])), 2000)
    evaluators = {}
    for name in ("test", "validation", "train"):
        if name in sets:
            index = (data.batch_indices(len(sets["train"]), size, f["seed"], 0)
                     if name == "train" else slice(None))
            labels = sets.get(f"{name}_labels", np.zeros(len(sets[name]), np.int64))
            evaluators[name] = make_evaluate(batch_stats, sets[name][index], labels[index],
                                             f["eval_batch_size"], run["put_batch"])
    return evaluators


def make_evaluate(batch_stats, images: np.ndarray, labels: np.ndarray, batch_size: int,
                  put_batch):
    """Means over `images` (or their first `limit`) of batch_stats' sums; batch i's noise is
    fold_in(key, i), so every figure is reproducible."""
    def evaluate(state, key, classify=False, limit=None) -> dict[str, float]:
        totals, last_line, n = {}, time.time(), min(limit or len(images), len(images))
        for i, ((batch, batch_labels), mask) in enumerate(
                data.padded_batches((images, labels), batch_size, limit)):
            if time.time() - last_line >= PROGRESS_SECONDS:
                print(f"evaluating: {i * batch_size}/{n} images", flush=True)
                last_line = time.time()
            sums = batch_stats(state["params"], state["perms"], put_batch(batch),
                               put_batch(batch_labels), put_batch(mask),
                               jax.random.fold_in(key, i), classify=classify)
            for name, value in sums.items():
                totals[name] = totals.get(name, 0.0) + float(value)
        return {name: totals[name] / n  # "bpd" first
                for name in sorted(totals, key=lambda name: name != "bpd")}
    evaluate.size = len(images)
    return evaluate


def eval_line(record: dict) -> str:
    """An evaluation record as a log line: "test 3.6512 bpd | test_accuracy 0.3120 | ..."."""
    return " | ".join(f"{k.removesuffix('_bpd')} {v if isinstance(v, int) else f'{v:.4f}'}"
                      + " bpd" * k.endswith("_bpd") for k, v in record.items()
                      if k not in ("step", "time_s"))
