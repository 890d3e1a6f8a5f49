"""Checkpoints on disk, written and read with orbax.

Layout of a workdir:  DIR/checkpoints/<step>/{params, model}/...
  params  the model parameters (orbax StandardSave: sharded, restorable onto any mesh)
  model   JSON: {"family": ..., "config": {...}} — enough to rebuild the model

orbax writes each step into a temporary folder and renames it when complete, so
a crash mid-save never leaves a step that restores wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from maskjax import models


def manager(
    workdir: str | Path, *, keep: int | None = None, read_only: bool = False
) -> ocp.CheckpointManager:
    directory = Path(workdir).absolute() / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(directory, options=options, item_names=("params", "model"))


def save_params(workdir: str | Path, family: str, cfg: Any, params: dict, *, step: int = 0) -> Path:
    """Write `params` (a pure dict, as `nnx.to_pure_dict`) and the model spec as step `step`."""
    spec = {"family": family, "config": models.config_to_dict(cfg)}
    with manager(workdir) as mngr:
        mngr.save(
            step,
            args=ocp.args.Composite(params=ocp.args.StandardSave(params), model=ocp.args.JsonSave(spec)),
            force=True,
        )
        mngr.wait_until_finished()
    return Path(workdir).absolute() / "checkpoints" / str(step)


def load_params(workdir: str | Path, step: int | None = None) -> tuple[str, Any, dict]:
    """(family, model config, params) of step `step` (default: the latest), on the default device."""
    with manager(workdir, read_only=True) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {Path(workdir) / 'checkpoints'}")
        spec = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))["model"]
        family = spec["family"]
        cfg = models.make_config(family, spec["config"])
        abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: models.build(family, cfg)), nnx.Param))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
        params = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))[
            "params"
        ]
    return family, cfg, params
