"""Ingest: Parquet rows written by data_prep -> augmented, padded (image, masks, valid) batches.

Plain PyTorch on a laptop or in tests (no Ray):
    ds = LocalDataset("/tmp/synth200", "train", "a", size=200, load_size=220, flip=True, seed=0)
    img, masks = ds[0]                                   # (3, 200, 200) in [-1, 1], (K, 200, 200) in {-1, 1}
    for batch_a, batch_b in local_batches("/tmp/synth200", "train", batch_size=4, size=200, load_size=220,
                                          flip=True, seed=0, epoch=0): ...
Ray Train (Ray is imported only inside these two functions):
    TorchTrainer(..., datasets=ray_datasets(root, "train"))
    # in the worker, once per epoch:
    for batch_a, batch_b in iter_pairs(get_dataset_shard("a"), get_dataset_shard("b"), batch_size, size,
                                       load_size, flip, seed, epoch, ins_cap): ...
Benchmark of the Ray Data path: `python -m data_prep.bench_ingest --help`.

Batches follow `instagan.masks` conventions: {"img": (B, 3, S, S) float in [-1, 1], "masks": (B, N, S, S) float in
{-1, 1}, "valid": (B, N) bool, "id": list[str]}, instances ordered by decreasing area, N = the batch's largest
instance count (at most ins_cap, keeping the largest), N >= 1.

Augmentation follows the paper and the authors' loader: resize to load_size x load_size, random crop size x size,
random horizontal flip; torchvision transforms v2 applies each draw to the tv_tensors.Image and tv_tensors.Mask of
a sample in one call, so image and masks cannot drift apart. Instances that leave the crop are dropped.

Randomness: sample order (shuffle buffer, cycling of the shorter domain) is seeded by (seed, epoch, world rank);
each sample's crop and flip by (seed, epoch, domain, id, pass), so a sample gets the same augmentation whichever
rank or position it lands on, and runs are reproducible even though Ray Data's block order is not.
"""

from __future__ import annotations

import functools
import hashlib
import io
import random
import warnings
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image
from pycocotools import mask as mask_util
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from instagan import masks as M

DOMAINS = ("a", "b")
COLUMNS = ["id", "image", "height", "width", "masks"]  # what ingest reads; data_prep.rows.SCHEMA has more
SHUFFLE_ROWS = 256  # rows in the worker's local shuffle buffer (encoded rows: ~0.1 MB each at 200x200)


# ---- decoding ----------------------------------------------------------------------------------------------

def decode_masks(counts: Sequence[bytes], height: int, width: int) -> np.ndarray:
    """COCO compressed RLE counts (data_prep's `masks` column) -> bool (K, height, width)."""
    if len(counts) == 0:
        return np.zeros((0, height, width), bool)
    rles = [{"size": [int(height), int(width)], "counts": bytes(c)} for c in counts]
    with warnings.catch_warnings():  # pycocotools' own NumPy 2 copy= deprecation, once per call otherwise
        warnings.simplefilter("ignore", DeprecationWarning)
        stack = mask_util.decode(rles)
    return np.ascontiguousarray(stack.transpose(2, 0, 1)).astype(bool)


def read_sample(row: dict) -> tuple[np.ndarray, np.ndarray]:
    """One Parquet row (dict with image, height, width, masks) -> (uint8 (H, W, 3) RGB, bool (K, H, W))."""
    with Image.open(io.BytesIO(row["image"])) as im:
        img = np.array(im.convert("RGB"))  # a writable copy: torch warns on read-only arrays
    return img, decode_masks(row["masks"], row["height"], row["width"])


# ---- augmentation ------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _transform(size: int, load_size: int, flip: bool, train: bool) -> v2.Transform:
    if not train:
        return v2.Resize((size, size), antialias=True)
    steps = [v2.Resize((load_size, load_size), antialias=True), v2.RandomCrop(size)]
    return v2.Compose(steps + ([v2.RandomHorizontalFlip(0.5)] if flip else []))


