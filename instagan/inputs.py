"""What a translation takes in: a collection of images with their instance masks, listed without decoding (a
data_prep Parquet set or file, an InstaGAN folder, a COCO json) or of images alone (a plain folder of images, or
a Parquet set without masks: instagan.segment predicts the masks), its rows read in this process, and one row
decoded. jobs/translate.py (through instagan.distributed.translate, which reads the same rows with Ray Data) and
jobs/serve_client.py use it; no Ray here.

    source = resolve_input("/tmp/shp2gir", direction="a2b", split="sample")
    for row in iter_input_rows(source): img, masks = decode_row(row)   # uint8 (H, W, 3), bool (K, H, W)

Rows follow ROWS: data_prep's columns plus `source` and `problems` (a JSON list of data_prep quarantine rows; a
row whose image is null is not translated). Folder and COCO inputs are converted by data_prep's own readers; an
image folder's files are read as they are (PNG, JPEG or WebP; masks empty; ids = paths below the folder without
their suffix). A Parquet input needs the columns id and image; masks, height and width may be left out.
"""

from __future__ import annotations

import argparse
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep import coco, folder
from data_prep.rows import BadInput, Options, UsageError, open_image, quarantine_row, rgb_array
from data_prep.writer import guarded
from instagan.data import decode_masks

ROWS = pa.schema([  # what the translate actors take: data_prep's columns, plus problems found on the way
    ("id", pa.string()), ("image", pa.binary()), ("height", pa.int32()), ("width", pa.int32()),
    ("masks", pa.list_(pa.binary())), ("source", pa.string()),
    ("problems", pa.string()),  # JSON list of quarantine rows; a row without image is not translated
])
SOURCE_DOMAIN = {"a2b": "a", "b2a": "b"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # what an image folder's files may be (data_prep's formats)


@dataclass
class Source:
    """One collection to translate, listed but not decoded."""
    kind: str  # parquet | folder | coco | images
    domain: str  # the translated domain (a or b)
    files: list[str] = field(default_factory=list)  # parquet: the part files
    # folder/coco: data_prep conversion tasks, and (id, path) image tasks of images without masks (resolve_input's
    # unmasked); images: (id, path) image tasks
    tasks: list[tuple] = field(default_factory=list)
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
    if path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")):
        return "images"
    raise UsageError(f"cannot tell the kind of input {path}: pass --kind parquet|folder|coco|images")


def resolve_input(path: str | Path, kind: str = "auto", direction: str = "a2b", split: str | None = None,
                  images: str | Path | None = None, a: str | None = None, b: str | None = None,
                  threshold: int = 128, min_area: int = 1, unmasked: bool = False) -> Source:
    """List the images of `direction`'s source domain. Raises UsageError when the input itself is unusable.

    unmasked (translation with predicted masks): a folder's images without any mask file, and the images of a
    `<phase>A` folder with no `_seg` sibling, and a COCO json's images without any annotation are listed too, as
    (id, path) tasks of rows without masks, instead of being reported as `no_instances` or left out."""
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
        bare = _bare_folders(path, split, domain) if unmasked else {}
        try:
            tasks, _, problems = folder.plan(args)
        except UsageError:
            if not bare:
                raise
            tasks, problems = [], []
        tasks = [t for t in tasks if t[4] == domain]
        phases = {t[3] for t in tasks}
        if unmasked:  # images without masks: (id, path) image tasks, their masks predicted
            lone = [(q["id"], q["source"]) for q in problems if q["reason"] == "no_instances"
                    and Path(q["source"]).parent.name[-1:] == domain.upper()]
            problems = [q for q in problems if q["reason"] != "no_instances"]
            phases |= {Path(p).parent.name[:-1] for _, p in lone} | set(bare)
            tasks += lone + [(stem, str(f)) for files in bare.values() for stem, f in files.items()]
        phases = sorted(phases)
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
        tasks, info, problems = coco.plan(args)
        tasks = [(*t[:5], {domain: t[5][domain]}, *t[6:]) for t in tasks if domain in t[5]]
        if unmasked:
            tasks += info["_unannotated"]
        ids = {str(t[0]) for t in tasks}
        return Source("coco", domain, tasks=tasks,
                      problems=[q for q in problems if q["id"] in ids or q["kind"] == "image"])
    if kind == "images":
        return _image_folder(path, domain)
    raise UsageError(f"--kind must be parquet, folder, coco or images, got {kind!r}")


def _bare_folders(root: Path, split: str | None, domain: str) -> dict[str, dict[str, Path]]:
    """An InstaGAN folder's `<phase>A` (domain a; B for b) folders that have no `_seg` sibling: phase -> images by
    stem (the phases in `split`, comma-separated, if given)."""
    phases = set(split.split(",")) if split else None
    out = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        m = folder.PAIR.match(d.name)
        if m and m["dom"] == domain.upper() and (not phases or m["phase"] in phases) \
                and not (root / f"{d.name}_seg").is_dir():
            out[m["phase"]] = folder.by_stem(d, [], "image")
    return out


def _image_folder(path: Path, domain: str) -> Source:
    """Every image file below `path` (IMAGE_SUFFIXES, hidden files left out), id = its relative path without the
    suffix; a second file of the same id (a.png and a.jpg) is reported as duplicate_id."""
    if not path.is_dir():
        raise UsageError(f"an image folder input must be a folder, got {path}")
    tasks, problems, seen = [], [], set()
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file() or any(x.startswith(".") for x in rel.parts):
            continue
        iid = rel.with_suffix("").as_posix()
        if iid in seen:
            problems.append(quarantine_row(iid, str(p), "duplicate_id", "another file of this id comes first"))
            continue
        seen.add(iid)
        tasks.append((iid, str(p)))
    if not tasks:
        raise UsageError(f"no image ({', '.join(IMAGE_SUFFIXES)}) under {path}")
    return Source("images", domain, tasks=tasks, problems=problems)


def image_row(task: tuple[str, str]) -> dict:
    """An image folder's (id, path) -> a ROWS row without masks; a file that cannot be read or is not a PNG, JPEG
    or WebP image comes back with image None and the reason (the header is checked here, pixels in the actor)."""
    iid, path = task
    try:
        raw = Path(path).read_bytes()
        with open_image(raw) as im:
            width, height = im.size
    except OSError as e:
        return _unread(iid, path, "missing_file", f"{type(e).__name__}: {e}")
    except BadInput as e:
        return _unread(iid, path, e.reason, e.detail)
    return {"id": iid, "image": raw, "height": height, "width": width, "masks": [], "source": path, "problems": ""}


def _unread(iid: str, path: str, reason: str, detail: str) -> dict:
    return {"id": iid, "image": None, "height": 0, "width": 0, "masks": [], "source": path,
            "problems": json.dumps([quarantine_row(iid, path, reason, detail)])}


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
    missing = {"id", "image"} - set(pq.read_schema(files[0]).names)
    if missing:
        raise UsageError(f"{files[0]} lacks the column(s) {', '.join(sorted(missing))} (data_prep's schema)")
    return files


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
        for task in source.tasks:
            if str(task[0]) not in skip:
                yield from task_rows(task, source.kind)
        return
    for f in source.files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=64, columns=parquet_columns(f)):
            for row in batch.to_pylist():
                if row["id"] not in skip:
                    yield {**row, "source": row.get("source") or f, "problems": ""}


