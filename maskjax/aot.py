"""Ahead-of-time compile of the whole train step: will this config fit its slice, before renting it?

  compile_config(config, topology="v3:8x8")   the real TPU compiler (libtpu, `pip install maskjax[tpu]`)
                                              on a CPU host, for that slice's device descriptions
  compile_config(config)                      `hardware.num_devices` emulated CPU devices

Both lower `Trainer.train_step` (masking + model + loss + optimizer update, state donated)
from ShapeDtypeStructs carrying the config's shardings — nothing is allocated and no data is
read — then report XLA's per-device memory, its FLOP count, the model's own FLOP count, and
whether the peak fits the device's HBM. The compile runs in a fresh subprocess: it needs its
own device count (XLA reads it when jax starts) and libtpu stays out of the caller's process.

Peak bytes per device (from `compiled.memory_analysis()`):

  peak = argument + output − alias + temp + generated_code

Arguments (state, batch, extras) and outputs (new state, metrics) are live for the whole
step; with the state donated, the outputs reuse the arguments' buffers, and XLA reports those
bytes in both `argument` and `output` and once more as `alias`, so they are subtracted once.
`temp` is XLA's simulated peak of everything else (activations, gradients, optimizer
temporaries); the program binary also sits in HBM. `fits` compares this peak with the HBM the
TPU compiler itself says a device has free for a program (15.48 GiB of a v3 core's 16 GiB; it is
read from the compiler by compiling a program that cannot fit), or with --hbm-gib. The compiler
refuses a program it finds too big (RESOURCE_EXHAUSTED): compiled=False, fits=False, with the
bytes it states. It has accepted programs whose peak above exceeds its limit by a few percent
(GPT-2 medium at 512 × 1024 on v3 without remat: 15.89 GiB): such a step is reported as not fitting.

FLOPs: `cost_analysis()` counts one device's share and a `lax.scan` body once (layers
scanned with `scan_layers`, gradient-accumulation microbatches), so its count is low for
scanned models; the method's own `flops` counts the matmuls it does per step from its sizes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ml_collections

from maskjax.errors import ConfigError

GIB = 2**30

# Fallback when the compiler does not state its limit: HBM per chip (GiB) from the Cloud TPU
# system-architecture pages (cloud.google.com/tpu/docs/v2 ... v6e): v2 16 GiB and v3 32 GiB for 2
# cores, v4 32 GiB for 2 cores, v5e 16 GB, v5p 95 GB (2 cores, one megacore device), v6e 32 GB.
# A jax device is a core, or a whole chip in megacore mode: per device = chip / devices on the chip.
HBM_GIB_PER_CHIP = {
    "TPU v2": 16,
    "TPU v3": 32,
    "TPU v4": 32,
    "TPU v5 lite": 16,
    "TPU v5": 95,
    "TPU v6 lite": 32,
}


# ---------------------------------------------------------------------------- peaks


def matmul_peak_flops(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
    """Measured dense-matmul FLOP/s of one local device: the denominator of MFU, never a datasheet's."""
    import time

    import jax
    import jax.numpy as jnp

    device = jax.local_devices()[0]
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# ---------------------------------------------------------------------------- compiling here


def spec_hbm_bytes(devices: list) -> int | None:
    """The HBM of one device of a TPU topology, from `HBM_GIB_PER_CHIP`; None if unknown."""
    chip = HBM_GIB_PER_CHIP.get(devices[0].device_kind)
    if chip is None:
        return None
    chips = {tuple(getattr(d, "coords", (d.id,))) for d in devices}
    return chip * GIB * len(chips) // len(devices)


def usable_hbm_bytes(device: Any) -> int | None:
    """The HBM the TPU compiler lets one program use on `device`, as it states it when refusing one.

    A 512 GiB temporary (kept by an optimisation barrier) is refused in well under a second with
    "... exceeds available HBM (15.48G)" on a v3 core (15.25G v4 core, 15.75G v5e, 95.74G v5p, 31.25G v6e).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    one = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array([device]), ("d",)), jax.sharding.PartitionSpec()
    )

    def too_big(x: jax.Array) -> jax.Array:
        return jax.lax.optimization_barrier(jnp.broadcast_to(x, (2**38,)) * 2).sum()

    try:
        jax.jit(too_big, out_shardings=one).lower(
            jax.ShapeDtypeStruct((), jnp.bfloat16, sharding=one)
        ).compile()
    except jax.errors.JaxRuntimeError as e:
        return _parse_oom(str(e)).get("available_bytes")
    return None


_SIZE = r"([\d.]+)\s*([KMGT]i?B?)?"


def _bytes(number: str, unit: str | None) -> int:
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[(unit or "")[:1]]
    return int(float(number) * scale)


def _parse_oom(message: str) -> dict:
    """Needed and available bytes from XLA's RESOURCE_EXHAUSTED message, where it states them."""
    patterns = (
        rf"required for HLO temporaries \({_SIZE}\) exceeds available HBM \({_SIZE}\)",
        rf"Used {_SIZE} of {_SIZE} hbm",
    )
    for pattern in patterns:
        m = re.search(pattern, message)
        if m:
            return {"required_bytes": _bytes(*m.group(1, 2)), "available_bytes": _bytes(*m.group(3, 4))}
    return {}


