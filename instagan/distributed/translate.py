"""Batch translation of a collection with Ray Data: an actor pool of Translators, part files written whole, resume
by id, every input that was not translated reported with its reason (jobs/translate.py has the user's view).

    source = instagan.inputs.resolve_input(path, direction="a2b")
    summary = translate_collection(source, checkpoint, out, actors=2)   # Ray initialised; -> the run summary
    summary = translate_collection(source, checkpoint, out, masks="predict", segmenter="seg.pt", category="sheep")

Masks (`masks`): "given" translates with the input's masks; "predict" has an instagan.segment.InstanceSegmenter,
loaded once per actor beside the Translator, find the instances of `category` in every image and translates with
those; "auto" predicts only for images that come without masks. Predicted masks are written beside the translated
ones (`input_masks`, `scores`, `predicted` true); an image where nothing is found is reported as skipped with the
reason no_instances_detected.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import time
import uuid
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from data_prep.rows import encode_masks, quarantine_row
from instagan.inputs import ROWS, BadRow, Source, parquet_columns, convert_tasks, decode_row
from instagan.storage import filesystem, write_text

OUTPUT = pa.schema([
    ("id", pa.string()), ("image", pa.binary()), ("format", pa.string()), ("height", pa.int32()),
    ("width", pa.int32()), ("masks", pa.list_(pa.binary())), ("areas", pa.list_(pa.int64())),
    ("translated", pa.list_(pa.bool_())), ("direction", pa.string()), ("checkpoint", pa.string()),
    ("source", pa.string()), ("time_s", pa.float64()),
    ("predicted", pa.bool_()),  # the input masks were predicted by the segmenter (--masks predict|auto)
    ("input_masks", pa.list_(pa.binary())),  # the predicted input masks (COCO RLE); empty when given
    ("scores", pa.list_(pa.float64())),  # the segmenter's score of each predicted mask; empty when given
    ("segmenter", pa.string()),  # the segmenter file that predicted them; null when given
    ("segment_s", pa.float64()),  # the image's share of its batch's segmenter time; null when given
])
MASK_MODES = ("given", "predict", "auto")
ACTOR_OUT = OUTPUT.append(pa.field("problems", pa.string()))
PART = re.compile(r"^part-.+\.parquet$")
UNREADABLE = "unreadable"  # <out>/unreadable/: part files a resume could not read, moved aside


def read_input(source: Source, skip_ids: Iterable[str] = ()):
    """The source's rows as a Ray Dataset (ROWS' columns; Ray must be initialised). Folder and COCO images are
    decoded by data_prep's readers in Ray tasks; Parquet rows whose id is in skip_ids are dropped by the
    translate actors (TranslateActor's skip_ids), folder/COCO tasks here."""
    import ray

    skip = set(skip_ids)
    if source.kind == "parquet":
        return ray.data.read_parquet(source.files).select_columns(parquet_columns(source.files[0]))
    tasks = [{"task": pickle.dumps(t)} for t in source.tasks if str(t[0]) not in skip]
    if not tasks:
        return ray.data.from_arrow(ROWS.empty_table())
    return ray.data.from_items(tasks).map_batches(convert_tasks, fn_kwargs={"kind": source.kind},
                                                  batch_format="pyarrow", batch_size=8)


# ---- translation ---------------------------------------------------------------------------------------------

PREDICTED = [  # what the segment stage adds to a ROWS row for the translate stage (masks holds the predicted ones)
    ("predicted", pa.bool_()), ("scores", pa.list_(pa.float64())), ("segmenter", pa.string()),
    ("segment_s", pa.float64()),
]
SEGMENTED = pa.schema(list(ROWS) + [pa.field(*f) for f in PREDICTED])


def segment_rows(segmenter, rows: list[dict], masks: str, segmenter_path: str | None, check=None) -> list[dict]:
    """The segment stage: ROWS rows -> SEGMENTED rows. Rows that need masks (masks "predict": every row; "auto":
    rows without masks) get the segmenter's, encoded like data_prep's, with predicted true, their scores and their
    share of the batch's segmenter time; the others pass with predicted false. A row that cannot be decoded, that
    `check(img)` rejects, or where nothing is found loses its image and gets the reason in `problems` (reported
    as skipped by the translate stage). One bad row never stops the others."""
    out, pending = [], []
    for row in rows:
        row = {**row, "predicted": False, "scores": [], "segmenter": None, "segment_s": None}
        if row["image"] is None or not (masks == "predict" or (masks == "auto" and not row.get("masks"))):
            out.append(row)
            continue
        try:
            img, _ = decode_row({**row, "masks": None})
            if check is not None:
                check(img)
        except (BadRow, ValueError) as e:
            reason, detail = (e.reason, e.detail) if isinstance(e, BadRow) else ("bad_item", str(e))
            out.append(_dropped(row, reason, detail))
            continue
        pending.append((len(out), row, img))
        out.append(None)
    if pending:
        t0 = time.perf_counter()
        found = segmenter.predict_each([img for _, _, img in pending])
        share = (time.perf_counter() - t0) / len(pending)
        for (i, row, img), f in zip(pending, found):
            if isinstance(f, Exception):
                out[i] = _dropped(row, "segment_error", f"{type(f).__name__}: {f}")
            elif not len(f.masks):
                out[i] = _dropped(row, "no_instances_detected", segmenter.nothing_found())
            else:
                out[i] = {**row, "masks": encode_masks(list(f.masks)), "height": img.shape[0], "width": img.shape[1],
                          "predicted": True, "scores": [float(x) for x in f.scores], "segmenter": segmenter_path,
                          "segment_s": share}
    return out


def _dropped(row: dict, reason: str, detail: str) -> dict:
    problems = json.loads(row.get("problems") or "[]")
    problems.append(quarantine_row(row["id"], row.get("source") or "", reason, detail))
    return {**row, "image": None, "problems": json.dumps(problems)}


def translate_rows(tr, rows: list[dict], size: int | None, batch_size: int, direction: str, checkpoint: str,
                   png_dir: str | None = None, segmenter=None, masks: str = "given",
                   segmenter_path: str | None = None) -> list[dict]:
    """Translate ROWS (or SEGMENTED) rows with an instagan.infer.Translator -> rows in ACTOR_OUT, failed ones with
    image None and their reasons in `problems`. One bad row never stops the others. masks "predict" or "auto" with
    `segmenter` (an instagan.segment.InstanceSegmenter loaded from `segmenter_path`) runs the segment stage first,
    in this call (one stage); rows of a segment stage come with their predicted masks (two stages)."""
    if masks not in MASK_MODES:
        raise ValueError(f"masks must be one of {', '.join(MASK_MODES)}, got {masks!r}")
    if masks != "given":
        if segmenter is None:
            raise ValueError(f"masks={masks!r} needs a segmenter")
        rows = segment_rows(segmenter, rows, masks, segmenter_path,
                            check=lambda img: tr.check_item(img, np.zeros((0, *img.shape[:2]), bool)))
    out, items, good = [], [], []
    for row in rows:
        problems = json.loads(row.get("problems") or "[]")
        if row["image"] is None:
            out.append(_failed(row, problems))
            continue
        try:
            img, given = decode_row(row)
            try:
                tr.check_item(img, given)
            except ValueError as e:
                raise BadRow("size_mismatch" if "but the image is" in str(e) else "bad_item", str(e)) from None
        except (BadRow, ValueError) as e:
            reason, detail = (e.reason, e.detail) if isinstance(e, BadRow) else ("bad_item", str(e))
            problems.append(quarantine_row(row["id"], row.get("source") or "", reason, detail))
            out.append(_failed(row, problems))
            continue
        items.append((img, given))
        good.append((row, problems))
    t0 = time.perf_counter()
    results = tr.translate_each(items, size=size, batch_size=batch_size) if items else []
    share = (time.perf_counter() - t0) / max(1, len(items))
    for (row, problems), item, res in zip(good, items, results):
        if isinstance(res, Exception):
            problems.append(quarantine_row(row["id"], row.get("source") or "", "translate_error",
                                           f"{type(res).__name__}: {res}"))
            out.append(_failed(row, problems))
            continue
        buf = io.BytesIO()
        Image.fromarray(res.img).save(buf, "PNG", compress_level=1)
        out_masks = list(res.masks)
        predicted = bool(row.get("predicted"))
        out.append({"id": row["id"], "image": buf.getvalue(), "format": "PNG", "height": res.img.shape[0],
                    "width": res.img.shape[1], "masks": encode_masks(out_masks),
                    "areas": [int(m.sum()) for m in out_masks],
                    "translated": [bool(t) for t in res.translated], "direction": direction,
                    "checkpoint": checkpoint, "source": row.get("source") or "", "time_s": share,
                    "problems": json.dumps(problems) if problems else "", "predicted": predicted,
                    "input_masks": list(row["masks"]) if predicted else [],
                    "scores": list(row["scores"]) if predicted else [],
                    "segmenter": row["segmenter"] if predicted else None,
                    "segment_s": row["segment_s"] if predicted else None})
        if png_dir:
            write_overlay(Path(png_dir), row["id"], item, res)
    return out


def _failed(row: dict, problems: list[dict]) -> dict:
    return {"id": row["id"], "image": None, "format": None, "height": 0, "width": 0, "masks": [], "areas": [],
            "translated": [], "direction": None, "checkpoint": None, "source": row.get("source") or "",
            "time_s": None, "problems": json.dumps(problems), "predicted": False, "input_masks": [], "scores": [],
            "segmenter": None, "segment_s": None}


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
                 amp: str = "none", png_dir: str | None = None, skip_ids=None, masks: str = "given",
                 segmenter: str | None = None, category: str | None = None, score_threshold: float = 0.5,
                 min_area: int = 1, compile: bool = False):
        import ray
        import torch

        from instagan.config import amp_dtype
        from instagan.infer import Translator

        if threads:
            torch.set_num_threads(threads)
        self.tr = Translator.from_checkpoint(checkpoint, direction=direction, ins_max=ins_max, ins_per=ins_per,
                                             device=device, amp_dtype=amp_dtype(amp, device), compile=compile)
        seg = None
        if masks != "given":
            from instagan.segment import InstanceSegmenter

            seg = InstanceSegmenter.from_file(segmenter, category=category, score_threshold=score_threshold,
                                              min_area=min_area, max_instances=ins_max, device=device,
                                              batch_size=batch_size)
        self.kw = dict(size=size, batch_size=batch_size, direction=direction, checkpoint=checkpoint,
                       png_dir=png_dir, segmenter=seg, masks=masks, segmenter_path=segmenter)
        # an ObjectRef: Ray Data pickles constructor arguments into the actor's init closure unresolved
        self.skip = ray.get(skip_ids) if isinstance(skip_ids, ray.ObjectRef) else set(skip_ids or ())

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [r for r in batch.to_pylist() if r["id"] not in self.skip]
        return pa.Table.from_pylist(translate_rows(self.tr, rows, **self.kw), schema=ACTOR_OUT)


