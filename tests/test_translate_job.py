"""jobs/translate.py: input readers and the translation of rows (no Ray), then the Ray Data job on the shared
sheep/giraffe photos: every id once, resuming, bad rows reported and skipped, PNG overlays.

    .venv/bin/python -m pytest -q tests/test_translate_job.py                # about 1-2 minutes
    .venv/bin/python -m pytest -q tests/test_translate_job.py -m "not slow"  # no Ray, a few seconds
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data_prep.cli import build  # noqa: E402
from data_prep.rows import SCHEMA, UsageError, encode_masks  # noqa: E402
from instagan import checkpoint  # noqa: E402
from instagan.config import Config  # noqa: E402
from instagan.data import read_sample  # noqa: E402
from instagan.infer import Translator  # noqa: E402
from instagan.synthetic import make_batch  # noqa: E402
from instagan.train import TrainState, train_step  # noqa: E402
from instagan import inputs as I  # noqa: E402
from instagan.distributed.translate import translate_rows  # noqa: E402
from jobs import translate as job  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SAMPLE = DATA / "shp2gir_coco_sample"
BAD_IDS = {"corrupt_image": "unreadable_image", "wrong_mask_size": "size_mismatch"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    cfg = Config.from_dict({"model": {"ngf": 8, "ndf": 8, "n_blocks": 1}, "data": {"size": 32, "load_size": 32}})
    state = TrainState.create(cfg)
    train_step(state, make_batch("a", 2, 32), make_batch("b", 2, 32))
    return str(checkpoint.save(state, tmp_path_factory.mktemp("ckpt")))


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def parquet_set(tmp_path_factory) -> Path:
    """data_prep's Parquet of the shared sample (7 sheep in sample/a) plus a part file with two bad rows."""
    out = tmp_path_factory.mktemp("shp2gir")
    build(["folder", str(SAMPLE), "--out", str(out), "--quiet", "--workers", "1"])
    good = np.zeros((20, 20, 3), np.uint8)
    bad = [{"id": "corrupt_image", "image": png(good)[:40], "format": "PNG", "height": 20, "width": 20,
            "masks": encode_masks([np.ones((20, 20), bool)]), "areas": [400], "category": "sheep", "source": "t"},
           {"id": "wrong_mask_size", "image": png(good), "format": "PNG", "height": 30, "width": 30,
            "masks": encode_masks([np.ones((30, 30), bool)]), "areas": [900], "category": "sheep", "source": "t"}]
    pq.write_table(pa.Table.from_pylist(bad, schema=SCHEMA), out / "sample" / "a" / "part-00001.parquet")
    return out


def sheep_ids() -> set[str]:
    return {p.stem for p in (SAMPLE / "sampleA").glob("*.png")}


def read_output(out: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(f) for f in sorted(out.glob("part-*.parquet")))


# ---- no Ray ---------------------------------------------------------------------------------------------------

def test_rows_translate_at_their_size_and_bad_rows_are_reported_not_raised(ckpt, parquet_set):
    source = I.resolve_input(parquet_set, direction="a2b")  # the only split, sample, is picked
    rows = list(I.iter_input_rows(source))
    assert {r["id"] for r in rows} == sheep_ids() | set(BAD_IDS)
    tr = Translator.from_checkpoint(ckpt, "a2b", ins_max=3, ins_per=2)
    out = {r["id"]: r for r in translate_rows(tr, rows, size=None, batch_size=4, direction="a2b",
                                                  checkpoint=ckpt)}
    assert set(out) == {r["id"] for r in rows}
    for bad_id, reason in BAD_IDS.items():
        assert out[bad_id]["image"] is None
        assert [q["reason"] for q in json.loads(out[bad_id]["problems"])] == [reason]
    inputs = {r["id"]: read_sample(r) for r in rows if r["id"] not in BAD_IDS}
    for i, (img, masks) in inputs.items():
        y, m = read_sample(out[i])
        assert y.shape == img.shape and m.shape == masks.shape and out[i]["format"] == "PNG"
        assert not np.array_equal(y, img)  # translated, at the input's 256x256 size
        assert out[i]["areas"] == [int(x.sum()) for x in m]
        # ins_max 3: only 3 instances (the largest at the model's size) are translated, the others come back as is
        assert sum(out[i]["translated"]) == min(3, len(masks))
        untouched = ~np.array(out[i]["translated"])
        assert np.array_equal(m[untouched], masks[untouched])


def test_native_size_keeps_odd_sizes(ckpt):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)
    mask = np.zeros((37, 50), bool)
    mask[5:20, 10:30] = True
    row = {"id": "odd", "image": png(img), "height": 37, "width": 50, "masks": encode_masks([mask]), "source": ""}
    tr = Translator.from_checkpoint(ckpt, "b2a")
    (res,) = translate_rows(tr, [row], size=0, batch_size=1, direction="b2a", checkpoint=ckpt)
    y, m = read_sample(res)
    assert y.shape == (37, 50, 3) and m.shape == (1, 37, 50) and res["translated"] == [True]


