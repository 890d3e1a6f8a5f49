"""`maskjax <command> [--flags]`: one entry point, absl flags per command.

`COMMANDS` names each command's flags, what it runs and the help that explains it;
`maskjax --help` lists them, `maskjax COMMAND --help` shows one. Runs are quiet by default:
the libraries' logs (absl, tfds, orbax, jax) and libtpu's start-up errors on a host without a
TPU stay hidden unless -v/--verbosity asks for them; maskjax's own lines are plain prints.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import os
import shutil
import sys
import textwrap
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

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


def _transfer_flags() -> None:
    _train_flags()
    flags.DEFINE_string(
        "init",
        None,
        "Weights to start from: a maskjax workdir (e.g. an MAE pre-training run) or a transformers "
        "directory. Default: the config's init; with neither, from scratch (the baseline).",
    )


def _transfer(task: str) -> Callable[[], None]:
    """`maskjax finetune` / `maskjax probe`: a train run of a `task` config, from --init's weights."""

    def run() -> None:
        from maskjax import methods, train

        if FLAGS.config is None or not FLAGS.workdir:
            raise UsageError(f"{task} needs --config=FILE and --workdir=DIR")
        family = FLAGS.config.get("family")
        kind = methods.get(family).task if family in methods.REGISTRY else None
        if kind != task:
            wanted = sorted(n for n in methods.REGISTRY if methods.get(n).task == task)
            raise UsageError(
                f"{task} runs a config of family {' or '.join(wanted)} (configs/{task}/); "
                f"{family!r} is not one"
            )
        config = FLAGS.config
        if FLAGS.init:
            config.init = FLAGS.init
        train.train(config, FLAGS.workdir)

    return run


def _label_efficiency_flags() -> None:
    _transfer_flags()
    flags.DEFINE_list(
        "fractions", ["0.01", "0.1", "1"], "Shares of every class's training labels to fine-tune on."
    )


def _label_efficiency() -> None:
    from maskjax import methods, transfer

    if FLAGS.config is None or not FLAGS.workdir or not FLAGS.init:
        raise UsageError(
            "label-efficiency needs --config=FILE (a fine-tuning config), --init=DIR and --workdir=DIR"
        )
    family = FLAGS.config.get("family")
    if family not in methods.REGISTRY or methods.get(family).task != "finetune":
        raise UsageError(f"label-efficiency runs a fine-tuning config (configs/finetune/); got {family!r}")
    try:
        fractions = [float(f) for f in FLAGS.fractions]
    except ValueError:
        raise UsageError(f"--fractions must be numbers in (0, 1]; got {','.join(FLAGS.fractions)}") from None
    if not fractions or not all(0.0 < f <= 1.0 for f in fractions):
        raise UsageError(f"--fractions must be numbers in (0, 1]; got {','.join(FLAGS.fractions)}")
    transfer.run(FLAGS.config, FLAGS.init, FLAGS.workdir, sorted(set(fractions)))


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
    trainer = train.Trainer(config)  # validates the config before any data is built
    print(f"data: {loaders.prepare(config)}", flush=True)
    source, transform = loaders.source_and_transform(config, "train")
    host = pipeline.benchmark_input(
        source,
        transform,
        config.global_batch_size,
        FLAGS.steps,
        seed=config.seed,
        num_workers=config.data.num_workers,
    )
    from maskjax import aot

    consumed = train.benchmark_step(trainer, FLAGS.steps)
    rows = host["local_batch"]
    # MFU: model FLOPs per second per device over the matmul peak measured here, in the compute dtype.
    flops = trainer.method.flops(config, trainer.model_cfg)
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


def _benchmark_flags() -> None:
    _config_flag()
    flags.DEFINE_integer("steps", 10, "Timed train steps (their median is reported).")
    flags.DEFINE_integer("warmup", 2, "Untimed steps after the compile.")
    flags.DEFINE_bool("savings", True, "Also time the work the method avoids (BERT, MAE).")
    flags.DEFINE_enum("compare", None, ["torch"], "Also time transformers + torch on the same work.")
    flags.DEFINE_integer("phase", None, "Measure only this phase of the config (1-based); default: all.")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")


