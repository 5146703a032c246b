"""instagan.segment and instagan.segment_train: weights files as a user has them (torchvision's own state_dict format,
random weights built here), clear errors for the wrong file, the segmenter checkpoint round trip, the matching
metrics on hand-made masks, and (slow) the small variant learning the generated instances on one CPU core.

    .venv/bin/python -m pytest -q tests/test_segment.py -m "not slow"   # about half a minute
    .venv/bin/python -m pytest -q tests/test_segment.py                 # plus about 3 minutes of training
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torchvision.models import resnet18
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2

from instagan.segment import COCO_CATEGORIES, InstanceSegmenter, build_model, guess_arch, upgrade_keys
from instagan.segment_train import SegmentConfig, build_for_training, evaluate_segmenter, match_instances
from instagan.synthetic import make_image


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def torchvision_file(tmp_path, arch: str, legacy: bool = False) -> tuple[str, dict]:
    """A state_dict saved as torchvision's COCO files are: the builder's own model, torch.save(state_dict). v1's
    file was saved from frozen batch norm, which has no num_batches_tracked: dropped here as there. legacy: the
    layer names of torchvision before its FPN, mask head and RPN conv became Conv2dNormActivation (2021), which
    the COCO v1 file (2019) may still use; torchvision renames them when it loads, and so must we."""
    torch.manual_seed(0)
    if arch == "maskrcnn_resnet50_fpn":
        sd = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    else:
        sd = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None).state_dict()
    if legacy:
        sd = {re.sub(r"^roi_heads\.mask_head\.(\d)\.0\.", lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.",
                     re.sub(r"^(backbone\.fpn\.\w+_blocks\.\d)\.0\.|^(rpn\.head\.conv)\.0\.0\.",
                            lambda m: f"{m[1] or m[2]}.", k)): v for k, v in sd.items()}
        assert "backbone.fpn.inner_blocks.0.weight" in sd and "roi_heads.mask_head.mask_fcn4.bias" in sd
        assert "rpn.head.conv.weight" in sd
    path = tmp_path / f"{arch}_coco.pth"
    torch.save(sd, path)
    return str(path), upgrade_keys(sd)


@pytest.mark.parametrize("arch, legacy", [("maskrcnn_resnet50_fpn", False), ("maskrcnn_resnet50_fpn", True),
                                          ("maskrcnn_resnet50_fpn_v2", False)])
def test_a_torchvision_state_dict_loads_the_way_a_users_coco_file_does(tmp_path, arch, legacy):
    path, sd = torchvision_file(tmp_path, arch, legacy)
    assert guess_arch(sd) == arch
    seg = InstanceSegmenter.from_file(path, category="Sheep", score_threshold=0.0, size=128)
    assert seg.arch == arch and seg.category == "sheep" and seg.label == 20 == COCO_CATEGORIES.index("sheep")
    own = seg.model.state_dict()
    for key in ("backbone.body.layer4.2.conv3.weight", "roi_heads.mask_predictor.mask_fcn_logits.weight",
                "backbone.body.bn1.running_var", "backbone.fpn.inner_blocks.0.0.weight", "rpn.head.conv.0.0.weight",
                "roi_heads.mask_head.3.0.weight"):
        assert torch.equal(own[key], sd[key]), key
    if arch == "maskrcnn_resnet50_fpn":  # torchvision's layout for its COCO weights: frozen batch norm, eps 0
        bn1 = seg.model.backbone.body.bn1
        assert type(bn1).__name__ == "FrozenBatchNorm2d" and bn1.eps == 0
        assert not seg.model.backbone.body.layer1[0].conv1.weight.requires_grad
    assert InstanceSegmenter.from_file(path, category=20).label == 20
    img = make_image("a", 0, 64)[0]
    found = seg.predict([img, img[:48]])
    assert [f.masks.shape[1:] for f in found] == [(64, 64), (48, 64)]
    assert all(f.masks.dtype == bool and len(f.scores) == len(f.masks) <= seg.max_instances for f in found)
    assert all(np.all(np.diff(f.scores) <= 0) for f in found)  # by decreasing score


def test_a_wrong_file_is_a_clear_error(tmp_path):
    path, _ = torchvision_file(tmp_path, "maskrcnn_resnet50_fpn_v2")
    with pytest.raises(ValueError, match=r"v2_coco\.pth does not hold maskrcnn_resnet50_fpn weights") as err:
        InstanceSegmenter.from_file(path, arch="maskrcnn_resnet50_fpn")
    message = str(err.value)
    assert "missing keys" in message and "unexpected keys" in message and "backbone.fpn.inner_blocks.0" in message
    assert "look like maskrcnn_resnet50_fpn_v2" in message
    classifier = tmp_path / "resnet18.pth"
    torch.save(resnet18(weights=None).state_dict(), classifier)
    with pytest.raises(ValueError, match=r"resnet18\.pth is not a torchvision Mask R-CNN state_dict"):
        InstanceSegmenter.from_file(classifier)
    pickled = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a whole module: weights_only refuses to unpickle it
    with pytest.raises(ValueError, match=r"module\.pth is not a readable weights file"):
        InstanceSegmenter.from_file(pickled)
    with pytest.raises(ValueError, match="not found"):
        InstanceSegmenter.from_file(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="unknown category 'unicorn'"):
        InstanceSegmenter.from_file(path, category="unicorn")
    with pytest.raises(ValueError, match="category id 12 is not"):  # "N/A" in COCO's label list
        InstanceSegmenter.from_file(path, category=12)


def test_segmenter_checkpoint_round_trip_and_fine_tune_start(tmp_path):
    torch.manual_seed(1)
    classes = ["__background__", "ellipse", "rectangle"]
    seg = InstanceSegmenter(build_model("small", 3), "small", classes, category="rectangle", score_threshold=0.0,
                            layout="scratch")
    path = seg.save(tmp_path / "seg.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["arch"] == "small" and raw["classes"] == classes and raw["size"] == 128
    back = InstanceSegmenter.from_file(path, category="rectangle", score_threshold=0.0)
    assert back.label == 2 and back.layout == "scratch"
    assert all(torch.equal(a, b) for a, b in zip(seg.model.state_dict().values(), back.model.state_dict().values()))
    imgs = [make_image("b", i, 64)[0] for i in range(2)]
    for a, b in zip(seg.predict(imgs), back.predict(imgs)):
        assert np.array_equal(a.masks, b.masks) and np.allclose(a.scores, b.scores)
    with pytest.raises(ValueError, match="knows 2 categories: pick one"):
        InstanceSegmenter.from_file(path)
    with pytest.raises(ValueError, match="is a small segmenter checkpoint, not maskrcnn_resnet50_fpn"):
        InstanceSegmenter.from_file(path, arch="maskrcnn_resnet50_fpn")
    # fine-tuning from that file on one domain: its weights, new predictors for the new classes
    cfg = SegmentConfig.from_dict({"model": {"init": str(path)}})
    start = build_for_training(cfg, ["__background__", "ellipse"])
    own = start.model.state_dict()
    key = "backbone.fpn.layer_blocks.0.0.weight"
    assert torch.equal(own[key], raw["state_dict"][key])
    assert own["roi_heads.box_predictor.cls_score.weight"].shape[0] == 2 and start.category == "ellipse"


def test_matching_pairs_instances_one_to_one_by_iou():
    true = np.zeros((2, 10, 10), bool)
    true[0, :5, :5] = True  # 25 px
    true[1, 5:, 5:] = True
    pred = np.zeros((3, 10, 10), bool)
    pred[0, :5, :4] = True  # IoU 20/25 with true 0
    pred[1, :5, :5] = True  # IoU 1 with true 0: the assignment takes this one
    pred[2, 8:, 8:] = True  # IoU 4/25 with true 1: under 0.5, no match
    assert match_instances(pred, true) == [1.0]
    assert match_instances(pred[:1], true) == pytest.approx([0.8])
    assert match_instances(pred[:0], true) == [] and match_instances(pred, true[:0]) == []
    with pytest.raises(ValueError, match="must be a uint8 array"):
        InstanceSegmenter(build_model("small", 2), "small", ["__background__", "x"]).predict([true[0]])


@pytest.mark.slow
def test_small_segmenter_learns_the_generated_instances_in_cpu_minutes(small_segmenter):
    """200 steps of 4 images from scratch on one core (about 3 minutes; conftest.small_segmenter): mean matched IoU
    >= 0.7 and instance recall >= 0.8 on the test split (measured 0.84 and 0.87); an untrained one finds nothing."""
    root, ckpt = small_segmenter
    cfg = SegmentConfig.from_dict({"data": {"root": root, "domains": "a"}, "train": {"steps": 200}})
    untrained = build_for_training(cfg, ["__background__", "ellipse"])
    assert evaluate_segmenter(untrained, root, "test", "a", images=20)["recall"] < 0.1
    seg = InstanceSegmenter.from_file(ckpt)
    result = evaluate_segmenter(seg, root, "test", "a")
    assert result["images"] == 60 and result["instances"] > 150
    assert result["iou"] >= 0.7 and result["recall"] >= 0.8 and result["precision"] >= 0.7, result
    assert result["mask_ap50"] > 0.5, result
    assert (ckpt / "segmenter.pt").is_file()
    # the checkpoint folder loads as --segmenter does, and the filters hold
    back = InstanceSegmenter.from_file(ckpt, min_area=0)
    img, masks = make_image("a", 590, 64)
    found = back.predict([img])[0]
    assert len(found.masks) >= 1
    assert len(InstanceSegmenter.from_file(ckpt, max_instances=1)
               .predict([img])[0].masks) == 1
    assert len(InstanceSegmenter.from_file(ckpt, min_area=64 * 64)
               .predict([img])[0].masks) == 0
    assert len(InstanceSegmenter.from_file(ckpt, score_threshold=1.0)
               .predict([img])[0].masks) == 0
    tensor = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1  # [-1, 1] batches work too
    assert np.array_equal(back.predict(tensor)[0].masks, found.masks)
