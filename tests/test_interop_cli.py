"""`maskjax import-hf` / `export-hf` as a user runs them, against transformers' own loading."""

from __future__ import annotations

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_configs import tiny

from maskjax import checkpoint, masking, models, train

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _cli(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "maskjax", *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_import_then_export_bert_round_trips_through_transformers(tmp_path):
    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    original = transformers.BertForPreTraining(hf_cfg).eval()
    original.save_pretrained(tmp_path / "hf")

    _cli("import-hf", f"--hf-dir={tmp_path / 'hf'}", f"--out={tmp_path / 'mj'}")
    family, cfg, params = checkpoint.load_params(tmp_path / "mj")
    assert family == "bert" and cfg.hidden == 32 and cfg.layers == 2

    ids = torch.randint(0, 99, (2, 9))
    with torch.no_grad():
        want = original(ids)
    model = nnx.merge(nnx.split(models.build(family, cfg))[0], params)
    got = model(jnp.asarray(ids.numpy()))
    np.testing.assert_allclose(got["mlm_logits"], want.prediction_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(got["nsp_logits"], want.seq_relationship_logits.numpy(), atol=1e-4)

    _cli("export-hf", f"--workdir={tmp_path / 'mj'}", f"--out={tmp_path / 'hf2'}")
    reloaded = transformers.AutoModelForPreTraining.from_pretrained(tmp_path / "hf2").eval()
    assert type(reloaded).__name__ == "BertForPreTraining"
    with torch.no_grad():
        again = reloaded(ids)
    np.testing.assert_allclose(again.prediction_logits.numpy(), want.prediction_logits.numpy(), atol=1e-5)


def test_a_trained_mae_exports_to_transformers(tmp_path):
    config = tiny("mae", tmp_path / "data", total_steps=2, eval_every=2, checkpoint_every=2)
    config.masking.update(ratio=0.5, norm_pix_loss=True)  # not transformers' defaults (0.75, False)
    train.train(config, tmp_path / "run")
    _cli("export-hf", f"--workdir={tmp_path / 'run'}", f"--out={tmp_path / 'hf'}")
    hf = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf").eval()
    # The run's training settings travel with the weights: HF's loss is then the one trained.
    assert (hf.config.mask_ratio, hf.config.norm_pix_loss) == (0.5, True)

    family, cfg, params = checkpoint.load_params(tmp_path / "run")
    model = nnx.merge(nnx.split(models.build(family, cfg))[0], params)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, cfg.image_size, cfg.image_size, cfg.channels)).astype(np.float32)
    noise = rng.random((2, cfg.num_patches)).astype(np.float32)
    m = masking.mae_mask_from_noise(jnp.asarray(noise), config.masking.ratio)
    got = model(jnp.asarray(images), m.ids_keep, m.ids_restore)["pred"]
    with torch.no_grad():
        want = hf(torch.from_numpy(images.transpose(0, 3, 1, 2)), noise=torch.from_numpy(noise)).logits
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-4)


def test_import_of_a_missing_directory_is_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "maskjax",
            "import-hf",
            f"--hf-dir={tmp_path / 'nope'}",
            f"--out={tmp_path / 'o'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "nope" in result.stderr


def test_an_mae_checkpoint_from_before_the_masking_move_still_loads_and_exports(tmp_path):
    """Checkpoints written when mask_ratio and norm_pix_loss were model fields keep working."""
    import orbax.checkpoint as ocp

    cfg = models.make_config(
        "mae",
        dict(image_size=8, patch_size=2, channels=1, hidden=16, layers=1, heads=2, mlp_dim=32)
        | dict(decoder_hidden=8, decoder_layers=1, decoder_heads=2, decoder_mlp_dim=16),
    )
    params = nnx.to_pure_dict(nnx.state(models.build("mae", cfg), nnx.Param))
    old_spec = {
        "family": "mae",
        "config": models.config_to_dict(cfg) | {"mask_ratio": 0.6, "norm_pix_loss": True},
    }
    with checkpoint.manager(tmp_path / "old") as mngr:
        mngr.save(
            7,
            args=ocp.args.Composite(params=ocp.args.StandardSave(params), model=ocp.args.JsonSave(old_spec)),
        )
        mngr.wait_until_finished()
    family, loaded_cfg, loaded = checkpoint.load_params(tmp_path / "old")
    assert (family, loaded_cfg) == ("mae", cfg)
    np.testing.assert_array_equal(
        np.asarray(loaded["decoder_pred"]["kernel"]), params["decoder_pred"]["kernel"]
    )
    with pytest.raises(ValueError, match="model.mask_ratio has moved: set masking.ratio"):
        models.make_config("mae", old_spec["config"])
    _cli("export-hf", f"--workdir={tmp_path / 'old'}", f"--out={tmp_path / 'hf'}")
    assert transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "hf").config.hidden_size == 16
