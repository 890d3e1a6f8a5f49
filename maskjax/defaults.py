"""What every config starts from, and how one config file reuses another.

    c = defaults.base("bert")                  # every default, declared once (a config then sets the rest)
    c = defaults.from_file(Path(__file__).with_name("gpt2_small.py"), "medium")   # its get_config("medium")

Configs are locked when `--config=FILE` loads them, so a key the file does not hold cannot be set on
the command line. `base` therefore declares every key the code reads with a default (at that default):
`--config.grad_accum_steps=4`, `--config.model.remat=full` or `--config.data.num_workers=8` work on any
config. `define_config_flag` is config_flags' `--config` flag with one change: an unknown key or
variant is one line naming the nearest valid ones instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import sys
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import ml_collections
from absl import flags
from ml_collections import config_dict
from ml_collections.config_flags import config_flags as _config_flags
from ml_collections.config_flags import config_path

T = TypeVar("T")


class ConfigKeyError(flags.Error):
    """A `--config.KEY` or `FILE:VARIANT` the config does not have.

    A flags error, not a ValueError: config_flags would re-raise a ValueError from `get_config` with
    its traceback pasted into the message; absl prints a flags error as one line.
    """


class UnknownVariantError(ConfigKeyError):
    """`FILE:VARIANT` names a variant the file does not have."""


def _placeholder_or_value(value: Any, hint: Any) -> Any:
    """A None default as a typed placeholder, so `--config.KEY=VALUE` can set it (config_flags cannot
    parse a value for a field whose type is NoneType)."""
    if value is not None:
        return value
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        if args[0] in (int, float, str, bool):
            return config_dict.placeholder(args[0])
    return None


def model_defaults(model: str) -> dict[str, Any]:
    """The family's model dataclass fields that have a default, at that default.

    Sizes without a default (hidden, layers, ...) are left for the config: the model section holds
    dataclass fields only, since `models.make_config` rejects any other key.
    """
    from maskjax import models  # here, not at the top: the CLI defines its flags before JAX may load

    cls = models.config_class(model)
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = _placeholder_or_value(f.default, hints[f.name])
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def base(family: str) -> ml_collections.ConfigDict:
    """A config of method `family` holding every default the code assumes, at the value the code
    assumes (data defaults for the kind of data the method reads, `Method.data`).

    Every file under configs/ starts here, then sets its own values (sections with `.update`, so the
    defaults it does not set stay declared). Not declared: what a config must state itself —
    total_steps, global_batch_size, the log/eval/checkpoint cadence (validation names a missing one),
    the data source, masking, optimizer name and betas, schedule decay.
    """
    from maskjax import methods

    method = methods.get(family)
    data_kind = method.data
    c = ml_collections.ConfigDict()
    c.family = family
    c.seed = 0
    c.grad_accum_steps = 1  # micro-batches per step (train.py, config.validate)
    c.keep_checkpoints = 3  # orbax max_to_keep (train.py)
    c.eval_batches = 4  # held-out batches per evaluation (train.py, methods)
    c.max_nonfinite_steps = 3  # consecutive skipped non-finite steps before the run stops (train.py)
    # Continued pre-training: the weights to start from (a maskjax workdir, or a transformers checkpoint
    # directory); a fresh optimizer at step 0. None: a fresh initialisation. Resuming a run ignores it.
    c.init = config_dict.placeholder(str)
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}  # pure data parallel over every device
    data: dict[str, Any] = dict(
        kind=data_kind,
        data_dir=config_dict.placeholder(str),  # None: $MASKJAX_DATA_DIR or ~/.cache/maskjax
        num_workers=0,  # input-pipeline worker processes; 0: in the training process
        train_split="train",
        eval_split="validation",
    )
    if data_kind == "text":
        data.update(
            corpus=config_dict.placeholder(str),  # None: the bundled demo corpus
            tokenizer=config_dict.placeholder(str),  # an existing tokenizer (folder or file); None: train one
            prepare_seed=0,  # the train/validation split and NSP pairing when prepared on first use
        )
    elif data_kind == "labelled_text":  # data/labelled_text.py
        data.update(
            dataset="",  # a local set (polarity, reuters_grain, reuters_corn, jsonl) or a prepared tfds name
            # jsonl: the folder of SPLIT.jsonl files; reuters_*: the folder of weka's ARFF files
            root=config_dict.placeholder(str),
            tokenizer=config_dict.placeholder(str),  # None: the one config.init carries
            seq_length=128,
            label_fraction=1.0,
        )
    elif data_kind == "span_qa":  # data/span_qa.py; BERT's SQuAD settings (run_squad.py)
        data.update(
            dataset="",  # squad_json (your SQuAD-format files under data.root) or a prepared tfds "squad"
            root=config_dict.placeholder(str),
            tokenizer=config_dict.placeholder(str),  # None: the one config.init carries
            seq_length=384,
            doc_stride=128,
            max_query_length=64,
            max_answer_length=30,
        )
    else:  # image families (data/loaders.py's defaults)
        data.update(
            scale=(0.2, 1.0),  # RandomResizedCrop area range
            ratio=(3 / 4, 4 / 3),  # RandomResizedCrop aspect range
            flip=True,
            color_jitter=(0.0, 0.0, 0.0),  # brightness, contrast, saturation strengths; 0: none
            crop_pct=0.875,  # evaluation: centre crop of a resize to image_size / crop_pct
            channels=config_dict.placeholder(int),  # None: as stored
            label_fraction=1.0,  # train on this share of every class's labelled images (label efficiency)
        )
    c.data = data
    if data_kind == "text" and method.features is not None:  # a ridge probe on a labelled text set
        c.evals = dict(
            train_examples=0,
            test_examples=0,
            text=dict(
                dataset="polarity", root=config_dict.placeholder(str), train_split="train", eval_split="test"
            ),
            ridge=dict(every=0, l2=1e-2),
        )
    if data_kind == "image":  # frozen-feature evaluators during the run (evaluators/features.py); 0: off
        c.evals = dict(
            train_examples=0,  # labelled images the probes fit on (data.train_split); 0: all of them
            test_examples=0,  # images they are scored on (data.eval_split); 0: all of them
            knn=dict(every=0, k=20, temperature=0.07),
            ridge=dict(every=0, l2=1e-2),
        )
    c.model = model_defaults(method.model)
    if method.task != "pretrain":  # classification (methods/classify.py): off unless a recipe turns it on
        c.task = dict(label_smoothing=0.0, mixup=0.0, cutmix=0.0, switch_prob=0.5, mix_prob=1.0)
    c.optimizer = dict(
        grad_clip=config_dict.placeholder(float),  # None: no clipping
        no_decay=("bias", "scale"),  # parameter-name parts exempt from weight decay
        bias_correction=True,  # Adam's; False: BERT's release (optim.scale_by_adam_uncorrected)
        layer_decay=1.0,  # layer-wise lr decay (BEiT / MAE fine-tuning); 1.0: none
        layer_decay_embed=(),  # parameter-name parts scaled as the embedding layer (layer 0)
    )
    c.schedule = dict(warmup_steps=0, end_lr=0.0)
    return c


def steps_from_epochs(
    c: ml_collections.ConfigDict,
    train_images: int | config_dict.FieldReference,
    warmup_percent: int | None = None,
) -> None:
    """Set total_steps and schedule.warmup_steps from schedule.epochs / warmup_epochs, as references:
    steps = ⌈epochs · train_images / global_batch_size⌉, so `--config.schedule.epochs=1600` or another
    batch moves them too (the papers count epochs, the loop counts steps). `warmup_percent`: warm up
    over ⌈that share⌉ of the steps instead (BERT's 10%, RoBERTa's 6%; no warmup_epochs then)."""
    batch = c.get_ref("global_batch_size")
    c.total_steps = (c.schedule.get_ref("epochs") * train_images + batch - 1) // batch
    if warmup_percent is not None:
        c.schedule.warmup_steps = (c.get_ref("total_steps") * warmup_percent + 99) // 100
        return
    c.schedule.warmup_steps = (c.schedule.get_ref("warmup_epochs") * train_images + batch - 1) // batch


def from_file(path: str | Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file at `path`, as `--config=PATH:ARG` would load it.

    A size file names its base beside it: `from_file(Path(__file__).with_name("gpt2_small.py"), "xl")`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file {path}")
    module_spec = importlib.util.spec_from_file_location(f"maskjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def package_path(package: str, *parts: str) -> str | None:
    """The path of `parts` inside installed package `package` (not imported), or None without it: a
    config's reference to data or weights a pip package ships."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(next(iter(spec.submodule_search_locations)), *parts))


