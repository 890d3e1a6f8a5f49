"""GPT-2 XL (1542M in Table 2 of Radford et al. 2019): configs/gpt2_small.py at this size, the same as
`--config=configs/gpt2_small.py:xl`.

GPT-2 states the batch (512), context (1024) and sizes; its learning rates were tuned per size and not
published. As in gpt2_small.py the rest is GPT-3's recipe (Brown et al. 2020, Appendix B), with
Table 2.1's learning rate for the matching size: 2e-4, "XL (1.3B)", the nearest size (schedule.end_lr
follows, 10%). See gpt2_small.py for the sources.

Table 2: 48 layers, d_model 1600 (25 heads), FFN 4·d.
1.56B parameters need ~25 GB with fp32 Adam state, more than a 16 GiB v3 core: shard parameters and
optimizer state over 8 cores (FSDP) and rematerialise. Without remat the step needs 33.9 GB per core
even at fsdp=16; at fsdp=8 saving only matmul outputs ("dots") peaks at 8.7 GiB, full remat at 5.0
(maskjax.aot on v3:8x16).

  maskjax describe --config=configs/gpt2_xl.py
"""

from pathlib import Path

import ml_collections

from maskjax import defaults


def get_config() -> ml_collections.ConfigDict:
    return defaults.from_file(Path(__file__).with_name("gpt2_small.py"), "xl")
