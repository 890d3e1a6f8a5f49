"""BERT-large pre-training as in Devlin et al. 2019 (NAACL), Sec. 3 and Appendix A.2.

Appendix A.2 gives one recipe for both sizes, so this is configs/bert_base.py with BERT-large's model
and hardware — the same as `--config=configs/bert_base.py:large`: batch 256, 1M steps, Adam lr 1e-4,
warmup 10k then linear decay, weight decay 0.01, 128-token sequences for 90% of the steps then 512.

Sec. 3: L=24, H=1024, A=16 (FFN 4H = 4096), 340M parameters.
A.2: "BERT-large was performed on 16 Cloud TPUs (64 TPU chips total)": on TPU v3 (the paper does not
name the generation) 64 chips = 128 cores. Pure data parallel, 2 sequences per core: even phase 2
(512 tokens, 80 predictions) peaks at 9.2 GiB of a v3 core's 15.5 usable (maskjax.aot on v3:8x8).

  maskjax describe --config=configs/bert_large.py
  maskjax train --config=configs/bert_large.py --workdir=DIR --config.data.corpus=/path/to/corpus
"""

from pathlib import Path

import ml_collections

from maskjax import defaults


def get_config() -> ml_collections.ConfigDict:
    return defaults.from_file(Path(__file__).with_name("bert_base.py"), "large")
