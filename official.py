"""Loading parameters of the official Jet (google-research/big_vision,
`models/proj/jet/jet.py`) into jet.py's layout, so that a loaded model computes exactly the
official map. Kept apart from jet.py, which follows the paper.
"""

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jet import Config, channel_split_index, init, spatial_split_index


def from_big_vision(flat: Mapping[str, np.ndarray], image_shape: tuple[int, int, int],
                    **model_kwargs) -> tuple[dict, jax.Array, Config]:
    """Official parameters -> (params, perms, cfg).

    `flat` maps "/"-joined flax paths (optionally prefixed "params/") to arrays; `model_kwargs`
    are big_vision `jet.Model` arguments. Permutations are read from the stored one-hot
    matrices, so the result computes exactly the official map. A checkpoint of a model trained
    with a context (its DNN's own `MultiHeadDotProductAttention_0`) gives a conditional Config,
    context_dim read from that attention's key kernel; call it with the context the official
    model was given.
    """
    renames = {"ps": "patch_size", "channels_coupling_projs": "channel_projs",
               "spatial_coupling_projs": "spatial_projs"}
    known = {"depth", "block_depth", "emb_dim", "num_heads", "scale_factor", "kinds", *renames}
    if set(model_kwargs) - known:
        raise ValueError(f"Unknown big_vision jet.Model arguments "
                         f"{sorted(set(model_kwargs) - known)}; expected some of {sorted(known)}.")
    kwargs = {renames.get(k, k): v for k, v in model_kwargs.items()}
    flat = {key.removeprefix("params/"): np.asarray(v) for key, v in flat.items()}
    dnn = "couplings/dnn"
    context_mha = f"{dnn}/MultiHeadDotProductAttention_0"  # [depth, C_ctx, heads, head_dim]
    context_key = flat.get(f"{context_mha}/key/kernel")
    cfg = Config(image_shape=tuple(image_shape),  # jet.Model's own defaults first
                 **{"depth": 2, "emb_dim": 256, "patch_size": 4, **kwargs},
                 context_dim=None if context_key is None else int(context_key.shape[1]))

    def get(path, *leaves):  # one array, or a dict of the arrays path/leaf
        if leaves:
            return {leaf: get(f"{path}/{leaf}") for leaf in leaves}
        if path not in flat:
            raise ValueError(f"Missing official parameter {path!r}; is `flat` a big_vision Jet "
                             "checkpoint for these model_kwargs?")
        return flat[path]

    def mha(path):  # flax nn.MultiHeadDotProductAttention
        return {n: get(f"{path}/{n}", "kernel", "bias") for n in ("query", "key", "value", "out")}

    def block(vit):  # flax names of vit.Encoder1DBlock
        return {"ln1": get(f"{vit}/LayerNorm_0", "scale", "bias"),
                "attention": mha(f"{vit}/MultiHeadDotProductAttention_0"),
                "ln2": get(f"{vit}/LayerNorm_1", "scale", "bias"),
                "mlp": {"fc1": get(f"{vit}/MlpBlock_0/Dense_0", "kernel", "bias"),
                        "fc2": get(f"{vit}/MlpBlock_0/Dense_1", "kernel", "bias")}}

    blocks = [block(f"{dnn}/vit/encoderblock_{i}") for i in range(cfg.block_depth)]
    params = {"init_proj": get(f"{dnn}/init_proj", "kernel", "bias"),
              "posemb": get(f"{dnn}/posemb")[:, 0],  # [depth, 1, N, E] -> [depth, N, E]
              "blocks": jax.tree.map(lambda *b: np.stack(b, axis=1), *blocks),
              "encoder_norm": get(f"{dnn}/vit/encoder_norm", "scale", "bias"),
              "final_proj": get(f"{dnn}/final_proj", "kernel", "bias")}
    if cfg.context_dim:
        params["context_attention"] = mha(context_mha)
    params = jax.tree.map(jnp.asarray, check_shapes(params, cfg))
    perms = split_indices(get("channel_coupling_masks-FREEZE_ME"),  # [depth, D, D]
                          get("spatial_coupling_masks-FREEZE_ME"), cfg)  # [depth, N, N]
    return params, perms, cfg


def check_shapes(params: dict, cfg: Config) -> dict:
    """params, after checking every leaf against the shapes jet.init gives this Config."""
    expected = jax.eval_shape(lambda: init(jax.random.key(0), cfg)[0])
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(params),
                                 jax.tree.leaves(expected)):
        if got.shape != want.shape:
            raise ValueError(f"Official parameter {jax.tree_util.keystr(path)} has shape "
                             f"{got.shape}, expected {want.shape} for {cfg}.")
    return params


def split_indices(c_masks: np.ndarray, s_masks: np.ndarray, cfg: Config) -> jax.Array:
    """big_vision's one-hot coupling masks -> jet.py's split indices, int32 [depth, N*D]."""
    rows = []
    for i, (kind, _) in enumerate(cfg.couplings()):
        mask = c_masks[i] if kind == "channels" else s_masks[i]
        # mask[src, dst] = 1: output slot dst reads input slot src, so src = argmax over rows.
        src = mask.argmax(axis=0)
        if not np.array_equal(mask, np.eye(len(src), dtype=mask.dtype)[src].T):
            raise ValueError(f"Coupling {i} ({kind}) has a stored mask that is not a "
                             "permutation matrix; kinds/projs may not match the checkpoint.")
        src = jnp.asarray(src)
        rows.append(channel_split_index(src, cfg.num_tokens) if kind == "channels"
                    else spatial_split_index(src, cfg.token_dim))
    return jnp.stack(rows).astype(jnp.int32)
