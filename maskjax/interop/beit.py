"""transformers BEiT (BeitForMaskedImageModeling) <-> maskjax `Beit` parameters.

Key layout as in `model.state_dict()` (transformers 5):

  beit.embeddings.cls_token / mask_token (1, 1, D)            -> cls_token / mask_token (D,)
  beit.embeddings.patch_embeddings.projection (D, C, p, p)    -> patch_embed (p·p·C, D)
  beit.shared_position_bias.relative_position_bias_table      -> rel_pos_table (R, heads)
  beit.layers.{i}.attention.{q,k,v,o}_proj                    -> stack.blocks.attn.{query,key,value,out}[i]
  beit.layers.{i}.layernorm_before / layernorm_after          -> stack.blocks.ln1[i] / ln2[i]
  beit.layers.{i}.mlp.fc1 / fc2                               -> stack.blocks.mlp.wi[i] / wo[i]
  beit.layers.{i}.lambda_1 / lambda_2                         -> stack.blocks.gamma1[i] / gamma2[i]
  layernorm / lm_head                                         -> norm / head

`save_pretrained` and the Hub checkpoints use the older names
(`beit.encoder.layer.{i}.attention.attention.query`, `...attention.output.dense`,
`...intermediate.dense`, `...output.dense`, `beit.encoder.relative_position_bias`);
`params_from_hf` accepts both. torch Linear weights are (out, in); maskjax kernels
are (in, out) with heads as an axis. The conv weight (D, C, p, p) becomes a Dense
kernel over patches flattened in (row, column, channel) order, as `vit.patchify`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from maskjax.models.beit import BeitConfig

# transformers' model_type -> the maskjax model family it converts to
HF_MODEL_TYPES: dict[str, str] = {"beit": "beit"}
HF_ARCHITECTURES: tuple[str, ...] = ("BeitForMaskedImageModeling",)

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
# Older checkpoint names -> the current state_dict names (applied in order).
_LEGACY = (
    (re.compile(r"^beit\.encoder\.layer\.(\d+)\."), r"beit.layers.\1."),
    (re.compile(r"\.attention\.attention\.query\."), ".attention.q_proj."),
    (re.compile(r"\.attention\.attention\.key\."), ".attention.k_proj."),
    (re.compile(r"\.attention\.attention\.value\."), ".attention.v_proj."),
    (re.compile(r"\.attention\.output\.dense\."), ".attention.o_proj."),
    (re.compile(r"\.intermediate\.dense\."), ".mlp.fc1."),
    (re.compile(r"\.output\.dense\."), ".mlp.fc2."),
    (re.compile(r"^beit\.encoder\.relative_position_bias\."), "beit.shared_position_bias."),
)
_IGNORED = re.compile(r"relative_position_index$")  # a buffer of old checkpoints, rebuilt from the grid


def config_from_hf(hf_config) -> BeitConfig:
    """transformers BeitConfig -> BeitConfig, refusing the options maskjax's BEiT does not implement."""
    needed = {
        "use_mask_token": True,
        "use_shared_relative_position_bias": True,
        "use_relative_position_bias": False,  # per-layer tables (fine-tuning variant)
        "use_absolute_position_embeddings": False,
        "use_mean_pooling": True,  # otherwise BeitModel adds a second final LayerNorm
    }
    for name, want in needed.items():
        value = getattr(hf_config, name)
        if bool(value) != want:
            raise ValueError(f"BEiT config {name}={value!r} is not supported (maskjax needs {want})")
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim is not None and head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
        raise ValueError(f"BEiT config head_dim={head_dim} must be hidden_size / num_attention_heads")
    if hf_config.hidden_act not in _ACTIVATIONS:
        raise ValueError(
            f"BEiT config hidden_act={hf_config.hidden_act!r} is not supported; "
            f"allowed: {sorted(_ACTIVATIONS)}"
        )
    image_size, patch_size = hf_config.image_size, hf_config.patch_size
    if isinstance(image_size, list | tuple):
        if len(set(image_size)) != 1:
            raise ValueError(f"BEiT config image_size={image_size!r}: only square images are supported")
        image_size = image_size[0]
    if isinstance(patch_size, list | tuple):
        if len(set(patch_size)) != 1:
            raise ValueError(f"BEiT config patch_size={patch_size!r}: only square patches are supported")
        patch_size = patch_size[0]
    scale = hf_config.layer_scale_init_value
    return BeitConfig(
        image_size=int(image_size),
        patch_size=int(patch_size),
        channels=hf_config.num_channels,
        codebook_size=hf_config.vocab_size,
        hidden=hf_config.hidden_size,
        layers=hf_config.num_hidden_layers,
        heads=hf_config.num_attention_heads,
        mlp_dim=hf_config.intermediate_size,
        activation=_ACTIVATIONS[hf_config.hidden_act],
        layer_norm_eps=hf_config.layer_norm_eps,
        layer_scale=float(scale) if scale > 0 else None,  # HF: 0 means no layer scale
        dropout=hf_config.hidden_dropout_prob,
        attention_dropout=hf_config.attention_probs_dropout_prob,
        drop_path=hf_config.drop_path_rate,
        init_std=hf_config.initializer_range,
    )


