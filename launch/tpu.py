"""Train on a TPU VM slice: create it, install this checkout on every host, run `maskjax train` on all
hosts at once, stream the output, delete the slice.

    python launch/tpu.py run --name=mae-l --zone=europe-west4-a --accelerator=v3-128 \\
        --config=configs/mae_vit_large.py --workdir=gs://BUCKET/mae-l [--config.KEY=VALUE ...] \\
        [--spot] [--reuse] [--keep] [--max-restarts=N] [--dry-run]
    python launch/tpu.py status --name=mae-l --zone=europe-west4-a
    python launch/tpu.py delete --name=mae-l --zone=europe-west4-a

Pure functions turn the flags into a plan, a list of `gcloud` argv lists; `--dry-run` prints exactly that
plan (`shlex.join`, one command a line, `#` notes between) and `run` executes exactly it. The steps:

1. create   `gcloud compute tpus queued-resources create` (--spot / --reserved); with --reuse a
            `describe` first, and an existing slice is used instead.
2. wait     poll `queued-resources describe --format=value(state.state)` until ACTIVE.
3. copy     a .tar.gz of this checkout, made locally from git's tracked and untracked-but-not-ignored
            files (so uncommitted edits travel too; without git: every file but caches, venvs and builds),
            `tpu-vm scp`'d to every worker. The workers get exactly the code you are looking at, with no
            repository access needed on their side.
4. install  on every worker: unpack to ~/maskjax, make ~/maskjax-venv with uv (the TPU runtime images ship
            Python 3.10; pyproject's requires-python is newer and uv downloads it), and install the
            package together with jax[tpu] at pyproject's jax pin (jax[tpu] brings the matching libtpu).
5. train    `tpu-vm ssh --worker=all`: every host runs `maskjax train` at the same time, in ~/maskjax (the
            config path is relative to the checkout root), with MASKJAX_DISTRIBUTED=1 (maskjax's CLI then
            calls `jax.distributed.initialize()`, which finds the other hosts from the TPU metadata) and
            JAX_PLATFORMS=tpu (a busy or broken TPU fails loudly instead of silently training on CPU),
            plus each --env KEY=VALUE (e.g. MASKJAX_DATA_DIR=gs://BUCKET/data: fresh workers hold no
            datasets). The ssh output, all hosts interleaved, is the log.
6. check    only with --max-restarts=N > 0, after the wait, copy, install or train step failed (for copy
            and install: all their tries): `describe` the queued resource. ACTIVE (or still queued): the
            failure is the program's own, e.g. a config error, and is not retried (it would fail the same
            way on paid time): stop. SUSPENDING, SUSPENDED, PREEMPTED, FAILED, DELETING or gone: the slice
            was preempted or a worker died: go on with 7.
7. restart  delete what is left of the slice (skipped when it is gone; also with --keep, as the name is
            needed again), then repeat steps 1-6: a new slice (with --reuse too: the probe is not repeated),
            the same archive, the same `maskjax train` with the same workdir. At most N times; after that
            the launcher gives up with exit status 1.
8. delete   `queued-resources delete --force --quiet`, also after a failed step, Ctrl-C or SIGTERM, unless
            --keep; nothing is deleted when the create step itself failed (the name may be someone's slice).

The workdir must be gs://...: all hosts write one run directory, and the slice's disks die with it. A run
interrupted by a spot preemption resumes from its last checkpoint in the workdir: with --max-restarts=N the
launcher does that itself (steps 6-7) up to N times; without it (0, the default: one attempt) the run ends
with the train step's exit status, and launching it again with the same workdir resumes it.

Quoting: the remote command is one string that the worker's shell parses again, so every value in it (config
path, workdir, overrides, --env values) is `shlex.quote`d: `;`, quotes and `$(...)` arrive as plain text.
Control characters are refused, so the dry run stays one command a line.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# On each worker, relative to $HOME.
REMOTE_ARCHIVE = "maskjax-src.tar.gz"
REMOTE_SRC = "maskjax"
REMOTE_VENV = "maskjax-venv"

# TPU software versions to use with JAX, by generation (cloud.google.com/tpu/docs/runtimes).
RUNTIMES = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# What a multi-host job needs on every worker, besides anything given with --env (which wins).
WORKER_ENV = {"MASKJAX_DISTRIBUTED": "1", "JAX_PLATFORMS": "tpu"}

ACTIVE = "ACTIVE"
DEAD_STATES = ("FAILED", "SUSPENDING", "SUSPENDED", "DELETING")
# A failed step on a slice in one of these states (or gone) was preempted, not wrong: --max-restarts applies.
PREEMPTED_STATES = (*DEAD_STATES, "PREEMPTED")
RESTARTABLE = ("poll", "retry", "job")  # kinds of step whose failure is checked for a preemption
# Not copied from a checkout without git (with git, its ignore rules decide).
SKIP_DIRS = {
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    "build",
    "dist",
}
RETRIES = 3  # attempts for the copy and install steps: ssh into freshly created VMs is flaky

# (regex, the allowed form in words) per validated field.
FORMS = {
    "name": (
        r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?",
        "1-63 lowercase letters, digits or '-', starting with a letter",
    ),
    "zone": (r"[a-z]+-[a-z]+[0-9]+-[a-z]", "a zone like us-central1-a or europe-west4-a"),
    "accelerator": (r"(v[0-9]+[a-z]*)-[1-9][0-9]*", "a TPU type like v3-128, v4-32, v5litepod-16 or v6e-8"),
    "project": (r"(?:[a-z0-9.-]+:)?[a-z][-a-z0-9]{4,28}[a-z0-9]", "a project ID like my-project-123"),
    "runtime_version": (r"[a-z0-9][-a-z0-9.]*", "a TPU software version like tpu-ubuntu2204-base"),
    "python": (r"3\.[0-9]+", "a Python version like 3.11"),
    "max_restarts": (r"[0-9]+", "an integer >= 0, e.g. 3"),
    "env": (r"[A-Za-z_][A-Za-z0-9_]*=.*", "KEY=VALUE with KEY a shell variable name"),
}
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class LaunchError(Exception):
    """A step failed: printed as one line, exit status 1."""


class UsageError(LaunchError):
    """The flags are wrong: printed as one line naming the flag and the allowed form, exit status 2."""


class _Terminated(Exception):
    """SIGTERM arrived (e.g. from a scheduler): unwind so the slice is still deleted."""


@dataclasses.dataclass(frozen=True)
class Slice:
    """Which queued resource (and TPU node of the same name) a command is about."""

    name: str
    zone: str
    project: str | None = None

    def flags(self) -> tuple[str, ...]:
        return (f"--zone={self.zone}",) + ((f"--project={self.project}",) if self.project else ())


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything `run_plan` needs; all values already validated."""

    slice: Slice
    accelerator: str
    runtime_version: str
    provisioning: str | None  # "spot", "reserved" or None (on demand)
    config: str  # relative to the checkout root, POSIX, with any ":variant" suffix
    workdir: str
    overrides: tuple[str, ...]  # "--config.KEY=VALUE", verbatim
    env: tuple[tuple[str, str], ...]
    python: str
    jax_requirement: str  # e.g. "jax[tpu]==0.10.2"
    archive: str  # local path of the source archive
    reuse: bool = False
    keep: bool = False
    max_restarts: int = 0  # recreate-and-resume rounds after a preemption