def augment(img: np.ndarray | Tensor, masks: np.ndarray | Tensor, size: int, load_size: int, flip: bool,
            generator: torch.Generator | None = None, train: bool = True) -> tuple[Tensor, Tensor]:
    """uint8 (H, W, 3), bool (K, H, W) -> image (3, size, size) in [-1, 1], masks (K', size, size) in {-1, 1}.

    train: resize to load_size, the same random crop and flip for image and masks, drop instances emptied by the
    crop (K' <= K, possibly 0). not train: resize to size only. Masks resize with nearest (tv_tensors.Mask rule).
    generator: draws come from it (reproducible); None uses torch's global generator.
    """
    img = torch.as_tensor(np.ascontiguousarray(img)) if isinstance(img, np.ndarray) else img
    masks = torch.as_tensor(np.ascontiguousarray(masks)) if isinstance(masks, np.ndarray) else masks
    x = tv_tensors.Image(img.permute(2, 0, 1) if img.shape[-1] == 3 and img.ndim == 3 else img)
    m = tv_tensors.Mask(masks.to(torch.uint8))
    tf = _transform(size, load_size, flip, train)
    if generator is None or not train:
        x, m = tf(x, m)
    else:
        # v2 transforms draw from the global CPU generator: run them on a private seed and restore the global state
        # (only the CPU generator: torch.manual_seed would also reseed CUDA, which belongs to the training loop)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            x, m = tf(x, m)
    m = m[m.flatten(1).amax(1) > 0] if m.shape[0] else m
    return x.float() / 127.5 - 1, m.float() * 2 - 1


