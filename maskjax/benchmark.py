"""`maskjax benchmark`: how much model a config's train step trains per second here, measured.

One run measures, in this order and in this process:

  peak        the dense-matmul FLOP/s of one device (n = 2048, the best of 5), in float32 and in
              the model's compute dtype: the denominator of MFU, never a datasheet's
  the step    `Trainer.train_step` exactly as `train` runs it (on-device masking, model, loss,
              gradient, optimizer update, state donated) on a random batch of the method's shapes
              (`Method.example_batch`), so paper sizes run without their data:
                compile   seconds to lower and compile the step
                step      the median (and the fastest) of `steps` timed steps after `warmup`
                throughput  examples/s and tokens/s (patches/s for images)
                FLOPs     `Method.flops`, the model's matmuls per step (formula in each method)
                MFU       FLOPs / step time / peak of the devices; emulated CPU devices share one
                          host's cores, so there the peak is one device's, not n times it
                memory    XLA's peak bytes per device of the compiled step (`aot.peak_bytes`)
                          and the process's peak resident memory
  savings     `Method.savings`: the same step doing the work the method avoids (BERT's vocabulary
              logits at every position, MAE's encoder on every patch), timed in the same run and
              given as how many times slower it is

Every phase of a config that has phases (BERT: 128 then 512 tokens) is measured, or the one named.
On a shared machine compare ratios measured in one run, not numbers from two.
"""

from __future__ import annotations

import copy
import importlib
import os
import platform
import resource
import statistics
import time
from importlib import metadata
from typing import Any, TextIO

import jax
import ml_collections
import numpy as np

from maskjax import aot, methods, models, sharding, train
from maskjax import config as config_lib
from maskjax.errors import ConfigError

LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "maskjax")


def machine() -> dict[str, Any]:
    """The devices, the host's processor and the library versions: what a number was measured on."""
    devices = jax.devices()
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "device_kind": devices[0].device_kind,
        "platform": devices[0].platform,
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "host_cpu": _cpu_name(),
        "host_cores": _cores(),
        "python": platform.python_version(),
        "versions": versions,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _random_extras(trainer: train.Trainer, seed: int) -> Any:
    """The method's frozen inputs with random values of their shapes (BEiT: a random tokenizer, which
    costs what a trained one does), so that no checkpoint is needed to time the step."""
    abstract = trainer.abstract_extras()
    if abstract is None:
        return None
    leaves, treedef = jax.tree.flatten(abstract)
    rng = np.random.default_rng(seed)
    values = [
        (0.02 * rng.standard_normal(x.shape)).astype(x.dtype)
        if np.issubdtype(x.dtype, np.floating)
        else np.zeros(x.shape, x.dtype)
        for x in leaves
    ]
    return jax.device_put(jax.tree.unflatten(treedef, values), trainer.replicated)


def _local_batch(trainer: train.Trainer, seed: int) -> dict:
    """This process's rows of one random global batch (every process draws the same global one)."""
    config, method = trainer.config, trainer.method
    batch = method.example_batch(config, trainer.model_cfg, np.random.default_rng(seed))
    rows = config.global_batch_size // jax.process_count()
    start = jax.process_index() * rows
    return {k: v[start : start + rows] for k, v in batch.items()}


