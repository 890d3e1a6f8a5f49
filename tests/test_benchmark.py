"""`maskjax benchmark`, and the structure that the step's speed depends on, guarded without timing:
the vocabulary projection on masked rows only, MAE's encoder on kept patches only, one compile
while the learning rate changes, and no device-to-host transfer inside the step."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest
from tiny_configs import CONFIGS, config_file, tiny

from maskjax import benchmark, methods, sharding, train
from maskjax import config as config_lib
from maskjax.errors import ConfigError


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_example_batches_have_the_shapes_and_types_of_the_loaders_batches(family, tmp_path):
    config = tiny(family, tmp_path)
    trainer = train.Trainer(config)
    method = methods.get(family)
    batch = method.example_batch(config, trainer.model_cfg, np.random.default_rng(0))
    spec = method.batch_spec(config, trainer.model_cfg)
    assert {k: (v.shape, np.dtype(v.dtype)) for k, v in batch.items()} == {
        k: (s.shape, np.dtype(s.dtype)) for k, s in spec.items()
    }


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_text_example_batches_are_rows_the_masking_can_use(family, tmp_path):
    """Specials where the layout puts them and nowhere else, every ordinary id above the special ones
    and inside the vocabulary, and (BERT) two segments split at the middle [SEP]."""
    config = tiny(family, tmp_path)
    m, t = config.masking, config.data.seq_length
    batch = methods.get(family).example_batch(
        config, train.Trainer(config).model_cfg, np.random.default_rng(0)
    )
    ids, special = batch["input_ids"], batch["special_tokens_mask"]
    specials = {m.mask_id, m.pad_id, *m.special_ids}
    assert np.array_equal(special, np.isin(ids, list(specials)))
    assert (ids[~special] > max(specials)).all() and (ids < config.model.vocab_size).all()
    assert (ids[:, 0] == m.special_ids[0]).all() and (ids[:, -1] == m.special_ids[-1]).all()
    assert batch["word_starts"][special].all() and 0.5 < batch["word_starts"].mean() < 0.95
    if family == "bert":
        assert (ids[:, t // 2] == m.special_ids[-1]).all() and special.sum(1).tolist() == [3] * len(ids)
        assert (batch["token_type_ids"][:, : t // 2 + 1] == 0).all()
        assert (batch["token_type_ids"][:, t // 2 + 1 :] == 1).all()
    else:
        assert special.sum(1).tolist() == [2] * len(ids)


def test_benchmark_command_times_the_step_and_what_mae_saves(data_dir, tmp_path):
    """The CLI end to end on 8 emulated devices: its JSON holds the machine, the measured peak, and one
    row for the step and one for the encoder on every patch, whose numbers agree with each other and
    with the method's own FLOP count."""
    config = config_file(tmp_path, "mae", data_dir)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "maskjax",
            "benchmark",
            f"--config={config}",
            "--steps=2",
            "--warmup=1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    machine = result["machine"]
    assert machine["device_count"] == 8 and machine["platform"] == "cpu" and machine["versions"]["jax"]
    peak = result["peak_flops"]["float32"]
    assert peak > 1e8
    step, every_patch = result["rows"]
    c = tiny("mae", data_dir)
    cfg = train.Trainer(c).model_cfg
    assert step["model_flops_per_step"] == methods.get("mae").flops(c, cfg)
    assert every_patch["overrides"] == {"masking.ratio": 0.5 / cfg.num_patches}
    wider = benchmark.with_overrides(c, every_patch["overrides"])
    assert every_patch["model_flops_per_step"] == methods.get("mae").flops(wider, cfg)
    assert every_patch["model_flops_per_step"] > step["model_flops_per_step"]
    for row in (step, every_patch):
        assert row["tokens_per_example"] == cfg.num_patches and math.isfinite(row["loss"])
        assert row["step_seconds_min"] <= row["step_seconds_median"]
        assert math.isclose(row["examples_per_sec"], 16 / row["step_seconds_median"], rel_tol=1e-9)
        # Emulated CPU devices share one host's cores: MFU against one device's peak.
        assert math.isclose(row["mfu"], row["model_flops_per_step"] / row["step_seconds_median"] / peak)
        assert row["xla_peak_bytes_per_device"] > 0 and row["compile_seconds"] > 0
    assert math.isclose(
        every_patch["slower"], every_patch["step_seconds_median"] / step["step_seconds_median"]
    )
    assert result["max_rss_bytes"] > 100 * 2**20


