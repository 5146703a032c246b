"""Translate an image collection offline with a trained checkpoint: Ray Data, an actor pool of Translators.

    python jobs/translate.py --checkpoint CKPT --input /tmp/shp2gir --split sample --out /tmp/sheep2giraffe
    python jobs/translate.py --checkpoint CKPT --input ../shared/data/shp2gir_coco_sample --direction b2a \\
        --out /tmp/giraffe2sheep --png /tmp/giraffe2sheep_png
    python jobs/translate.py --checkpoint CKPT --input trainval.json --images images --a date --b fig --out /tmp/t
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/translate.py --checkpoint \\
        /shared/ckpt --input /shared/coco_parquet --split test --out s3://bucket/translated --device cuda --actors 8

Input (--kind, detected when left out): `parquet`, a data set written by data_prep (<input>/<split>/<domain>/, the
domain being the direction's source: a for a2b) or any Parquet file or folder with data_prep's columns; `folder`,
the InstaGAN layout (<phase>A/<id>.png + <phase>A_seg/<id>_<k>.png; --split picks the phase); `coco`, an
instances json with --images, --a and --b (data_prep coco's flags). Folder and COCO inputs are converted on the fly
by data_prep's own readers (data_prep.folder / data_prep.coco plan() and convert()) in Ray tasks.

Sizes (--size): `model` (the default) resizes every image to the checkpoint's training size (data.size, the scale
the generator learned), translates it and resizes the image and masks back to the input's own size; `native`
translates at the input's own size, reflection-padded up to a multiple of 4 and cropped back (images already a
multiple of 4 are translated exactly at their size; time grows with the pixel count).

Output, under --out: part-<run>-<task>-<uid>.parquet files, one row per translated image: id, image (PNG bytes),
format, height, width, masks (COCO compressed RLE, one per instance, data_prep's encoding, so the output feeds
training and evaluation again), areas, translated (list<bool>: mask k is the translation of input mask k; false
past --ins-max, where the input mask is kept), direction, checkpoint, source, time_s (the image's share of its
batch's Translator time). skipped-<run>.jsonl lists every input that was not translated (id, source, reason,
detail, kind: unreadable image, undecodable or mis-sized masks, no usable instance...) and instances data_prep's
readers dropped; run-<run>.json summarises the run. --png DIR also writes <id>.png: input | input + masks |
translated | translated + masks. On a multi-node cluster the input and checkpoint must be on shared storage and
--out on shared storage or a URI (s3://, gs://...); --png folders are written on the actors' nodes.

Exit codes: 0 when the output holds the translation of at least one input (bad inputs are reported, not fatal);
1 when no input could be translated; 2 when the inputs themselves are unusable (no such file, unknown kind...).

Resuming: ids already present in --out's part files (their id column only is read) are not translated again; each
run writes new part files (nothing is overwritten), each file written whole, so a crash loses at most the blocks
in flight. Skipped inputs are retried (and reported again) on the next run.

Ray: --address (or RAY_ADDRESS) joins a cluster, else a local Ray starts. --actors Translator actors of
--cpus-per-actor CPUs each (--device cuda: one GPU each); Ray Data shows its progress bar (--no-progress hides it).
Reusable pieces (jobs/serve_client.py): resolve_input(), iter_input_rows() (no Ray), read_input() (a Ray Dataset),
translate_rows(), done_ids().
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import pickle
import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python jobs/translate.py` puts jobs/, not the repo root, on sys.path
    sys.path.insert(0, str(ROOT))

from data_prep import coco, folder  # noqa: E402
from data_prep.rows import Options, UsageError, encode_masks, quarantine_row  # noqa: E402
from data_prep.writer import guarded  # noqa: E402
from instagan.data import decode_masks  # noqa: E402
from instagan.checkpoint import validate as validate_checkpoint  # noqa: E402
from instagan.infer import DIRECTIONS as DIRECTION_NETS  # noqa: E402

ROWS = pa.schema([  # what the translate actors take: data_prep's columns, plus problems found on the way
    ("id", pa.string()), ("image", pa.binary()), ("height", pa.int32()), ("width", pa.int32()),
    ("masks", pa.list_(pa.binary())), ("source", pa.string()),
    ("problems", pa.string()),  # JSON list of quarantine rows; a row without image is not translated
])
OUTPUT = pa.schema([
    ("id", pa.string()), ("image", pa.binary()), ("format", pa.string()), ("height", pa.int32()),
    ("width", pa.int32()), ("masks", pa.list_(pa.binary())), ("areas", pa.list_(pa.int64())),
    ("translated", pa.list_(pa.bool_())), ("direction", pa.string()), ("checkpoint", pa.string()),
    ("source", pa.string()), ("time_s", pa.float64()),
])
ACTOR_OUT = OUTPUT.append(pa.field("problems", pa.string()))
SOURCE_DOMAIN = {"a2b": "a", "b2a": "b"}
PART = re.compile(r"^part-.+\.parquet$")


# ---- input ----------------------------------------------------------------------------------------------------

@dataclass
class Source:
    """One collection to translate, listed but not decoded."""
    kind: str  # parquet | folder | coco
    domain: str  # the translated domain (a or b)
    files: list[str] = field(default_factory=list)  # parquet: the part files
    tasks: list[tuple] = field(default_factory=list)  # folder/coco: data_prep conversion tasks, one per image
    problems: list[dict] = field(default_factory=list)  # inputs rejected while listing (duplicates, orphans...)

    def ids(self) -> list[str]:
        if self.kind != "parquet":
            return [str(t[0]) for t in self.tasks]
        return [i for f in self.files for i in pq.read_table(f, columns=["id"])["id"].to_pylist()]


def detect_kind(path: Path) -> str:
    if path.suffix.lower() == ".json":
        return "coco"
    if path.suffix == ".parquet" or (path / "metadata.json").exists() or any(path.rglob("*.parquet")):
        return "parquet"
    if path.is_dir() and any(p.is_dir() and folder.PAIR.match(p.name) for p in path.iterdir()):
        return "folder"
    raise UsageError(f"cannot tell the kind of input {path}: pass --kind parquet|folder|coco")


def resolve_input(path: str | Path, kind: str = "auto", direction: str = "a2b", split: str | None = None,
                  images: str | Path | None = None, a: str | None = None, b: str | None = None,
                  threshold: int = 128, min_area: int = 1) -> Source:
    """List the images of `direction`'s source domain. Raises UsageError when the input itself is unusable."""
    if direction not in SOURCE_DOMAIN:
        raise UsageError(f"--direction must be a2b or b2a, got {direction!r}")
    path, domain = Path(path), SOURCE_DOMAIN[direction]
    if not path.exists():
        raise UsageError(f"input {path} not found")
    kind = detect_kind(path) if kind == "auto" else kind
    if kind == "parquet":
        return Source("parquet", domain, files=_parquet_files(path, split, domain))
    if kind == "folder":
        args = argparse.Namespace(root=path, phases=split, a_name="A", b_name="B", threshold=threshold,
                                  min_area=min_area)
        tasks, _, problems = folder.plan(args)
        tasks = [t for t in tasks if t[4] == domain]
        phases = sorted({t[3] for t in tasks})
        if len(phases) > 1:
            raise UsageError(f"{path} holds several phases ({', '.join(phases)}): pick one with --split")
        dirs = {f"{p}{domain.upper()}" for p in phases} | {f"{p}{domain.upper()}_seg" for p in phases}
        return Source("folder", domain, tasks=tasks,
                      problems=[q for q in problems if Path(q["source"]).parent.name in dirs])
    if kind == "coco":
        if images is None or not a or not b:
            raise UsageError("COCO input needs --images, --a and --b (the categories of domains a and b)")
        args = argparse.Namespace(annotations=path, images=Path(images), a=a, b=b, exclusive=False,
                                  include_crowd=False, min_area=min_area, test_fraction=0.0, seed=0, split="all")
        tasks, _, problems = coco.plan(args)
        tasks = [(*t[:5], {domain: t[5][domain]}, *t[6:]) for t in tasks if domain in t[5]]
        ids = {str(t[0]) for t in tasks}
        return Source("coco", domain, tasks=tasks,
                      problems=[q for q in problems if q["id"] in ids or q["kind"] == "image"])
    raise UsageError(f"--kind must be parquet, folder or coco, got {kind!r}")