@dataclasses.dataclass(frozen=True)
class Step:
    """One gcloud command of a plan; `kind` says how `execute` runs it.

    probe    (--reuse) does the slice exist? If so, `create` is skipped and `cleanup` armed.
    create   once; success arms `cleanup`. A failure stops the run without deleting anything.
    poll     repeated until it prints ACTIVE.
    retry    up to RETRIES attempts (idempotent steps only).
    job      once; its exit status becomes the launcher's.
    check    (--max-restarts) after a failed poll, retry or job step: is the slice preempted or gone?
    restart  (--max-restarts) then: delete its remains and go back to `create`.
    cleanup  at the end, in a `finally`, once `create` succeeded or `probe` found the slice.
    plain    once (the status and delete subcommands).

    `name` is the step in one word, for the log lines ("preempted ... during train").
    """

    kind: str
    note: str
    argv: tuple[str, ...]
    name: str = ""


# ----------------------------------------------------------------------------------------- the plan


def _queued(s: Slice, verb: str, *args: str) -> tuple[str, ...]:
    return ("gcloud", "compute", "tpus", "queued-resources", verb, s.name, *args, *s.flags())


def _on_workers(s: Slice, verb: str, *args: str) -> tuple[str, ...]:
    # --quiet: no prompt (e.g. for an ssh key) may block a job that waited hours for its slice.
    return ("gcloud", "compute", "tpus", "tpu-vm", verb, *args, *s.flags(), "--worker=all", "--quiet")