def peak_bytes(mem: Any) -> dict[str, int]:
    """A compiled program's bytes per device by kind, and their `peak` (module docstring's formula)."""
    sizes = {
        "argument": mem.argument_size_in_bytes,
        "output": mem.output_size_in_bytes,
        "alias": mem.alias_size_in_bytes,
        "temp": mem.temp_size_in_bytes,
        "generated_code": mem.generated_code_size_in_bytes,
    }
    sizes["peak"] = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
    sizes["peak"] += sizes["generated_code"]
    return sizes


def compile_step(
    config: ml_collections.ConfigDict,
    devices: list,
    *,
    platform: str,
    hbm_bytes: int | None,
    hbm_source: str | None = None,
) -> dict:
    """Lower and compile the train step for `devices` (this process's or a topology's); see module doc.

    hbm_bytes: per-device memory to judge `fits` by (None: `fits` means it compiled); hbm_source says
    where that number came from.
    """
    import jax

    from maskjax import models, sharding, train

    trainer = train.Trainer(config, devices)
    batch = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=trainer.batch_sharding),
        trainer.method.batch_spec(config, trainer.model_cfg),
    )
    cfg = trainer.model_cfg
    flops = trainer.method.flops(config, cfg)
    n = len(devices)
    result: dict[str, Any] = {
        "family": config.family,
        "topology": platform,
        "device_kind": devices[0].device_kind,
        "num_devices": n,
        "mesh": dict(trainer.mesh.shape),
        "global_batch_size": config.global_batch_size,
        "grad_accum_steps": config.grad_accum_steps,
        "params": models.param_count(trainer.model_name, cfg),
        "dtype": cfg.dtype,
        "scan_layers": cfg.scan_layers,
        "remat": cfg.remat,
        "model_flops_per_step": flops,
        "model_flops_per_device": flops // n,
        "hbm_bytes_per_device": hbm_bytes,
        "hbm_gib": None if hbm_bytes is None else round(hbm_bytes / GIB, 3),
        "hbm_source": hbm_source,
    }
    notes = result["notes"] = []
    paper_devices = (config.get("hardware") or {}).get("num_devices")
    if paper_devices and paper_devices != n:
        notes.append(f"the config's hardware.num_devices is {paper_devices}; compiled for {n} devices")
    too_big = "too big: try model.remat (full, dots), model.scan_layers, grad_accum_steps, or more devices"

    start = time.perf_counter()
    try:
        with sharding.use_rules(trainer.mesh, trainer.rules):
            lowered = trainer.train_step.lower(trainer.abstract_state, batch, trainer.abstract_extras())
        lower_seconds = time.perf_counter() - start
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        notes.append(too_big)
        result.update(
            compiled=False,
            fits=False,
            compile_seconds=round(time.perf_counter() - start, 2),
            bytes=None,
            **_parse_oom(str(e)),  # required_bytes, available_bytes: as the compiler states them
            error=str(e)[:2000],
        )
        return result
    seconds = time.perf_counter() - start

    sizes = peak_bytes(compiled.memory_analysis())
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    xla_flops = (cost or {}).get("flops")  # None where the backend gives no count
    fits = hbm_bytes is None or sizes["peak"] <= hbm_bytes
    if not fits:
        notes.append(too_big)
    if cfg.scan_layers or result["grad_accum_steps"] > 1:
        notes.append("XLA counts a lax.scan body once (scanned layers, accumulated microbatches): low")
    if platform.startswith("cpu"):
        notes.append("XLA:CPU memory is not TPU HBM: compile for a --topology to judge the fit")
    result.update(
        compiled=True,
        fits=fits,
        compile_seconds=round(seconds, 2),
        lower_seconds=round(lower_seconds, 2),
        bytes=sizes,
        peak_gib=round(sizes["peak"] / GIB, 3),
        headroom_bytes=None if hbm_bytes is None else hbm_bytes - sizes["peak"],
        xla_flops_per_device=xla_flops,
        flops_per_step_xla=None if xla_flops is None else xla_flops * n,
    )
    return result


def _compile_in_this_process(
    config: ml_collections.ConfigDict, topology: str | None, hbm_gib: float | None, num_devices: int
) -> dict:
    import jax

    hbm, source = None, None
    if topology:
        from jax.experimental import topologies

        try:
            devices = list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
        except jax.errors.JaxRuntimeError as e:
            raise ValueError(
                f"topology={topology!r} is not one libtpu knows (e.g. v3:8x8, v5e:4x4): {e}"
            ) from None
        platform = topology
        if hbm_gib is None:
            hbm, source = usable_hbm_bytes(devices[0]), "the TPU compiler's usable HBM"
            if hbm is None:
                hbm, source = spec_hbm_bytes(devices), "Cloud TPU spec sheet (HBM_GIB_PER_CHIP)"
    else:
        devices = jax.devices()
        if len(devices) != num_devices:
            raise RuntimeError(f"expected {num_devices} emulated devices, got {len(devices)}")
        platform = f"cpu:{num_devices}"
    if hbm_gib is not None:
        hbm, source = int(hbm_gib * GIB), "--hbm-gib"
    return compile_phases(config, devices, platform=platform, hbm_bytes=hbm, hbm_source=source)


