"""Join the other processes of a job before JAX touches a device: localhost emulation or a TPU pod.

`maybe_initialize()` runs in `maskjax <command>` (cli.main) before the command
touches JAX. It reads the environment, so the same command line runs alone, as one
of N processes on this machine (`launch/local.py`), or on every host of a pod
(`launch/tpu.py`):

  MASKJAX_COORDINATOR=HOST:PORT   process 0's address; the coordination service runs there.
  MASKJAX_NUM_PROCESSES=N         processes in the job (all three of these, or none).
  MASKJAX_PROCESS_ID=I            this process, 0 <= I < N.
  MASKJAX_LOCAL_DEVICES=M         CPU devices this process emulates (jax_num_cpu_devices; it
                                  overrides XLA_FLAGS' --xla_force_host_platform_device_count).
  MASKJAX_DISTRIBUTED=1 | 0       1: jax.distributed.initialize() with no arguments (TPU pod,
                                  Slurm, ...: JAX finds the cluster; launch/tpu.py sets it);
                                  0: never join. Unset: join when MASKJAX_COORDINATOR is set, or
                                  for `train` / `benchmark-input` on a Cloud TPU VM (detect_tpu).
  MASKJAX_INIT_TIMEOUT=S          seconds to wait for every peer to connect (default 300).
  MASKJAX_HEARTBEAT_TIMEOUT=S     seconds without a peer's heartbeat before the job is declared
                                  dead and every survivor exits non-zero (default 100).
  MASKJAX_SHUTDOWN_TIMEOUT=S      seconds a finished process waits for the others at exit
                                  (default 300).
  MASKJAX_VOTE_TIMEOUT=S          seconds a process waits for the others' word on whether a
                                  checkpoint read back intact (default 300; maskjax.checkpoint).

A peer that dies never leaves the others hanging. Process 0 hosts the coordination
service: when it dies the others abort at once. Another process that dies is
noticed when its heartbeats stop (MASKJAX_HEARTBEAT_TIMEOUT), and the service
then aborts every survivor, even one blocked in a collective the dead peer never
joins. A peer that never arrives fails the others after MASKJAX_INIT_TIMEOUT.
A process that fails with an exception must not exit gracefully: JAX's exit
waits at a shutdown barrier for peers that are themselves blocked waiting for
it (MASKJAX_SHUTDOWN_TIMEOUT), so `fail_fast` ends it at once instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator

import jax

PREFIX = "MASKJAX_"


def vote_timeout() -> int:
    """Seconds to wait for every process's vote on a checkpoint read (MASKJAX_VOTE_TIMEOUT)."""
    return _int_env("VOTE_TIMEOUT", 300)


def _int_env(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(PREFIX + name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{PREFIX}{name}={value!r} must be an integer") from None


def on_tpu_host() -> bool:
    """TPU chips on this machine's PCI bus (JAX's own check; private, so guarded)."""
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # noqa: BLE001 - any failure means "not detectably a TPU VM"
        return False


def maybe_initialize(detect_tpu: bool = False) -> bool:
    """Call jax.distributed.initialize as the environment asks; True when this process joined a job.

    detect_tpu: with MASKJAX_DISTRIBUTED unset, join when on a Cloud TPU VM. Only for commands that
    every host runs (a command run on one host of a pod would wait for the others in vain).
    Must run before any JAX computation or `jax.devices()` (JAX refuses later).
    """
    local_devices = _int_env("LOCAL_DEVICES")
    if local_devices is not None:
        # Must precede the CPU backend's creation, like initialize itself.
        jax.config.update("jax_num_cpu_devices", local_devices)
    timeouts = {
        "initialization_timeout": _int_env("INIT_TIMEOUT", 300),
        "heartbeat_timeout_seconds": _int_env("HEARTBEAT_TIMEOUT", 100),
        "shutdown_timeout_seconds": _int_env("SHUTDOWN_TIMEOUT", 300),
    }
    coordinator = os.environ.get(PREFIX + "COORDINATOR")
    explicit = os.environ.get(PREFIX + "DISTRIBUTED")
    if explicit == "0":
        return False
    if coordinator:
        num_processes, process_id = _int_env("NUM_PROCESSES"), _int_env("PROCESS_ID")
        if num_processes is None or process_id is None:
            raise ValueError(
                f"{PREFIX}COORDINATOR is set: {PREFIX}NUM_PROCESSES and {PREFIX}PROCESS_ID must be too"
            )
        jax.distributed.initialize(coordinator, num_processes, process_id, **timeouts)
        return True
    if explicit == "1" or (explicit is None and detect_tpu and on_tpu_host()):
        jax.distributed.initialize(**timeouts)  # the cluster (TPU metadata, Slurm, MPI) says who is who
        return True
    return False


@contextlib.contextmanager
def fail_fast() -> Iterator[None]:
    """In a job of several processes, an error ends this process at once (os._exit), status != 0.

    Without it, an exception would lead to JAX's graceful shutdown, which blocks
    until every peer reaches it, while the peers block in the next collective.
    Single-process runs are untouched.
    """
    try:
        yield
    except SystemExit as e:
        if jax.distributed.is_initialized() and e.code not in (0, None):
            if not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
            _exit_now(e.code if isinstance(e.code, int) else 1)
        raise
    except BaseException:
        if jax.distributed.is_initialized():
            traceback.print_exc()
            _exit_now(1)
        raise


def _exit_now(status: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
