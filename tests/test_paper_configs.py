"""The paper configs: each validates on its paper's hardware, `describe` prints it completely, its
parameter count is the transformers model's of the same configuration, and the headline numbers are
the papers' (typed here from the papers, not read from the configs)."""

from __future__ import annotations

import functools
import importlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
import transformers
from absl import flags
from ml_collections import config_flags

from maskjax import config as config_lib
from maskjax import sharding
from maskjax.data import tokenizers
from maskjax.describe import describe

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = (
    "bert_base",
    "bert_large",
    "roberta_base",
    "roberta_large",
    "gpt2_small",
    "gpt2_medium",
    "gpt2_large",
    "gpt2_xl",
    "mae_vit_base",
    "mae_vit_large",
    "mae_vit_huge",
    "beit_base",
    "beit_large",
)
IMAGENET_TRAIN = 1_281_167
KEYS = {"family", "model", "params", "masking", "data", "schedule", "optimizer", "mesh", "hardware"}


def load(name: str, *overrides: str):
    """The config as `maskjax <command> --config=configs/NAME.py --config.K=V` parses it."""
    argv = ["prog", f"--config={ROOT / 'configs' / f'{name}.py'}", *(f"--config.{o}" for o in overrides)]
    values = flags.FlagValues()
    # sys_argv: the overrides to define as flags are read from it (by default from sys.argv).
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    values(argv)
    return values.config


@functools.cache
def described(name: str) -> dict:
    return describe(load(name))


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_validates_on_its_paper_hardware(name):
    c = load(name)
    n = c.hardware.num_devices
    config_lib.validate(c, n)
    assert math.prod(sharding.mesh_shape(c.mesh.to_dict(), n).values()) == n
    if c.hardware.topology is not None:
        # A TPU v3 chip has two TensorCores, each one JAX device: "v3:AxB" is A·B chips = 2·A·B devices,
        # and the Cloud TPU accelerator type "v3-N" counts N cores.
        a, b = map(int, re.fullmatch(r"v3:(\d+)x(\d+)", c.hardware.topology).groups())
        assert 2 * a * b == n
        assert c.hardware.accelerator == f"v3-{n}"
    # The same config on one device too few is refused before anything compiles.
    with pytest.raises(config_lib.ConfigError):
        config_lib.validate(c, n - 1)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_describe_has_every_key(name):
    d = described(name)
    assert set(d) == KEYS
    assert {"layers", "hidden", "heads", "mlp_dim"} <= set(d["model"])
    if d["family"] in ("bert", "roberta", "gpt"):
        assert {"vocab_size", "max_length"} <= set(d["model"])
    else:
        assert {"image_size", "patch_size"} <= set(d["model"])
    if d["family"] == "mae":
        assert {"decoder_layers", "decoder_hidden"} <= set(d["model"])
    assert set(d["masking"]) == {"strategy", "ratio", "max_predictions"}
    assert {"global_batch", "seq_length"} <= set(d["data"])
    assert {"total_steps", "warmup_steps", "decay"} <= set(d["schedule"])
    assert {"name", "peak_lr", "base_lr", "b1", "b2", "eps", "weight_decay", "grad_clip"} == set(
        d["optimizer"]
    )
    assert isinstance(d["hardware"], str) and d["hardware"]
    json.loads(json.dumps(d))  # plain JSON values only


def _hf_model(name: str):
    c = load(name)
    model_cfg = config_lib.validate(c, c.hardware.num_devices)
    module = {"bert": "bert", "roberta": "bert", "gpt": "gpt", "mae": "mae", "beit": "beit"}[c.family]
    hf_config = importlib.import_module(f"maskjax.interop.{module}").hf_config(model_cfg)
    with torch.device("meta"):  # shapes only, nothing allocated
        return getattr(transformers, hf_config.architectures[0])(hf_config)


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_params_equal_transformers(name):
    hf = _hf_model(name)
    # parameters() yields a tied tensor once (BERT/RoBERTa/GPT-2 output = word embedding, as in maskjax).
    # ViTMAE stores its two fixed sin-cos tables as frozen parameters; maskjax computes them as constants.
    want = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    assert described(name)["params"] == want


def test_bert_numbers_are_the_papers():
    # Devlin et al. 2019, Appendix A.2.
    for name, cores in (("bert_base", 32), ("bert_large", 128)):  # 16 / 64 TPU chips, 2 cores each
        d = described(name)
        assert d["data"]["global_batch"] == 256
        assert d["schedule"]["total_steps"] == 1_000_000
        assert d["schedule"]["warmup_steps"] == 10_000 and d["schedule"]["decay"] == "linear"
        opt = d["optimizer"]
        assert (opt["peak_lr"], opt["b1"], opt["b2"], opt["weight_decay"]) == (1e-4, 0.9, 0.999, 0.01)
        # A.2: 128 tokens for 90% of the steps, then 512; the release's 20 and 80 predictions per sequence.
        assert d["data"]["phases"] == [
            {"until_step": 900_000, "seq_length": 128, "max_predictions": 20},
            {"until_step": 1_000_000, "seq_length": 512, "max_predictions": 80},
        ]
        assert d["masking"]["ratio"] == 0.15
        assert math.prod(d["mesh"].values()) == cores and f"{cores} cores" in d["hardware"]
    assert abs(described("bert_base")["params"] / 110e6 - 1) < 0.02  # Sec. 3: 110M
    assert abs(described("bert_large")["params"] / 340e6 - 1) < 0.02  # Sec. 3: 340M


