"""`maskjax <command> [--flags]`: one entry point, absl flags per command.

train      --config=configs/X.py --workdir=DIR [--config.KEY=VALUE ...]
import-hf  --hf-dir=D --out=DIR      transformers checkpoint -> maskjax checkpoint
export-hf  --workdir=DIR --out=D     maskjax checkpoint -> transformers directory
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from absl import app, flags

FLAGS = flags.FLAGS


class UsageError(Exception):
    """A user's mistake on the command line: printed as one line, no traceback."""


def _config_flag() -> None:
    from maskjax import defaults

    # config_flags' locked --config flag; a misspelt --config.KEY or FILE:VARIANT exits with one line
    # naming the nearest valid ones (absl parses inside app.run, where it would be a traceback).
    defaults.define_config_flag(
        "config",
        "A config file, e.g. configs/demo/mae.py, or FILE:VARIANT (configs/gpt2_small.py:xl).",
        exit_on_error=True,
    )


def _train_flags() -> None:
    _config_flag()
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints/, metrics.jsonl, TensorBoard events.")


def _train() -> None:
    from maskjax import train

    if FLAGS.config is None or not FLAGS.workdir:
        raise UsageError("train needs --config=FILE and --workdir=DIR")
    train.train(FLAGS.config, FLAGS.workdir)


def _prepare_text_flags() -> None:
    flags.DEFINE_string("inputs", None, "A folder, file or glob of local text files.")
    flags.DEFINE_string("out", None, "Folder for the tokenizer, the tfds datasets and prepare.json.")
    flags.DEFINE_enum("layout", "bert", ["bert", "roberta", "gpt"], "Which paper's examples to build.")
    flags.DEFINE_list("max_length", ["128"], "Example length(s); BERT's two phases: 128,512.")
    flags.DEFINE_string("tokenizer", None, "An existing tokenizer (folder, vocab.txt, tokenizer.json).")
    flags.DEFINE_integer("vocab_size", None, "Entries of a newly trained tokenizer.")
    flags.DEFINE_enum("documents", "file", ["file", "blank_line"], "One document per file, or per paragraph.")
    flags.DEFINE_float("validation_fraction", 0.05, "Share of documents held out.")
    flags.DEFINE_integer("seed", 0, "Seed of the document split and the NSP pairing.")


def _prepare_text() -> None:
    from maskjax.data import text_datasets

    if not FLAGS.inputs or not FLAGS.out:
        raise UsageError("prepare-text needs --inputs=DIR_OR_GLOB and --out=DIR")
    lengths = [int(x) for x in FLAGS.max_length]
    result = text_datasets.prepare_text(
        FLAGS.inputs,
        FLAGS.out,
        layout=FLAGS.layout,
        max_length=lengths if len(lengths) > 1 else lengths[0],
        tokenizer=FLAGS.tokenizer,
        vocab_size=FLAGS.vocab_size,
        documents=FLAGS.documents,
        seed=FLAGS.seed,
        validation_fraction=FLAGS.validation_fraction,
    )
    print(
        json.dumps(
            {k: result[k] for k in ("out_dir", "documents", "skipped", "datasets")}, indent=2, default=str
        )
    )


def _benchmark_input_flags() -> None:
    _config_flag()
    flags.DEFINE_integer("steps", 20, "Batches to time.")


def _benchmark_input() -> None:
    import jax

    from maskjax import train
    from maskjax.data import loaders, pipeline

    config = FLAGS.config
    source, transform = loaders.source_and_transform(config, "train")
    host = pipeline.benchmark_input(
        source,
        transform,
        config.global_batch_size,
        FLAGS.steps,
        seed=config.seed,
        num_workers=config.data.get("num_workers", 0),
    )
    from maskjax import aot

    trainer = train.Trainer(config)
    consumed = train.benchmark_step(trainer, FLAGS.steps)
    rows = host["local_batch"]
    # MFU: model FLOPs per second per device over the matmul peak measured here, in the compute dtype.
    flops = aot.model_flops(config, trainer.model_cfg)["per_step"]
    achieved = flops * consumed / config.global_batch_size / jax.device_count()
    peak = aot.matmul_peak_flops(getattr(trainer.model_cfg, "dtype", "float32"))
    result = {
        "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
        "train_step_model_tflops_per_sec_per_device": achieved / 1e12,
        "measured_matmul_peak_tflops_per_device": peak / 1e12,
        "mfu": achieved / peak,
        "input_examples_per_sec_per_process": host["examples_per_sec"],
        "input_tokens_per_sec_per_process": host.get("tokens_per_sec"),
        "train_step_examples_per_sec_per_process": consumed * rows / config.global_batch_size,
        "headroom": host["examples_per_sec"] / max(consumed * rows / config.global_batch_size, 1e-9),
        "skipped": host["skipped"],
    }
    print(json.dumps(result, indent=2))


def _config_path() -> str:
    """The --config file as the user named it (without a :variant suffix)."""
    from ml_collections import config_flags

    return config_flags.get_config_filename(FLAGS["config"])


def _describe_flags() -> None:
    _config_flag()


def _describe() -> None:
    from maskjax import describe

    print(json.dumps(describe.describe(FLAGS.config), indent=2))


def _compile_flags() -> None:
    _config_flag()
    flags.DEFINE_string("topology", None, "A TPU topology, e.g. v3:8x8 (needs `pip install maskjax[tpu]`).")
    flags.DEFINE_float("hbm_gib", None, "Per-device memory to check against (default: the chip's).")


def _compile() -> None:
    from maskjax import aot

    try:
        result = aot.compile_config(
            FLAGS.config, topology=FLAGS.topology, hbm_gib=FLAGS.hbm_gib, name=_config_path()
        )
    except ImportError as e:
        raise UsageError(f"--topology needs libtpu: pip install 'maskjax[tpu]' ({e})") from None
    print(json.dumps(result, indent=2))
    if not result.get("fits", True):
        sys.exit(1)


def _import_hf_flags() -> None:
    flags.DEFINE_string("hf_dir", None, "Directory of a transformers checkpoint (config.json + weights).")
    flags.DEFINE_string("out", None, "maskjax workdir to write the checkpoint into.")
    flags.DEFINE_integer("seed", 0, "Initialises parts the checkpoint lacks (e.g. a missing MLM head).")


def _import_hf() -> None:
    from maskjax import checkpoint, interop

    if not FLAGS.hf_dir or not FLAGS.out:
        raise UsageError("import-hf needs --hf-dir=DIR and --out=DIR")
    try:
        imported = interop.load_hf(FLAGS.hf_dir, seed=FLAGS.seed)
    except (ValueError, KeyError) as e:  # an architecture or layout we do not convert
        raise UsageError(f"--hf-dir={FLAGS.hf_dir}: {e}") from None
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
    "prepare-text": (_prepare_text_flags, _prepare_text),
    "benchmark-input": (_benchmark_input_flags, _benchmark_input),
    "describe": (_describe_flags, _describe),
    "compile": (_compile_flags, _compile),
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

    from maskjax.config import ConfigError

    def _run(_: list[str]) -> None:
        try:
            run()
        except (UsageError, ConfigError, FileNotFoundError) as e:  # the user's to fix: one line
            sys.exit(f"maskjax {command}: {e}")

    from maskjax import distributed

    # Join the job's other processes, if any, before JAX starts; on a TPU VM, train jointly by default.
    distributed.maybe_initialize(detect_tpu=command in ("train", "benchmark-input"))
    with distributed.fail_fast():
        app.run(_run, argv=[f"maskjax {command}", *rest])
