"""End to end: train the domain classifier for an epoch, evaluate a tiny checkpoint, check the JSON, the grid and
the Markdown report (with FID/KID from a local feature-network file)."""

import json
import shlex

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from PIL import Image

from data_prep.synthetic import write_synthetic
from instagan import checkpoint
from instagan.config import Config
from instagan.fid import build_feature_net, features, fid_kid_features
from instagan.metrics import classification_score, classify, load_classifier, load_split, masked
from instagan.synthetic import make_batch
from instagan.train import TrainState, train_step
from jobs import evaluate as evaluate_job
from jobs import train_classifier


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    write_synthetic(tmp / "data", n=12, size=64, test_fraction=0.25)  # 9 train + 3 test images per domain
    # one undecodable test image: it must be skipped and reported, the rest evaluated
    part = sorted((tmp / "data" / "test" / "a").glob("part-*.parquet"))[0]
    table = pq.read_table(part)
    images = table.column("image").to_pylist()
    images[0] = b"not an image"
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image",
                                    pa.array(images, table.schema.field("image").type)), part)
    cfg = Config.from_dict({"model": {"ngf": 8, "ndf": 8, "n_blocks": 1}, "data": {"size": 64}})
    state = TrainState.create(cfg)
    train_step(state, make_batch("a", 2, 64), make_batch("b", 2, 64))
    checkpoint.save(state, tmp / "ckpt")
    report = train_classifier.main(["--data-root", str(tmp / "data"), "--epochs", "1", "--batch-size", "8",
                                    "--out", str(tmp / "clf.pt")])
    return tmp, report, table.column("id")[0].as_py()


def test_train_classifier_reports_and_saves(setup):
    tmp, report, bad_id = setup
    assert report["train"]["images"] == 18 and report["test"]["images"] == 5
    assert [s["id"] for s in report["skipped"]] == [bad_id]
    model, meta = load_classifier(tmp / "clf.pt")  # weights_only=True inside
    # The reported test accuracy is the saved classifier's, recomputed here on the same 5 test images.
    hits, hits_masked = [], []
    for d in ("a", "b"):
        for batch in load_split(tmp / "data", "test", d, 64)[0]:
            hits.append(classification_score(classify(model, batch["img"]), d))
            hits_masked.append(classification_score(classify(model, masked(batch["img"], batch["masks"],
                                                                           batch["valid"])), d))
    assert len(torch.cat(hits)) == 5
    assert report["test"]["acc"] == pytest.approx(torch.cat(hits).mean().item())
    assert report["test"]["acc_masked"] == pytest.approx(torch.cat(hits_masked).mean().item())
    assert meta["arch"] == "resnet18" and meta["size"] == 64 and model.input_size == 64
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 2)


def test_evaluate_writes_json_and_grid(setup, capsys):
    tmp, clf_report, bad_id = setup
    brief = evaluate_job.main(["--checkpoint", str(tmp / "ckpt"), "--data-root", str(tmp / "data"),
                               "--classifier", str(tmp / "clf.pt"), "--out", str(tmp / "eval")])
    captured = capsys.readouterr()
    printed = json.loads(captured.out.strip().splitlines()[-1])
    assert printed == brief and brief["skipped"] == 1
    assert "[evaluate]: 100%" in captured.err and "6/6" in captured.err  # tqdm: 3 rows x 2 directions
    report = json.loads((tmp / "eval" / "metrics.json").read_text())
    rows = report["rows"]
    assert set(rows) == {"model", "identity", "untrained", "real", "real_target"}
    # The ceiling row measures real target images as they are: real b instances read as rectangles (those not
    # occluded), real a instances as ellipses.
    assert rows["real_target"]["a2b"]["mask_shape"] > 0.5 and rows["real_target"]["b2a"]["mask_shape"] > 0.5
    for row in ("model", "identity", "untrained"):
        for direction in ("a2b", "b2a"):
            vals = rows[row][direction]
            assert vals["images"] == (2 if direction == "a2b" else 3)
            for key in ("cls", "cls_masked", "inst", "iou", "img_survive", "img_shape"):  # shares
                assert vals[key] is not None and 0.0 <= vals[key] <= 1.0, (row, direction, key)
            assert 0.0 <= vals["bg_err"] <= 2.0  # [-1, 1] units
    # The real row is the classifier's accuracy on the same test images train_classifier reported on (2 a + 3 b).
    real = rows["real"]
    assert (2 * real["a"]["acc"] + 3 * real["b"]["acc"]) / 5 == pytest.approx(clf_report["test"]["acc"])
    for direction in ("a2b", "b2a"):  # the identity floor is exact
        ident = rows["identity"][direction]
        assert ident["bg_err"] == 0.0 and ident["inst"] == 1.0 and ident["iou"] == 1.0 and ident["img_survive"] == 1.0
        # and the identity's classification scores are the classifier's errors on the real source images
        src = "a" if direction == "a2b" else "b"
        assert ident["cls"] == pytest.approx(1.0 - rows["real"][src]["acc"])
        assert ident["cls_masked"] == pytest.approx(1.0 - rows["real"][src]["acc_masked"])
    assert rows["model"]["a2b"]["bg_err"] > 0.0  # one training step is far from the identity
    assert report["skipped"] == [{"domain": "a", "id": bad_id, "reason": report["skipped"][0]["reason"]}]
    assert "Error" in report["skipped"][0]["reason"]
    assert report["mask_mode"] == "instances" and report["classifier"]["arch"] == "resnet18"
    with Image.open(tmp / "eval" / "grid.png") as im:  # 4 columns, 2 + 3 rows of 64 px shown at 128 px
        w, h = im.size
        assert 4 * 128 < w < 4 * 128 + 120 and 5 * 128 < h < 5 * 128 + 60  # plus label strips and gaps
        header = np.asarray(im.convert("L"))[:14, w - 4 * 130:]  # column labels drawn above the cells
        assert (header > 200).mean() > 0.7 and (header < 80).any()


