"""`maskjax` as a user types it: help for every command, a mistyped command, and a run that stays quiet."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags

from maskjax import cli

REPO = Path(__file__).resolve().parents[1]
# absl's own flags: a command's help that lists them has drowned the command's flags again.
ABSL_FLAGS = ("--pdb_post_mortem", "--logtostderr", "--only_check_args", "--run_with_profiling", "--helpxml")


def _maskjax(*args: str, env: dict[str, str] | None = None, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "maskjax", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
        env=env,
    )


def _own_flag_names(command: str) -> list[str]:
    """The flags `command` defines, defined here and removed again (commands share names: --out, --seed)."""
    names = [flag.name for flag in cli.define_command_flags(command)]
    for name in names:
        delattr(flags.FLAGS, name)
    return names


@pytest.mark.parametrize("spelling", [["--help"], ["-h"], ["help"]])
def test_top_level_help_lists_every_command_and_exits_0(spelling):
    result = _maskjax(*spelling)
    assert result.returncode == 0, result.stderr
    assert re.findall(r"^  (\S+) {2,}\S", result.stdout, re.M) == list(cli.COMMANDS)
    for name, command in cli.COMMANDS.items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(command.summary[:30])}", result.stdout, re.M)


def test_no_command_lists_them_and_exits_2_with_a_hint():
    result = _maskjax()
    assert result.returncode == 2
    assert all(name in result.stderr for name in cli.COMMANDS)
    assert result.stderr.strip().splitlines()[-1].startswith("maskjax: no command given")


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_each_command_help_shows_its_own_flags_with_defaults(command):
    names = _own_flag_names(command)
    assert names, f"{command} defines no flags"
    outputs = [_maskjax(command, "--help"), _maskjax(command, "-h"), _maskjax("help", command)]
    for result in outputs:
        assert result.returncode == 0, result.stderr
        assert result.stdout == outputs[0].stdout
    out = outputs[0].stdout
    assert out.startswith(f"usage: maskjax {command} ")
    assert cli.COMMANDS[command].example in out
    for name in names:
        assert re.search(rf"^  --(\[no\])?{re.escape(name.replace('_', '-'))}\s", out, re.M), name
    assert "[default: " in out
    assert re.search(r"^  -v, --verbosity\s", out, re.M)
    for absl_flag in ABSL_FLAGS:
        assert absl_flag not in out


def test_a_mistyped_command_suggests_the_nearest_and_exits_2():
    result = _maskjax("trian", "--workdir=/tmp/x")
    assert result.returncode == 2
    assert "maskjax: unknown command 'trian'; did you mean 'train'?" in result.stderr
    assert all(name in result.stderr for name in cli.COMMANDS)
    assert _maskjax("help", "exprot-hf").stderr.count("did you mean 'export-hf'?") == 1


@pytest.mark.slow
def test_a_demo_run_prints_maskjax_lines_and_no_library_logs(tmp_path):
    env = dict(os.environ, MASKJAX_DATA_DIR=str(tmp_path / "data"))
    # The user's environment, where JAX picks its platform (and, with libtpu installed, tries the TPU).
    env.pop("JAX_PLATFORMS", None)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    overrides = dict(
        total_steps=4,
        log_every=2,
        eval_every=4,
        eval_batches=1,
        checkpoint_every=4,
        global_batch_size=16,
        **{"model.layers": 1, "model.decoder_layers": 1, "schedule.warmup_steps": 1},
    )
    args = ["train", "--config=configs/demo/mae.py", f"--workdir={tmp_path / 'run'}"]
    result = _maskjax(*args, *(f"--config.{k}={v}" for k, v in overrides.items()), env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^step 4/4 ", result.stdout, re.M), result.stdout
    # absl's "I1201 08:23:08.313 ... file.py:701]" lines (W and E too), tfds' progress bars, libtpu.
    noise = re.compile(r"^[IWE]\d{4} | INFO |absl|tensorflow_datasets|Generating|libtpu|TPU_|jellyfish", re.M)
    for stream in (result.stdout, result.stderr):
        assert not noise.search(stream), stream[-3000:]


def test_quiet_mode_drops_what_orbax_logs_even_when_only_its_traceback_names_it():
    """asyncio's "Future exception was never retrieved" after a failed orbax write (a full disk) carries
    orbax only in its traceback; maskjax's own one-line error says it instead."""
    import logging

    from maskjax import cli

    def record(message: str, pathname: str = "/usr/lib/python3.11/asyncio/base_events.py", exc=None):
        return logging.LogRecord("asyncio", logging.ERROR, pathname, 1, message, None, exc)

    namespace: dict = {}
    source = "def write():\n    raise OSError(28, 'No space left on device')\n"
    exec(compile(source, "/venv/orbax/checkpoint/path.py", "exec"), namespace)  # a frame in orbax
    try:
        namespace["write"]()
    except OSError:
        from_orbax_task = record("Future exception was never retrieved", exc=sys.exc_info())
    try:
        raise ValueError("a user's own task")
    except ValueError:
        other_task = record("Task exception was never retrieved", exc=sys.exc_info())
    assert cli.from_orbax(from_orbax_task)
    assert cli.from_orbax(record("x", pathname="/venv/orbax/checkpoint/_src/handlers.py"))
    assert not cli.from_orbax(other_task) and not cli.from_orbax(record("plain"))
