"""GPT-2 against transformers' GPT2LMHeadModel (PyTorch), built from small random configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from maskjax import masking
from maskjax.interop import gpt as gpt_interop
from maskjax.models import gpt

TOL = 1e-4
VOCAB, LENGTH = 61, 24


def _hf_config(**overrides) -> transformers.GPT2Config:
    kw = dict(
        vocab_size=VOCAB,
        n_positions=LENGTH,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=48,  # not 4·d, so the mlp width must come from the config
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation="eager",
    )
    return transformers.GPT2Config(**(kw | overrides))


@pytest.fixture(scope="module")
def hf_model() -> transformers.GPT2LMHeadModel:
    """Random GPT-2 whose biases and LayerNorms are not at their init values (so they are tested too)."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(_hf_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _jax_model(cfg: gpt.GptConfig, pure: dict | None = None, seed: int = 0) -> gpt.Gpt:
    model = gpt.Gpt(cfg, rngs=nnx.Rngs(seed))
    if pure is not None:
        state = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(state, pure)
        nnx.update(model, state)
    return model


@pytest.fixture(scope="module")
def converted(hf_model):
    cfg = gpt_interop.config_from_hf(hf_model.config)
    return cfg, gpt_interop.params_from_hf(_state(hf_model), cfg)


def _hf_outputs(model, ids: np.ndarray, positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        kw = {} if positions is None else {"position_ids": torch.tensor(positions)}
        out = model(torch.tensor(ids), output_hidden_states=True, **kw)
        hidden = model.transformer(torch.tensor(ids), **kw).last_hidden_state
    return hidden.numpy(), out.logits.numpy()


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_config_from_hf(hf_model):
    cfg = gpt_interop.config_from_hf(hf_model.config)
    assert (cfg.hidden, cfg.layers, cfg.heads, cfg.mlp_dim) == (32, 2, 4, 48)
    assert (cfg.vocab_size, cfg.max_length, cfg.activation, cfg.layer_norm_eps) == (
        VOCAB,
        LENGTH,
        "gelu_tanh",
        1e-5,
    )
    assert cfg.pre_ln and cfg.dropout == cfg.attention_dropout == 0.1 and cfg.embed_dropout is None
    for c in (cfg, gpt.gpt2_xl(), gpt.GptConfig(hidden=8, layers=1, heads=2, mlp_dim=8, embed_dropout=0.3)):
        assert gpt_interop.config_from_hf(gpt_interop.hf_config(c)) == c


def test_parity_with_transformers(hf_model, converted):
    cfg, pure = converted
    ids = np.random.default_rng(0).integers(0, VOCAB, (3, LENGTH))
    out = _jax_model(cfg, pure)(jnp.asarray(ids))
    hidden, logits = _hf_outputs(hf_model, ids)
    assert out["logits"].dtype == jnp.float32 and out["logits"].shape == (3, LENGTH, VOCAB)
    assert _max_diff(out["hidden"], hidden) < TOL
    assert _max_diff(out["logits"], logits) < TOL


def test_state_dict_variants_convert_alike(hf_model, converted):
    """GPT2Model keys (no `transformer.` prefix) and safetensors (no tied lm_head) convert alike."""
    cfg, pure = converted
    bare = _state(hf_model.transformer)
    assert not any(k.startswith("transformer.") for k in bare)
    without_head = {k: v for k, v in _state(hf_model).items() if k != "lm_head.weight"}
    with_old_buffers = without_head | {"transformer.h.0.attn.bias": np.tril(np.ones((1, 1, LENGTH, LENGTH)))}
    for sd in (bare, without_head, with_old_buffers):
        jax.tree.map(np.testing.assert_array_equal, gpt_interop.params_from_hf(sd, cfg), pure)


def test_packed_documents_mask_is_honoured(hf_model, converted):
    """Two packed documents + a block-causal mask == transformers on each document alone."""
    cfg, pure = converted
    model = _jax_model(cfg, pure)
    rng = np.random.default_rng(1)
    splits = [[9, 15], [5, 11, 8]]  # document lengths per row, summing to LENGTH
    ids = rng.integers(0, VOCAB, (2, LENGTH))
    segment = np.stack([np.repeat(np.arange(len(s)), s) for s in splits])  # (B, T) document index
    positions = np.stack([np.concatenate([np.arange(n) for n in s]) for s in splits])
    causal = np.tril(np.ones((LENGTH, LENGTH), bool))
    mask = (causal & (segment[:, :, None] == segment[:, None, :]))[:, None]  # (B, 1, T, T)

    out = model(jnp.asarray(ids), positions=jnp.asarray(positions), attention_mask=jnp.asarray(mask))
    leaky = model(jnp.asarray(ids), positions=jnp.asarray(positions))  # plain causal: sees earlier documents
    for row, lengths in enumerate(splits):
        start = 0
        for n in lengths:
            doc = ids[row : row + 1, start : start + n]
            hidden, logits = _hf_outputs(hf_model, doc, positions=np.arange(n)[None])
            assert _max_diff(out["hidden"][row, start : start + n], hidden[0]) < TOL
            assert _max_diff(out["logits"][row, start : start + n], logits[0]) < TOL
            if start > 0:  # the test can fail: without the mask, later documents differ
                assert _max_diff(leaky["logits"][row, start : start + n], logits[0]) > 1e-2
            start += n


def test_params_to_hf_inverts_params_from_hf(hf_model, converted):
    cfg, pure = converted
    back = gpt_interop.params_to_hf(pure, cfg)
    reference = {k: v for k, v in _state(hf_model).items() if k != "lm_head.weight"}
    assert set(back) == set(reference)
    for k, v in reference.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_export_loads_in_transformers(tmp_path):
    """A GPT with GPT-2's init, exported to a directory, loads with from_pretrained and matches."""
    cfg = gpt.GptConfig(hidden=32, layers=3, heads=2, mlp_dim=64, vocab_size=VOCAB, max_length=LENGTH)
    model = _jax_model(cfg, seed=3)
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    tensors = gpt_interop.params_to_hf(params, cfg)
    ids = np.random.default_rng(2).integers(0, VOCAB, (2, 17))
    ours = model(jnp.asarray(ids))
    # GPT-2 Sec. 2.3: residual-layer weights scaled by 1/√N at init, N = 2·layers (3,072 and 6,144 draws).
    blocks, residual_std = model.stack.blocks, cfg.init_std / np.sqrt(2 * cfg.layers)
    for kernel, std in ((blocks.attn.out.kernel, residual_std), (blocks.mlp.wo.kernel, residual_std)):
        assert abs(float(jnp.std(kernel[...])) / std - 1) < 0.06
    assert abs(float(jnp.std(blocks.attn.query.kernel[...])) / cfg.init_std - 1) < 0.06

    fresh = transformers.GPT2LMHeadModel(gpt_interop.hf_config(cfg)).eval()
    result = fresh.load_state_dict({k: torch.tensor(v) for k, v in tensors.items()}, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys
    fresh.tie_weights()
    for reloaded in (fresh, None):
        if reloaded is None:
            gpt_interop.hf_config(cfg).save_pretrained(tmp_path)
            save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
            reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
            assert type(reloaded).__name__ in gpt_interop.HF_ARCHITECTURES
        hidden, logits = _hf_outputs(reloaded, ids)
        assert _max_diff(ours["hidden"], hidden) < TOL
        assert _max_diff(ours["logits"], logits) < TOL
    back = gpt_interop.params_from_hf(load_file(tmp_path / "model.safetensors"), cfg)
    jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize(
    "factory,hf_sizes",
    [
        (gpt.gpt2_small, dict(n_embd=768, n_layer=12, n_head=12)),
        (gpt.gpt2_medium, dict(n_embd=1024, n_layer=24, n_head=16)),
        (gpt.gpt2_large, dict(n_embd=1280, n_layer=36, n_head=20)),
        (gpt.gpt2_xl, dict(n_embd=1600, n_layer=48, n_head=25)),
    ],
)
def test_paper_sizes_match_transformers_parameter_counts(factory, hf_sizes):
    # GPT2Config's defaults are GPT-2's vocabulary (50257) and context (1024). The position table is
    # learned in both, and the tied output layer is one parameter (model.parameters() deduplicates it).
    with torch.device("meta"):
        reference = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_sizes))
    cfg = factory()
    assert (cfg.vocab_size, cfg.max_length, cfg.mlp_dim) == (50257, 1024, 4 * cfg.hidden)
    assert gpt.param_count(cfg) == sum(p.numel() for p in reference.parameters())


