"""The one training loop, for every family.

Read top to bottom: config -> data prepared -> mesh -> sharded state -> jitted step -> loop
(metrics, eval, checkpoints, preemption) -> the method's evaluators. What a method adds lives
in `maskjax/methods/<name>.py`: its masking + model + loss, and its FLOP count; the loop knows
it only through `maskjax.methods.Method`.

  state = {"params": ..., "opt": ..., "step": int32}   (plain dicts; all on the mesh)
  train_step(state, batch, extras) -> (state, metrics) one jit, state donated,
                                                        rng = fold_in(seed, step)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from maskjax import checkpoint, evaluators, methods, models, optim, sharding
from maskjax import config as config_lib
from maskjax.data import loaders
from maskjax.errors import CheckpointNotWritten, ConfigError, TrainingDiverged
from maskjax.evaluators import features


class Trainer:
    """Everything derived from the config, built once: mesh, shardings, jitted steps."""

    def __init__(self, config: ml_collections.ConfigDict, devices: list | None = None):
        """Pure bookkeeping: reads no data, loads no checkpoint and allocates nothing, so it also
        serves devices that are not this host's (a TPU topology's descriptions, `maskjax.aot`).
        The method's frozen inputs come from `load_extras()`, the state from `init()` or a restore."""
        self.config = config
        devices = list(jax.devices() if devices is None else devices)
        self.model_cfg = config_lib.validate(config, len(devices))
        self.method = methods.get(config.family)
        self.model_name = self.method.model  # the architecture: what a checkpoint's model spec names
        self.mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
        self.rules = config_lib.rules(config)

        abstract_model = nnx.eval_shape(lambda: models.build(self.model_name, self.model_cfg, config.seed))
        self.graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
        param_sh = nnx.to_pure_dict(sharding.param_shardings(abstract_params, self.mesh, self.rules))
        abstract_params = nnx.to_pure_dict(abstract_params)

        opt = config.optimizer.to_dict()
        self.peak_lr = optim.peak_learning_rate(opt, config.global_batch_size)
        sched = config.schedule
        self.lr = optim.schedule(
            self.peak_lr,
            config.total_steps,
            sched.warmup_steps,
            sched.decay,
            sched.end_lr,
        )
        roles = None if self.method.roles is None else self.method.roles(config, abstract_params)
        self.tx = optim.make_optimizer(
            opt, self.lr, abstract_params, getattr(self.model_cfg, "layers", 0), roles
        )
        abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.state_sharding = {
            "params": param_sh,
            "opt": sharding.opt_shardings(abstract_opt, param_sh, self.mesh),
            "step": self.replicated,
        }
        self.abstract_state = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            {"params": abstract_params, "opt": abstract_opt, "step": jax.ShapeDtypeStruct((), jnp.int32)},
            self.state_sharding,
        )
        self.batch_sharding = NamedSharding(self.mesh, sharding.logical_to_spec(("batch",), self.rules))
        # Separate random streams for training steps and evaluation, each folded with a counter.
        self.train_key = jax.random.fold_in(jax.random.key(config.seed), 0)
        self.eval_key = jax.random.fold_in(jax.random.key(config.seed), 1)

        self.init = jax.jit(self._init, out_shardings=self.state_sharding)
        self.train_step = jax.jit(
            self._train_step, out_shardings=(self.state_sharding, self.replicated), donate_argnums=0
        )
        self.eval_step = jax.jit(self._eval_step, out_shardings=self.replicated)

    def abstract_extras(self) -> Any:
        """ShapeDtypeStructs of the method's frozen inputs, replicated (ahead-of-time compiles)."""
        spec = None if self.method.extras_spec is None else self.method.extras_spec(self.config)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated), spec)

    def load_extras(self) -> Any:
        """The method's frozen inputs, read from disk (BEiT: its tokenizer checkpoint) and replicated."""
        if self.method.extras is None:
            return None
        return jax.device_put(self.method.extras(self.config), self.replicated)

    # -- pure functions, traced under the sharding rules ------------------------------------

    def _init(self, loaded: dict | None = None) -> dict:
        """A fresh state; with `loaded` (a pure dict of some of the parameters), those replace theirs."""
        model = models.build(self.model_name, self.model_cfg, self.config.seed)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        if loaded is not None:
            params = _overlay(params, loaded)
        return {"params": params, "opt": self.tx.init(params), "step": jnp.zeros((), jnp.int32)}

    def init_from(self, source: str) -> dict:
        """The state `config.init` asks for: `source`'s weights (a maskjax workdir, verified as every
        restore, or a transformers directory), the rest freshly initialised; step 0, a fresh optimizer.

        Prints what it took and what it did not (e.g. a fresh MLM head over a bare encoder)."""
        family, loaded = _weights(source)
        if family != self.model_name and self.method.init_weights is None:
            raise ConfigError(
                f"init={source} holds {family!r} weights; this config trains {self.model_name!r}"
            )
        if self.method.init_weights is not None:
            loaded = self.method.init_weights(family, loaded, self.model_cfg)
        abstract = jax.tree.map(lambda a: a.shape, self.abstract_state["params"])
        used, unused, fresh = _fit(abstract, loaded)
        if jax.process_index() == 0:
            print(f"init: {used} arrays from {source}; step 0, a fresh optimizer", flush=True)
            for path in fresh:
                print(f"  not in {source}, freshly initialised: {path}", flush=True)
            for path in unused:
                print(f"  in {source}, not in this model: {path}", flush=True)
        # Each array straight into its parameter's sharding (and dtype): no device holds more than
        # its shards, as when the state is created fresh.
        init = jax.jit(self._init, out_shardings=self.state_sharding)
        return init(_place(loaded, self.abstract_state["params"]))

    def _loss(self, params: dict, batch: dict, key: jax.Array, extras: Any) -> tuple[jax.Array, tuple]:
        """(loss, (metrics, terms)): the method's loss, its metrics, and its `loss_terms` if any."""
        model = nnx.merge(self.graphdef, params)
        loss, metrics = self.method.loss(model, batch, key, self.config, train=True, extras=extras)
        metrics = dict(metrics)
        return loss, (metrics, metrics.pop("loss_terms", None))

    def _train_step(self, state: dict, batch: dict, extras: Any) -> tuple[dict, dict]:
        step = state["step"]
        key = jax.random.fold_in(self.train_key, step)  # a function of the step alone: exact resume
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        accum = self.config.grad_accum_steps
        if accum == 1:
            (_, (metrics, _)), grads = grad_fn(state["params"], batch, key, extras)
        else:
            grads, metrics = self._accumulate(state["params"], batch, key, extras, accum)
        updates, opt_state = self.tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # A step whose loss or gradient is not finite leaves parameters and optimizer state as they were
        # (the step counter and the data move on); the loop stops after `max_nonfinite_steps` in a row.
        # Not optax.apply_if_finite: its state would change the checkpoint layout, and after its limit
        # it applies the non-finite update, where a run here stops instead.
        loss_ok = jnp.isfinite(metrics["loss"])
        grads_ok = all_finite(grads)
        ok = loss_ok & grads_ok
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        metrics = dict(
            metrics,
            learning_rate=self.lr(step),
            grad_norm=optax.tree.norm(grads),
            nonfinite_loss=(~loss_ok).astype(jnp.int32),
            nonfinite_grads=(~grads_ok).astype(jnp.int32),
        )
        new = {
            "params": keep(params, state["params"]),
            "opt": keep(opt_state, state["opt"]),
            "step": step + 1,
        }
        return new, metrics

    def _accumulate(self, params: dict, batch: dict, key: jax.Array, extras: Any, accum: int) -> tuple:
        """Gradient and metrics of the whole batch from `accum` microbatches, as one big batch gives.

        A loss term that is a mean over a varying number of predictions (MLM's masked tokens, GPT's
        real next tokens, a short BEiT mask) must weigh each microbatch by its count: the batch's
        term is Σ_i mean_i·n_i / Σ_i n_i, not the mean of the means. Methods name such terms in
        `loss_terms` {name: (mean, count)}; their totals Σ_i n_i come from a first pass that only
        counts (its model outputs are unused, so XLA drops the model from it), then each
        microbatch contributes Σ_k mean_k·n_k / total_k. Fixed-count losses weigh 1/accum.
        """
        # Microbatch a takes rows a, a+accum, ...: each device keeps its share of every microbatch.
        micro = jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)
        index = jnp.arange(accum)

        def counts(xs):
            i, mb = xs
            terms = self._loss(params, mb, jax.random.fold_in(key, i), extras)[1][1]
            return {} if terms is None else {k: jnp.asarray(n, jnp.float32) for k, (_, n) in terms.items()}

        totals = jax.tree.map(lambda n: n.sum(0), jax.lax.map(counts, (index, micro)))

        def share(p, mb, k):
            loss, (metrics, terms) = self._loss(p, mb, k, extras)
            terms = terms or {}
            # What the terms leave out of the loss (nothing today) is a fixed-count part: 1/accum of it.
            fixed = loss - sum(mean for mean, _ in terms.values())
            counted = [
                jnp.where(n > 0, mean * n, 0.0) / jnp.maximum(totals[name], 1.0)
                for name, (mean, n) in terms.items()
            ]
            return fixed / accum + sum(counted), metrics

        grad_fn = jax.value_and_grad(share, has_aux=True)

        def step(carry, xs):
            i, mb = xs
            (value, m), g = grad_fn(params, mb, jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, carry, (g, value, m)), None

        first = jax.tree.map(lambda x: x[0], micro)
        (_, zero_m), zero_g = jax.eval_shape(lambda: grad_fn(params, first, key))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (zero_g, jnp.zeros(()), zero_m))
        (grads, loss, metrics), _ = jax.lax.scan(step, zeros, (index, micro))
        metrics = jax.tree.map(lambda x: x / accum, metrics)  # the others (accuracy...): microbatch means
        return grads, dict(metrics, loss=loss)  # the loss: the big batch's, exactly

    def _eval_step(self, params: dict, batch: dict, index: jax.Array, extras: Any) -> dict:
        # A fixed key per eval batch: the eval masks are the same at every evaluation.
        key = jax.random.fold_in(self.eval_key, index)
        model = nnx.merge(self.graphdef, params)
        metrics = dict(self.method.loss(model, batch, key, self.config, train=False, extras=extras)[1])
        metrics.pop("loss_terms", None)
        return metrics

    # -- host side ----------------------------------------------------------------------------

    def put_batch(self, local: dict) -> dict:
        return loaders.to_global(local, None, self.batch_sharding)


