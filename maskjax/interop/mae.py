"""transformers ViTMAEForPreTraining <-> maskjax `Mae` parameters.

HF names (transformers 5; older checkpoints' names are renamed first, see `_LEGACY`):

  vit.embeddings.patch_embeddings.projection   Conv2d (D, C, p, p) -> patch_embed kernel (p·p·C, D),
                                               reordered (row, col, channel) like `vit.patchify`
  vit.embeddings.cls_token (1, 1, D)           -> cls_token (D,)
  vit.layers.{i}.attention.{q,k,v,o}_proj      -> encoder/blocks/attn/{query,key,value,out}
  vit.layers.{i}.layernorm_before / _after     -> encoder/blocks/ln1 / ln2   (pre-LN)
  vit.layers.{i}.mlp.fc1 / fc2                 -> encoder/blocks/mlp/wi / wo
  vit.layernorm                                -> norm
  decoder.decoder_embed, decoder.mask_token, decoder.decoder_layers.{i}.*, decoder.decoder_norm,
  decoder.decoder_pred                         -> decoder_embed, mask_token, decoder/blocks/*, ...

nn.Linear weights are (out, in): transposed, then the head axis is split out
((D, N·H) -> (D, N, H)). HF keeps the fixed sin-cos tables
(`vit.embeddings.position_embeddings`, `decoder.decoder_pos_embed`) as frozen
parameters; maskjax computes them, so they are only checked on import and
written on export.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping

import numpy as np

from maskjax.models import layers
from maskjax.models.vit import MaeConfig, decoder_config, sincos_pos_embed_2d

# transformers' model_type -> the maskjax model family it converts to
HF_MODEL_TYPES: dict[str, str] = {"vit_mae": "mae"}
HF_ARCHITECTURES: tuple[str, ...] = ("ViTMAEForPreTraining",)
# Training settings ViTMAEConfig carries beside the architecture: config.masking field -> its field.
HF_MASKING: dict[str, str] = {"ratio": "mask_ratio", "norm_pix_loss": "norm_pix_loss"}

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}

# Checkpoints written by transformers < 5 (e.g. facebook/vit-mae-base) use the old ViT names; the same
# renames transformers applies when it loads them (its conversion_mapping), in this order.
_LEGACY = (
    (re.compile(r"^vit\.encoder\.layer\."), "vit.layers."),
    (re.compile(r"\.attention\.attention\.(query|key|value)\."), lambda m: f".attention.{m[1][0]}_proj."),
    (re.compile(r"\.attention\.output\.dense\."), ".attention.o_proj."),
    (re.compile(r"\.intermediate\.dense\."), ".mlp.fc1."),
    (re.compile(r"\.output\.dense\."), ".mlp.fc2."),
)
_POS_TABLES = ("vit.embeddings.position_embeddings", "decoder.decoder_pos_embed")
_QKV = (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"))
# per-layer HF name -> path in a Block's pure dict; Linear weights handled in stack_from_hf
_LN = {
    "layernorm_before.weight": ("ln1", "scale"),
    "layernorm_before.bias": ("ln1", "bias"),
    "layernorm_after.weight": ("ln2", "scale"),
    "layernorm_after.bias": ("ln2", "bias"),
}


def _modern_name(key: str) -> str:
    for pattern, repl in _LEGACY:
        key = pattern.sub(repl, key)
    return key


def _square(value: int | list | tuple, name: str) -> int:
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        raise ValueError(f"ViTMAE config {name}={value!r}: only square images and patches are supported")
    return int(value[0])


def config_from_hf(hf_config) -> MaeConfig:
    """ViTMAEConfig -> MaeConfig (square images only, as HF's own patchify requires)."""
    size, patch = _square(hf_config.image_size, "image_size"), _square(hf_config.patch_size, "patch_size")
    if hf_config.hidden_act not in _ACTIVATIONS:
        raise ValueError(
            f"ViTMAE config hidden_act={hf_config.hidden_act!r} is not supported; "
            f"allowed: {sorted(_ACTIVATIONS)}"
        )
    return MaeConfig(
        hidden=hf_config.hidden_size,
        layers=hf_config.num_hidden_layers,
        heads=hf_config.num_attention_heads,
        mlp_dim=hf_config.intermediate_size,
        activation=_ACTIVATIONS[hf_config.hidden_act],
        dropout=float(hf_config.hidden_dropout_prob),
        attention_dropout=float(hf_config.attention_probs_dropout_prob),
        layer_norm_eps=hf_config.layer_norm_eps,
        qkv_bias=(bool(hf_config.qkv_bias),) * 3,
        init_std=hf_config.initializer_range,
        image_size=size,
        patch_size=patch,
        channels=hf_config.num_channels,
        decoder_hidden=hf_config.decoder_hidden_size,
        decoder_layers=hf_config.decoder_num_hidden_layers,
        decoder_heads=hf_config.decoder_num_attention_heads,
        decoder_mlp_dim=hf_config.decoder_intermediate_size,
    )  # mask_ratio and norm_pix_loss are training settings (HF_MASKING): a config's `masking` section


def hf_config(cfg: MaeConfig):
    """MaeConfig -> transformers.ViTMAEConfig for ViTMAEForPreTraining."""
    from transformers import ViTMAEConfig

    unsupported = {
        "qkv_bias": (len(set(cfg.qkv_bias)) == 1, "all equal"),
        "drop_path": (cfg.drop_path == 0.0, "0.0"),
        "layer_scale": (cfg.layer_scale is None, "None"),
    }
    for name, (ok, needed) in unsupported.items():
        if not ok:
            raise ValueError(
                f"MaeConfig.{name}={getattr(cfg, name)!r} has no ViTMAE equivalent (needs {needed})"
            )
    return ViTMAEConfig(
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
        qkv_bias=cfg.qkv_bias[0],
        decoder_num_attention_heads=cfg.decoder_heads,
        decoder_hidden_size=cfg.decoder_hidden,
        decoder_num_hidden_layers=cfg.decoder_layers,
        decoder_intermediate_size=cfg.decoder_mlp_dim,
        architectures=list(HF_ARCHITECTURES),
    )


def _stack_names(prefix: str, cfg: layers.TransformerConfig) -> list[str]:
    names = [*_LN, "attention.o_proj.weight", "attention.o_proj.bias"]
    names += ["mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    for (_, hf), bias in zip(_QKV, cfg.qkv_bias, strict=True):
        names += [f"attention.{hf}.weight"] + ([f"attention.{hf}.bias"] if bias else [])
    return [f"{prefix}{i}.{n}" for i in range(cfg.layers) for n in names]


def stack_from_hf(sd: Mapping[str, np.ndarray], prefix: str, cfg: layers.TransformerConfig) -> dict:
    """HF ViT-style layers `{prefix}{i}.*` -> pure dict of a `layers.Stack`: {"blocks": ...}, stacked on L."""
    L, d, n, h = cfg.layers, cfg.hidden, cfg.heads, cfg.head_dim
    stacked = lambda name: np.stack([np.asarray(sd[f"{prefix}{i}.{name}"], np.float32) for i in range(L)])  # noqa: E731
    blocks: dict = {"attn": {}, "mlp": {}, "ln1": {}, "ln2": {}}
    for name, (part, leaf) in _LN.items():
        blocks[part][leaf] = stacked(name)
    for (ours, hf), bias in zip(_QKV, cfg.qkv_bias, strict=True):
        w = stacked(f"attention.{hf}.weight")  # (L, N·H, D)
        blocks["attn"][ours] = {"kernel": w.transpose(0, 2, 1).reshape(L, d, n, h)}
        if bias:
            blocks["attn"][ours]["bias"] = stacked(f"attention.{hf}.bias").reshape(L, n, h)
    blocks["attn"]["out"] = {
        "kernel": stacked("attention.o_proj.weight").transpose(0, 2, 1).reshape(L, n, h, d),
        "bias": stacked("attention.o_proj.bias"),
    }
    for ours, hf in (("wi", "fc1"), ("wo", "fc2")):
        blocks["mlp"][ours] = {
            "kernel": stacked(f"mlp.{hf}.weight").transpose(0, 2, 1),
            "bias": stacked(f"mlp.{hf}.bias"),
        }
    return {"blocks": blocks}


def stack_to_hf(stack: Mapping, prefix: str, cfg: layers.TransformerConfig) -> dict[str, np.ndarray]:
    """Inverse of `stack_from_hf`."""
    L, d = cfg.layers, cfg.hidden
    blocks = stack["blocks"]
    arr = lambda x: np.asarray(x, np.float32)  # noqa: E731
    per_layer = {name: arr(blocks[part][leaf]) for name, (part, leaf) in _LN.items()}
    for (ours, hf), bias in zip(_QKV, cfg.qkv_bias, strict=True):
        per_layer[f"attention.{hf}.weight"] = (
            arr(blocks["attn"][ours]["kernel"]).reshape(L, d, -1).transpose(0, 2, 1)
        )
        if bias:
            per_layer[f"attention.{hf}.bias"] = arr(blocks["attn"][ours]["bias"]).reshape(L, -1)
    per_layer["attention.o_proj.weight"] = (
        arr(blocks["attn"]["out"]["kernel"]).reshape(L, -1, d).transpose(0, 2, 1)
    )
    per_layer["attention.o_proj.bias"] = arr(blocks["attn"]["out"]["bias"])
    for ours, hf in (("wi", "fc1"), ("wo", "fc2")):
        per_layer[f"mlp.{hf}.weight"] = arr(blocks["mlp"][ours]["kernel"]).transpose(0, 2, 1)
        per_layer[f"mlp.{hf}.bias"] = arr(blocks["mlp"][ours]["bias"])
    return {f"{prefix}{i}.{name}": value[i] for name, value in per_layer.items() for i in range(L)}


def patch_kernel_from_conv(w: np.ndarray) -> np.ndarray:
    """Conv2d weight (D, C, p, p) -> (p·p·C, D) with rows in patchify's (row, col, channel) order."""
    return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])


