"""Fine-tune the BEiT demo's encoder (configs/demo/beit.py) on the demo's own data, digits.

BEiT's ImageNet fine-tuning recipe (Bao et al. 2022, appendix, base size): AdamW β = (0.9, 0.999),
peak lr 4e-3 at batch 1024 (here base_lr 1e-3 × batch/256), weight decay 0.05, layer-wise lr decay
0.65, drop path 0.1, label smoothing 0.1, mixup 0.8, cutmix 1.0, warmup then cosine; the patch tokens
averaged and layer-normalised into a linear classifier (Sec. 3.1). Not here: RandAugment, and the
per-layer copies of the relative position bias (this encoder keeps the one shared table).

  maskjax finetune --config=configs/finetune/beit_demo.py --init=/tmp/beit-demo --workdir=/tmp/beit-ft
  maskjax finetune --config=configs/finetune/beit_demo.py --workdir=/tmp/beit-scratch   # the baseline
"""

from pathlib import Path

import ml_collections

from maskjax import defaults

ENCODER = (
    "image_size", "patch_size", "channels", "codebook_size", "hidden", "layers", "heads", "mlp_dim",
    "layer_scale", "layer_norm_eps",
)  # fmt: skip


def get_config() -> ml_collections.ConfigDict:
    beit = defaults.from_file(Path(__file__).parents[1] / "demo" / "beit.py")
    c = defaults.base("beit_classification")
    c.total_steps = 600
    c.global_batch_size = 128
    c.log_every = 100
    c.eval_every = 200
    c.eval_batches = 2
    c.checkpoint_every = 600
    c.keep_checkpoints = 1
    c.data.update({k: v for k, v in beit.data.to_dict().items() if k != "label_fraction"})
    c.model.update({k: beit.model[k] for k in ENCODER}, num_classes=10, drop_path=0.1)
    c.task.update(label_smoothing=0.1, mixup=0.8, cutmix=1.0)
    c.optimizer.update(
        name="adamw",
        base_lr=1e-3,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.05,
        layer_decay=0.65,
        layer_decay_embed=("patch_embed", "cls_token", "mask_token", "rel_pos_table"),
        no_decay=("bias", "scale", "gamma", "cls_token", "mask_token", "rel_pos"),
    )
    c.schedule.update(warmup_steps=60, decay="cosine", end_lr=1e-6)
    return c
