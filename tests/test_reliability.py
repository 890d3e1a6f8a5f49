"""Accidents a long run meets, done for real to a run on 8 emulated devices: a checkpoint damaged on
disk (a bad disk, an interrupted copy, a bucket sync mixing two steps) and a disk that fills up
during a save. Each must end in one clear line, and the last good checkpoint must restore."""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from tiny_configs import config_file, damage_middle_half, train_command

from maskjax import checkpoint

# Steps 4 and 8 are saved; the runs continued to 12 save 12.
FIRST = dict(total_steps=8, checkpoint_every=4, eval_every=1000, keep_checkpoints=5)


@pytest.fixture(scope="module")
def first_run(data_dir, tmp_path_factory) -> Path:
    """A finished 8-step MAE run (checkpoints 4 and 8), copied by each test that damages it."""
    tmp = tmp_path_factory.mktemp("first")
    workdir = tmp / "run"
    subprocess.run(
        train_command(config_file(tmp, "mae", data_dir, **FIRST), workdir),
        check=True,
        capture_output=True,
        timeout=600,
    )
    return workdir


def _copy(run: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "run"
    shutil.copytree(run, workdir)
    return workdir


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)


def _losses(workdir: Path) -> dict[int, float | None]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("split") != "eval"}


def _overwrite_the_arrays(item: Path, seed: int = 0) -> None:
    """The issue's accident: random bytes over the middle half of the files that hold the arrays.

    Not "the largest file of the item": which file that is varies from save to save, and it may be
    `_sharding` or a process's own OCDBT b-tree, neither of which a restore reads (the merged b-tree
    in `d/` replaces them), so damage there is rightly not seen. The arrays' chunks are in
    `ocdbt.process_*/d/`; damaging each of those files is sure to hit them."""
    files = sorted(item.glob("ocdbt.process_*/d/*"))
    assert files, f"no OCDBT data files under {item}"
    for i, path in enumerate(files):
        damage_middle_half(path, np.random.default_rng([seed, i]))


def test_a_damaged_checkpoint_falls_back_to_the_previous_step(data_dir, first_run, tmp_path):
    workdir = _copy(first_run, tmp_path)
    _overwrite_the_arrays(workdir / "checkpoints" / "8" / "params")
    longer = config_file(tmp_path, "mae", data_dir, **{**FIRST, "total_steps": 12})
    result = _run(*train_command(longer, workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    # One line names the step and the item (unreadable or not what was saved, as the bytes fall).
    assert "checkpoint step 8 is damaged (params" in out and "; trying step 4" in out, out
    assert "resumed from step 4" in out and "resumed from step 8" not in out
    # The damaged step is kept aside, not deleted, and the run saved a good step 8 again.
    aside = [p.name for p in (workdir / "checkpoints-damaged").iterdir()]
    assert len(aside) == 1 and aside[0].startswith("8-"), aside
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8, 12]
    losses = _losses(workdir)
    assert all(losses[s] is not None and math.isfinite(losses[s]) for s in range(5, 13)), losses
    _, _, params = checkpoint.load_params(workdir)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_files_of_another_step_are_caught_by_the_fingerprints_in_every_reader(first_run, tmp_path):
    """A sync that mixed two steps: step 8's params folder holds step 4's arrays. They read without
    error; only the fingerprints saved with step 8 can tell. export-hf, load_params and train all
    refuse step 8; without an explicit step they use step 4 and say so in one line."""
    workdir = _copy(first_run, tmp_path)
    step8 = workdir / "checkpoints" / "8" / "params"
    shutil.rmtree(step8)
    shutil.copytree(workdir / "checkpoints" / "4" / "params", step8)

    exported = _run(
        sys.executable, "-m", "maskjax", "export-hf", f"--workdir={workdir}", f"--out={tmp_path / 'hf'}"
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    lines = [line for line in exported.stdout.splitlines() if "damaged" in line]
    assert len(lines) == 1 and "checkpoint step 8 is damaged (params: " in lines[0], exported.stdout
    assert "differ from what was saved" in lines[0] and "trying step 4" in lines[0]
    assert (tmp_path / "hf" / "model.safetensors").exists()

    _, _, latest = checkpoint.load_params(workdir)
    _, _, four = checkpoint.load_params(workdir, 4)
    assert all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(latest), jax.tree.leaves(four), strict=True)
    )

    asked = _run(
        sys.executable,
        "-m",
        "maskjax",
        "export-hf",
        f"--workdir={workdir}",
        "--step=8",
        f"--out={tmp_path / 'x'}",
    )
    assert asked.returncode == 1 and "Traceback" not in asked.stderr
    assert asked.stderr.strip().splitlines()[-1].startswith("maskjax export-hf: no checkpoint under ")
    assert "step 8: params: " in asked.stderr and not (tmp_path / "x").exists()
    # A reader moves nothing: the workdir is as it was.
    assert not (workdir / "checkpoints-damaged").exists() and (workdir / "checkpoints" / "8").exists()