def _benchmark() -> None:
    from maskjax import benchmark

    result = benchmark.run(
        FLAGS.config,
        steps=FLAGS.steps,
        warmup=FLAGS.warmup,
        savings=FLAGS.savings,
        compare=FLAGS.compare,
        phase=FLAGS.phase,
        out=None if FLAGS.json else sys.stdout,
    )
    if FLAGS.json:
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
    # The tokenizer travels with the weights, for fill-mask and generate.
    from maskjax.data import tokenizers

    files = [f for f in tokenizers.FILES if (Path(FLAGS.hf_dir) / f).is_file()]
    if files:
        (Path(FLAGS.out) / "tokenizer").mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(Path(FLAGS.hf_dir) / f, Path(FLAGS.out) / "tokenizer" / f)
        print(f"  tokenizer: {Path(FLAGS.out) / 'tokenizer'} ({', '.join(files)})")
    for name in imported.missing:
        print(f"  not in the checkpoint, freshly initialised: {name}")
    for key, value in imported.masking.items():  # training settings: the user's config sets them
        print(f"  the checkpoint was trained with masking.{key}={value!r}")


def _export_hf_flags() -> None:
    flags.DEFINE_string("workdir", None, "maskjax workdir holding checkpoints/.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
    flags.DEFINE_string("out", None, "Directory to write config.json + model.safetensors into.")


def _export_hf() -> None:
    from maskjax import checkpoint, interop

    if not FLAGS.workdir or not FLAGS.out:
        raise UsageError("export-hf needs --workdir=DIR and --out=DIR")
    from etils import epath

    family, cfg, params = checkpoint.load_params(FLAGS.workdir, FLAGS.step)
    run_config = epath.Path(FLAGS.workdir) / "config.json"  # a training run's; an import has none
    masking = json.loads(run_config.read_text()).get("masking") if run_config.exists() else None
    out = interop.save_hf(family, cfg, params, FLAGS.out, masking=masking)
    print(f"{family}: wrote {out}")


def _checkpoint_use_flags(model: str, json_holds: str) -> None:
    """The flags of the commands that use a trained or imported checkpoint (fill-mask, generate)."""
    flags.DEFINE_string("workdir", None, f"maskjax workdir of a {model} checkpoint (trained or imported).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest intact one).")
    flags.DEFINE_string("tokenizer", None, "Tokenizer folder (default: WORKDIR/tokenizer).")
    flags.DEFINE_bool("json", False, f"Print the result as JSON ({json_holds}).")


def _fill_mask_flags() -> None:
    _checkpoint_use_flags("BERT or RoBERTa", "token ids, tokens, probabilities")
    flags.DEFINE_string("text", None, "Text with one or more [MASK] (RoBERTa: <mask>) tokens.")
    flags.DEFINE_integer("top_k", 5, "How many tokens to list for each mask.")


def _fill_mask() -> None:
    from maskjax import infer

    if not FLAGS.workdir or FLAGS.text is None:
        raise UsageError('fill-mask needs --workdir=DIR and --text="... [MASK] ..."')
    if FLAGS.top_k < 1:
        raise UsageError(f"--top-k={FLAGS.top_k} is invalid: must be >= 1")
    tok = infer.tokenizer_of(FLAGS.workdir, FLAGS.tokenizer)
    try:
        model, _ = infer.load(FLAGS.workdir, ("bert", "roberta"), FLAGS.step)
        masks = infer.fill_mask(model, tok, FLAGS.text, FLAGS.top_k)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if FLAGS.json:
        print(json.dumps({"text": FLAGS.text, "masks": masks}, indent=2))
        return
    for i, rows in enumerate(masks):
        print(f"mask {i + 1}:")
        for r in rows:
            print(f"  {r['score']:.4f}  {r['token']:<16}  {r['sequence']}")


def _reconstruct_flags() -> None:
    flags.DEFINE_string(
        "workdir", None, "maskjax workdir of an MAE checkpoint (trained or imported) or a BEiT run."
    )
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest intact one).")
    flags.DEFINE_string("out", None, "PNG to write (default: WORKDIR/reconstructions.png).")
    flags.DEFINE_float(
        "mask_ratio", None, "Share of patches hidden (default: the run's masking.ratio, else 0.75)."
    )
    flags.DEFINE_integer("n", 8, "How many held-out images to show.")
    flags.DEFINE_string("dataset", None, "Images to reconstruct (default: the run's data.dataset).")
    flags.DEFINE_string("split", None, "Their split (default: the run's data.eval_split).")
    flags.DEFINE_string("data_dir", None, "Where the dataset is prepared (default: the run's).")
    flags.DEFINE_integer("seed", 0, "Seed of the masks.")
    flags.DEFINE_bool("json", False, "Print the losses and the figure's path as JSON.")