class _Preemption:
    """SIGTERM (how a preempted TPU VM is stopped) sets a flag; the loop saves and exits 0."""

    def __init__(self):
        self.requested = False
        # Several processes: JAX's own SIGTERM handler tells the coordination service, which picks one
        # step for all (check); a Python handler would replace it and each host would stop alone.
        self._previous = signal.signal(signal.SIGTERM, self._handle) if jax.process_count() == 1 else None

    def _handle(self, signum, frame):
        self.requested = True

    def check(self, step: int) -> bool:
        if jax.process_count() > 1:  # every host must agree on the step it stops at
            from jax.experimental import multihost_utils

            return self.requested or multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class _NonFinite:
    """Counts the steps the train step skipped (non-finite loss or gradient), from each step's flags.

    A step's flags are read after the next step is dispatched, so the device stays one step ahead and
    no step waits for the host; `flush` reads the last one (before a log line or a save). Every process
    reads the same replicated flags, so all stop at the same step.
    """

    def __init__(self, limit: int):
        self.limit, self.in_a_row, self.total, self.pending = limit, 0, 0, None

    def after(self, step: int, metrics: dict) -> None:
        previous, self.pending = self.pending, (step, metrics["nonfinite_loss"], metrics["nonfinite_grads"])
        if previous is not None:
            self._count(*previous)

    def flush(self, stopping: bool = False) -> None:
        """Count the last step's flags; `stopping`: only count (the run is stopping already)."""
        if self.pending is not None:
            previous, self.pending = self.pending, None
            self._count(*previous, stopping)

    def _count(self, step: int, bad_loss: jax.Array, bad_grads: jax.Array, stopping: bool = False) -> None:
        bad_loss, bad_grads = bool(bad_loss), bool(bad_grads)
        if not (bad_loss or bad_grads):
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row >= self.limit and not stopping:
            raise TrainingDiverged(
                f"step {step}: the {'loss' if bad_loss else 'gradient'} is not finite, "
                f"{self.in_a_row} steps in a row (max_nonfinite_steps={self.limit}); those steps were skipped"
            )