def test_scan_and_unrolled_agree(converted):
    cfg, pure = converted
    ids = jnp.asarray(np.random.default_rng(3).integers(0, VOCAB, (2, 11)))
    scanned = _jax_model(cfg, pure)(ids)["logits"]
    unrolled = _jax_model(gpt.GptConfig(**{**cfg.__dict__, "scan_layers": False}), pure)(ids)["logits"]
    assert cfg.scan_layers and _max_diff(scanned, unrolled) < 1e-5


def test_jit_grad_finite_and_dropout():
    cfg = gpt.GptConfig(hidden=16, layers=2, heads=2, mlp_dim=32, vocab_size=VOCAB, max_length=LENGTH)
    model = _jax_model(cfg)
    ids = jnp.asarray(np.random.default_rng(4).integers(0, VOCAB, (2, 12)))
    # Row 1 ends in 3 padding tokens whose queries attend to nothing: outputs and grads must stay finite.
    mask = np.tril(np.ones((11, 11), bool))[None, None].repeat(2, 0)
    mask[1, :, 8:] = False
    mask = jnp.asarray(mask)

    @nnx.jit
    def loss_and_grad(model, ids, key):
        def loss(model):
            logits = model(ids[:, :-1], attention_mask=mask, dropout_key=key)["logits"]
            nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))
            return nll, logits

        return nnx.value_and_grad(loss, has_aux=True)(model)

    (value, logits), grads = loss_and_grad(model, ids, jax.random.key(1))
    assert np.isfinite(value) and abs(float(value) - np.log(VOCAB)) < 1.0  # ≈ uniform at init
    leaves = jax.tree.leaves(grads)
    assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
    # Positions never used get no gradient: the table is indexed, not mixed.
    assert np.all(grads["position_embed"]["embedding"][...][11:] == 0)
    # Dropout: a function of the key alone; no key = deterministic.
    (_, again), _ = loss_and_grad(model, ids, jax.random.key(1))
    np.testing.assert_array_equal(logits, again)
    assert _max_diff(model(ids[:, :-1], attention_mask=mask)["logits"], logits) > 1e-3