def test_roberta_numbers_are_the_papers():
    # Liu et al. 2019, Table 9.
    for name, lr, warmup in (("roberta_base", 6e-4, 24_000), ("roberta_large", 4e-4, 30_000)):
        d = described(name)
        assert d["data"]["global_batch"] == 8192 and d["data"]["seq_length"] == 512
        assert d["schedule"]["total_steps"] == 500_000 and d["schedule"]["warmup_steps"] == warmup
        opt = d["optimizer"]
        assert (opt["peak_lr"], opt["b1"], opt["b2"], opt["eps"], opt["weight_decay"]) == (
            lr,
            0.9,
            0.98,
            1e-6,
            0.01,
        )
        assert opt["grad_clip"] is None
    assert described("roberta_large")["mesh"]["data"] == 1024  # Sec. 5: 1024 V100 GPUs


def test_gpt2_numbers_are_the_papers():
    # Radford et al. 2019, Sec. 2.3 (batch 512, context 1024, 50,257 tokens) and Table 2 (sizes).
    sizes = {
        "gpt2_small": (12, 768),
        "gpt2_medium": (24, 1024),
        "gpt2_large": (36, 1280),
        "gpt2_xl": (48, 1600),
    }
    for name, (layers, hidden) in sizes.items():
        d = described(name)
        assert (d["model"]["layers"], d["model"]["hidden"]) == (layers, hidden)
        assert (d["model"]["vocab_size"], d["model"]["max_length"]) == (50257, 1024)
        assert (d["data"]["global_batch"], d["data"]["seq_length"]) == (512, 1024)
    # GPT-3 Table 2.1's learning rates, used where GPT-2 gives none.
    assert [described(n)["optimizer"]["peak_lr"] for n in sizes] == [6e-4, 3e-4, 2.5e-4, 2e-4]


def test_mae_numbers_are_the_papers():
    # He et al. 2022, Table 8 and Table 2 (128 TPU-v3 cores).
    for name in ("mae_vit_base", "mae_vit_large", "mae_vit_huge"):
        d = described(name)
        opt, sched = d["optimizer"], d["schedule"]
        assert d["data"]["global_batch"] == 4096
        assert opt["base_lr"] == 1.5e-4
        assert opt["peak_lr"] == pytest.approx(1.5e-4 * 4096 / 256) == pytest.approx(2.4e-3)
        assert (opt["b1"], opt["b2"], opt["weight_decay"]) == (0.9, 0.95, 0.05)
        assert (sched["epochs"], sched["warmup_epochs"], sched["decay"]) == (800, 40, "cosine")
        assert sched["total_steps"] == math.ceil(800 * IMAGENET_TRAIN / 4096)
        assert d["masking"]["ratio"] == 0.75
        assert math.prod(d["mesh"].values()) == 128 and "128 cores" in d["hardware"]
    assert described("mae_vit_huge")["model"]["patch_size"] == 14  # ViT-H/14


def test_beit_numbers_are_the_papers():
    # Bao et al. 2022: appendix table, Sec. 2.3 (75 of 196 patches), pre-training setup (500k steps, 16 V100).
    for name, layer_scale in (("beit_base", 0.1), ("beit_large", 1e-5)):
        d = described(name)
        assert d["data"]["global_batch"] == 2048 and d["optimizer"]["peak_lr"] == 1.5e-3
        assert (d["masking"]["max_predictions"], d["data"]["seq_length"]) == (75, 196)
        assert abs(d["schedule"]["total_steps"] / 500_000 - 1) < 0.001
        assert d["schedule"]["warmup_epochs"] == 10 and d["schedule"]["end_lr"] == 1e-5
        assert (d["optimizer"]["b2"], d["optimizer"]["weight_decay"]) == (0.999, 0.05)
        assert d["mesh"]["data"] == 16
        assert load(name).model.layer_scale == layer_scale
    assert described("beit_base")["optimizer"]["grad_clip"] == 3.0


def test_epochs_and_batch_overrides_move_the_step_counts():
    """--config.schedule.epochs / global_batch_size re-derive total_steps and warmup_steps."""
    c = load("mae_vit_large", "schedule.epochs=1600", "global_batch_size=2048")
    assert c.total_steps == math.ceil(1600 * IMAGENET_TRAIN / 2048)
    assert c.schedule.warmup_steps == math.ceil(40 * IMAGENET_TRAIN / 2048)
    d = describe(c)
    assert (d["schedule"]["epochs"], d["optimizer"]["peak_lr"]) == (1600, pytest.approx(1.2e-3))
    # GPT-2's final learning rate follows its peak (10%, GPT-3 Appendix B).
    assert load("gpt2_small", "optimizer.peak_lr=1e-3").schedule.end_lr == pytest.approx(1e-4)


def test_text_masking_ids_are_those_prepare_text_trains():
    """With no tokenizer given, `prepare-text` trains one whose specials come first, in this order."""
    bert_c, roberta_c = load("bert_base"), load("roberta_base")
    assert bert_c.masking.mask_id == tokenizers.WORDPIECE_SPECIALS.index("[MASK]")
    assert bert_c.masking.pad_id == tokenizers.WORDPIECE_SPECIALS.index("[PAD]")
    assert roberta_c.masking.mask_id == tokenizers.ROBERTA_SPECIALS.index("<mask>")
    assert roberta_c.masking.pad_id == tokenizers.ROBERTA_SPECIALS.index("<pad>") == roberta_c.model.pad_id


def test_describe_a_demo_config_on_the_visible_devices():
    import jax

    d = describe(load("demo/mae"))
    assert math.prod(d["mesh"].values()) == jax.device_count() and d["hardware"] is None