def hf_config(cfg: BeitConfig):
    """BeitConfig -> transformers.BeitConfig for BeitForMaskedImageModeling."""
    from transformers import BeitConfig as HfBeitConfig

    if tuple(cfg.qkv_bias) != (True, False, True):
        raise ValueError(f"BeitConfig.qkv_bias={cfg.qkv_bias!r}: transformers' BEiT has (True, False, True)")
    return HfBeitConfig(
        vocab_size=cfg.codebook_size,
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.mlp_dim,
        hidden_act=_TO_HF_ACTIVATION[cfg.activation],
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        initializer_range=cfg.init_std,
        layer_norm_eps=cfg.layer_norm_eps,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=cfg.channels,
        use_mask_token=True,
        use_absolute_position_embeddings=False,
        use_relative_position_bias=False,
        use_shared_relative_position_bias=True,
        layer_scale_init_value=cfg.layer_scale if cfg.layer_scale is not None else 0.0,
        drop_path_rate=cfg.drop_path,
        use_mean_pooling=True,
        architectures=["BeitForMaskedImageModeling"],
    )


# Per-layer torch names (inside `beit.layers.{i}.`) of plain vectors -> path under stack/blocks.
_VECTORS = {
    "layernorm_before.weight": ("ln1", "scale"),
    "layernorm_before.bias": ("ln1", "bias"),
    "layernorm_after.weight": ("ln2", "scale"),
    "layernorm_after.bias": ("ln2", "bias"),
    "attention.q_proj.bias": ("attn", "query", "bias"),
    "attention.v_proj.bias": ("attn", "value", "bias"),
    "attention.o_proj.bias": ("attn", "out", "bias"),
    "mlp.fc1.bias": ("mlp", "wi", "bias"),
    "mlp.fc2.bias": ("mlp", "wo", "bias"),
}
_SCALES = {"lambda_1": ("gamma1",), "lambda_2": ("gamma2",)}
# Per-layer Linear weights (out, in) -> path of the kernel under stack/blocks.
_LINEARS = {
    "attention.q_proj.weight": ("attn", "query", "kernel"),
    "attention.k_proj.weight": ("attn", "key", "kernel"),
    "attention.v_proj.weight": ("attn", "value", "kernel"),
    "attention.o_proj.weight": ("attn", "out", "kernel"),
    "mlp.fc1.weight": ("mlp", "wi", "kernel"),
    "mlp.fc2.weight": ("mlp", "wo", "kernel"),
}
_TOP_VECTORS = {
    "beit.embeddings.patch_embeddings.projection.bias": ("patch_embed", "bias"),
    "layernorm.weight": ("norm", "scale"),
    "layernorm.bias": ("norm", "bias"),
    "lm_head.bias": ("head", "bias"),
}


def _canonical(key: str) -> str:
    for pattern, repl in _LEGACY:
        key = pattern.sub(repl, key)
    return key


def _expected_shapes(cfg: BeitConfig) -> dict[str, tuple[int, ...]]:
    """Current torch names (layer `{i}` for every layer) -> shapes, for a BEiT of this config."""
    d, f, p, h, w = cfg.hidden, cfg.mlp_dim, cfg.patch_size, *cfg.grid
    shapes = {
        "beit.embeddings.cls_token": (1, 1, d),
        "beit.embeddings.mask_token": (1, 1, d),
        "beit.embeddings.patch_embeddings.projection.weight": (d, cfg.channels, p, p),
        "beit.embeddings.patch_embeddings.projection.bias": (d,),
        "beit.shared_position_bias.relative_position_bias_table": ((2 * h - 1) * (2 * w - 1) + 3, cfg.heads),
        "layernorm.weight": (d,),
        "layernorm.bias": (d,),
        "lm_head.weight": (cfg.codebook_size, d),
        "lm_head.bias": (cfg.codebook_size,),
    }
    layer = {name: (d,) for name in _VECTORS} | {"mlp.fc1.bias": (f,)}
    layer |= {name: (d, d) for name in _LINEARS} | {"mlp.fc1.weight": (f, d), "mlp.fc2.weight": (d, f)}
    if cfg.layer_scale is not None:
        layer |= {name: (d,) for name in _SCALES}
    for i in range(cfg.layers):
        shapes |= {f"beit.layers.{i}.{name}": shape for name, shape in layer.items()}
    return shapes


