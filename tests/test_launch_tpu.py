"""launch/tpu.py without gcloud: the dry-run plan of a v3-128 MAE job, hostile values passed through two real
shells (`bash -c` of the printed line, then `bash -c` of its --command=) into a stub `maskjax`, and the real
execution path run against a fake `gcloud` that logs its argv: it runs exactly the dry-run commands, deletes
the slice after a failure or SIGTERM, and never deletes a slice it failed to create; against a fake spot
slice preempted on cue, --max-restarts recreates it and reruns the same train command; gives up after N."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from launch import tpu  # noqa: E402

LAUNCHER = [sys.executable, str(REPO / "launch" / "tpu.py")]
ZONE = "europe-west4-a"
MAE = ["--name=mae-l", f"--zone={ZONE}", "--accelerator=v3-128", "--config=configs/mae_vit_large.py"]
HOSTILE_WORKDIR = "gs://b/run; rm -rf ~ $(touch {pwned}) 'x\""
HOSTILE_OVERRIDES = [
    "--config.model.name=a;b $(touch {pwned}) \"q\" 'r'",
    "--config.optimizer.base_lr=`touch {pwned}`",
    "--config.data.path=$HOME/x && touch {pwned} || echo \\",
    "--config.note= two  spaces * ? [a] {{b,c}} > {pwned}",
]

FAKE_GCLOUD = """#!{python}
import json, os, subprocess, sys, time
argv = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(["gcloud", *argv]) + "\\n")
line = " ".join(argv)
if os.environ.get("FAKE_GCLOUD_FAIL") and os.environ["FAKE_GCLOUD_FAIL"] in line:
    sys.exit(7)
if os.environ.get("FAKE_GCLOUD_SLEEP") and os.environ["FAKE_GCLOUD_SLEEP"] in line:
    time.sleep(60)
if "describe" in argv:
    print(os.environ.get("FAKE_GCLOUD_STATE", "ACTIVE"))
if "ssh" in argv and os.environ.get("FAKE_WORKER_HOME"):
    # Play the worker: its sshd hands the --command string to the login shell.
    command = next(a for a in argv if a.startswith("--command="))[len("--command="):]
    env = {{"HOME": os.environ["FAKE_WORKER_HOME"], "PATH": "/usr/bin:/bin"}}
    sys.exit(subprocess.call(["bash", "-c", command], env=env))
"""

# A slice with a state file: `create` makes it ACTIVE, `delete` removes it (then `describe` fails, as for a
# NOT_FOUND), and scp/ssh fail with 255 unless it is ACTIVE. The first $FAKE_PREEMPTIONS commands containing
# $FAKE_PREEMPT_ON exit 255 and leave the slice in $FAKE_PREEMPTED_STATE ("" = gone).
PREEMPTIBLE_GCLOUD = """
import json, os, sys
argv = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(["gcloud", *argv]) + "\\n")
path = os.environ["FAKE_SLICE"]
with open(path) as f:
    tpu = json.load(f)
status = 0
if "queued-resources" in argv and "create" in argv:
    tpu["state"] = "ACTIVE"
elif "queued-resources" in argv and "delete" in argv:
    tpu["state"] = None
elif "describe" in argv:
    if tpu["state"] is None:
        sys.exit(1)
    print(tpu["state"])
elif tpu["state"] != "ACTIVE":
    status = 255
elif os.environ["FAKE_PREEMPT_ON"] in " ".join(argv):
    tpu["hits"] += 1
    if tpu["hits"] <= int(os.environ["FAKE_PREEMPTIONS"]):
        tpu["state"] = os.environ["FAKE_PREEMPTED_STATE"] or None
        status = 255
with open(path, "w") as f:
    json.dump(tpu, f)
