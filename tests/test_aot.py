"""Ahead-of-time compiles of the whole train step: the real TPU compiler for v3 slices (libtpu, run on
this CPU host) and the paper configs on emulated CPU meshes of their paper device counts.

`aot.compile_config` compiles in a subprocess of its own, so libtpu and device counts other than
this process's 8 never touch the pytest process; the FLOP checks compile here, on one CPU device.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import jax
import ml_collections
import pytest
from tiny_configs import ROOT, tiny

from maskjax import aot, defaults, methods, models
from maskjax.config import ConfigError

GIB = 2**30
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
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed: pip install 'jax[tpu]==<jax version>' (maskjax[tpu])",
)


def paper(name: str) -> ml_collections.ConfigDict:
    path = ROOT / "configs" / f"{name}.py"
    if not path.exists():
        pytest.skip(f"configs/{name}.py does not exist yet")
    return defaults.from_file(path)


def narrow(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The paper's mesh, device count, batch, sequence length, vocabulary, image size; 1 layer, 32 wide."""
    small = dict(hidden=32, heads=2, mlp_dim=64, layers=1)
    config.model.update(small)
    if config.family == "mae":
        config.model.update(decoder_hidden=32, decoder_heads=2, decoder_mlp_dim=64, decoder_layers=1)
    if config.family == "beit":
        m = config.model
        given = config.masking.get("tokenizer")
        tokenizer = (
            given.to_dict()
            if given is not None
            else dict(
                image_size=m.image_size,
                patch_size=m.patch_size,
                channels=m.channels,
                codebook_size=m.codebook_size,
            )
        )
        config.masking.tokenizer = dict(tokenizer, **small, code_dim=8)
    return config


# ---------------------------------------------------------------------------- model FLOPs


def _matmul_sized(family: str) -> ml_collections.ConfigDict:
    """A config whose step is dominated by its matmuls, layers unrolled so XLA counts every one."""
    c = tiny(family, Path("/nonexistent"), global_batch_size=4)
    c.model.update(hidden=128, heads=4, mlp_dim=512, layers=2, scan_layers=False, remat="none", dropout=0.0)
    if "attention_dropout" in c.model:
        c.model.attention_dropout = 0.0
    if family in ("bert", "roberta", "gpt"):
        c.data.seq_length = 64
        c.model.vocab_size = 512
        c.model.max_length = 64 + c.model.get("position_offset", 0)
    if family == "mae":
        c.model.update(image_size=32, patch_size=4, channels=3, decoder_hidden=64, decoder_heads=2)
        c.model.update(decoder_mlp_dim=256, decoder_layers=2)
    if family == "beit":
        c.model.update(image_size=32, patch_size=4, channels=3, codebook_size=256, drop_path=0.0)
        c.masking.update(num_masked=24, min_block=4)
        c.masking.tokenizer = dict(
            image_size=32,
            patch_size=4,
            channels=3,
            codebook_size=256,
            code_dim=32,
            hidden=128,
            layers=2,
            heads=4,
            mlp_dim=512,
            scan_layers=False,
        )
    if family == "vqvae":
        c.model.update(image_size=32, patch_size=4, channels=3, codebook_size=256, code_dim=32)
    return c


@pytest.mark.parametrize("family", ["mae", "bert", "roberta", "gpt", "beit", "vqvae"])
def test_model_flops_match_xla_on_unrolled_layers(family):
    """With nothing scanned XLA counts every op: the model's matmul count must be most of it.

    The rest is elementwise work (LayerNorm, GELU, softmax, the AdamW update), a few percent here.
    Counting BERT's vocabulary logits at all T positions, or the MAE encoder on all patches, would
    be off by far more.
    """
    config = _matmul_sized(family)
    result = aot.compile_step(config, jax.devices()[:1], platform="cpu:1", hbm_bytes=None)
    ratio = result["xla_flops_per_device"] / result["model_flops_per_step"]
    assert 1.0 <= ratio <= 1.2, (ratio, result["xla_flops_per_device"], result["model_flops_per_step"])


# ---------------------------------------------------------------------------- emulated CPU meshes


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_config_compiles_on_its_device_count(name):
    config = narrow(paper(name))
    result = aot.compile_config(config)
    n = config.hardware.num_devices
    assert result["topology"] == f"cpu:{n}" and result["num_devices"] == n
    assert math.prod(result["mesh"].values()) == n
    assert result["fits"] is True and result["hbm_bytes_per_device"] is None
    assert result["global_batch_size"] == paper(name).global_batch_size
    b = result["bytes"]
    assert b["peak"] == b["argument"] + b["output"] - b["alias"] + b["temp"] + b["generated_code"]
    # The state is donated: the new state reuses the old one's buffers.
    assert b["alias"] >= 0.9 * b["output"]


