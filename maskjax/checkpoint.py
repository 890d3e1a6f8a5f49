"""Checkpoints on disk, written and read with orbax, each one verified when it is read back.

Layout of a workdir:  DIR/checkpoints/<step>/{params, model, opt, data, integrity}/...
  params     the model parameters (orbax StandardSave: sharded, restorable onto any mesh)
  model      JSON: {"family": ..., "config": {...}} — enough to rebuild the model
  opt        optimizer state and step            (training runs only)
  data       JSON: the input pipeline's position (training runs only)
  integrity  JSON: a fingerprint of every array of params and opt, taken from the arrays being saved
`import-hf` writes params + model + integrity; `export-hf` and BEiT's tokenizer read them from either kind.
The train loop saves and restores through `training_manager`, `save_state` and `restore_latest`;
the state is {"params", "opt", "step"} as `maskjax.train.Trainer` builds it.

Why each failure cannot lose a run:
- orbax writes each step into a temporary folder and renames it when complete (the fingerprints are
  one more item of that same step), so a crash mid-save never leaves a step that restores wrong;
- `save_state` refuses a state with a non-finite value, so keep-N rotation only ever makes room for a
  finite checkpoint;
- every restore recomputes the fingerprints of what it read: a step whose files cannot be read or whose
  arrays differ from what was saved (a bad disk, an interrupted copy, a partial bucket sync) is named
  in one line and the previous step is tried; once an intact one is found, a training run moves the
  bad steps aside to DIR/checkpoints-damaged/ (kept for inspection, never deleted) so they are neither
  resumed nor counted by keep-N. With no intact step, nothing moves and the run stops saying why.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from maskjax import models, sharding
from maskjax.errors import CheckpointDamaged, CheckpointNotWritten, TrainingDiverged

ARRAY_ITEMS = ("params", "opt")  # the items whose arrays carry fingerprints


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
    return ocp.CheckpointManager(directory, options=options, item_names=("params", "model", "integrity"))


def training_manager(workdir: str | os.PathLike, keep: int) -> ocp.CheckpointManager:
    """A run's manager: every item, async saves (training goes on while a step is written), keep-N."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=True,
        create=True,
        cleanup_tmp_directories=True,  # a save that failed or was killed left a partial step: remove it
    )
    return ocp.CheckpointManager(
        checkpoints_dir(workdir),
        options=options,
        item_names=("params", "opt", "data", "model", "integrity"),
    )


def model_spec(family: str, cfg: Any) -> dict:
    """What rebuilds the model: {"family": ..., "config": {...}} (the `model` item)."""
    return {"family": family, "config": models.config_to_dict(cfg)}


# -- fingerprints ---------------------------------------------------------------------------------


def _fingerprint(x: jax.Array) -> jax.Array:
    """uint32[2]: two position-weighted sums of the array's bits, mod 2**32.

    With b_i the bits of element i (row-major) as uint32:  h1 = sum b_i * (2i + 1),
    h2 = sum b_i * (2 * (i * 0x9E3779B1) + 1). Each weight is odd, hence invertible mod 2**32, so any one
    changed element always changes h1; other damage goes unseen with odds of about 2**-64 (a checksum
    against accidents, not a cryptographic hash). Integer sums are exact in any order, so the value does
    not depend on the mesh the array lives on; the flat index comes from iotas, so a sharded array is
    reduced where it lies, without being gathered or reshaped.
    """
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    elif x.dtype.itemsize == 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif x.dtype.itemsize in (1, 2):
        bits = jax.lax.bitcast_convert_type(x, jnp.uint8 if x.dtype.itemsize == 1 else jnp.uint16)
        bits = bits.astype(jnp.uint32)
    else:  # 8 bytes: a trailing axis of two words
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= bits.shape[axis]
    w1 = 2 * index + 1
    w2 = 2 * (index * jnp.uint32(0x9E3779B1)) + 1
    return jnp.stack([jnp.sum(bits * w1, dtype=jnp.uint32), jnp.sum(bits * w2, dtype=jnp.uint32)])


