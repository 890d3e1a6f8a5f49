"""Validation of a training config, before anything compiles.

A user's mistake is a `ConfigError` whose message names the field and what is
allowed; the CLI prints it as one line and exits non-zero (no traceback).

Every config has: family, seed, total_steps, global_batch_size, log_every,
eval_every, checkpoint_every, keep_checkpoints, eval_batches, grad_accum_steps,
mesh, model, optimizer, schedule, data (`maskjax.defaults.base` declares those
with a default) — plus the method's own section (`masking`), which the method's
`validate` checks (`maskjax.methods`).
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from maskjax import methods, models, sharding
from maskjax.errors import ConfigError

__all__ = ["ConfigError", "phases", "rules", "validate"]

OPTIMIZERS = ("adamw", "lamb", "lars")
DECAYS = ("linear", "cosine", "constant")
REMAT = ("none", "full", "dots")
# Run-control counts, each a positive integer.
COUNTS = (
    "total_steps",
    "global_batch_size",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "eval_batches",
    "grad_accum_steps",
    "max_nonfinite_steps",
)
REQUIRED = ("family", "seed", *COUNTS, "keep_checkpoints", "mesh", "model", "optimizer", "schedule", "data")


def _positive_int(config: Any, field: str) -> None:
    value = config[field]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{field} must be a positive integer; got {value!r}")


def validate(config: ml_collections.ConfigDict, num_devices: int) -> Any:
    """Check `config` for `num_devices` devices; return the model's config dataclass."""
    for field in REQUIRED:
        if field not in config:
            raise ConfigError(f"{field} is missing from the config")
    family = config.family
    if family not in methods.REGISTRY:
        raise ConfigError(f"family must be one of {sorted(methods.REGISTRY)}; got {family!r}")
    method = methods.get(family)
    for field in COUNTS:
        _positive_int(config, field)
    if config.keep_checkpoints is not None:  # None: keep every checkpoint
        _positive_int(config, "keep_checkpoints")
    if config.data.get("kind") != method.data:
        raise ConfigError(
            f"data.kind must be {method.data!r} for family {family!r}; got {config.data.get('kind')!r}"
        )
    fraction = config.data.get("label_fraction", 1.0)
    if not isinstance(fraction, int | float) or not 0.0 < fraction <= 1.0:
        raise ConfigError(f"data.label_fraction must be in (0, 1]; got {fraction!r}")
    accum = config.grad_accum_steps

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
    for section, keys in (
        ("optimizer", ("name", "b1", "b2", "eps", "weight_decay")),
        ("schedule", ("decay",)),
    ):
        for key in keys:
            if key not in config[section]:
                raise ConfigError(f"{section}.{key} is missing from the config")
    if opt.get("name") not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name must be one of {list(OPTIMIZERS)}; got {opt.get('name')!r}")
    if not isinstance(opt.get("bias_correction"), bool):
        got = opt.get("bias_correction")
        raise ConfigError(f"optimizer.bias_correction must be True or False; got {got!r}")
    if not opt.bias_correction and opt.name != "adamw":
        raise ConfigError("optimizer.bias_correction=False (BERT's release) needs optimizer.name=adamw")
    if not (opt.get("peak_lr") or opt.get("base_lr")):
        raise ConfigError("optimizer.peak_lr or optimizer.base_lr must be set (> 0)")
    if config.schedule.get("decay") not in DECAYS:
        raise ConfigError(
            f"schedule.decay must be one of {list(DECAYS)}; got {config.schedule.get('decay')!r}"
        )
    if not 0 <= config.schedule.warmup_steps <= config.total_steps:
        raise ConfigError(
            f"schedule.warmup_steps must be in [0, total_steps={config.total_steps}]; "
            f"got {config.schedule.warmup_steps!r}"
        )

    if config.model.get("remat", "none") not in REMAT:
        raise ConfigError(f"model.remat must be one of {list(REMAT)}; got {config.model.get('remat')!r}")
    try:
        model_cfg = models.make_config(method.model, config.model.to_dict())
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    _check_model(config, model_cfg)
    _check_phases(config, model_cfg)
    return model_cfg


def _apply_phase(config: ml_collections.ConfigDict, phase: Any) -> ml_collections.ConfigDict:
    merged = ml_collections.ConfigDict(config.to_dict())
    if "phases" in merged:
        del merged["phases"]
    for section, values in phase.items():
        if section != "until":
            merged[section].update(dict(values))
    return merged


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
        _check_model(_apply_phase(config, phase), model_cfg)


def phases(config: ml_collections.ConfigDict) -> list[tuple[int, ml_collections.ConfigDict]]:
    """[(first step, the config in force from it)]: one entry unless `config.phases` splits the run.

    A paper that changes its data mid-run (BERT: 128 tokens for 90% of the steps, then 512,
    Devlin et al. 2019, A.2) lists its phases, each `{"until": fraction of total_steps,
    <section>: {field: value}}`; the state carries over, the data and the step function change.
    """
    if not config.get("phases"):
        return [(0, config)]
    _check_phases(config, None)
    lengths = sorted({p["data"]["seq_length"] for p in config.phases if "seq_length" in p.get("data", {})})
    result, start = [], 0
    for phase in config.phases:
        phase_config = _apply_phase(config, phase)
        if lengths:  # every phase reads the one prepared folder, which holds each length
            phase_config.data.prepare_lengths = lengths
        result.append((start, phase_config))
        start = round(phase["until"] * config.total_steps)
    return result


def override(config: ml_collections.ConfigDict, values: dict[str, Any]) -> ml_collections.ConfigDict:
    """`config` with each dotted key ("schedule.epochs") set in place, as `--config.KEY=VALUE` sets it."""
    for key, value in values.items():
        *parents, leaf = key.split(".")
        target = config
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


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
    seq = config.data.get("seq_length")
    max_length = getattr(model_cfg, "max_length", None)
    if seq and max_length:
        # RoBERTa's positions start after the padding id, which costs table rows.
        usable = max_length - getattr(model_cfg, "position_offset", 0)
        if seq > usable:
            raise ConfigError(
                f"data.seq_length={seq} is longer than the position table ({usable} usable positions)"
            )
    method = methods.get(config.family)
    if method.validate is not None and model_cfg is not None:  # None: a phase checked before the model
        method.validate(config, model_cfg)
