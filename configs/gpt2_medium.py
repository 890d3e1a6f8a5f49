"""GPT-2 Medium (345M in Table 2 of Radford et al. 2019): configs/gpt2_small.py at this size, the same
as `--config=configs/gpt2_small.py:medium`.

GPT-2 states the batch (512), context (1024) and sizes; its learning rates were tuned per size and not
published. As in gpt2_small.py the rest is GPT-3's recipe (Brown et al. 2020, Appendix B), with
Table 2.1's learning rate for the matching size: 3e-4, "Medium (350M)" (schedule.end_lr follows, 10%).
See gpt2_small.py for the sources.

Table 2: 24 layers, d_model 1024 (16 heads), FFN 4·d.
Pure data parallel as gpt2_small, 2 sequences per core. Without rematerialisation the step peaks at
15.9 GiB, beyond a v3 core's 15.5 usable; saving only matmul outputs ("dots") brings it to 8.1 GiB
(maskjax.aot on v3:8x16).

  maskjax describe --config=configs/gpt2_medium.py
"""

from pathlib import Path

import ml_collections

from maskjax import defaults


def get_config() -> ml_collections.ConfigDict:
    return defaults.from_file(Path(__file__).with_name("gpt2_small.py"), "medium")