def all_finite(tree: Any) -> jax.Array:
    """True when every element of every leaf is finite: one reduction, traceable."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _is_local(path: epath.Path) -> bool:
    return "://" not in str(path)


class MetricsWriter:
    """metrics.jsonl (one JSON object per logged step) + TensorBoard event files (process 0).

    Object stores (gs://) cannot append: there the file is rewritten whole at each write.
    """

    def __init__(self, workdir: epath.Path):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.path = workdir / "metrics.jsonl"
            if _is_local(workdir):
                self.file, self.lines = open(self.path, "a"), None  # noqa: SIM115 - closed in close()
            else:
                self.file = None
                self.lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
            self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, values: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _to_python(v) for k, v in values.items()}}
        line = json.dumps(row) + "\n"
        if self.file is not None:
            self.file.write(line)
            self.file.flush()
        else:
            self.lines.append(line)
            self.path.write_text("".join(self.lines))
        for k, v in row.items():
            if k != "step" and isinstance(v, int | float):
                self.tb.add_scalar(prefix + k, v, step)

    def close(self) -> None:
        if self.enabled:
            if self.file is not None:
                self.file.close()
            self.tb.close()


def _to_python(v: Any) -> Any:
    """A JSON value; a non-finite float becomes null (strict JSON has no NaN; the step's
    nonfinite_loss / nonfinite_grads flags say what happened)."""
    v = np.asarray(v) if hasattr(v, "shape") else v
    v = v.item() if isinstance(v, np.ndarray) else v
    return None if isinstance(v, float) and not math.isfinite(v) else v


def evaluate(trainer: Trainer, params: dict, loader: Any, extras: Any) -> dict:
    """Mean of the method's metrics over the first `eval_batches` held-out batches, the same each time."""
    loader.set_state({**loader.get_state(), "step": 0})
    totals: dict[str, float] = {}
    n = trainer.config.eval_batches
    for i in range(n):
        m = jax.device_get(trainer.eval_step(params, trainer.put_batch(next(loader)), jnp.int32(i), extras))
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + float(v) / n
    return totals


def benchmark_step(trainer: Trainer, steps: int) -> float:
    """Examples/s the compiled train step consumes (global), on a fixed batch, after one warm-up step.

    The config's data must be prepared (`loaders.prepare`)."""
    config = trainer.config
    extras = trainer.load_extras()
    with sharding.use_rules(trainer.mesh, trainer.rules):
        batch = trainer.put_batch(next(loaders.make(config, "train")))
        state = trainer.init()
        state, metrics = trainer.train_step(state, batch, extras)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = trainer.train_step(state, batch, extras)
        jax.block_until_ready(metrics)
    return steps * config.global_batch_size / (time.perf_counter() - start)


def run_evaluators(trainer: Trainer, state: dict, workdir: epath.Path) -> dict:
    """The method's evaluators on the trained parameters (process 0); their results in report.json."""
    if not trainer.method.evaluators:
        return {}
    params = state["params"]
    if jax.process_count() > 1:  # the evaluators run on process 0 alone: gather the parameters first
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() != 0:
        return {}
    params = jax.device_get(params)
    report: dict = {}
    for name in trainer.method.evaluators:
        report.update(evaluators.get(name)(trainer, params, trainer.config, workdir))
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _is_transformers_dir(source: str) -> bool:
    """Whether `config.init` names a transformers directory (else a maskjax workdir); it must exist."""
    path = epath.Path(source)
    if not path.exists():
        raise ConfigError(f"init={source} does not exist: give a maskjax workdir or a transformers directory")
    return (path / "config.json").exists() and not (path / "checkpoints").exists()


def _weights(source: str) -> tuple[str, dict]:
    """(model name, pure dict of numpy parameters) of a maskjax workdir or a transformers directory."""
    if _is_transformers_dir(source):
        from maskjax import interop

        try:
            imported = interop.load_hf(source)
        except (ValueError, KeyError, FileNotFoundError) as e:  # an architecture we do not convert
            raise ConfigError(f"init={source}: {e}") from None
        return imported.family, _only(imported.params, imported.missing)
    family, _, params = checkpoint.load_params(source)
    return family, jax.tree.map(np.asarray, params)


def with_init_architecture(
    config: ml_collections.ConfigDict, workdir: epath.Path | None = None
) -> ml_collections.ConfigDict:
    """`config` with the model fields its method takes from `config.init` (`Method.init_fields`) set
    to the checkpoint's values: a fine-tuning config then serves an encoder of any size. A run that
    resumes takes them from its own checkpoint (the init may be gone by then)."""
    fields = methods.get(config.family).init_fields
    if not fields or not config.get("init"):
        return config
    if workdir is not None and checkpoint.checkpoints_dir(workdir).exists():
        try:
            _, cfg = checkpoint.model_config(workdir)
        except FileNotFoundError:
            cfg = None
        if cfg is not None:
            return _with_fields(config, {f: getattr(cfg, f) for f in fields}, str(workdir))
    if _is_transformers_dir(config.init):
        from maskjax import interop

        try:
            _, cfg = interop.config_of(config.init)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"init={config.init}: {e}") from None
    else:
        _, cfg = checkpoint.model_config(config.init)
    return _with_fields(config, {f: getattr(cfg, f) for f in fields}, config.init)


