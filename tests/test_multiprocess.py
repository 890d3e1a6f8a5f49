"""Several processes on this machine, joined by jax.distributed.initialize, train as one job.

2 processes x 4 CPU devices (launch/local.py) must give the losses of 1 process x 8 devices, write a
checkpoint that 1 process x 4 devices resumes, and a process that dies (or never comes) must end the
job with an error, never a hang.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny_configs import config_file, damage_middle_half, tiny
from tiny_configs import train_command as _train

from maskjax import train

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, str(ROOT / "launch" / "local.py")]
# Steps 1-3 have the same learning rate whether a run has 3 or 6 steps (2 warmup steps, then
# cosine from the peak), so a 3-step run continued to 6 must match an uninterrupted 6-step run.
FIRST, TOTAL = 3, 6
JOB_VARIABLES = [
    f"MASKJAX_{name}"
    for name in ("COORDINATOR", "NUM_PROCESSES", "PROCESS_ID", "LOCAL_DEVICES", "DISTRIBUTED")
    + ("INIT_TIMEOUT", "HEARTBEAT_TIMEOUT", "SHUTDOWN_TIMEOUT")
]


def _env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """The test's environment minus conftest's 8 host devices (a child sets its own)."""
    env = {k: v for k, v in os.environ.items() if k not in JOB_VARIABLES}
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", "")).split()
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    if not flags:  # XLA reads a blank XLA_FLAGS as a file name and aborts
        env.pop("XLA_FLAGS")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return {**env, **extra}


def _rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(workdir) if "split" not in r}


def _knn(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["knn_top1"] for r in _rows(workdir) if r.get("split") == "evals"}


# The k-NN evaluator runs inside the loop too (every process computes the features on the mesh).
EVALS = {"evals.knn.every": FIRST, "evals.train_examples": 256, "evals.test_examples": 64}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> dict[str, dict[int, float]]:
    """1 process x 8 devices (this one), 6 steps: {"loss": {step: loss}, "knn": {step: top-1}}."""
    workdir = tmp_path_factory.mktemp("reference")
    train.train(
        tiny("mae", data_dir, total_steps=TOTAL, eval_every=100, checkpoint_every=100, **EVALS), workdir
    )
    return {"loss": _losses(workdir), "knn": _knn(workdir)}


def test_2x4_processes_match_1x8_and_resume_on_1x4(data_dir, reference, tmp_path):
    workdir = tmp_path / "run"
    first = config_file(
        tmp_path, "mae", data_dir, total_steps=FIRST, eval_every=100, checkpoint_every=FIRST, **EVALS
    )
    launched = subprocess.run(
        [*LAUNCH, "--processes=2", "--devices-per-process=4", "--", *_train(first, workdir)],
        env=_env(devices=8),  # the launcher must override the 8 host devices conftest asks for
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = launched.stdout
    assert launched.returncode == 0, out[-5000:]
    for p in ("p0", "p1"):  # both processes ran every step
        assert re.search(rf"^\[{p}\] step {FIRST}/{FIRST} ", out, re.M), out[-3000:]
    params = workdir / "checkpoints" / str(FIRST) / "params"
    assert (params / "commit_success.txt").exists()
    # orbax's record of the checkpoint: both processes wrote their shards, over one mesh of 8 devices.
    assert (params / "ocdbt.process_0").exists() and (params / "ocdbt.process_1").exists()
    mesh = json.loads(next(iter(json.loads((params / "_sharding").read_text()).values())))
    assert mesh["shape"] == [8, 1, 1] and len(re.findall(r'"id"', json.dumps(mesh["device_mesh"]))) == 8
    two_by_four = _losses(workdir)
    # Written by process 0 alone: one row per step, one eval row, k-NN at 0 and 3, the report.
    assert [r["step"] for r in _rows(workdir)] == [0, 1, 2, 3, 3, 3]
    knn = _knn(workdir)
    assert sorted(knn) == [0, FIRST]
    for s in knn:  # the same features as on 1 x 8 devices, up to rounding (one vote of 64 may flip)
        assert knn[s] == pytest.approx(reference["knn"][s], abs=1.5 / 64), (s, knn[s], reference["knn"])
    assert (workdir / "report.json").exists()
    # Same global batch and per-device rows as 1 x 8; only the cross-process (gloo) sums round
    # differently: here steps 1-2 match bit for bit and step 3 by one float32 ulp.
    assert sorted(two_by_four) == [1, 2, 3]
    for s in two_by_four:
        ref = reference["loss"][s]
        assert two_by_four[s] == pytest.approx(ref, rel=1e-6), (s, two_by_four[s], ref)

    # The 2-process checkpoint, resumed by a single process with 4 devices.
    rest = config_file(tmp_path, "mae", data_dir, total_steps=TOTAL, eval_every=100, checkpoint_every=100)
    resumed = subprocess.run(
        _train(rest, workdir), env=_env(devices=4), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    assert f"resumed from step {FIRST}" in resumed.stdout
    after = _losses(workdir)
    assert sorted(after) == list(range(1, TOTAL + 1))
    # 4 devices reduce the batch in another order than 8: equal to rounding, not to the bit.
    for s in range(FIRST + 1, TOTAL + 1):
        assert after[s] == pytest.approx(reference["loss"][s], rel=1e-5), (s, after[s], reference["loss"][s])


def _start_launcher(command: list[str], log: Path, **flags) -> tuple[subprocess.Popen, dict[str, int]]:
    """launch/local.py with 2 x 4 devices, output to `log`; returns it and its children's pids."""
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*LAUNCH, "--processes=2", "--devices-per-process=4", *args, "--", *command],
            env=_env(devices=8),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while len(pids := dict(re.findall(r"^\[launch\] (p\d) pid (\d+)$", log.read_text(), re.M))) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)
    return proc, {k: int(v) for k, v in pids.items()}


