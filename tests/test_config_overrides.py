"""Every config file takes every documented switch on the command line, a misspelt key is one line
naming the right one, and each size file is its base file's variant (configs/gpt2_small.py:medium).

The configs are found by glob, so a new file is covered without being listed here.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest
from absl import flags

from maskjax import config as config_lib
from maskjax import defaults

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("configs/**/*.py"))
# The README's switches, as a user types them.
SWITCHES = ("grad_accum_steps=2", "model.remat=full", "model.scan_layers=False", "model.dtype=bfloat16")


def load(spec: str, *overrides: str) -> ml_collections.ConfigDict:
    """`--config=SPEC --config.K=V ...` parsed by the flag the CLI defines (config_flags, locked)."""
    argv = ["maskjax", f"--config={ROOT / spec}", *(f"--config.{o}" for o in overrides)]
    values = flags.FlagValues()
    defaults.define_config_flag("config", "", flag_values=values, sys_argv=argv)
    values(argv)
    return values.config


def _module(spec: str):
    module_spec = importlib.util.spec_from_file_location("config_under_test", ROOT / spec)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _num_devices(config: ml_collections.ConfigDict) -> int:
    hardware = config.get("hardware")
    return hardware.num_devices if hardware is not None and hardware.get("num_devices") else 8


def test_every_config_is_found():
    assert len(CONFIGS) >= 20 and "configs/demo/bert.py" in CONFIGS and "configs/gpt2_xl.py" in CONFIGS


@pytest.mark.parametrize("spec", CONFIGS)
def test_documented_switches_take_effect_and_validate(spec):
    config = load(spec, *SWITCHES)
    assert config.grad_accum_steps == 2
    assert (config.model.remat, config.model.scan_layers, config.model.dtype) == ("full", False, "bfloat16")
    n = _num_devices(config)
    # Each data-parallel device's rows must split into the 2 micro-batches.
    assert config.global_batch_size % (2 * n) == 0, "pick another grad_accum_steps for this config"
    model_cfg = config_lib.validate(config, n)
    assert (model_cfg.remat, model_cfg.scan_layers, model_cfg.dtype) == ("full", False, "bfloat16")


@pytest.mark.parametrize("spec", CONFIGS)
def test_every_config_starts_from_the_defaults(spec):
    """Each default of `defaults.base` is a key of the config, so `--config.KEY` always exists."""
    config = load(spec)
    missing = set(defaults.dotted_keys(defaults.base(config.family))) - set(defaults.dotted_keys(config))
    assert not missing


def test_a_none_default_can_be_set_from_the_command_line():
    """grad_clip and data_dir default to None; they are typed placeholders, so config_flags parses them."""
    config = load("configs/roberta_base.py", "optimizer.grad_clip=0.5", "data.data_dir=/data")
    assert (config.optimizer.grad_clip, config.data.data_dir) == (0.5, "/data")


@pytest.mark.parametrize("spec", CONFIGS)
def test_a_misspelt_key_names_the_right_one(spec):
    with pytest.raises(defaults.ConfigKeyError) as e:
        load(spec, "grad_acum_steps=2")
    message = str(e.value)
    assert "\n" not in message and "grad_accum_steps" in message and "--config.grad_acum_steps" in message
    with pytest.raises(defaults.ConfigKeyError, match=r"nearest: model\.remat\b"):
        load(spec, "model.remta=full")
    with pytest.raises(defaults.ConfigKeyError, match=r"nearest: model\.remat\b"):
        load(spec, "modle.remat=full")  # an unknown section too


@pytest.mark.parametrize("spec", CONFIGS)
def test_cli_misspelt_key_is_one_line_without_traceback(spec):
    result = subprocess.run(
        [sys.executable, "-m", "maskjax", "describe", f"--config={spec}", "--config.grad_acum_steps=2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "grad_accum_steps" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not result.stdout


def _variants() -> list[tuple[str, str, str]]:
    """(base file, variant, the size file of that variant) for every base file with SIZES."""
    out = []
    for spec in CONFIGS:
        sizes = getattr(_module(spec), "SIZES", None)
        if sizes:
            stem = Path(spec).stem
            own = next((size for size in sizes if stem.endswith("_" + size)), None)
            if own is None:  # a recipe over every size (configs/finetune/imagenet.py): no size files
                continue
            prefix = stem[: -len(own)]
            out += [(spec, size, str(Path(spec).with_name(f"{prefix}{size}.py"))) for size in sizes]
    return out


VARIANTS = _variants()


def test_every_sized_family_has_variants():
    names = {size_file for _, _, size_file in VARIANTS}
    expected = {"gpt2_medium", "gpt2_xl", "mae_vit_huge", "bert_large", "roberta_large", "beit_large"}
    assert {f"configs/{n}.py" for n in expected} <= names


@pytest.mark.parametrize(("base", "size", "size_file"), VARIANTS, ids=[f"{b}:{s}" for b, s, _ in VARIANTS])
def test_variant_equals_its_size_file(base, size, size_file):
    assert size_file in CONFIGS, f"{base}:{size} has no file {size_file}"
    assert load(f"{base}:{size}").to_dict() == load(size_file).to_dict()


@pytest.mark.parametrize("spec", ["configs/finetune/imagenet.py", "configs/probe/imagenet.py"])
def test_the_transfer_recipes_take_the_mae_encoder_of_every_size(spec):
    """MAE Tables 9 and 10 over ViT-B/16, L/16, H/14: the encoder sizes of configs/mae_vit_base.py."""
    for size, (hidden, layers, patch) in {
        "base": (768, 12, 16),
        "large": (1024, 24, 16),
        "huge": (1280, 32, 14),
    }.items():
        c, mae = load(f"{spec}:{size}"), load(f"configs/mae_vit_base.py:{size}")
        assert (c.model.hidden, c.model.layers, c.model.patch_size) == (hidden, layers, patch)
        for key in ("hidden", "layers", "heads", "mlp_dim", "patch_size", "image_size"):
            assert c.model[key] == mae.model[key], (size, key)
        config_lib.validate(c, 8)  # the whole recipe checks out, with 1,000 classes


def test_sizes_differ():
    gpt = {size: load(f"configs/gpt2_small.py:{size}") for size in ("small", "medium", "xl")}
    assert [c.model.layers for c in gpt.values()] == [12, 24, 48]
    assert [c.mesh.fsdp for c in gpt.values()] == [1, 1, 8]


def test_an_unknown_variant_is_one_line_naming_the_variants():
    with pytest.raises(defaults.UnknownVariantError) as e:
        load("configs/gpt2_small.py:mediun")
    assert "\n" not in str(e.value) and "'mediun'" in str(e.value) and "medium" in str(e.value)


def test_no_config_copies_a_loader():
    """One shared loader (defaults.from_file): no config file carries its own importlib code."""
    for spec in CONFIGS:
        assert "importlib" not in (ROOT / spec).read_text(), spec
