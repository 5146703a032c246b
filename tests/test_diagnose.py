"""jobs/diagnose.py: D's views, per-loss gradients at the decoders, loss curves of a run, and the judges' probe."""

import json

import numpy as np
import pytest
from PIL import Image

from data_prep.synthetic import write_synthetic
from instagan import checkpoint
from instagan.config import Config
from instagan.diagnose import diagnose_checkpoint, probe
from instagan.loop import train_local
from instagan.metrics import load_split
from jobs import diagnose as diagnose_job

CFG = {"model": {"ngf": 8, "ndf": 8, "n_blocks": 1, "composite": True, "paint": "residual", "mask_cond": True},
       "loss": {"lambda_seg": 1.0},
       "train": {"ins_max": 4, "ins_per": 2, "batch_size": 2, "epochs": 1, "epochs_decay": 1},
       "data": {"size": 32, "load_size": 36},
       "run": {"max_steps": 4, "checkpoint_every": 2, "image_every": 0, "log_every": 1}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diag")
    write_synthetic(tmp / "data", n=16, size=36, test_fraction=0.25)
    cfg = Config.from_dict({**CFG, "data": {**CFG["data"], "root": str(tmp / "data")}})
    train_local(cfg, tmp / "run")
    return tmp


def test_a_run_gets_one_point_per_checkpoint_its_loss_curves_and_a_figure(run, capsys):
    assert diagnose_job.main(["--run", str(run / "run"), "--data-root", str(run / "data"), "--images", "4"]) == 0
    report = json.loads((run / "run" / "diagnose.json").read_text())
    assert [p["step"] for p in report["points"]] == [2, 4]
    assert [c["step"] for c in report["loss_curves"]] == [1, 2, 3, 4]
    for p in report["points"]:
        assert set(p["D_b_gap"]) == {"full", "image_only", "masks_only"}
        assert set(p["grad_norm"]) == {"image_decoder", "mask_decoder"}
        assert set(p["grad_norm"]["image_decoder"]) == {"gan", "cyc", "ctx", "idt", "seg"}
        assert all(np.isfinite(v) and v >= 0 for part in p["grad_norm"].values() for v in part.values())
    fig = np.asarray(Image.open(run / "run" / "diagnose.png").convert("RGB"))
    assert fig.std() > 10
    printed = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(ln)["step"] for ln in printed if ln.startswith("{")] == [2, 4]  # one line per checkpoint


def test_gradient_norms_are_those_of_each_weighted_term(run, tmp_path):
    """Doubling a loss weight doubles its gradient norm at the decoders; a zero weight sends none; the other terms
    do not move."""
    ckpt = sorted((run / "run").glob("checkpoint_step*"))[-1]
    cfg, payload = checkpoint.load(ckpt)
    a, b = (load_split(run / "data", "test", d, 32, limit=4, batch_size=4)[0][0] for d in "ab")
    base = diagnose_checkpoint(ckpt, a, b)["grad_norm"]
    changed = cfg.replace(**{"loss.lambda_cyc": 2 * cfg.loss.lambda_cyc, "loss.lambda_ctx": 0.0})
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / checkpoint.CONFIG_FILE).write_text(changed.to_json())
    (tmp_path / "ck" / checkpoint.STATE_FILE).symlink_to(ckpt / checkpoint.STATE_FILE)
    other = diagnose_checkpoint(tmp_path / "ck", a, b)["grad_norm"]
    for part in base:
        assert base[part]["cyc"] > 0 and other[part]["cyc"] == pytest.approx(2 * base[part]["cyc"], rel=1e-4)
        assert other[part]["ctx"] == 0.0
        for term in ("gan", "idt", "seg"):
            assert other[part][term] == pytest.approx(base[part][term], rel=1e-4)


def test_probe_segmenter_learns_the_foreground_from_real_images(run):
    cfg = Config.from_dict(CFG)
    out = probe(run / "data", cfg, steps=40, every=10, images=4)
    assert out["step"] == [10, 20, 30, 40]
    for key in ("d_image_acc", "d_boxes_acc"):
        assert all(0.0 <= v <= 1.0 for v in out[key])
    assert out["seg_iou"][-1] > 0.5 and out["seg_iou"][-1] > out["seg_iou"][0], out["seg_iou"]


def test_follow_reads_an_image_that_follows_its_masks_and_one_that_does_not():
    """diagnose.follow_stats on hand-made translations of single ellipses: each mask replaced by its bounding box
    and the box painted in the object's colour reads as followed in full; the same masks over the unchanged image
    do not; a 2x2 fragment far from a box spoils the mask's shape but not its largest component's."""
    from types import SimpleNamespace

    import torch

    from instagan.diagnose import follow_stats
    from instagan.synthetic import make_batch

    batch = make_batch("a", 4, 64, ins=(1, 1))
    boxes, painted = torch.full_like(batch["masks"], -1.0), batch["img"].clone()
    for b in range(4):
        m = batch["masks"][b, 0] > 0
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
        boxes[b, 0][box] = 1
        painted[b][(slice(None), *box)] = batch["img"][b][:, m].median(1).values[:, None, None]
    ideal = follow_stats([(batch, SimpleNamespace(img=painted, masks=boxes))])
    assert ideal["instances"] == 4 and ideal["mask_target"] == 1 and ideal["img_target_given_mask"] == 1, ideal
    assert ideal["grown_within_tol"] == 1 and ideal["object_drift"] == 0 and ideal["stray"] == 0, ideal
    lagging = follow_stats([(batch, SimpleNamespace(img=batch["img"], masks=boxes))])
    assert lagging["mask_target"] == 1 and lagging["img_target_given_mask"] == 0, lagging
    assert lagging["grown_within_tol"] < 0.5 and lagging["object_drift"] == 0, lagging
    frag = boxes.clone()
    for b in range(4):
        far = (0, 0) if boxes[b, 0, :32, :32].max() < 0 else (60, 60)
        frag[b, 0, far[0]:far[0] + 2, far[1]:far[1] + 2] = 1
    spoilt = follow_stats([(batch, SimpleNamespace(img=painted, masks=frag))])
    assert spoilt["mask_target"] < 1 and spoilt["mask_target_largest"] == 1 and spoilt["stray"] > 0, spoilt


def test_follow_can_zero_the_decoders_change_and_swap_lever_keys(run, capsys):
    """jobs/diagnose.py --follow: with --no-change a residual painter's image is the input itself, so fewer object
    pixels drift from their colour than with the trained change (4 steps from the noisy init); --set swaps a lever
    key on the same weights, and a key the weights cannot take (or --no-change on a direct painter) is an error,
    exit 2."""
    ckpt = str(sorted((run / "run").glob("checkpoint_step*"))[-1])
    base = ["--follow", ckpt, "--data-root", str(run / "data")]
    assert diagnose_job.main(base) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert diagnose_job.main(base + ["--no-change"]) == 0
    zero = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert zero["instances"] == trained["instances"] > 0 and zero["mask_target"] == trained["mask_target"]
    assert zero["object_drift"] < trained["object_drift"]
    assert 0 <= zero["img_target"] <= 1
    assert diagnose_job.main(base + ["--set", "model.paint=direct", "--no-change"]) == 2
    assert diagnose_job.main(base + ["--set", "model.layers=true"]) == 2  # layers needs paint extend
    assert diagnose_job.main(base + ["--set", "model.ngf=4"]) == 2  # other weights
    assert "error:" in capsys.readouterr().err