sys.exit(status)
"""

# Records what `maskjax` receives on the "worker": argv, cwd and the environment the launcher promises.
STUB_MASKJAX = """#!{python}
import json, os, sys
keys = ("MASKJAX_DISTRIBUTED", "JAX_PLATFORMS", "MASKJAX_DATA_DIR")
with open({out!r}, "w") as f:
    json.dump({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {{k: os.environ.get(k) for k in keys}}}}, f)
"""


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A checkout holding the MAE config (written by another part of the project; a stand-in here)."""
    src = tmp_path / "src"
    (src / "configs").mkdir(parents=True)
    (src / "configs" / "mae_vit_large.py").write_text("def get_config(): ...\n")
    (src / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    (src / "maskjax").mkdir()
    (src / "maskjax" / "__init__.py").write_text("")
    for junk in (".venv/bin/python", "maskjax/__pycache__/x.pyc", "maskjax.egg-info/PKG-INFO", ".git/HEAD"):
        (src / junk).parent.mkdir(parents=True, exist_ok=True)
        (src / junk).write_text("junk")
    return src


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """The launcher's environment: a fake gcloud first on PATH, TMPDIR (where the archive goes) in tmp."""
    bin_dir = tmp_path / "bin"
    executable(bin_dir / "gcloud", FAKE_GCLOUD.format(python=sys.executable))
    (tmp_path / "tmp").mkdir()
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "TMPDIR": str(tmp_path / "tmp"),
        "FAKE_GCLOUD_LOG": str(tmp_path / "gcloud.jsonl"),
    }


@pytest.fixture
def spot(env, tmp_path) -> dict[str, str]:
    """`env` with PREEMPTIBLE_GCLOUD as gcloud; no slice yet, preempted during training unless changed."""
    executable(Path(env["PATH"].split(os.pathsep)[0]) / "gcloud", f"#!{sys.executable}\n{PREEMPTIBLE_GCLOUD}")
    (tmp_path / "slice.json").write_text(json.dumps({"state": None, "hits": 0}))
    return {
        **env,
        "FAKE_SLICE": str(tmp_path / "slice.json"),
        "FAKE_PREEMPT_ON": "exec maskjax",
        "FAKE_PREEMPTIONS": "1",
        "FAKE_PREEMPTED_STATE": "SUSPENDED",
    }


def launch(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCHER, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)


def printed_commands(stdout: str) -> list[list[str]]:
    """The dry run's commands, parsed as the local shell would."""
    return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


def gcloud_calls(env: dict[str, str]) -> list[list[str]]:
    log = Path(env["FAKE_GCLOUD_LOG"])
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def remote_command(argv: list[str]) -> str:
    (command,) = [a for a in argv if a.startswith("--command=")]
    return command[len("--command=") :]


def test_dry_run_of_a_v3_128_mae_job(checkout, env, tmp_path):
    out = launch(
        "run",
        *MAE,
        "--workdir=gs://bucket/run",
        "--config.optimizer.base_lr=1.5e-4",
        "--spot",
        f"--source={checkout}",
        "--dry-run",
        env=env,
    )
    assert out.returncode == 0, out.stderr
    create, wait, copy, install, train, delete = printed_commands(out.stdout)
    qr = ["gcloud", "compute", "tpus", "queued-resources"]
    vm = ["gcloud", "compute", "tpus", "tpu-vm"]
    on_all = [f"--zone={ZONE}", "--worker=all", "--quiet"]
    assert create == qr + [
        "create",
        "mae-l",
        "--node-id=mae-l",
        "--accelerator-type=v3-128",
        "--runtime-version=tpu-ubuntu2204-base",
        "--spot",
        f"--zone={ZONE}",
    ]
    assert wait == qr + ["describe", "mae-l", "--format=value(state.state)", f"--zone={ZONE}"]
    archive = str(tmp_path / "tmp" / "maskjax-launch-mae-l.tar.gz")
    assert copy == vm + ["scp", archive, "mae-l:maskjax-src.tar.gz", *on_all]
    for ssh in (install, train):
        assert ssh[:6] == vm + ["ssh", "mae-l"] and ssh[6].startswith("--command=") and ssh[7:] == on_all
    assert delete == qr + ["delete", "mae-l", "--force", "--quiet", f"--zone={ZONE}"]

    # The workers install the copied checkout with jax[tpu] at the checkout's own jax pin.
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (jax_pin,) = [d for d in pins if d.startswith("jax==")]
    words = shlex.split(remote_command(install))
    assert f"jax[tpu]{jax_pin[3:]}" in words and "./maskjax[gcs]" in words and "maskjax-src.tar.gz" in words
    # ... and run `maskjax train` with the config path relative to the checkout root.
    words = shlex.split(remote_command(train))
    assert words[words.index("maskjax") :] == [
        "maskjax",
        "train",
        "--config=configs/mae_vit_large.py",
        "--workdir=gs://bucket/run",
        "--config.optimizer.base_lr=1.5e-4",
    ]
    assert "MASKJAX_DISTRIBUTED=1" in words and "JAX_PLATFORMS=tpu" in words
    assert not Path(archive).exists() and not Path(env["FAKE_GCLOUD_LOG"]).exists(), "a dry run ran something"


