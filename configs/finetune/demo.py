"""Fine-tune the MAE demo's encoder (configs/demo/mae.py) with MAE's recipe, on the demo's own data.

MAE Table 9 (He et al. 2022, end-to-end fine-tuning): AdamW, base lr 1e-3 × batch/256, weight decay
0.05, β = (0.9, 0.999), layer-wise lr decay 0.75, warmup then cosine, label smoothing 0.1, mixup 0.8,
cutmix 1.0, drop path 0.1, global-average-pooled features. Not here: RandAugment (9, 0.5).

  maskjax finetune --config=configs/finetune/demo.py --init=/tmp/maskjax-mae --workdir=/tmp/digits-ft
  maskjax finetune --config=configs/finetune/demo.py --workdir=/tmp/digits-scratch    # the baseline
  maskjax finetune --config=configs/finetune/demo.py:fashion_mnist --init=/tmp/mae-fashion --workdir=...

The variant names the data of configs/demo/mae.py (digits, fashion_mnist); the encoder sizes and the
augmentation are that run's, so its checkpoint loads. `--config.data.label_fraction=0.1` trains on
10% of every class's labels.
"""

from pathlib import Path

import ml_collections

from maskjax import defaults

STEPS = {"digits": 600, "fashion_mnist": 1200}  # digits: 50 epochs of 1,500; Fashion-MNIST: ~5 of 60,000
ENCODER = ("image_size", "patch_size", "channels", "hidden", "layers", "heads", "mlp_dim", "layer_norm_eps")


def pretraining(data: str) -> ml_collections.ConfigDict:
    """The MAE demo run whose encoder the transfer configs take (configs/demo/mae.py:DATA)."""
    return defaults.from_file(Path(__file__).parents[1] / "demo" / "mae.py", data)


def get_config(data: str = "digits") -> ml_collections.ConfigDict:
    mae, steps = pretraining(data), defaults.variant(STEPS, data)
    c = defaults.base("image_classification")
    c.total_steps = steps
    c.global_batch_size = 128
    c.log_every = 100
    c.eval_every = 200
    c.eval_batches = 2
    c.checkpoint_every = steps
    c.keep_checkpoints = 1
    c.data.update({k: v for k, v in mae.data.to_dict().items() if k != "label_fraction"})
    c.model.update(
        {k: mae.model[k] for k in ENCODER}, num_classes=10, pooling="mean", pos_embed="learned", drop_path=0.1
    )
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
    c.schedule.update(warmup_steps=steps // 10, decay="cosine", end_lr=0.0)  # Table 9: 5 of 100 epochs
    return c