def _reconstruct() -> None:
    from maskjax.evaluators import reconstruction

    if not FLAGS.workdir:
        raise UsageError("reconstruct needs --workdir=DIR")
    if FLAGS.n < 1:
        raise UsageError(f"--n={FLAGS.n} is invalid: must be >= 1")
    try:
        result = reconstruction.from_workdir(
            FLAGS.workdir,
            FLAGS.out,
            mask_ratio=FLAGS.mask_ratio,
            n=FLAGS.n,
            dataset=FLAGS.dataset,
            split=FLAGS.split,
            data_dir=FLAGS.data_dir,
            step=FLAGS.step,
            seed=FLAGS.seed,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    if FLAGS.json:
        print(json.dumps(result, indent=2))
        return
    if "masked_token_accuracy" in result:  # BEiT
        print(
            f"masked-token accuracy {result['masked_token_accuracy']:.4f} over {result['masked_patches']} "
            f"masked patches of {result['images']} held-out images\nfigure: {result['figure']}"
        )
        return
    print(
        f"masked-patch loss {result['reconstruction_loss']:.4f} (mean-patch baseline "
        f"{result['mean_patch_baseline']:.4f}) on {result['images']} held-out images, "
        f"{result['mask_ratio']:.0%} of the patches hidden\nfigure: {result['figure']}"
    )


def _generate_flags() -> None:
    _checkpoint_use_flags("GPT-2", "prompt and new token ids, text")
    flags.DEFINE_string("prompt", None, "The text to continue.")
    flags.DEFINE_integer("max_new_tokens", 50, "Tokens to generate at most (fewer if <|endoftext|> comes).")
    flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 = greedy (argmax).")
    flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens only (0: all).")
    flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set of tokens holding this probability.")
    flags.DEFINE_integer("seed", 0, "Seed of the sampling.")


def _generate() -> None:
    from maskjax import infer

    if not FLAGS.workdir or FLAGS.prompt is None:
        raise UsageError('generate needs --workdir=DIR and --prompt="..."')
    tok = infer.tokenizer_of(FLAGS.workdir, FLAGS.tokenizer)
    prompt = tok.encode(FLAGS.prompt)
    try:
        model, _ = infer.load(FLAGS.workdir, ("gpt",), FLAGS.step)
        new = infer.generate(
            model,
            prompt,
            max_new_tokens=FLAGS.max_new_tokens,
            temperature=FLAGS.temperature,
            top_k=FLAGS.top_k,
            top_p=FLAGS.top_p,
            seed=FLAGS.seed,
            eos_id=tok.eos_id,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    text = tok.decode(prompt + new)[len(tok.decode(prompt)) :]  # whole: a byte-level character may span both
    if FLAGS.json:
        print(
            json.dumps({"prompt": FLAGS.prompt, "prompt_ids": prompt, "new_ids": new, "text": text}, indent=2)
        )
    else:
        print(FLAGS.prompt + text)


class Command(NamedTuple):
    """A `maskjax` command: its flags, what it runs, and the help that explains it."""

    define_flags: Callable[[], None]
    run: Callable[[], None]
    summary: str  # its line in `maskjax --help`
    usage: str  # the flags it needs, after `maskjax COMMAND`
    about: str  # the paragraph atop `maskjax COMMAND --help`: what it does and writes
    example: str  # one command line that works as it stands (or with the user's paths)


COMMANDS: dict[str, Command] = {
    "train": Command(
        _train_flags,
        _train,
        "Pre-train a model from a config file, with checkpoints and metrics in a workdir.",
        "--config=FILE --workdir=DIR [--config.KEY=VALUE ...]",
        "Validates the whole config, builds the device mesh and trains: metrics.jsonl and TensorBoard "
        "events in the workdir, an evaluation every eval_every steps, orbax checkpoints every "
        "checkpoint_every. Started again on the same workdir it resumes from the latest checkpoint; "
        "SIGTERM saves and exits 0. On a Cloud TPU VM every host runs the same command.",
        "maskjax train --config=configs/demo/mae.py --workdir=/tmp/mae --config.total_steps=300",
    ),
    "finetune": Command(
        _transfer_flags,
        _transfer("finetune"),
        "Fine-tune a pre-trained encoder on labelled data (the papers' recipes in configs/finetune/).",
        "--config=FILE --workdir=DIR [--init=DIR] [--config.KEY=VALUE ...]",
        "A train run of a fine-tuning config: the encoder starts from --init (a maskjax workdir such as "
        "an MAE or BERT pre-training run, or a transformers directory), the task head fresh, every weight "
        "trains; same mesh, checkpoints, resume and metrics as pre-training. Without --init it trains "
        "from scratch, the baseline. Images (MAE Table 9), text classification and sentence pairs "
        "(BERT's and RoBERTa's GLUE recipes: a text encoder's sizes and tokenizer come from --init) and "
        "SQuAD-style QA. Ends with top-1 and F1, or exact match and F1, on the whole held-out split "
        "(report.json).",
        "maskjax finetune --config=configs/finetune/bert.py:reuters_grain --init=/tmp/bert --workdir=/tmp/ft",
    ),
    "probe": Command(
        _transfer_flags,
        _transfer("probe"),
        "Linear probe of a frozen pre-trained encoder (MAE Table 10), top-1 on held-out data.",
        "--config=FILE --workdir=DIR --init=DIR [--config.KEY=VALUE ...]",
        "A train run of a probe config: the encoder from --init stays frozen (no gradient, no optimizer "
        "state); its feature passes BatchNorm without affine parameters into a linear head, the only "
        "part that trains. Ends with top-1 on the whole held-out split (report.json).",
        "maskjax probe --config=configs/probe/demo.py --init=/tmp/maskjax-mae --workdir=/tmp/probe",
    ),
    "label-efficiency": Command(
        _label_efficiency_flags,
        _label_efficiency,
        "Fine-tune on 1%, 10%, 100% of the labels from pre-trained weights and from scratch; a plot.",
        "--config=FILE --init=DIR --workdir=DIR [--fractions=0.01,0.1,1] [--config.KEY=VALUE ...]",
        "For every share of the training labels (the same share of every class), runs the fine-tuning "
        "config twice, from --init and from scratch, into WORKDIR/pretrained-F and WORKDIR/scratch-F, "
        "then writes label_efficiency.json and label_efficiency.png (top-1 against the share, both "
        "curves) and prints the table. Runs that finished are only evaluated again.",
        "maskjax label-efficiency --config=configs/finetune/demo.py --init=/tmp/maskjax-mae --workdir=/tmp/le",  # noqa: E501
    ),
    "prepare-text": Command(
        _prepare_text_flags,
        _prepare_text,
        "Local text files -> a tokenizer and datasets of BERT, RoBERTa or GPT examples.",
        "--inputs=DIR_OR_GLOB --out=DIR [--layout=L] [--max-length=N,...]",
        "Splits the documents into train and validation, trains a tokenizer on the train split (or "
        "uses --tokenizer), and writes one tfds dataset per --max-length in the chosen paper's layout, "
        "plus prepare.json; prints what it wrote as JSON. A text config's data_dir can then point at "
        "--out.",
        "maskjax prepare-text --inputs='corpus/*.txt' --out=/tmp/text --max-length=128,512",
    ),
    "benchmark": Command(
        _benchmark_flags,
        _benchmark,
        "Time a config's train step here: compile, step time, tokens/s, MFU, memory.",
        "--config=FILE [--steps=N] [--warmup=N] [--phase=N] [--nosavings] [--compare=torch] [--json] "
        "[--config.KEY=VALUE ...]",
        "Measures this machine's dense-matmul peak, then the config's whole train step (every phase) "
        "on a random batch of its shapes, so paper sizes run without their data (shrink them with "
        "--config.global_batch_size). Prints compile seconds, the median step, examples/s, tokens/s "
        "(patches/s), the model FLOPs per step, MFU against the measured peak and XLA's peak memory, "
        "with the machine and library versions. For BERT and MAE it also times the step doing the "
        "work the method avoids (logits at every position; the encoder on every patch). "
        "--compare=torch times the transformers model of the same configuration on the same batch with "
        "torch's fused AdamW, one step of each in turn (the `bench` extra).",
        "maskjax benchmark --config=configs/mae_vit_base.py --config.global_batch_size=4",
    ),
    "benchmark-input": Command(
        _benchmark_input_flags,
        _benchmark_input,
        "Time a config's input pipeline against its train step, and the step's MFU.",
        "--config=FILE [--steps=N] [--config.KEY=VALUE ...]",
        "Times --steps batches of the input pipeline alone, then the train step, and prints as JSON "
        "the examples per second of each (headroom > 1: the input keeps up with the step) and the "
        "step's model FLOPs utilisation against a matmul peak measured on this machine.",
        "maskjax benchmark-input --config=configs/demo/bert.py --steps=50",
    ),
    "describe": Command(
        _describe_flags,
        _describe,
        "A config's resolved setup (sizes, exact parameter count, schedule) as JSON.",
        "--config=FILE [--config.KEY=VALUE ...]",
        "Resolves the config as a paper's hyperparameter table reads it: model sizes, the exact "
        "parameter count (from shapes alone), masking, batch, schedule, optimizer, mesh and the "
        "paper's hardware. Reads no data and allocates nothing.",
        "maskjax describe --config=configs/mae_vit_large.py",
    ),
    "compile": Command(
        _compile_flags,
        _compile,
        "Compile a config's train step for a TPU topology, no TPU needed; memory, FLOPs.",
        "--config=FILE [--topology=TPU:AxB] [--hbm-gib=GIB] [--config.KEY=VALUE ...]",
        "Lowers and compiles the whole train step for the config's mesh, on the TPU topology given "
        "(needs libtpu, no TPU: works from a CPU host) or else on emulated CPU devices, and prints "
        "per-device memory, FLOPs and whether it fits as JSON; exits 1 when it does not fit.",
        "maskjax compile --config=configs/mae_vit_large.py --topology=v3:8x8",
    ),
    "import-hf": Command(
        _import_hf_flags,
        _import_hf,
        "A Hugging Face transformers checkpoint -> a maskjax checkpoint.",
        "--hf-dir=DIR --out=DIR",
        "Reads a transformers checkpoint directory (BERT, RoBERTa, GPT-2, ViT-MAE or BEiT) without "
        "PyTorch and writes it as a maskjax checkpoint into --out; parts the checkpoint lacks are "
        "initialised from --seed and listed.",
        "maskjax import-hf --hf-dir=/models/bert-base-uncased --out=/tmp/bert-base",
    ),
    "export-hf": Command(
        _export_hf_flags,
        _export_hf,
        "A maskjax checkpoint -> a directory transformers' from_pretrained loads.",
        "--workdir=DIR --out=DIR [--step=N]",
        "Writes config.json and model.safetensors for a maskjax checkpoint (the latest, or --step) "
        "so that transformers' AutoModel...from_pretrained loads it.",
        "maskjax export-hf --workdir=/tmp/mae --out=/tmp/mae-hf",
    ),
    "fill-mask": Command(
        _fill_mask_flags,
        _fill_mask,
        "Fill the [MASK] tokens of a text with a BERT or RoBERTa checkpoint; top-k with probabilities.",
        '--workdir=DIR --text="... [MASK] ..." [--top-k=5] [--json]',
        "Encodes [CLS] text [SEP] (<s> text </s> for RoBERTa) with the workdir's tokenizer, runs the "
        "encoder and lists, for every mask in order, the most likely tokens with their probabilities "
        "and the filled-in text. Works for trained and imported checkpoints alike.",
        'maskjax fill-mask --workdir=/tmp/bert-demo --text="the cat sat on the [MASK]."',
    ),
    "reconstruct": Command(
        _reconstruct_flags,
        _reconstruct,
        "MAE's Figure 2 for held-out images (BEiT: the masked-token accuracy map).",
        "--workdir=DIR [--out=FIGURE.png] [--mask-ratio=0.75] [--n=8]",
        "Masks --n held-out images of the run's dataset (or --dataset) at --mask-ratio, runs the MAE "
        "checkpoint and writes one column per image: the original, the masked input, the "
        "reconstruction and the reconstruction with the visible patches pasted back; prints the "
        "masked-patch loss beside the predict-the-mean-patch baseline. For a BEiT run: a fresh block "
        "mask, and each masked patch green where the model's top visual token is its tokenizer's, red "
        "where not; prints that masked-token accuracy.",
        "maskjax reconstruct --workdir=/tmp/maskjax-mae --out=/tmp/mae-figure.png --mask-ratio=0.75",
    ),
    "generate": Command(
        _generate_flags,
        _generate,
        "Continue a prompt with a GPT-2 checkpoint: greedy or sampled, with a key/value cache.",
        '--workdir=DIR --prompt="..." [--max-new-tokens=N] [--temperature=T] [--top-k=K] [--top-p=P]',
        "Encodes the prompt with the workdir's tokenizer and generates up to --max-new-tokens tokens in "
        "one compiled program (the prompt fills a key/value cache, then one cached step per token); "
        "--temperature=0 is greedy. Stops after <|endoftext|>.",
        'maskjax generate --workdir=/tmp/gpt-demo --prompt="The function" --temperature=0',
    ),
}

_HELP_ARGS = ("--help", "-h", "-help", "-?", "--helpshort")  # --helpfull stays absl's: every flag
_VERBOSITY_ARGS = ("--verbosity", "-verbosity", "-v", "--v")
_WIDTH = 100
_GLOBAL_FLAGS = (
    (
        "-v, --verbosity",
        "Show the libraries' logs too: -1 their warnings and libtpu's start-up messages, 0 also INFO, "
        "1 DEBUG. Without it a run shows maskjax's own output and errors only.",
    ),
    ("-h, --help", "This help. --helpfull lists every flag absl knows."),
)


def _dashed(name: str) -> str:
    """hf_dir -> hf-dir: the spelling the docs use (both work, see `_underscore_flag_name`)."""
    return name.replace("_", "-")


def _rows(rows: list[tuple[str, str]], indent: int = 2) -> str:
    """Two columns, the second wrapped under itself; a name too long for the column gets its own line.

    Runs of text joined by "\x1f" (e.g. "[default: none]") are not broken across lines.
    """
    left = indent + min(max(len(name) for name, _ in rows), 24) + 2
    lines = []
    for name, text in rows:
        head = " " * indent + name
        head = head.ljust(left) if len(head) + 2 <= left else head + "\n" + " " * left
        body = textwrap.fill(text, _WIDTH, initial_indent=" " * left, subsequent_indent=" " * left)
        lines.append(head + body[left:].replace("\x1f", " "))
    return "\n".join(lines)


def overview() -> str:
    """`maskjax --help`: every command, one line each."""
    rows = [(name, c.summary) for name, c in COMMANDS.items()]
    return "\n".join(
        [
            "usage: maskjax COMMAND [--flags]",
            "",
            "Masked-modeling pre-training in JAX/Flax: BERT, RoBERTa, GPT-2, MAE and BEiT.",
            "",
            "commands:",
            _rows(rows),
            "",
            "`maskjax COMMAND --help` (or `maskjax help COMMAND`) explains a command and lists its flags.",
            "Every command takes -v/--verbosity=N to show the libraries' logs; runs are quiet by default.",
        ]
    )


def define_command_flags(command: str) -> list[flags.Flag]:
    """Define `command`'s flags in absl's FLAGS; return them (not absl's own), in definition order."""
    known = set(FLAGS)
    COMMANDS[command].define_flags()
    return [FLAGS[name] for name in FLAGS if name not in known and FLAGS[name].name == name]


def _default(flag: flags.Flag) -> str:
    if flag.default is None:
        return "none"
    if isinstance(flag.default, bool):
        return str(flag.default).lower()
    if isinstance(flag.default, list):
        return ",".join(map(str, flag.default))
    return str(flag.default)


def command_help(command: str, own: list[flags.Flag]) -> str:
    """`maskjax COMMAND --help`: what it is for, an example, its flags with their defaults."""
    cmd = COMMANDS[command]
    rows = []
    for flag in own:
        name = ("--[no]" if flag.boolean else "--") + _dashed(flag.name)
        text = flag.help.strip()
        if flag.default is not None or "default" not in text:  # else the help says what it defaults to
            text += " " + f"[default: {_default(flag)}]".replace(" ", "\x1f")
        rows.append((name, text))
        if flag.name == "config":
            rows.append(("--config.KEY=VALUE", "Override one field of the config, e.g. --config.seed=1."))
    return "\n".join(
        [
            f"usage: maskjax {command} {cmd.usage}",
            "",
            textwrap.fill(cmd.about, _WIDTH),
            "",
            "example:",
            f"  {cmd.example}",
            "",
            "flags:",
            _rows(rows) if rows else "  (none)",
            "",
            "global flags:",
            _rows(list(_GLOBAL_FLAGS)),
        ]
    )


def _show(text: str) -> NoReturn:
    """Print help and exit 0, also when a pager or `head` closes the pipe early."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
    sys.exit(0)


def _fail(message: str) -> NoReturn:
    """A command line we cannot run: the list of commands, then what was wrong, exit status 2."""
    print(overview(), file=sys.stderr)
    print(f"\nmaskjax: {message}", file=sys.stderr)
    sys.exit(2)


def _known_command(word: str) -> str:
    """`word` if it names a command; otherwise fail, suggesting the nearest one."""
    if word in COMMANDS:
        return word
    if word.startswith("-"):
        _fail(f"the command comes first, then its flags: maskjax COMMAND [--flags]; got {word!r}")
    near = difflib.get_close_matches(word, COMMANDS, n=1)
    _fail(f"unknown command {word!r}" + (f"; did you mean {near[0]!r}?" if near else ""))


def _before_double_dash(args: list[str]) -> list[str]:
    return args[: args.index("--")] if "--" in args else args


def _asks_for_help(args: list[str]) -> bool:
    return any(a in _HELP_ARGS for a in _before_double_dash(args))


def _verbosity_given(args: list[str]) -> bool:
    """-v/--verbosity on the command line, found before absl parses it (JAX must not be imported yet)."""
    return any(a.split("=", 1)[0] in _VERBOSITY_ARGS for a in _before_double_dash(args))


def _tpu_here() -> bool:
    """TPU chips on this host (the check `maskjax.distributed` joins a pod by), or a TPU named in the
    environment; false positives only cost quiet (JAX then tries libtpu)."""
    from maskjax import distributed

    if any(os.environ.get(v) for v in ("TPU_ACCELERATOR_TYPE", "TPU_NAME", "JAX_FORCE_TPU_INIT")):
        return True
    return distributed.on_tpu_host()


def _pjrt_plugin_installed() -> bool:
    """A GPU (or other) backend JAX would discover: a jax_plugins module or entry point, or one named
    in PJRT_NAMES_AND_LIBRARY_PATHS. Without one, the CPU is all JAX can use on a host without a TPU."""
    import importlib.metadata
    import pkgutil

    if os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS"):
        return True
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and any(pkgutil.iter_modules(spec.submodule_search_locations or [])):
        return True
    return bool(importlib.metadata.entry_points(group="jax_plugins"))


def _quiet_native_logs() -> None:
    """Before JAX and libtpu load: their C++ INFO lines off, and no libtpu start on a host without a TPU.

    With the `tpu` extra installed JAX tries libtpu on every host, and on one without a TPU that
    prints a dozen lines of errors before falling back to the CPU; JAX_PLATFORMS=cpu skips the try.
    An explicit JAX_PLATFORMS (even empty) is the user's choice and is kept.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    if (
        "JAX_PLATFORMS" not in os.environ
        and importlib.util.find_spec("libtpu") is not None
        and not _tpu_here()
        and not _pjrt_plugin_installed()
    ):
        os.environ["JAX_PLATFORMS"] = "cpu"
        if "jax" in sys.modules:  # imported already, its config has read the environment
            sys.modules["jax"].config.update("jax_platforms", "cpu")


def from_orbax(record: logging.LogRecord) -> bool:
    """A record orbax logged, or one about an orbax task: its message or its traceback's frames name orbax.

    asyncio's "Future exception was never retrieved" for a failed orbax write names orbax only in the
    traceback it carries (exc_info), and only when the task is collected before the process ends."""
    if "/orbax/" in record.pathname or "/orbax/" in record.getMessage():
        return True
    tb = record.exc_info[2] if record.exc_info else None
    return tb is not None and any("/orbax/" in frame.filename for frame in traceback.extract_tb(tb))


def _quiet_python_logs() -> None:
    """After absl parsed the flags (it turns INFO on when --verbosity is absent): warnings and up only.

    tfds and orbax log through the `absl` logger, dozens of INFO lines per run and hints such as
    OpenCV's absence; those show from -v -1 on. tfds' progress bars go too. A failed save or restore
    makes orbax log each failed write or read with its traceback (and asyncio each orbax task left
    with it), then orbax raises and maskjax says it in one line (`errors.CheckpointNotWritten`,
    `errors.CheckpointDamaged`): those records, and only those, show only with -v.
    """
    logging.root.setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("absl").addFilter(lambda r: not from_orbax(r))
    logging.getLogger("asyncio").addFilter(lambda r: not from_orbax(r))
    # ...and tensorstore's write callbacks, finding orbax's event loop closed after the first failure,
    # report "Event loop is closed" as an unraisable error, once per pending write.
    report = sys.unraisablehook

    def unraisable(u: Any) -> None:
        if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
            report(u)

    sys.unraisablehook = unraisable
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        return
    tfds.display_progress_bar(False)


def _underscore_flag_name(arg: str) -> str:
    """--hf-dir=a-b -> --hf_dir=a-b: absl spells flags with underscores; the docs use dashes."""
    if not arg.startswith("--"):
        return arg
    name, sep, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + sep + value


def main(argv: list[str] | None = None) -> None:
    """`maskjax COMMAND [--flags]`: help and mistyped commands are answered before anything loads."""
    argv = list(sys.argv if argv is None else argv)
    args = argv[1:]
    if not args:
        _fail("no command given; `maskjax help COMMAND` explains one, e.g. `maskjax help train`")
    if args[0] in ("help", *_HELP_ARGS):
        if args[0] == "help" and len(args) > 1:
            command = _known_command(args[1])
            _show(command_help(command, define_command_flags(command)))
        _show(overview())
    command = _known_command(args[0])
    own = define_command_flags(command)
    if _asks_for_help(args[1:]):
        _show(command_help(command, own))
    quiet = not _verbosity_given(args[1:])
    if quiet:
        _quiet_native_logs()
    run = COMMANDS[command].run
    rest = [_underscore_flag_name(a) for a in args[1:]]

    from maskjax import errors

    def _run(_: list[str]) -> None:
        if quiet:
            _quiet_python_logs()
        try:
            run()
        except (UsageError, FileNotFoundError, *errors.ONE_LINE) as e:  # one line, exit 1
            sys.exit(f"maskjax {command}: {e}")

    from maskjax import distributed

    # Join the job's other processes, if any, before JAX starts; on a TPU VM, train jointly by default.
    distributed.maybe_initialize(detect_tpu=command in ("train", "benchmark", "benchmark-input"))
    with distributed.fail_fast():
        app.run(_run, argv=[f"maskjax {command}", *rest])