@jax.jit
def _check_arrays(tree: Any) -> tuple[jax.Array, Any]:
    """(every float finite, the fingerprint of every leaf): one compiled pass over the tree."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)
    return finite, jax.tree.map(_fingerprint, tree)


def fingerprints(tree: Any) -> tuple[bool, dict[str, list[int]]]:
    """(all finite, {"a/b/c": [h1, h2]} for every array leaf of `tree`), computed on the devices."""
    finite, sums = jax.device_get(_check_arrays(tree))
    flat = jax.tree_util.tree_flatten_with_path(sums)[0]
    return bool(finite), {"/".join(sharding.path_names(p)): [int(v) for v in h] for p, h in flat}


def _mismatch(saved: dict, tree: Any) -> str | None:
    """What differs between the saved fingerprints and those of `tree` (None: it is what was saved)."""
    finite, now = fingerprints(tree)
    bad = [k for k in now if saved.get(k) != now[k]] + [k for k in saved if k not in now]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        return f"{bad[0]}{more} differ from what was saved"
    if not finite:
        return "holds non-finite values"
    return None


# -- saving ---------------------------------------------------------------------------------------


def save_state(mngr: ocp.CheckpointManager, step: int, state: dict, data_state: dict, spec: dict) -> None:
    """Start writing the training state as `step` (async; `mngr.wait_until_finished()` waits).

    Raises TrainingDiverged, writing nothing, when a parameter or optimizer value is not finite: a
    checkpoint is only ever replaced by a better one."""
    opt = {"opt": state["opt"], "step": state["step"]}
    finite, sums = fingerprints({"params": state["params"], "opt": opt})
    if not finite:
        raise TrainingDiverged(f"step {step}: the parameters or optimizer state are not finite; not saved")
    items = {"params": state["params"], "opt": opt}
    args = ocp.args.Composite(
        **{name: ocp.args.StandardSave(tree) for name, tree in items.items()},
        data=ocp.args.JsonSave(data_state),
        model=ocp.args.JsonSave(spec),
        integrity=ocp.args.JsonSave({name: _split(sums, name) for name in items}),
    )
    try:  # orbax reports a failed background save at the next save or wait
        mngr.save(step, args=args, force=True)
    except Exception as e:  # noqa: BLE001 - whatever the storage says, the run cannot go on unsaved
        raise _not_written(mngr, e) from None


def finish(mngr: ocp.CheckpointManager) -> None:
    """Wait for the save in progress; one that failed raises CheckpointNotWritten."""
    try:
        mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
        raise _not_written(mngr, e) from None


def _not_written(mngr: ocp.CheckpointManager, e: BaseException) -> CheckpointNotWritten:
    """The error for a save that failed (a full disk, an unwritable bucket), naming the good one left."""
    root = epath.Path(mngr.directory)
    partial = sorted({p.name.split(".")[0] for p in root.iterdir() if ".orbax-checkpoint-tmp" in p.name})
    steps = [int(p.name) for p in root.iterdir() if p.name.isdigit()]
    what = f"step {', '.join(partial)}" if partial else "a checkpoint"
    kept = f"step {max(steps)} in {root}, intact" if steps else "none yet"
    return CheckpointNotWritten(
        f"{what} could not be written ({_reason(e)}); the last complete checkpoint: {kept}"
        + (" (the partial step is removed when the run starts again)" if partial else "")
    )


def _split(sums: dict, item: str) -> dict:
    """The fingerprints of one item, keyed by the path inside it."""
    prefix = item + "/"
    return {k[len(prefix) :]: v for k, v in sums.items() if k.startswith(prefix)}


def save_params(
    workdir: str | os.PathLike, family: str, cfg: Any, params: dict, *, step: int = 0
) -> epath.Path:
    """Write `params` (a pure dict, as `nnx.to_pure_dict`) and the model spec as step `step`."""
    spec = model_spec(family, cfg)
    finite, sums = fingerprints(params)
    if not finite:
        raise ValueError(f"{family} parameters hold non-finite values; not saved")
    with manager(workdir) as mngr:
        mngr.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                model=ocp.args.JsonSave(spec),
                integrity=ocp.args.JsonSave({"params": sums}),
            ),
            force=True,
        )
        mngr.wait_until_finished()
    return checkpoints_dir(workdir) / str(step)


# -- restoring, verified --------------------------------------------------------------------------


class _Bad(Exception):
    """One step failed: `str()` says which item and why."""


def _say(line: str) -> None:
    if jax.process_index() == 0:
        print(line, flush=True)


def _reason(e: BaseException) -> str:
    """The innermost cause's first line (tensorstore nests the useful part), shortened."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= 300 else f"{text[:140]} ... {text[-150:]}"  # the end says why: keep it


