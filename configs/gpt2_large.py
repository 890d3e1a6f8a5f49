"""GPT-2 Large (762M in Table 2 of Radford et al. 2019): configs/gpt2_small.py at this size.

GPT-2 states the batch (512), context (1024) and sizes; its learning rates were tuned per size and not
published. As in gpt2_small.py the rest is GPT-3's recipe (Brown et al. 2020, Appendix B), with
Table 2.1's learning rate for the matching size. See gpt2_small.py for the sources.

  maskjax describe --config=configs/gpt2_large.py
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
    # Table 2: 36 layers, d_model 1280 (20 heads), FFN 4·d.
    # 774M parameters need ~12.4 GB with fp32 Adam state, and the step needs 21.5 GB per 16 GiB v3 core even
    # with FSDP over 8 cores and no rematerialisation. FSDP over 8 cores and saving only matmul outputs
    # ("dots") peaks at 5.5 GiB (maskjax.aot on v3:8x16).
    c.model = models.config_to_dict(gpt.gpt2_large(dtype="bfloat16", remat="dots"))
    c.mesh = {"data": -1, "fsdp": 8, "tensor": 1}
    c.optimizer.peak_lr = 2.5e-4  # GPT-3 Table 2.1, "Large (760M)"; schedule.end_lr follows (10%)
    return c
