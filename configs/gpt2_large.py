"""GPT-2 Large (762M in Table 2 of Radford et al. 2019): configs/gpt2_small.py at this size, the same
as `--config=configs/gpt2_small.py:large`.

GPT-2 states the batch (512), context (1024) and sizes; its learning rates were tuned per size and not
published. As in gpt2_small.py the rest is GPT-3's recipe (Brown et al. 2020, Appendix B), with
Table 2.1's learning rate for the matching size: 2.5e-4, "Large (760M)" (schedule.end_lr follows, 10%).
See gpt2_small.py for the sources.

Table 2: 36 layers, d_model 1280 (20 heads), FFN 4·d.
774M parameters need ~12.4 GB with fp32 Adam state, and the step needs 21.5 GB per 16 GiB v3 core even
with FSDP over 8 cores and no rematerialisation. FSDP over 8 cores and saving only matmul outputs
("dots") peaks at 5.5 GiB (maskjax.aot on v3:8x16).

  maskjax describe --config=configs/gpt2_large.py
"""

from pathlib import Path

import ml_collections

from maskjax import defaults


def get_config() -> ml_collections.ConfigDict:
    return defaults.from_file(Path(__file__).with_name("gpt2_small.py"), "large")