class SegmentActor:
    """Ray Data actor of the segment stage (translate_collection with segment_actors >= 1): loads the segmenter once,
    then adds the predicted masks to batches (pyarrow tables in ROWS -> SEGMENTED; `segment_rows`)."""

    def __init__(self, segmenter: str, masks: str = "predict", category: str | None = None,
                 score_threshold: float = 0.5, min_area: int = 1, max_instances: int = 20, device: str = "cpu",
                 batch_size: int = 8, threads: int = 0, skip_ids=None):
        import ray
        import torch

        from instagan.segment import InstanceSegmenter

        if threads:
            torch.set_num_threads(threads)
        self.seg = InstanceSegmenter.from_file(segmenter, category=category, score_threshold=score_threshold,
                                               min_area=min_area, max_instances=max_instances, device=device,
                                               batch_size=batch_size)
        self.masks, self.path = masks, segmenter
        self.skip = ray.get(skip_ids) if isinstance(skip_ids, ray.ObjectRef) else set(skip_ids or ())

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [r for r in batch.to_pylist() if r["id"] not in self.skip]
        return pa.Table.from_pylist(segment_rows(self.seg, rows, self.masks, self.path), schema=SEGMENTED)


def done_ids(out: str) -> tuple[set[str], list[str]]:
    """Ids already in --out's part files (only their id column is read), and the part files that could not be
    read (a torn copy, a truncated upload): those are moved aside to <out>/unreadable/, so that their ids are
    translated again and later resumes do not trip over them. -> (ids, names moved aside)."""
    fs, base = filesystem(out)
    if fs.get_file_info(base).type == pafs.FileType.NotFound:
        return set(), []
    ids, moved = set(), []
    for f in sorted(i.path for i in fs.get_file_info(pafs.FileSelector(base)) if PART.match(i.base_name)):
        try:
            ids.update(pq.read_table(f, columns=["id"], filesystem=fs)["id"].to_pylist())
        except (pa.ArrowException, OSError, KeyError):  # not Parquet, truncated, or without an id column
            name = f.rsplit("/", 1)[-1]
            fs.create_dir(f"{base}/{UNREADABLE}", recursive=True)
            fs.move(f, f"{base}/{UNREADABLE}/{name}")
            moved.append(name)
    return ids, moved


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
                return {"files": [], "rows": 0, "predicted": 0, "problems": []}
            problems = [q for p in table["problems"].to_pylist() if p for q in json.loads(p)]
            good = table.filter(pc.is_valid(table["image"])).select(OUTPUT.names)
            predicted = int(pc.sum(good["predicted"]).as_py() or 0)
            fs, base = filesystem(out)
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
            return {"files": names, "rows": good.num_rows, "predicted": predicted, "problems": problems}

        def on_write_complete(self, write_result) -> None:
            self.returns = list(write_result.write_returns)

    return PartFiles()