def test_coco_rows_come_from_data_prep_readers():
    source = I.resolve_input(DATA / "fruits_nuts_coco" / "trainval.json", direction="b2a",
                               images=DATA / "fruits_nuts_coco" / "images", a="date", b="fig")
    data = json.loads((DATA / "fruits_nuts_coco" / "trainval.json").read_text())
    fig = next(c["id"] for c in data["categories"] if c["name"] == "fig")
    want: dict[str, int] = {}
    for ann in data["annotations"]:
        if ann["category_id"] == fig:
            want[str(ann["image_id"])] = want.get(str(ann["image_id"]), 0) + 1
    rows = list(I.iter_input_rows(source, skip_ids=["0"]))
    assert {r["id"]: len(r["masks"]) for r in rows} == {k: v for k, v in want.items() if k != "0"}
    img, masks = read_sample(rows[0])
    assert img.shape == (600, 800, 3) and masks.shape[1:] == (600, 800)


def test_unmasked_listing_keeps_images_without_masks_for_the_segmenter(tmp_path):
    """resolve_input(unmasked=True), what --masks predict|auto list: an InstaGAN folder's image without any mask file
    and every image of a `<phase>A` folder without `_seg` come as rows without masks (not `no_instances`, not left
    out), beside the masked rows; a COCO json's images without any annotation come too, its images annotated with
    other categories only do not. Without unmasked, nothing changes."""
    img = png(np.zeros((8, 8, 3), np.uint8))
    for sub in ("testA", "testA_seg", "trainA"):
        (tmp_path / "set" / sub).mkdir(parents=True)
    for stem in ("m", "bare"):
        (tmp_path / "set" / "testA" / f"{stem}.png").write_bytes(img)
    (tmp_path / "set" / "testA_seg" / "m_0.png").write_bytes(png(np.full((8, 8, 3), 255, np.uint8)))
    (tmp_path / "set" / "trainA" / "t.png").write_bytes(img)
    given = I.resolve_input(tmp_path / "set", split="test")
    assert given.ids() == ["m"] and [q["reason"] for q in given.problems] == ["no_instances"]
    listed = I.resolve_input(tmp_path / "set", split="test", unmasked=True)
    rows = {r["id"]: r for r in I.iter_input_rows(listed)}
    assert set(rows) == {"m", "bare"} and len(rows["m"]["masks"]) == 1
    ray_rows = I.convert_tasks(pa.table({"task": [pickle.dumps(t) for t in listed.tasks]}), "folder").to_pylist()
    assert {r["id"]: r for r in ray_rows} == rows  # the Ray Data path (read_input's map function) reads the same
    assert rows["bare"]["masks"] == [] and rows["bare"]["image"] == img and not rows["bare"]["problems"]
    rows = list(I.iter_input_rows(I.resolve_input(tmp_path / "set", split="train", unmasked=True)))
    assert [(r["id"], r["masks"]) for r in rows] == [("t", [])]
    with pytest.raises(UsageError, match="no <phase>A"):
        I.resolve_input(tmp_path / "set", split="train")

    data = json.loads((DATA / "fruits_nuts_coco" / "trainval.json").read_text())
    fig = next(c["id"] for c in data["categories"] if c["name"] == "fig")
    first = data["images"][0]
    data["images"].append({**first, "id": 9001})  # listed, never annotated: unlabelled
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != first["id"] or a["category_id"] != fig]
    other_only = first["id"] if any(a["image_id"] == first["id"] for a in data["annotations"]) else None
    (tmp_path / "c.json").write_text(json.dumps(data))
    kw = dict(direction="b2a", images=DATA / "fruits_nuts_coco" / "images", a="date", b="fig")
    plain = I.resolve_input(tmp_path / "c.json", **kw).ids()
    listed = I.resolve_input(tmp_path / "c.json", unmasked=True, **kw)
    assert "9001" not in plain and listed.ids() == plain + ["9001"]
    if other_only is not None:  # annotated, but with no fig: not a fig image, left out either way
        assert str(other_only) not in listed.ids()
    row = next(r for r in I.iter_input_rows(listed) if r["id"] == "9001")
    assert row["masks"] == [] and row["image"] is not None and row["height"] == first["height"]


def test_unusable_inputs_are_usage_errors(tmp_path, parquet_set):
    for sub in ("trainA", "trainA_seg", "testA", "testA_seg"):
        (tmp_path / sub).mkdir()
    (tmp_path / "trainA" / "1.png").write_bytes(png(np.zeros((8, 8, 3), np.uint8)))
    (tmp_path / "trainA_seg" / "1_0.png").write_bytes(png(np.full((8, 8, 3), 255, np.uint8)))
    shutil.copy(tmp_path / "trainA" / "1.png", tmp_path / "testA" / "1.png")
    shutil.copy(tmp_path / "trainA_seg" / "1_0.png", tmp_path / "testA_seg" / "1_0.png")
    with pytest.raises(UsageError, match="several phases"):
        I.resolve_input(tmp_path)
    assert I.resolve_input(tmp_path, split="test").ids() == ["1"]
    with pytest.raises(UsageError, match="--a and --b"):
        I.resolve_input(DATA / "fruits_nuts_coco" / "trainval.json", images=DATA / "fruits_nuts_coco")
    with pytest.raises(UsageError, match="splits sample"):
        I.resolve_input(parquet_set, split="train")
    assert job.main(["--checkpoint", str(tmp_path), "--input", str(tmp_path), "--out", str(tmp_path / "o")]) == 2


