"""The one input loader every family uses: deterministic, resumable, per process.

The batch of global step `s` is a pure function of (seed, s), never of a host-side
history, so a resume, a restart on another number of processes, or two processes
reading side by side all see the same examples:

    stream position g = s·B + r            (B = global batch, r = row in the batch)
    epoch e = g // n,  index = perm_e[g % n],  perm_e = default_rng((seed, e)).permutation(n)
    process p of P reads rows [p·B/P, (p+1)·B/P) of each global batch
    per-example augmentation rng = default_rng((seed, AUG, g, attempt))

The stream runs on across epoch boundaries (no dropped remainder); every example
is seen once per epoch. Process shards are disjoint and, concatenated in process
order, are exactly the single-process batch.

Bad records: a source or transform raises `BadRecord(reason)`; the loader then
takes the next entries of the same epoch's permutation (attempt 1, 2, ...) until a
good one, and counts the reason. Float outputs that are not finite count as bad too,
so a corrupt record never reaches the model as a NaN. The counters are part of
`get_state()`, so they survive a resume; they are per process (sum them over
processes for a global count).

`to_global` turns each process's rows into one `jax.Array` in its final sharding
with `jax.make_array_from_process_local_data`, so no device ever holds the whole
batch unless the sharding says so.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

Example = dict[str, np.ndarray]
# transform(record, rng) -> example; `rng` is seeded by the example's stream position.
Transform = Callable[[Mapping[str, Any], np.random.Generator], Mapping[str, Any]]

_AUG = 0x61756720  # Separates the augmentation seeds from the permutation seeds (seed, epoch).
_MAX_ATTEMPTS = 1000  # Consecutive bad records tolerated before the source is declared broken.


class Source(Protocol):
    """Random access to records; a tfds data source (`tfds.data_source(...)`) is one."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Mapping[str, Any]: ...


class BadRecord(Exception):
    """A record to skip (undecodable image, empty document, ...); `reason` is a short category."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def example_rng(seed: int, position: int, attempt: int = 0) -> np.random.Generator:
    """The augmentation rng of stream position `position`: the same on every process and after a resume."""
    return np.random.default_rng((seed, _AUG, position, attempt))


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """perm_e: the order of the `n` example indices in epoch `epoch`."""
    return np.random.default_rng((seed, epoch)).permutation(n)


def process_rows(global_batch: int, process_index: int, process_count: int) -> range:
    """Rows [p·B/P, (p+1)·B/P) of each global batch that process p reads."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if global_batch % process_count:
        raise ValueError(
            f"global_batch={global_batch} must be divisible by process_count={process_count} "
            "(every process reads the same number of rows)"
        )
    b = global_batch // process_count
    return range(process_index * b, (process_index + 1) * b)


def _as_example(record: Mapping[str, Any]) -> Example:
    ex = {k: np.asarray(v) for k, v in record.items()}
    for k, v in ex.items():
        if v.dtype.kind in "fc" and not np.isfinite(v).all():
            raise BadRecord("non_finite", f"key {k!r}")
    return ex


def _stack(examples: list[Example]) -> Example:
    keys = examples[0].keys()
    for ex in examples:
        if ex.keys() != keys:
            raise ValueError(f"examples of one batch have different keys: {sorted(keys)} vs {sorted(ex)}")
    return {k: np.stack([ex[k] for ex in examples]) for k in keys}


def _resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if (process_index is None) != (process_count is None):
        raise ValueError("give both process_index and process_count, or neither (then jax's are used)")
    if process_index is None:
        return jax.process_index(), jax.process_count()
    return int(process_index), int(process_count)


