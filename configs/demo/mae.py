"""MAE demo: a small ViT masked autoencoder on scikit-learn's digits (real, offline, pip-only).

Same recipe as configs/mae_vit_*.py — 75% random masking, encoder on visible
patches, AdamW with warmup + cosine decay, lr = base_lr × batch / 256 — at a
size that trains in a few minutes on 2 CPU cores.

  maskjax train --config=configs/demo/mae.py --workdir=/tmp/mae-demo
"""

import ml_collections

from maskjax import defaults


def get_config() -> ml_collections.ConfigDict:
    c = defaults.base("mae")
    c.total_steps = 1500
    c.global_batch_size = 128
    c.log_every = 100
    c.eval_every = 500
    c.eval_batches = 2
    c.checkpoint_every = 500
    c.keep_checkpoints = 2

    c.data.update(
        dataset="digits",  # 1,797 8×8 handwritten digits bundled with scikit-learn
        train_split="train",
        eval_split="validation",
        image_size=8,
        scale=(0.6, 1.0),  # MAE uses (0.2, 1.0) at 224²; an 8×8 digit keeps little below 0.6
        flip=False,  # digits are not mirror-symmetric
        crop_pct=1.0,
    )
    # Representation quality while the loss falls: k-NN and ridge top-1 on the frozen [CLS] feature.
    c.evals.knn.every = 500
    c.evals.ridge.every = 500
    c.masking = dict(ratio=0.75, norm_pix_loss=False)  # MAE Sec. 3: 75% of the patches hidden
    c.model.update(
        image_size=8,
        patch_size=2,
        channels=1,
        hidden=128,
        layers=4,
        heads=4,
        mlp_dim=512,
        decoder_hidden=64,
        decoder_layers=2,
        decoder_heads=4,
        decoder_mlp_dim=256,
        dropout=0.0,
        attention_dropout=0.0,
        layer_norm_eps=1e-6,
    )
    c.optimizer.update(
        name="adamw",
        base_lr=1.5e-4 * 8,  # MAE's 1.5e-4 (Table 8) is tuned for 800+ epochs; the demo runs ~130
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.05,
        grad_clip=None,
        no_decay=("bias", "scale", "cls_token", "mask_token"),
    )
    c.schedule.update(warmup_steps=100, decay="cosine", end_lr=0.0)
    return c
