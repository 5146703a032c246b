"""data_prep importers on the real sample sets in ../shared/data and on hand-made inputs: counts equal what
pycocotools (or the folder) says, masks survive the Parquet round trip, every kind of bad input is quarantined
with its reason while the run goes on.   Run: .venv/bin/python -m pytest tests/test_data_prep.py -q
"""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from data_prep.cli import main
from data_prep.synthetic import write_synthetic
from instagan.data import read_sample
from instagan.synthetic import make_image

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHP = DATA / "shp2gir_coco_sample"
FRUITS = DATA / "fruits_nuts_coco"
ROOT = Path(__file__).resolve().parents[1]


def run(argv, out):
    """Run the CLI in-process; -> (exit code, metadata or None, quarantine rows)."""
    rc = main([*map(str, argv), "--out", str(out), "--quiet", "--workers", "1"])
    meta = json.loads((out / "metadata.json").read_text()) if (out / "metadata.json").exists() else None
    q = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()] \
        if (out / "quarantine.jsonl").exists() else []
    return rc, meta, q


def rows(out, split, domain):
    return pq.read_table(out / split / domain).to_pylist()


def totals(meta, domain):
    c = [v for k, v in meta["counts"].items() if k.endswith("/" + domain)]
    return sum(x["images"] for x in c), sum(x["instances"] for x in c)


def reasons(q):
    return {r["reason"] for r in q}


# ---- real data ---------------------------------------------------------------------------------------------

def test_folder_shp2gir_counts_and_round_trip(tmp_path):
    rc, meta, q = run(["folder", SHP, "--a-name", "sheep", "--b-name", "giraffe"], tmp_path)
    assert rc == 0 and q == []
    for dom, letter in (("a", "A"), ("b", "B")):
        n_img = len(list((SHP / f"sample{letter}").glob("*.png")))
        n_ins = len(list((SHP / f"sample{letter}_seg").glob("*.png")))
        assert meta["counts"][f"sample/{dom}"] == {"images": n_img, "instances": n_ins}
        for row in rows(tmp_path, "sample", dom):
            img, masks = read_sample(row)
            src = np.asarray(Image.open(SHP / f"sample{letter}" / f"{row['id']}.png").convert("RGB"))
            assert np.array_equal(img, src)  # PNG kept byte for byte
            want = [np.asarray(Image.open(SHP / f"sample{letter}_seg" / f"{row['id']}_{k}.png").convert("L")) >= 128
                    for k in range(len(masks))]
            assert np.array_equal(masks, np.stack(want))
            assert row["areas"] == [int(m.sum()) for m in want]
    assert meta["categories"] == {"a": ["sheep"], "b": ["giraffe"]}
    assert meta["schema_version"] == 1 and meta["mask_encoding"] == "coco_rle"
    assert meta["image_size"]["max_hw"] == [256, 256] and meta["instances_histogram"]["sample/a"]
    assert "python -m data_prep folder" in meta["build"]["command"] and "pyarrow" in meta["build"]["versions"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' annToMask under NumPy 2
def test_coco_fruits_counts_equal_pycocotools(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(FRUITS / "trainval.json"))
    rc, meta, q = run(["coco", "--annotations", FRUITS / "trainval.json", "--images", FRUITS / "images",
                       "--a", "date", "--b", "fig"], tmp_path)
    assert rc == 0 and q == []
    for dom, name in (("a", "date"), ("b", "fig")):
        cat = coco.getCatIds(catNms=[name])
        assert totals(meta, dom) == (len(coco.getImgIds(catIds=cat)), len(coco.getAnnIds(catIds=cat)))
    assert set(meta["counts"]) == {"train/a", "train/b", "test/a", "test/b"}  # seeded hash split
    # an image with dates and figs is a row of each domain but one image
    both = set(coco.getImgIds(catIds=coco.getCatIds(catNms=["date"]))) & set(coco.getImgIds(
        catIds=coco.getCatIds(catNms=["fig"])))
    assert both and meta["unique_images"] == totals(meta, "a")[0] + totals(meta, "b")[0] - len(both)
    # round trip: every stored mask equals pycocotools' rasterisation of the same annotation, in json order
    row = next(r for r in rows(tmp_path, "train", "a") if r["id"] == "0")
    _, masks = read_sample(row)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[0], catIds=coco.getCatIds(catNms=["date"])))
    assert np.array_equal(masks, np.stack([coco.annToMask(a).astype(bool) for a in anns]))
    assert row["category"] == "date" and (row["height"], row["width"]) == (600, 800)


