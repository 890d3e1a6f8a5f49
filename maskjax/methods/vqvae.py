"""The visual tokenizer BEiT predicts: a VQ-VAE (van den Oord et al. 2017), stage one of BEiT.

loss = MSE(reconstruction, image) + ‖sg[z_e] − e‖² + β‖z_e − sg[e]‖²    (models.beit.vq_loss)

FLOPs per step = B · 3 · (encoder + nearest-code search + decoder), each from its matmuls
(`vq_forward_flops` for the encoder and the search; the decoder mirrors the encoder).
"""

from __future__ import annotations

from typing import Any

import jax

from maskjax.methods import Method, image_batch_spec, image_example_batch, no_masking, stack_flops
from maskjax.models import beit


def loss(
    model: beit.VqTokenizer, batch: dict, key: jax.Array, config: Any, *, train: bool, extras: Any = None
) -> tuple[jax.Array, dict]:
    value, metrics = beit.vq_loss(model, batch["image"])
    return value, {"loss": value, **metrics}


batch_spec = image_batch_spec  # the global batch's shapes, for ahead-of-time compiles


def flops(config: Any, model_cfg: beit.VqConfig) -> int:
    """Model FLOPs of one train step; formula in the module docstring."""
    c = model_cfg
    n, pixels = c.num_patches, c.patch_size**2 * c.channels
    decoder = (
        2 * n * c.code_dim * c.hidden
        + stack_flops(c.hidden, c.mlp_dim, c.layers, n)
        + 2 * n * c.hidden * pixels
    )
    return config.global_batch_size * 3 * (vq_forward_flops(c) + decoder)


def vq_forward_flops(c: beit.VqConfig) -> int:
    """The tokenizer's forward per image up to its codes: patch embedding, encoder, projection to the
    code space, and the nearest-entry search (2·N·K·code_dim)."""
    n, pixels, h = c.num_patches, c.patch_size**2 * c.channels, c.hidden
    encoder = 2 * n * pixels * h + stack_flops(h, c.mlp_dim, c.layers, n) + 2 * n * h * c.code_dim
    return encoder + 2 * n * c.codebook_size * c.code_dim


VQVAE = Method(
    name="vqvae",
    model="vqvae",
    data="image",
    loss=loss,
    batch_spec=batch_spec,
    flops=flops,
    describe_masking=no_masking,
    example_batch=image_example_batch,
)