def _top_names() -> list[str]:
    names = ["vit.embeddings.cls_token", "decoder.mask_token"]
    for module in (
        "vit.embeddings.patch_embeddings.projection",
        "vit.layernorm",
        "decoder.decoder_embed",
        "decoder.decoder_norm",
        "decoder.decoder_pred",
    ):
        names += [f"{module}.weight", f"{module}.bias"]
    return names


def params_from_hf(state_dict: Mapping[str, np.ndarray], cfg: MaeConfig) -> dict:
    """ViTMAEForPreTraining state dict (new or pre-5.0 names) -> pure dict of `Mae`'s parameters."""
    sd = {_modern_name(k): np.asarray(v, np.float32) for k, v in state_dict.items()}
    dcfg = decoder_config(cfg)
    needed = set(_top_names()) | set(_stack_names("vit.layers.", cfg))
    needed |= set(_stack_names("decoder.decoder_layers.", dcfg))
    missing, unexpected = sorted(needed - set(sd)), sorted(set(sd) - needed - set(_POS_TABLES))
    if missing or unexpected:
        raise ValueError(
            f"ViTMAE checkpoint does not match the config: missing {missing}, unexpected {unexpected}"
        )
    for name, dim in zip(_POS_TABLES, (cfg.hidden, cfg.decoder_hidden), strict=True):
        if name in sd:
            want = sincos_pos_embed_2d(dim, cfg.grid_size)
            got = sd[name].reshape(-1, dim) if sd[name].size == want.size else None
            if got is None or np.abs(got - want).max() > 1e-4:
                warnings.warn(
                    f"{name} is not the fixed 2-D sin-cos table that maskjax computes; it is ignored "
                    "(released checkpoints hold it; a freshly constructed transformers ViTMAE holds zeros)",
                    stacklevel=2,
                )

    w = sd["vit.embeddings.patch_embeddings.projection.weight"]
    want = (cfg.hidden, cfg.channels, cfg.patch_size, cfg.patch_size)
    if w.shape != want:
        raise ValueError(f"patch projection has shape {w.shape}, the config needs {want}")
    linear = lambda name: {"kernel": sd[f"{name}.weight"].T, "bias": sd[f"{name}.bias"]}  # noqa: E731
    norm = lambda name: {"scale": sd[f"{name}.weight"], "bias": sd[f"{name}.bias"]}  # noqa: E731
    return {
        "patch_embed": {
            "kernel": patch_kernel_from_conv(w),
            "bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
        },
        "cls_token": sd["vit.embeddings.cls_token"].reshape(cfg.hidden),
        "encoder": stack_from_hf(sd, "vit.layers.", cfg),
        "norm": norm("vit.layernorm"),
        "decoder_embed": linear("decoder.decoder_embed"),
        "mask_token": sd["decoder.mask_token"].reshape(cfg.decoder_hidden),
        "decoder": stack_from_hf(sd, "decoder.decoder_layers.", dcfg),
        "decoder_norm": norm("decoder.decoder_norm"),
        "decoder_pred": linear("decoder.decoder_pred"),
    }