# ---- the Ray Data job -----------------------------------------------------------------------------------------

def run_job(*args: str) -> dict:
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        code = job.main([*args, "--no-progress"])
    summary = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert code == 0, summary
    return summary


@pytest.mark.slow
def test_parquet_job_writes_every_id_once_resumes_and_reports_bad_rows(ray_local, ckpt, parquet_set, tmp_path):
    out = tmp_path / "out"
    args = ("--checkpoint", ckpt, "--input", str(parquet_set), "--out", str(out), "--rows-per-file", "3",
            "--batch-size", "2")
    first = run_job(*args)
    table = read_output(out)
    ids = table["id"].to_pylist()
    assert sorted(ids) == sorted(sheep_ids()) and first["written"] == 7 and first["skipped"] == 2
    assert set(table.column_names) >= {"id", "image", "height", "width", "masks", "translated", "direction",
                                       "checkpoint", "time_s"}
    assert set(table["direction"].to_pylist()) == {"a2b"} and min(table["time_s"].to_pylist()) > 0
    inputs = {r["id"]: r for r in pq.read_table(parquet_set / "sample" / "a" / "part-00000.parquet").to_pylist()}
    for row in table.to_pylist():
        y, m = read_sample(row)
        assert y.shape == (256, 256, 3) and len(m) == len(inputs[row["id"]]["masks"]) == len(row["translated"])
    report = [json.loads(line) for line in (out / f"skipped-{first['run']}.jsonl").read_text().splitlines()]
    assert {q["id"]: q["reason"] for q in report} == BAD_IDS
    files = sorted(p.name for p in out.glob("part-*.parquet"))
    assert len(files) >= 2  # --rows-per-file 3: several part files

    second = run_job(*args)  # nothing new: the 7 ids are done, the 2 bad rows are retried and reported again
    assert sorted(p.name for p in out.glob("part-*.parquet")) == files
    assert (second["already_done"], second["written"], second["skipped"]) == (7, 0, 2)

    lost = pq.read_table(out / files[0])["id"].to_pylist()  # a part file lost (e.g. a crash before it was written)
    (out / files[0]).unlink()
    third = run_job(*args)
    assert third["written"] == len(lost) and third["already_done"] == 7 - len(lost)
    assert sorted(read_output(out)["id"].to_pylist()) == sorted(sheep_ids())

    files = sorted(p.name for p in out.glob("part-*.parquet"))
    torn = pq.read_table(out / files[-1])["id"].to_pylist()  # a torn copy: the first half of a part file
    (out / files[-1]).write_bytes((out / files[-1]).read_bytes()[:300])
    fourth = run_job(*args)
    assert fourth["unreadable_parts"] == [files[-1]] and (out / "unreadable" / files[-1]).exists()
    assert fourth["written"] == len(torn) and fourth["already_done"] == 7 - len(torn)
    assert sorted(read_output(out)["id"].to_pylist()) == sorted(sheep_ids())  # every id exactly once


@pytest.mark.slow
def test_folder_job_converts_on_the_fly_skips_a_corrupt_photo_and_writes_overlays(ray_local, ckpt, tmp_path):
    root = tmp_path / "photos"
    shutil.copytree(SAMPLE, root)
    (root / "sampleB" / "999.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    shutil.copy(root / "sampleB_seg" / "46_0.png", root / "sampleB_seg" / "999_0.png")
    out, pngs = tmp_path / "out", tmp_path / "png"
    summary = run_job("--checkpoint", ckpt, "--input", str(root), "--direction", "b2a", "--out", str(out),
                      "--png", str(pngs), "--actors", "2", "--cpus-per-actor", "0.5", "--size", "native")
    giraffes = {p.stem for p in (SAMPLE / "sampleB").glob("*.png")}
    table = read_output(out)
    assert sorted(table["id"].to_pylist()) == sorted(giraffes) and summary["written"] == 7
    report = [json.loads(line) for line in (out / f"skipped-{summary['run']}.jsonl").read_text().splitlines()]
    assert [(q["id"], q["reason"]) for q in report] == [("999", "unreadable_image")]
    assert {p.stem for p in pngs.glob("*.png")} == giraffes
    with Image.open(pngs / "46.png") as im:
        assert im.size == (4 * 256, 256)  # input | input + masks | translated | translated + masks