def test_every_param_has_logical_axis_names():
    cfg = gpt.GptConfig(hidden=16, layers=2, heads=2, mlp_dim=32, vocab_size=VOCAB, max_length=LENGTH)
    model = nnx.eval_shape(lambda: gpt.Gpt(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    specs = nnx.get_partition_spec(params)
    for (path, spec), (_, leaf) in zip(
        jax.tree_util.tree_leaves_with_path(specs), jax.tree_util.tree_leaves_with_path(params), strict=True
    ):
        assert len(spec) == leaf.ndim and all(isinstance(n, str) for n in spec), (path, spec)
    stacked = nnx.get_partition_spec(params)["stack"]["blocks"]["attn"]["query"]["kernel"]
    assert tuple(stacked) == ("layers", "embed", "heads", "kv")


def test_clear_errors(hf_model, converted):
    cfg, pure = converted
    with pytest.raises(ValueError, match="hidden"):
        gpt.GptConfig(hidden=30, layers=1, heads=4, mlp_dim=8)
    with pytest.raises(ValueError, match="max_length"):
        _jax_model(cfg, pure)(jnp.zeros((1, LENGTH + 1), jnp.int32))
    for bad in (dict(add_cross_attention=True), dict(scale_attn_by_inverse_layer_idx=True)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            gpt_interop.config_from_hf(_hf_config(**bad))
    with pytest.raises(ValueError, match="layer_scale"):
        gpt_interop.hf_config(gpt.GptConfig(**{**cfg.__dict__, "layer_scale": 0.1}))
    state = _state(hf_model)
    with pytest.raises(ValueError, match="missing"):
        gpt_interop.params_from_hf({k: v for k, v in state.items() if "h.1.mlp" not in k}, cfg)
    with pytest.raises(ValueError, match="untied"):
        gpt_interop.params_from_hf(state | {"lm_head.weight": state["lm_head.weight"] + 1}, cfg)
    with pytest.raises(ValueError, match="shape"):
        gpt_interop.params_from_hf(state, gpt.GptConfig(**{**cfg.__dict__, "mlp_dim": 40}))


def test_every_next_token_of_the_stream_is_a_target_including_each_documents_first():
    """GPT-2's objective over its stream (Radford et al. 2019, Sec. 2.3): within a window, the pair
    (token t, token t+1) is trained for every t, across <|endoftext|> too; only padding is not."""
    from maskjax.data import text

    eos, pad = 0, 1
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    rows = list(text.gpt_packed(docs, length=6, eos_id=eos, pad_id=pad))
    ids = np.stack([r["input_ids"] for r in rows])
    seg = np.stack([r["segment_ids"] for r in rows])
    out = masking.causal_lm(jnp.asarray(ids), jnp.asarray(seg), valid=jnp.asarray(seg > 0))
    stream = [t for d in docs for t in (*d, eos)]
    trained = {
        (int(ids[b, t]), int(out.targets[b, t]), b * 6 + t)
        for b, t in zip(*np.nonzero(np.asarray(out.weights)), strict=True)
    }
    # The reference: consecutive stream tokens inside one window of 6.
    expected = {(stream[i], stream[i + 1], i) for i in range(len(stream) - 1) if i % 6 != 5}
    assert trained == expected
    assert (eos, 8, 3) in trained  # <|endoftext|> of document 1 -> the first token of document 2
