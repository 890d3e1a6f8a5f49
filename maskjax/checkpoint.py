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

import contextlib
import itertools
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from maskjax import distributed, models, sharding
from maskjax.errors import CheckpointDamaged, CheckpointNotWritten, ConfigError, TrainingDiverged

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


@contextlib.contextmanager
def training_manager(workdir: str | os.PathLike, keep: int) -> Iterator[ocp.CheckpointManager]:
    """A run's manager: every item, async saves (training goes on while a step is written), keep-N.

    Closing waits for the save in progress: one that failed raises CheckpointNotWritten, unless an
    error is already on its way out (then orbax's second report of the same failure is dropped)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=True,
        create=True,
        cleanup_tmp_directories=True,  # a save that failed or was killed left a partial step: remove it
    )
    mngr = ocp.CheckpointManager(
        checkpoints_dir(workdir),
        options=options,
        item_names=("params", "opt", "data", "model", "integrity"),
    )
    try:
        yield mngr
    except BaseException:
        with contextlib.suppress(Exception):
            mngr.close()
        raise
    try:
        mngr.close()
    except Exception as e:  # noqa: BLE001
        raise _not_written(mngr, e) from None


def model_spec(family: str, cfg: Any) -> dict:
    """What rebuilds the model: {"family": ..., "config": {...}} (the `model` item)."""
    return {"family": family, "config": models.config_to_dict(cfg)}


# -- fingerprints ---------------------------------------------------------------------------------


def _mix(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: a bijection of uint32 that spreads every input bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


SEEDS = (0x9E3779B9, 0x7F4A7C15)  # one per sum


def _fingerprint(x: jax.Array) -> jax.Array:
    """uint32[2]: two sums, mod 2**32, of every element's bits mixed with its position.

    With b_i the bits of element i (row-major) as uint32 and mix a bijection of uint32 (MurmurHash3's
    finalizer):  h_k = sum_i mix(b_i ^ mix(i ^ seed_k)).  Because mix is a bijection, any one changed
    element changes each term, hence each sum; because the terms are mixed, moved, swapped or negated
    elements change them too, and other damage goes unseen with odds of about 2**-64 (a checksum
    against accidents, not a signature against tampering). Integer sums are exact in any order, so the
    value does not depend on the mesh the array lives on; the flat index comes from iotas, so a sharded
    array is reduced where it lies, without being gathered or reshaped. (Positions wrap at 2**32
    elements: in a larger array, elements exactly 2**32 apart share a position.)
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
    return jnp.stack(
        [jnp.sum(_mix(bits ^ _mix(index ^ jnp.uint32(seed))), dtype=jnp.uint32) for seed in SEEDS]
    )


@jax.jit
def _check_arrays(tree: Any) -> tuple[jax.Array, Any]:
    """(every float finite, the fingerprint of every leaf): one compiled pass over the tree."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)
    return finite, jax.tree.map(_fingerprint, tree)


def _path(path: Any) -> str:
    return "/".join(sharding.path_names(path))


def fingerprints(tree: Any) -> tuple[bool, dict[str, list[int]]]:
    """(all finite, {"a/b/c": [h1, h2]} for every array leaf of `tree`), computed on the devices."""
    finite, sums = jax.device_get(_check_arrays(tree))
    flat = jax.tree_util.tree_flatten_with_path(sums)[0]
    return bool(finite), {_path(p): [int(v) for v in h] for p, h in flat}


def _record(tree: Any) -> tuple[bool, dict[str, dict]]:
    """(all finite, {"a/b/c": {"sum": [h1, h2], "dtype": ..., "shape": [...]}}): an item's integrity."""
    finite, sums = fingerprints(tree)
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    kinds = {_path(p): (str(jnp.dtype(x.dtype)), list(x.shape)) for p, x in flat}
    return finite, {k: {"sum": v, "dtype": kinds[k][0], "shape": kinds[k][1]} for k, v in sums.items()}