def _with_fields(config: ml_collections.ConfigDict, values: dict, source: str) -> ml_collections.ConfigDict:
    changed = {f: v for f, v in values.items() if config.model.get(f) != v}
    if not changed:
        return config
    if jax.process_index() == 0:
        said = ", ".join(f"{f}={v}" for f, v in changed.items())
        print(f"model: {said} (the architecture of {source})", flush=True)
    out = ml_collections.ConfigDict(config.to_dict())
    for f, v in changed.items():
        out.model[f] = v
    return out


def with_own_tokenizer(config: ml_collections.ConfigDict, workdir: epath.Path) -> ml_collections.ConfigDict:
    """A fine-tuning run that encodes text with its init's tokenizer keeps a copy in WORKDIR/tokenizer
    and reads that one when it resumes (the init may be gone; the workdir serves inference alone)."""
    if config.data.get("kind") not in ("labelled_text", "span_qa") or config.data.get("tokenizer"):
        return config
    from maskjax.data import tokenizers

    own = workdir / "tokenizer"
    if not own.exists() and config.get("init") and jax.process_index() == 0:
        init = epath.Path(config.init)
        _keep_tokenizer(
            init / "tokenizer" if (init / "tokenizer").is_dir() else init, workdir, tokenizers.FILES
        )
    if not own.exists():  # nothing to copy, or another process does not see it yet: the init's
        return config
    out = ml_collections.ConfigDict(config.to_dict())
    out.data.tokenizer = str(own)
    return out