def _wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert all(p.poll() is None for p in procs), "a process ended early"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_killed_process_stops_the_launched_job(data_dir, tmp_path):
    config = config_file(
        tmp_path, "mae", data_dir, total_steps=10_000, eval_every=10_000, checkpoint_every=10_000
    )
    workdir = tmp_path / "run"
    launcher, pids = _start_launcher(_train(config, workdir), tmp_path / "log.txt", grace=2)
    try:
        # config.json is written once every process has joined the job and built its Trainer.
        _wait_for(workdir / "config.json", [launcher])
        os.kill(pids["p1"], signal.SIGKILL)
        killed = time.monotonic()
        launcher.wait(timeout=60)
        took = time.monotonic() - killed
    finally:
        launcher.kill()
        launcher.wait()
    output = (tmp_path / "log.txt").read_text()
    # Whichever the launcher reaps first — p1 (killed) or p0 (its collective failed) — the job fails.
    assert launcher.returncode in (1, 128 + signal.SIGKILL), output[-3000:]
    assert "exited with status" in output and "stopping the others" in output
    assert took < 30, f"the launcher needed {took:.0f}s to stop the job"
    assert not _alive(pids["p0"]) and not _alive(pids["p1"]), "a child outlived the launcher"


def test_sigterm_to_one_process_stops_every_process_at_the_same_step(data_dir, tmp_path):
    """As when one host of a pod is preempted: all save the same step, jointly, and exit 0."""
    config = config_file(
        tmp_path, "mae", data_dir, total_steps=10_000, eval_every=10_000, checkpoint_every=10_000
    )
    workdir, log = tmp_path / "run", tmp_path / "log.txt"
    launcher, pids = _start_launcher(_train(config, workdir), log)
    try:
        _wait_for(workdir / "metrics.jsonl", [launcher])
        os.kill(pids["p1"], signal.SIGTERM)
        launcher.wait(timeout=120)
    finally:
        launcher.kill()
        launcher.wait()
    output = log.read_text()
    assert launcher.returncode == 0, output[-3000:]
    saved = dict(re.findall(r"^\[(p\d)\] SIGTERM: saved step (\d+), exiting$", output, re.M))
    assert saved.keys() == {"p0", "p1"} and saved["p0"] == saved["p1"], output[-3000:]
    step = int(saved["p0"])
    assert [p.name for p in (workdir / "checkpoints").iterdir()] == [str(step)]
    assert (workdir / "checkpoints" / str(step) / "commit_success.txt").exists()
    assert _rows(workdir)[-1]["step"] == step