def test_hostile_values_reach_maskjax_intact_and_never_execute(checkout, env, tmp_path):
    pwned = tmp_path / "pwned"
    workdir = HOSTILE_WORKDIR.format(pwned=pwned)
    overrides = [o.format(pwned=pwned) for o in HOSTILE_OVERRIDES]
    data_dir = f"gs://d/$(touch {pwned})'"
    out = launch(
        "run",
        *MAE,
        f"--workdir={workdir}",
        *overrides,
        f"--env=MASKJAX_DATA_DIR={data_dir}",
        f"--source={checkout}",
        "--dry-run",
        env=env,
    )
    assert out.returncode == 0, out.stderr
    expected = ["train", "--config=configs/mae_vit_large.py", f"--workdir={workdir}", *overrides]
    train_line = [line for line in out.stdout.splitlines() if "exec maskjax" in line]
    assert len(train_line) == 1

    # Parsed twice, as the local shell and then the worker's shell would.
    words = shlex.split(remote_command(shlex.split(train_line[0])))
    assert words[words.index("maskjax") + 1 :] == expected

    # Really run both shells: the printed line in bash, whose fake gcloud hands --command= to bash on a
    # "worker" (a HOME holding the checkout folder and a venv whose `maskjax` records what it got).
    home = tmp_path / "home"
    (home / "maskjax").mkdir(parents=True)
    record = tmp_path / "maskjax_argv.json"
    executable(
        home / "maskjax-venv" / "bin" / "maskjax", STUB_MASKJAX.format(python=sys.executable, out=str(record))
    )
    worker_env = {**env, "FAKE_WORKER_HOME": str(home)}
    done = subprocess.run(
        ["bash", "-c", train_line[0]], env=worker_env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(record.read_text())
    assert got["argv"] == expected
    assert got["cwd"] == str(home / "maskjax")
    assert got["env"] == {"MASKJAX_DISTRIBUTED": "1", "JAX_PLATFORMS": "tpu", "MASKJAX_DATA_DIR": data_dir}
    assert not pwned.exists(), "a value was executed by a shell"


def test_run_executes_exactly_the_dry_run_commands(checkout, env):
    args = ["run", *MAE, "--workdir=gs://bucket/run", "--config.seed=1", f"--source={checkout}"]
    planned = printed_commands(launch(*args, "--dry-run", env=env).stdout)
    done = launch(*args, "--poll-seconds=0", env=env)
    assert done.returncode == 0, done.stderr
    assert gcloud_calls(env) == planned
    # The archive that was copied holds this checkout's files and none of its venv, caches or VCS data.
    archive = planned[2][5]
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["configs/mae_vit_large.py", "maskjax/__init__.py", "pyproject.toml"]


def test_a_failed_job_still_deletes_the_slice_and_returns_its_status(checkout, env):
    env["FAKE_GCLOUD_FAIL"] = "exec maskjax"
    done = launch("run", *MAE, "--workdir=gs://b/r", f"--source={checkout}", "--poll-seconds=0", env=env)
    assert done.returncode == 7
    calls = gcloud_calls(env)
    assert "exec maskjax" in " ".join(calls[-2]) and calls[-1][4] == "delete"


def test_a_failed_create_deletes_nothing(checkout, env):
    env["FAKE_GCLOUD_FAIL"] = "queued-resources create"
    done = launch("run", *MAE, "--workdir=gs://b/r", f"--source={checkout}", "--poll-seconds=0", env=env)
    assert done.returncode == 1 and "--reuse" in done.stderr
    assert [c[4] for c in gcloud_calls(env)] == ["create"]


def test_reuse_skips_create_and_keep_skips_delete(checkout, env):
    args = ["run", *MAE, "--workdir=gs://b/r", f"--source={checkout}", "--reuse", "--keep"]
    planned = printed_commands(launch(*args, "--dry-run", env=env).stdout)
    assert [c[4] for c in planned] == ["describe", "create", "describe", "scp", "ssh", "ssh"]
    done = launch(*args, "--poll-seconds=0", env=env)  # the fake answers ACTIVE: the slice exists
    assert done.returncode == 0, done.stderr
    assert gcloud_calls(env) == [planned[0], *planned[2:]]


def test_sigterm_during_training_deletes_the_slice(checkout, env):
    env["FAKE_GCLOUD_SLEEP"] = "exec maskjax"
    args = ["run", *MAE, "--workdir=gs://b/r", f"--source={checkout}", "--poll-seconds=0"]
    proc = subprocess.Popen([*LAUNCHER, *args], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not any("exec maskjax" in " ".join(c) for c in gcloud_calls(env)):
        assert time.monotonic() < deadline and proc.poll() is None, "training never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert gcloud_calls(env)[-1][4] == "delete"


def test_dry_run_shows_the_restart_loop_only_with_max_restarts(checkout, env):
    args = ["run", *MAE, "--workdir=gs://b/r", "--spot", f"--source={checkout}", "--dry-run"]
    once = launch(*args, env=env)
    assert once.returncode == 0, once.stderr
    once_notes = " ".join(line for line in once.stdout.splitlines() if line[:4] in ("# 5.", "# 6.", "# 7."))
    assert once_notes.startswith("# 5. train") and "# 6. delete the slice" in once_notes  # the last step
    assert "preempt" not in once_notes and "repeat steps" not in once_notes and "restart" not in once_notes
    looped = launch(*args, "--max-restarts=2", env=env)
    assert looped.returncode == 0, looped.stderr
    commands = printed_commands(looped.stdout)
    assert commands[:5] + commands[-1:] == printed_commands(once.stdout)
    check, restart = commands[5:7]
    assert check == commands[1] and restart == commands[-1]  # a state describe, a delete
    notes = [line for line in looped.stdout.splitlines() if line.startswith("# ")]
    assert notes[-3].startswith("# 6. only if step 2, 3, 4 or 5 fails: the slice's state; ACTIVE")
    assert "SUSPENDED" in notes[-3] and "PREEMPTED" in notes[-3] and "go on with 7" in notes[-3]
    assert notes[-2].startswith("# 7. only after a preemption: delete what is left of the slice")
    assert "repeat steps 1-6 with the same train command and workdir" in notes[-2]
    assert "at most 2 restarts (--max-restarts)" in notes[-2]
    # With --reuse the probe comes first and is not part of the loop.
    reused = launch(*args, "--max-restarts=1", "--reuse", env=env).stdout
    assert "repeat steps 2-7 (--reuse: a new slice, no probe)" in reused and "at most 1 restart " in reused


def train_calls(calls: list[list[str]]) -> list[list[str]]:
    return [c for c in calls if "exec maskjax" in " ".join(c)]


@pytest.mark.parametrize("state", ["SUSPENDED", "PREEMPTED"])
def test_a_preempted_run_is_recreated_and_resumed_with_the_same_command(checkout, spot, state):
    spot["FAKE_PREEMPTED_STATE"] = state
    args = ["run", *MAE, "--workdir=gs://b/r", "--spot", f"--source={checkout}", "--max-restarts=2"]
    create, wait, copy, install, train, check, restart, delete = printed_commands(
        launch(*args, "--dry-run", env=spot).stdout
    )
    done = launch(*args, "--poll-seconds=0", env=spot)
    assert done.returncode == 0, done.stderr
    calls = gcloud_calls(spot)
    assert calls == [
        create,
        wait,
        copy,
        install,
        train,
        check,
        restart,
        create,
        wait,
        copy,
        install,
        train,
        delete,
    ]
    first, second = train_calls(calls)
    assert first == second and "--workdir=gs://b/r" in remote_command(second)
    assert f"preempted (state {state}) during train: restart 1/2" in done.stderr


def test_preempted_every_time_gives_up_after_max_restarts(checkout, spot):
    spot["FAKE_PREEMPTIONS"] = "99"
    args = ["run", *MAE, "--workdir=gs://b/r", "--spot", f"--source={checkout}", "--max-restarts=1"]
    create, wait, copy, install, train, check, restart, delete = printed_commands(
        launch(*args, "--dry-run", env=spot).stdout
    )
    done = launch(*args, "--poll-seconds=0", env=spot)
    assert done.returncode == 1
    calls = gcloud_calls(spot)
    assert len(train_calls(calls)) == 2
    attempt = [create, wait, copy, install, train, check]
    assert calls == [*attempt, restart, *attempt, delete]
    assert "restart 1/1" in done.stderr and "restart 2/" not in done.stderr
    assert "preempted (state SUSPENDED) during train, and all 1 restarts (--max-restarts) are used up" in (
        done.stderr
    )


def test_a_failure_on_an_active_slice_is_not_retried(checkout, spot):
    spot["FAKE_PREEMPTED_STATE"] = "ACTIVE"  # the program itself fails (e.g. a config error)
    args = ["run", *MAE, "--workdir=gs://b/r", "--spot", f"--source={checkout}", "--max-restarts=3"]
    create, wait, copy, install, train, check, restart, delete = printed_commands(
        launch(*args, "--dry-run", env=spot).stdout
    )
    done = launch(*args, "--poll-seconds=0", env=spot)
    assert done.returncode == 255
    assert gcloud_calls(spot) == [create, wait, copy, install, train, check, delete]
    assert "the slice is ACTIVE: the failure is the program's own, not retried" in done.stderr
    assert "restart" not in done.stderr


def test_a_slice_gone_during_install_is_recreated_also_with_reuse(checkout, spot, tmp_path):
    (tmp_path / "slice.json").write_text(json.dumps({"state": "ACTIVE", "hits": 0}))  # it exists: reused
    spot["FAKE_PREEMPT_ON"] = "tar -xzf"
    spot["FAKE_PREEMPTED_STATE"] = ""  # the node vanishes
    args = ["run", *MAE, "--workdir=gs://b/r", f"--source={checkout}", "--reuse", "--max-restarts=1"]
    probe, create, wait, copy, install, train, check, restart, delete = printed_commands(
        launch(*args, "--dry-run", env=spot).stdout
    )
    done = launch(*args, "--poll-seconds=0", env=spot)
    assert done.returncode == 0, done.stderr
    tries = [install] * tpu.RETRIES
    # Nothing left to delete: the restart goes straight to a new create.
    assert gcloud_calls(spot) == [
        probe,
        wait,
        copy,
        *tries,
        check,
        create,
        wait,
        copy,
        install,
        train,
        delete,
    ]
    assert "preempted (the slice is gone) during install: restart 1/1" in done.stderr


@pytest.mark.parametrize(
    ("flag", "bad", "says"),
    [
        ("--name", "--name=Mae_L", "--name='Mae_L' is not valid: expected 1-63 lowercase"),
        ("--zone", "--zone=europe-west4", "--zone='europe-west4' is not valid: expected a zone like"),
        ("--accelerator", "--accelerator=v3_128", "--accelerator='v3_128' is not valid: expected a TPU type"),
        ("--accelerator", "--accelerator=v9x-8", "--runtime-version: no default for v9x"),
        ("--workdir", "--workdir=/tmp/run", "--workdir='/tmp/run' must be gs://BUCKET/PATH"),
        ("--workdir", "--workdir=gs://b/a\nb", "--workdir: 'gs://b/a\\nb' contains a control character"),
        ("--config", "--config=configs/missing.py", "--config=configs/missing.py: no such file"),
        (None, "--bogus=1", "unrecognized argument '--bogus=1': after the launcher's flags only config"),
        (None, "--env=1X=y", "--env='1X=y' is not valid: expected KEY=VALUE"),
        (None, "--max-restarts=-1", "--max-restarts='-1' is not valid: expected an integer >= 0"),
        (None, "--max-restarts=two", "--max-restarts='two' is not valid: expected an integer >= 0"),
    ],
)
def test_bad_values_are_refused_naming_the_flag(checkout, capsys, flag, bad, says):
    args = ["run", *MAE, "--workdir=gs://b/r", f"--source={checkout}", "--dry-run"]
    if flag:
        args = [a for a in args if not a.startswith(flag + "=")]
    assert tpu.main([*args, bad]) == 2
    out = capsys.readouterr()
    assert says in out.err and out.out == ""


def test_the_config_must_be_inside_the_checkout_and_keeps_its_variant(checkout, tmp_path, capsys):
    outside = tmp_path / "elsewhere.py"
    outside.write_text("")
    base = ["run", *MAE[:3], "--workdir=gs://b/r", f"--source={checkout}", "--dry-run"]
    assert tpu.main([*base, f"--config={outside}"]) == 2
    assert "is outside the checkout" in capsys.readouterr().err
    assert tpu.main([*base, "--config=configs/mae_vit_large.py:variant=L/16"]) == 0
    assert "--config=configs/mae_vit_large.py:variant=L/16 " in capsys.readouterr().out


def test_status_and_delete_plans():
    s = tpu.Slice("mae-l", ZONE, "my-project")
    qr = ["gcloud", "compute", "tpus", "queued-resources"]
    flags = [f"--zone={ZONE}", "--project=my-project"]
    assert [list(x.argv) for x in tpu.status_plan(s)] == [qr + ["describe", "mae-l", *flags]]
    assert [list(x.argv) for x in tpu.delete_plan(s)] == [
        qr + ["delete", "mae-l", "--force", "--quiet", *flags]
    ]


def test_a_git_checkout_sends_uncommitted_files_and_skips_ignored_ones():
    files = tpu.source_files(REPO)
    assert "maskjax/cli.py" in files and "pyproject.toml" in files
    assert "tests/test_launch_tpu.py" in files  # new files travel before they are committed
    assert not any(f.startswith(".venv/") or "__pycache__" in f for f in files)


@pytest.mark.skipif(
    not (REPO / "configs" / "mae_vit_large.py").exists(), reason="paper config not written yet"
)
def test_dry_run_from_this_checkout_with_the_paper_config(capsys):
    assert tpu.main(["run", *MAE, "--workdir=gs://bucket/run", "--spot", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"pack the files of {REPO} " in out and "--config=configs/mae_vit_large.py " in out
    assert "configs/mae_vit_large.py" in tpu.source_files(REPO)  # not ignored: it reaches the workers
