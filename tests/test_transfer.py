"""Transfer: fine-tuning and linear probing a ViT encoder (methods/classify.py), the optimizers and
data they need, and the frozen-feature evaluators that run during pre-training."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from tiny_configs import config_file, tiny

from maskjax import checkpoint, models, optim, sharding, train
from maskjax.data import image_datasets, loaders
from maskjax.errors import ConfigError
from maskjax.evaluators import features
from maskjax.methods import classify
from maskjax.models import vit


def _task(**kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(dict(mixup=0.0, cutmix=0.0, switch_prob=0.5, mix_prob=1.0), **kw))


def _constant_images(b: int = 8, size: int = 8) -> tuple[jax.Array, jax.Array]:
    """Image i is the constant i + 1 (so every pixel tells where it came from); one-hot targets."""
    images = jnp.broadcast_to(jnp.arange(1.0, b + 1)[:, None, None, None], (b, size, size, 1))
    return images, jnp.eye(b)


@pytest.mark.parametrize("seed", range(6))
def test_cutmix_targets_weigh_each_image_by_the_pixels_it_kept(seed):
    images, targets = _constant_images()
    mixed, mixed_targets = classify.mix(jax.random.key(seed), images, targets, _task(cutmix=1.0))
    b = images.shape[0]
    for i in range(b):
        own = float((mixed[i] == i + 1).mean())  # the share of image i's own pixels left in it
        partner = float((mixed[i] == b - i).mean())  # pasted from the reversed batch
        assert own + partner == pytest.approx(1.0)
        assert float(mixed_targets[i, i]) == pytest.approx(own, abs=1e-6)
        assert float(mixed_targets[i, b - 1 - i]) == pytest.approx(partner, abs=1e-6)


def test_mixup_blends_pixels_and_targets_with_one_lambda():
    images, targets = _constant_images()
    mixed, mixed_targets = classify.mix(jax.random.key(3), images, targets, _task(mixup=0.8))
    b = images.shape[0]
    lam = (mixed[:, 0, 0, 0] - images[::-1, 0, 0, 0]) / (images[:, 0, 0, 0] - images[::-1, 0, 0, 0])
    assert np.allclose(lam, lam[0]) and 0.0 < float(lam[0]) < 1.0  # one λ for the batch
    assert np.allclose(mixed, mixed[:, :1, :1])  # every pixel blended alike
    assert np.allclose(np.diag(mixed_targets), lam[0], atol=1e-6)
    assert np.allclose(mixed_targets[np.arange(b), b - 1 - np.arange(b)], 1 - lam[0], atol=1e-6)


def test_a_batch_is_mixed_with_probability_mix_prob():
    images, targets = _constant_images()
    never = _task(mixup=0.8, cutmix=1.0, mix_prob=0.0)
    for seed in range(4):
        out, out_targets = classify.mix(jax.random.key(seed), images, targets, never)
        assert np.array_equal(out, images) and np.array_equal(out_targets, targets)
    half = _task(mixup=0.8, mix_prob=0.5)
    mixed = [
        not np.array_equal(classify.mix(jax.random.key(s), images, targets, half)[0], images)
        for s in range(200)
    ]
    assert 0.35 < np.mean(mixed) < 0.65


def test_lars_takes_maes_lars_step():
    """optim's "lars" against MAE's util/lars.py written out in numpy: for a matrix, (g + wd·w) scaled
    by 0.001·‖w‖/‖g + wd·w‖, then momentum; a vector (bias) takes plain momentum SGD, no decay."""
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)}
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in range(3)]
    opt = dict(name="lars", b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05, no_decay=())
    lr, wd, momentum = 0.3, 0.05, 0.9
    tx = optim.make_optimizer(opt, optax.constant_schedule(lr), params)
    state, ours = tx.init(params), dict(params)
    ref, mu = {k: v.astype(np.float64) for k, v in params.items()}, {k: 0.0 for k in params}
    for g in grads:
        updates, state = tx.update(g, state, ours)
        ours = optax.apply_updates(ours, updates)
        for k, p in ref.items():
            dp = g[k].astype(np.float64)
            if p.ndim > 1:
                dp = dp + wd * p
                q = 0.001 * np.linalg.norm(p) / np.linalg.norm(dp)
                dp = dp * q
            mu[k] = momentum * mu[k] + dp
            ref[k] = p - lr * mu[k]
    for k in params:
        np.testing.assert_allclose(np.asarray(ours[k]), ref[k], rtol=1e-5, atol=1e-7)


def _batch(trainer, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    b = trainer.config.global_batch_size
    local = {
        "image": rng.normal(size=(b, 8, 8, 1)).astype(np.float32),
        "label": rng.integers(0, 10, size=(b,)).astype(np.int32),
    }
    return trainer.put_batch(local)


def test_probe_step_freezes_the_encoder_and_averages_the_batchnorm_statistics(data_dir):
    trainer = train.Trainer(tiny("linear_probe", data_dir))
    assert jax.device_count() == 8 and trainer.mesh.size == 8
    with sharding.use_rules(trainer.mesh, trainer.rules):
        state = trainer.init()
        before = jax.device_get(state["params"])
        batch = _batch(trainer)
        for _ in range(2):  # step 0's learning rate is 0 (warmup): the head moves at step 1
            state, metrics = trainer.train_step(state, batch, None)
        after = jax.device_get(state["params"])
    frozen = {k: v for k, v in before.items() if k not in ("head", "head_bn_mean", "head_bn_var")}
    assert "encoder" in frozen and "patch_embed" in frozen
    for k in frozen:
        for x, y in zip(jax.tree.leaves(before[k]), jax.tree.leaves(after[k]), strict=True):
            assert np.array_equal(x, y), k
    assert not np.array_equal(before["head"]["kernel"], after["head"]["kernel"])
    # The batch's statistics of the frozen features, computed here on the host.
    model = nnx.merge(trainer.graphdef, before)
    feats = np.asarray(model.features(jnp.asarray(jax.device_get(batch["image"]))), np.float64)
    m, mean, var = classify.BN_MOMENTUM, np.zeros(feats.shape[1]), np.ones(feats.shape[1])
    for _ in range(2):  # torch.nn.BatchNorm1d's running averages, the same batch twice
        mean, var = m * mean + (1 - m) * feats.mean(0), m * var + (1 - m) * feats.var(0, ddof=1)
    np.testing.assert_allclose(after["head_bn_mean"], mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(after["head_bn_var"], var, rtol=1e-4, atol=1e-6)
    # The optimizer keeps state for the head alone: nothing the size of the encoder.
    opt_size = sum(x.size for x in jax.tree.leaves(state["opt"]))
    head_size = sum(x.size for x in jax.tree.leaves(before["head"]))
    assert opt_size <= 3 * head_size + 8
    assert np.isfinite(float(metrics["loss"]))


@pytest.fixture(scope="module")
def mae_workdir(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("mae")
    train.train(tiny("mae", data_dir, total_steps=4, checkpoint_every=4), workdir)
    return workdir


def test_a_classifier_takes_the_mae_encoder_as_mae_fine_tuning_does(data_dir, mae_workdir):
    _, _, mae = checkpoint.load_params(mae_workdir)
    for family, pooling in (("image_classification", "mean"), ("linear_probe", "cls")):
        trainer = train.Trainer(tiny(family, data_dir))
        assert trainer.model_cfg.pooling == pooling
        with sharding.use_rules(trainer.mesh, trainer.rules):
            params = jax.device_get(trainer.init_from(str(mae_workdir))["params"])
            fresh = jax.device_get(trainer.init()["params"])
        for name in ("patch_embed", "cls_token", "encoder"):
            for x, y in zip(jax.tree.leaves(params[name]), jax.tree.leaves(mae[name]), strict=True):
                assert np.array_equal(x, np.asarray(y)), name
        assert np.array_equal(params["head"]["kernel"], fresh["head"]["kernel"])  # the head: fresh
        if pooling == "cls":  # the pre-trained norm on [CLS]; mean pooling starts a fresh fc_norm
            assert np.array_equal(params["norm"]["scale"], np.asarray(mae["norm"]["scale"]))
        if trainer.model_cfg.pos_embed == "learned":
            table = vit.sincos_pos_embed_2d(trainer.model_cfg.hidden, trainer.model_cfg.grid_size)
            np.testing.assert_allclose(params["pos_embed"], table, atol=1e-7)


def test_beit_fine_tuning_takes_the_encoder_and_pools_the_patches_into_a_fresh_classifier(data_dir, tmp_path):
    """From a BEiT checkpoint: the encoder loads, its final LayerNorm and visual-token head stay behind,
    fc_norm and the classifier start fresh (the classifier at BEiT's scale 0.001); a run trains and
    reports top-1 on every held-out image."""
    config = tiny("beit_classification", data_dir, total_steps=4, checkpoint_every=4)
    beit_cfg = models.make_config("beit", {**config.model.to_dict(), "num_classes": 0})
    pretrained = nnx.to_pure_dict(nnx.state(models.build("beit", beit_cfg, seed=7), nnx.Param))
    checkpoint.save_params(tmp_path / "beit", "beit", beit_cfg, pretrained)
    config.init = str(tmp_path / "beit")
    trainer = train.Trainer(config)
    with sharding.use_rules(trainer.mesh, trainer.rules):
        params = jax.device_get(trainer.init_from(config.init)["params"])
    assert "head" not in params and "norm" not in params
    for name in ("patch_embed", "cls_token", "rel_pos_table", "stack"):
        for x, y in zip(jax.tree.leaves(params[name]), jax.tree.leaves(pretrained[name]), strict=True):
            assert np.array_equal(x, np.asarray(y)), name
    assert 0 < np.abs(params["classifier"]["kernel"]).max() < 1e-4  # 0.02 × 0.001, truncated
    report = train.train(config, tmp_path / "ft")
    assert json.loads((tmp_path / "ft" / "report.json").read_text())["eval_examples"] == 297
    assert np.isfinite(report["loss"])


def test_finetune_command_reports_top1_over_every_held_out_image(data_dir, mae_workdir, tmp_path):
    config = config_file(tmp_path, "image_classification", data_dir, total_steps=4, checkpoint_every=4)
    workdir = tmp_path / "ft"
    run = subprocess.run(
        [sys.executable, "-m", "maskjax", "finetune", f"--config={config}", f"--workdir={workdir}",
         f"--init={mae_workdir}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"arrays from {mae_workdir}" in run.stdout and "freshly initialised: /head" in run.stdout
    report = json.loads((workdir / "report.json").read_text())
    validation = image_datasets.open_source("digits", "validation", data_dir)
    assert report["eval_examples"] == len(validation) == 297
    # The same number from the saved weights, image by image.
    family, model_cfg, params = checkpoint.load_params(workdir)
    model = nnx.merge(nnx.graphdef(vit.Vit(model_cfg, rngs=nnx.Rngs(0))), params)
    source, transform = loaders.source_and_transform(tiny("image_classification", data_dir), "eval")
    rows = [transform(source[i]) for i in range(len(source))]
    predicted = np.argmax(np.asarray(model(jnp.stack([r["image"] for r in rows]))), -1)
    assert report["top1"] == pytest.approx(np.mean(predicted == np.array([r["label"] for r in rows])))

    wrong = subprocess.run(
        [sys.executable, "-m", "maskjax", "probe", f"--config={config}", f"--workdir={tmp_path / 'p'}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert wrong.returncode == 1 and len(wrong.stderr.strip().splitlines()) == 1
    assert "family linear_probe" in wrong.stderr and "'image_classification' is not one" in wrong.stderr


def test_label_fraction_keeps_a_share_of_every_class(data_dir):
    source = image_datasets.open_source("digits", "train", data_dir)
    labels = np.array([int(source[i]["label"]) for i in range(len(source))])
    subset = image_datasets.LabelledFraction(source, 0.01)
    kept = np.array([int(subset[i]["label"]) for i in range(len(subset))])
    counts = np.bincount(labels, minlength=10)
    assert np.array_equal(np.bincount(kept, minlength=10), np.ceil(0.01 * counts).astype(int))
    sliced = image_datasets.open_source("digits", "train[:1%]", data_dir)  # what a tfds slice gives
    assert len({int(sliced[i]["label"]) for i in range(len(sliced))}) < 10
    c = tiny("image_classification", data_dir)
    c.data.label_fraction = 0.1
    source, _ = loaders.source_and_transform(c, "train")
    assert len(source) == int(np.ceil(0.1 * counts).sum())
    assert len(loaders.source_and_transform(c, "eval")[0]) == 297  # held-out data is never cut


@pytest.mark.parametrize(
    "family, key, value, field",
    [
        ("image_classification", "model.num_classes", 0, "model.num_classes"),
        ("image_classification", "task.label_smoothing", 1.5, "task.label_smoothing"),
        ("image_classification", "data.label_fraction", 0.0, "data.label_fraction"),
        ("linear_probe", "task.mixup", 0.8, "task.mixup"),
        ("linear_probe", "model.drop_path", 0.1, "model.drop_path"),
    ],
)
def test_transfer_configs_refuse_bad_values_by_name(data_dir, family, key, value, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        train.Trainer(tiny(family, data_dir, **{key: value}))


# ----------------------------------------------------------------- frozen-feature evaluators


def test_knn_votes_as_the_weighted_nearest_neighbours_by_cosine():
    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(60, 5)), rng.normal(size=(25, 5))
    train_y, test_y = rng.integers(0, 4, 60), rng.integers(0, 4, 25)
    expected = []
    for t in test_x:  # written out, one query at a time
        sims = [float(t @ a / np.linalg.norm(t) / np.linalg.norm(a)) for a in train_x]
        order = sorted(range(len(sims)), key=lambda j: -sims[j])[:7]
        votes = np.zeros(4)
        for j in order:
            votes[train_y[j]] += np.exp(sims[j] / 0.1)
        expected.append(int(np.argmax(votes)))
    got = features.knn_top1(train_x, train_y, test_x, test_y, k=7, temperature=0.1)
    assert got == pytest.approx(np.mean(np.array(expected) == test_y))


def test_ridge_probe_predicts_as_sklearn_ridge_on_the_same_design():
    sklearn_linear = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 6)) * 2
    train_y, test_y = rng.integers(0, 3, 90), rng.integers(0, 3, 40)
    train_x = centres[train_y] + rng.normal(size=(90, 6)) * 1.5
    test_x = centres[test_y] + rng.normal(size=(40, 6)) * 1.5
    l2 = 0.05
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    design = lambda x: np.concatenate([(x - mean) / std, np.ones((len(x), 1))], 1)  # noqa: E731
    ref = sklearn_linear.Ridge(alpha=l2 * len(train_x), fit_intercept=False).fit(
        design(train_x), 2 * np.eye(3)[train_y] - 1
    )
    expected = np.mean(ref.predict(design(test_x)).argmax(1) == test_y)
    assert features.ridge_top1(train_x, train_y, test_x, test_y, l2) == pytest.approx(expected)
    assert expected > 0.6  # the clusters are separable enough for the comparison to mean something


def test_pre_training_logs_knn_and_ridge_from_step_0(data_dir, tmp_path):
    c = tiny("mae", data_dir, total_steps=4)
    c.evals.update(train_examples=300, test_examples=100)
    c.evals.knn.every = 2
    c.evals.ridge.update(every=4)
    train.train(c, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("split") == "evals"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert "ridge_top1" in evals[0] and "ridge_top1" not in evals[1] and "ridge_top1" in evals[2]
    assert all(0.0 <= r["knn_top1"] <= 1.0 and r["evals_seconds"] > 0 for r in evals)
    assert "evals_cost_fraction" in evals[1]
    # The step-0 k-NN is that of the fresh encoder: recomputed here from the same images.
    trainer = train.Trainer(c)
    with sharding.use_rules(trainer.mesh, trainer.rules):
        fresh = jax.device_get(trainer.init()["params"])
    model = nnx.merge(trainer.graphdef, fresh)
    images = {}
    for split in ("train", "validation"):
        plain = ml_collections.ConfigDict(c.to_dict())
        plain.data.eval_split = split
        source, transform = loaders.source_and_transform(plain, "eval")
        n = 300 if split == "train" else 100
        rows_ = [transform(source[i]) for i in range(n)]
        images[split] = (np.stack([r["image"] for r in rows_]), np.array([r["label"] for r in rows_]))
    feats = {s: np.asarray(trainer.method.features(model, jnp.asarray(x))) for s, (x, _) in images.items()}
    expected = features.knn_top1(
        feats["train"], images["train"][1], feats["validation"], images["validation"][1]
    )
    assert evals[0]["knn_top1"] == pytest.approx(expected, abs=1.5 / 100)  # one image in 100 may differ


def test_evals_on_a_family_without_image_features_is_a_config_error(data_dir):
    c = tiny("image_classification", data_dir)
    c.evals.knn.every = 2
    trainer = train.Trainer(c)
    features.FeatureEvals(trainer, c)  # a ViT classifier has features: fine
    with pytest.raises(ConfigError, match="evals"):
        bad = ml_collections.ConfigDict(c.to_dict())
        bad.evals.unknown = dict(every=1)
        features.FeatureEvals(trainer, bad)


def test_label_efficiency_runs_both_starts_at_every_share_and_plots_them(
    data_dir, mae_workdir, tmp_path, capsys
):
    from maskjax import transfer

    c = tiny("image_classification", data_dir, total_steps=2, checkpoint_every=2)
    result = transfer.run(c, str(mae_workdir), tmp_path, [0.1])
    out = capsys.readouterr().out
    assert result["fractions"] == [0.1] and len(result["pretrained"]) == len(result["scratch"]) == 1
    for arm in transfer.ARMS:
        for f, top1 in zip(result["fractions"], result[arm], strict=True):
            report = json.loads((tmp_path / f"{arm}-{f:g}" / "report.json").read_text())
            assert report["top1"] == top1 and report["eval_examples"] == 297
    assert out.count(f"arrays from {mae_workdir}") == 1  # the pre-trained arm only
    assert "10%" in out.splitlines()[-2]  # the table's row
    assert json.loads((tmp_path / "label_efficiency.json").read_text())["scratch"] == result["scratch"]
    assert (tmp_path / "label_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_beit_features_pool_the_unmasked_patch_tokens():
    from maskjax import methods, models
    from maskjax.models import beit

    cfg = beit.BeitConfig(
        image_size=8, patch_size=2, channels=1, hidden=32, layers=2, heads=2, mlp_dim=64, codebook_size=16
    )
    model = models.build("beit", cfg)
    images = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    got = methods.get("beit").features(model, images)
    hidden = model(images, jnp.zeros((3, cfg.num_patches), bool))["hidden"]
    np.testing.assert_allclose(got, hidden[:, 1:].mean(1), rtol=1e-5, atol=1e-6)
    assert got.shape == (3, 32) and not np.allclose(got[0], got[1])


def test_reconstruct_draws_figure_2_from_a_workdir(mae_workdir, tmp_path):
    """Row 4 is row 3 with the visible patches of row 1 pasted back; the command names a bad ratio."""
    from maskjax import infer
    from maskjax.evaluators import reconstruction

    model, cfg = infer.load(mae_workdir, ("mae",))
    images = jax.random.normal(jax.random.key(1), (4, cfg.image_size, cfg.image_size, cfg.channels))
    out = reconstruction.reconstruct(model, images, jax.random.key(2), 0.75, False)
    p = cfg.patch_size
    patches = {k: vit.patchify(out[k], p) for k in ("original", "masked", "reconstruction", "pasted")}
    visible = np.asarray(jnp.any(patches["masked"] != 0, axis=-1))  # random pixels: never exactly 0
    assert visible.sum(1).tolist() == [cfg.num_patches // 4] * 4  # 25% visible in every image
    np.testing.assert_allclose(patches["pasted"][visible], patches["original"][visible], atol=1e-6)
    np.testing.assert_allclose(patches["pasted"][~visible], patches["reconstruction"][~visible], atol=1e-6)

    figure = tmp_path / "fig.png"
    run = subprocess.run(
        [sys.executable, "-m", "maskjax", "reconstruct", f"--workdir={mae_workdir}", f"--out={figure}",
         "--n=5", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["images"] == 5 and result["mask_ratio"] == 0.75 and result["figure"] == str(figure)
    assert 0 < result["reconstruction_loss"] and figure.read_bytes()[:4] == b"\x89PNG"


def test_reconstruct_maps_beits_masked_token_accuracy(data_dir, tmp_path):
    """A BEiT run's map: the accuracy is the share of masked patches whose top token is the tokenizer's,
    checked against the model and tokenizer run directly; the PNG has its three rows."""
    from PIL import Image

    from maskjax import infer
    from maskjax.evaluators import reconstruction
    from maskjax.methods import beit as beit_method

    train.train(tiny("vqvae", data_dir, total_steps=2, checkpoint_every=2), tmp_path / "vq")
    config = tiny(
        "beit",
        data_dir,
        total_steps=2,
        checkpoint_every=2,
        **{"masking.tokenizer_workdir": str(tmp_path / "vq")},
    )
    train.train(config, tmp_path / "beit")
    result = reconstruction.from_workdir(str(tmp_path / "beit"), str(tmp_path / "map.png"), n=4, seed=3)
    assert result["images"] == 4 and 0 < result["masked_patches"] <= 4 * config.masking.num_masked

    model, cfg = infer.load(tmp_path / "beit", ("beit",))
    graphdef, _, params = beit_method._tokenizer(str(tmp_path / "vq"))
    params = jax.device_get(params)
    source, transform = loaders.source_and_transform(config, "eval")
    images = jnp.stack([transform(source[i])["image"] for i in range(4)])
    out = reconstruction.beit_accuracy(
        model, nnx.merge(graphdef, params), images, jax.random.key(3), config.masking
    )
    codes = nnx.merge(graphdef, params).encode(images)
    top = jnp.argmax(model(images, out["mask"])["logits"], -1)
    expected = float(((top == codes) & out["mask"]).sum() / out["mask"].sum())
    assert result["masked_token_accuracy"] == pytest.approx(expected)
    assert int(out["mask"].sum()) == result["masked_patches"]
    width, height = Image.open(tmp_path / "map.png").size
    assert height > width / 4 * 2  # three rows of four columns