def test_benchmark_measures_every_phase_and_prints_the_table(tmp_path):
    """A two-phase BERT (16 then 32 tokens): one row per phase, printed as the table as measured."""
    config = tiny("bert", tmp_path)
    config.phases = [
        {"until": 0.5, "data": {"seq_length": 16}, "masking": {"max_predictions": 3}},
        {"until": 1.0, "data": {"seq_length": 32}, "masking": {"max_predictions": 6}},
    ]
    with open(tmp_path / "table.txt", "w") as out:
        result = benchmark.run(config, steps=1, warmup=0, savings=False, out=out)
    table = (tmp_path / "table.txt").read_text().splitlines()
    assert [r["name"] for r in result["rows"]] == ["bert, phase 1", "bert, phase 2"]
    for row, (_, phase) in zip(result["rows"], config_lib.phases(config), strict=True):
        assert row["tokens_per_example"] == phase.data.seq_length
        assert row["model_flops_per_step"] == methods.get("bert").flops(phase, train.Trainer(phase).model_cfg)
    assert table[0].startswith("device: cpu x8") and "GFLOP/s per device" in table[1]
    assert [line[:38].strip() for line in table[3:5]] == ["bert, phase 1", "bert, phase 2"]
    assert table[-1].startswith("process peak resident memory: ")
    second = benchmark.run(config, steps=1, warmup=0, savings=False, phase=2)
    assert [r["name"] for r in second["rows"]] == ["bert, phase 2"]
    assert second["rows"][0]["model_flops_per_step"] == result["rows"][1]["model_flops_per_step"]
    with pytest.raises(ConfigError, match=r"phase must be in \[1, 2\]"):
        benchmark.run(config, steps=1, phase=3)


def test_bert_saves_the_vocabulary_projection_at_unmasked_positions(tmp_path):
    """What `benchmark` times beside BERT: P = T prediction slots, a config that validates and counts
    the projection at every position."""
    config = tiny("bert", tmp_path)
    cfg = train.Trainer(config).model_cfg
    (what, overrides), *rest = methods.get("bert").savings(config, cfg).items()
    assert what == "vocabulary logits at every position" and not rest
    every = benchmark.with_overrides(config, overrides)
    assert every.masking.max_predictions == config.data.seq_length and config.masking.max_predictions == 6
    train.Trainer(every)  # validates
    t, d, v, b = config.data.seq_length, cfg.hidden, cfg.vocab_size, config.global_batch_size
    extra = methods.get("bert").flops(every, cfg) - methods.get("bert").flops(config, cfg)
    assert extra == b * 3 * (t - 6) * (2 * d * d + 2 * d * v)
    assert (
        methods.get("bert").savings(benchmark.with_overrides(config, {"masking.strategy": "random"}), cfg)
        == {}
    )


def test_compare_torch_times_the_same_transformers_model_in_turn(tmp_path):
    """--compare=torch: GPT2LMHeadModel of the same configuration (the same parameter count), one step
    of each in turn, and the ratio of the two medians."""
    config = tiny("gpt", tmp_path)
    result = benchmark.run(config, steps=2, warmup=1, compare="torch")
    (row,) = result["rows"]
    assert row["torch_model"] == "GPT2LMHeadModel" and row["torch_params"] == row["params"] > 0
    assert math.isclose(
        row["speedup_vs_torch"], row["torch_step_seconds_median"] / row["step_seconds_median"]
    )
    with pytest.raises(ConfigError, match=r"no transformers reference for family 'vqvae'"):
        benchmark.run(tiny("vqvae", tmp_path), steps=1, compare="torch")


