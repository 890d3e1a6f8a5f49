"""MAE ViT-L/16 pre-training (He et al. 2022, Table 8 / appendix A.1): configs/mae_vit_base.py with
the ViT-L/16 encoder, the same as `--config=configs/mae_vit_base.py:large`. Table 8's setting is shared
by all sizes: batch 4096, base lr 1.5e-4 (× batch / 256), AdamW β=(0.9, 0.95), weight decay 0.05,
40 warmup epochs, cosine decay, 800 epochs (1600 in Table 3).

ViT-L/16: 1024-d, 24 blocks, 16 heads; the default 8-block 512-d decoder.
32 images per core: pure data parallel, the mesh of mae_vit_base. Without rematerialisation the step
peaks at 14.0 GiB of a v3 core's 15.5 usable; saving only matmul outputs ("dots") leaves room: 7.9 GiB
(maskjax.aot on v3:8x8).

  maskjax describe --config=configs/mae_vit_large.py
"""

from pathlib import Path

import ml_collections

from maskjax import defaults


def get_config() -> ml_collections.ConfigDict:
    return defaults.from_file(Path(__file__).with_name("mae_vit_base.py"), "large")
