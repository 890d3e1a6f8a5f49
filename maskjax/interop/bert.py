"""Hugging Face BERT / RoBERTa checkpoints <-> maskjax `Bert`.

Key layout (prefix `bert.` or `roberta.`, or none for a bare `BertModel` save):

  embeddings.{word,position,token_type}_embeddings.weight   -> {word,position,type}_embed.embedding
  embeddings.LayerNorm                                       -> embed_ln
  encoder.layer.{i}.attention.self.{query,key,value}         -> encoder.blocks.attn.{query,key,value}[i]
  encoder.layer.{i}.attention.output.dense / .LayerNorm      -> encoder.blocks.attn.out[i] / ln1[i]
  encoder.layer.{i}.intermediate.dense / output.dense        -> encoder.blocks.mlp.wi[i] / wo[i]
  encoder.layer.{i}.output.LayerNorm                         -> encoder.blocks.ln2[i]
  pooler.dense                                               -> pooler
  cls.seq_relationship                                       -> nsp                     (BERT)
  cls.predictions.transform.{dense,LayerNorm}, .bias         -> mlm.{dense,ln}, mlm.bias (BERT)
  lm_head.{dense,layer_norm}, lm_head.bias                   -> mlm.{dense,ln}, mlm.bias (RoBERTa)
  classifier                                                 -> classifier  (BertForSequenceClassification)
  classifier.dense / classifier.out_proj                     -> pooler / classifier  (RoBERTa's: the same
                                                                head in evaluation, tanh between the two)

torch Linear weights are (out, in); maskjax kernels are (in, out) with heads kept
as an axis, e.g. query (D, N, H). The decoder weight is tied to the word
embeddings and the decoder bias to the head's bias, so neither is read or written.

A checkpoint may lack some heads (a `BertModel` such as sentence-transformers has
no MLM/NSP head; `BertForMaskedLM` has no pooler). `params_from_hf` then returns a
*partial* dict without those subtrees; keep the model's freshly initialised heads with

    model = Bert(cfg, rngs=nnx.Rngs(0))
    fresh = load_params(model, params_from_hf(state_dict, cfg))   # -> ["mlm", "nsp"]
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from maskjax.models.bert import Bert, BertConfig

# transformers' model_type -> the maskjax model family it converts to
HF_MODEL_TYPES: dict[str, str] = {"bert": "bert", "roberta": "roberta"}
HF_ARCHITECTURES = (
    "BertForPreTraining",
    "BertForMaskedLM",
    "BertModel",
    "RobertaForMaskedLM",
    "RobertaModel",
    "BertForSequenceClassification",
    "RobertaForSequenceClassification",
    "BertForQuestionAnswering",
    "RobertaForQuestionAnswering",
)

_ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


def _is_roberta(cfg: BertConfig) -> bool:
    return cfg.position_offset > 0


def config_from_hf(hf_config) -> BertConfig:
    """BERT -> pooler and NSP (the paper's pre-training model); RoBERTa -> no NSP, and a
    pooler only for `RobertaModel` checkpoints (RobertaForMaskedLM / fairseq have none)."""
    model_type = hf_config.model_type
    if model_type not in ("bert", "roberta"):
        raise ValueError(f"model_type must be 'bert' or 'roberta'; got {model_type!r}")
    if getattr(hf_config, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"only absolute position embeddings are supported; got {hf_config.position_embedding_type!r}"
        )
    if hf_config.hidden_act not in _ACT_FROM_HF:
        raise ValueError(f"hidden_act must be one of {sorted(_ACT_FROM_HF)}; got {hf_config.hidden_act!r}")
    if getattr(hf_config, "tie_word_embeddings", True) is False:
        raise ValueError("maskjax ties the MLM decoder to the word embeddings; tie_word_embeddings=False")
    roberta = model_type == "roberta"
    pad_id = hf_config.pad_token_id if hf_config.pad_token_id is not None else (1 if roberta else 0)
    architectures = tuple(hf_config.architectures or ())
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    spans = any(a.endswith("ForQuestionAnswering") for a in architectures)
    return BertConfig(
        hidden=hf_config.hidden_size,
        layers=hf_config.num_hidden_layers,
        heads=hf_config.num_attention_heads,
        mlp_dim=hf_config.intermediate_size,
        dropout=hf_config.hidden_dropout_prob,
        attention_dropout=hf_config.attention_probs_dropout_prob,
        layer_norm_eps=hf_config.layer_norm_eps,
        activation=_ACT_FROM_HF[hf_config.hidden_act],
        init_std=hf_config.initializer_range,
        vocab_size=hf_config.vocab_size,
        max_length=hf_config.max_position_embeddings,
        type_vocab_size=hf_config.type_vocab_size,
        pad_id=pad_id,
        position_offset=pad_id + 1 if roberta else 0,
        nsp=not roberta and not classifier and not spans,
        pooler=(not roberta and not spans) or "RobertaModel" in architectures or classifier,
        mlm_head=not classifier and not spans,
        span_head=spans,
        num_labels=hf_config.num_labels if classifier else 0,
    )


def hf_config(cfg: BertConfig):
    """`BertForPreTraining` (cfg.nsp), else `BertForMaskedLM`; `RobertaForMaskedLM` for RoBERTa."""
    import transformers

    kw = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=cfg.mlp_dim,
        hidden_act=_ACT_TO_HF[cfg.activation],
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.attention_dropout,
        max_position_embeddings=cfg.max_length,
        type_vocab_size=cfg.type_vocab_size,
        initializer_range=cfg.init_std,
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=cfg.pad_id,
        tie_word_embeddings=True,
    )
    if cfg.num_labels:
        kw["num_labels"] = cfg.num_labels
    task = "ForSequenceClassification" if cfg.num_labels else "ForQuestionAnswering" if cfg.span_head else ""
    if _is_roberta(cfg):
        if cfg.nsp:
            raise ValueError("RoBERTa (position_offset > 0) has no NSP head in transformers; set nsp=False")
        arch = f"Roberta{task}" if task else "RobertaForMaskedLM"
        return transformers.RobertaConfig(architectures=[arch], **kw)
    arch = f"Bert{task}" if task else "BertForPreTraining" if cfg.nsp else "BertForMaskedLM"
    return transformers.BertConfig(architectures=[arch], **kw)


def _normalise(state_dict: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Strip the `bert.` / `roberta.` prefix and old TF names (LayerNorm.gamma/beta); cast to `dtype`."""
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^(bert|roberta)\.", "", key)
        key = re.sub(r"\.gamma$", ".weight", key)
        key = re.sub(r"\.beta$", ".bias", key)
        if hasattr(value, "detach"):  # a torch tensor (maybe bfloat16, which numpy lacks)
            value = value.detach().cpu().float().numpy()
        value = np.asarray(value)
        out[key] = value.astype(jnp.dtype(dtype)) if value.dtype.kind == "f" else value
    return out


def _head_prefixes(cfg: BertConfig) -> dict[str, str]:
    if _is_roberta(cfg):
        return dict(
            dense="lm_head.dense", ln="lm_head.layer_norm", bias="lm_head.bias", decoder="lm_head.decoder"
        )
    return dict(
        dense="cls.predictions.transform.dense",
        ln="cls.predictions.transform.LayerNorm",
        bias="cls.predictions.bias",
        decoder="cls.predictions.decoder",
    )


def params_from_hf(state_dict: Mapping[str, np.ndarray], cfg: BertConfig) -> dict:
    """HF state dict (torch tensors or numpy) -> pure dict of `nnx.state(Bert(cfg), nnx.Param)`.

    Heads missing from the checkpoint (or not in cfg) are left out of the result:
    merge it over an initialised model with `load_params`. Keys that are neither
    used nor known to be ignorable raise, so a mismatched checkpoint fails loudly.
    """
    sd = _normalise(state_dict, cfg.param_dtype)
    used: set[str] = set()
    d, n, h = cfg.hidden, cfg.heads, cfg.head_dim

    def get(key: str) -> np.ndarray:
        used.add(key)
        return sd[key]

    def dense(prefix: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> dict:
        w = get(prefix + ".weight")  # (out, in)
        return {
            "kernel": w.T.reshape(in_shape + out_shape),
            "bias": get(prefix + ".bias").reshape(out_shape),
        }

    def ln(prefix: str) -> dict:
        return {"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias")}

    def layer(i: int) -> dict:
        p = f"encoder.layer.{i}."
        return {
            "attn": {
                "query": dense(p + "attention.self.query", (d,), (n, h)),
                "key": dense(p + "attention.self.key", (d,), (n, h)),
                "value": dense(p + "attention.self.value", (d,), (n, h)),
                "out": dense(p + "attention.output.dense", (n, h), (d,)),
            },
            "ln1": ln(p + "attention.output.LayerNorm"),
            "mlp": {
                "wi": dense(p + "intermediate.dense", (d,), (cfg.mlp_dim,)),
                "wo": dense(p + "output.dense", (cfg.mlp_dim,), (d,)),
            },
            "ln2": ln(p + "output.LayerNorm"),
        }

    per_layer = [layer(i) for i in range(cfg.layers)]
    blocks = _stack(per_layer)
    out = {
        "word_embed": {"embedding": get("embeddings.word_embeddings.weight")},
        "position_embed": {"embedding": get("embeddings.position_embeddings.weight")},
        "type_embed": {"embedding": get("embeddings.token_type_embeddings.weight")},
        "embed_ln": ln("embeddings.LayerNorm"),
        "encoder": {"blocks": blocks},
    }
    if cfg.pooler and "pooler.dense.weight" in sd:
        out["pooler"] = dense("pooler.dense", (d,), (d,))
    if cfg.num_labels and "classifier.out_proj.weight" in sd:  # RobertaClassificationHead
        out["pooler"] = dense("classifier.dense", (d,), (d,))
        out["classifier"] = dense("classifier.out_proj", (d,), (cfg.num_labels,))
    elif cfg.num_labels and "classifier.weight" in sd:
        out["classifier"] = dense("classifier", (d,), (cfg.num_labels,))
    if cfg.span_head and "qa_outputs.weight" in sd:
        out["qa"] = dense("qa_outputs", (d,), (2,))
    if cfg.nsp and "cls.seq_relationship.weight" in sd:
        out["nsp"] = dense("cls.seq_relationship", (d,), (2,))
    head = _head_prefixes(cfg)
    if head["dense"] + ".weight" in sd:
        bias_key = head["bias"] if head["bias"] in sd else head["decoder"] + ".bias"
        out["mlm"] = {"dense": dense(head["dense"], (d,), (d,)), "ln": ln(head["ln"]), "bias": get(bias_key)}

    # Tied copies, buffers, and heads that cfg does not have are safe to drop.
    ignorable = re.compile(
        r"^(embeddings\.(position_ids|token_type_ids)|.*decoder\.(weight|bias)|pooler\..*|cls\.seq_relationship\..*)$"
    )
    unknown = sorted(k for k in sd if k not in used and not ignorable.match(k))
    if unknown:
        raise KeyError(f"unrecognised keys in the BERT/RoBERTa checkpoint: {unknown[:10]}")
    return out


def _stack(trees: list[dict]) -> dict:
    """[tree_0, ..., tree_{L-1}] -> one tree with a leading L axis (the Stack layout)."""
    if isinstance(trees[0], dict):
        return {k: _stack([t[k] for t in trees]) for k in trees[0]}
    return np.stack(trees)


def params_to_hf(params: dict, cfg: BertConfig) -> dict[str, np.ndarray]:
    """Pure dict (as from `nnx.to_pure_dict`) -> HF state dict, without tied duplicates."""
    prefix = "roberta." if _is_roberta(cfg) else "bert."
    out: dict[str, np.ndarray] = {}

    def put(key: str, value) -> None:
        out[key] = np.ascontiguousarray(np.asarray(value, dtype=np.float32))

    def dense(key: str, tree: dict, n_in: int) -> None:
        kernel = np.asarray(tree["kernel"])
        n_out = int(np.prod(kernel.shape[n_in:]))
        put(key + ".weight", kernel.reshape(-1, n_out).T)
        put(key + ".bias", np.asarray(tree["bias"]).reshape(n_out))

    def ln(key: str, tree: dict) -> None:
        put(key + ".weight", tree["scale"])
        put(key + ".bias", tree["bias"])

    put(prefix + "embeddings.word_embeddings.weight", params["word_embed"]["embedding"])
    put(prefix + "embeddings.position_embeddings.weight", params["position_embed"]["embedding"])
    put(prefix + "embeddings.token_type_embeddings.weight", params["type_embed"]["embedding"])
    ln(prefix + "embeddings.LayerNorm", params["embed_ln"])
    blocks = params["encoder"]["blocks"]
    for i in range(cfg.layers):
        b = _index(blocks, i)
        q = f"{prefix}encoder.layer.{i}."
        for name in ("query", "key", "value"):
            dense(q + "attention.self." + name, b["attn"][name], 1)
        dense(q + "attention.output.dense", b["attn"]["out"], 2)
        ln(q + "attention.output.LayerNorm", b["ln1"])
        dense(q + "intermediate.dense", b["mlp"]["wi"], 1)
        dense(q + "output.dense", b["mlp"]["wo"], 1)
        ln(q + "output.LayerNorm", b["ln2"])
    if "classifier" in params and _is_roberta(cfg):
        dense("classifier.dense", params["pooler"], 1)
        dense("classifier.out_proj", params["classifier"], 1)
    elif "classifier" in params:
        dense(prefix + "pooler.dense", params["pooler"], 1)
        dense("classifier", params["classifier"], 1)
    elif "pooler" in params:
        dense(prefix + "pooler.dense", params["pooler"], 1)
    if "qa" in params:
        dense("qa_outputs", params["qa"], 1)
    if "nsp" in params:
        dense("cls.seq_relationship", params["nsp"], 1)
    if "mlm" in params:
        head = _head_prefixes(cfg)
        dense(head["dense"], params["mlm"]["dense"], 1)
        ln(head["ln"], params["mlm"]["ln"])
        put(head["bias"], params["mlm"]["bias"])
    return out


def _index(tree: dict, i: int) -> dict:
    if isinstance(tree, dict):
        return {k: _index(v, i) for k, v in tree.items()}
    return np.asarray(tree)[i]


def merge_params(base: dict, partial: dict) -> dict:
    """`partial` over `base` (pure dicts); every array in `partial` must match base's shape."""
    out = dict(base)
    for key, value in partial.items():
        if key not in base:
            raise KeyError(f"{key!r} is not a parameter of the model (have {sorted(base)})")
        if isinstance(value, dict):
            out[key] = merge_params(base[key], value)
        else:
            if tuple(np.shape(value)) != tuple(np.shape(base[key])):
                raise ValueError(f"{key!r}: shape {np.shape(value)} != model's {np.shape(base[key])}")
            out[key] = value
    return out


def load_params(model: Bert, partial: dict) -> list[str]:
    """Write `partial` into `model` in place; return the top-level subtrees left freshly initialised."""
    state = nnx.state(model, nnx.Param)
    base = nnx.to_pure_dict(state)
    nnx.replace_by_pure_dict(state, merge_params(base, partial))
    nnx.update(model, state)
    return sorted(k for k in base if k not in partial)