def _parquet_files(path: Path, split: str | None, domain: str) -> list[str]:
    if path.is_file():
        return [str(path)]
    if (path / "metadata.json").exists() or any(path.glob(f"*/{domain}/*.parquet")):  # a data_prep data set
        splits = sorted(p.parent.name for p in path.glob(f"*/{domain}"))
        if split is None and len(splits) == 1:
            split = splits[0]
        if split is None or split not in splits:
            raise UsageError(f"{path} is a data set with splits {', '.join(splits) or 'none'} for domain "
                             f"{domain}: pick one with --split")
        path = path / split / domain
    files = sorted(str(p) for p in path.rglob("*.parquet"))
    if not files:
        raise UsageError(f"no .parquet file under {path}")
    missing = {"id", "image", "height", "width", "masks"} - set(pq.read_schema(files[0]).names)
    if missing:
        raise UsageError(f"{files[0]} lacks the column(s) {', '.join(sorted(missing))} (data_prep's schema)")
    return files


def convert_tasks(batch: pa.Table, kind: str) -> pa.Table:
    """Ray Data map function: pickled data_prep tasks -> rows in ROWS (failed images with image null)."""
    fn = {"folder": folder.convert, "coco": coco.convert}[kind]
    return pa.Table.from_pylist([r for t in batch["task"].to_pylist() for r in _convert(pickle.loads(t), fn)],
                                schema=ROWS)


