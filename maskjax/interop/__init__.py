"""Hugging Face transformers checkpoints <-> maskjax parameters.

One module per family holds the name mapping (bert.py also covers RoBERTa), named by the
family's line in `maskjax.models.FAMILIES`, and says which transformers architectures
(`HF_ARCHITECTURES`) and model types (`HF_MODEL_TYPES`) it reads. This file only dispatches:

  load_hf(dir_or_torch_model) -> Imported(family, config, params, missing, masking)
  save_hf(family, config, params, out_dir, masking=None)   config.json + model.safetensors

Where transformers' config also holds training settings (ViTMAE's mask_ratio, norm_pix_loss), the
module maps them to `config.masking` fields (`HF_MASKING`): exported from the run's config,
returned on import for the user's config.

Weights are read and written with safetensors' numpy API, so converting needs
no PyTorch; transformers is needed for its config classes (`maskjax[hf]`).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from maskjax import models


def _modules() -> list[str]:
    return list(dict.fromkeys(f.interop for f in models.FAMILIES.values() if f.interop))


class Imported(NamedTuple):
    family: str
    config: Any
    params: dict  # pure dict of numpy arrays, as nnx.to_pure_dict
    missing: list[str]  # parameter paths the checkpoint lacked (freshly initialised)
    masking: dict  # training settings the checkpoint's config states, as config.masking fields


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("converting checkpoints needs transformers: pip install 'maskjax[hf]'") from e
    return transformers


def _module_for(architecture: str):
    for name in _modules():
        module = importlib.import_module(name)
        if architecture in module.HF_ARCHITECTURES:
            return module
    known = sorted(a for n in _modules() for a in importlib.import_module(n).HF_ARCHITECTURES)
    raise ValueError(f"architecture {architecture!r} is not supported; supported: {known}")


def _read_dir(path: Path) -> tuple[Any, dict[str, np.ndarray]]:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--hf-dir={path} has no config.json (a transformers checkpoint directory)")
    hf_config = _transformers().AutoConfig.from_pretrained(path)
    if (path / "model.safetensors").exists():
        from safetensors.numpy import load_file

        return hf_config, load_file(path / "model.safetensors")
    if (path / "pytorch_model.bin").exists():
        import torch

        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        return hf_config, {k: v.float().numpy() for k, v in state.items()}
    raise FileNotFoundError(f"--hf-dir={path} has neither model.safetensors nor pytorch_model.bin")


def _merge(base: dict, update: Mapping, path: str = "") -> list[str]:
    """Write `update` into `base` in place; return the paths of `base` it did not cover."""
    missing = []
    for key, value in base.items():
        where = f"{path}/{key}"
        if key not in update:
            missing.append(where)
        elif isinstance(value, dict):
            missing += _merge(value, update[key], where)
        else:
            if tuple(np.shape(update[key])) != tuple(value.shape):
                raise ValueError(
                    f"{where}: checkpoint shape {np.shape(update[key])} != model shape {value.shape}"
                )
            base[key] = np.asarray(update[key], dtype=value.dtype)
    return missing


def config_of(path: str | Path) -> tuple[str, Any]:
    """(family, maskjax model config) of a transformers directory, from its config.json alone."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json (a transformers checkpoint directory)")
    hf_config = _transformers().AutoConfig.from_pretrained(path)
    module = _module_for((hf_config.architectures or [""])[0])
    return module.HF_MODEL_TYPES[hf_config.model_type], module.config_from_hf(hf_config)


def load_hf(source: str | Path | Any, *, seed: int = 0) -> Imported:
    """Convert a transformers checkpoint directory, or an in-memory PyTorch model.

    Parts the checkpoint lacks (e.g. the MLM head of a bare `BertModel`) keep a
    fresh initialisation from `seed` and are listed in `missing`.
    """
    if isinstance(source, str | Path):
        hf_config, state = _read_dir(Path(source))
        architecture = (hf_config.architectures or [""])[0]
    else:
        architecture = type(source).__name__
        hf_config = copy.deepcopy(source.config)  # config_from_hf reads the architecture from it
        hf_config.architectures = [architecture]
        state = {k: v.detach().float().cpu().numpy() for k, v in source.state_dict().items()}
    module = _module_for(architecture)
    family = module.HF_MODEL_TYPES[hf_config.model_type]
    cfg = module.config_from_hf(hf_config)
    converted = module.params_from_hf(state, cfg)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(models.build(family, cfg, seed), nnx.Param)))
    missing = _merge(params, converted)
    masking = {ours: getattr(hf_config, theirs) for ours, theirs in getattr(module, "HF_MASKING", {}).items()}
    return Imported(family, cfg, params, missing, masking)


def save_hf(
    family: str, cfg: Any, params: Mapping, out_dir: str | Path, masking: Mapping | None = None
) -> Path:
    """Write a directory that transformers' `from_pretrained` loads; `masking` is the run's
    config.masking, for the training settings transformers' config holds (else its defaults)."""
    from safetensors.numpy import save_file

    entry = models.FAMILIES.get(family)
    if entry is None or entry.interop is None:
        supported = sorted(f for f, e in models.FAMILIES.items() if e.interop)
        raise ValueError(f"export to transformers supports families {supported}; got {family!r}")
    module = importlib.import_module(entry.interop)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = module.hf_config(cfg)
    for ours, theirs in getattr(module, "HF_MASKING", {}).items():
        if masking and ours in masking:
            setattr(hf_config, theirs, masking[ours])
    hf_config.save_pretrained(out)
    tensors = {
        k: np.ascontiguousarray(v, dtype=np.float32) for k, v in module.params_to_hf(params, cfg).items()
    }
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out