def _layout_differs(step: int, name: str, saved: dict, target: Any) -> None:
    """A config that builds other shapes or dtypes than the checkpoint holds is the user's change, not
    damage: say so (ConfigError) instead of reading, casting and calling the step damaged."""
    for path, x in jax.tree_util.tree_flatten_with_path(target)[0]:
        key, want = _path(path), (str(jnp.dtype(x.dtype)), list(x.shape))
        have = saved.get(key)
        if have is not None and (have["dtype"], have["shape"]) != want:
            raise ConfigError(
                f"checkpoint step {step} holds {name}/{key} as {have['dtype']}{have['shape']}, this config "
                f"builds {want[0]}{want[1]}: resume with the config it was saved with, or use a new workdir"
            )


def _mismatch(saved: dict, tree: Any) -> str | None:
    """What differs between the saved fingerprints and those of `tree` (None: it is what was saved)."""
    finite, now = fingerprints(tree)
    bad = [k for k in now if k not in saved or saved[k]["sum"] != now[k]] + [k for k in saved if k not in now]
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
    items = {"params": state["params"], "opt": {"opt": state["opt"], "step": state["step"]}}
    finite, record = _record(items)
    if not finite:
        raise TrainingDiverged(f"step {step}: the parameters or optimizer state are not finite; not saved")
    args = ocp.args.Composite(
        **{name: ocp.args.StandardSave(tree) for name, tree in items.items()},
        data=ocp.args.JsonSave(data_state),
        model=ocp.args.JsonSave(spec),
        integrity=ocp.args.JsonSave({name: _split(record, name) for name in items}),
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
    """The error for a save that failed (a full disk, an unwritable bucket), naming the good one left.

    Complete steps are those orbax lists after a reload (on object stores it writes straight into
    <step>/ and marks completion there); any other folder named after a step is the failed one."""
    root = epath.Path(mngr.directory)
    try:
        mngr.reload()
        complete = set(mngr.all_steps())
        started = {int(m.group(1)) for p in root.iterdir() if (m := re.match(r"(\d+)(\.|$)", p.name))}
    except Exception:  # noqa: BLE001 - the storage that failed the save may fail listing too
        complete, started = set(), set()
    failed = sorted(started - complete)
    what = f"step {', '.join(map(str, failed))}" if failed else "a checkpoint"
    kept = f"step {max(complete)} in {root}, intact" if complete else "none found"
    return CheckpointNotWritten(
        f"{what} could not be written ({_reason(e)}); the last complete checkpoint: {kept}"
        + (" (the partial step is removed when the run starts again)" if failed else "")
    )


def _split(sums: dict, item: str) -> dict:
    """The records of one item, keyed by the path inside it."""
    prefix = item + "/"
    return {k[len(prefix) :]: v for k, v in sums.items() if k.startswith(prefix)}


def save_params(
    workdir: str | os.PathLike, family: str, cfg: Any, params: dict, *, step: int = 0
) -> epath.Path:
    """Write `params` (a pure dict, as `nnx.to_pure_dict`) and the model spec as step `step`."""
    spec = model_spec(family, cfg)
    finite, record = _record(params)
    if not finite:
        raise ValueError(f"{family} parameters hold non-finite values; not saved")
    with manager(workdir) as mngr:
        mngr.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                model=ocp.args.JsonSave(spec),
                integrity=ocp.args.JsonSave({"params": record}),
            ),
            force=True,
        )
        mngr.wait_until_finished()
    return checkpoints_dir(workdir) / str(step)


# -- restoring, verified --------------------------------------------------------------------------


class _Bad(Exception):
    """One step failed: `str()` says which item and why; `one_sided` when only some processes saw it."""

    def __init__(self, message: str, one_sided: bool = False):
        super().__init__(message)
        self.one_sided = one_sided


def _say(line: str) -> None:
    if jax.process_index() == 0:
        print(line, flush=True)