def test_a_family_without_an_example_batch_is_named(tmp_path):
    config = tiny("bert", tmp_path)
    config.family = "span_qa"
    with pytest.raises(ConfigError, match="has no example batch to time; families: "):
        benchmark.run(config, steps=1)


# ---------------------------------------------------------------------------- structure, not time


def _dot_output_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Output shapes of every dot_general in a jaxpr and the jaxprs inside it (scan, remat, pjit...).
    Callers keep the activations' matmuls, (B, rows..., features): weight gradients are 2-D, or
    (layers, in, out) for scanned layers."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes += _dot_output_shapes(inner)
    return shapes


def _step_jaxpr(trainer: train.Trainer, batch: dict):
    with sharding.use_rules(trainer.mesh, trainer.rules):
        return jax.make_jaxpr(trainer._train_step)(trainer.abstract_state, batch, trainer.abstract_extras())


def _example(trainer: train.Trainer) -> dict:
    return trainer.method.example_batch(trainer.config, trainer.model_cfg, np.random.default_rng(0))


def test_the_vocabulary_projection_runs_on_the_masked_rows_only(tmp_path):
    """Every matmul that produces vocabulary logits, forward and backward, has B·P rows, never B·T."""
    trainer = train.Trainer(tiny("bert", tmp_path))
    c = trainer.config
    b, t, p, v = c.global_batch_size, c.data.seq_length, c.masking.max_predictions, c.model.vocab_size
    shapes = _dot_output_shapes(_step_jaxpr(trainer, _example(trainer)).jaxpr)
    vocab = [s for s in shapes if s[-1] == v and len(s) >= 3 and s[0] == b]
    assert vocab, shapes
    assert {math.prod(s[:-1]) for s in vocab} == {b * p}, (vocab, b * p, b * t)


def test_the_mae_encoder_runs_on_the_kept_patches_only(tmp_path):
    """Every matmul into the encoder's width or its MLP's has B·K or B·(1+K) rows (K kept patches, the
    [CLS] token); the decoder alone sees all 1+N."""
    trainer = train.Trainer(tiny("mae", tmp_path, **{"model.decoder_mlp_dim": 24}))
    cfg, b = trainer.model_cfg, trainer.config.global_batch_size
    k = int(cfg.num_patches * (1 - trainer.config.masking.ratio))
    assert len({cfg.hidden, cfg.mlp_dim, cfg.decoder_hidden, cfg.decoder_mlp_dim, 1 + k, k}) == 6
    shapes = _dot_output_shapes(_step_jaxpr(trainer, _example(trainer)).jaxpr)
    activations = [s for s in shapes if len(s) >= 3 and s[0] == b]
    encoder = [s for s in activations if s[-1] in (cfg.hidden, cfg.mlp_dim)]
    decoder = [s for s in activations if s[-1] in (cfg.decoder_hidden, cfg.decoder_mlp_dim)]
    assert encoder and decoder
    assert {math.prod(s[:-1]) for s in encoder} <= {b * k, b * (1 + k)}, encoder
    assert b * (1 + cfg.num_patches) in {math.prod(s[:-1]) for s in decoder}, decoder


def test_the_step_compiles_once_and_moves_nothing_to_the_host(tmp_path):
    """Four steps through warm-up (the learning rate changes every step) and on: one compiled program,
    and not one device-to-host transfer while they run."""
    trainer = train.Trainer(tiny("gpt", tmp_path, **{"schedule.warmup_steps": 3}))
    with sharding.use_rules(trainer.mesh, trainer.rules):
        batch = trainer.put_batch(_example(trainer))
        state = trainer.init()
        with jax.transfer_guard_device_to_host("disallow"):
            for _ in range(4):
                state, metrics = trainer.train_step(state, batch, None)
        jax.block_until_ready(metrics)
    assert trainer.train_step._cache_size() == 1
    lrs = [float(trainer.lr(s)) for s in range(4)]
    assert len(set(lrs)) == 4, lrs
    assert int(state["step"]) == 4 and math.isfinite(float(metrics["loss"]))
