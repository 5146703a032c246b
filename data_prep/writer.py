"""Shared back end of data_prep: parallel conversion with a tqdm progress bar, size-bounded Parquet shards,
the quarantine report and metadata.json.

Output layout:
    <out>/<split>/<a|b>/part-00000.parquet ...   rows in `data_prep.rows.SCHEMA`, each file at most ~--shard-mb
    <out>/metadata.json                          schema version, counts, instance histogram, categories, command
    <out>/quarantine.jsonl                       one JSON line per skipped input: id, source, reason, detail, kind
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import multiprocessing
import os
import platform
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data_prep.rows import MASK_ENCODING, SCHEMA, SCHEMA_VERSION, Options, Result

ROW_GROUP = 64  # rows per Parquet row group: bounds reader memory without hurting Ray Data's file-level reads


def guarded(task: tuple, fn: Callable[..., Result], opts: Options) -> Result:
    """fn(task, opts), with an unexpected error turned into a quarantine row: one odd file must not end the run."""
    try:
        return fn(task, opts=opts)
    except Exception as e:
        res = Result()
        res.bad(str(task[0]), str(task[1]) if len(task) > 1 else "", "conversion_error", f"{type(e).__name__}: {e}")
        return res


def parallel_map(fn: Callable[[Any], Result], tasks: list, workers: int) -> Iterator[Result]:
    """fn over tasks in task order, in `workers` processes (inline when 1 or few tasks, which is faster)."""
    if workers <= 1 or len(tasks) < 4:
        yield from map(fn, tasks)
        return
    # fork: children inherit the imported modules (no re-import of torch, PIL, pycocotools: ~2 s per child); but
    # forking a process that runs threads (Ray, a test session) can deadlock a child, so use forkserver then
    methods = multiprocessing.get_all_start_methods()
    method = "fork" if "fork" in methods and threading.active_count() == 1 else None
    ctx = multiprocessing.get_context(method or ("forkserver" if "forkserver" in methods else "spawn"))
    chunk = max(1, min(16, len(tasks) // (workers * 8)))
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        yield from pool.map(fn, tasks, chunksize=chunk)


class ShardWriter:
    """Buffers rows per (split, domain) and writes a part file whenever a buffer passes `shard_bytes`."""

    def __init__(self, out: Path, shard_bytes: int):
        self.out, self.shard_bytes = Path(out), shard_bytes
        self.buf: dict[tuple[str, str], list[dict]] = defaultdict(list)
        self.size: dict[tuple[str, str], int] = defaultdict(int)
        self.parts: dict[tuple[str, str], int] = defaultdict(int)
        self.files: list[dict] = []

    def add(self, split: str, domain: str, row: dict) -> None:
        key = (split, domain)
        self.buf[key].append(row)
        self.size[key] += len(row["image"]) + sum(len(m) for m in row["masks"]) + 64
        if self.size[key] >= self.shard_bytes:
            self._flush(key)

    def _flush(self, key: tuple[str, str]) -> None:
        rows = self.buf.pop(key, [])
        self.size.pop(key, None)
        if not rows:
            return
        folder = self.out / key[0] / key[1]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"part-{self.parts[key]:05d}.parquet"
        self.parts[key] += 1
        # images are already compressed: Parquet compression would only cost time
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path, row_group_size=ROW_GROUP,
                       compression="none", use_dictionary=["format", "category"])
        self.files.append({"path": str(path.relative_to(self.out)), "rows": len(rows), "bytes": path.stat().st_size})

    def close(self) -> list[dict]:
        for key in list(self.buf):
            self._flush(key)
        return self.files


def clear_outputs(out: Path, overwrite: bool) -> None:
    """Refuse to mix two builds in one folder; with --overwrite remove only files data_prep writes."""
    old = sorted(out.glob("*/*/part-*.parquet")) + [p for p in (out / "metadata.json", out / "quarantine.jsonl")
                                                     if p.exists()]
    if old and not overwrite:
        raise FileExistsError(f"{out} already holds a data set ({old[0].name}, ...); pass --overwrite to replace it")
    for p in old:
        p.unlink()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("instagan-ray", "numpy", "pyarrow", "pillow", "pycocotools", "scipy", "torch"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def convert_all(tasks: list, fn: Callable[..., Result], opts: Options, out: Path, *, workers: int, shard_mb: float,
                info: dict, quarantine: Iterable[dict] = (), progress: bool = True) -> dict:
    """Run fn(task, opts) over every task, write shards, quarantine.jsonl and metadata.json; return the metadata.

    `quarantine` holds rows the source already rejected while listing its inputs (duplicates, orphans...).
    """
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, int(shard_mb * 2**20))
    counts: dict = defaultdict(lambda: {"images": 0, "instances": 0})
    hist: dict = defaultdict(Counter)
    info = dict(info)
    info.pop("_unannotated", None)  # coco: for translation with predicted masks (instagan.inputs), not stored
    counters: Counter = Counter(info.pop("_skipped", {}))  # what the source set aside while listing inputs
    reasons: Counter = Counter()
    sizes: set[tuple[int, int]] = set()
    unique: set[tuple[str, str]] = set()  # (split, id): an image of both domains is two rows, one image
    bar = tqdm(total=len(tasks), desc=f"data_prep {info.get('source', '')}", unit="image", disable=not progress,
               mininterval=0.5 if sys.stderr.isatty() else 5.0)  # in CI logs a line every 5 s keeps the log short
    t0 = time.perf_counter()
    with open(out / "quarantine.jsonl", "w") as qf:
        def note(q: dict) -> None:
            reasons[q["reason"]] += 1
            qf.write(json.dumps(q) + "\n")

        for q in quarantine:
            note(q)
        for res in parallel_map(functools.partial(guarded, fn=fn, opts=opts), tasks, workers):
            for split, domain, row in res.rows:
                writer.add(split, domain, row)
                c = counts[f"{split}/{domain}"]
                c["images"] += 1
                c["instances"] += len(row["masks"])
                hist[f"{split}/{domain}"][len(row["masks"])] += 1
                sizes.add((row["height"], row["width"]))
                unique.add((split, row["id"]))
            for q in res.quarantine:
                note(q)
            counters.update(res.counters)
            bar.update()
    bar.close()
    files = writer.close()
    seconds = time.perf_counter() - t0
    images = sum(c["images"] for c in counts.values())
    meta = {
        "schema_version": SCHEMA_VERSION,
        "mask_encoding": MASK_ENCODING,
        **info,
        "options": {"max_side": opts.max_side, "image_format": opts.image_format, "min_area": opts.min_area},
        "counts": {k: counts[k] for k in sorted(counts)},
        "unique_images": len(unique),
        "image_size": {"min_hw": list(min(sizes)) if sizes else None, "max_hw": list(max(sizes)) if sizes else None,
                       "distinct": len(sizes)},
        "instances_histogram": {k: {str(n): hist[k][n] for n in sorted(hist[k])} for k in sorted(hist)},
        "skipped": dict(sorted(counters.items())),
        "quarantine": dict(sorted(reasons.items())),
        "files": files,
        "build": {"command": info.get("command", ""), "seconds": round(seconds, 3),
                  "images_per_s": round(images / seconds, 2) if seconds > 0 else None,
                  "workers": workers, "cpus": os.cpu_count(), "versions": versions(),
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    (out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
