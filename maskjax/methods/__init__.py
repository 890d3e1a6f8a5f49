"""Methods: what one training run optimises. One short module per method; this file is the interface.

A method is a `Method` record (below), registered by one line in `REGISTRY`. The train loop, the
ahead-of-time compiler (`maskjax.aot`), `maskjax describe` and the benchmarks know a method only
through these fields; nothing outside a method module switches on its name.

  loss(model, batch, key, config, *, train, extras) -> (loss, metrics)
      pure; runs inside the one jitted step: masking + model + loss, the place a paper reader looks.
      A loss that averages over a varying number of predictions puts its parts in
      metrics["loss_terms"] = {name: (mean, count)}, loss = Σ mean, so that gradient accumulation
      weighs microbatches as one big batch would (`Trainer._accumulate`).
  batch_spec(config, model_cfg) -> {name: ShapeDtypeStruct}
      the global batch the loaders produce (ahead-of-time compiles lower from it)
  flops(config, model_cfg) -> int
      analytic model FLOPs of one train step (forward + backward, attention included); the numerator
      of MFU and of the throughput line. The formula is in each method's docstring.
  data                                         "text" or "image": the loaders and defaults it reads
  describe_masking(config, model_cfg) -> {"strategy", "ratio", "max_predictions"}
      what `describe` prints beside the paper's table
  validate(config, model_cfg) -> None          optional: method-specific checks, raising ConfigError
  extras(config) / extras_spec(config)         optional, both or neither: frozen inputs of the loss
      (BEiT's visual tokenizer) and their ShapeDtypeStructs, passed into the step, never trained
  evaluators                                   names in `maskjax.evaluators` run after training
  init_weights(family, params, model_cfg) -> params   optional: what `config.init` takes from a
      checkpoint of another family (a classifier's encoder from MAE); without it, the same family only
  roles(config, params) -> tree of "train" | "frozen" | "running_stat"   optional (maskjax.optim):
      a linear probe freezes its encoder; None: every parameter trains
  task                                         "pretrain", "finetune" or "probe": the command that runs it
  features(model, images) -> (B, D)            optional: frozen image features for `config.evals`
  logits(model, batch) -> (B, C)               a classifier's: what the `top1` evaluator scores
  init_fields                                  model fields `config.init`'s checkpoint sets (its
      architecture), so one fine-tuning config serves every size; () : the config's own sizes
  example_batch(config, model_cfg, rng) -> {name: np.ndarray}   optional: one global batch of
      `batch_spec`'s shapes with values the loss accepts (random tokens or pixels), so that
      `maskjax benchmark` times any config, paper sizes included, without its data
  savings(config, model_cfg) -> {what: {dotted key: value}}   optional: the config changes that
      make the step do the work the method avoids (BERT: vocabulary logits at every position; MAE:
      the encoder on every patch); `maskjax benchmark` times each beside the config

`model` names the architecture in `maskjax.models.FAMILIES` that `loss` receives. A new method is
its own module plus one `REGISTRY` line; `get(name)` checks the record the first time it is loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# method name -> "module:attribute" of its `Method`
REGISTRY: dict[str, str] = {
    "bert": "maskjax.methods.bert:BERT",
    "roberta": "maskjax.methods.bert:ROBERTA",
    "gpt": "maskjax.methods.gpt:GPT",
    "mae": "maskjax.methods.mae:MAE",
    "beit": "maskjax.methods.beit:BEIT",
    "vqvae": "maskjax.methods.vqvae:VQVAE",
    "image_classification": "maskjax.methods.classify:FINETUNE",
    "linear_probe": "maskjax.methods.classify:PROBE",
    "beit_classification": "maskjax.methods.classify:BEIT_FINETUNE",
    "text_classification": "maskjax.methods.text_classify:TEXT_CLASSIFICATION",
    "span_qa": "maskjax.methods.span_qa:SPAN_QA",
}

TASKS = ("pretrain", "finetune", "probe")


DATA_KINDS = ("text", "image", "labelled_text", "span_qa")  # what maskjax.data.loaders reads


@dataclasses.dataclass(frozen=True)
class Method:
    """One training objective; see the module docstring for each field's contract."""

    name: str
    model: str
    data: str
    loss: Callable[..., tuple[jax.Array, dict]]
    batch_spec: Callable[[Any, Any], dict[str, jax.ShapeDtypeStruct]]
    flops: Callable[[Any, Any], int]
    describe_masking: Callable[[Any, Any], dict[str, Any]]
    validate: Callable[[Any, Any], None] | None = None
    extras: Callable[[Any], Any] | None = None
    extras_spec: Callable[[Any], Any] | None = None
    evaluators: tuple[str, ...] = ()
    init_weights: Callable[[str, dict, Any], dict] | None = None
    roles: Callable[[Any, dict], Any] | None = None
    task: str = "pretrain"
    features: Callable[[Any, jax.Array], jax.Array] | None = None
    logits: Callable[[Any, dict], jax.Array] | None = None
    init_fields: tuple[str, ...] = ()
    example_batch: Callable[[Any, Any, np.random.Generator], dict[str, np.ndarray]] | None = None
    savings: Callable[[Any, Any], dict[str, dict[str, Any]]] | None = None


