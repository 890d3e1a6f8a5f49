"""BEiT-large pre-training on ImageNet-1k (Bao et al. 2022, appendix table of pre-training
hyperparameters): configs/beit_base.py with ViT-L/16 and layer scale 1e-5, the same as
`--config=configs/beit_base.py:large`.

  maskjax describe --config=configs/beit_large.py
  maskjax train --config=configs/beit_large.py --workdir=DIR --config.masking.tokenizer_workdir=TOK

The paper gives wall-clock hardware for base only (16 V100 32GB); the same machines are assumed.
At 128 images per GPU, 24 layers × 197 tokens × 1024 wide need ~30 GB of activations in 16 bits
(estimated), more than a 32 GB V100 leaves beside ~5 GB of weights and Adam state: rematerialise
each block (full remat) rather than change the paper's batch.
ViT-L/16: 24 layers, 1024 wide, 16 heads, FFN 4096; layer scale 1e-5 (appendix; release README).
Appendix table: gradient clipping 3.0 for base and, as we read it, 1.0 for large — unverified here.
"""

from pathlib import Path

import ml_collections

from maskjax import defaults


def get_config() -> ml_collections.ConfigDict:
    return defaults.from_file(Path(__file__).with_name("beit_base.py"), "large")
