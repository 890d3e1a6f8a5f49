"""MAE end-to-end fine-tuning on ImageNet-1k, He et al. 2022 (CVPR), Table 9 (appendix A.1).

  maskjax finetune --config=configs/finetune/imagenet.py --init=MAE_WORKDIR --workdir=DIR
  maskjax finetune --config=configs/finetune/imagenet.py:large --init=... --workdir=DIR

The encoder sizes are those of configs/mae_vit_base.py (:large, :huge); an MAE checkpoint of that
size (a maskjax workdir, or transformers' ViTMAE through `maskjax import-hf`) is the --init.
Features: global average pooling + a fresh norm ("fc_norm"), as the reference fine-tuning does.
Not implemented here: RandAugment (9, 0.5) and random erasing of the reference's data pipeline.
"""

import ml_collections

from maskjax import defaults, models
from maskjax.models import vit

IMAGENET_TRAIN_IMAGES = 1_281_167
SIZES = {"base": (vit.mae_vit_base, 100), "large": (vit.mae_vit_large, 50), "huge": (vit.mae_vit_huge, 50)}
ENCODER_FIELDS = (
    "image_size",
    "patch_size",
    "channels",
    "hidden",
    "layers",
    "heads",
    "mlp_dim",
    "layer_norm_eps",
)


def get_config(size: str = "base") -> ml_collections.ConfigDict:
    factory, epochs = defaults.variant(SIZES, size)
    c = defaults.base("image_classification")
    c.global_batch_size = 1024  # Table 9: batch size 1024
    c.log_every = 100
    c.eval_every = 2500
    c.checkpoint_every = 2500
    c.data.update(
        dataset="imagenet2012",
        train_split="train",
        eval_split="validation",
        image_size=224,
        channels=3,
        scale=(0.08, 1.0),  # the reference's RandomResizedCrop (timm create_transform's default)
        flip=True,
        crop_pct=0.875,
    )
    encoder = models.config_to_dict(factory())
    c.model.update(
        {k: encoder[k] for k in ENCODER_FIELDS},
        dtype="bfloat16",
        num_classes=1000,
        pooling="mean",  # the reference's global_pool + fc_norm
        pos_embed="learned",  # timm's trainable table, started from the pre-trained sin-cos one
        drop_path=0.1,  # Table 9: drop path 0.1
    )
    c.task.update(label_smoothing=0.1, mixup=0.8, cutmix=1.0)  # Table 9
    c.optimizer.update(
        name="adamw",  # Table 9: AdamW
        base_lr=1e-3,  # Table 9: base lr 1e-3; lr = base_lr × batch / 256
        b1=0.9,  # Table 9: β1, β2 = 0.9, 0.999
        b2=0.999,
        eps=1e-8,
        weight_decay=0.05,  # Table 9
        layer_decay=0.75,  # Table 9: layer-wise lr decay 0.75 (Clark et al. 2020; Bao et al. 2021)
        layer_decay_embed=("patch_embed", "cls_token", "pos_embed"),
        no_decay=("bias", "scale", "cls_token", "pos_embed"),  # timm's no_weight_decay + 1-D params
    )
    # Table 9: 100 epochs for ViT-B, 50 for ViT-L/H; 5 warmup epochs; cosine decay.
    c.schedule.update(epochs=epochs, warmup_epochs=5, decay="cosine", end_lr=0.0)
    defaults.steps_from_epochs(c, IMAGENET_TRAIN_IMAGES)
    return c
