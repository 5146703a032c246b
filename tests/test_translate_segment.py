"""jobs/translate.py on collections without masks: --masks predict on a plain folder of generated images (no mask
files anywhere) with a small segmenter trained here, --masks auto on rows with and without masks, and the checks
that stop a bad segmenter setting before Ray starts.

    .venv/bin/python -m pytest -q tests/test_translate_segment.py               # about 3 minutes (trains first)
    .venv/bin/python -m pytest -q tests/test_translate_segment.py -m "not slow" # seconds
"""

from __future__ import annotations

import io
import json
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

from data_prep.rows import encode_masks  # noqa: E402
from instagan.data import decode_masks  # noqa: E402
from instagan.infer import Translator  # noqa: E402
from instagan.segment import InstanceSegmenter, build_model  # noqa: E402
from instagan.segment_train import match_instances  # noqa: E402
from instagan.distributed.translate import segment_rows, translate_rows  # noqa: E402
from instagan.synthetic import make_image  # noqa: E402
from jobs import translate as job  # noqa: E402
from tests.conftest import tiny_checkpoint  # noqa: E402

IDS = [590, 591, 592, 593, 594, 595]  # generated images of domain a (test split indices of a 600-image set)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return str(tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), 64))


@pytest.fixture(scope="module")
def trained(small_segmenter) -> str:
    """The session's small segmenter of domain a's ellipses (conftest.small_segmenter)."""
    return str(small_segmenter[1] / "segmenter.pt")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """The generated images as PNG files and nothing else, plus a blank image with nothing to find."""
    folder = tmp_path_factory.mktemp("photos")
    for i in IDS:
        Image.fromarray(make_image("a", i, 64)[0]).save(folder / f"{i:06d}.png")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(folder / "blank.png")
    return folder


def test_segmenter_settings_are_checked_before_ray(tmp_path, ckpt, image_folder, capsys):
    seg = InstanceSegmenter(build_model("small", 2), "small", ["__background__", "ellipse"], layout="scratch")
    path = str(seg.save(tmp_path / "seg.pt"))
    base = ["--checkpoint", ckpt, "--input", str(image_folder), "--out", str(tmp_path / "out")]
    for extra, words in (([], "folder of images without masks: pass --masks predict"),
                         (["--masks", "predict"], "--masks predict needs --segmenter"),
                         (["--masks", "predict", "--segmenter", path, "--category", "sheep"], "unknown category"),
                         (["--masks", "auto", "--segmenter", str(tmp_path / "none.pt")], "none.pt not found"),
                         (["--segmenter", path], "--segmenter and --category are for --masks predict or auto")):
        assert job.main(base + extra) == 2
        assert words in capsys.readouterr().err
    assert job.main(base + ["--masks", "predict", "--segmenter", path, "--segment-actors", "-1"]) == 2
    assert "--segment-actors must be >= 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("stages", [[], ["--segment-actors", "1", "--cpus-per-segment-actor", "0.5"]],
                         ids=["one_stage", "two_stages"])
def test_predict_on_a_folder_without_masks_writes_every_id_once(ray_local, tmp_path, ckpt, trained, image_folder,
                                                               capsys, stages):
    out = tmp_path / "out"
    args = ["--checkpoint", ckpt, "--input", str(image_folder), "--out", str(out), "--masks", "predict",
            "--segmenter", trained, "--score-threshold", "0.3", "--png", str(tmp_path / "png"), "--no-progress",
            *stages]
    assert job.main(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["kind"] == "images" and summary["masks"] == "predict" and summary["inputs"] == 7
    assert summary["segment_stage"] == bool(stages)
    assert summary["written"] == summary["predicted"] == 6 and summary["skipped"] == 1
    table = pa.concat_tables(pq.read_table(f) for f in sorted(out.glob("part-*.parquet")))
    rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(table["id"].to_pylist()) == sorted(rows) == [f"{i:06d}" for i in IDS]  # each id once
    recalls = []
    for i in IDS:
        r = rows[f"{i:06d}"]
        img, true = make_image("a", i, 64)
        predicted = decode_masks(r["input_masks"], 64, 64)
        translated = decode_masks(r["masks"], r["height"], r["width"])
        assert r["predicted"] and r["segmenter"] == str(Path(trained).resolve()) and r["segment_s"] > 0
        assert len(predicted) == len(translated) == len(r["scores"]) == len(r["translated"]) >= 1
        assert min(r["scores"]) >= 0.3 and all(r["translated"])
        recalls.append(len(match_instances(predicted, true)) / len(true))
        assert (tmp_path / "png" / f"{i:06d}.png").is_file()
    assert np.mean(recalls) >= 0.5, recalls  # the predicted masks are the objects, not noise
    skipped = [json.loads(line) for line in next(out.glob("skipped-*.jsonl")).read_text().splitlines()]
    assert [(q["id"], q["reason"]) for q in skipped] == [("blank", "no_instances_detected")]
    assert "ellipse" in skipped[0]["detail"]

    files = sorted(out.glob("part-*.parquet"))
    assert job.main(args) == 0  # a re-run writes nothing new, and reports the blank image again
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["written"] == 0 and again["already_done"] == 6 and again["skipped"] == 1
    assert sorted(out.glob("part-*.parquet")) == files


@pytest.mark.slow
def test_auto_predicts_only_where_masks_are_missing(ckpt, trained):
    tr = Translator.from_checkpoint(ckpt, ins_max=8)
    seg = InstanceSegmenter.from_file(trained, score_threshold=0.3, max_instances=8)
    rows = []
    for n, i in enumerate(IDS[:4]):
        img, masks = make_image("a", i, 64)
        given = encode_masks(list(masks)) if n % 2 == 0 else []
        rows.append({"id": str(i), "image": png(img), "height": 64, "width": 64, "masks": given, "source": "t",
                     "problems": ""})
    out = translate_rows(tr, rows, size=None, batch_size=4, direction="a2b", checkpoint=ckpt, segmenter=seg,
                         masks="auto", segmenter_path=trained)
    by_id = {r["id"]: r for r in out}
    for n, i in enumerate(IDS[:4]):
        r = by_id[str(i)]
        assert r["image"] is not None and r["predicted"] == (n % 2 == 1)
        assert (len(r["input_masks"]) > 0) == r["predicted"]
        if not r["predicted"]:  # the given masks were used: one translated mask per given mask
            assert len(r["masks"]) == len(make_image("a", i, 64)[1]) and r["segmenter"] is None
    # two stages (segment_rows, then translate_rows with the rows' masks) write what one stage writes
    staged = translate_rows(tr, segment_rows(seg, rows, "auto", trained), size=None, batch_size=4, direction="a2b",
                            checkpoint=ckpt)
    for r in staged:
        one = by_id[r["id"]]
        assert {k: v for k, v in r.items() if k not in ("time_s", "segment_s")} == \
            {k: v for k, v in one.items() if k not in ("time_s", "segment_s")}
        assert (r["segment_s"] is None) == (one["segment_s"] is None)
    with pytest.raises(ValueError, match="needs a segmenter"):
        translate_rows(tr, rows, size=None, batch_size=4, direction="a2b", checkpoint=ckpt, masks="predict")
