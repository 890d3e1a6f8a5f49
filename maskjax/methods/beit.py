"""BEiT (Bao et al. 2022): masked image modeling over discrete visual tokens.

targets  the visual tokenizer's codes of the *uncorrupted* image, one per patch
         (BEiT used DALL-E's dVAE; here a VQ-VAE trained by `configs/demo/vqvae.py`
         and named by `masking.tokenizer_workdir`; `masking.tokenizer`, its model fields,
         gives the step's shapes without the checkpoint, for ahead-of-time compiles)
masking  random blocks (area >= 16 before rounding), aspect in [0.3, 1/0.3], up to `num_masked` patches
         (75 of 196 at 224/16, Sec. 2.3). masking.sampler "unilm": the released generator
         (masking.beit_unilm_mask), which stops short of 75 in a third of the images; "exact":
         masking.beit_block_mask, always 75 (their laws are compared in beit_unilm_blocks)
model    models.beit.Beit: [MASK] embedding at masked patches; logits only there
loss     cross-entropy of the visual-token ids at the masked patches

FLOPs per step = B · (3 · (2·N·P·D + stack_flops(D, F, L, 1+N) + 2·M·D·V) + tokenizer forward),
with P pixels per patch, M = num_masked and V the codebook: logits at the masked patches only, and
the frozen tokenizer runs forward only (no gradient).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maskjax import checkpoint, losses, masking, models
from maskjax.errors import ConfigError
from maskjax.methods import Method, image_batch_spec, image_example_batch, stack_flops
from maskjax.methods.vqvae import vq_forward_flops
from maskjax.models import beit


@functools.cache
def _tokenizer(workdir: str) -> tuple[Any, Any, dict]:
    # Replicated over every device of every process, so each process of a multi-host job holds it.
    everywhere = NamedSharding(Mesh(np.array(jax.devices()), ("all",)), PartitionSpec())
    family, cfg, params = checkpoint.load_params(workdir, sharding=everywhere)
    if family != "vqvae":
        raise ValueError(f"masking.tokenizer_workdir={workdir} holds a {family!r} checkpoint, not 'vqvae'")
    graphdef = nnx.split(nnx.eval_shape(lambda: models.build(family, cfg)))[0]
    return graphdef, cfg, params


def tokenizer_config(config: Any) -> beit.VqConfig:
    """The tokenizer's VqConfig: `masking.tokenizer` (its model fields) if given, else its checkpoint's.

    With `masking.tokenizer` the step's shapes need no checkpoint (ahead-of-time compiles, `extras_spec`);
    training still loads the weights from `masking.tokenizer_workdir` and checks that they agree.
    """
    m = config.masking
    if m.get("tokenizer") is not None:
        fields = m.tokenizer.to_dict() if hasattr(m.tokenizer, "to_dict") else dict(m.tokenizer)
        return models.make_config("vqvae", fields)
    try:
        return _tokenizer(m.tokenizer_workdir)[1]
    except FileNotFoundError as e:
        raise ConfigError(
            f"masking.tokenizer (the tokenizer's model fields) is not set and {e}: "
            "set masking.tokenizer_workdir to a trained vqvae workdir, or masking.tokenizer for shapes alone"
        ) from None


@functools.cache
def _graphdef(cfg: beit.VqConfig) -> Any:
    return nnx.split(nnx.eval_shape(lambda: models.build("vqvae", cfg)))[0]


def extras(config: Any) -> dict:
    """The frozen tokenizer's parameters, passed into the jitted step (never trained)."""
    _, cfg, params = _tokenizer(config.masking.tokenizer_workdir)
    if tokenizer_config(config) != cfg:
        raise ConfigError(
            f"masking.tokenizer={config.masking.tokenizer.to_dict()} differs from the config of the "
            f"tokenizer in masking.tokenizer_workdir={config.masking.tokenizer_workdir}: {cfg}"
        )
    return {"tokenizer": params}


def extras_spec(config: Any) -> dict:
    """Shapes and dtypes of `extras(config)` (ShapeDtypeStructs), read from `tokenizer_config`."""
    cfg = tokenizer_config(config)  # outside the trace: it may read the tokenizer's checkpoint
    abstract = nnx.eval_shape(lambda: models.build("vqvae", cfg))
    return {"tokenizer": nnx.to_pure_dict(nnx.state(abstract, nnx.Param))}


SAMPLERS = ("unilm", "exact")  # the released MaskingGenerator; always exactly num_masked


