"""The training engine, run for real on 8 emulated CPU devices: every family, two meshes,
exact resume after SIGKILL, SIGTERM, a kill during an async checkpoint, and 8 -> 4 devices."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from tiny_configs import FAMILIES, tiny
from tiny_configs import config_file as _config_file
from tiny_configs import train_command as _train_command

from maskjax import config as config_lib
from maskjax import train
from maskjax.config import ConfigError
from maskjax.data import text_datasets

MESHES = {
    "data_parallel": {"data": -1, "fsdp": 1, "tensor": 1},
    "fsdp_x_tensor": {"data": 1, "fsdp": 4, "tensor": 2},
}


def rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def losses(workdir: Path) -> dict[int, float]:
    """Training loss per step; a step logged twice (a resumed run) keeps its last value."""
    return {r["step"]: r["loss"] for r in rows(workdir) if r.get("split") != "eval"}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A real text corpus (CPython's bundled language reference) and BEiT's trained tokenizer."""
    d = tmp_path_factory.mktemp("data")
    text_datasets.demo_corpus(d, "python-docs")
    train.train(tiny("vqvae", d, total_steps=4), d / "vqvae")
    return d


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_on_8_devices(family, mesh, data_dir, tmp_path):
    config = tiny(family, data_dir, total_steps=3, eval_every=3, checkpoint_every=3, mesh=MESHES[mesh])
    train.train(config, tmp_path)
    logged = rows(tmp_path)
    steps = [r for r in logged if r.get("split") != "eval"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert math.isfinite(r["loss"]) and r["learning_rate"] >= 0 and r["examples_per_sec"] > 0
    evals = [r for r in logged if r.get("split") == "eval"]
    assert evals and math.isfinite(evals[0]["eval_loss"])
    if family in ("bert", "roberta"):
        assert 0.0 <= steps[-1]["mlm_accuracy"] <= 1.0
    assert (tmp_path / "checkpoints" / "3").is_dir()
    assert list((tmp_path / "tensorboard").iterdir())
    # The method's evaluators ran on the trained parameters and wrote their numbers.
    expected = {
        "mae": {"eval_reconstruction_loss", "mean_patch_baseline", "figure"},
        "bert": {"eval_masked_token_accuracy", "unigram_baseline_accuracy", "fill_mask_samples"},
        "roberta": {"eval_masked_token_accuracy", "unigram_baseline_accuracy", "fill_mask_samples"},
        "gpt": {"eval_perplexity", "unigram_perplexity", "greedy_prompt", "greedy_continuation"},
    }.get(family)
    if expected is None:
        assert not (tmp_path / "report.json").exists()
    else:
        report = json.loads((tmp_path / "report.json").read_text())
        assert set(report) == expected
        assert all(math.isfinite(v) for v in report.values() if isinstance(v, float))
        if family in ("bert", "roberta"):  # held-out windows, their middle token masked and filled in
            samples = report["fill_mask_samples"]
            assert samples and all(0.0 < s["probability"] <= 1.0 and s["predicted"] for s in samples)
            assert all(("[MASK]" if family == "bert" else "<mask>") in s["text"] for s in samples)
        if family == "gpt":
            assert report["greedy_continuation"] and report["eval_perplexity"] > 1.0
        if family == "mae":
            assert Path(report["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parameters_are_sharded_by_logical_names(data_dir):
    trainer = train.Trainer(tiny("bert", data_dir, mesh=MESHES["fsdp_x_tensor"]))
    params = trainer.state_sharding["params"]
    query = params["encoder"]["blocks"]["attn"]["query"]["kernel"].spec  # (layers, embed, heads, kv)
    assert tuple(query) == (None, "fsdp", "tensor", None)
    wi = params["encoder"]["blocks"]["mlp"]["wi"]["kernel"].spec  # (layers, embed, mlp)
    assert tuple(wi) == (None, "fsdp", "tensor")
    mu = trainer.state_sharding["opt"][1][0].mu["encoder"]["blocks"]["mlp"]["wi"]["kernel"]
    assert mu.spec == wi, "Adam's moments must follow their parameter's sharding"
    assert trainer.batch_sharding.spec[0] == ("data", "fsdp")


@pytest.mark.parametrize("family", ["mae", "bert"])
def test_data_parallel_losses_equal_single_device(family, data_dir, tmp_path):
    config = tiny(family, data_dir, total_steps=4, eval_every=100, checkpoint_every=100)
    train.train(config, tmp_path / "8")
    train.train(config, tmp_path / "1", devices=jax.devices()[:1])
    eight, one = losses(tmp_path / "8"), losses(tmp_path / "1")
    assert list(eight) == [1, 2, 3, 4]
    np.testing.assert_allclose([eight[s] for s in eight], [one[s] for s in eight], rtol=2e-5)


def test_checkpoint_saved_on_8_devices_restores_on_4(data_dir, tmp_path):
    config = tiny("mae", data_dir, total_steps=6, checkpoint_every=3, eval_every=100)
    train.train(config, tmp_path / "reference")
    first = tiny("mae", data_dir, total_steps=3, checkpoint_every=3, eval_every=100)
    train.train(first, tmp_path / "moved")
    train.train(config, tmp_path / "moved", devices=jax.devices()[:4])
    reference, moved = losses(tmp_path / "reference"), losses(tmp_path / "moved")
    np.testing.assert_allclose([moved[s] for s in (4, 5, 6)], [reference[s] for s in (4, 5, 6)], rtol=2e-5)


def test_gradient_accumulation_remat_unrolled_bf16_switches(data_dir, tmp_path):
    config = tiny("gpt", data_dir, total_steps=2, eval_every=2, checkpoint_every=2)
    config.grad_accum_steps = 2
    config.model.update(remat="full", scan_layers=False, dtype="bfloat16")
    train.train(config, tmp_path)
    assert all(math.isfinite(loss) for loss in losses(tmp_path).values())


# ---------------------------------------------------------------------------- the CLI, as a user runs it


def _run_until(command: list[str], until, sig: int) -> subprocess.Popen:
    """Start `command`, send `sig` as soon as until() holds, and return the finished process."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not until():
        assert proc.poll() is None, f"the run ended before the signal:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, "timed out waiting for the run"
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


def _logged_step(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return 0
    done = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(done, default=0)


RESUME = dict(total_steps=24, checkpoint_every=4, eval_every=1000)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> dict[int, float]:
    """The uninterrupted run's losses, from the same command."""
    tmp = tmp_path_factory.mktemp("reference")
    config = _config_file(tmp, "mae", data_dir, **RESUME)
    subprocess.run(_train_command(config, tmp / "run"), check=True, capture_output=True, timeout=600)
    return losses(tmp / "run")


def test_sigkill_then_restart_resumes_bit_for_bit(data_dir, reference, tmp_path):
    config, workdir = _config_file(tmp_path, "mae", data_dir, **RESUME), tmp_path / "run"
    proc = _run_until(_train_command(config, workdir), lambda: _logged_step(workdir) >= 10, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    killed_at = _logged_step(workdir)
    subprocess.run(_train_command(config, workdir), check=True, capture_output=True, timeout=600)
    resumed = losses(workdir)
    assert killed_at < 24 and sorted(resumed) == list(range(1, 25))
    assert resumed == reference  # exact float equality, every step


def test_sigterm_saves_the_current_step_and_exits_0(data_dir, reference, tmp_path):
    config, workdir = _config_file(tmp_path, "mae", data_dir, **RESUME), tmp_path / "run"
    proc = _run_until(_train_command(config, workdir), lambda: _logged_step(workdir) >= 6, signal.SIGTERM)
    output = proc.stdout.read()
    assert proc.returncode == 0, output[-3000:]
    stopped = _logged_step(workdir)
    assert stopped < 24
    with ocp.CheckpointManager(workdir / "checkpoints") as mngr:
        assert mngr.latest_step() == stopped
    subprocess.run(_train_command(config, workdir), check=True, capture_output=True, timeout=600)
    assert losses(workdir) == reference


def test_kill_during_async_checkpoint_keeps_the_previous_one(data_dir, reference, tmp_path):
    config, workdir = _config_file(tmp_path, "mae", data_dir, **RESUME), tmp_path / "run"
    checkpoints = workdir / "checkpoints"

    def writing_after_first() -> bool:  # orbax writes a step into "<step>.orbax-checkpoint-tmp*" first
        return checkpoints.is_dir() and any(
            ".orbax-checkpoint-tmp" in p.name and not p.name.startswith("4.") for p in checkpoints.iterdir()
        )

    proc = _run_until(_train_command(config, workdir), writing_after_first, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    partial = [p for p in checkpoints.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    with ocp.CheckpointManager(checkpoints) as mngr:
        finished = mngr.all_steps()
    assert finished, "the first checkpoint had completed before the kill"
    assert not any(int(p.name.split(".")[0]) in finished for p in partial), (
        "a half-written step counts as done"
    )
    result = subprocess.run(
        _train_command(config, workdir), check=True, capture_output=True, text=True, timeout=600
    )
    assert f"resumed from step {max(finished)}" in result.stdout
    assert losses(workdir) == reference


# ---------------------------------------------------------------------------- config mistakes


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"global_batch_size": 12}, "global_batch_size"),
        ({"mesh": {"data": 3, "fsdp": 1, "tensor": 1}}, "mesh"),
        ({"masking.ratio": 1.5}, "masking.ratio"),
        ({"model.mask_ratio": 0.5}, "moved: set masking.ratio"),
        ({"model.image_size": 9}, "image_size"),
        ({"family": "bart"}, "family"),
        ({"optimizer.name": "sgd"}, "optimizer.name"),
        ({"schedule.decay": "step"}, "schedule.decay"),
        ({"model.remat": "sometimes"}, "model.remat"),
        ({"model.not_a_field": 1}, "not_a_field"),
    ],
)
def test_bad_config_is_refused_naming_the_field(overrides, field, data_dir):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        train.Trainer(tiny("mae", data_dir, **overrides))


def test_sequence_longer_than_position_table_is_refused(data_dir):
    with pytest.raises(ConfigError, match="seq_length"):
        train.Trainer(tiny("bert", data_dir, **{"model.max_length": 16}))


def test_cli_reports_a_bad_value_in_one_line(data_dir, tmp_path):
    config = _config_file(tmp_path, "mae", data_dir)
    result = subprocess.run(
        [*_train_command(config, tmp_path / "run"), "--config.global_batch_size=12"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "global_batch_size=12 must be divisible by the data-parallel size 8" in result.stderr


def test_two_phase_schedule_switches_data_and_resumes_in_phase_two(data_dir, tmp_path):
    """BERT's 128-then-512 schedule, small: 16 tokens for half the steps, then 32."""
    config = tiny("bert", data_dir, total_steps=6, checkpoint_every=4, eval_every=100)
    config.data.name = "python_docs_bert_phases"
    config.phases = [
        {"until": 0.5, "data": {"seq_length": 16}, "masking": {"max_predictions": 3}},
        {"until": 1.0, "data": {"seq_length": 32}, "masking": {"max_predictions": 6}},
    ]
    starts = [(start, c.data.seq_length, c.masking.max_predictions) for start, c in config_lib.phases(config)]
    assert starts == [(0, 16, 3), (3, 32, 6)]
    train.train(config, tmp_path / "straight")
    # The same run stopped after its step-4 checkpoint (inside phase two), then resumed.
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
    (tmp_path / "resumed" / "metrics.jsonl").unlink()
    train.train(config, tmp_path / "resumed")
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(resumed) == [5, 6]
    assert [resumed[s] for s in (5, 6)] == [straight[s] for s in (5, 6)]


@pytest.mark.parametrize(
    "phases, message",
    [
        (
            [{"until": 0.5, "data": {"seq_length": 16}}, {"until": 1.0, "data": {"seq_length": 64}}],
            "seq_length=64",
        ),
        ([{"until": 0.7, "data": {"seq_length": 16}}, {"until": 0.5, "data": {"seq_length": 32}}], "until"),
        ([{"until": 0.5, "dta": {"seq_length": 16}}, {"until": 1.0}], r"phases\[0\]\.dta"),
    ],
)
def test_bad_phases_are_refused_before_training(phases, message, data_dir, tmp_path):
    config = tiny("bert", data_dir)
    config.phases = phases
    with pytest.raises(ConfigError, match=message):
        train.train(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_building_a_trainer_reads_no_data_and_loads_no_checkpoint(family, tmp_path):
    """Construction is bookkeeping: data is prepared by `loaders.prepare` and frozen inputs are read by
    `load_extras`, each an explicit step. Nothing exists on disk here, and nothing appears."""
    empty = tmp_path / "nothing"
    empty.mkdir()
    config = tiny(family, empty)
    config.data.corpus = str(empty / "no-corpus")
    if family == "beit":
        config.masking.tokenizer_workdir = str(empty / "no-tokenizer")
    trainer = train.Trainer(config)
    assert trainer.abstract_state["params"] and list(empty.iterdir()) == []
    if family == "beit":
        with pytest.raises(FileNotFoundError):
            trainer.load_extras()


# ---------------------------------------------------------------------------- gradient accumulation


def _rel(a, b) -> float:
    """Largest relative difference over a pytree, against the larger norm of the two."""
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    num = math.sqrt(
        sum(float(np.sum((np.asarray(x) - np.asarray(y)) ** 2)) for x, y in zip(a, b, strict=True))
    )
    den = math.sqrt(sum(float(np.sum(np.asarray(x) ** 2)) for x in a))
    return num / max(den, 1e-30)


def _accum_pair(family, data_dir, edit=None, **overrides):
    from maskjax import sharding
    from maskjax.data import loaders

    # No dropout (its keys differ per microbatch) and no warm-up (lr 0 at step 0 would hide the update).
    fixed = {"model.dropout": 0.0, "model.attention_dropout": 0.0, "schedule.warmup_steps": 0, **overrides}
    c1 = tiny(family, data_dir, **fixed)
    c4 = tiny(family, data_dir, **fixed, grad_accum_steps=4)
    one, four = train.Trainer(c1, jax.devices()[:1]), train.Trainer(c4, jax.devices()[:1])
    loaders.prepare(c1)
    host = next(loaders.make(c1, "train"))
    batch = one.put_batch(edit(host) if edit else host)
    return one, four, batch, sharding.use_rules(one.mesh, one.rules)


def test_gpt_accumulating_4_microbatches_is_one_big_batch(data_dir):
    """A corpus's last window is padded, so microbatches can hold different numbers of real next
    tokens: the accumulated loss, gradient and update must be the big batch's (GPT needs no key)."""

    def pad_some_rows(host):
        host = dict(host)
        seg = host["segment_ids"].copy()
        seg[0, 10:] = 0  # rows 0 and 4 are microbatch 0's: padded tails, as a corpus's last window
        seg[4, 25:] = 0
        seg[[1, 5, 9, 13]] = 0  # microbatch 1 is all padding: no prediction at all
        host["segment_ids"] = seg
        return host

    one, four, batch, rules = _accum_pair("gpt", data_dir, pad_some_rows)
    with rules:
        counts = np.asarray(batch["segment_ids"]).reshape(-1, 4, 32).swapaxes(0, 1)
        assert len({int((c > 0).sum()) for c in counts}) > 1 and (counts[1] == 0).all()  # uneven, one empty
        s1, m1 = one.train_step(one.init(), batch, None)
        s4, m4 = four.train_step(four.init(), batch, None)
        params = one.init()["params"]
        key = jax.random.fold_in(one.train_key, 0)
        g1 = jax.jit(jax.grad(lambda p: one._loss(p, batch, key, None)[0]))(params)
        g4, _ = jax.jit(lambda p: four._accumulate(p, batch, key, None, 4))(params)
    assert abs(float(m4["loss"]) / float(m1["loss"]) - 1) < 1e-6
    assert _rel(g4, g1) < 1e-6
    update = lambda s: jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), s["params"], params)  # noqa: E731
    assert float(optax.tree.norm(update(s1))) > 0
    assert _rel(update(s4), update(s1)) < 1e-5


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_mlm_accumulating_4_microbatches_is_one_big_batch(family, data_dir):
    """The reference is one forward pass over all 16 rows with the microbatches' own masks: masked-token
    cross-entropy over every prediction of the batch (+ NSP over every row for BERT)."""
    from flax import nnx

    from maskjax import losses
    from maskjax.methods import bert as bert_method

    def shorten_a_row(host):  # a short sequence (BERT's short_seq_prob), padded: fewer predictions
        host = {k: v.copy() for k, v in host.items()}
        host["input_ids"][0, 12:] = four_cfg.masking.pad_id
        host["attention_mask"][0, 12:] = 0
        host["word_starts"][0, 12:] = False
        return host

    four_cfg = tiny(family, data_dir)
    _, four, batch, rules = _accum_pair(family, data_dir, shorten_a_row)
    key = jax.random.fold_in(four.train_key, 0)
    cfg = four.model_cfg

    def big_batch_loss(params):
        rows = jax.tree.map(lambda x: x.reshape(-1, 4, *x.shape[1:]).swapaxes(0, 1), batch)
        masks = [
            bert_method.mask(
                jax.random.split(jax.random.fold_in(key, i))[0],
                jax.tree.map(lambda x, i=i: x[i], rows),
                cfg.vocab_size,
                four.config.masking,
            )
            for i in range(4)
        ]
        whole = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), rows)  # microbatch-major row order
        inputs, positions, targets, weights = (jnp.concatenate(x) for x in zip(*masks, strict=True))
        out = nnx.merge(four.graphdef, params)(
            inputs,
            token_type_ids=whole.get("token_type_ids"),
            attention_mask=whole["attention_mask"],
            masked_positions=positions,
        )
        loss = losses.masked_cross_entropy(out["mlm_logits"], targets, weights)
        if cfg.nsp:
            loss = loss + losses.nsp_loss(out["nsp_logits"], whole["next_sentence_label"])
        return loss, weights.reshape(4, -1).sum(1)

    with rules:
        params = four.init()["params"]
        (want, per_micro), g_want = jax.jit(jax.value_and_grad(big_batch_loss, has_aux=True))(params)
        g4, m4 = jax.jit(lambda p: four._accumulate(p, batch, key, None, 4))(params)
    assert len(set(np.asarray(per_micro).tolist())) > 1  # the microbatches mask different numbers of tokens
    assert abs(float(m4["loss"]) / float(want) - 1) < 1e-6
    assert _rel(g4, g_want) < 1e-6


def test_beit_accumulating_4_microbatches_is_one_big_batch(data_dir):
    """The released sampler's masks vary in size: the reference is one forward pass over all rows with
    the microbatches' masks, cross-entropy over every masked patch of the batch."""
    from flax import nnx

    from maskjax import losses, masking
    from maskjax.methods import beit as beit_method

    # 10 of 16 patches in blocks of >= 8 on the 4x4 grid: the generator stops short in ~1 image in 4.
    shorts = {"model.drop_path": 0.0, "masking.num_masked": 10, "masking.min_block": 8}
    _, four, batch, rules = _accum_pair("beit", data_dir, **shorts)
    key = jax.random.fold_in(four.train_key, 0)
    m, cfg = four.config.masking, four.model_cfg
    extras = four.load_extras()
    tokenizer = nnx.merge(
        beit_method._graphdef(beit_method.tokenizer_config(four.config)), extras["tokenizer"]
    )

    def big_batch_loss(params):
        images = batch["image"].reshape(-1, 4, *batch["image"].shape[1:]).swapaxes(0, 1)
        masks = [
            masking.beit_unilm_mask(
                jax.random.split(jax.random.fold_in(key, i))[0],
                images.shape[1],
                grid=cfg.grid,
                num_masked=m.num_masked,
                min_block=m.min_block,
            )
            for i in range(4)
        ]
        whole, mask = images.reshape(-1, *images.shape[2:]), jnp.concatenate(masks)
        positions = beit_method.masked_positions(mask, m.num_masked)
        out = nnx.merge(four.graphdef, params)(whole, mask, masked_positions=positions)
        targets = jnp.take_along_axis(tokenizer.encode(whole), positions, axis=1)
        weights = jnp.take_along_axis(mask, positions, axis=1).astype(jnp.float32)
        return losses.masked_cross_entropy(out["logits"], targets, weights), mask.reshape(4, -1).sum(1)

    with rules:
        params = four.init()["params"]
        (want, per_micro), g_want = jax.jit(jax.value_and_grad(big_batch_loss, has_aux=True))(params)
        g4, m4 = jax.jit(lambda p: four._accumulate(p, batch, key, extras, 4))(params)
    assert m.sampler == "unilm" and len(set(np.asarray(per_micro).tolist())) > 1  # masks of different sizes
    assert abs(float(m4["loss"]) / float(want) - 1) < 1e-6
    assert _rel(g4, g_want) < 1e-6


# ---------------------------------------------------------------------------- non-finite steps


def test_a_nonfinite_step_leaves_the_state_as_it_was(data_dir):
    """A NaN in the batch makes loss and gradients NaN: parameters and optimizer state stay, the step
    counter moves on and the flags say why; the next finite batch updates as usual."""
    from maskjax import sharding
    from maskjax.data import loaders

    config = tiny("mae", data_dir, **{"schedule.warmup_steps": 0})
    trainer = train.Trainer(config, jax.devices()[:1])
    loaders.prepare(config)
    host = next(loaders.make(config, "train"))
    poisoned = {**host, "image": host["image"].copy()}
    poisoned["image"][0, 0, 0, 0] = np.nan
    with sharding.use_rules(trainer.mesh, trainer.rules):
        start = trainer.init()
        before = jax.device_get(start)
        after, m = trainer.train_step(start, trainer.put_batch(poisoned), None)
        after = jax.device_get(after)
        assert (int(m["nonfinite_loss"]), int(m["nonfinite_grads"]), int(after["step"])) == (1, 1, 1)
        for a, b in zip(
            jax.tree.leaves((after["params"], after["opt"])),
            jax.tree.leaves((before["params"], before["opt"])),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
        good, m2 = trainer.train_step(
            jax.device_put(after, trainer.state_sharding), trainer.put_batch(host), None
        )
        assert (int(m2["nonfinite_loss"]), int(m2["nonfinite_grads"])) == (0, 0)
        assert _rel(jax.device_get(good["params"]), before["params"]) > 0


def test_a_diverging_run_stops_in_one_line_and_keeps_its_last_finite_checkpoint(data_dir, tmp_path):
    """The issue's accident: lr 1e4. The run must exit non-zero naming the step, the metric and the
    last finite checkpoint, which restores with finite parameters; keep-N kept it."""
    config = _config_file(tmp_path, "mae", data_dir)
    workdir = tmp_path / "run"
    flags = [
        "--config.total_steps=30",
        "--config.checkpoint_every=1",
        "--config.keep_checkpoints=2",
        "--config.log_every=1",
        "--config.schedule.warmup_steps=1",
        "--config.optimizer.base_lr=1e4",
    ]
    result = subprocess.run(
        [*_train_command(config, workdir), *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert re.search(r"step \d+: the (loss|gradient) is not finite, 3 steps in a row", line), line
    last = int(re.search(r"the last finite checkpoint: step (\d+)", line).group(1))
    from maskjax import checkpoint

    _, _, params = checkpoint.load_params(workdir, last)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    assert max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == last
    # Saved every step, the step before the stop holds the state the skipped steps left alone (as does
    # the one before it): nothing more is saved at the stop, which would only rotate that one away.
    assert last == int(re.search(r"^maskjax train: step (\d+):", line).group(1)) - 1
    _, _, before = checkpoint.load_params(workdir, last - 1)
    assert all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before), strict=True)
    )
    logged = [r for r in rows(workdir) if r.get("split") != "eval"]
    assert logged[-1]["skipped_steps"] >= 2 and any(r["nonfinite_grads"] for r in logged)


# ---------------------------------------------------------------------------- continued pre-training


def _same(a, b) -> bool:
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_init_from_a_workdir_takes_its_weights_with_a_fresh_optimizer_at_step_0(data_dir, tmp_path):
    from maskjax import checkpoint, sharding

    source = tmp_path / "source"
    train.train(tiny("bert", data_dir, total_steps=2), source)
    _, _, trained = checkpoint.load_params(source)
    trainer = train.Trainer(tiny("bert", data_dir, init=str(source)))
    with sharding.use_rules(trainer.mesh, trainer.rules):
        state = trainer.init_from(str(source))
        fresh = trainer.init()
    assert _same(state["params"], trained) and not _same(fresh["params"], trained)
    assert _same(state["opt"], trainer.tx.init(state["params"])) and int(state["step"]) == 0

    # Through the CLI: the run starts from those weights, and resuming it later ignores init.
    config = _config_file(tmp_path, "bert", data_dir, total_steps=2, init=str(source))
    run = subprocess.run(
        _train_command(config, tmp_path / "run"), capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"init: {len(jax.tree.leaves(trained))} arrays from {source}; step 0" in run.stdout
    again = subprocess.run(
        _train_command(config, tmp_path / "run"), capture_output=True, text=True, timeout=600
    )
    assert "resumed from step 2" in again.stdout and "init:" not in again.stdout


def test_init_from_a_transformers_encoder_keeps_a_fresh_head_and_refuses_other_sizes(data_dir, tmp_path):
    """The seed's domain adaptation: a bare transformers BertModel (no MLM head) continues pre-training
    with a fresh MLM head; a config of other sizes is one line naming the array."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from maskjax import interop, sharding

    c = tiny("bert", data_dir)
    torch.manual_seed(0)
    hf = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=c.model.vocab_size,
            hidden_size=c.model.hidden,
            num_hidden_layers=c.model.layers,
            num_attention_heads=c.model.heads,
            intermediate_size=c.model.mlp_dim,
            max_position_embeddings=c.model.max_length,
        )
    )
    hf.save_pretrained(tmp_path / "hf")
    trainer = train.Trainer(tiny("bert", data_dir, init=str(tmp_path / "hf")))
    with sharding.use_rules(trainer.mesh, trainer.rules):
        state = trainer.init_from(str(tmp_path / "hf"))
    imported = interop.load_hf(tmp_path / "hf")
    assert _same(state["params"]["encoder"], imported.params["encoder"])
    assert _same(state["params"]["word_embed"], imported.params["word_embed"])
    assert any(m.startswith("/mlm") for m in imported.missing)

    config = _config_file(tmp_path, "bert", data_dir, total_steps=2, init=str(tmp_path / "hf"))
    run = subprocess.run(
        _train_command(config, tmp_path / "run"), capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "not in " in run.stdout and "freshly initialised: /mlm" in run.stdout

    wider = _config_file(
        tmp_path, "bert", data_dir, total_steps=2, init=str(tmp_path / "hf"), **{"model.mlp_dim": 48}
    )
    bad = subprocess.run(_train_command(wider, tmp_path / "bad"), capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    line = bad.stderr.strip().splitlines()[-1]
    assert line.startswith("maskjax train: init: /encoder/") and "set the model sizes" in line, line