def parquet_columns(file: str) -> list[str]:
    """The ROWS columns a Parquet input has (id and image always; masks, height, width and source if there)."""
    names = pq.read_schema(file).names
    return [c for c in ("id", "image", "height", "width", "masks", "source") if c in ("id", "image") or c in names]


def convert_tasks(batch: pa.Table, kind: str) -> pa.Table:
    """Ray Data map function: pickled data_prep tasks (image folder: (id, path)) -> rows in ROWS (failed images
    with image null)."""
    tasks = [pickle.loads(t) for t in batch["task"].to_pylist()]
    return pa.Table.from_pylist([r for t in tasks for r in task_rows(t, kind)], schema=ROWS)


def task_rows(task: tuple, kind: str) -> list[dict]:
    """One listed task -> its ROWS rows: an (id, path) image task (an image folder's, or an image listed without
    masks) -> one row without masks; a folder/coco conversion task -> data_prep's rows (or one failed row)."""
    if len(task) == 2:
        return [image_row(task)]
    return _convert(task, {"folder": folder.convert, "coco": coco.convert}[kind])


class BadRow(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def decode_row(row: dict) -> tuple[np.ndarray, np.ndarray]:
    """A ROWS row -> (uint8 (H, W, 3), bool (K, H, W)); raises BadRow(unreadable_image | unsupported_format |
    too_large | bad_masks). Images are decoded as PNG, JPEG or WebP only (data_prep.rows.open_image). A row
    without masks (none listed, or no masks column) gives K = 0 at the image's size."""
    try:
        with open_image(row["image"]) as im:
            img = rgb_array(im)
    except BadInput as e:
        raise BadRow(e.reason, e.detail) from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on data corrupt past the header
        raise BadRow("unreadable_image", f"{type(e).__name__}: {e}") from None
    if not row.get("masks"):
        return img, np.zeros((0, *img.shape[:2]), bool)
    try:
        masks = decode_masks(row["masks"], row["height"], row["width"])
    except Exception as e:
        raise BadRow("bad_masks", f"{type(e).__name__}: {e}") from None
    return img, masks


def add_input_arguments(p: argparse.ArgumentParser, direction_default: str | None, direction_help: str) -> None:
    """The flags that pick the input rows (resolve_input's arguments); jobs/translate.py and jobs/serve_client.py."""
    p.add_argument("--kind", choices=("auto", "parquet", "folder", "coco", "images"), default="auto",
                   help="images: a plain folder of PNG/JPEG/WebP files without masks (with --masks predict)")
    p.add_argument("--direction", choices=("a2b", "b2a"), default=direction_default, help=direction_help)
    p.add_argument("--split", help="split of a data_prep set, or phase of an InstaGAN folder (needed if several)")
    p.add_argument("--images", help="COCO: the image folder")
    p.add_argument("--a", help="COCO: category name(s) of domain a")
    p.add_argument("--b", help="COCO: category name(s) of domain b")
