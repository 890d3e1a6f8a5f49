"""The per-process loader: pure in (seed, step), disjoint process shards, exact resume, bad records."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maskjax.data import images
from maskjax.data.pipeline import (
    BadRecord,
    EvalBatches,
    Loader,
    benchmark_input,
    epoch_permutation,
    to_global,
)

N = 22  # records; not a multiple of the batch, so batches straddle epoch boundaries


class Records:
    """A random-access source: record i holds its index; `bad` maps an index to a corrupt file's bytes."""

    def __init__(self, n=N, bad=None):
        self.n, self.bad = n, bad or {}

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image = self.bad.get(i, np.full((4, 4, 1), i, np.uint8))
        return {"image": image, "index": np.int64(i)}


def augment(record, rng):
    """Decodes like an image transform and draws per-example randomness (so resume must restore it)."""
    img = images.decode(record["image"], channels=None)
    return {
        "index": record["index"],
        "image": img[:, :, 0].astype(np.float32) + rng.random((4, 4), np.float32),
    }


def take(loader, k):
    return [next(loader) for _ in range(k)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def single(**kw):
    return Loader(
        Records(), global_batch=8, seed=3, transform=augment, process_index=0, process_count=1, **kw
    )


def test_every_epoch_is_a_permutation_and_the_stream_crosses_epochs():
    batches = take(single(), 11)  # 88 positions = 4 epochs of 22
    stream = np.concatenate([b["index"] for b in batches])
    epochs = stream.reshape(4, N)
    for e in range(4):
        assert sorted(epochs[e]) == list(range(N))
        np.testing.assert_array_equal(epochs[e], epoch_permutation(3, e, N))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    # Batch 2 holds positions 16..23: the end of epoch 0 and the start of epoch 1.
    np.testing.assert_array_equal(batches[2]["index"], np.concatenate([epochs[0][16:], epochs[1][:2]]))
    # The batch of step s depends on (seed, s) only.
    assert_batches_equal(take(single(start_step=5), 3), batches[5:8])
    other = Loader(Records(), global_batch=8, seed=4, transform=augment, process_index=0, process_count=1)
    assert not np.array_equal(next(other)["index"], batches[0]["index"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_are_disjoint_and_their_union_is_the_single_process_stream(process_count):
    want = take(single(), 6)
    shards = [
        take(
            Loader(
                Records(),
                global_batch=8,
                seed=3,
                transform=augment,
                process_index=p,
                process_count=process_count,
            ),
            6,
        )
        for p in range(process_count)
    ]
    for step in range(6):
        parts = [s[step] for s in shards]
        assert all(len(p["index"]) == 8 // process_count for p in parts)
        positions = [
            set(range(step * 8 + p * 8 // process_count, step * 8 + (p + 1) * 8 // process_count))
            for p in range(process_count)
        ]
        assert set.union(*positions) == set(range(step * 8, step * 8 + 8)) and sum(map(len, positions)) == 8
        union = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        assert_batches_equal([union], [want[step]])  # indices and augmentation randomness alike
    with pytest.raises(ValueError, match="divisible by process_count=3"):
        Loader(Records(), global_batch=8, seed=3, process_index=0, process_count=3)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_gives_the_uninterrupted_batches(num_workers):
    uninterrupted = single(num_workers=num_workers)
    first = take(uninterrupted, 4)
    state = json.loads(json.dumps(uninterrupted.get_state()))  # what goes into the checkpoint
    assert state["step"] == 4
    rest = take(uninterrupted, 5)  # crosses two epoch boundaries

    resumed = single(num_workers=num_workers)
    take(resumed, 1)  # a different position (and prefetched batches) before the restore
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 5), rest)
    # A fresh run never reaches these batches without the state: they differ from its first ones.
    assert not np.array_equal(rest[0]["index"], first[0]["index"])
    # Resuming on another number of processes: process 1 of 2 reads the second half of the same batches.
    half = Loader(Records(), global_batch=8, seed=3, transform=augment, process_index=1, process_count=2)
    half.set_state(state)
    assert_batches_equal(take(half, 2), [{k: v[4:] for k, v in b.items()} for b in rest[:2]])
    uninterrupted.close()
    resumed.close()


def test_a_state_of_another_run_is_refused():
    state = single().get_state()
    other = Loader(Records(), global_batch=16, seed=3, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="global_batch=8 but this loader has global_batch=16"):
        other.set_state(state)


def test_corrupt_empty_and_nan_records_are_skipped_and_counted():
    perm = epoch_permutation(3, 0, N)
    # Bad records at offsets 3, 9, 15 of epoch 0 (never adjacent, so each is replaced by the next entry).
    corrupt, empty, nan = int(perm[3]), int(perm[9]), int(perm[15])
    source = Records(bad={corrupt: b"\x89PNG\r\n not really a png", empty: b""})

    def transform(record, rng):
        out = augment(record, rng)
        if record["index"] == nan:
            out["image"] = out["image"] * np.nan  # a transform that goes wrong must not reach the model
        return out

    loader = Loader(source, global_batch=2, seed=3, transform=transform, process_index=0, process_count=1)
    epoch = take(loader, N // 2)
    stream = np.concatenate([b["index"] for b in epoch])
    expected = perm.copy()
    expected[[3, 9, 15]] = perm[[4, 10, 16]]  # the next index of the permutation stands in
    np.testing.assert_array_equal(stream, expected)
    assert all(np.isfinite(b["image"]).all() for b in epoch)
    assert loader.stats == {
        "skipped": 3,
        "skipped/empty_image": 1,
        "skipped/non_finite": 1,
        "skipped/undecodable_image": 1,
    }
    state = loader.get_state()
    assert state["skipped"] == {"undecodable_image": 1, "empty_image": 1, "non_finite": 1}
    # The counters are restored with the position and keep counting.
    resumed = Loader(source, global_batch=2, seed=3, transform=transform, process_index=0, process_count=1)
    resumed.set_state(state)
    take(resumed, N // 2)
    assert resumed.stats["skipped"] == 6


def test_a_source_of_only_bad_records_raises_instead_of_hanging():
    def broken(record, rng):
        raise BadRecord("empty_document")

    loader = Loader(Records(n=5), global_batch=2, seed=0, transform=broken, process_index=0, process_count=1)
    with pytest.raises(RuntimeError, match="5 consecutive bad records.*empty_document"):
        next(loader)


def test_eval_batches_cover_each_record_once_with_static_shapes():
    source = Records(bad={5: b"junk"})
    seen, total = [], 0
    for p in range(2):
        ev = EvalBatches(source, global_batch=8, transform=augment, process_index=p, process_count=2)
        batches = list(ev)
        assert len(batches) == 3 and all(b["image"].shape == (4, 4, 4) for b in batches)
        for b in batches:
            seen += b["index"][b["valid"]].tolist()
            total += int(b["valid"].sum())
            assert (b["image"][~b["valid"]] == 0).all()
        assert ev.stats["skipped"] == (1 if p == 1 else 0)  # index 5 is in process 1's rows [4, 8) of batch 0
    assert sorted(seen) == [i for i in range(N) if i != 5] and total == N - 1


def test_to_global_places_the_batch_in_its_sharding():
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    batch = next(single())
    out = to_global(batch, mesh, PartitionSpec("data"))
    assert out["image"].shape == (8, 4, 4) and out["image"].sharding == NamedSharding(
        mesh, PartitionSpec("data")
    )
    assert len(out["image"].addressable_shards[0].data) == 2
    for k in batch:
        np.testing.assert_array_equal(np.asarray(out[k]), batch[k])


def test_benchmark_input_reports_throughput():
    ids = type(
        "Tokens",
        (),
        {"__len__": lambda s: 50, "__getitem__": lambda s, i: {"input_ids": np.array([i + 1, 0, 0, 7])}},
    )()
    r = benchmark_input(ids, None, global_batch=10, steps=5, tokens_key="input_ids", pad_id=0)
    assert r["examples_per_sec"] > 0 and r["tokens_per_sec"] == pytest.approx(
        r["examples_per_sec"] * 2, rel=1e-6
    )
    assert r["local_batch"] == 10 and r["skipped"] == 0


def test_loader_over_prepared_digits(tmp_path):
    """The real tfds source (array_record) through the loader, two processes and threads vs one."""
    pytest.importorskip("sklearn")
    from maskjax.data import image_datasets

    image_datasets.prepare("digits", tmp_path)
    src = image_datasets.open_source("digits", "train", tmp_path)
    mean, std = image_datasets.normalization("digits", tmp_path)
    tf = images.train_transform(8, mean, std)
    want = take(Loader(src, global_batch=32, seed=1, transform=tf, process_index=0, process_count=1), 3)
    parts = [
        take(
            Loader(
                src, global_batch=32, seed=1, transform=tf, process_index=p, process_count=2, num_workers=2
            ),
            3,
        )
        for p in range(2)
    ]
    for s in range(3):
        assert_batches_equal(
            [{k: np.concatenate([parts[0][s][k], parts[1][s][k]]) for k in want[s]}], [want[s]]
        )
    assert want[0]["image"].shape == (32, 8, 8, 1) and want[0]["image"].dtype == np.float32


WORKER = """
import sys, numpy as np, jax
sys.path.insert(0, {test_dir!r})
from test_pipeline import Records, augment
from maskjax.data.pipeline import Loader, to_global
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec

jax.distributed.initialize(coordinator_address="127.0.0.1:{port}", num_processes=2, process_id={pid})
assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
mesh = Mesh(np.array(jax.devices()), ("data",))
loader = Loader(Records(), global_batch=8, seed=3, transform=augment)  # process index/count from jax
assert (loader.process_index, loader.local_batch) == ({pid}, 4)
out = {{}}
for step in range(3):
    g = to_global(next(loader), mesh, PartitionSpec("data"))
    assert g["image"].shape == (8, 4, 4) and len(g["image"].addressable_shards) == 2
    for k, v in g.items():
        out[f"{{k}}{{step}}"] = np.asarray(multihost_utils.process_allgather(v, tiled=True))
if jax.process_index() == 0:
    np.savez({out_file!r}, **out)
jax.distributed.shutdown()
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_real_processes_assemble_the_single_process_batches(tmp_path):
    """2 processes × 2 CPU devices via jax.distributed on localhost; gathered global batch = 1 process's."""
    port, out_file = free_port(), str(tmp_path / "global.npz")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER.format(test_dir=str(Path(__file__).parent), port=port, pid=pid, out_file=out_file),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=180)[0])
    finally:
        for p in procs:
            p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    got = np.load(out_file)
    want = take(single(), 3)
    for step in range(3):
        for k in want[step]:
            np.testing.assert_array_equal(got[f"{k}{step}"], want[step][k])


def test_two_jobs_preparing_one_dataset_take_turns(tmp_path):
    """The second of two runs started at once waits for the first one's prepare, then finds it built."""
    import threading
    import time

    from maskjax.data import loaders

    events: list[tuple[str, str]] = []

    def prepare(name: str) -> None:
        events.append(("start", name))
        time.sleep(0.3)
        (tmp_path / "digits").mkdir(exist_ok=True)
        events.append(("end", name))

    threads = [
        threading.Thread(target=loaders._locked, args=(str(tmp_path / "digits"), lambda n=n: prepare(n)))
        for n in ("a", "b")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kinds = [k for k, _ in events]
    assert kinds == ["start", "end", "start", "end"], events  # never both inside at once
    assert events[0][1] == events[1][1] and events[2][1] == events[3][1]