def describe_state_argv(s: Slice) -> tuple[str, ...]:
    return _queued(s, "describe", "--format=value(state.state)")


def install_command(job: Job) -> str:
    """The remote shell command that unpacks the archive and installs it in a fresh venv (idempotent)."""
    uv = '"$HOME/.local/bin/uv"'
    return " && ".join(
        [
            'cd "$HOME"',
            shlex.join(["rm", "-rf", REMOTE_SRC, REMOTE_VENV]),
            shlex.join(["mkdir", REMOTE_SRC]),
            shlex.join(["tar", "-xzf", REMOTE_ARCHIVE, "-C", REMOTE_SRC]),
            shlex.join(["python3", "-m", "pip", "install", "--user", "--quiet", "uv"]),
            f"{uv} {shlex.join(['venv', '--quiet', '--python', job.python, REMOTE_VENV])}",
            f"{uv} "
            + shlex.join(
                # [gcs]: gs:// workdirs and data (gcsfs for orbax/epath, google-cloud-storage for TensorBoard)
                ["pip", "install", "--quiet", "--python", f"{REMOTE_VENV}/bin/python", f"./{REMOTE_SRC}[gcs]"]
                + [job.jax_requirement]
            ),
        ]
    )


def worker_env(job: Job) -> dict[str, str]:
    return {**WORKER_ENV, **dict(job.env)}


def train_argv(job: Job) -> list[str]:
    """What `maskjax` receives on every worker: the config, the workdir, the overrides, verbatim."""
    return ["train", f"--config={job.config}", f"--workdir={job.workdir}", *job.overrides]


def train_command(job: Job) -> str:
    """The remote shell command run on every worker at once; every user value in it is quoted."""
    exports = " ".join(shlex.quote(f"{k}={v}") for k, v in worker_env(job).items())
    return (
        f'cd "$HOME"/{REMOTE_SRC} && export PATH="$HOME/{REMOTE_VENV}/bin:$PATH" {exports} && '
        f"exec {shlex.join(['maskjax', *train_argv(job)])}"
    )


def run_plan(job: Job) -> list[Step]:
    """create -> wait -> copy -> install -> train [-> check -> restart] -> delete, as gcloud argv lists."""
    s, steps = job.slice, []
    if job.reuse:
        steps.append(
            Step(
                "probe",
                "does the slice exist already? (--reuse: then it is used as it is)",
                describe_state_argv(s),
            )
        )
    create = [f"--node-id={s.name}", f"--accelerator-type={job.accelerator}"]
    create += [f"--runtime-version={job.runtime_version}"]
    create += [f"--{job.provisioning}"] if job.provisioning else []
    how = job.provisioning or "on demand"
    steps += [
        Step(
            "create",
            f"create the slice: a queued resource, {how}" + (" (if none exists)" if job.reuse else ""),
            _queued(s, "create", *create),
            "create",
        ),
        Step("poll", "wait: this command is repeated until it prints ACTIVE", describe_state_argv(s), "wait"),
        Step(
            "retry",
            f"copy the source archive to every worker (up to {RETRIES} tries)",
            _on_workers(s, "scp", job.archive, f"{s.name}:{REMOTE_ARCHIVE}"),
            "copy",
        ),
        Step(
            "retry",
            f"install it with Python {job.python} and {job.jax_requirement} on every worker "
            f"(up to {RETRIES} tries)",
            _on_workers(s, "ssh", s.name, f"--command={install_command(job)}"),
            "install",
        ),
        Step(
            "job",
            "train on all workers at once; this output is the log",
            _on_workers(s, "ssh", s.name, f"--command={train_command(job)}"),
            "train",
        ),
    ]
    if job.max_restarts:
        steps += restart_steps(job, first=len(steps) - 4)
    if not job.keep:
        steps.append(
            Step(
                "cleanup",
                "delete the slice (also after a failure, Ctrl-C or SIGTERM)",
                _queued(s, "delete", "--force", "--quiet"),
            )
        )
    return steps