def _put(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]) -> np.ndarray:
    for key in path:
        tree = tree[key]
    return np.asarray(tree, np.float32)


def params_from_hf(state_dict: Mapping[str, np.ndarray], cfg: BeitConfig) -> dict:
    """BeitForMaskedImageModeling state dict (current or `save_pretrained` names) -> `Beit` pure dict."""
    sd = {_canonical(k): np.asarray(v, np.float32) for k, v in state_dict.items() if not _IGNORED.search(k)}
    shapes = _expected_shapes(cfg)
    missing, unexpected = sorted(set(shapes) - set(sd)), sorted(set(sd) - set(shapes))
    if missing or unexpected:
        raise ValueError(
            f"BEiT checkpoint does not match the config: missing {missing}, unexpected {unexpected}"
        )
    for key, value in sd.items():
        if value.shape != shapes[key]:
            raise ValueError(
                f"{key}: checkpoint shape {value.shape} != {shapes[key]} expected from the config"
            )

    L, d, n, hd = cfg.layers, cfg.hidden, cfg.heads, cfg.head_dim
    stacked = lambda name: np.stack([sd[f"beit.layers.{i}.{name}"] for i in range(L)])  # noqa: E731
    blocks: dict = {}
    vectors = _VECTORS | (_SCALES if cfg.layer_scale is not None else {})
    for name, path in vectors.items():
        _put(blocks, path, stacked(name))
    for name in ("query", "value"):  # per-head biases (N, H)
        blocks["attn"][name]["bias"] = blocks["attn"][name]["bias"].reshape(L, n, hd)
    kernels = {name: stacked(name).transpose(0, 2, 1) for name in _LINEARS}  # (L, in, out)
    for name in ("attention.q_proj.weight", "attention.k_proj.weight", "attention.v_proj.weight"):
        _put(blocks, _LINEARS[name], kernels[name].reshape(L, d, n, hd))  # out features ordered (head, dim)
    _put(blocks, _LINEARS["attention.o_proj.weight"], kernels["attention.o_proj.weight"].reshape(L, n, hd, d))
    for name in ("mlp.fc1.weight", "mlp.fc2.weight"):
        _put(blocks, _LINEARS[name], kernels[name])

    out: dict = {}
    for name, path in _TOP_VECTORS.items():
        _put(out, path, sd[name])
    conv = sd["beit.embeddings.patch_embeddings.projection.weight"]  # (D, C, p, p)
    _put(out, ("patch_embed", "kernel"), conv.transpose(2, 3, 1, 0).reshape(-1, d))  # (p·p·C, D)
    out["cls_token"] = sd["beit.embeddings.cls_token"].reshape(d)
    out["mask_token"] = sd["beit.embeddings.mask_token"].reshape(d)
    out["rel_pos_table"] = sd["beit.shared_position_bias.relative_position_bias_table"]
    _put(out, ("head", "kernel"), sd["lm_head.weight"].T)
    out["stack"] = {"blocks": blocks}
    return out


def params_to_hf(params: Mapping, cfg: BeitConfig) -> dict[str, np.ndarray]:
    """`Beit` pure dict -> BeitForMaskedImageModeling state dict (current names; `load_state_dict`
    and `from_pretrained` both accept them)."""
    L, d, p, c = cfg.layers, cfg.hidden, cfg.patch_size, cfg.channels
    blocks = params["stack"]["blocks"]
    out = {name: _get(params, path) for name, path in _TOP_VECTORS.items()}
    kernel = _get(params, ("patch_embed", "kernel")).reshape(p, p, c, d)
    out["beit.embeddings.patch_embeddings.projection.weight"] = kernel.transpose(3, 2, 0, 1)
    out["beit.embeddings.cls_token"] = _get(params, ("cls_token",)).reshape(1, 1, d)
    out["beit.embeddings.mask_token"] = _get(params, ("mask_token",)).reshape(1, 1, d)
    out["beit.shared_position_bias.relative_position_bias_table"] = _get(params, ("rel_pos_table",))
    out["lm_head.weight"] = _get(params, ("head", "kernel")).T
    vectors = _VECTORS | (_SCALES if cfg.layer_scale is not None else {})
    per_layer = {name: _get(blocks, path).reshape(L, -1) for name, path in vectors.items()}
    for name, path in _LINEARS.items():
        kernel = _get(blocks, path)  # (L, *in, *out); only the attention output has two input axes (N, H)
        n_in = 2 if name == "attention.o_proj.weight" else 1
        fan_in = int(np.prod(kernel.shape[1 : 1 + n_in]))
        per_layer[name] = kernel.reshape(L, fan_in, -1).transpose(0, 2, 1)  # torch (out, in)
    for name, value in per_layer.items():
        out |= {f"beit.layers.{i}.{name}": value[i] for i in range(L)}
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