# Positional parameters each callable must accept (the loss's `train` and `extras` are keywords).
_ARITY = {
    "batch_spec": 2, "flops": 2, "describe_masking": 2, "validate": 2, "extras": 1, "extras_spec": 1,
    "init_weights": 3, "roles": 2, "features": 2, "logits": 2, "example_batch": 3, "savings": 2,
}  # fmt: skip


def check(method: Method) -> Method:
    """Refuse a record that would fail later, deep inside a run: name, model, signatures, evaluators."""
    from maskjax import evaluators, models

    where = f"method {method.name!r}"
    if method.model not in models.FAMILIES:
        raise TypeError(f"{where}: model must be one of {sorted(models.FAMILIES)}; got {method.model!r}")
    if method.task not in TASKS:
        raise TypeError(f"{where}: task must be one of {list(TASKS)}; got {method.task!r}")
    if method.data not in DATA_KINDS:
        raise TypeError(f"{where}: data must be one of {list(DATA_KINDS)}; got {method.data!r}")
    loss_params = inspect.signature(method.loss).parameters
    if list(loss_params)[:4] != ["model", "batch", "key", "config"] or not {"train", "extras"} <= set(
        loss_params
    ):
        raise TypeError(f"{where}: loss must be loss(model, batch, key, config, *, train, extras)")
    for field, arity in _ARITY.items():
        fn = getattr(method, field)
        if fn is None:
            continue
        try:
            inspect.signature(fn).bind(*range(arity))
        except TypeError:
            raise TypeError(f"{where}: {field} must take {arity} positional argument(s)") from None
    if (method.extras is None) != (method.extras_spec is None):
        raise TypeError(f"{where}: extras and extras_spec come together (the step needs both)")
    unknown = sorted(set(method.evaluators) - set(evaluators.REGISTRY))
    if unknown:
        raise TypeError(f"{where}: evaluator {unknown[0]!r} is not one of {sorted(evaluators.REGISTRY)}")
    return method


@functools.cache
def get(name: str) -> Method:
    """The registered method `name` (a config's `family`), checked on first use."""
    if name not in REGISTRY:
        raise ValueError(f"family must be one of {sorted(REGISTRY)}; got {name!r}")
    module, attribute = REGISTRY[name].split(":")
    method = getattr(importlib.import_module(module), attribute)
    if method.name != name:
        raise TypeError(f"REGISTRY[{name!r}] points at method {method.name!r}")
    return check(method)


# ------------------------------------------------------------------ pieces several methods share


def image_batch_spec(config: Any, model_cfg: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the image loaders produce: {"image": (B, H, W, C) float32, normalised}."""
    size, channels = model_cfg.image_size, model_cfg.channels
    return {"image": jax.ShapeDtypeStruct((config.global_batch_size, size, size, channels), jnp.float32)}


def image_example_batch(config: Any, model_cfg: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """`image_batch_spec`'s batch filled with unit-normal pixels (what normalised images look like)."""
    spec = image_batch_spec(config, model_cfg)["image"]
    return {"image": rng.standard_normal(spec.shape, np.float32)}


def stack_flops(d: int, f: int, layers: int, tokens: int) -> int:
    """Forward FLOPs of `layers` transformer blocks (width d, MLP width f) on one sequence of `tokens`.

    Per layer: the q, k, v and output projections 4·D² and the MLP 2·D·F multiply-adds per token
    (2 FLOPs each), plus q·kᵀ and probs·v, 2·T²·D each — computed in full, also under a causal or
    padding mask. Training counts 3× a forward (backward = 2× forward); rematerialisation is not
    counted (model FLOPs, as in MFU). Embedding lookups are not matmuls.
    """
    return layers * (2 * tokens * (4 * d * d + 2 * d * f) + 4 * tokens * tokens * d)


def no_masking(config: Any, model_cfg: Any) -> dict[str, Any]:
    """`describe_masking` of a method that masks nothing (next-token prediction, a tokenizer, a task head)."""
    return {"strategy": None, "ratio": None, "max_predictions": None}