def sample_generator(seed: int, epoch: int, domain: str, id: str, pass_: int = 0) -> torch.Generator:
    """The generator of one sample's augmentation; a stable hash (not Python's salted hash())."""
    key = hashlib.sha256(f"{seed}/{epoch}/{domain}/{id}/{pass_}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)


# ---- batching (shared by the local and the Ray paths) --------------------------------------------------------

def pair_rows(rows_a: Iterable[Any], rows_b: Iterable[Any], rng: random.Random) -> Iterator[tuple[Any, Any, int, int]]:
    """Unpaired pairs for one epoch: (row_a, row_b, pass_a, pass_b). The epoch covers the LONGER domain; the shorter
    one is cycled, reshuffled with rng on every extra pass (pass 1, 2, ...).

    Both inputs are walked together and each exactly once, so a Ray DataIterator is iterated once per epoch on every
    rank (same barriers everywhere, no re-iteration that could deadlock). The rows seen are kept until the shorter
    domain ends (memory: about twice the shorter domain's encoded rows on this rank), then the longer's are freed.
    """
    ita, itb = iter(rows_a), iter(rows_b)
    seen_a, seen_b = [], []
    end = object()
    while True:
        ra, rb = next(ita, end), next(itb, end)
        if ra is end or rb is end:
            break
        seen_a.append(ra)
        seen_b.append(rb)
        yield ra, rb, 0, 0
    if ra is end and rb is end:
        return
    if ra is end:
        if not seen_a:
            raise ValueError("domain a has no rows (on this rank): nothing to pair domain b with")
        seen_b.clear()
        for rb, (ra, p) in zip(chain([rb], itb), _cycle(seen_a, rng)):
            yield ra, rb, p, 0
    else:
        if not seen_b:
            raise ValueError("domain b has no rows (on this rank): nothing to pair domain a with")
        seen_a.clear()
        for ra, (rb, p) in zip(chain([ra], ita), _cycle(seen_b, rng)):
            yield ra, rb, 0, p


def _cycle(items: list, rng: random.Random) -> Iterator[tuple[Any, int]]:
    p = 0
    while True:
        p += 1
        order = list(range(len(items)))
        rng.shuffle(order)
        for i in order:
            yield items[i], p


def _collate(samples: list[tuple[Tensor, Tensor]], ids: list[str], ins_cap: int | None) -> dict[str, Any]:
    batch = M.collate(samples)
    if ins_cap is not None:
        batch["masks"], batch["valid"] = M.limit(batch["masks"], batch["valid"], ins_cap)
    batch["id"] = ids
    return batch


def batch_pairs(pairs: Iterable[tuple[dict, dict, int, int]], batch_size: int, size: int, load_size: int,
                flip: bool, seed: int, epoch: int, ins_cap: int | None = None, train: bool = True,
                read: Callable[[dict], tuple[np.ndarray, np.ndarray]] = read_sample) -> Iterator[tuple[dict, dict]]:
    """Decode (`read`), augment and collate paired rows into (batch_a, batch_b); the last batch may be smaller."""
    buf: dict[str, list] = {"a": [], "b": []}
    ids: dict[str, list] = {"a": [], "b": []}
    for ra, rb, pa, pb in pairs:
        for d, row, p in (("a", ra, pa), ("b", rb, pb)):
            rid = str(row["id"])
            img, masks = read(row)
            buf[d].append(augment(img, masks, size, load_size, flip, sample_generator(seed, epoch, d, rid, p), train))
            ids[d].append(rid)
        if len(buf["a"]) == batch_size:
            yield _collate(buf["a"], ids["a"], ins_cap), _collate(buf["b"], ids["b"], ins_cap)
            buf, ids = {"a": [], "b": []}, {"a": [], "b": []}
    if buf["a"]:
        yield _collate(buf["a"], ids["a"], ins_cap), _collate(buf["b"], ids["b"], ins_cap)


# ---- local path: Parquet files, no Ray ---------------------------------------------------------------------

def part_files(root: str | Path, split: str, domain: str) -> list[Path]:
    files = sorted((Path(root) / split / domain).glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no part-*.parquet in {Path(root) / split / domain} (write one with data_prep)")
    return files


class LocalDataset(torch.utils.data.Dataset):
    """One split and domain of a data_prep folder as a torch Dataset: item i -> augment(read_sample(row i)).

    Augmentation is seeded by (seed, epoch, domain, id): call set_epoch(e) to draw new crops each epoch.
    """

    def __init__(self, root: str | Path, split: str, domain: str, size: int = 200, load_size: int = 220,
                 flip: bool = True, seed: int = 0, train: bool = True):
        self.table = pq.read_table([str(f) for f in part_files(root, split, domain)], columns=COLUMNS,
                                   memory_map=True)
        self.ids = [str(i) for i in self.table.column("id").to_pylist()]
        self.domain, self.size, self.load_size, self.flip = domain, size, load_size, flip
        self.seed, self.train, self.epoch = seed, train, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.table.num_rows

    def row(self, i: int) -> dict:
        return {k: self.table.column(k)[i].as_py() for k in COLUMNS}

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img, masks = read_sample(self.row(i))
        g = sample_generator(self.seed, self.epoch, self.domain, self.ids[i])
        return augment(img, masks, self.size, self.load_size, self.flip, g, self.train)


def local_batches(root: str | Path, split: str, batch_size: int, size: int, load_size: int, flip: bool, seed: int,
                  epoch: int = 0, ins_cap: int | None = None, shuffle: bool = True,
                  train: bool = True) -> Iterator[tuple[dict, dict]]:
    """One epoch of unpaired (batch_a, batch_b) from local Parquet files, the same batches as iter_pairs gives a
    single worker up to row order. The epoch covers the longer domain; the shorter one is cycled."""
    tables = {d: LocalDataset(root, split, d, size, load_size, flip, seed, train) for d in DOMAINS}
    rng = random.Random(f"{seed}/{epoch}/local")
    orders = {d: list(range(len(t))) for d, t in tables.items()}
    if shuffle:
        for order in orders.values():
            rng.shuffle(order)
    pairs = pair_rows(map(tables["a"].row, orders["a"]), map(tables["b"].row, orders["b"]), rng)
    yield from batch_pairs(pairs, batch_size, size, load_size, flip, seed, epoch, ins_cap, train)


# ---- Ray Data path -------------------------------------------------------------------------------------------

def ray_datasets(root: str, split: str) -> dict[str, Any]:
    """{"a": ray.data.Dataset, "b": ...} over <root>/<split>/<a|b>; pass as TorchTrainer(datasets=...).

    Rows stay encoded (~0.1 MB at 200x200): decoding happens on the worker in iter_pairs, which measured faster
    than a map_batches decode stage here (see data_prep/bench_ingest.py) and keeps augmentation seeds exact.
    """
    import ray.data

    out = {}
    for d in DOMAINS:
        path = f"{str(root).rstrip('/')}/{split}/{d}"
        if "://" not in path:
            part_files(root, split, d)  # a clear error now rather than a Ray traceback in every worker later
        out[d] = ray.data.read_parquet(path).select_columns(COLUMNS)
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
               epoch: int, ins_cap: int | None = None, *, rank: int | None = None,
               train: bool = True) -> Iterator[tuple[dict, dict]]:
    """One epoch of unpaired (batch_a, batch_b) on a Ray Train worker from get_dataset_shard("a") / ("b").

    Each shard is iterated exactly once per call (see pair_rows): Ray's split gives every rank the same row count,
    so every rank yields the same number of batches and meets the same barriers. rank defaults to the Ray Train
    world rank (0 outside a worker).
    """
    rank = _world_rank() if rank is None else rank
    base = int.from_bytes(hashlib.sha256(f"{seed}/{epoch}/{rank}".encode()).digest()[:4], "little")
    rows_a, rows_b = _shard_rows(shard_a, base), _shard_rows(shard_b, base + 1)
    pairs = pair_rows(rows_a, rows_b, random.Random(base))
    yield from batch_pairs(pairs, batch_size, size, load_size, flip, seed, epoch, ins_cap, train)