def variant(variants: Mapping[str, T], name: str) -> T:
    """`variants[name]`, or a one-line error naming the variants there are (`FILE:VARIANT`)."""
    if name not in variants:
        raise UnknownVariantError(f"no variant {name!r}; the variants are {', '.join(variants)}")
    return variants[name]


def dotted_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every key of `config` as `--config.` spells it: sections and their fields."""
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(dotted_keys(value, f"{prefix}{key}."))
    return keys


def _exists(config: ml_collections.ConfigDict, key: str) -> bool:
    try:
        config_path.get_value(key, config)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return False
    return True


def check_overrides(
    config: ml_collections.ConfigDict,
    overrides: Iterable[str],
    source: str = "the config",
    flag: str = "config",
) -> None:
    """Raise `ConfigKeyError` for the first override key `config` does not have, naming the nearest."""
    if not isinstance(config, ml_collections.ConfigDict):
        return  # the file failed to load: config_flags reports that
    for key in overrides:
        if not _exists(config, key):
            keys = dotted_keys(config)
            nearest = difflib.get_close_matches(key, keys, n=3, cutoff=0.6) or difflib.get_close_matches(
                key, keys, n=3, cutoff=0.0
            )
            raise ConfigKeyError(f"--{flag}.{key}: {source} has no such key; nearest: {', '.join(nearest)}")


class _ConfigFileFlag(_config_flags._ConfigFlag):
    """config_flags' `--config=FILE[:ARG]` flag, checking the override keys before it defines them."""

    def __init__(self, *, exit_on_error: bool, **kwargs: Any) -> None:
        self._exit_on_error = exit_on_error  # before super().__init__, which may already parse
        self._source = "the config"
        super().__init__(**kwargs)

    def _initialize_missing_parent_fields(self, config: Any, overrides: Sequence[str]) -> None:
        # The first thing config_flags does with the overrides; it fails on an unknown parent.
        check_overrides(config, overrides, self._source, self.name)
        super()._initialize_missing_parent_fields(config, overrides)

    def _parse(self, argument: str) -> Any:
        self._source = argument.split(":", 1)[0]
        try:
            return super()._parse(argument)
        except ConfigKeyError as e:
            # An override's message names its key; a variant's needs the --config value it came from.
            error = type(e)(f"--{self.name}={argument}: {e}") if isinstance(e, UnknownVariantError) else e
            if self._exit_on_error:
                sys.exit(f"maskjax: {error}")
            raise error from None


def define_config_flag(
    name: str,
    help_string: str,
    *,
    flag_values: flags.FlagValues = flags.FLAGS,
    sys_argv: list[str] | None = None,
    exit_on_error: bool = False,
) -> flags.FlagHolder:
    """`config_flags.DEFINE_config_file(name, lock_config=True)`, with unknown keys explained.

    exit_on_error: print the one line and exit 1 (for a CLI, whose flags absl parses inside `app.run`,
    which would add a second line of usage advice), rather than raise `ConfigKeyError`.
    """
    flag = _ConfigFileFlag(
        parser=_config_flags.ConfigFileFlagParser(name=name, lock_config=True),
        serializer=flags.ArgumentSerializer(),
        name=name,
        default=None,
        help_string=help_string,
        flag_values=flag_values,
        sys_argv=sys_argv,
        exit_on_error=exit_on_error,
    )
    return flags.DEFINE_flag(flag, flag_values)
