"""Ingest: Parquet rows written by data_prep -> augmented, padded (image, masks, valid) batches.

Plain PyTorch on a laptop or in tests (no Ray):
    ds = LocalDataset("/tmp/synth200", "train", "a", size=200, load_size=220, flip=True, seed=0)
    img, masks = ds[0]                                   # (3, 200, 200) in [-1, 1], (K, 200, 200) in {-1, 1}
    for batch_a, batch_b in local_batches("/tmp/synth200", "train", batch_size=4, size=200, load_size=220,
                                          flip=True, seed=0, epoch=0): ...
Ray Train: instagan.distributed.data (ray_datasets, iter_pairs) feeds the same rows through the same pairing,
augmentation and batching (pair_rows, batch_pairs) from Ray Data shards.
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
import queue
import random
import threading
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
from torchvision.transforms.v2 import functional as F

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

class RandomCropFlip(v2.Transform):
    """v2.RandomCrop(size) then v2.RandomHorizontalFlip(0.5), drawing from a torch.Generator instead of torch's global
    one (reproducible, and safe in a prefetch thread while the training loop uses the global RNG). Like every v2
    transform, one call on (Image, Mask) draws once and applies the same crop and flip to both."""

    def __init__(self, size: int, flip: bool, generator: torch.Generator | None = None):
        super().__init__()
        self.size, self.flip, self.generator = size, flip, generator

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = flat_inputs[0].shape[-2:]
        if h < self.size or w < self.size:
            raise ValueError(f"crop {self.size} larger than the resized image {h}x{w}")
        g = self.generator
        top = int(torch.randint(0, h - self.size + 1, (1,), generator=g))
        left = int(torch.randint(0, w - self.size + 1, (1,), generator=g))
        flip = bool(torch.rand((), generator=g) < 0.5) if self.flip else False
        return {"top": top, "left": left, "flip": flip}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        out = F.crop(inpt, params["top"], params["left"], self.size, self.size)
        return F.horizontal_flip(out) if params["flip"] else out


@functools.lru_cache(maxsize=16)
def _resize(size: int) -> v2.Transform:
    return v2.Resize((size, size), antialias=True)  # bilinear for images, nearest for tv_tensors.Mask


def augment(img: np.ndarray | Tensor, masks: np.ndarray | Tensor, size: int, load_size: int, flip: bool,
            generator: torch.Generator | None = None, train: bool = True) -> tuple[Tensor, Tensor]:
    """uint8 (H, W, 3), bool (K, H, W) -> image (3, size, size) in [-1, 1], masks (K', size, size) in {-1, 1}.

    train: resize to load_size x load_size, then the same random crop and flip for image and masks. not train:
    resize to size x size only. Instances left empty (outside the crop, or too thin) are dropped: K' <= K, maybe 0.
    generator: the crop and flip draws come from it (reproducible); None draws from torch's global generator.
    """
    img = torch.as_tensor(np.ascontiguousarray(img)) if isinstance(img, np.ndarray) else img
    masks = torch.as_tensor(np.ascontiguousarray(masks)) if isinstance(masks, np.ndarray) else masks
    x = tv_tensors.Image(img.permute(2, 0, 1) if img.ndim == 3 and img.shape[-1] == 3 else img)
    m = tv_tensors.Mask(masks.to(torch.uint8))
    if train:
        x, m = v2.Compose([_resize(load_size), RandomCropFlip(size, flip, generator)])(x, m)
    else:
        x, m = _resize(size)(x, m)
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


def prefetch(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Produce `items` in a background thread, `depth` ahead, so decoding overlaps the training step (PIL decoding
    and torch ops release the GIL). Order and values are unchanged; errors re-raise here; depth 0 = inline."""
    if depth <= 0:
        yield from items
        return
    q: queue.Queue = queue.Queue(depth)
    stop, end = threading.Event(), object()

    def put(x: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            for x in items:
                if not put(x):
                    return
            put(end)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(_Failure(e))

    threading.Thread(target=work, name="instagan-data-prefetch", daemon=True).start()
    try:
        while (x := q.get()) is not end:
            if isinstance(x, _Failure):
                raise x.error
            yield x
    finally:
        stop.set()  # the consumer left early: let the thread finish


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


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
                  epoch: int = 0, ins_cap: int | None = None, shuffle: bool = True, train: bool = True,
                  prefetch_batches: int = 2) -> Iterator[tuple[dict, dict]]:
    """One epoch of unpaired (batch_a, batch_b) from local Parquet files, the same batches as iter_pairs gives a
    single worker up to row order. The epoch covers the longer domain; the shorter one is cycled."""
    tables = {d: LocalDataset(root, split, d, size, load_size, flip, seed, train) for d in DOMAINS}
    rng = random.Random(f"{seed}/{epoch}/local")
    orders = {d: list(range(len(t))) for d, t in tables.items()}
    if shuffle:
        for order in orders.values():
            rng.shuffle(order)
    pairs = pair_rows(map(tables["a"].row, orders["a"]), map(tables["b"].row, orders["b"]), rng)
    yield from prefetch(batch_pairs(pairs, batch_size, size, load_size, flip, seed, epoch, ins_cap, train),
                        prefetch_batches)


def validation_batches(root: str, split: str, images: int, size: int, ins_max: int) -> tuple[dict, dict]:
    """A fixed validation set: the first `images` rows per domain of root's `split` (files in name order; a local
    folder or a URI), resized to size x size without crop or flip, each image's `ins_max` largest instances.
    -> (batch_a, batch_b) on the CPU."""
    import pyarrow.dataset
    import pyarrow.fs

    out = []
    for d in DOMAINS:
        where = f"{root.rstrip('/')}/{split}/{d}"
        fs, base = (pyarrow.fs.FileSystem.from_uri(where) if "://" in where
                    else (pyarrow.fs.LocalFileSystem(), str(Path(where).resolve())))
        infos = fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
        files = sorted(i.path for i in infos if i.base_name.startswith("part-") and i.base_name.endswith(".parquet"))
        if not files:
            raise FileNotFoundError(f"validation needs a {split!r} split: no part-*.parquet in {where} (set "
                                    f"run.val_split, or write a {split!r} split with data_prep)")
        rows = pyarrow.dataset.dataset(files, filesystem=fs, format="parquet").head(images, columns=COLUMNS)
        batch = M.collate([augment(*read_sample(row), size, size, False, train=False) for row in rows.to_pylist()])
        batch["masks"], batch["valid"] = M.limit(batch["masks"], batch["valid"], ins_max)  # largest first
        out.append(batch)
    return out[0], out[1]
