"""Fine-tune the demo MAE encoder (configs/demo/mae.py) on scikit-learn's digits, MAE's recipe.

MAE Table 9 (He et al. 2022, end-to-end fine-tuning): AdamW, base lr 1e-3 × batch/256, weight decay
0.05, β = (0.9, 0.999), layer-wise lr decay 0.75, warmup then cosine, label smoothing 0.1, mixup 0.8,
cutmix 1.0, drop path 0.1, global-average-pooled features. Not here: RandAugment (9, 0.5).

  maskjax finetune --config=configs/finetune/digits.py --init=/tmp/maskjax-mae --workdir=/tmp/digits-ft
  maskjax finetune --config=configs/finetune/digits.py --workdir=/tmp/digits-scratch    # the baseline
"""

import ml_collections

from maskjax import defaults

# The encoder of configs/demo/mae.py: a checkpoint of that run loads into these sizes.
DEMO_ENCODER = dict(image_size=8, patch_size=2, channels=1, hidden=128, layers=4, heads=4, mlp_dim=512)


def digits(c: ml_collections.ConfigDict) -> None:
    """scikit-learn's digits (1,500 train / 297 validation), augmented as the MAE demo is."""
    c.data.update(
        dataset="digits",
        train_split="train",  # a labelled fraction: --config.data.train_split='train[:10%]' (tfds slicing)
        eval_split="validation",
        image_size=8,
        scale=(0.6, 1.0),
        flip=False,
        crop_pct=1.0,
    )


def get_config() -> ml_collections.ConfigDict:
    c = defaults.base("image_classification")
    c.total_steps = 600  # 50 epochs of the 1,500 training digits
    c.global_batch_size = 128
    c.log_every = 100
    c.eval_every = 200
    c.eval_batches = 2
    c.checkpoint_every = 600
    c.keep_checkpoints = 1
    digits(c)
    c.model.update(DEMO_ENCODER, num_classes=10, pooling="mean", pos_embed="learned", drop_path=0.1)
    c.task.update(label_smoothing=0.1, mixup=0.8, cutmix=1.0)  # Table 9
    c.optimizer.update(
        name="adamw",
        base_lr=1e-3,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.05,
        layer_decay=0.75,
        layer_decay_embed=("patch_embed", "cls_token", "pos_embed"),
        no_decay=("bias", "scale", "cls_token", "pos_embed"),
    )
    c.schedule.update(warmup_steps=60, decay="cosine", end_lr=0.0)  # Table 9: 5 of 100 epochs; here 5 of 50
    return c