class Loader:
    """This process's rows of global batch `step`, `step+1`, ...; resumable with get_state / set_state.

    num_workers > 0 reads and transforms the examples of a batch on that many
    threads and prepares `prefetch` batches ahead; the batches are identical to
    num_workers=0 because each example depends only on its stream position.
    shuffle=False reads the indices in order (perm_e = 0..n-1), e.g. to extract features.
    """

    def __init__(
        self,
        source: Source,
        *,
        global_batch: int,
        seed: int,
        transform: Transform | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        start_step: int = 0,
        num_workers: int = 0,
        prefetch: int = 2,
        shuffle: bool = True,
    ):
        self.num_records = len(source)
        if self.num_records == 0:
            raise ValueError("the source has no records")
        if global_batch <= 0 or seed < 0 or start_step < 0:
            raise ValueError(
                f"need global_batch > 0, seed >= 0, start_step >= 0; got {global_batch}, {seed}, {start_step}"
            )
        self.source, self.transform = source, transform
        self.global_batch, self.seed, self.shuffle = int(global_batch), int(seed), shuffle
        self.process_index, self.process_count = _resolve_process(process_index, process_count)
        self.rows = process_rows(self.global_batch, self.process_index, self.process_count)
        self._step = int(start_step)
        self._skipped: collections.Counter[str] = collections.Counter()
        self._perms: dict[int, np.ndarray] = {}
        self._perm_lock = threading.Lock()
        self._prefetch = max(1, prefetch)
        self._pool = concurrent.futures.ThreadPoolExecutor(num_workers) if num_workers > 0 else None
        self._ahead = concurrent.futures.ThreadPoolExecutor(1) if num_workers > 0 else None
        self._pending: collections.deque[tuple[int, concurrent.futures.Future]] = collections.deque()

    # ---------------------------------------------------------------- the pure part: (seed, step) -> batch

    def _perm(self, epoch: int) -> np.ndarray:
        with self._perm_lock:
            if epoch not in self._perms:
                if len(self._perms) >= 2:  # Only the current and the next epoch are ever needed.
                    del self._perms[min(self._perms)]
                n = self.num_records
                self._perms[epoch] = epoch_permutation(self.seed, epoch, n) if self.shuffle else np.arange(n)
            return self._perms[epoch]

    def index(self, position: int, attempt: int = 0) -> int:
        """Record index read at stream `position` (attempt k > 0: the k-th substitute for a bad record)."""
        epoch, offset = divmod(position, self.num_records)
        return int(self._perm(epoch)[(offset + attempt) % self.num_records])

    def _example(self, position: int) -> tuple[Example, list[str]]:
        bad: list[str] = []
        for attempt in range(min(self.num_records, _MAX_ATTEMPTS)):
            try:
                record = self.source[self.index(position, attempt)]
                if self.transform is not None:
                    record = self.transform(record, example_rng(self.seed, position, attempt))
                return _as_example(record), bad
            except BadRecord as e:
                bad.append(e.reason)
        raise RuntimeError(
            f"{len(bad)} consecutive bad records from stream position {position} (reasons: "
            f"{dict(collections.Counter(bad))}); the dataset looks broken"
        )

    def batch_at(self, step: int) -> tuple[Example, collections.Counter[str]]:
        """(this process's rows of global batch `step`, bad-record reasons met while reading them)."""
        positions = [step * self.global_batch + r for r in self.rows]
        mapper = self._pool.map if self._pool is not None else map
        results = list(mapper(self._example, positions))
        return _stack([ex for ex, _ in results]), collections.Counter(r for _, bad in results for r in bad)

    # ---------------------------------------------------------------- the iterator and its state

    def __iter__(self) -> Iterator[Example]:
        return self

    def __next__(self) -> Example:
        if self._ahead is None:
            batch, bad = self.batch_at(self._step)
        else:
            while len(self._pending) < self._prefetch:
                s = self._step + len(self._pending)
                self._pending.append((s, self._ahead.submit(self.batch_at, s)))
            s, future = self._pending.popleft()
            assert s == self._step
            batch, bad = future.result()
        self._skipped.update(bad)
        self._step += 1
        return batch

    @property
    def step(self) -> int:
        """The global step whose batch `next()` returns."""
        return self._step

    @property
    def local_batch(self) -> int:
        return len(self.rows)

    @property
    def stats(self) -> dict[str, int]:
        """Bad records skipped so far by this process: {"skipped": total, "skipped/<reason>": count}."""
        return {"skipped": sum(self._skipped.values())} | {
            f"skipped/{r}": c for r, c in sorted(self._skipped.items())
        }

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: the next step, what it depends on, and the skip counters."""
        return {
            "step": self._step,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "num_records": self.num_records,
            "shuffle": self.shuffle,
            "skipped": dict(self._skipped),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Resume at `state["step"]`; refuse the state of another seed, batch or dataset."""
        for key in ("seed", "global_batch", "num_records", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"loader state has {key}={state[key]!r} but this loader has "
                    f"{key}={getattr(self, key)!r}; resuming it would not reproduce the saved run"
                )
        self._pending.clear()  # Prefetched batches of the old position are dropped (results ignored).
        self._step = int(state["step"])
        self._skipped = collections.Counter({str(k): int(v) for k, v in state.get("skipped", {}).items()})

    def close(self) -> None:
        self._pending.clear()
        for ex in (self._ahead, self._pool):
            if ex is not None:
                ex.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EvalBatches:
    """One pass over `source` in order, padded to whole global batches with a "valid" row mask.

    Every batch has the same shape (one compile); rows past the end and bad records
    are zeros with valid=False, so a metric weighted by "valid" counts each record once.
    """

    def __init__(
        self,
        source: Source,
        *,
        global_batch: int,
        transform: Transform | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        num_workers: int = 0,
    ):
        self.source, self.transform, self.global_batch = source, transform, int(global_batch)
        self.process_index, self.process_count = _resolve_process(process_index, process_count)
        self.rows = process_rows(self.global_batch, self.process_index, self.process_count)
        self.num_records = len(source)
        self._pool = concurrent.futures.ThreadPoolExecutor(num_workers) if num_workers > 0 else None
        self._skipped: collections.Counter[str] = collections.Counter()
        self._template: Example | None = None

    def __len__(self) -> int:
        return -(-self.num_records // self.global_batch)

    def _example(self, position: int) -> Example | str | None:
        if position >= self.num_records:
            return None
        try:
            record = self.source[position]
            if self.transform is not None:
                record = self.transform(record, example_rng(0, position))
            return _as_example(record)
        except BadRecord as e:
            return e.reason

    def _zeros(self) -> Example:
        if self._template is None:
            for i in range(min(self.num_records, _MAX_ATTEMPTS)):
                ex = self._example(i)
                if isinstance(ex, dict):
                    self._template = {k: np.zeros_like(v) for k, v in ex.items()}
                    break
            else:
                raise RuntimeError("no readable record at the start of the evaluation source")
        return self._template

    def __iter__(self) -> Iterator[Example]:
        mapper = self._pool.map if self._pool is not None else map
        for step in range(len(self)):
            results = list(mapper(self._example, [step * self.global_batch + r for r in self.rows]))
            self._skipped.update(r for r in results if isinstance(r, str))
            examples = [r if isinstance(r, dict) else self._zeros() for r in results]
            batch = _stack(examples)
            batch["valid"] = np.array([isinstance(r, dict) for r in results])
            yield batch

    @property
    def stats(self) -> dict[str, int]:
        return {"skipped": sum(self._skipped.values())} | {
            f"skipped/{r}": c for r, c in sorted(self._skipped.items())
        }


def _check_rows(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...], key: str) -> None:
    """The rows this process's devices hold must be the rows its loader read, else the batch is scrambled."""
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        start, stop, _ = index[0].indices(global_shape[0]) if index else (0, global_shape[0], 1)
        rows.update(range(start, stop))
    want = process_rows(global_shape[0], jax.process_index(), jax.process_count())
    if rows != set(want):
        have = f"[{min(rows)}, {max(rows) + 1})" if rows else "none"
        raise ValueError(
            f"batch key {key!r}: process {jax.process_index()} read rows [{want.start}, {want.stop}) of the "
            f"global batch but its devices hold rows {have} under {sharding}. Shard the batch axis across "
            "processes, each process's devices holding one block of it, in process order (as jax.make_mesh)."
        )