def test_coco_exclusive_and_ids(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(FRUITS / "trainval.json"))
    rc, meta, _ = run(["coco", "--annotations", FRUITS / "trainval.json", "--images", FRUITS / "images",
                       "--a", "1", "--b", "FIG", "--exclusive", "--split", "train"], tmp_path)
    date, fig = set(coco.getImgIds(catIds=[1])), set(coco.getImgIds(catIds=[2]))
    assert rc == 0
    assert totals(meta, "a")[0] == len(date - fig) and totals(meta, "b")[0] == len(fig - date)
    assert meta["skipped"]["excluded_both"] == len(date & fig)


def test_max_side_resizes_image_and_masks(tmp_path):
    rc, meta, _ = run(["folder", SHP, "--max-side", "100", "--image-format", "jpeg"], tmp_path)
    assert rc == 0
    row = rows(tmp_path, "sample", "a")[0]
    img, masks = read_sample(row)
    assert img.shape == (100, 100, 3) and masks.shape[1:] == (100, 100) and row["format"] == "JPEG"


def test_parallel_workers_same_rows(tmp_path):
    serial = write_synthetic(tmp_path / "s1", n=12, size=48, workers=1)
    parallel = write_synthetic(tmp_path / "s2", n=12, size=48, workers=2)
    assert serial["counts"] == parallel["counts"]
    assert rows(tmp_path / "s1", "train", "b") == rows(tmp_path / "s2", "train", "b")


# ---- synthetic -----------------------------------------------------------------------------------------------

def test_synthetic_exact_and_deterministic(tmp_path):
    meta = write_synthetic(tmp_path, n=10, size=64, seed=3, n_b=4, test_fraction=0.2)
    assert meta["counts"]["train/a"]["images"] == 8 and meta["counts"]["test/a"]["images"] == 2
    assert meta["counts"]["train/b"]["images"] == 3 and meta["counts"]["test/b"]["images"] == 1
    for row in rows(tmp_path, "train", "a") + rows(tmp_path, "test", "b"):
        domain = "a" if row["category"] == "ellipse" else "b"
        img, masks = read_sample(row)
        want_img, want_masks = make_image(domain, int(row["id"]), 64, seed=3)
        assert np.array_equal(img, want_img) and np.array_equal(masks, want_masks)
    again = write_synthetic(tmp_path / "again", n=10, size=64, seed=3, n_b=4, test_fraction=0.2)
    assert again["counts"] == meta["counts"]
    assert rows(tmp_path, "train", "a") == rows(tmp_path / "again", "train", "a")


def test_shards_are_bounded(tmp_path):
    meta = write_synthetic(tmp_path, n=40, size=64, test_fraction=0.0, workers=1, extra=("--shard-mb", 0.05))
    files = [f for f in meta["files"] if f["path"].startswith("train/a/")]
    assert len(files) > 3 and sum(f["rows"] for f in files) == 40
    assert all(f["bytes"] < 0.05 * 2**20 + 40_000 for f in files)  # bound + at most one row over


# ---- labelmap --------------------------------------------------------------------------------------------------

