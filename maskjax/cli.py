"""`maskjax <command> [--flags]`: one entry point, absl flags per command.

train      --config=configs/X.py --workdir=DIR [--config.KEY=VALUE ...]
import-hf  --hf-dir=D --out=DIR      transformers checkpoint -> maskjax checkpoint
export-hf  --workdir=DIR --out=D     maskjax checkpoint -> transformers directory
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags

FLAGS = flags.FLAGS


class UsageError(Exception):
    """A user's mistake: printed as one line, exit status 2, no traceback."""


def _config_flag() -> None:
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "A config file, e.g. configs/demo/mae.py.", lock_config=True
    )


def _train_flags() -> None:
    _config_flag()
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints/, metrics.jsonl, TensorBoard events.")


def _train() -> None:
    from maskjax import train

    if FLAGS.config is None or not FLAGS.workdir:
        raise UsageError("train needs --config=FILE and --workdir=DIR")
    train.train(FLAGS.config, FLAGS.workdir)


def _import_hf_flags() -> None:
    flags.DEFINE_string("hf_dir", None, "Directory of a transformers checkpoint (config.json + weights).")
    flags.DEFINE_string("out", None, "maskjax workdir to write the checkpoint into.")
    flags.DEFINE_integer("seed", 0, "Initialises parts the checkpoint lacks (e.g. a missing MLM head).")


def _import_hf() -> None:
    from maskjax import checkpoint, interop

    if not FLAGS.hf_dir or not FLAGS.out:
        raise UsageError("import-hf needs --hf-dir=DIR and --out=DIR")
    imported = interop.load_hf(FLAGS.hf_dir, seed=FLAGS.seed)
    path = checkpoint.save_params(FLAGS.out, imported.family, imported.config, imported.params)
    print(f"{imported.family}: wrote {path}")
    for name in imported.missing:
        print(f"  not in the checkpoint, freshly initialised: {name}")


def _export_hf_flags() -> None:
    flags.DEFINE_string("workdir", None, "maskjax workdir holding checkpoints/.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("out", None, "Directory to write config.json + model.safetensors into.")


def _export_hf() -> None:
    from maskjax import checkpoint, interop

    if not FLAGS.workdir or not FLAGS.out:
        raise UsageError("export-hf needs --workdir=DIR and --out=DIR")
    family, cfg, params = checkpoint.load_params(FLAGS.workdir, FLAGS.step)
    out = interop.save_hf(family, cfg, params, FLAGS.out)
    print(f"{family}: wrote {out}")


COMMANDS: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
    "train": (_train_flags, _train),
    "import-hf": (_import_hf_flags, _import_hf),
    "export-hf": (_export_hf_flags, _export_hf),
}


def _underscore_flag_name(arg: str) -> str:
    """--hf-dir=a-b -> --hf_dir=a-b: absl spells flags with underscores; the docs use dashes."""
    if not arg.startswith("--"):
        return arg
    name, sep, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + sep + value


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        given = argv[1] if len(argv) > 1 else "(none)"
        sys.exit(f"maskjax: command must be one of {', '.join(COMMANDS)}; got {given}")
    command = argv[1]
    define_flags, run = COMMANDS[command]
    define_flags()
    rest = [_underscore_flag_name(a) for a in argv[2:]]

    def _run(_: list[str]) -> None:
        try:
            run()
        except (UsageError, ValueError, FileNotFoundError) as e:
            sys.exit(f"maskjax {command}: {e}")

    app.run(_run, argv=[f"maskjax {command}", *rest])