def restart_steps(job: Job, first: int) -> list[Step]:
    """The preemption loop after the train step; `first` is the create step's number in the dry run.

    Only a slice that is no longer ACTIVE restarts: a failure on a healthy slice is the program's own and
    would fail again the same way, on paid time."""
    s, n = job.slice, job.max_restarts
    last = first + 4  # the train step
    dead = ", ".join(PREEMPTED_STATES)
    gone = "skipped if gone" + ("; also with --keep" if job.keep else "")
    again = f"repeat steps {first}-{first + 5}" + (" (--reuse: a new slice, no probe)" if job.reuse else "")
    return [
        Step(
            "check",
            f"only if step {first + 1}, {first + 2}, {first + 3} or {last} fails: the slice's state; "
            f"ACTIVE or still queued: stop, no restart (the program's own error); {dead} or gone: "
            f"preempted, go on with {last + 2}",
            describe_state_argv(s),
            "check",
        ),
        Step(
            "restart",
            f"only after a preemption: delete what is left of the slice ({gone}), then {again} with the "
            "same train command and workdir (maskjax resumes from its last checkpoint); "
            f"at most {n} restart{'s' if n > 1 else ''} (--max-restarts), then give up with exit status 1",
            _queued(s, "delete", "--force", "--quiet"),
            "restart",
        ),
    ]


def status_plan(s: Slice) -> list[Step]:
    return [Step("plain", "describe the queued resource", _queued(s, "describe"))]


def delete_plan(s: Slice) -> list[Step]:
    return [
        Step(
            "plain", "delete the queued resource and its TPU VMs", _queued(s, "delete", "--force", "--quiet")
        )
    ]


