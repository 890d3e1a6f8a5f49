"""GPT-2 XL (1542M in Table 2 of Radford et al. 2019): configs/gpt2_small.py at this size.

GPT-2 states the batch (512), context (1024) and sizes; its learning rates were tuned per size and not
published. As in gpt2_small.py the rest is GPT-3's recipe (Brown et al. 2020, Appendix B), with
Table 2.1's learning rate for the matching size. See gpt2_small.py for the sources.

  maskjax describe --config=configs/gpt2_xl.py
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
    # Table 2: 48 layers, d_model 1600 (25 heads), FFN 4·d.
    # 1.56B parameters need ~25 GB with fp32 Adam state, more than a 16 GiB v3 core: shard parameters and
    # optimizer state over 8 cores (FSDP) and rematerialise. Without remat the step needs 33.9 GB per core
    # even at fsdp=16; at fsdp=8 saving only matmul outputs ("dots") peaks at 8.7 GiB, full remat at 5.0
    # (maskjax.aot on v3:8x16).
    c.model = models.config_to_dict(gpt.gpt2_xl(dtype="bfloat16", remat="dots"))
    c.mesh = {"data": -1, "fsdp": 8, "tensor": 1}
    c.optimizer.peak_lr = (
        2e-4  # GPT-3 Table 2.1, "XL (1.3B), the nearest size"; schedule.end_lr follows (10%)
    )
    return c