def params_to_hf(params: Mapping, cfg: MaeConfig) -> dict[str, np.ndarray]:
    """Pure dict of `Mae`'s parameters -> ViTMAEForPreTraining state dict, with the sin-cos tables."""
    arr = lambda x: np.asarray(x, np.float32)  # noqa: E731
    p, c, d = cfg.patch_size, cfg.channels, cfg.hidden
    out = {
        "vit.embeddings.cls_token": arr(params["cls_token"]).reshape(1, 1, d),
        "vit.embeddings.position_embeddings": sincos_pos_embed_2d(d, cfg.grid_size)[None],
        "vit.embeddings.patch_embeddings.projection.weight": arr(params["patch_embed"]["kernel"])
        .reshape(p, p, c, d)
        .transpose(3, 2, 0, 1),
        "vit.embeddings.patch_embeddings.projection.bias": arr(params["patch_embed"]["bias"]),
        "decoder.mask_token": arr(params["mask_token"]).reshape(1, 1, cfg.decoder_hidden),
        "decoder.decoder_pos_embed": sincos_pos_embed_2d(cfg.decoder_hidden, cfg.grid_size)[None],
    }
    for hf, ours in (("vit.layernorm", "norm"), ("decoder.decoder_norm", "decoder_norm")):
        out |= {f"{hf}.weight": arr(params[ours]["scale"]), f"{hf}.bias": arr(params[ours]["bias"])}
    for hf, ours in (("decoder.decoder_embed", "decoder_embed"), ("decoder.decoder_pred", "decoder_pred")):
        out |= {f"{hf}.weight": arr(params[ours]["kernel"]).T, f"{hf}.bias": arr(params[ours]["bias"])}
    out |= stack_to_hf(params["encoder"], "vit.layers.", cfg)
    out |= stack_to_hf(params["decoder"], "decoder.decoder_layers.", decoder_config(cfg))
    return {k: np.array(v, np.float32, order="C") for k, v in out.items()}  # fresh, writable copies