def masked_positions(mask: jax.Array, count: int) -> jax.Array:
    """(B, N) bool with at most `count` True per row -> (B, count): the True indices ascending, then
    (a short row) the first False ones, which the caller weighs 0."""
    return jnp.argsort(~mask, axis=-1, stable=True)[:, :count].astype(jnp.int32)


def loss(
    model: beit.Beit, batch: dict, key: jax.Array, config: Any, *, train: bool, extras: Any = None
) -> tuple[jax.Array, dict]:
    cfg, m = model.cfg, config.masking
    images = batch["image"]
    graphdef = _graphdef(tokenizer_config(config))
    codes = jax.lax.stop_gradient(nnx.merge(graphdef, extras["tokenizer"]).encode(images))  # (B, N)
    k_mask, k_drop = jax.random.split(key)
    sample = masking.beit_unilm_mask if m.sampler == "unilm" else masking.beit_block_mask
    mask = sample(k_mask, images.shape[0], grid=cfg.grid, num_masked=m.num_masked, min_block=m.min_block)
    positions = masked_positions(mask, m.num_masked)  # a short mask's spare slots point at kept patches
    out = model(images, mask, masked_positions=positions, dropout_key=k_drop if train else None)
    targets = jnp.take_along_axis(codes, positions, axis=1)
    weights = jnp.take_along_axis(mask, positions, axis=1).astype(jnp.float32)  # 0 on spare slots
    value = losses.masked_cross_entropy(out["logits"], targets, weights)
    accuracy = losses.masked_accuracy(out["logits"], targets, weights)
    # The unilm sampler's masks vary in size: a microbatch weighs by its masked patches.
    return value, {"loss": value, "accuracy": accuracy, "loss_terms": {"tokens": (value, weights.sum())}}


batch_spec = image_batch_spec  # the global batch's shapes, for ahead-of-time compiles


def flops(config: Any, model_cfg: beit.BeitConfig) -> int:
    """Model FLOPs of one train step; formula in the module docstring."""
    c = model_cfg
    n, pixels = c.num_patches, c.patch_size**2 * c.channels
    forward = (
        2 * n * pixels * c.hidden
        + stack_flops(c.hidden, c.mlp_dim, c.layers, 1 + n)
        + 2 * config.masking.num_masked * c.hidden * c.codebook_size
    )
    return config.global_batch_size * (3 * forward + vq_forward_flops(tokenizer_config(config)))


def describe_masking(config: Any, model_cfg: beit.BeitConfig) -> dict[str, Any]:
    # Blockwise masking of up to num_masked patches (Bao et al. 2022, Sec. 2.3, Algorithm 1).
    m = config.masking
    return {
        "strategy": f"blockwise ({m.sampler})",
        "ratio": m.num_masked / model_cfg.num_patches,
        "max_predictions": m.num_masked,
    }


def validate(config: Any, model_cfg: beit.BeitConfig) -> None:
    m = config.get("masking") or {}
    n = model_cfg.num_patches
    count = m.get("num_masked")
    if not isinstance(count, int) or not 0 < count < n:
        raise ConfigError(f"masking.num_masked must be an integer in (0, {n} patches); got {count!r}")
    if m.get("sampler") not in SAMPLERS:
        raise ConfigError(f"masking.sampler must be one of {list(SAMPLERS)}; got {m.get('sampler')!r}")
    if not isinstance(m.get("min_block"), int) or not 1 <= m.min_block <= count:
        raise ConfigError(
            f"masking.min_block must be an integer in [1, num_masked={count}]; got {m.get('min_block')!r}"
        )
    if m.get("tokenizer") is None and not m.get("tokenizer_workdir"):
        raise ConfigError(
            "masking.tokenizer_workdir (a trained vqvae workdir) or masking.tokenizer must be set"
        )


def features(model: Any, images: jax.Array) -> jax.Array:
    """(B, D): nothing masked, the patch tokens of the last block averaged (BEiT's probes pool patches)."""
    b, n = images.shape[0], model.cfg.num_patches
    out = model(images, jnp.zeros((b, n), bool), masked_positions=jnp.zeros((b, 1), jnp.int32))
    return out["hidden"][:, 1:].mean(axis=1)


BEIT = Method(
    name="beit",
    model="beit",
    data="image",
    loss=loss,
    batch_spec=batch_spec,
    flops=flops,
    describe_masking=describe_masking,
    validate=validate,
    extras=extras,
    extras_spec=extras_spec,
    features=features,
    example_batch=image_example_batch,
)
