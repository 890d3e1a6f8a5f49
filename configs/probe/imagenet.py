"""MAE linear probing on ImageNet-1k, He et al. 2022 (CVPR), Table 10 (appendix A.1).

  maskjax probe --config=configs/probe/imagenet.py --init=MAE_WORKDIR --workdir=DIR   (:large, :huge)

The frozen encoder's [CLS] feature (after the pre-trained final norm) passes BatchNorm without
affine parameters, then a linear head, as the reference main_linprobe.py.
"""

from pathlib import Path

import ml_collections

from maskjax import defaults

IMAGENET_TRAIN_IMAGES = 1_281_167


def get_config(size: str = "base") -> ml_collections.ConfigDict:
    finetune = defaults.from_file(Path(__file__).parents[1] / "finetune" / "imagenet.py", size)
    c = defaults.base("linear_probe")
    c.global_batch_size = 16384  # Table 10: batch size 16384
    c.log_every = 10
    c.eval_every = 500
    c.checkpoint_every = 500
    c.data.update(finetune.data.to_dict())  # Table 10: RandomResizedCrop, as fine-tuning's
    fields = (
        "image_size",
        "patch_size",
        "channels",
        "hidden",
        "layers",
        "heads",
        "mlp_dim",
        "layer_norm_eps",
    )
    c.model.update(
        {k: finetune.model[k] for k in fields},
        dtype="bfloat16",
        num_classes=1000,
        pooling="cls",  # main_linprobe.py: global_pool off
        head_norm="batchnorm",  # BatchNorm1d(affine=False, eps=1e-6) before the head
        head_init_std=0.01,  # main_linprobe.py: trunc_normal_(head.weight, std=0.01)
    )
    c.optimizer.update(
        name="lars",  # Table 10: LARS
        base_lr=0.1,  # Table 10: base lr 0.1; lr = base_lr × batch / 256 = 6.4
        b1=0.9,  # Table 10: momentum 0.9
        b2=0.999,  # unused by LARS
        eps=1e-8,
        weight_decay=0.0,  # Table 10: weight decay 0
    )
    # Table 10: 90 epochs, 10 warmup epochs, cosine decay.
    c.schedule.update(epochs=90, warmup_epochs=10, decay="cosine", end_lr=0.0)
    defaults.steps_from_epochs(c, IMAGENET_TRAIN_IMAGES)
    return c
