"""transformers GPT-2 (GPT2LMHeadModel / GPT2Model) <-> maskjax `Gpt` parameters.

HF GPT-2 uses `Conv1D` layers whose weight is stored (in, out), i.e. already
in the x·W orientation of maskjax's kernels (not transposed like nn.Linear).
The fused attention input `c_attn.weight` (D, 3D) holds [query | key | value]
along its output axis; each part is reshaped to maskjax's (D, N, H) kernel,
and `c_proj.weight` (D, D) to the (N, H, D) output kernel.

The output layer is tied to the token embedding (`lm_head.weight` is
`transformer.wte.weight`), so it is read only to check the tie and never written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from maskjax.models.gpt import GptConfig

# transformers' model_type -> the maskjax model family it converts to
HF_MODEL_TYPES: dict[str, str] = {"gpt2": "gpt"}
HF_ARCHITECTURES: tuple[str, ...] = ("GPT2LMHeadModel", "GPT2Model")

# transformers' activation_function <-> maskjax activation.
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
_TO_HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
# Buffers of older checkpoints (the causal mask and its fill value), not parameters.
_IGNORED = re.compile(r"^(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)$")
_PREFIX = "transformer."


def config_from_hf(hf_config) -> GptConfig:
    """GPT2Config -> GptConfig, refusing the options maskjax's GPT-2 does not implement."""
    unsupported = {
        "add_cross_attention": (getattr(hf_config, "add_cross_attention", False), False),
        "scale_attn_weights": (getattr(hf_config, "scale_attn_weights", True), True),
        "scale_attn_by_inverse_layer_idx": (
            getattr(hf_config, "scale_attn_by_inverse_layer_idx", False),
            False,
        ),
        "tie_word_embeddings": (getattr(hf_config, "tie_word_embeddings", True), True),
    }
    for name, (value, needed) in unsupported.items():
        if bool(value) != needed:
            raise ValueError(f"GPT-2 config {name}={value!r} is not supported (maskjax needs {needed})")
    if hf_config.activation_function not in _ACTIVATIONS:
        raise ValueError(
            f"GPT-2 config activation_function={hf_config.activation_function!r} is not supported; "
            f"allowed: {sorted(_ACTIVATIONS)}"
        )
    # reorder_and_upcast_attn only changes the rounding of fp16 attention scores: ignored.
    return GptConfig(
        vocab_size=hf_config.vocab_size,
        max_length=hf_config.n_positions,
        hidden=hf_config.n_embd,
        layers=hf_config.n_layer,
        heads=hf_config.n_head,
        mlp_dim=hf_config.n_inner if hf_config.n_inner is not None else 4 * hf_config.n_embd,
        activation=_ACTIVATIONS[hf_config.activation_function],
        layer_norm_eps=hf_config.layer_norm_epsilon,
        dropout=hf_config.resid_pdrop,
        embed_dropout=None if hf_config.embd_pdrop == hf_config.resid_pdrop else hf_config.embd_pdrop,
        attention_dropout=hf_config.attn_pdrop,
        init_std=hf_config.initializer_range,
    )


def hf_config(cfg: GptConfig):
    """GptConfig -> transformers.GPT2Config for GPT2LMHeadModel."""
    from transformers import GPT2Config

    if cfg.qkv_bias != (True, True, True) or cfg.layer_scale is not None:
        raise ValueError(
            f"GptConfig.qkv_bias={cfg.qkv_bias} / layer_scale={cfg.layer_scale} have no GPT-2 equivalent: "
            "export needs qkv_bias=(True, True, True) and layer_scale=None"
        )
    # GPT-2's <|endoftext|> (50256) is the last id of its vocabulary; other vocabularies name none here.
    eos = 50256 if cfg.vocab_size == 50257 else None
    return GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_length,
        n_embd=cfg.hidden,
        n_layer=cfg.layers,
        n_head=cfg.heads,
        n_inner=cfg.mlp_dim,
        activation_function=_TO_HF_ACTIVATION[cfg.activation],
        layer_norm_epsilon=cfg.layer_norm_eps,
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout if cfg.embed_dropout is None else cfg.embed_dropout,
        attn_pdrop=cfg.attention_dropout,
        initializer_range=cfg.init_std,
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=True,
        architectures=["GPT2LMHeadModel"],
    )


# One-to-one names: HF (inside `transformer.`, `{i}` = layer) -> path in Gpt's pure dict (per-layer
# entries are stacked over layers under stack/blocks). Conv1D weights are (in, out) like maskjax kernels.
_TOP = {
    "wte.weight": ("token_embed", "embedding"),
    "wpe.weight": ("position_embed", "embedding"),
    "ln_f.weight": ("final_ln", "scale"),
    "ln_f.bias": ("final_ln", "bias"),
}
_BLOCK = {
    "ln_1.weight": ("ln1", "scale"),
    "ln_1.bias": ("ln1", "bias"),
    "ln_2.weight": ("ln2", "scale"),
    "ln_2.bias": ("ln2", "bias"),
    "mlp.c_fc.weight": ("mlp", "wi", "kernel"),
    "mlp.c_fc.bias": ("mlp", "wi", "bias"),
    "mlp.c_proj.weight": ("mlp", "wo", "kernel"),
    "mlp.c_proj.bias": ("mlp", "wo", "bias"),
    "attn.c_proj.bias": ("attn", "out", "bias"),
}
_FUSED = ("attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight")  # reshaped, see module doc
_QKV = ("query", "key", "value")


