"""RoBERTa-large pre-training as in Liu et al. 2019, Table 9 and Sec. 5.

Table 9 differs from RoBERTa-base only in the model size, the peak learning rate (4e-4) and the
warmup (30K steps); batch 8K, 500K steps, Adam β2 0.98, ε 1e-6, weight decay 0.01 are shared, so this
is configs/roberta_base.py with those three changes — the same as `--config=configs/roberta_base.py:large`.

BERT-large sizes (Table 9: L=24, H=1024, A=16, FFN 4096).
Sec. 5: "We pretrain our model using 1024 V100 GPUs". 355M parameters with fp32 Adam state (~5.7 GB)
and 8 sequences of 512 per GPU fit a 32 GB V100: roberta_base's hardware and pure data-parallel mesh.

  maskjax describe --config=configs/roberta_large.py
  maskjax train --config=configs/roberta_large.py --workdir=DIR --config.data.corpus=/path/to/corpus
"""

from pathlib import Path

import ml_collections

from maskjax import defaults


def get_config() -> ml_collections.ConfigDict:
    return defaults.from_file(Path(__file__).with_name("roberta_base.py"), "large")