def _only(params: dict, missing: list[str]) -> dict:
    """`params` without the paths ("/a/b/c") the transformers checkpoint did not have."""
    gone = set(missing)

    def walk(tree: dict, path: str) -> dict:
        return {
            k: (walk(v, f"{path}/{k}") if isinstance(v, dict) else v)
            for k, v in tree.items()
            if f"{path}/{k}" not in gone
        }

    return walk(params, "")


def _fit(abstract: dict, loaded: dict, path: str = "") -> tuple[int, list[str], list[str]]:
    """(arrays that fit, paths only `loaded` has, paths only the model has); a shape that differs is a
    ConfigError naming it."""
    used, unused, fresh = 0, [], []
    for key in sorted(set(abstract) | set(loaded)):
        where = f"{path}/{key}"
        if key not in loaded:
            fresh.append(where)
        elif key not in abstract:
            unused.append(where)
        elif isinstance(abstract[key], dict) != isinstance(loaded[key], dict):
            there = "a group of arrays" if isinstance(loaded[key], dict) else "an array"
            raise ConfigError(f"init: {where} is {there} there, not in this config's model")
        elif isinstance(abstract[key], dict):
            u, un, fr = _fit(abstract[key], loaded[key], where)
            used, unused, fresh = used + u, unused + un, fresh + fr
        elif tuple(abstract[key]) != tuple(np.shape(loaded[key])):
            raise ConfigError(
                f"init: {where} is {tuple(np.shape(loaded[key]))} there and {tuple(abstract[key])} in this "
                "config's model: set the model sizes the weights were trained with"
            )
        else:
            used += 1
    return used, unused, fresh


def _place(loaded: dict, abstract: dict) -> dict:
    """The arrays of `loaded` this model has, as global arrays in the shardings and dtypes `abstract`
    names (host arrays in; each device gets only its shards)."""

    def put(x: np.ndarray, spec: jax.ShapeDtypeStruct) -> jax.Array:
        host = np.asarray(x, dtype=spec.dtype)
        return jax.make_array_from_callback(host.shape, spec.sharding, lambda index: host[index])

    return {
        k: (_place(v, abstract[k]) if isinstance(v, dict) else put(v, abstract[k]))
        for k, v in loaded.items()
        if k in abstract
    }