def to_global(
    local_batch: Mapping[str, np.ndarray],
    mesh: jax.sharding.Mesh | None,
    spec_or_sharding: PartitionSpec
    | jax.sharding.Sharding
    | Mapping[str, PartitionSpec | jax.sharding.Sharding],
) -> dict[str, jax.Array]:
    """This process's rows -> global jax.Arrays of B = rows·P examples, placed directly in their sharding.

    `spec_or_sharding` is one PartitionSpec / Sharding for every key, or a dict per key;
    a PartitionSpec is taken over `mesh`. The leading axis is the batch axis.
    """
    out = {}
    for key, x in local_batch.items():
        s = spec_or_sharding[key] if isinstance(spec_or_sharding, Mapping) else spec_or_sharding
        sharding = s if isinstance(s, jax.sharding.Sharding) else NamedSharding(mesh, s)
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
        _check_rows(sharding, global_shape, key)
        out[key] = jax.make_array_from_process_local_data(sharding, x, global_shape)
    return out


def benchmark_input(
    source: Source,
    transform: Transform | None,
    global_batch: int,
    steps: int,
    *,
    seed: int = 0,
    warmup: int = 2,
    num_workers: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    tokens_key: str | None = None,
    pad_id: int | None = None,
) -> dict[str, float]:
    """The input pipeline alone, per process: examples/s (and tokens/s), to set beside the train step's.

    Tokens are the elements of `tokens_key` (default "input_ids" when present),
    not counting `pad_id` if given.
    """
    loader = Loader(
        source,
        global_batch=global_batch,
        seed=seed,
        transform=transform,
        process_index=process_index,
        process_count=process_count,
        num_workers=num_workers,
    )
    with loader:
        for _ in range(warmup):
            next(loader)
        tokens = 0
        start = time.perf_counter()
        for _ in range(steps):
            batch = next(loader)
            key = tokens_key or ("input_ids" if "input_ids" in batch else None)
            if key is not None:
                t = batch[key]
                tokens += t.size if pad_id is None else int(np.count_nonzero(t != pad_id))
        seconds = time.perf_counter() - start
    result = {
        "examples_per_sec": loader.local_batch * steps / seconds,
        "batches_per_sec": steps / seconds,
        "sec_per_batch": seconds / steps,
        "local_batch": loader.local_batch,
        "global_batch": global_batch,
        "process_index": loader.process_index,
        "process_count": loader.process_count,
        "num_workers": num_workers,
        "skipped": loader.stats["skipped"],
    }
    if tokens:
        result["tokens_per_sec"] = tokens / seconds
    return result