def _expected_shapes(cfg: GptConfig) -> dict[str, tuple[int, ...]]:
    """HF parameter name (no prefix, layer index dropped) -> shape, for a GPT-2 of this config."""
    d, f = cfg.hidden, cfg.mlp_dim
    shapes = {"wte.weight": (cfg.vocab_size, d), "wpe.weight": (cfg.max_length, d)}
    shapes |= {"ln_f.weight": (d,), "ln_f.bias": (d,), "ln_1.weight": (d,), "ln_1.bias": (d,)}
    shapes |= {"ln_2.weight": (d,), "ln_2.bias": (d,), "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,)}
    shapes |= {"attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,)}
    shapes |= {
        "mlp.c_fc.weight": (d, f),
        "mlp.c_fc.bias": (f,),
        "mlp.c_proj.weight": (f, d),
        "mlp.c_proj.bias": (d,),
    }
    return shapes


def _put(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> np.ndarray:
    for key in path:
        tree = tree[key]
    return np.asarray(tree, np.float32)


def params_from_hf(state_dict: Mapping[str, np.ndarray], cfg: GptConfig) -> dict:
    """HF state dict (with or without the `transformer.` prefix) -> pure dict of `Gpt`'s params."""
    sd = {
        k.removeprefix(_PREFIX): np.asarray(v, np.float32)
        for k, v in state_dict.items()
        if not _IGNORED.match(k)
    }
    lm_head = sd.pop("lm_head.weight", None)
    layer_names = (*_BLOCK, *_FUSED)
    needed = set(_TOP) | {f"h.{i}.{n}" for i in range(cfg.layers) for n in layer_names}
    missing, unexpected = sorted(needed - set(sd)), sorted(set(sd) - needed)
    if missing or unexpected:
        raise ValueError(
            f"GPT-2 checkpoint does not match the config: missing {missing}, unexpected {unexpected}"
        )
    shapes = _expected_shapes(cfg)
    for key, value in sd.items():
        want = shapes[re.sub(r"^h\.\d+\.", "", key)]
        if value.shape != want:
            raise ValueError(f"{key}: checkpoint shape {value.shape} != {want} expected from the config")
    if lm_head is not None and not np.array_equal(lm_head, sd["wte.weight"]):
        raise ValueError(
            "lm_head.weight differs from wte.weight: untied GPT-2 output layers are not supported"
        )

    stacked = lambda name: np.stack([sd[f"h.{i}.{name}"] for i in range(cfg.layers)])  # noqa: E731
    out: dict = {}
    for name, path in _TOP.items():
        _put(out, path, sd[name])
    blocks: dict = {}
    for name, path in _BLOCK.items():
        _put(blocks, path, stacked(name))
    L, d, n, h = cfg.layers, cfg.hidden, cfg.heads, cfg.head_dim
    # c_attn's output columns are [query | key | value], each ordered (head, head_dim).
    qkv_w = stacked("attn.c_attn.weight").reshape(L, d, 3, n, h)
    qkv_b = stacked("attn.c_attn.bias").reshape(L, 3, n, h)
    for j, name in enumerate(_QKV):
        blocks["attn"][name] = {"kernel": qkv_w[:, :, j], "bias": qkv_b[:, j]}
    blocks["attn"]["out"]["kernel"] = stacked("attn.c_proj.weight").reshape(L, n, h, d)
    out["stack"] = {"blocks": blocks}
    return out


def params_to_hf(params: dict, cfg: GptConfig) -> dict[str, np.ndarray]:
    """Pure dict of `Gpt`'s params -> GPT2LMHeadModel state dict (tied lm_head.weight omitted)."""
    L, d = cfg.layers, cfg.hidden
    blocks = params["stack"]["blocks"]
    out = {name: _get(params, path) for name, path in _TOP.items()}
    per_layer = {name: _get(blocks, path) for name, path in _BLOCK.items()}
    attn = blocks["attn"]
    per_layer["attn.c_attn.weight"] = np.stack([_get(attn, (q, "kernel")) for q in _QKV], 2).reshape(
        L, d, 3 * d
    )
    per_layer["attn.c_attn.bias"] = np.stack([_get(attn, (q, "bias")) for q in _QKV], 1).reshape(L, 3 * d)
    per_layer["attn.c_proj.weight"] = _get(attn, ("out", "kernel")).reshape(L, d, d)
    for name, value in per_layer.items():
        out |= {f"h.{i}.{name}": value[i] for i in range(L)}
    return {_PREFIX + k: np.ascontiguousarray(v) for k, v in out.items()}