def _mlm_labels(ids: np.ndarray, special: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """transformers' MLM labels: the ids at `share` of the ordinary positions, -100 elsewhere."""
    chosen = (rng.random(ids.shape) < share) & ~special
    return np.where(chosen, ids, -100)


# transformers architecture -> its inputs from a maskjax example batch, doing the work maskjax's step
# does: the same rows, the same share masked (transformers' models mask in the data collator).
_TORCH_INPUTS = {
    "BertForMaskedLM": lambda b, c, rng: {
        **{k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in b},
        "labels": _mlm_labels(b["input_ids"], b["special_tokens_mask"], c.masking.mask_prob, rng),
    },
    "GPT2LMHeadModel": lambda b, c, rng: {"input_ids": b["input_ids"], "labels": b["input_ids"]},
    "ViTMAEForPreTraining": lambda b, c, rng: {"pixel_values": b["image"].transpose(0, 3, 1, 2)},
}
_TORCH_INPUTS["BertForPreTraining"] = lambda b, c, rng: {
    **_TORCH_INPUTS["BertForMaskedLM"](b, c, rng),
    "next_sentence_label": b["next_sentence_label"],
}
_TORCH_INPUTS["RobertaForMaskedLM"] = _TORCH_INPUTS["BertForMaskedLM"]


def torch_reference(trainer: train.Trainer, batch: dict[str, np.ndarray]) -> tuple[str, int, Any]:
    """(architecture, parameter count, one_step): the transformers model of the same configuration, on
    the same batch, trained by torch.optim.AdamW(fused=True) (+ the config's gradient clipping); one_step()
    runs one step (forward, backward, update). Needs the `bench` extra."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ConfigError("--compare=torch needs torch and transformers: pip install 'maskjax[bench]'") from e
    config = trainer.config
    interop = models.FAMILIES[trainer.model_name].interop
    hf_config = importlib.import_module(interop).hf_config(trainer.model_cfg) if interop else None
    arch = hf_config.architectures[0] if hf_config is not None else None
    if arch not in _TORCH_INPUTS:
        raise ConfigError(
            f"--compare=torch: no transformers reference for family {config.family!r} "
            f"({arch or 'no transformers architecture'}); it has one for {sorted(_TORCH_INPUTS)}"
        )
    if arch == "ViTMAEForPreTraining":
        hf_config.mask_ratio = config.masking.ratio
        hf_config.norm_pix_loss = config.masking.norm_pix_loss
    transformers.logging.set_verbosity_error()  # its notes on config fields are not this run's lines
    torch.manual_seed(config.seed)
    model = getattr(transformers, arch)(hf_config).train()
    inputs = _TORCH_INPUTS[arch](batch, config, np.random.default_rng(config.seed))
    inputs = {
        k: torch.from_numpy(np.ascontiguousarray(v)).long()
        if v.dtype != np.float32
        else torch.from_numpy(np.ascontiguousarray(v))
        for k, v in inputs.items()
    }
    opt = config.optimizer
    betas, eps = (opt.get("b1", 0.9), opt.get("b2", 0.999)), opt.get("eps", 1e-8)
    adamw = torch.optim.AdamW(
        model.parameters(),
        lr=1e-4,
        betas=betas,
        eps=eps,
        weight_decay=opt.get("weight_decay", 0.0),
        fused=True,
    )
    clip = opt.get("grad_clip")

    def one_step() -> None:
        adamw.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        adamw.step()

    return arch, sum(p.numel() for p in model.parameters()), one_step


def tokens_per_example(config: ml_collections.ConfigDict, model_cfg: Any, method: methods.Method) -> int:
    """Sequence positions per example: tokens for text, patches for images."""
    if method.data == "image":
        return model_cfg.num_patches
    return config.data.seq_length


def measure(
    config: ml_collections.ConfigDict, *, steps: int, warmup: int, peak: float, compare: str | None = None
) -> dict[str, Any]:
    """One config's train step: compile, time, count (see the module docstring). With
    compare="torch", each timed step alternates with one of `torch_reference`'s."""
    trainer = train.Trainer(config)
    method, cfg = trainer.method, trainer.model_cfg
    extras = _random_extras(trainer, config.seed)
    local = _local_batch(trainer, config.seed)
    arch, torch_params, reference = torch_reference(trainer, local) if compare == "torch" else (None, 0, None)
    with sharding.use_rules(trainer.mesh, trainer.rules):
        batch = trainer.put_batch(local)
        state = trainer.init()
        start = time.perf_counter()
        compiled = trainer.train_step.lower(state, batch, extras).compile()
        compile_seconds = time.perf_counter() - start
        times, theirs = [], []
        for i in range(warmup + steps):
            start = time.perf_counter()
            state, metrics = compiled(state, batch, extras)
            jax.block_until_ready((state, metrics))
            if i >= warmup:
                times.append(time.perf_counter() - start)
            if reference is not None:
                start = time.perf_counter()
                reference()
                if i >= warmup:
                    theirs.append(time.perf_counter() - start)
    step = statistics.median(times)
    flops = method.flops(config, cfg)
    n = jax.device_count()
    # Emulated CPU devices run on the same cores, each with the whole host's thread pool: the peak of
    # all of them together is one device's measured peak.
    total_peak = peak if jax.devices()[0].platform == "cpu" else peak * n
    examples = config.global_batch_size / step
    tokens = tokens_per_example(config, cfg, method)
    return {
        "family": config.family,
        "params": models.param_count(trainer.model_name, cfg),
        "global_batch_size": config.global_batch_size,
        "tokens_per_example": tokens,
        "dtype": getattr(cfg, "dtype", "float32"),
        "devices": n,
        "mesh": dict(trainer.mesh.shape),
        "compile_seconds": compile_seconds,
        "step_seconds_median": step,
        "step_seconds_min": min(times),
        "steps_timed": steps,
        "examples_per_sec": examples,
        "tokens_per_sec": examples * tokens,
        "model_flops_per_step": flops,
        "model_flops_per_sec": flops / step,
        "mfu": flops / step / total_peak,
        "xla_peak_bytes_per_device": aot.peak_bytes(compiled.memory_analysis())["peak"],
        "loss": float(jax.device_get(metrics["loss"])),
        **(
            {}
            if reference is None
            else {
                "torch_model": arch,
                "torch_params": torch_params,
                "torch_step_seconds_median": statistics.median(theirs),
                "speedup_vs_torch": statistics.median(theirs) / step,
            }
        ),
    }


def with_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `config` with each dotted key set (`config.override`); `config` is left as it was."""
    return config_lib.override(copy.deepcopy(config), overrides)


def run(
    config: ml_collections.ConfigDict,
    *,
    steps: int = 10,
    warmup: int = 2,
    savings: bool = True,
    compare: str | None = None,
    phase: int | None = None,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """The whole benchmark of `config` (module docstring): {"machine", "peak_flops", "rows",
    "max_rss_bytes"}. `phase` (1-based) measures that phase alone. With `out`, the table is written
    there as it is measured."""
    if compare not in (None, "torch"):
        raise ConfigError(f"compare must be torch (or not given); got {compare!r}")
    if steps < 1 or warmup < 0:
        raise ConfigError(f"steps must be >= 1 and warmup >= 0; got steps={steps}, warmup={warmup}")
    if methods.get(config.family).example_batch is None:
        known = sorted(n for n in methods.REGISTRY if methods.get(n).example_batch is not None)
        raise ConfigError(f"family {config.family!r} has no example batch to time; families: {known}")
    phases = [c for _, c in config_lib.phases(config)]
    if phase is not None:
        if not 1 <= phase <= len(phases):
            raise ConfigError(f"phase must be in [1, {len(phases)}] (the config's phases); got {phase}")
        phases = [phases[phase - 1]]
    cfgs = [config_lib.validate(c, jax.device_count()) for c in phases]  # every phase, before measuring
    dtypes = ["float32"] + [getattr(c, "dtype", "float32") for c in cfgs]
    if jax.devices()[0].platform != "cpu":
        dtypes.append("bfloat16")
    write = (lambda line: print(line, file=out, flush=True)) if out is not None else (lambda line: None)
    result: dict[str, Any] = {"machine": machine(), "peak_flops": {}, "rows": []}
    write(describe_machine(result["machine"]))
    for d in dict.fromkeys(dtypes):
        result["peak_flops"][d] = aot.matmul_peak_flops(d)
        write(f"matmul peak ({d}, n=2048): {result['peak_flops'][d] / 1e9:,.1f} GFLOP/s per device")
    write(HEADER)
    for index, (one, cfg) in enumerate(zip(phases, cfgs, strict=True)):
        peak = result["peak_flops"][getattr(cfg, "dtype", "float32")]
        row = measure(one, steps=steps, warmup=warmup, peak=peak, compare=compare)
        number = phase or index + 1
        row["name"] = f"{config.family}, phase {number}" if config.get("phases") else config.family
        result["rows"].append(row)
        write(_line(row))
        method = methods.get(one.family)
        if not savings or method.savings is None:
            continue
        for what, overrides in method.savings(one, cfg).items():
            other = measure(with_overrides(one, overrides), steps=steps, warmup=warmup, peak=peak)
            slower = other["step_seconds_median"] / row["step_seconds_median"]
            other.update(name=f"  {what}", overrides=overrides, slower=slower)
            result["rows"].append(other)
            write(_line(other))
    result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    write(f"process peak resident memory: {result['max_rss_bytes'] / 2**30:.2f} GiB")
    return result


HEADER = (
    f"{'':38s} {'compile':>8s} {'step (median)':>14s} {'examples/s':>11s} {'tokens/s':>10s} "
    f"{'GFLOP/step':>11s} {'MFU':>6s} {'XLA peak':>10s}"
)


def _line(row: dict) -> str:
    text = (
        f"{row['name'][:38]:38s} {row['compile_seconds']:7.1f}s {row['step_seconds_median'] * 1e3:11.1f} ms "
        f"{row['examples_per_sec']:11,.1f} {row['tokens_per_sec']:10,.0f} "
        f"{row['model_flops_per_step'] / 1e9:11,.2f} {row['mfu']:6.1%} "
        f"{row['xla_peak_bytes_per_device'] / 2**20:6,.0f} MiB"
    )
    if "slower" in row:
        text += f"   {row['slower']:.2f}x the step time"
    if "torch_model" in row:
        text += (
            f"\n{'  ' + row['torch_model'] + ' + torch AdamW':38s} {'':8s} "
            f"{row['torch_step_seconds_median'] * 1e3:11.1f} ms   "
            f"torch's step / maskjax's: {row['speedup_vs_torch']:.2f}x"
        )
    return text


def describe_machine(m: dict) -> str:
    v = m["versions"]
    return (
        f"device: {m['device_kind']} x{m['device_count']} ({m['platform']}); host: {m['host_cpu']}, "
        f"{m['host_cores']} cores; jax {v['jax']}, flax {v['flax']}, optax {v['optax']}, python {m['python']}"
    )
