"""MAE ViT-H/14 pre-training (He et al. 2022, Table 8 / appendix A.1): configs/mae_vit_base.py with
the ViT-H/14 encoder, the same as `--config=configs/mae_vit_base.py:huge`. Table 8's setting is shared
by all sizes: batch 4096, base lr 1.5e-4 (× batch / 256), AdamW β=(0.9, 0.95), weight decay 0.05,
40 warmup epochs, cosine decay, 800 epochs (1600 in Table 3).

ViT-H/14: 1280-d, 32 blocks, 16 heads, 14×14 patches: 256 per image; the default 8-block 512-d decoder.
632M parameters take ~10 GB with fp32 Adam state: pure data parallel needs 22.7 GB per 16 GiB v3 core.
FSDP over 8 cores (batch still split over all 128) and saving only matmul outputs ("dots") peaks at
5.5 GiB (maskjax.aot on v3:8x8).

  maskjax describe --config=configs/mae_vit_huge.py
"""

from pathlib import Path

import ml_collections

from maskjax import defaults


def get_config() -> ml_collections.ConfigDict:
    return defaults.from_file(Path(__file__).with_name("mae_vit_base.py"), "huge")
