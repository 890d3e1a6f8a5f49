"""GPT-2 Medium (345M in Table 2 of Radford et al. 2019): configs/gpt2_small.py at this size.

GPT-2 states the batch (512), context (1024) and sizes; its learning rates were tuned per size and not
published. As in gpt2_small.py the rest is GPT-3's recipe (Brown et al. 2020, Appendix B), with
Table 2.1's learning rate for the matching size. See gpt2_small.py for the sources.

  maskjax describe --config=configs/gpt2_medium.py
"""

import importlib.util
from pathlib import Path

import ml_collections

from maskjax import models
from maskjax.models import gpt


def _sibling(name: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(
        f"maskjax_config_{name}", Path(__file__).with_name(f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config() -> ml_collections.ConfigDict:
    c = _sibling("gpt2_small")
    # Table 2: 24 layers, d_model 1024 (16 heads), FFN 4·d.
    # Pure data parallel as gpt2_small, 2 sequences per core. Without rematerialisation the step peaks at
    # 15.9 GiB, beyond a v3 core's 15.5 usable; saving only matmul outputs ("dots") brings it to 8.1 GiB
    # (maskjax.aot on v3:8x16).
    c.model = models.config_to_dict(gpt.gpt2_medium(dtype="bfloat16", remat="dots"))
    c.optimizer.peak_lr = 3e-4  # GPT-3 Table 2.1, "Medium (350M)"; schedule.end_lr follows (10%)
    return c