def test_evaluate_rejects_a_missing_split(setup, capsys):
    tmp, _, _ = setup
    with pytest.raises(SystemExit) as e:
        evaluate_job.main(["--checkpoint", str(tmp / "ckpt"), "--data-root", str(tmp / "data"), "--split", "nope",
                           "--out", str(tmp / "eval_nope")])
    assert e.value.code == 2 and "nope" in capsys.readouterr().err


def test_evaluate_with_fid_weights_adds_fid_rows_and_a_report(setup):
    tmp, _, _ = setup
    torch.manual_seed(0)
    weights = tmp / "resnet18.pt"  # a user's feature network file (random weights: the plumbing is what counts)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    argv = ["--checkpoint", str(tmp / "ckpt"), "--data-root", str(tmp / "data"), "--out", str(tmp / "eval_fid"),
            "--fid-weights", str(weights), "--fid-arch", "resnet18", "--fid-size", "32"]
    brief = evaluate_job.main(argv)
    report = json.loads((tmp / "eval_fid" / "metrics.json").read_text())
    rows = report["rows"]
    assert report["fid"] == {"arch": "resnet18", "weights": str(weights), "num_features": 512, "size": 32}
    for row in ("model", "identity", "untrained"):
        for direction in ("a2b", "b2a"):
            vals = rows[row][direction]
            assert vals["fid"] > -1e-3 and vals["kid_std"] >= 0.0 and vals["kid_subset_size"] == 2, (row, direction)
            assert brief["rows"][row][direction]["fid"] == round(vals["fid"], 3)
    # The identity floor is the real source images against the real target images of the same split.
    net = build_feature_net("resnet18", weights, size=32)
    real = {d: features([b["img"] for b in load_split(tmp / "data", "test", d, 64)[0]], net) for d in "ab"}
    for direction, src, dst in (("a2b", "a", "b"), ("b2a", "b", "a")):
        expected = fid_kid_features(real[src], real[dst])
        assert rows["identity"][direction]["fid"] == pytest.approx(expected["fid"], rel=1e-6)
        assert rows["identity"][direction]["kid_mean"] == pytest.approx(expected["kid_mean"], rel=1e-6)
    assert rows["model"]["a2b"]["fid"] != pytest.approx(rows["identity"]["a2b"]["fid"])
    md = (tmp / "eval_fid" / "report.md").read_text()
    assert "| row | fid a2b | fid b2a | kid_mean a2b | kid_mean b2a |" in md
    assert all(f"| {row} | " in md for row in ("model", "identity", "untrained"))
    assert "](grid.png)" in md and (tmp / "eval_fid" / "grid.png").is_file()
    assert shlex.join(["python", "jobs/evaluate.py", *argv]) in md  # the exact command
    assert json.dumps(report["config"], indent=2) in md and '"ngf": 8' in md  # the model config
