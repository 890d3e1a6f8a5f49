"""Checkpoints on disk, written and read with orbax.

Layout of a workdir:  DIR/checkpoints/<step>/{params, model, opt, data}/...
  params  the model parameters (orbax StandardSave: sharded, restorable onto any mesh)
  model   JSON: {"family": ..., "config": {...}} — enough to rebuild the model
  opt     optimizer state and step            (training runs only)
  data    JSON: the input pipeline's position (training runs only)
`import-hf` writes params + model; `export-hf` and BEiT's tokenizer read them from either kind.
The train loop saves and restores through `training_manager`, `save_state` and `restore_state`;
the state is {"params", "opt", "step"} as `maskjax.train.Trainer` builds it.

orbax writes each step into a temporary folder and renames it when complete, so
a crash mid-save never leaves a step that restores wrong.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from maskjax import models


def checkpoints_dir(workdir: str | os.PathLike) -> epath.Path:
    """workdir/checkpoints, local (made absolute) or on an object store (gs://...)."""
    path = str(workdir)
    return epath.Path(path if "://" in path else os.path.abspath(path)) / "checkpoints"


def manager(
    workdir: str | os.PathLike, *, keep: int | None = None, read_only: bool = False
) -> ocp.CheckpointManager:
    """Parameters and model spec only (imports, exports, frozen tokenizers)."""
    directory = checkpoints_dir(workdir)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(directory, options=options, item_names=("params", "model"))


def training_manager(workdir: str | os.PathLike, keep: int) -> ocp.CheckpointManager:
    """A run's manager: every item, async saves (training goes on while a step is written), keep-N."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(
        checkpoints_dir(workdir), options=options, item_names=("params", "opt", "data", "model")
    )


def model_spec(family: str, cfg: Any) -> dict:
    """What rebuilds the model: {"family": ..., "config": {...}} (the `model` item)."""
    return {"family": family, "config": models.config_to_dict(cfg)}


def save_state(mngr: ocp.CheckpointManager, step: int, state: dict, data_state: dict, spec: dict) -> None:
    """Start writing the training state as `step` (async; `mngr.wait_until_finished()` waits)."""
    mngr.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt=ocp.args.StandardSave({"opt": state["opt"], "step": state["step"]}),
            data=ocp.args.JsonSave(data_state),
            model=ocp.args.JsonSave(spec),
        ),
        force=True,
    )


def restore_state(mngr: ocp.CheckpointManager, step: int, abstract_state: dict) -> tuple[dict, dict]:
    """(state, data position) of `step`, each array in the sharding its ShapeDtypeStruct names:
    restoring onto another mesh or device count is a different `abstract_state`, nothing more."""
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state["params"]),
            opt=ocp.args.StandardRestore({"opt": abstract_state["opt"], "step": abstract_state["step"]}),
            data=ocp.args.JsonRestore(),
        ),
    )
    state = {"params": restored.params, "opt": restored.opt["opt"], "step": restored.opt["step"]}
    return state, restored.data


def save_params(
    workdir: str | os.PathLike, family: str, cfg: Any, params: dict, *, step: int = 0
) -> epath.Path:
    """Write `params` (a pure dict, as `nnx.to_pure_dict`) and the model spec as step `step`."""
    spec = model_spec(family, cfg)
    with manager(workdir) as mngr:
        mngr.save(
            step,
            args=ocp.args.Composite(params=ocp.args.StandardSave(params), model=ocp.args.JsonSave(spec)),
            force=True,
        )
        mngr.wait_until_finished()
    return checkpoints_dir(workdir) / str(step)


def load_params(
    workdir: str | os.PathLike, step: int | None = None, sharding: jax.sharding.Sharding | None = None
) -> tuple[str, Any, dict]:
    """(family, model config, params) of step `step` (default: the latest).

    The parameters land in `sharding` (default: this process's first device); with several
    processes pass a sharding over the global devices, e.g. replicated on the mesh.
    """
    with manager(workdir, read_only=True) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {checkpoints_dir(workdir)}")
        spec = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))["model"]
        family = spec["family"]
        cfg = models.make_config(family, spec["config"], drop_moved=True)
        abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: models.build(family, cfg)), nnx.Param))
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
        params = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))[
            "params"
        ]
    return family, cfg, params