def test_budget_and_config_errors_on_emulated_devices():
    config = tiny("mae", Path("/nonexistent"))
    config.hardware = dict(num_devices=4)
    result = aot.compile_config(config, hbm_gib=1e-4)  # 107 KB: less than this step needs
    assert result["topology"] == "cpu:4" and result["mesh"]["data"] == 4
    assert result["fits"] is False and result["bytes"]["peak"] > result["hbm_bytes_per_device"] == int(
        1e-4 * GIB
    )
    config.mesh = {"data": 3, "fsdp": 1, "tensor": 1}
    with pytest.raises(ConfigError, match="mesh"):
        aot.compile_config(config)


# ---------------------------------------------------------------------------- TPU v3 topologies


@needs_libtpu
@pytest.mark.parametrize("name", ["bert_large", "mae_vit_large"])
def test_paper_config_fits_its_v3_slice(name):
    """BERT-large (256 × 128, then 512 tokens) and MAE ViT-L (4096 images) for the real v3:8x8 slice."""
    config = paper(name)
    result = aot.compile_config(config, topology=config.hardware.topology)
    assert config.hardware.topology == "v3:8x8"
    assert result["device_kind"] == "TPU v3" and result["num_devices"] == 128
    assert math.prod(result["mesh"].values()) == 128
    # What the compiler lets a program use of a v3 core's 16 GiB (its share of the chip's 32 GiB).
    assert 15 * GIB < result["hbm_bytes_per_device"] < 16 * GIB and "compiler" in result["hbm_source"]
    assert result["compiled"] is True and result["fits"] is True, result
    b = result["bytes"]
    assert b["argument"] < b["peak"] == result["hbm_bytes_per_device"] - result["headroom_bytes"]
    # fp32 parameters and both Adam moments; each core holds all of them, or at least its 1/(fsdp·tensor).
    cfg = models.make_config(config.family, config.model.to_dict())
    state = 3 * 4 * models.param_count(config.family, cfg)
    split = result["mesh"].get("fsdp", 1) * result["mesh"].get("tensor", 1)
    assert b["argument"] >= state // split and b["alias"] >= state // split  # donated: updated in place
    if split == 1:
        batch = sum(
            x.size * x.dtype.itemsize for x in methods.get(config.family).batch_spec(config, cfg).values()
        )
        assert b["argument"] <= 1.01 * state + batch // 128 + 2**20
    assert 0 < result["compile_seconds"] < 600
    # Scanned layers: XLA counts the body once, so it sees a fraction of the model's FLOPs.
    assert result["scan_layers"] and 0 < result["xla_flops_per_device"] < result["model_flops_per_device"] / 2
    assert result["model_flops_per_device"] == result["model_flops_per_step"] // 128
    if name == "bert_large":  # two steps: 128 tokens for 90% of the run, then 512; the second needs more
        assert [p["from_step"] for p in result["phases"]] == [0, 900_000] and result["from_step"] == 900_000
        short, long = result["phases"]
        assert short["fits"] and short["bytes"]["peak"] < long["bytes"]["peak"]
        assert long["model_flops_per_step"] > 4 * short["model_flops_per_step"]  # 4× tokens, T² attention


@needs_libtpu
def test_too_big_a_step_does_not_fit_a_v3_8():
    """BERT-large at 4096 × 128 tokens (512 sequences per core) on 8 v3 cores: refused by the compiler."""
    config = paper("bert_large")
    config.global_batch_size = 4096
    result = aot.compile_config(config, topology="v3:2x2")
    assert result["num_devices"] == 8 and result["compiled"] is False and result["fits"] is False
    assert result["bytes"] is None and "RESOURCE_EXHAUSTED" in result["error"]
    assert result["required_bytes"] > result["available_bytes"] == result["hbm_bytes_per_device"], result
    with pytest.raises(ValueError, match="v3-32"):  # slices are named by their chip grid: v3:4x4
        aot.compile_config(config, topology="v3-32")


def test_batch_specs_are_what_the_loaders_produce(tmp_path):
    """The abstract batch's shapes and dtypes are a real batch's: every text field; for images the
    pixels (a dataset's pass-through numeric fields, e.g. label or index, are not inputs of the loss)."""
    from maskjax.data import loaders, text_datasets

    text_datasets.demo_corpus(tmp_path, "python-docs")
    for family in ("mae", "bert"):
        config = tiny(family, tmp_path)
        spec = methods.get(family).batch_spec(config, models.make_config(family, config.model.to_dict()))
        real = next(loaders.make(config, "train"))
        if family == "mae":
            real = {"image": real["image"]}
        assert {k: (s.shape, s.dtype) for k, s in spec.items()} == {
            k: (v.shape, v.dtype) for k, v in real.items()
        }
