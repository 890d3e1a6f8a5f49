"""Validation of a training config, before anything compiles.

A user's mistake is a `ConfigError` whose message names the field and what is
allowed; the CLI prints it as one line and exits non-zero (no traceback).

Every config has: family, seed, total_steps, global_batch_size, log_every,
eval_every, checkpoint_every, keep_checkpoints, mesh, model, optimizer,
schedule, data — plus the family's `masking` section.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from maskjax import models, sharding

OPTIMIZERS = ("adamw", "lamb")
DECAYS = ("linear", "cosine", "constant")
REMAT = ("none", "full", "dots")
REQUIRED = (
    "family",
    "seed",
    "total_steps",
    "global_batch_size",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "mesh",
    "model",
    "optimizer",
    "schedule",
    "data",
)


class ConfigError(ValueError):
    """A bad config value: the message names the field and the allowed values."""


def _positive_int(config: Any, field: str) -> None:
    value = config[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{field} must be a positive integer; got {value!r}")


def _in_open_unit(value: Any, field: str) -> None:
    if not isinstance(value, int | float) or not 0.0 < value < 1.0:
        raise ConfigError(f"{field} must be in (0, 1); got {value!r}")


def validate(config: ml_collections.ConfigDict, num_devices: int) -> Any:
    """Check `config` for `num_devices` devices; return the model's config dataclass."""
    for field in REQUIRED:
        if field not in config:
            raise ConfigError(f"{field} is missing from the config")
    family = config.family
    if family not in models.FAMILIES:
        raise ConfigError(f"family must be one of {sorted(models.FAMILIES)}; got {family!r}")
    for field in ("total_steps", "global_batch_size", "log_every", "eval_every", "checkpoint_every"):
        _positive_int(config, field)
    if config.get("keep_checkpoints") is not None:
        _positive_int(config, "keep_checkpoints")
    accum = config.get("grad_accum_steps", 1)
    if not isinstance(accum, int) or accum < 1:
        raise ConfigError(f"grad_accum_steps must be a positive integer; got {accum!r}")

    try:
        mesh = sharding.mesh_shape(config.mesh.to_dict(), num_devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    batch_axes = sharding.logical_to_spec(("batch",), rules(config))[0] or ()
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    data_parallel = math.prod(mesh.get(a, 1) for a in batch_axes)
    if config.global_batch_size % (data_parallel * accum):
        raise ConfigError(
            f"global_batch_size={config.global_batch_size} must be divisible by the data-parallel size "
            f"{data_parallel} (mesh axes {batch_axes}) × grad_accum_steps={accum}"
        )

    opt = config.optimizer
    if opt.get("name") not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name must be one of {list(OPTIMIZERS)}; got {opt.get('name')!r}")
    if not (opt.get("peak_lr") or opt.get("base_lr")):
        raise ConfigError("optimizer.peak_lr or optimizer.base_lr must be set (> 0)")
    if config.schedule.get("decay") not in DECAYS:
        raise ConfigError(
            f"schedule.decay must be one of {list(DECAYS)}; got {config.schedule.get('decay')!r}"
        )
    if not 0 <= config.schedule.get("warmup_steps", 0) <= config.total_steps:
        raise ConfigError(
            f"schedule.warmup_steps must be in [0, total_steps={config.total_steps}]; "
            f"got {config.schedule.get('warmup_steps')!r}"
        )

    if config.model.get("remat", "none") not in REMAT:
        raise ConfigError(f"model.remat must be one of {list(REMAT)}; got {config.model.get('remat')!r}")
    try:
        model_cfg = models.make_config(family, config.model.to_dict())
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    _check_model(config, model_cfg)
    _check_phases(config, model_cfg)
    return model_cfg


def _check_phases(config: ml_collections.ConfigDict, model_cfg: Any) -> None:
    """`phases`: `until` fractions increasing in (0, 1] and ending at 1; each phase's data must fit."""
    phases = config.get("phases")
    if not phases:
        return
    untils = [p.get("until") for p in phases]
    if (
        not all(isinstance(u, int | float) for u in untils)
        or any(not a < b for a, b in zip([0, *untils], untils, strict=False))
        or untils[-1] != 1
    ):
        raise ConfigError(f"phases[*].until must increase within (0, 1] and end at 1.0; got {untils}")
    for i, phase in enumerate(phases):
        unknown = sorted(set(phase) - {"until"} - set(config.keys()))
        if unknown:
            raise ConfigError(
                f"phases[{i}].{unknown[0]} is not a config section; allowed: {sorted(config.keys())}"
            )
        trial = ml_collections.ConfigDict(config.to_dict())
        for section, values in phase.items():
            if section != "until":
                trial[section].update(dict(values))
        _check_model(trial, model_cfg)


def rules(config: ml_collections.ConfigDict) -> dict:
    """The logical-axis rules in force: the defaults, overridden by `config.rules`."""
    merged = dict(sharding.DEFAULT_RULES)
    if "rules" in config:
        merged.update({k: tuple(v) if isinstance(v, list) else v for k, v in config.rules.to_dict().items()})
    return merged


def _check_model(config: ml_collections.ConfigDict, model_cfg: Any) -> None:
    hidden, heads = getattr(model_cfg, "hidden", None), getattr(model_cfg, "heads", None)
    if hidden and heads and hidden % heads:
        raise ConfigError(f"model.hidden={hidden} must be divisible by model.heads={heads}")
    if hasattr(model_cfg, "image_size"):
        if model_cfg.image_size % model_cfg.patch_size:
            raise ConfigError(
                f"model.image_size={model_cfg.image_size} must be divisible by "
                f"model.patch_size={model_cfg.patch_size}"
            )
    if hasattr(model_cfg, "mask_ratio"):
        _in_open_unit(model_cfg.mask_ratio, "model.mask_ratio")
    masking = config.get("masking", {})
    for field in ("mask_prob", "ratio"):
        if field in masking:
            _in_open_unit(masking[field], f"masking.{field}")
    seq = config.data.get("seq_length")
    max_length = getattr(model_cfg, "max_length", None)
    if seq and max_length:
        # RoBERTa's positions start after the padding id, which costs table rows.
        usable = max_length - getattr(model_cfg, "position_offset", 0)
        if seq > usable:
            raise ConfigError(
                f"data.seq_length={seq} is longer than the position table ({usable} usable positions)"
            )