def _convert(task: tuple, fn) -> list[dict]:
    res = guarded(task, fn, Options(min_area=1))
    problems = res.quarantine
    if not res.rows:
        return [{"id": str(task[0]), "image": None, "height": 0, "width": 0, "masks": [], "source": str(task[1]),
                 "problems": json.dumps(problems)}]
    return [{**{k: row[k] for k in ("id", "image", "height", "width", "masks", "source")},
             "problems": json.dumps(problems) if problems else ""} for _, _, row in res.rows]


def iter_input_rows(source: Source, skip_ids: Iterable[str] = ()) -> Iterator[dict]:
    """The source's rows (ROWS' columns) in the calling process, no Ray; ids in skip_ids are left out."""
    skip = set(skip_ids)
    for q in source.problems:
        yield {"id": q["id"], "image": None, "height": 0, "width": 0, "masks": [], "source": q["source"],
               "problems": json.dumps([q])}
    if source.kind != "parquet":
        fn = {"folder": folder.convert, "coco": coco.convert}[source.kind]
        for task in source.tasks:
            if str(task[0]) not in skip:
                yield from _convert(task, fn)
        return
    for f in source.files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=64, columns=_parquet_columns(f)):
            for row in batch.to_pylist():
                if row["id"] not in skip:
                    yield {**row, "source": row.get("source") or f, "problems": ""}


def _parquet_columns(file: str) -> list[str]:
    names = pq.read_schema(file).names
    return ["id", "image", "height", "width", "masks"] + (["source"] if "source" in names else [])