def _overlay(params: dict, loaded: dict) -> dict:
    """`params` with every array `loaded` has in its place (cast to the parameter's dtype)."""
    return {
        k: (
            _overlay(v, loaded[k])
            if isinstance(v, dict) and k in loaded
            else (jnp.asarray(loaded[k], v.dtype) if k in loaded else v)
        )
        for k, v in params.items()
    }


def _keep_tokenizer(source: epath.Path, workdir: epath.Path, only: tuple[str, ...] | None = None) -> None:
    """A text run's tokenizer, copied to WORKDIR/tokenizer: the workdir alone then serves
    `maskjax fill-mask` and `maskjax generate`. `only`: these file names (a transformers directory
    holds its weights beside the tokenizer's files)."""
    target = workdir / "tokenizer"
    if not source.is_dir() or target.exists():
        return
    files = [f for f in source.iterdir() if f.is_file() and (only is None or f.name in only)]
    if not files:
        return
    partial = workdir / "tokenizer.partial"
    partial.mkdir(parents=True, exist_ok=True)
    for f in files:
        (partial / f.name).write_bytes(f.read_bytes())
    partial.rename(target)  # whole or not at all


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, devices: list | None = None) -> dict:
    """Train (or resume) the run in `workdir` (local or gs://) on `devices` (default: all).

    Returns the last logged metrics.
    """
    workdir = epath.Path(workdir)
    if _is_local(workdir):
        workdir = epath.Path(os.path.abspath(workdir))
    workdir.mkdir(parents=True, exist_ok=True)
    config = with_own_tokenizer(with_init_architecture(config, workdir), workdir)
    schedule = config_lib.phases(config)
    for _, phase_config in schedule:  # every phase is checked before anything is built or read
        config_lib.validate(phase_config, len(devices) if devices is not None else jax.device_count())
    trainers = [Trainer(c, devices) for _, c in schedule]
    extras = [t.load_extras() for t in trainers]  # frozen inputs first: a missing tokenizer fails fast
    # Model FLOPs of one step in each phase, from the method's own count: the throughput line's TFLOP/s.
    flops = [t.method.flops(t.config, t.model_cfg) for t in trainers]
    for where in dict.fromkeys(loaders.prepare(c) for _, c in schedule):  # phases share a folder
        if jax.process_index() == 0:
            print(f"data: {where}", flush=True)
            _keep_tokenizer(epath.Path(str(where)) / "tokenizer", workdir)
    trainer = trainers[0]
    spec = checkpoint.model_spec(trainer.model_name, trainer.model_cfg)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    with (
        sharding.use_rules(trainer.mesh, trainer.rules),
        checkpoint.training_manager(workdir, config.keep_checkpoints) as mngr,
    ):

        def phase_at(step: int) -> int:
            return max(i for i, (start, _) in enumerate(schedule) if start <= step)

        resumed = checkpoint.restore_latest(mngr, trainer.abstract_state)
        if resumed is None:
            state = trainer.init_from(config.init) if config.get("init") else trainer.init()
            data_state = None
        else:
            latest, state, data_state = resumed
            print(f"resumed from step {latest}", flush=True)

        def enter_phase(index: int, saved: dict | None = None) -> tuple[Trainer, Any, Any]:
            start, phase_config = schedule[index]
            loader = loaders.make(phase_config, "train", start_step=0)
            if saved is not None and saved.get("phase", 0) == index:
                loader.set_state(saved["loader"])
            if len(schedule) > 1:
                print(f"phase {index + 1}/{len(schedule)} from step {start}", flush=True)
            return trainers[index], loader, loaders.make(phase_config, "eval")

        writer = MetricsWriter(workdir)
        feature_evals = features.FeatureEvals(trainer, config)  # config.evals: k-NN, ridge (off: none)
        preemption = _Preemption()
        step = int(jax.device_get(state["step"]))
        if step == 0 and feature_evals.every:  # where the representation starts from
            fe = feature_evals(state["params"], list(feature_evals.every))
            writer.write(0, {"split": "evals", **fe}, "")
            if jax.process_index() == 0:
                print(f"step 0: {features.scores(fe)}  ({fe['evals_seconds']:.1f} s)", flush=True)
        evals_since = time.perf_counter()
        phase = phase_at(step)
        trainer, loader, eval_loader = enter_phase(phase, data_state)
        window_step, window_start = step, time.perf_counter()  # throughput since the last log line
        last: dict = {}
        nonfinite = _NonFinite(config.max_nonfinite_steps)
        try:
            while step < config.total_steps:
                if phase + 1 < len(schedule) and step >= schedule[phase + 1][0]:
                    phase += 1
                    loader.close()
                    eval_loader.close()
                    trainer, loader, eval_loader = enter_phase(phase)
                batch = trainer.put_batch(next(loader))
                state, metrics = trainer.train_step(state, batch, extras[phase])
                step += 1
                nonfinite.after(step, metrics)
                if step % config.log_every == 0 or step == config.total_steps:
                    nonfinite.flush()
                    last = dict(jax.device_get(metrics))  # the one host sync, every log_every steps
                    now = time.perf_counter()
                    rate = (step - window_step) / max(now - window_start, 1e-9)
                    window_step, window_start = step, now
                    # Bad records skipped by this process so far, in total and per reason.
                    last.update(
                        examples_per_sec=rate * config.global_batch_size,
                        model_tflops_per_sec_per_device=rate * flops[phase] / trainer.mesh.size / 1e12,
                        skipped_steps=nonfinite.total,  # non-finite steps left out, so far in this process
                        **loader.stats,
                    )
                    writer.write(step, last)
                    eta = (config.total_steps - step) / max(rate, 1e-9)
                    print(
                        f"step {step}/{config.total_steps}  loss {float(last['loss']):.4f}  "
                        f"{rate:.2f} steps/s  ETA {eta:.0f}s",
                        flush=True,
                    )
                if step % config.eval_every == 0 or step == config.total_steps:
                    ev = evaluate(trainer, state["params"], eval_loader, extras[phase])
                    writer.write(step, {"split": "eval", **{f"eval_{k}": v for k, v in ev.items()}}, "")
                    last.update({f"eval_{k}": v for k, v in ev.items()})
                due = feature_evals.due(step)
                if due:
                    trained_for = time.perf_counter() - evals_since
                    fe = feature_evals(state["params"], due)
                    fe["evals_cost_fraction"] = fe["evals_seconds"] / max(trained_for, 1e-9)
                    writer.write(step, {"split": "evals", **fe}, "")
                    last.update(fe)
                    if jax.process_index() == 0:
                        print(
                            f"step {step}: {features.scores(fe)}  ({fe['evals_seconds']:.1f} s, "
                            f"{fe['evals_cost_fraction']:.1%} of the training time since the last)",
                            flush=True,
                        )
                    evals_since = time.perf_counter()
                stop = preemption.check(step)
                if step % config.checkpoint_every == 0 or step == config.total_steps or stop:
                    nonfinite.flush()
                    checkpoint.save_state(  # refuses a non-finite state (TrainingDiverged)
                        mngr, step, state, {"phase": phase, "loader": loader.get_state()}, spec
                    )
                if stop:
                    print(f"SIGTERM: saved step {step}, exiting", flush=True)
                    break
            checkpoint.finish(mngr)
        except TrainingDiverged as e:
            # Skipped steps left the state as it was before them. If some step since the last save did
            # update it, save that last good state at this step (the data position past the bad batches);
            # if none did, the last save holds it already, and saving again would only rotate an older
            # checkpoint away. save_state refuses a state that is itself not finite.
            nonfinite.flush(stopping=True)  # the step after the one that stopped the run, if dispatched
            try:
                checkpoint.finish(mngr)
                saved = mngr.latest_step() or 0
                if step - nonfinite.in_a_row > saved and saved != step:
                    with contextlib.suppress(TrainingDiverged):
                        checkpoint.save_state(
                            mngr, step, state, {"phase": phase, "loader": loader.get_state()}, spec
                        )
                        checkpoint.finish(mngr)
            except CheckpointNotWritten as failed:
                raise TrainingDiverged(f"{e}; and {failed}") from None
            latest = mngr.latest_step()
            where = (
                "none yet" if latest is None else f"step {latest} in {checkpoint.checkpoints_dir(workdir)}"
            )
            raise TrainingDiverged(f"{e}; the last finite checkpoint: {where}") from None
        finally:
            preemption.restore()
            writer.close()
            loader.close()
            eval_loader.close()
    if step >= config.total_steps:
        run_evaluators(trainer, state, workdir)
    return last