def _by_hand(command: list[str], process_id: int, port: int, log: Path, **env: str) -> subprocess.Popen:
    """One process of a 2-process job started as a user would, with no launcher watching it."""
    with open(log, "w") as out:
        return subprocess.Popen(
            command,
            env=_env(
                MASKJAX_COORDINATOR=f"127.0.0.1:{port}",
                MASKJAX_NUM_PROCESSES="2",
                MASKJAX_PROCESS_ID=str(process_id),
                MASKJAX_LOCAL_DEVICES="4",
                **env,
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_process_whose_peer_never_comes_exits_with_an_error(data_dir, tmp_path):
    config, log = config_file(tmp_path, "mae", data_dir), tmp_path / "p0.txt"
    alone = _by_hand(_train(config, tmp_path / "run"), 0, _free_port(), log, MASKJAX_INIT_TIMEOUT="3")
    alone.wait(timeout=120)
    assert alone.returncode != 0, log.read_text()[-3000:]
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("death", ["sigkill", "exception"])
def test_a_process_whose_peer_dies_exits_with_an_error(death, data_dir, tmp_path):
    """No launcher: the coordination service notices the missing heartbeats and aborts the survivor.

    A peer failing with an exception must end at once too, not in JAX's graceful shutdown, which
    would wait up to MASKJAX_SHUTDOWN_TIMEOUT for a survivor that is itself waiting for it.
    """
    config = config_file(
        tmp_path, "mae", data_dir, total_steps=10_000, eval_every=10_000, checkpoint_every=10_000
    )
    workdir, port = tmp_path / "run", _free_port()
    commands = [_train(config, workdir), _train(config, workdir)]
    if death == "exception":
        commands[1] = _train(tmp_path / "no_such_config.py", workdir)
    procs = [
        _by_hand(commands[i], i, port, tmp_path / f"p{i}.txt", MASKJAX_HEARTBEAT_TIMEOUT="3") for i in (0, 1)
    ]
    try:
        if death == "sigkill":
            _wait_for(workdir / "config.json", procs)
            procs[1].kill()
        died = time.monotonic()
        procs[1].wait(timeout=60)
        procs[0].wait(timeout=90)
        took = time.monotonic() - died
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[1].returncode != 0 and procs[0].returncode != 0, (tmp_path / "p0.txt").read_text()[-3000:]
    assert took < 60, f"the processes needed {took:.0f}s to give up"


def _launch_2x4(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*LAUNCH, "--processes=2", "--devices-per-process=4", "--", *command],
        env=_env(devices=8),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_2x4_processes_skip_and_stop_together_when_the_run_diverges(data_dir, tmp_path):
    """lr 1e4: the loss is global, so both processes skip the same steps and stop at the same step,
    each with the one line naming it; the last finite checkpoint restores with finite parameters."""
    config = config_file(
        tmp_path,
        "mae",
        data_dir,
        total_steps=30,
        checkpoint_every=1,
        keep_checkpoints=2,
        eval_every=1000,
        **{"schedule.warmup_steps": 1, "optimizer.base_lr": 1e4},
    )
    workdir = tmp_path / "run"
    launched = _launch_2x4(_train(config, workdir))
    out = launched.stdout
    assert launched.returncode == 1, out[-5000:]
    assert "Traceback" not in out, out[-5000:]
    stops = dict(
        re.findall(r"^\[(p\d)\] maskjax train: step (\d+): the (?:loss|gradient) is not finite", out, re.M)
    )
    assert stops.keys() == {"p0", "p1"} and stops["p0"] == stops["p1"], out[-5000:]
    stop = int(stops["p0"])
    # Each process logged the same steps, and none reached the stop (its flags are read before its line).
    for p in ("p0", "p1"):
        steps = [int(s) for s in re.findall(rf"^\[{p}\] step (\d+)/30 ", out, re.M)]
        assert steps == list(range(1, stop)), (p, steps)
    # Saved every step, the step before the stop already holds the state the skipped steps left alone:
    # nothing more is saved at the stop (it would only rotate an older checkpoint away).
    last = int(re.search(r"the last finite checkpoint: step (\d+)", out).group(1))
    assert last == stop - 1
    from maskjax import checkpoint

    _, _, params = checkpoint.load_params(workdir, last)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    skipped = [r["skipped_steps"] for r in _rows(workdir) if "skipped_steps" in r]
    assert skipped[-1] >= 2


def test_2x4_processes_fall_back_together_from_a_damaged_checkpoint(data_dir, tmp_path):
    """Step 4's parameters, written by two processes, damaged on disk: both processes read the same
    verdict (the fingerprints are of the global arrays), resume from step 2 and train on."""
    workdir = tmp_path / "run"
    first = config_file(tmp_path, "mae", data_dir, total_steps=4, checkpoint_every=2, eval_every=1000)
    assert _launch_2x4(_train(first, workdir)).returncode == 0
    for i, path in enumerate(sorted((workdir / "checkpoints" / "4" / "params").rglob("d/*"))):
        damage_middle_half(path, np.random.default_rng(i))
    longer = config_file(tmp_path, "mae", data_dir, total_steps=6, checkpoint_every=2, eval_every=1000)
    launched = _launch_2x4(_train(longer, workdir))
    out = launched.stdout
    assert launched.returncode == 0, out[-5000:]
    assert re.search(r"^\[p0\] checkpoint step 4 is damaged \(params.*; trying step 2$", out, re.M), out[
        -5000:
    ]
    for p in ("p0", "p1"):
        assert re.search(rf"^\[{p}\] resumed from step 2$", out, re.M), out[-5000:]
        assert re.search(rf"^\[{p}\] step 6/6 ", out, re.M), out[-5000:]
    assert [p.name.split("-")[0] for p in (workdir / "checkpoints-damaged").iterdir()] == ["4"]


def test_damage_that_one_process_alone_reads_ends_the_job_and_the_rerun_falls_back(data_dir, tmp_path):
    """Parameters sharded over both processes (fsdp 8): step 4's shards of process 1, damaged, fail
    to read on process 1 alone, while process 0 reads its own and waits in orbax's restore. No
    fallback can reach process 0 there: the job must end (never hang) with process 1's one line,
    which names the step and moves it aside, so that the rerun resumes from step 2."""
    workdir = tmp_path / "run"
    mesh = {"data": 1, "fsdp": 8, "tensor": 1}
    first = config_file(
        tmp_path, "mae", data_dir, total_steps=4, checkpoint_every=2, eval_every=1000, mesh=mesh
    )
    assert _launch_2x4(_train(first, workdir)).returncode == 0
    own = sorted((workdir / "checkpoints" / "4" / "params" / "ocdbt.process_1").rglob("d/*"))
    assert own, "process 1 wrote no shards of its own"
    for i, path in enumerate(own):
        damage_middle_half(path, np.random.default_rng(i))
    longer = config_file(
        tmp_path, "mae", data_dir, total_steps=6, checkpoint_every=2, eval_every=1000, mesh=mesh
    )
    started = time.monotonic()
    launched = subprocess.run(
        [*LAUNCH, "--processes=2", "--devices-per-process=4", "--grace=5", "--", *_train(longer, workdir)],
        env=_env(devices=8, MASKJAX_VOTE_TIMEOUT="10", MASKJAX_HEARTBEAT_TIMEOUT="10"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = launched.stdout
    assert launched.returncode != 0 and time.monotonic() - started < 240, out[-5000:]
    line = re.search(
        r"^\[p1\] maskjax train: checkpoint step 4 is damaged \(params cannot be read: .*$", out, re.M
    )
    assert line, out[-5000:]
    assert "on process 1, and process 0 did not answer within 10 s" in line.group(0)
    assert "moved damaged step 4 to " in line.group(0) and "resumes from an earlier step" in line.group(0)
    assert [p.name.split("-")[0] for p in (workdir / "checkpoints-damaged").iterdir()] == ["4"]

    rerun = _launch_2x4(_train(longer, workdir))
    assert rerun.returncode == 0, rerun.stdout[-5000:]
    for p in ("p0", "p1"):
        assert re.search(rf"^\[{p}\] resumed from step 2$", rerun.stdout, re.M), rerun.stdout[-5000:]
        assert re.search(rf"^\[{p}\] step 6/6 ", rerun.stdout, re.M), rerun.stdout[-5000:]