def _everywhere(ok: bool) -> bool:
    """True when `ok` holds on every process: all processes take the same branch."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array(ok, np.int32))))


def _restore_item(mngr: ocp.CheckpointManager, step: int, name: str, args: Any) -> Any:
    try:
        value, problem = mngr.restore(step, args=ocp.args.Composite(**{name: args}))[name], None
    except Exception as e:  # noqa: BLE001 - any failure to read means: this step is not usable
        value, problem = None, f"{name} cannot be read: {_reason(e)}"
    if not _everywhere(problem is None):
        raise _Bad(problem or f"{name} cannot be read on another process")
    return value


def _restore_verified(mngr: ocp.CheckpointManager, step: int, items: dict[str, Any]) -> dict:
    """{item: restored value} for `items` ({name: orbax restore args}) of `step`, each array item
    checked against the fingerprints saved with it. Raises _Bad naming the item."""
    directory = epath.Path(mngr.directory) / str(step)
    saved = None
    if (directory / "integrity").exists():
        saved = _restore_item(mngr, step, "integrity", ocp.args.JsonRestore())
    elif any(name in ARRAY_ITEMS for name in items):
        _say(f"checkpoint step {step} has no fingerprints (written before they existed): not verified")
    out = {}
    for name, args in items.items():
        out[name] = _restore_item(mngr, step, name, args)
        if saved is not None and name in ARRAY_ITEMS:
            if name not in saved:
                raise _Bad(f"{name} has no saved fingerprints")
            problem = _mismatch(saved[name], out[name])
            if problem:
                raise _Bad(f"{name}: {problem}")
    return out


def _first_good(
    mngr: ocp.CheckpointManager, steps: list[int], items: Callable[[int], dict[str, Any]]
) -> tuple[int, dict, list[int]]:
    """(step, its items, the newer steps that failed) for the newest of `steps` that restores intact;
    one line for each that does not. None intact: CheckpointDamaged naming every step and its fault."""
    failures = []
    for i, step in enumerate(steps):
        try:
            return step, _restore_verified(mngr, step, items(step)), steps[:i]
        except _Bad as e:
            failures.append(f"step {step}: {e}")
            after = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint"
            _say(f"checkpoint step {step} is damaged ({e}); {after}")
    where = epath.Path(mngr.directory)
    faults = "; ".join(failures)
    raise CheckpointDamaged(f"no checkpoint under {where} reads back intact (nothing moved): {faults}")


def restore_latest(mngr: ocp.CheckpointManager, abstract_state: dict) -> tuple[int, dict, dict] | None:
    """(step, state, data position) of the newest intact checkpoint, or None when there is none yet.

    Each array lands in the sharding its ShapeDtypeStruct names: restoring onto another mesh or
    device count is a different `abstract_state`, nothing more. Newer damaged steps are moved to
    checkpoints-damaged/ (so this run neither resumes from them nor counts them in keep-N); when no
    step is intact, CheckpointDamaged is raised and nothing is moved.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        return None
    items = {
        "params": ocp.args.StandardRestore(abstract_state["params"]),
        "opt": ocp.args.StandardRestore({"opt": abstract_state["opt"], "step": abstract_state["step"]}),
        "data": ocp.args.JsonRestore(),
    }
    step, restored, damaged = _first_good(mngr, steps, lambda _: items)
    if damaged:
        _set_aside(mngr, damaged)
        mngr.reload()  # the steps moved aside are no longer this run's
    state = {"params": restored["params"], "opt": restored["opt"]["opt"], "step": restored["opt"]["step"]}
    return step, state, restored["data"]


def _set_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> None:
    """Move damaged steps out of the manager's sight, keeping their files for inspection."""
    root = epath.Path(mngr.directory)
    aside = root.parent / "checkpoints-damaged"
    if jax.process_index() == 0:
        aside.mkdir(parents=True, exist_ok=True)
        for step in steps:
            (root / str(step)).rename(aside / f"{step}-{int(time.time())}")
        _say(f"moved damaged step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))} to {aside}")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("maskjax: damaged checkpoints set aside")


def load_params(
    workdir: str | os.PathLike, step: int | None = None, sharding: jax.sharding.Sharding | None = None
) -> tuple[str, Any, dict]:
    """(family, model config, params) of step `step` (default: the newest intact one), verified.

    The parameters land in `sharding` (default: this process's first device); with several
    processes pass a sharding over the global devices, e.g. replicated on the mesh. A damaged step
    is named in one line and, without an explicit `step`, the previous one is used; nothing is moved.
    """
    with manager(workdir, read_only=True) as mngr:
        steps = sorted(mngr.all_steps(), reverse=True) if step is None else [step]
        if not steps or (step is not None and step not in mngr.all_steps()):
            what = "no checkpoint" if step is None else f"no checkpoint step {step}"
            raise FileNotFoundError(f"{what} under {checkpoints_dir(workdir)}")
        target = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

        def items(s: int) -> dict[str, Any]:
            spec = _restore_item(mngr, s, "model", ocp.args.JsonRestore())
            family = spec["family"]
            cfg = models.make_config(family, spec["config"], drop_moved=True)
            model = nnx.eval_shape(lambda: models.build(family, cfg))
            abstract = nnx.to_pure_dict(nnx.state(model, nnx.Param))
            shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target), abstract)
            found[s] = (family, cfg)
            return {"params": ocp.args.StandardRestore(shapes)}

        found: dict[int, tuple[str, Any]] = {}
        good, restored, _ = _first_good(mngr, steps, items)
    family, cfg = found[good]
    return family, cfg, restored["params"]