def _reason(e: BaseException) -> str:
    """The innermost cause's first line (tensorstore nests the useful part), shortened."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= 300 else f"{text[:140]} ... {text[-150:]}"  # the end says why: keep it


_VOTES = itertools.count()  # every process votes in the same order, so the n-th vote has one key


class _OneSided(Exception):
    """A vote that some process never cast: it is stuck where this one failed (see _everywhere)."""


def _everywhere(ok: bool) -> bool:
    """True when `ok` holds on every process, so that all processes take the same branch.

    The votes go through the coordination service's key-value store, not a device collective: a
    process whose read failed skips orbax's closing barrier, where the others then wait and could
    answer no collective. A vote not cast within MASKJAX_VOTE_TIMEOUT seconds raises _OneSided.
    """
    if jax.process_count() == 1:
        return ok
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
    key = f"maskjax/checkpoint-vote/{next(_VOTES)}"
    client.key_value_set(f"{key}/{jax.process_index()}", "1" if ok else "0")
    votes, wait_s = [], distributed.vote_timeout()
    for p in range(jax.process_count()):
        try:
            votes.append(client.blocking_key_value_get(f"{key}/{p}", 1000 * wait_s) == "1")
        except Exception as e:  # noqa: BLE001 - a timeout, whatever the client calls it
            raise _OneSided(f"process {p} did not answer within {wait_s} s") from e
    return all(votes)


def _restore_item(mngr: ocp.CheckpointManager, step: int, name: str, args: Any) -> Any:
    try:
        value, problem = mngr.restore(step, args=ocp.args.Composite(**{name: args}))[name], None
    except Exception as e:  # noqa: BLE001 - any failure to read means: this step is not usable
        value, problem = None, f"{name} cannot be read: {_reason(e)}"
    try:
        agreed = _everywhere(problem is None)
    except _OneSided as e:
        where = f"on process {jax.process_index()}" if problem else "on another process"
        raise _Bad(f"{problem or name + ' cannot be read'} {where}, and {e}", one_sided=True) from None
    if not agreed:
        raise _Bad(problem or f"{name} cannot be read on another process")
    return value


def _saved_items(directory: epath.Path) -> set[str] | None:
    """The items orbax recorded for the step (None when its metadata cannot be read)."""
    try:
        return set(json.loads((directory / "_CHECKPOINT_METADATA").read_text())["item_handlers"])
    except Exception:  # noqa: BLE001
        return None


def _well_formed(saved: Any) -> bool:
    """{item: {path: {"sum": [int, int], "dtype": str, "shape": [int, ...]}}}, as save_state writes."""
    return isinstance(saved, dict) and all(
        isinstance(records, dict)
        and all(
            isinstance(r, dict)
            and isinstance(r.get("sum"), list)
            and len(r["sum"]) == 2
            and isinstance(r.get("dtype"), str)
            and isinstance(r.get("shape"), list)
            for r in records.values()
        )
        for records in saved.values()
    )


def _restore_verified(mngr: ocp.CheckpointManager, step: int, items: dict[str, Any]) -> dict:
    """{item: restored value} for `items` ({name: orbax restore args}) of `step`, each array item
    checked against the fingerprints saved with it. Raises _Bad naming the item."""
    recorded = _saved_items(epath.Path(mngr.directory) / str(step))
    if not _everywhere(recorded is not None):
        raise _Bad("its metadata (_CHECKPOINT_METADATA) cannot be read")
    saved = None
    if "integrity" in recorded:  # written with fingerprints: they must be there and match
        saved = _restore_item(mngr, step, "integrity", ocp.args.JsonRestore())
        if not _well_formed(saved):
            raise _Bad("integrity is not a record of fingerprints")
    elif any(name in ARRAY_ITEMS for name in items):
        _say(f"checkpoint step {step} has no fingerprints (written before they existed): not verified")
    out = {}
    for name, args in items.items():
        if saved is not None and name in ARRAY_ITEMS:
            if name not in saved:
                raise _Bad(f"{name} has no saved fingerprints")
            if isinstance(args, ocp.args.StandardRestore) and args.item is not None:
                _layout_differs(step, name, saved[name], args.item)
        out[name] = _restore_item(mngr, step, name, args)
        if saved is not None and name in ARRAY_ITEMS:
            problem = _mismatch(saved[name], out[name])
            if problem:
                raise _Bad(f"{name}: {problem}")
    return out


def _first_good(
    mngr: ocp.CheckpointManager,
    steps: list[int],
    items: Callable[[int], dict[str, Any]],
    on_one_sided: Callable[[int], str] = lambda step: "",
) -> tuple[int, dict, list[int]]:
    """(step, its items, the newer steps that failed) for the newest of `steps` that restores intact;
    one line for each that does not. None intact: CheckpointDamaged naming every step and its fault.

    A fault only some processes see leaves the others inside orbax's restore, where no fallback can
    reach them: CheckpointDamaged at once, after `on_one_sided(step)` (which may set the step aside,
    so that the rerun falls back), and the job ends (the stuck processes with it)."""
    failures = []
    for i, step in enumerate(steps):
        try:
            return step, _restore_verified(mngr, step, items(step)), steps[:i]
        except _Bad as e:
            if e.one_sided:
                what = f"checkpoint step {step} is damaged ({e})"
                raise CheckpointDamaged(what + on_one_sided(step)) from None
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
    step is intact, CheckpointDamaged is raised and nothing is moved. A config whose shapes or
    dtypes differ from the checkpoint's is a ConfigError, not damage.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        return None
    items = {
        "params": ocp.args.StandardRestore(abstract_state["params"]),
        "opt": ocp.args.StandardRestore({"opt": abstract_state["opt"], "step": abstract_state["step"]}),
        "data": ocp.args.JsonRestore(),
    }

    def alone(step: int) -> str:  # this process alone moves it: the others are stuck in orbax
        return f"; {_move_aside(mngr, step)}; this job stops, and its rerun resumes from an earlier step"

    step, restored, damaged = _first_good(mngr, steps, lambda _: items, alone)
    if damaged:
        moved = [_move_aside(mngr, s) for s in damaged] if jax.process_index() == 0 else []
        for line in moved:
            _say(line)
        if jax.process_count() > 1:  # nobody reloads before the move is done
            _everywhere(True)
        mngr.reload()  # the steps moved aside are no longer this run's
    state = {"params": restored["params"], "opt": restored["opt"]["opt"], "step": restored["opt"]["step"]}
    return step, state, restored["data"]


def _move_aside(mngr: ocp.CheckpointManager, step: int) -> str:
    """Move a damaged step out of the manager's sight, keeping its files; says what was done.

    Local disks rename the folder; object stores (no folders, no rename) copy each file, then delete
    the step. A move that fails is reported, not raised: the step stays, damaged and named."""
    root = epath.Path(mngr.directory)
    source, target = root / str(step), root.parent / "checkpoints-damaged" / f"{step}-{int(time.time())}"
    try:
        if "://" not in str(root):
            target.parent.mkdir(parents=True, exist_ok=True)
            source.rename(target)
        else:
            for f in source.rglob("*"):
                if f.is_file():
                    (target / f.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
                    f.copy(target / f.relative_to(source))
            source.rmtree()
    except Exception as e:  # noqa: BLE001
        return f"could not move damaged step {step} to {target} ({_reason(e)}): move or delete it by hand"
    return f"moved damaged step {step} to {target}"


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


def model_config(workdir: str | os.PathLike) -> tuple[str, Any]:
    """(family, model config) of the newest checkpoint in `workdir`: its `model` item only, no arrays."""
    with manager(workdir, read_only=True) as mngr:
        steps = mngr.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint under {checkpoints_dir(workdir)}")
        spec = _restore_item(mngr, max(steps), "model", ocp.args.JsonRestore())
    return spec["family"], models.make_config(spec["family"], spec["config"], drop_moved=True)