def _labelmap_set(tmp_path, kind):
    """Two label maps: image 0 has 2 pants blobs, 1 skirt blob, a speck and an unknown label; image 1 only pants."""
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    names = ["null", "pants", "skirt", "hair"]
    maps = []
    lab = np.zeros((40, 50), np.uint8)
    lab[2:12, 2:12] = 1
    lab[20:30, 30:45] = 1
    lab[25:35, 5:15] = 2
    lab[38, 48] = 1  # 1-pixel speck: below --min-area
    lab[0, 49] = 9  # not in the names list
    maps.append(lab)
    lab = np.zeros((40, 50), np.uint8)
    lab[5:30, 5:30] = 1
    maps.append(lab)
    for i, lab in enumerate(maps):
        Image.fromarray(np.full((40, 50, 3), 100 + i, np.uint8)).save(tmp_path / "img" / f"{i}.jpg")
        if kind == "png":
            Image.fromarray(lab).save(tmp_path / "lab" / f"{i}.png")
        else:
            from scipy.io import savemat

            savemat(tmp_path / "lab" / f"{i}.mat", {"groundtruth": lab})
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "img" / "3.png")  # label map 40x50
    for i in (2, 3):  # 2: a label map without its image
        if kind == "png":
            Image.fromarray(maps[0]).save(tmp_path / "lab" / f"{i}.png")
        else:
            from scipy.io import savemat

            savemat(tmp_path / "lab" / f"{i}.mat", {"groundtruth": maps[0]})
    if kind == "png":
        (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
        return tmp_path / "names.txt", maps
    from scipy.io import savemat

    cell = np.empty((1, len(names)), dtype=object)
    cell[0, :] = names
    savemat(tmp_path / "label_list.mat", {"label_list": cell})  # a cell array, as Clothing Co-Parsing ships it
    return tmp_path / "label_list.mat", maps


@pytest.mark.parametrize("kind", ["png", "mat"])
def test_labelmap_components_are_instances(tmp_path, kind):
    names, maps = _labelmap_set(tmp_path, kind)
    rc, meta, q = run(["labelmap", "--images", tmp_path / "img", "--labels", tmp_path / "lab", "--names", names,
                       "--a", "pants", "--b", "skirt", "--min-area", "4", "--split", "train"], tmp_path / "out")
    assert rc == 0
    assert meta["counts"]["train/a"] == {"images": 2, "instances": 3}
    assert meta["counts"]["train/b"] == {"images": 1, "instances": 1}
    assert meta["skipped"]["small_instance"] == 1
    assert {(r["id"], r["reason"]) for r in q} == {("0", "unknown_category"), ("2", "missing_file"),
                                                   ("3", "size_mismatch")}
    row = next(r for r in rows(tmp_path / "out", "train", "a") if r["id"] == "0")
    _, masks = read_sample(row)
    assert sorted(int(m.sum()) for m in masks) == [100, 150]
    assert np.array_equal(masks.any(0), (maps[0] == 1) & (np.arange(50)[None] < 48))


# ---- bad input -----------------------------------------------------------------------------------------------

def _save_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_folder_bad_inputs_are_quarantined(tmp_path, capsys):
    root = tmp_path / "in"
    ok = []
    for i in range(3):  # three good images
        img, masks = make_image("a", i, 32)
        _save_png(root / "trainA" / f"g{i}.png", img)
        for k, m in enumerate(masks):
            _save_png(root / "trainA_seg" / f"g{i}_{k}.png", m.astype(np.uint8) * 255)
        ok.append(len(masks))
    img, masks = make_image("b", 0, 32)
    _save_png(root / "trainB" / "b0.jpg", img)
    _save_png(root / "trainB_seg" / "b0_0.png", np.dstack([masks[0].astype(np.uint8) * 255] * 3))  # RGB mask
    full = masks[0].astype(np.uint8) * 255
    (root / "trainA" / "garbage.png").write_bytes(b"not an image at all")
    _save_png(root / "trainA_seg" / "garbage_0.png", full)
    raw = io.BytesIO()
    Image.fromarray(img).save(raw, "PNG")
    (root / "trainA" / "trunc.png").write_bytes(raw.getvalue()[: len(raw.getvalue()) // 2])
    _save_png(root / "trainA_seg" / "trunc_0.png", full)
    _save_png(root / "trainA" / "size.png", img)
    _save_png(root / "trainA_seg" / "size_0.png", np.zeros((20, 20), np.uint8) + 255)  # other size
    _save_png(root / "trainA_seg" / "size_1.png", full)  # the good one is kept
    _save_png(root / "trainA" / "empty.png", img)
    _save_png(root / "trainA_seg" / "empty_0.png", np.zeros((32, 32), np.uint8))
    _save_png(root / "trainA" / "nomask.png", img)
    _save_png(root / "trainA_seg" / "orphan_0.png", full)  # mask without image
    _save_png(root / "trainA" / "g0.jpg", img)  # duplicate id g0
    (root / "trainA" / "eps.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nshowpage\n")
    _save_png(root / "trainA_seg" / "eps_0.png", full)
    _save_png(root / "trainA" / "gif.gif", img)  # a format no decoder is tried for
    _save_png(root / "trainA_seg" / "gif_0.png", full)
    _save_png(root / "trainA" / "jpgmask.png", img)
    Image.fromarray(full).save(root / "trainA_seg" / "jpgmask_0.jpg", "JPEG")  # masks are PNG only
    _save_png(root / "trainA" / "speck.png", img)
    speck = np.zeros((32, 32), np.uint8)
    speck[3, 3] = 255
    _save_png(root / "trainA_seg" / "speck_0.png", speck)  # valid, below --min-area: skipped by choice
    rc, meta, q = run(["folder", root, "--min-area", "2"], tmp_path / "out")
    assert rc == 0
    by = {(r["id"], r["reason"]) for r in q}
    assert {("garbage", "unreadable_image"), ("trunc", "unreadable_image"), ("size", "size_mismatch"),
            ("empty", "empty_mask"), ("empty", "no_instances"), ("nomask", "no_instances"),
            ("orphan", "missing_file"), ("g0", "duplicate_id"), ("eps", "unsupported_format"),
            ("gif", "unsupported_format"), ("jpgmask", "unsupported_format")} <= by
    assert "speck" not in {r["id"] for r in q} and meta["skipped"]["below_min_area"] == 1
    assert "warning: split 'train' has 1 image(s) of domain b" in capsys.readouterr().out
    assert all(set(r) >= {"id", "source", "reason"} for r in q)
    # valid rows are never lost: the 3 good images, size.png with its one good mask, and the RGB-mask image of b
    assert meta["counts"]["train/a"] == {"images": 4, "instances": sum(ok) + 1}
    assert meta["counts"]["train/b"] == {"images": 1, "instances": 1}
    assert meta["quarantine"]["unreadable_image"] == 2


def _coco_json(tmp_path):
    """A COCO file with every segmentation kind and several faults."""
    (tmp_path / "images").mkdir()
    ims = []
    for i in range(4):
        Image.fromarray(np.full((30, 40, 3), 50 * i, np.uint8)).save(tmp_path / "images" / f"{i}.jpg")
        ims.append({"id": i, "file_name": f"{i}.jpg", "height": 30, "width": 40})
    ims.append({"id": 9, "file_name": "missing.jpg", "height": 30, "width": 40})
    ims.append({"id": 1, "file_name": "1.jpg", "height": 30, "width": 40})  # duplicate id
    box = np.zeros((30, 40), np.uint8, order="F")
    box[5:15, 10:30] = 1
    rle = mask_util.encode(box)
    anns = [
        {"id": 1, "image_id": 0, "category_id": 1, "iscrowd": 0, "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]},
        {"id": 2, "image_id": 0, "category_id": 1, "iscrowd": 0,  # compressed RLE, counts as a string
         "segmentation": {"size": [30, 40], "counts": rle["counts"].decode()}},
        {"id": 3, "image_id": 1, "category_id": 2, "iscrowd": 0,  # uncompressed RLE (column-major runs)
         "segmentation": {"size": [30, 40], "counts": [5 * 30 + 5, 10, 20, 10, 30 * 40 - 5 * 30 - 5 - 40]}},
        {"id": 4, "image_id": 1, "category_id": 2, "iscrowd": 1,
         "segmentation": {"size": [30, 40], "counts": [0, 10, 1190]}},
        {"id": 5, "image_id": 2, "category_id": 7, "iscrowd": 0, "segmentation": [[0, 0, 5, 0, 5, 5]]},  # unknown
        {"id": 6, "image_id": 2, "category_id": 1, "iscrowd": 0,  # RLE of another size
         "segmentation": {"size": [10, 10], "counts": [0, 100]}},
        {"id": 7, "image_id": 9, "category_id": 1, "iscrowd": 0, "segmentation": [[0, 0, 5, 0, 5, 5]]},
        {"id": 8, "image_id": 3, "category_id": 2, "iscrowd": 1, "segmentation": [[0, 0, 9, 0, 9, 9]]},
        {"id": 8, "image_id": 3, "category_id": 2, "iscrowd": 0, "segmentation": [[0, 0, 9, 0, 9, 9]]},  # dup
    ]
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": ims, "annotations": anns, "categories": cats}))
    return path, box


def test_coco_segmentation_kinds_crowd_and_bad_input(tmp_path):
    ann, box = _coco_json(tmp_path)
    rc, meta, q = run(["coco", "--annotations", ann, "--images", tmp_path / "images", "--a", "cat", "--b", "dog",
                       "--split", "train"], tmp_path / "out")
    assert rc == 0
    assert meta["counts"]["train/a"] == {"images": 1, "instances": 2}  # image 0: polygon + compressed RLE
    assert meta["counts"]["train/b"] == {"images": 1, "instances": 1}  # image 1: uncompressed RLE, crowd skipped
    assert meta["skipped"]["crowd"] == 2 and meta["skipped"]["crowd_only_image"] == 1
    by = {(r["id"], r["reason"]) for r in q}
    assert {("1", "duplicate_id"), ("2", "unknown_category"), ("2", "size_mismatch"), ("2", "no_instances"),
            ("9", "missing_file"), ("3", "duplicate_id")} <= by
    _, masks = read_sample(rows(tmp_path / "out", "train", "a")[0])
    assert np.array_equal(masks[1], box.astype(bool))
    _, masks = read_sample(rows(tmp_path / "out", "train", "b")[0])
    assert masks.shape == (1, 30, 40) and masks[0].sum() == 20 and masks[0, 5:15, 5:7].all()


def test_exit_codes(tmp_path):
    ann, _ = _coco_json(tmp_path)
    images = tmp_path / "images"
    # inputs unusable: missing file, unknown domain category, no folder pair -> 2
    assert run(["coco", "--annotations", tmp_path / "nope.json", "--images", images, "--a", "cat", "--b", "dog"],
               tmp_path / "o1")[0] == 2
    assert run(["coco", "--annotations", ann, "--images", images, "--a", "horse", "--b", "dog"],
               tmp_path / "o2")[0] == 2
    assert run(["folder", tmp_path], tmp_path / "o3")[0] == 2
    # nothing valid remains -> 1, with the reasons on record
    root = tmp_path / "bad"
    (root / "trainA_seg").mkdir(parents=True)
    (root / "trainA").mkdir()
    (root / "trainA" / "x.png").write_bytes(b"junk")
    _save_png(root / "trainA_seg" / "x_0.png", np.ones((8, 8), np.uint8) * 255)
    rc, _, q = run(["folder", root], tmp_path / "o4")
    assert rc == 1 and reasons(q) == {"unreadable_image"}
    # a second build into the same folder needs --overwrite
    assert write_synthetic(tmp_path / "o5", n=2, size=32)["counts"]
    assert main(["synthetic", "--n", "2", "--size", "32", "--out", str(tmp_path / "o5"), "--quiet"]) == 2


def test_cli_help_and_module_entry():
    out = subprocess.run([sys.executable, "-m", "data_prep", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0
    assert all(s in out.stdout for s in ("folder", "coco", "labelmap", "synthetic"))
    out = subprocess.run([sys.executable, "-m", "data_prep", "coco", "--help"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0 and "--exclusive" in out.stdout and "--max-side" in out.stdout


def test_16_bit_grey_images_are_scaled_not_clipped(tmp_path):
    root = tmp_path / "in"
    grey16 = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    _save_png(root / "trainA" / "g16.png", grey16)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    _save_png(root / "trainA_seg" / "g16_0.png", mask)
    rc, meta, q = run(["folder", root], tmp_path / "out")
    assert rc == 0 and q == [] and meta["counts"]["train/a"]["images"] == 1
    img, masks = read_sample(rows(tmp_path / "out", "train", "a")[0])
    np.testing.assert_array_equal(img[..., 1], np.round(grey16 / 257).astype(np.uint8))  # convert("RGB") clips
    assert masks.shape == (1, 32, 32) and masks.sum() == 256


def test_unreadable_image_reasons_read_the_same_every_time(tmp_path):
    """A zero-byte or garbage file is quarantined with a reason that names the problem, not a memory address."""
    from data_prep.rows import BadInput, load_image

    details = set()
    for name, data in (("empty.jpg", b""), ("text.png", b"not an image" * 10)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BadInput) as info:
            load_image(tmp_path / name)
        assert info.value.reason == "unreadable_image" and "0x" not in info.value.detail, info.value.detail
        assert "cannot identify image file" in info.value.detail
        details.add(info.value.detail)
    assert len(details) == 1  # the same reason text for the same kind of problem


def test_progress_bar_counts_every_image_and_quiet_hides_it(tmp_path, capsys):
    """The conversion reports its progress with tqdm on stderr (count, total, rate); --quiet prints none."""
    assert main(["synthetic", "--n", "6", "--size", "32", "--out", str(tmp_path / "p"), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "data_prep synthetic: 100%" in err and "12/12" in err and "image/s" in err, err
    assert main(["synthetic", "--n", "6", "--size", "32", "--out", str(tmp_path / "q"), "--workers", "1",
                 "--quiet"]) == 0
    assert "data_prep synthetic" not in capsys.readouterr().err