def test_no_intact_checkpoint_stops_the_run_in_one_line_and_moves_nothing(data_dir, first_run, tmp_path):
    workdir = _copy(first_run, tmp_path)
    for step, seed in ((4, 1), (8, 2)):
        _overwrite_the_arrays(workdir / "checkpoints" / str(step) / "opt", seed)
    result = _run(*train_command(config_file(tmp_path, "mae", data_dir, **FIRST), workdir))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert (
        line.startswith("maskjax train: no checkpoint under ") and "reads back intact (nothing moved)" in line
    )
    assert "step 8: opt" in line and "step 4: opt" in line, line
    assert "no older checkpoint" in result.stdout
    # Nothing trained, nothing moved: a rerun finds the same two steps (it will not silently start over).
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "8"]
    assert not (workdir / "checkpoints-damaged").exists()


def _can_mount_a_small_filesystem() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_a_small_filesystem(), reason="needs `unshare -rm` to mount a tmpfs")
def test_a_full_disk_stops_the_run_in_one_line_and_the_last_checkpoint_restores(
    data_dir, first_run, tmp_path
):
    """The 8-step run's checkpoints/ on a tmpfs of its own (in a mount namespace), filled to the last
    byte, then the run continued to 16: saving step 12 fails. The run must stop naming step 12, the
    reason and the intact step 8; what is on the full disk then resumes from step 8, on a disk with
    room, with the losses of the same continuation on a disk that never filled up."""
    config = config_file(tmp_path, "mae", data_dir, **{**FIRST, "total_steps": 16})
    workdir, kept = _copy(first_run, tmp_path), tmp_path / "kept"
    small = shlex.quote(str(workdir / "checkpoints"))
    inside = (
        f"mount -t tmpfs -o size=16m tmpfs {small}"
        f" && cp -a {shlex.quote(str(first_run / 'checkpoints'))}/. {small}"
        f" && (dd if=/dev/zero of={small}/filler bs=4k 2>/dev/null; true)"
        f" && {shlex.join(train_command(config, workdir))}; echo exit=$? >&2;"
        f" rm {small}/filler; cp -a {small} {shlex.quote(str(kept))}"
    )
    result = _run("unshare", "-rm", "sh", "-c", inside)
    assert "exit=1" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr, result.stderr[
        -3000:
    ]
    line = [x for x in result.stderr.strip().splitlines() if x.startswith("maskjax train:")]
    assert len(line) == 1, result.stderr[-3000:]
    assert (
        line[0].startswith("maskjax train: step 12 could not be written (")
        and "No space left on device" in line[0]
    )
    assert "the last complete checkpoint: step 8 in " in line[0] and line[0].endswith("starts again)")
    # On the full disk: steps 4 and 8 whole, step 12 only a partial temporary folder.
    complete = sorted(p.name for p in kept.iterdir() if p.name.isdigit())
    partial = [p.name for p in kept.iterdir() if not p.name.isdigit()]
    assert (
        complete == ["4", "8"] and partial and all(n.startswith("12.orbax-checkpoint-tmp") for n in partial)
    )

    # The disk is bigger now: the same command resumes from step 8, cleans the partial step up,
    # and trains on with the losses the uninterrupted run has.
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(kept, resumed_dir / "checkpoints")
    resumed = _run(*train_command(config, resumed_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 8" in resumed.stdout
    assert not any(".orbax-checkpoint-tmp" in p.name for p in (resumed_dir / "checkpoints").iterdir())
    # The same continuation on a disk that never filled up: the same losses, to the bit.
    roomy = tmp_path / "roomy"
    shutil.copytree(first_run, roomy)
    subprocess.run(train_command(config, roomy), check=True, capture_output=True, timeout=600)
    expected, got = _losses(roomy), _losses(resumed_dir)
    assert sorted(got) == list(range(9, 17)) and all(got[s] == expected[s] for s in got), (got, expected)


def test_a_lost_fingerprint_item_counts_as_damage(data_dir, first_run, tmp_path):
    """A partial sync that dropped step 8's integrity folder: orbax's record of the step still names
    the item, so the step is not taken for an old one without fingerprints."""
    workdir = _copy(first_run, tmp_path)
    shutil.rmtree(workdir / "checkpoints" / "8" / "integrity")
    result = _run(
        *train_command(config_file(tmp_path, "mae", data_dir, **{**FIRST, "total_steps": 10}), workdir)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint step 8 is damaged (integrity cannot be read" in result.stdout, result.stdout
    assert "resumed from step 4" in result.stdout and "not verified" not in result.stdout


def test_a_config_that_builds_other_shapes_is_a_config_error_not_damage(data_dir, first_run, tmp_path):
    workdir = _copy(first_run, tmp_path)
    other = config_file(tmp_path, "mae", data_dir, **{**FIRST, "model.mlp_dim": 48})
    result = _run(*train_command(other, workdir))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert (
        line.startswith("maskjax train: checkpoint step 8 holds params/") and "resume with the config" in line
    )
    # Named with both layouts: the checkpoint's 64-wide MLP and this config's 48.
    assert re.search(r"as float32\[[^\]]*\b64\b[^\]]*\], this config builds float32\[[^\]]*\b48\b", line), (
        line
    )
    assert "damaged" not in result.stdout and not (workdir / "checkpoints-damaged").exists()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "8"]


def test_a_diverged_run_saves_its_last_good_state_where_it_stopped(data_dir, tmp_path):
    """lr 1e4 and no checkpoint due before the stop: the state the skipped steps left alone (after the
    last step that updated it) is saved at the stop step, finite, with the data position there, and
    the run resumes from it."""
    workdir = tmp_path / "run"
    flags = dict(total_steps=30, checkpoint_every=1000, keep_checkpoints=2, eval_every=1000)
    wild = {**flags, "schedule.warmup_steps": 1, "optimizer.base_lr": 1e4}
    result = _run(*train_command(config_file(tmp_path, "mae", data_dir, **wild), workdir))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    stop = int(re.search(r"^maskjax train: step (\d+): the (?:loss|gradient) is not finite", line).group(1))
    assert f"the last finite checkpoint: step {stop} in " in line, line
    _, _, params = checkpoint.load_params(workdir, stop)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    # Resumed (skipping on, with more patience), it starts right after the stop.
    patient = {**wild, "total_steps": stop + 2, "max_nonfinite_steps": 100}
    resumed = _run(*train_command(config_file(tmp_path, "mae", data_dir, **patient), workdir))
    assert resumed.returncode == 0 and f"resumed from step {stop}" in resumed.stdout, resumed.stderr[-3000:]
    assert max(_losses(workdir)) == stop + 2
