"""The resolved setup of a config as one JSON-able dict, to put beside a paper's hyperparameter table.

`maskjax describe --config=configs/mae_vit_large.py` prints `describe(config)`:

  family     "bert" | "roberta" | "gpt" | "mae" | "beit" | ...
  model      layers, hidden, heads, mlp_dim; text: vocab_size, max_length (the longest input the
             position table covers: 512 for RoBERTa's 514-row table); images: image_size, patch_size;
             MAE: decoder_layers, decoder_hidden; BEiT: codebook_size (the visual-token vocabulary)
  params     exact parameter count, from shapes alone (`jax.eval_shape`, nothing allocated)
  masking    strategy, ratio (share of tokens / patches masked), max_predictions (per example),
             as the method says (`Method.describe_masking`)
  data       global_batch, seq_length (tokens per text example; patches per image), BERT's phase 2
  schedule   total_steps, epochs and warmup_epochs (where the paper counts epochs), warmup_steps,
             decay, end_lr
  optimizer  name, peak_lr (resolved: base_lr × batch / 256 where base_lr is given), base_lr, b1, b2,
             eps, weight_decay, grad_clip
  mesh       {axis: size} resolved for the paper's device count (`hardware.num_devices`)
  hardware   the paper's, e.g. "TPU v3, 128 cores"

Nothing here reads a dataset, a tokenizer or a checkpoint, and no array is allocated.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from maskjax import config as config_lib
from maskjax import methods, models, optim, sharding


def _model(cfg: Any) -> dict[str, Any]:
    out = {
        name: getattr(cfg, name) for name in ("layers", "hidden", "heads", "mlp_dim") if hasattr(cfg, name)
    }
    if hasattr(cfg, "vocab_size"):
        out["vocab_size"] = cfg.vocab_size
        # BERT/RoBERTa expose the usable length (table rows minus RoBERTa's padding offset).
        out["max_length"] = getattr(cfg, "max_seq_len", cfg.max_length)
    if hasattr(cfg, "image_size"):
        out["image_size"] = cfg.image_size
        out["patch_size"] = cfg.patch_size
    if hasattr(cfg, "decoder_layers"):  # MAE's decoder
        out["decoder_layers"] = cfg.decoder_layers
        out["decoder_hidden"] = cfg.decoder_hidden
    if hasattr(cfg, "codebook_size"):
        out["codebook_size"] = cfg.codebook_size
    return out


def _num_patches(cfg: Any) -> int | None:
    if not hasattr(cfg, "image_size"):
        return None
    return (cfg.image_size // cfg.patch_size) ** 2


def _data(config: ml_collections.ConfigDict, cfg: Any) -> dict[str, Any]:
    data = config.data
    seq = (
        data.get("seq_length")
        if data.get("kind") in ("text", "labelled_text", "span_qa")
        else _num_patches(cfg)
    )
    out = {"global_batch": config.global_batch_size, "seq_length": seq}
    if config.get("phases"):  # e.g. BERT: 128 tokens for 90% of the steps, then 512
        out["phases"] = [
            {
                "until_step": round(p["until"] * config.total_steps),
                **p.get("data", {}),
                **p.get("masking", {}),
            }
            for p in config.phases
        ]
    return out


def _schedule(config: ml_collections.ConfigDict) -> dict[str, Any]:
    s = config.schedule
    out: dict[str, Any] = {"total_steps": config.total_steps}
    if "epochs" in s:
        out["epochs"] = s.epochs
    if "warmup_epochs" in s:
        out["warmup_epochs"] = s.warmup_epochs
    out.update(warmup_steps=s.warmup_steps, decay=s.decay, end_lr=s.end_lr)
    return out


def _optimizer(config: ml_collections.ConfigDict) -> dict[str, Any]:
    opt = config.optimizer.to_dict()
    return {
        "name": opt["name"],
        "peak_lr": optim.peak_learning_rate(opt, config.global_batch_size),
        "base_lr": opt.get("base_lr"),
        "b1": opt.get("b1"),
        "b2": opt.get("b2"),
        "eps": opt.get("eps"),
        "weight_decay": opt.get("weight_decay"),
        "grad_clip": opt.get("grad_clip") or None,
    }


def describe(config: ml_collections.ConfigDict, num_devices: int | None = None) -> dict[str, Any]:
    """The setup `config` resolves to, validated for `num_devices` (default: `hardware.num_devices`,
    else the devices JAX sees). Raises `maskjax.config.ConfigError` for a config that would not train."""
    hardware = config.get("hardware")
    if num_devices is None:
        if hardware is not None and hardware.get("num_devices"):
            num_devices = int(hardware.num_devices)
        else:
            import jax

            num_devices = jax.device_count()
    model_cfg = config_lib.validate(config, num_devices)
    method = methods.get(config.family)
    return {
        "family": config.family,
        "model": _model(model_cfg),
        "params": models.param_count(method.model, model_cfg),
        "masking": method.describe_masking(config, model_cfg),
        "data": _data(config, model_cfg),
        "schedule": _schedule(config),
        "optimizer": _optimizer(config),
        "mesh": sharding.mesh_shape(config.mesh.to_dict(), num_devices),
        "hardware": hardware.get("description") if hardware is not None else None,
    }
