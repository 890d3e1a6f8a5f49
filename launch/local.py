"""N processes on this machine that train as one job, exactly as the hosts of a TPU pod do.

  python launch/local.py --processes=2 --devices-per-process=4 -- \\
      python -m maskjax train --config=configs/demo/mae.py --workdir=/tmp/mae-2x4

Each child gets the environment `maskjax.distributed.maybe_initialize` reads
(MASKJAX_COORDINATOR=127.0.0.1:PORT, MASKJAX_NUM_PROCESSES, MASKJAX_PROCESS_ID,
MASKJAX_LOCAL_DEVICES; with --devices-per-process also JAX_PLATFORMS=cpu unless set, and
an XLA_FLAGS without a host device count, so that M takes effect), so the children
join through jax.distributed.initialize and run collectives over gloo.

Every output line is prefixed with its process, `[p0] ...`. The launcher exits 0
when every child does. When one fails, the others are stopped (SIGTERM to their
process groups, SIGKILL after --grace seconds) and the launcher exits with the
failed child's status (128+N for a child killed by signal N). SIGINT / SIGTERM
sent to the launcher go to every child (a training run saves and exits 0, all
processes at the same step); a second one kills them. Standard library only.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

# A child's output is copied line by line; the lock keeps lines from different children whole.
_OUTPUT_LOCK = threading.Lock()


def free_port() -> int:
    """A TCP port nobody listens on now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(base: dict[str, str], port: int, processes: int, index: int, devices: int | None) -> dict:
    env = dict(base)
    env.pop("MASKJAX_DISTRIBUTED", None)  # =0 would keep the children apart
    env.update(
        MASKJAX_COORDINATOR=f"127.0.0.1:{port}",
        MASKJAX_NUM_PROCESSES=str(processes),
        MASKJAX_PROCESS_ID=str(index),
        PYTHONUNBUFFERED="1",  # lines arrive as they are printed, not when a buffer fills
    )
    if devices is not None:
        env["MASKJAX_LOCAL_DEVICES"] = str(devices)
        env.setdefault("JAX_PLATFORMS", "cpu")
        flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", "")).split()
        if flags:
            env["XLA_FLAGS"] = " ".join(flags)
        else:
            env.pop("XLA_FLAGS", None)
    return env


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it if the launcher itself dies (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def _copy_lines(stream, prefix: bytes) -> None:
    out = sys.stdout.buffer
    for line in iter(stream.readline, b""):
        with _OUTPUT_LOCK:
            out.write(prefix + (line if line.endswith(b"\n") else line + b"\n"))
            out.flush()
    stream.close()


def _say(message: str) -> None:
    with _OUTPUT_LOCK:
        sys.stdout.buffer.write(f"[launch] {message}\n".encode())
        sys.stdout.buffer.flush()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM every running child's process group; SIGKILL what is left after `grace` seconds."""
    running = [p for p in procs if p.poll() is None]
    for p in running:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(p.poll() is None for p in running) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in running:
        _signal_group(p, signal.SIGKILL)  # also whatever the child started in its group
    for p in procs:
        p.wait()


def exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def launch(command: list[str], processes: int, devices: int | None, port: int | None, grace: float) -> int:
    """Run `command` as `processes` cooperating processes; the job's exit status."""
    port = port or free_port()
    procs: list[subprocess.Popen] = []
    for i in range(processes):
        proc = subprocess.Popen(
            command,
            env=child_env(dict(os.environ), port, processes, i, devices),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopping a child stops what it started too
            preexec_fn=_die_with_parent,  # spawned before any thread of ours starts
        )
        procs.append(proc)
        _say(f"p{i} pid {proc.pid}")
    readers = [
        threading.Thread(target=_copy_lines, args=(p.stdout, f"[p{i}] ".encode()), daemon=True)
        for i, p in enumerate(procs)
    ]
    for r in readers:
        r.start()

    interrupted = []

    def forward(signum, frame):
        interrupted.append(signum)
        sig = signal.SIGTERM if len(interrupted) == 1 else signal.SIGKILL
        for p in procs:
            if p.poll() is None:
                _signal_group(p, sig)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = 0
        while True:
            failed = [(i, p) for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                i, p = failed[0]
                status = exit_status(p.returncode)
                _say(f"p{i} exited with status {status}; stopping the others")
                stop(procs, grace)
                break
            if all(p.poll() == 0 for p in procs):
                break
            time.sleep(0.05)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for r in readers:
        r.join(timeout=5)
    return status


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--processes", type=int, required=True, help="Processes in the job (N).")
    parser.add_argument(
        "--devices-per-process", type=int, default=None, help="CPU devices each process emulates (M)."
    )
    parser.add_argument("--port", type=int, default=None, help="Coordinator port (default: a free one).")
    parser.add_argument("--grace", type=float, default=10.0, help="Seconds from SIGTERM to SIGKILL.")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command or args.processes < 1:
        parser.error("need --processes >= 1 and a command after --")
    return launch(command, args.processes, args.devices_per_process, args.port, args.grace)


if __name__ == "__main__":
    sys.exit(main())
