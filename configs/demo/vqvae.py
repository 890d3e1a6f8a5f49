"""Stage one of the BEiT demo: a VQ-VAE visual tokenizer on scikit-learn's digits.

  maskjax train --config=configs/demo/vqvae.py --workdir=/tmp/vqvae-demo
  maskjax train --config=configs/demo/beit.py --workdir=/tmp/beit-demo \\
      --config.masking.tokenizer_workdir=/tmp/vqvae-demo
"""

import ml_collections

from maskjax import defaults


def get_config() -> ml_collections.ConfigDict:
    c = defaults.base("vqvae")
    c.total_steps = 600
    c.global_batch_size = 128
    c.log_every = 50
    c.eval_every = 200
    c.eval_batches = 2
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.data.update(dataset="digits", image_size=8, scale=(0.6, 1.0), flip=False, crop_pct=1.0)
    c.model.update(
        image_size=8,
        patch_size=2,
        channels=1,
        codebook_size=64,
        code_dim=16,
        hidden=64,
        layers=2,
        heads=2,
        mlp_dim=128,
    )
    c.optimizer.update(name="adamw", peak_lr=1e-3, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip=1.0)
    c.schedule.update(warmup_steps=50, decay="cosine", end_lr=0.0)
    return c