def compile_phases(config: ml_collections.ConfigDict, devices: list, **kwargs: Any) -> dict:
    """`compile_step` for each phase of a run (`config.phases`: BERT's 128 then 512 tokens), which
    compiles a step function of its own. One phase: its report. Several: the report of the phase
    that fits worst (the first that does not fit, else the largest peak), with `fits` and `compiled`
    over all of them, the total `compile_seconds`, and every phase's report under "phases"."""
    from maskjax import config as config_lib

    schedule = config_lib.phases(config)
    if len(schedule) == 1:
        return compile_step(config, devices, **kwargs)
    reports = [{"from_step": start, **compile_step(c, devices, **kwargs)} for start, c in schedule]

    def badness(r: dict) -> tuple:
        return (not r["fits"], r["bytes"]["peak"] if r["bytes"] else float("inf"))

    worst = max(reports, key=badness)
    return {
        **worst,
        "compiled": all(r["compiled"] for r in reports),
        "fits": all(r["fits"] for r in reports),
        "compile_seconds": round(sum(r["compile_seconds"] for r in reports), 2),
        "phases": reports,
    }


# ---------------------------------------------------------------------------- the subprocess


def emulated_device_count(config: ml_collections.ConfigDict) -> int:
    """The devices a config is meant for: `hardware.num_devices`, else its mesh if fully sized."""
    hardware = config.get("hardware") or {}
    if hardware.get("num_devices"):
        return int(hardware["num_devices"])
    sizes = list(config.mesh.to_dict().values())
    if all(isinstance(s, int) and s > 0 for s in sizes):
        return math.prod(sizes)
    raise ConfigError(
        "hardware.num_devices is missing and the mesh has a -1 axis: say how many devices to emulate"
    )


def _child_env(num_devices: int, emulated: bool) -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={num_devices}")
    if emulated:  # the CPU program never runs: skip LLVM's optimisations (same buffers, faster compile)
        flags.append("--xla_backend_optimization_level=0")
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"  # topology compiles need no TPU attached; never grab this host's chips
    env["TPU_SKIP_MDS_QUERY"] = "1"  # libtpu: do not ask a GCE metadata server for a TPU that isn't there
    env["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"  # several compiles (or a training run) may hold libtpu
    return env


def compile_config(
    config: ml_collections.ConfigDict,
    *,
    topology: str | None = None,
    hbm_gib: float | None = None,
    num_devices: int | None = None,
    timeout_s: float | None = None,
    name: str | None = None,
) -> dict:
    """Compile `config`'s train step for `topology` (e.g. "v3:8x8"), or without one on
    `num_devices` (default `emulated_device_count(config)`) emulated CPU devices; return the report.

    hbm_gib: the per-device memory to judge `fits` against (default: what the TPU compiler says a
    device has for a program; none on CPU, where `fits` only says that it compiled).
    name: what the report calls the config (its file). A config error is raised as `ConfigError`,
    an unknown topology as ValueError, a missing libtpu as ImportError.
    """
    if topology:
        if importlib.util.find_spec("libtpu") is None:
            raise ImportError("compiling for a TPU topology needs libtpu: pip install 'maskjax[tpu]'")
        n = 1  # the topology's devices are descriptions; the subprocess needs no CPU devices
    else:
        n = num_devices or emulated_device_count(config)
        from maskjax.config import validate

        validate(config, n)  # a bad config fails here, before a subprocess starts jax
    with tempfile.TemporaryDirectory(prefix="maskjax-aot-") as tmp:
        request, answer = Path(tmp) / "request.pkl", Path(tmp) / "result.json"
        request.write_bytes(
            pickle.dumps({"config": config, "topology": topology, "hbm_gib": hbm_gib, "num_devices": n})
        )
        proc = subprocess.run(
            [sys.executable, "-m", "maskjax.aot", str(request), str(answer)],
            env=_child_env(n, emulated=not topology),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if not answer.exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-30:])
            raise RuntimeError(f"the compile subprocess failed (exit {proc.returncode}):\n{tail}")
        result = json.loads(answer.read_text())
    if "config_error" in result:
        raise ConfigError(result["config_error"])
    if "value_error" in result:
        raise ValueError(result["value_error"])
    return {"config": name or config.get("name") or config.family, **result}


def _main(request_path: str, answer_path: str) -> None:
    request = pickle.loads(Path(request_path).read_bytes())
    try:
        result = _compile_in_this_process(**request)
    except ConfigError as e:
        result = {"config_error": str(e)}
    except ValueError as e:
        result = {"value_error": str(e)}
    Path(answer_path).write_text(json.dumps(result))


if __name__ == "__main__":
    _main(*sys.argv[1:3])
