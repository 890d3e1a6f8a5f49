"""BEiT-base pre-training on ImageNet-1k as in Bao et al. 2022, "BEiT: BERT Pre-Training of Image
Transformers" (ICLR), Sec. 2-3 and the appendix table of pre-training hyperparameters.

  maskjax describe --config=configs/beit_base.py
  maskjax train --config=configs/beit_base.py --workdir=DIR --config.masking.tokenizer_workdir=TOK

`masking.tokenizer_workdir` is required: the workdir of a trained maskjax `vqvae` tokenizer that gives
one of 8192 codes per 16×16 patch of a 224² image (a 14×14 grid, = model.codebook_size). BEiT used the
DALL-E dVAE (Sec. 2.1.2), whose weights cannot be loaded here; train a tokenizer on the same data
first (as configs/demo/vqvae.py does at demo size). Data: tfds `imagenet2012` in array_record format,
prepared by the user (see configs/mae_vit_base.py).

Epoch-counted values live in `schedule.epochs` / `schedule.warmup_epochs`; total_steps and warmup_steps
follow them and the batch (steps = ceil(epochs × 1,281,167 / batch)).

BEiT-large is a variant of this file, `--config=configs/beit_base.py:large`, which configs/beit_large.py
names (with its memory notes).
"""

import dataclasses
from collections.abc import Callable

import ml_collections
from ml_collections import config_dict

from maskjax import defaults, models
from maskjax.models import beit

IMAGENET_TRAIN_IMAGES = 1_281_167  # ImageNet-1k (ILSVRC-2012) training set


@dataclasses.dataclass(frozen=True)
class Size:
    """What differs between BEiT's sizes: the model, its remat and the gradient clipping."""

    model: Callable[..., beit.BeitConfig]
    grad_clip: float
    remat: str = "none"


SIZES = {
    # ViT-B/16: 12 layers, 768 wide, 12 heads, FFN 3072; layer scale 0.1.
    "base": Size(beit.beit_base, grad_clip=3.0),  # appendix; the release's README: --clip_grad 3.0 for base
    # ViT-L/16: 24 layers, 1024 wide, 16 heads, FFN 4096; layer scale 1e-5 (appendix; release README).
    # ~30 GB of activations per 32 GB V100 at 128 images: full remat (configs/beit_large.py).
    # Appendix table: gradient clipping 3.0 for base and, as we read it, 1.0 for large — unverified here.
    "large": Size(beit.beit_large, grad_clip=1.0, remat="full"),
}


def get_config(size: str = "base") -> ml_collections.ConfigDict:
    s = defaults.variant(SIZES, size)
    c = defaults.base("beit")
    c.global_batch_size = 2048  # appendix table: batch size 2048 (pre-training setup: "2k batch size")
    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint_every = 5000

    # Pre-training setup (Sec. 2.5): "The 500k training steps (i.e., 800 epochs) with 2k batch size take
    # about five days using 16 Nvidia Telsa V100 32GB GPU cards." No TPU topology. 128 images per GPU;
    # 92M parameters and their activations (~12 GB in 16 bits, estimated) fit a 32 GB V100: pure data
    # parallel (the default mesh). Large: the same machines, assumed (configs/beit_large.py).
    c.hardware = dict(
        accelerator="v100-32gb",
        topology=config_dict.placeholder(str),  # GPUs: no TPU topology
        description="16 NVIDIA V100 32GB GPUs",
        num_devices=16,
    )

    c.data.update(
        dataset="imagenet2012",
        train_split="train",
        eval_split="validation",
        image_size=224,  # appendix: input resolution 224 × 224
        channels=3,  # a few ImageNet JPEGs are greyscale or CMYK: always decode to RGB
        # Appendix: RandomResizedCrop and colour jitter 0.4; the release (unilm beit/datasets.py,
        # DataAugmentationForBEiT) applies ColorJitter(0.4, 0.4, 0.4) to the whole image, then
        # RandomHorizontalFlip, then RandomResizedCropAndInterpolationWithTwoPic with its default scale
        # (0.08, 1.0) (beit/transforms.py).
        color_jitter=(0.4, 0.4, 0.4),
        scale=(0.08, 1.0),
        flip=True,
        crop_pct=0.875,
    )
    c.masking = dict(
        tokenizer_workdir="REQUIRED: --config.masking.tokenizer_workdir=<a trained maskjax vqvae workdir>",
        # The tokenizer's model: BEiT's targets come from DALL-E's dVAE (8192 codes, one per 16×16 patch,
        # Sec. 2.1.2), which cannot be loaded here; configs/beit_tokenizer.py trains this VQ-VAE in its
        # place. Its sizes are ours, not the paper's. Stating them lets `maskjax compile` build the step
        # without the checkpoint; training checks them against it.
        tokenizer=models.config_to_dict(
            beit.VqConfig(
                image_size=224,
                patch_size=16,
                channels=3,
                codebook_size=8192,
                code_dim=32,
                hidden=256,
                layers=4,
                heads=4,
                mlp_dim=1024,
                dtype="bfloat16",
            )
        ),
        num_masked=75,  # Sec. 2.3: "we randomly mask approximately 40% image patches" = 75 of 196
        min_block=16,  # Algorithm 1: blocks of at least 16 patches
        # The release's MaskingGenerator (unilm beit/masking_generator.py) gives up after 10 failed
        # proposals, so 1 image in 3 has fewer than 75 masked patches (74.5 on average, measured):
        # "unilm" samples that law; "exact" always reaches 75.
        sampler="unilm",
    )
    # The size's ViT (SIZES); stochastic depth 0.1, no dropout; shared relative position bias, no absolute
    # positions (appendix): the factory's values.
    c.model.update(models.config_to_dict(s.model(dtype="bfloat16", remat=s.remat)))
    c.optimizer.update(
        name="adamw",
        peak_lr=1.5e-3,  # appendix: peak lr 1.5e-3 at batch 2048 (the release does not rescale it)
        b1=0.9,  # appendix: Adam β (0.9, 0.999); the release's default is (0.9, 0.98) and its README
        b2=0.999,  # commands do not override it — the paper's value is kept
        eps=1e-8,  # appendix
        weight_decay=0.05,  # appendix
        grad_clip=s.grad_clip,  # appendix: 3.0 for base (SIZES)
        # The release exempts 1-D parameters, biases and cls_token (no_weight_decay); its mask token
        # (1, 1, D) and the relative-position table are decayed.
        no_decay=("bias", "scale", "gamma", "cls_token"),
    )
    # Appendix: 800 epochs, 10 warmup epochs, cosine decay to the minimal lr 1e-5.
    c.schedule.update(epochs=800, warmup_epochs=10, decay="cosine", end_lr=1e-5)
    # 500,456 steps at 800 epochs (the release drops each epoch's last partial batch: 500,000), 6,256 warmup
    defaults.steps_from_epochs(c, IMAGENET_TRAIN_IMAGES)
    return c