def read_input(source: Source, skip_ids: Iterable[str] = ()):
    """The source's rows as a Ray Dataset (ROWS' columns; Ray must be initialised). Folder and COCO images are
    decoded by data_prep's readers in Ray tasks; Parquet rows whose id is in skip_ids are dropped by the
    translate actors (TranslateActor's skip_ids), folder/COCO tasks here."""
    import ray

    skip = set(skip_ids)
    if source.kind == "parquet":
        return ray.data.read_parquet(source.files).select_columns(_parquet_columns(source.files[0]))
    tasks = [{"task": pickle.dumps(t)} for t in source.tasks if str(t[0]) not in skip]
    if not tasks:
        return ray.data.from_arrow(ROWS.empty_table())
    return ray.data.from_items(tasks).map_batches(convert_tasks, fn_kwargs={"kind": source.kind},
                                                  batch_format="pyarrow", batch_size=8)


# ---- translation ----------------------------------------------------------------------------------------------

class BadRow(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def decode_row(row: dict) -> tuple[np.ndarray, np.ndarray]:
    """A ROWS row -> (uint8 (H, W, 3), bool (K, H, W)); raises BadRow(unreadable_image | bad_masks)."""
    try:
        with Image.open(io.BytesIO(row["image"])) as im:
            img = np.array(im.convert("RGB"))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on corrupt bytes
        raise BadRow("unreadable_image", f"{type(e).__name__}: {e}") from None
    try:
        masks = decode_masks(row["masks"] or [], row["height"], row["width"])
    except Exception as e:
        raise BadRow("bad_masks", f"{type(e).__name__}: {e}") from None
    return img, masks


def translate_rows(tr, rows: list[dict], size: int | None, batch_size: int, direction: str, checkpoint: str,
                   png_dir: str | None = None) -> list[dict]:
    """Translate ROWS rows with an instagan.infer.Translator -> rows in ACTOR_OUT, failed ones with image None and
    their reasons in `problems`. One bad row never stops the others."""
    out, items, good = [], [], []
    for row in rows:
        problems = json.loads(row.get("problems") or "[]")
        if row["image"] is None:
            out.append(_failed(row, problems))
            continue
        try:
            img, masks = decode_row(row)
            try:
                tr.check_item(img, masks)
            except ValueError as e:
                raise BadRow("size_mismatch" if "but the image is" in str(e) else "bad_item", str(e)) from None
        except BadRow as e:
            problems.append(quarantine_row(row["id"], row.get("source") or "", e.reason, e.detail))
            out.append(_failed(row, problems))
            continue
        items.append((img, masks))
        good.append((row, problems))
    t0 = time.perf_counter()
    try:
        results = tr.translate_arrays(items, size=size, batch_size=batch_size) if items else []
    except Exception:  # find the item that broke the batch; the others still translate
        results = []
        for item in items:
            try:
                results.extend(tr.translate_arrays([item], size=size, batch_size=1))
            except Exception as e:
                results.append(e)
    share = (time.perf_counter() - t0) / max(1, len(items))
    for (row, problems), item, res in zip(good, items, results):
        if isinstance(res, Exception):
            problems.append(quarantine_row(row["id"], row.get("source") or "", "translate_error",
                                           f"{type(res).__name__}: {res}"))
            out.append(_failed(row, problems))
            continue
        buf = io.BytesIO()
        Image.fromarray(res.img).save(buf, "PNG", compress_level=1)
        masks = list(res.masks)
        out.append({"id": row["id"], "image": buf.getvalue(), "format": "PNG", "height": res.img.shape[0],
                    "width": res.img.shape[1], "masks": encode_masks(masks), "areas": [int(m.sum()) for m in masks],
                    "translated": [bool(t) for t in res.translated], "direction": direction,
                    "checkpoint": checkpoint, "source": row.get("source") or "", "time_s": share,
                    "problems": json.dumps(problems) if problems else ""})
        if png_dir:
            write_overlay(Path(png_dir), row["id"], item, res)
    return out


def _failed(row: dict, problems: list[dict]) -> dict:
    return {"id": row["id"], "image": None, "format": None, "height": 0, "width": 0, "masks": [], "areas": [],
            "translated": [], "direction": None, "checkpoint": None, "source": row.get("source") or "",
            "time_s": None, "problems": json.dumps(problems)}


def write_overlay(png_dir: Path, id: str, item: tuple[np.ndarray, np.ndarray], res) -> Path:
    """<png_dir>/<id>.png: input | input + masks | translated | translated + masks (instance k: colour k)."""
    import torch

    from instagan.visual import overlay, save_png

    def cells(img: np.ndarray, masks: np.ndarray, valid: np.ndarray) -> list:
        x = torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1
        m = torch.from_numpy(masks).float() * 2 - 1 if len(masks) else torch.zeros(0, *img.shape[:2])
        return [(x + 1) / 2, overlay(x, m, torch.from_numpy(valid))]

    img, masks = item
    row = cells(img, masks, np.ones(len(masks), bool)) + cells(res.img, res.masks, np.ones(len(res.masks), bool))
    return save_png(torch.cat(row, dim=2), png_dir / f"{re.sub(r'[^A-Za-z0-9._-]', '_', str(id))}.png")


class TranslateActor:
    """Ray Data actor: loads the generator once, then translates batches (pyarrow tables in ROWS -> ACTOR_OUT)."""

    def __init__(self, checkpoint: str, direction: str = "a2b", ins_max: int = 20, ins_per: int = 2,
                 device: str = "cpu", size: int | None = None, batch_size: int = 8, threads: int = 0,
                 amp: str = "none", png_dir: str | None = None, skip_ids=None):
        import ray
        import torch

        from instagan.infer import Translator

        if threads:
            torch.set_num_threads(threads)
        amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.tr = Translator.from_checkpoint(checkpoint, direction=direction, ins_max=ins_max, ins_per=ins_per,
                                             device=device, amp_dtype=amp_dtype)
        self.kw = dict(size=size, batch_size=batch_size, direction=direction, checkpoint=checkpoint,
                       png_dir=png_dir)
        # an ObjectRef: Ray Data pickles constructor arguments into the actor's init closure unresolved
        self.skip = ray.get(skip_ids) if isinstance(skip_ids, ray.ObjectRef) else set(skip_ids or ())

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [r for r in batch.to_pylist() if r["id"] not in self.skip]
        return pa.Table.from_pylist(translate_rows(self.tr, rows, **self.kw), schema=ACTOR_OUT)


# ---- output ---------------------------------------------------------------------------------------------------

def _filesystem(out: str) -> tuple[pafs.FileSystem, str]:
    if "://" in out:
        return pafs.FileSystem.from_uri(out)
    return pafs.LocalFileSystem(), str(Path(out).expanduser().resolve())


def done_ids(out: str) -> set[str]:
    """Ids already in --out's part files (only their id column is read)."""
    fs, base = _filesystem(out)
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        return set()
    files = [f.path for f in fs.get_file_info(pafs.FileSelector(base)) if PART.match(f.base_name)]
    return {i for f in files for i in pq.read_table(f, columns=["id"], filesystem=fs)["id"].to_pylist()}


def make_sink(out: str, run: str, rows_per_file: int):
    """A Ray Data Datasink: translated rows to new part files of at most `rows_per_file` rows under `out`, problems
    back to the driver. Ray Data hands each write task whole output blocks (all the batches an actor made from one
    input block), so a part file is written once its block is done."""
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class PartFiles(Datasink):
        def __init__(self):
            self.returns: list[dict] = []

        @property
        def min_rows_per_write(self) -> int:
            return rows_per_file

        def write(self, blocks, ctx) -> dict:
            tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
            table = pa.concat_tables([t.cast(ACTOR_OUT) for t in tables if t.num_rows]) if tables else None
            if table is None or table.num_rows == 0:
                return {"files": [], "rows": 0, "problems": []}
            problems = [q for p in table["problems"].to_pylist() if p for q in json.loads(p)]
            good = table.filter(pc.is_valid(table["image"])).select(OUTPUT.names)
            fs, base = _filesystem(out)
            local = isinstance(fs, pafs.LocalFileSystem)
            names = []
            for start in range(0, good.num_rows, rows_per_file):
                if not names:
                    fs.create_dir(base, recursive=True)
                names.append(f"part-{run}-{ctx.task_idx:05d}-{uuid.uuid4().hex[:8]}.parquet")
                tmp = f"{base}/.{names[-1]}.tmp" if local else f"{base}/{names[-1]}"  # object stores commit on close
                pq.write_table(good.slice(start, rows_per_file), tmp, filesystem=fs, compression="none",
                               row_group_size=64)
                if local:
                    fs.move(tmp, f"{base}/{names[-1]}")  # a crash never leaves a torn part file
            return {"files": names, "rows": good.num_rows, "problems": problems}

        def on_write_complete(self, write_result) -> None:
            self.returns = list(write_result.write_returns)

    return PartFiles()


def _write_text(out: str, name: str, text: str) -> None:
    fs, base = _filesystem(out)
    fs.create_dir(base, recursive=True)
    with fs.open_output_stream(f"{base}/{name}") as f:
        f.write(text.encode())


# ---- the job --------------------------------------------------------------------------------------------------

def translate_collection(source: Source, checkpoint: str, out: str, direction: str = "a2b", size: str = "model",
                         ins_max: int = 20, ins_per: int = 2, device: str = "cpu", actors: int = 1,
                         cpus_per_actor: float = 1.0, threads: int = 0, batch_size: int = 8,
                         rows_per_file: int = 128, amp: str = "none", png: str | None = None) -> dict:
    """Translate `source` into `out` with Ray Data (Ray must be initialised); returns the run summary."""
    import ray

    t0 = time.perf_counter()
    run = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    checkpoint = str(Path(checkpoint).resolve()) if "://" not in checkpoint else checkpoint
    done = done_ids(out)
    ids = source.ids()
    todo = [i for i in ids if i not in done]
    summary = {"run": run, "kind": source.kind, "domain": source.domain, "direction": direction, "out": out,
               "checkpoint": checkpoint, "size": size, "inputs": len(ids), "already_done": len(ids) - len(todo)}
    problems = list(source.problems)
    returns = []
    if todo:
        gpu = device.startswith("cuda")
        kwargs = dict(checkpoint=checkpoint, direction=direction, ins_max=ins_max, ins_per=ins_per, device=device,
                      size=None if size == "model" else 0, batch_size=batch_size,
                      threads=threads or max(1, int(cpus_per_actor)), amp=amp, png_dir=png,
                      skip_ids=ray.put(done) if source.kind == "parquet" and done else None)
        sink = make_sink(out, run, rows_per_file)
        ds = read_input(source, skip_ids=done).map_batches(
            TranslateActor, fn_constructor_kwargs=kwargs, compute=ray.data.ActorPoolStrategy(size=actors),
            batch_size=batch_size, batch_format="pyarrow", num_cpus=cpus_per_actor, num_gpus=1 if gpu else 0)
        ds.write_datasink(sink)
        returns = sink.returns
        problems += [q for r in returns for q in r["problems"]]
    written = sum(r["rows"] for r in returns)
    seconds = time.perf_counter() - t0
    skipped = sorted({q["id"] for q in problems if q.get("kind", "image") != "instance"} - done)
    summary.update(written=written, skipped=len(skipped), problems=len(problems),
                   files=sorted(f for r in returns for f in r["files"]), seconds=round(seconds, 3),
                   images_per_s=round(written / seconds, 3) if seconds > 0 else None)
    if problems:
        _write_text(out, f"skipped-{run}.jsonl", "".join(json.dumps(q) + "\n" for q in problems))
    _write_text(out, f"run-{run}.json", json.dumps(summary, indent=2) + "\n")
    return summary


def add_input_arguments(p: argparse.ArgumentParser, direction_default: str | None, direction_help: str) -> None:
    """The flags that pick the input rows (resolve_input's arguments); shared with jobs/serve_client.py."""
    p.add_argument("--kind", choices=("auto", "parquet", "folder", "coco"), default="auto")
    p.add_argument("--direction", choices=("a2b", "b2a"), default=direction_default, help=direction_help)
    p.add_argument("--split", help="split of a data_prep set, or phase of an InstaGAN folder (needed if several)")
    p.add_argument("--images", help="COCO: the image folder")
    p.add_argument("--a", help="COCO: category name(s) of domain a")
    p.add_argument("--b", help="COCO: category name(s) of domain b")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python jobs/translate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (state.pt + config.json)")
    p.add_argument("--input", required=True, help="Parquet data set/file/folder, InstaGAN folder or COCO json")
    p.add_argument("--out", required=True, help="output folder or URI (part files, skipped and run reports)")
    add_input_arguments(p, direction_default="a2b", direction_help="a2b translates domain a")
    p.add_argument("--threshold", type=int, default=128, help="folder: mask pixels >= this are instance pixels")
    p.add_argument("--size", choices=("model", "native"), default="model",
                   help="model: resize to the training size and back (default); native: the input's own size")
    p.add_argument("--ins-max", type=int, default=20, help="largest instances translated per image (paper test: 20)")
    p.add_argument("--ins-per", type=int, default=2, help="instances per sequential chunk (paper: 2)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per actor)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype of the generator")
    p.add_argument("--actors", type=int, default=1, help="Translator actors")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="Ray CPUs reserved by each actor")
    p.add_argument("--threads", type=int, default=0, help="torch threads per actor (default: its whole CPUs)")
    p.add_argument("--batch-size", type=int, default=8, help="images per actor call and per generator batch")
    p.add_argument("--rows-per-file", type=int, default=128, help="most rows per output part file")
    p.add_argument("--png", help="also write <id>.png overlays (input and translation with masks) to this folder")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else start a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="hide Ray Data's progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if min(args.ins_max, args.ins_per, args.actors, args.batch_size, args.rows_per_file) < 1:
            raise UsageError("--ins-max, --ins-per, --actors, --batch-size and --rows-per-file must be >= 1")
        if "://" not in args.out and Path(args.out).exists() and not Path(args.out).is_dir():
            raise UsageError(f"--out {args.out} is a file, not a folder: translations are written as a folder of "
                             f"Parquet files (and PNGs with --png)")
        if "://" not in args.checkpoint:  # before Ray starts: readable, and the weights fit its config.json
            try:
                validate_checkpoint(args.checkpoint, (DIRECTION_NETS[args.direction],))
            except (OSError, ValueError) as err:
                raise UsageError(str(err)) from None
        source = resolve_input(args.input, args.kind, args.direction, args.split, args.images, args.a, args.b,
                               args.threshold)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import ray

    if not ray.is_initialized():
        address = args.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:  # the actors plus Ray Data's read and write tasks need more logical CPUs than a 2-core machine has;
            # no dashboard on a local instance: its processes took about 10% of a 2-core machine from the actors
            ray.init(num_cpus=max(4, os.cpu_count() or 1, math.ceil(args.actors * args.cpus_per_actor) + 2),
                     include_dashboard=False)
    if args.no_progress:
        ray.data.DataContext.get_current().enable_progress_bars = False
    summary = translate_collection(
        source, args.checkpoint, args.out, direction=args.direction, size=args.size, ins_max=args.ins_max,
        ins_per=args.ins_per, device=args.device, actors=args.actors, cpus_per_actor=args.cpus_per_actor,
        threads=args.threads, batch_size=args.batch_size, rows_per_file=args.rows_per_file, amp=args.amp,
        png=args.png)
    print(json.dumps(summary))
    if summary["skipped"]:
        print(f"[translate] {summary['skipped']} input(s) skipped, reasons in "
              f"{args.out}/skipped-{summary['run']}.jsonl", file=sys.stderr)
    return 1 if summary["inputs"] and not summary["written"] + summary["already_done"] else 0


if __name__ == "__main__":
    sys.exit(main())