# ---- the collection ------------------------------------------------------------------------------------------

def translate_collection(source: Source, checkpoint: str, out: str, direction: str = "a2b", size: str = "model",
                         ins_max: int = 20, ins_per: int = 2, device: str = "cpu", actors: int = 1,
                         cpus_per_actor: float = 1.0, threads: int = 0, batch_size: int = 8,
                         rows_per_file: int = 128, amp: str = "none", png: str | None = None,
                         progress: bool = True, masks: str = "given", segmenter: str | None = None,
                         category: str | None = None, score_threshold: float = 0.5, min_area: int = 1,
                         segment_actors: int = 0, cpus_per_segment_actor: float = 1.0, compile: bool = False) -> dict:
    """Translate `source` into `out` with Ray Data (Ray must be initialised); returns the run summary.
    progress=False hides Ray Data's progress bars. masks, segmenter, category, score_threshold, min_area: where the
    masks come from (module docstring) and what the segmenter keeps. segment_actors: 0 segments inside each
    translate actor (one stage); N >= 1 runs a segment stage of N actors of cpus_per_segment_actor CPUs (one GPU
    each with a cuda device) before the translate stage, so the two overlap. compile: each actor's Translator
    compiles its generator (instagan.infer.Translator)."""
    import ray

    if not progress:
        ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.perf_counter()
    run = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    checkpoint = str(Path(checkpoint).resolve()) if "://" not in checkpoint else checkpoint
    done, moved = done_ids(out)
    ids = source.ids()
    todo = [i for i in ids if i not in done]
    if segmenter is not None and "://" not in segmenter:
        segmenter = str(Path(segmenter).resolve())
    summary = {"run": run, "kind": source.kind, "domain": source.domain, "direction": direction, "out": out,
               "checkpoint": checkpoint, "size": size, "masks": masks, "segmenter": segmenter,
               "segment_stage": bool(masks != "given" and segment_actors), "inputs": len(ids),
               "already_done": len(ids) - len(todo), "unreadable_parts": moved}
    problems = list(source.problems)
    returns = []
    if todo:
        gpu = device.startswith("cuda")
        kwargs = dict(checkpoint=checkpoint, direction=direction, ins_max=ins_max, ins_per=ins_per, device=device,
                      size=None if size == "model" else 0, batch_size=batch_size,
                      threads=threads or max(1, int(cpus_per_actor)), amp=amp, png_dir=png,
                      skip_ids=ray.put(done) if source.kind == "parquet" and done else None, masks=masks,
                      segmenter=segmenter, category=category, score_threshold=score_threshold, min_area=min_area,
                      compile=compile)
        sink = make_sink(out, run, rows_per_file)
        ds = read_input(source, skip_ids=done)
        if masks != "given" and segment_actors:
            ds = ds.map_batches(
                SegmentActor, fn_constructor_kwargs=dict(
                    segmenter=segmenter, masks=masks, category=category, score_threshold=score_threshold,
                    min_area=min_area, max_instances=ins_max, device=device, batch_size=batch_size,
                    threads=max(1, int(cpus_per_segment_actor)), skip_ids=kwargs["skip_ids"]),
                compute=ray.data.ActorPoolStrategy(size=segment_actors), batch_size=batch_size,
                batch_format="pyarrow", num_cpus=cpus_per_segment_actor, num_gpus=1 if gpu else 0)
            kwargs.update(masks="given", segmenter=None, category=None)
        ds = ds.map_batches(
            TranslateActor, fn_constructor_kwargs=kwargs, compute=ray.data.ActorPoolStrategy(size=actors),
            batch_size=batch_size, batch_format="pyarrow", num_cpus=cpus_per_actor, num_gpus=1 if gpu else 0)
        ds.write_datasink(sink)
        returns = sink.returns
        problems += [q for r in returns for q in r["problems"]]
    written = sum(r["rows"] for r in returns)
    base = out.rstrip("/")
    seconds = time.perf_counter() - t0
    skipped = sorted({q["id"] for q in problems if q.get("kind", "image") != "instance"} - done)
    summary.update(written=written, predicted=sum(r.get("predicted", 0) for r in returns), skipped=len(skipped),
                   problems=len(problems),
                   files=sorted(f for r in returns for f in r["files"]), seconds=round(seconds, 3),
                   images_per_s=round(written / seconds, 3) if seconds > 0 else None)
    if problems:
        write_text(f"{base}/skipped-{run}.jsonl", "".join(json.dumps(q) + "\n" for q in problems))
    write_text(f"{base}/run-{run}.json", json.dumps(summary, indent=2) + "\n")
    return summary
