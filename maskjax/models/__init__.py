"""The model families. Each module holds one family's config dataclass and Flax NNX model.

bert.py  BERT and RoBERTa (post-LN encoder, MLM head at gathered positions, NSP)
gpt.py   GPT-2 (pre-LN causal decoder, tied output)
vit.py   ViT and MAE (encoder on visible patches only, narrow decoder)
beit.py  BEiT (relative position bias, layer scale, [MASK] patch) and its VQ tokenizer
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from typing import Any, NamedTuple

import jax
from flax import nnx


class Family(NamedTuple):
    """A model architecture: where its config dataclass and NNX model live, and (optionally) the
    `maskjax.interop` module that converts it to and from transformers checkpoints."""

    module: str
    config: str
    model: str
    interop: str | None = None


# One line per architecture. BERT and RoBERTa share one model; their configs differ where the papers
# differ (positions, token types, NSP). A checkpoint's "family" is a key of this table.
FAMILIES: dict[str, Family] = {
    "bert": Family("maskjax.models.bert", "BertConfig", "Bert", "maskjax.interop.bert"),
    "roberta": Family("maskjax.models.bert", "BertConfig", "Bert", "maskjax.interop.bert"),
    "gpt": Family("maskjax.models.gpt", "GptConfig", "Gpt", "maskjax.interop.gpt"),
    "mae": Family("maskjax.models.vit", "MaeConfig", "Mae", "maskjax.interop.mae"),
    "vit": Family("maskjax.models.vit", "VitConfig", "Vit"),
    "beit": Family("maskjax.models.beit", "BeitConfig", "Beit", "maskjax.interop.beit"),
    "vqvae": Family("maskjax.models.beit", "VqConfig", "VqTokenizer"),
}


def _lookup(family: str) -> tuple[type, type]:
    if family not in FAMILIES:
        raise ValueError(f"model family must be one of {sorted(FAMILIES)}; got {family!r}")
    entry = FAMILIES[family]
    mod = importlib.import_module(entry.module)
    return getattr(mod, entry.config), getattr(mod, entry.model)


def config_class(family: str) -> type:
    return _lookup(family)[0]


def _coerce(hint: Any, value: Any) -> Any:
    """JSON/ConfigDict values back to the dataclass field's type (lists -> tuples)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    if (hint is tuple or origin is tuple) and isinstance(value, list | tuple):
        return tuple(value)
    return value


def make_config(family: str, values: dict[str, Any], *, drop_moved: bool = False) -> Any:
    """A family's config dataclass from plain values, naming any unknown field.

    Fields a config class lists in `MOVED` (once model fields, now set elsewhere) are refused with
    their new place, or dropped with `drop_moved` (a checkpoint's spec written before the move).
    """
    cls = config_class(family)
    hints = {
        k: v for k, v in typing.get_type_hints(cls).items() if typing.get_origin(v) is not typing.ClassVar
    }
    moved = getattr(cls, "MOVED", {})
    for old, new in moved.items():
        if old in values and drop_moved:
            values = {k: v for k, v in values.items() if k != old}
        elif old in values:
            raise ValueError(f"model.{old} has moved: set {new} instead")
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"model.{unknown[0]} is not a field of {cls.__name__}; allowed: {sorted(hints)}")
    return cls(**{k: _coerce(hints[k], v) for k, v in values.items()})


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def build(family: str, cfg: Any, seed: int | jax.Array = 0) -> nnx.Module:
    """A freshly initialised model of `family` (use `nnx.eval_shape` around it to avoid allocation)."""
    return _lookup(family)[1](cfg, rngs=nnx.Rngs(seed))


def param_count(family: str, cfg: Any) -> int:
    """Exact number of parameters, from shapes alone (no allocation)."""
    abstract = nnx.eval_shape(lambda: build(family, cfg))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
