"""BEiT demo: masked image modeling of VQ-VAE codes on scikit-learn's digits.

Needs the tokenizer of configs/demo/vqvae.py first (BEiT's two stages):

  maskjax train --config=configs/demo/vqvae.py --workdir=/tmp/vqvae-demo
  maskjax train --config=configs/demo/beit.py --workdir=/tmp/beit-demo \\
      --config.masking.tokenizer_workdir=/tmp/vqvae-demo
"""

import ml_collections

from maskjax import defaults


def get_config() -> ml_collections.ConfigDict:
    c = defaults.base("beit")
    c.total_steps = 600
    c.global_batch_size = 128
    c.log_every = 50
    c.eval_every = 200
    c.eval_batches = 2
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.data.update(dataset="digits", image_size=8, scale=(0.6, 1.0), flip=False, crop_pct=1.0)
    # 40% of a 4×4 patch grid in blocks of >= 2 patches (BEiT: 75 of 196 in blocks of >= 16).
    c.masking = dict(tokenizer_workdir="/tmp/vqvae-demo", num_masked=6, min_block=2, sampler="unilm")
    c.model.update(
        image_size=8,
        patch_size=2,
        channels=1,
        codebook_size=64,  # = the tokenizer's codebook
        hidden=128,
        layers=4,
        heads=4,
        mlp_dim=512,
        layer_scale=0.1,
        drop_path=0.1,
        dropout=0.0,
        attention_dropout=0.0,
        layer_norm_eps=1e-6,
    )
    c.optimizer.update(
        name="adamw",
        peak_lr=1.5e-3,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.05,
        grad_clip=3.0,  # BEiT appendix: gradient clipping 3.0
        no_decay=("bias", "scale", "gamma", "cls_token", "mask_token", "rel_pos"),
    )
    c.schedule.update(warmup_steps=50, decay="cosine", end_lr=1e-5)
    return c
