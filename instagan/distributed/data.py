"""Ray Data ingest: the data set of each domain for TorchTrainer(datasets=...), and one epoch of batches on a Ray
Train worker from its shards, paired, augmented and batched by instagan.data as the local path does.

    TorchTrainer(..., datasets=ray_datasets(root, "train"))
    # in the worker, once per epoch:
    for batch_a, batch_b in iter_pairs(get_dataset_shard("a"), get_dataset_shard("b"), batch_size, size,
                                       load_size, flip, seed, epoch, ins_cap): ...
Benchmark: `python -m data_prep.bench_ingest --help`.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Iterator

from instagan.data import COLUMNS, DOMAINS, SHUFFLE_ROWS, batch_pairs, pair_rows, part_files, prefetch


def ray_datasets(root: str, split: str, materialize: bool = False) -> dict[str, Any]:
    """{"a": ray.data.Dataset, "b": ...} over <root>/<split>/<a|b>; pass as TorchTrainer(datasets=...).

    Rows stay encoded (~0.07 MB at 200x200): the worker decodes and augments them in iter_pairs, which measured
    faster than a map_batches decode stage (data_prep/bench_ingest.py --mode ray_decode): decoded samples are 4-5x
    larger in the object store and the worker's prefetch thread already outruns a training step.
    materialize: read the Parquet files once into the object store (when the split's encoded size, listed in
    metadata.json "files", fits): each epoch then starts in ~0.1 s instead of re-running the read (~3 s here).
    """
    import ray.data

    out = {}
    for d in DOMAINS:
        path = f"{str(root).rstrip('/')}/{split}/{d}"
        if "://" not in path:
            part_files(root, split, d)  # a clear error now rather than a Ray traceback in every worker later
        out[d] = ray.data.read_parquet(path).select_columns(COLUMNS)
        if materialize:
            out[d] = out[d].materialize()
    return out


def _shard_rows(shard: Any, seed: int, batch_rows: int = 32) -> Iterator[dict]:
    """Rows of one DataIterator epoch (one iter_batches call), locally shuffled with a seeded buffer."""
    for batch in shard.iter_batches(batch_size=batch_rows, batch_format="numpy", prefetch_batches=2,
                                    local_shuffle_buffer_size=SHUFFLE_ROWS, local_shuffle_seed=seed):
        keys = list(batch)
        for i in range(len(batch[keys[0]])):
            yield {k: batch[k][i] for k in keys}


def _world_rank() -> int:
    try:
        import ray.train

        return ray.train.get_context().get_world_rank()
    except Exception:  # outside a Ray Train worker (a plain DataIterator in a test or benchmark)
        return 0


def iter_pairs(shard_a: Any, shard_b: Any, batch_size: int, size: int, load_size: int, flip: bool, seed: int,
               epoch: int, ins_cap: int | None = None, *, rank: int | None = None, train: bool = True,
               prefetch_batches: int = 2) -> Iterator[tuple[dict, dict]]:
    """One epoch of unpaired (batch_a, batch_b) on a Ray Train worker from get_dataset_shard("a") / ("b").

    Each shard is iterated exactly once per call (see pair_rows): Ray's split gives every rank the same row count,
    so every rank yields the same number of batches and meets the same barriers. rank defaults to the Ray Train
    world rank (0 outside a worker). Decoding and augmentation run in a prefetch thread, prefetch_batches ahead.
    """
    rank = _world_rank() if rank is None else rank
    base = int.from_bytes(hashlib.sha256(f"{seed}/{epoch}/{rank}".encode()).digest()[:4], "little")
    rows_a, rows_b = _shard_rows(shard_a, base), _shard_rows(shard_b, base + 1)
    pairs = pair_rows(rows_a, rows_b, random.Random(base))
    yield from prefetch(batch_pairs(pairs, batch_size, size, load_size, flip, seed, epoch, ins_cap, train),
                        prefetch_batches)