def format_plan(steps: Sequence[Step], preamble: Sequence[str] = ()) -> str:
    """The dry run: `# notes` and one shell-quoted command a line, in execution order."""
    lines = ["# dry run: nothing was executed; these commands would run in this order"]
    lines += [f"# {p}" for p in preamble]
    for i, step in enumerate(steps, 1):
        lines += [f"# {i}. {step.note}", shlex.join(step.argv)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- the checkout


def worker_requirements(source: Path) -> tuple[str, str]:
    """(Python version, jax requirement) for the workers, from the checkout's own pyproject.toml pins."""
    try:
        project = tomllib.loads((source / "pyproject.toml").read_text())["project"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as e:
        raise UsageError(f"--source={source}: no readable pyproject.toml with [project]: {e}") from None
    m = re.fullmatch(r">=\s*(3\.[0-9]+)(?:\.[0-9]+)?", str(project.get("requires-python", "")).strip())
    python = m.group(1) if m else "3.11"
    jax = "jax[tpu]"
    for dep in project.get("dependencies", []):
        m = re.fullmatch(r"jax\s*(?:\[[^\]]*\])?\s*([<>=!~][^;]*)?", dep.strip())
        if m:
            jax = "jax[tpu]" + (m.group(1) or "").replace(" ", "")
    return python, jax


def resolve_config(value: str, source: Path, cwd: Path) -> str:
    """--config as the workers see it: a path relative to the checkout root (plus any ':variant')."""
    text, sep, variant = value.partition(":")
    path = Path(text)
    candidates = [path] if path.is_absolute() else [source / path, cwd / path]
    for candidate in candidates:
        if candidate.is_file():
            try:
                rel = candidate.resolve().relative_to(source.resolve())
            except ValueError:
                raise UsageError(
                    f"--config={value}: {candidate} is outside the checkout {source}, which is what the "
                    "workers get; put the file under its configs/"
                ) from None
            return rel.as_posix() + sep + variant
    looked = " or ".join(str(c) for c in candidates)
    raise UsageError(f"--config={value}: no such file ({looked}); give a config file of the checkout")


def source_files(source: Path) -> list[str]:
    """The checkout's files to copy, relative POSIX paths: git's tracked + untracked-not-ignored ones
    (working-tree contents, so uncommitted edits are included); without git, every file outside VCS,
    cache, venv and build folders."""
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            check=True,
        ).stdout
        names = [n for n in os.fsdecode(out).split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = []
        for root, dirs, files in os.walk(source):
            dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
            rel = Path(root).relative_to(source)
            names += [(rel / f).as_posix() for f in files]
    # A tracked file deleted in the working tree is listed by git but has nothing to copy.
    return sorted({n for n in names if (source / n).is_file()})


def pack_source(source: Path, files: Sequence[str], archive: str) -> int:
    """Write `files` of `source` into the gzipped tar `archive` (atomically); return its size in bytes."""
    partial = f"{archive}.partial"
    with tarfile.open(partial, "w:gz") as tar:
        for name in files:
            tar.add(source / name, arcname=name, recursive=False)
    os.replace(partial, archive)
    return os.path.getsize(archive)


def archive_path(name: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"maskjax-launch-{name}.tar.gz")


# ------------------------------------------------------------------------------------------- flags


def _check(field: str, value: str) -> str:
    pattern, form = FORMS[field]
    if not re.fullmatch(pattern, value, flags=re.DOTALL):
        raise UsageError(f"--{field.replace('_', '-')}={value!r} is not valid: expected {form}")
    return value


def _printable(flag: str, value: str) -> str:
    if CONTROL.search(value):
        raise UsageError(f"{flag}: {value!r} contains a control character (newline, tab, ...); not allowed")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="launch/tpu.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    subs = {}
    for name, help_ in [
        ("run", "create (or --reuse) a slice, install this checkout, train on all hosts, delete it"),
        ("status", "describe the slice's queued resource"),
        ("delete", "delete the slice's queued resource and its TPU VMs"),
    ]:
        epilog = "After the flags: config overrides --config.KEY=VALUE, passed to `maskjax train` verbatim."
        sub = commands.add_parser(
            name, help=help_, allow_abbrev=False, epilog=epilog if name == "run" else None
        )
        sub.add_argument("--name", required=True, help="queued resource and TPU node name, e.g. mae-l")
        sub.add_argument("--zone", required=True, help="e.g. europe-west4-a (v3) or us-central2-b (v4)")
        sub.add_argument("--project", help="Google Cloud project (default: gcloud's configured one)")
        sub.add_argument("--dry-run", action="store_true", help="print the gcloud commands; run nothing")
        subs[name] = sub
    run = subs["run"]
    run.add_argument("--accelerator", required=True, help="TPU type, e.g. v3-128, v4-32, v5litepod-16")
    run.add_argument("--config", required=True, help="config file of this checkout, e.g. configs/x.py")
    run.add_argument("--workdir", required=True, help="run directory every host writes: gs://BUCKET/PATH")
    run.add_argument("--runtime-version", help=f"TPU software version (default by generation: {RUNTIMES})")
    which = run.add_mutually_exclusive_group()
    which.add_argument("--spot", action="store_true", help="spot capacity: cheaper, preemptible")
    which.add_argument("--reserved", action="store_true", help="use the project's reservation")
    run.add_argument(
        "--reuse",
        action="store_true",
        help="use the slice if it exists (still deleted at the end unless --keep)",
    )
    run.add_argument("--keep", action="store_true", help="do not delete the slice at the end")
    run.add_argument(
        "--max-restarts",
        default="0",
        metavar="N",
        help="if the slice is preempted, recreate it and resume training, up to N times (default 0)",
    )
    run.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment for maskjax on every worker (repeatable), e.g. MASKJAX_DATA_DIR=gs://b/data",
    )
    run.add_argument("--source", type=Path, default=REPO, help="the checkout to copy (default: this one)")
    run.add_argument("--python", help="Python version on the workers (default: pyproject's requires-python)")
    run.add_argument("--poll-seconds", type=float, default=30.0, help="between state polls and retries")
    run.add_argument("--max-wait-minutes", type=float, help="give up if not ACTIVE by then (default: wait)")
    run.add_argument(
        "--local-workdir",
        action="store_true",
        help="allow a workdir that is not gs:// (each worker writes its own disk, lost on delete)",
    )
    return parser


def parse(argv: Sequence[str], cwd: Path | None = None) -> tuple[argparse.Namespace, list[Step], list[str]]:
    """Flags -> (options, plan, dry-run preamble). Raises UsageError naming the flag and the allowed form."""
    args, extra = _parser().parse_known_args(list(argv))
    s = Slice(
        _check("name", args.name), _check("zone", args.zone), args.project and _check("project", args.project)
    )
    if args.command != "run":
        if extra:
            raise UsageError(f"{args.command}: unrecognized arguments {' '.join(extra)}")
        return args, (status_plan(s) if args.command == "status" else delete_plan(s)), []

    for token in extra:
        if not token.startswith("--config.") or len(token) == len("--config."):
            raise UsageError(
                f"unrecognized argument {token!r}: after the launcher's flags only config overrides "
                "--config.KEY=VALUE may follow"
            )
        _printable("a config override", token)
    generation = re.fullmatch(FORMS["accelerator"][0], _check("accelerator", args.accelerator)).group(1)
    runtime = args.runtime_version or RUNTIMES.get(generation)
    if runtime is None:
        known = ", ".join(RUNTIMES)
        raise UsageError(f"--runtime-version: no default for {generation} (known: {known}); pass one")
    workdir = _printable("--workdir", args.workdir)
    if not workdir.startswith("gs://") and not args.local_workdir:
        raise UsageError(
            f"--workdir={workdir!r} must be gs://BUCKET/PATH: every host writes one run directory and the "
            "slice's disks are deleted with it (--local-workdir allows a per-worker path anyway)"
        )
    env = []
    for item in args.env:
        key, _, value = _check("env", _printable("--env", item)).partition("=")
        env.append((key, value))
    source = args.source.resolve()
    python, jax_requirement = worker_requirements(source)
    job = Job(
        slice=s,
        accelerator=args.accelerator,
        runtime_version=_check("runtime_version", runtime),
        provisioning="spot" if args.spot else "reserved" if args.reserved else None,
        config=resolve_config(_printable("--config", args.config), source, cwd or Path.cwd()),
        workdir=workdir,
        overrides=tuple(extra),
        env=tuple(env),
        python=_check("python", args.python or python),
        jax_requirement=jax_requirement,
        archive=archive_path(s.name),
        reuse=args.reuse,
        keep=args.keep,
        max_restarts=int(_check("max_restarts", args.max_restarts)),
    )
    args.job = job
    preamble = [f"first, locally: pack the files of {source} (see source_files) into {job.archive}"]
    return args, run_plan(job), preamble


# --------------------------------------------------------------------------------------- execution


def _say(message: str) -> None:
    print(f"[launch/tpu.py] {message}", file=sys.stderr, flush=True)


def _state(argv: Sequence[str]) -> str | None:
    """The queued resource's state, or None when describe fails (e.g. it does not exist)."""
    result = subprocess.run(list(argv), capture_output=True, text=True)
    return (result.stdout.strip() or None) if result.returncode == 0 else None


def _wait_active(argv: Sequence[str], poll_seconds: float, max_wait_s: float | None) -> None:
    start, last, failures = time.monotonic(), None, 0
    while True:
        result = subprocess.run(list(argv), capture_output=True, text=True)
        if result.returncode != 0:
            failures += 1
            if failures >= 5:
                raise LaunchError(f"describe failed {failures} times in a row: {result.stderr.strip()}")
        else:
            failures, state = 0, result.stdout.strip()
            if state != last:
                _say(f"state: {state or '(none)'}")
                last = state
            if state == ACTIVE:
                return
            if state in DEAD_STATES:
                raise LaunchError(f"the slice is {state}; it cannot run the job")
        if max_wait_s is not None and time.monotonic() - start > max_wait_s:
            raise LaunchError(f"not ACTIVE after {max_wait_s / 60:g} minutes (last state: {last})")
        time.sleep(poll_seconds)


def _retry(argv: Sequence[str], delay_s: float) -> None:
    for attempt in range(1, RETRIES + 1):
        code = subprocess.call(list(argv))
        if code == 0:
            return
        _say(f"attempt {attempt}/{RETRIES} exited with status {code}")
        if attempt < RETRIES:
            time.sleep(delay_s)
    raise LaunchError(f"failed {RETRIES} times: {shlex.join(argv)}")


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def _run(step: Step, poll_seconds: float, max_wait_s: float | None) -> int:
    """Run a poll, retry, job or plain step; its exit status (a failed poll or retry raises LaunchError)."""
    if step.kind == "poll":
        _wait_active(step.argv, poll_seconds, max_wait_s)
    elif step.kind == "retry":
        _retry(step.argv, poll_seconds)
    else:
        status = subprocess.call(list(step.argv))
        if status != 0:
            _say(f"exited with status {status}")
        return status
    return 0


def _preemption(check: Step | None, failed: Step) -> str | None:
    """Why `failed` failed, if the slice was taken away ("state SUSPENDED", "the slice is gone"); None when
    it was not (no check step, or the slice is still ACTIVE or queued): then the failure is not retried."""
    if check is None or failed.kind not in RESTARTABLE:
        return None
    state = _state(check.argv)
    if state is not None and state not in PREEMPTED_STATES:
        _say(f"the slice is {state}: the failure is the program's own, not retried")
        return None
    return f"state {state}" if state else "the slice is gone"


def execute(
    steps: Sequence[Step],
    poll_seconds: float = 30.0,
    max_wait_s: float | None = None,
    max_restarts: int = 0,
) -> int:
    """Run the plan's commands in order (see `Step` for the kinds); return the exit status.

    With a check and a restart step in the plan, a failed step on a preempted slice goes back to `create`,
    up to `max_restarts` times. The slice is deleted in a `finally` once it was created or reused, so a
    failed install, a crashed job, Ctrl-C or SIGTERM still ends the billing; Ctrl-C is ignored while the
    delete runs.
    """
    cleanup = [s for s in steps if s.kind == "cleanup"]
    check = next((s for s in steps if s.kind == "check"), None)
    restart = next((s for s in steps if s.kind == "restart"), None)
    inline = [s for s in steps if s.kind not in ("check", "restart", "cleanup")]
    armed, exists, status, step, restarts, i = False, False, 0, None, 0, 0
    previous_term = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        while i < len(inline):
            step, i = inline[i], i + 1
            if step.kind == "create" and exists:
                _say("the slice exists: reusing it")
                continue
            _say(step.note)
            if step.kind == "probe":
                state = _state(step.argv)
                if state in DEAD_STATES:
                    raise LaunchError(
                        f"the slice exists but is {state}; delete it first (launch/tpu.py delete)"
                    )
                exists = armed = state is not None
            elif step.kind == "create":
                if subprocess.call(list(step.argv)) != 0:
                    raise LaunchError("creating the slice failed (if it exists already, --reuse runs on it)")
                armed = True
            else:  # poll, retry, job, plain
                error = None
                try:
                    status = _run(step, poll_seconds, max_wait_s)
                except LaunchError as e:
                    status, error = 1, e
                if status == 0:
                    continue
                why = _preemption(check, step)
                if why is None:
                    if error is not None:
                        raise error
                    break
                if restarts >= max_restarts or restart is None:
                    raise LaunchError(
                        f"preempted ({why}) during {step.name}, and all {max_restarts} restarts "
                        f"(--max-restarts) are used up: giving up"
                    )
                restarts += 1
                _say(f"preempted ({why}) during {step.name}: restart {restarts}/{max_restarts}")
                if why != "the slice is gone" and subprocess.call(list(restart.argv)) != 0:
                    raise LaunchError(f"deleting the preempted slice failed: {shlex.join(restart.argv)}")
                # Back to `create`: a new slice, also with --reuse.
                exists, i = False, next(n for n, s in enumerate(inline) if s.kind == "create")
    except (KeyboardInterrupt, _Terminated) as e:
        status = 130 if isinstance(e, KeyboardInterrupt) else 143
        _say("interrupted" if status == 130 else "terminated")
        if step is not None and step.kind == "create" and not armed:
            _say("the create request may have gone through: check with `launch/tpu.py status`")
    finally:
        # Deleting must not be cut short: children inherit the ignored signals too.
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for cleanup_step in cleanup if armed else []:
                _say(f"{cleanup_step.note}; Ctrl-C and SIGTERM are ignored until it is done")
                if subprocess.call(list(cleanup_step.argv)) != 0:
                    _say(f"DELETE FAILED; the slice may still be billing: {shlex.join(cleanup_step.argv)}")
                    status = status or 1
        finally:
            signal.signal(signal.SIGINT, previous[signal.SIGINT])
            signal.signal(signal.SIGTERM, previous_term)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args, steps, preamble = parse(sys.argv[1:] if argv is None else argv)
        if args.dry_run:
            print(format_plan(steps, preamble))
            return 0
        if shutil.which("gcloud") is None:
            raise LaunchError(
                "gcloud is not on PATH: install the Google Cloud CLI and run `gcloud auth login`"
            )
        if args.command == "run":
            job, source = args.job, args.source.resolve()
            files = source_files(source)
            if job.config.partition(":")[0] not in files:
                raise UsageError(f"--config={args.config}: ignored by git, so it would not reach the workers")
            size = pack_source(source, files, job.archive)
            _say(f"packed {len(files)} files of {source} into {job.archive} ({size / 1e6:.1f} MB)")
            max_wait = None if args.max_wait_minutes is None else 60 * args.max_wait_minutes
            return execute(steps, args.poll_seconds, max_wait, job.max_restarts)
        return execute(steps)
    except UsageError as e:
        print(f"launch/tpu.py: {e}", file=sys.stderr)
        return 2
    except LaunchError as e:
        print(f"launch/tpu.py: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
