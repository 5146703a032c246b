"""Quality metrics on hand-made tensors: identity translation, constant classifiers, masking, gating, shapes."""

import math

import pytest
import torch
from torch import nn

from instagan import metrics as Q
from instagan.synthetic import make_batch


class IdentityG(nn.Module):
    """A 'generator' that returns its input image and masks (Translator needs one parameter for the device)."""

    def __init__(self, mask_mode: str = "instances"):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.mask_mode = mask_mode

    def forward(self, img, masks, valid):
        return img, masks


class ConstantClassifier(nn.Module):
    """Always says `domain`, as two logits or as one logit of b."""

    def __init__(self, domain: str, one_logit: bool = False):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.sign, self.one_logit = (1.0 if domain == "b" else -1.0), one_logit

    def forward(self, x):
        z = torch.full((x.shape[0], 1), 5.0 * self.sign)
        return z if self.one_logit else torch.cat([-z, z], 1)


def box(h, w, r0, r1, c0, c1):
    m = torch.full((h, w), -1.0)
    m[r0:r1, c0:c1] = 1.0
    return m


def test_identity_translation_background_error_zero_and_instances_preserved():
    a, b = make_batch("a", 3, 64), make_batch("b", 3, 64)
    G_ab, G_ba = IdentityG(), IdentityG()
    G_ab.train()
    G_ba.eval()
    vals = Q.validation_metrics(G_ab, G_ba, a, b, ins_max=20, ins_per=2)
    assert vals["val/bg_err_ab"] == 0.0 and vals["val/bg_err_ba"] == 0.0
    assert vals["val/inst_ab"] == 1.0 and vals["val/inst_ba"] == 1.0
    assert vals["val/score"] == pytest.approx(1.0)  # inst 1 - bg_err 0
    assert "val/cls_ab" not in vals
    assert G_ab.training and not G_ba.training  # modes restored after Translator's eval()
    # the identity floor of the evaluation measures the same, and the image-based shapes see the input's shapes
    out, mode = Q.translate(None, a, 20, 2)
    s = Q.summarise([Q.measure(a, out, mode, "a2b", shapes=True)])
    assert s["bg_err"] == 0.0 and s["inst"] == 1.0 and s["iou"] == 1.0
    assert s["img_survive"] == 1.0 and s["img_iou"] == 1.0 and s["img_rect"] == s["img_rect_in"]


def test_translation_changes_background_error():
    a, b = make_batch("a", 2, 64), make_batch("b", 2, 64)

    class Shift(IdentityG):
        def forward(self, img, masks, valid):
            return (img + 0.25).clamp(-1, 1), masks

    vals = Q.validation_metrics(Shift(), IdentityG(), a, b)  # +0.25 per chunk of 2 instances, sequentially
    assert 0.2 < vals["val/bg_err_ab"] <= 0.75 and vals["val/bg_err_ba"] == 0.0


@pytest.mark.parametrize("one_logit", [False, True])
def test_classifier_that_always_says_b(one_logit):
    a, b = make_batch("a", 3, 64), make_batch("b", 3, 64)
    clf = ConstantClassifier("b", one_logit)
    vals = Q.validation_metrics(IdentityG(), IdentityG(), a, b, classifier=clf)
    assert vals["val/cls_ab"] == 1.0 and vals["val/cls_ba"] == 0.0
    assert vals["val/score"] == pytest.approx((1.0 + 0.0) / 2 + 1.0 - 0.0)
    assert Q.classification_score(clf(torch.zeros(4, 3, 8, 8)), "b").tolist() == [1.0] * 4
    assert Q.classification_score(ConstantClassifier("a", one_logit)(torch.zeros(2, 3, 8, 8)), "b").sum() == 0


def test_masked_multiplies_by_union_of_valid_masks():
    img = torch.full((1, 3, 8, 8), 0.5)
    masks = torch.stack([box(8, 8, 0, 8, 0, 4), box(8, 8, 0, 8, 0, 8)])[None]  # slot 1 is padding
    out = Q.masked(img, masks, torch.tensor([[True, False]]))
    assert torch.equal(out[..., :4], torch.full((1, 3, 8, 4), 0.5))
    assert torch.equal(out[..., 4:], torch.zeros(1, 3, 8, 4))
    soft = Q.masked(img, torch.zeros(1, 1, 8, 8), torch.tensor([[True]]))  # mask value 0 -> weight 1/2
    assert torch.allclose(soft, img / 2)


def test_masked_classification_uses_translated_masks():
    """A classifier that says b only where the corner pixel was masked away: the masked score sees the translated
    masks (which leave the corner out), the plain score does not."""

    class CornerIsZero(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            z = torch.where(x[:, 0, 0, 0] == 0, 5.0, -5.0)[:, None]
            return torch.cat([-z, z], 1)

    batch = {"img": torch.full((2, 3, 16, 16), 0.5), "masks": box(16, 16, 4, 12, 4, 12)[None, None].repeat(2, 1, 1, 1),
             "valid": torch.ones(2, 1, dtype=torch.bool)}
    out, mode = Q.translate(None, batch, 20, 2)
    vals = Q.summarise([Q.measure(batch, out, mode, "a2b", CornerIsZero())])
    assert vals["cls"] == 0.0 and vals["cls_masked"] == 1.0


def test_background_error_excludes_input_and_translated_instances():
    x = torch.zeros(1, 3, 16, 16)
    y = torch.full((1, 3, 16, 16), 0.5)
    y[..., 0:4, 0:4] = 2.0  # inside the input instance: not counted
    y[..., 8:12, 8:12] = -3.0  # inside the translated instance only: not counted either
    err = Q.background_error(x, y, box(16, 16, 0, 4, 0, 4)[None, None], torch.tensor([[True]]),
                             box(16, 16, 8, 12, 8, 12)[None, None], torch.tensor([[True]]))
    assert err.tolist() == [0.5]
    full = Q.background_error(x, y, torch.ones(1, 1, 16, 16), torch.tensor([[True]]),
                              torch.ones(1, 1, 16, 16), torch.tensor([[True]]))
    assert full.isnan().all()  # no background pixel: undefined, not 0


def test_instance_preservation_gated_by_area_ratio():
    inp = box(32, 32, 8, 16, 8, 16)  # 64 px
    cases = {"same": inp, "huge": torch.ones(32, 32), "empty": torch.full((32, 32), -1.0),
             "tiny": box(32, 32, 8, 11, 8, 13), "shifted": box(32, 32, 10, 18, 8, 16)}  # tiny: 15 px (< 1/4)
    masks = inp[None, None].repeat(1, len(cases), 1, 1)
    out = torch.stack(list(cases.values()))[None]
    valid = torch.ones(1, len(cases), dtype=torch.bool)
    kept, iou = Q.instance_preservation(masks, valid, out, valid)
    got = dict(zip(cases, kept[0].tolist()))
    assert got == {"same": 1.0, "huge": 0.0, "empty": 0.0, "tiny": 0.0, "shifted": 1.0}
    assert iou[0, 0] == 1.0 and iou[0, 1] == pytest.approx(64 / 1024) and iou[0, 2] == 0.0
    assert iou[0, 4] == pytest.approx(48 / 80)
    # padding and untranslated slots (past ins_max) are not scored
    kept, iou = Q.instance_preservation(masks, torch.tensor([[True, False, True, True, True]]), out,
                                        torch.tensor([[True, True, False, True, True]]))
    assert kept[0, 1].isnan() and kept[0, 2].isnan() and iou[0, 2].isnan()


def test_rectangularity_of_rectangles_and_ellipses():
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    ellipse = torch.where(((yy - 30) / 20) ** 2 + ((xx - 32) / 12) ** 2 <= 1, 1.0, -1.0)
    masks = torch.stack([box(64, 64, 5, 25, 10, 50), ellipse, torch.full((64, 64), -1.0)])[None]
    r = Q.rectangularity(masks, torch.ones(1, 3, dtype=torch.bool))
    assert r[0, 0] == 1.0 and abs(r[0, 1] - math.pi / 4) < 0.07 and r[0, 2].isnan()
    assert Q.target_shape(r, "b")[0, :2].tolist() == [1.0, 0.0]
    assert Q.target_shape(r, "a")[0, :2].tolist() == [0.0, 1.0]


def test_flat_instance_shapes_measure_the_image():
    """An ellipse repainted as its bounding rectangle reads as a rectangle; an erased one does not survive."""
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    inside = ((yy - 32) / 12) ** 2 + ((xx - 30) / 10) ** 2 <= 1
    bg = torch.tensor([-0.6, 0.2, 0.6])[:, None, None] + 0.02 * torch.sin(xx / 3)
    colour = torch.tensor([0.8, -0.7, -0.2])[:, None, None]
    x = torch.where(inside, colour, bg)[None]
    masks, valid = torch.where(inside, 1.0, -1.0)[None, None], torch.ones(1, 1, dtype=torch.bool)
    rect = (yy >= 21) & (yy <= 43) & (xx >= 21) & (xx <= 39)
    same = Q.flat_instance_shapes(x, x, masks, valid)
    assert same["survive"].item() == 1.0 and same["iou"].item() == 1.0
    assert abs(same["rect"].item() - math.pi / 4) < 0.1 and same["rect"].item() == same["rect_in"].item()
    boxy = Q.flat_instance_shapes(x, torch.where(rect, colour, bg)[None], masks, valid)
    assert boxy["survive"].item() == 1.0 and boxy["rect"].item() > 0.95 and 0.7 < boxy["iou"].item() < 0.9
    erased = Q.flat_instance_shapes(x, bg[None], masks, valid)
    assert erased["survive"].item() == 0.0 and erased["iou"].item() == 0.0


def test_generators_without_instance_masks_leave_out_instance_keys():
    a, b = make_batch("a", 2, 64), make_batch("b", 2, 64)
    vals = Q.validation_metrics(IdentityG("none"), IdentityG("none"), a, b, classifier=ConstantClassifier("b"))
    assert "val/inst_ab" not in vals and "val/inst_ba" not in vals
    assert vals["val/bg_err_ab"] == 0.0 and vals["val/score"] == pytest.approx(0.5)


def test_build_classifier_loads_local_weights_and_skips_another_head(tmp_path):
    src = Q.build_classifier("resnet18", num_classes=1)
    torch.save(src.state_dict(), tmp_path / "r18.pt")
    model = Q.build_classifier("resnet18", tmp_path / "r18.pt", num_classes=2)
    assert torch.equal(model.conv1.weight, src.conv1.weight) and model.fc.weight.shape == (2, 512)
    torch.save(Q.build_classifier("resnet34").state_dict(), tmp_path / "r34.pt")
    with pytest.raises(ValueError, match="does not fit torchvision 'resnet18'"):
        Q.build_classifier("resnet18", tmp_path / "r34.pt")
    with pytest.raises(ValueError, match="unknown torchvision model"):
        Q.build_classifier("no_such_net")
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "part.pt")
    with pytest.raises(ValueError, match="missing, unexpected or mismatched.*bn1"):
        Q.build_classifier("resnet18", tmp_path / "part.pt")
    logits = Q.classify(model, torch.zeros(2, 3, 32, 32))
    assert logits.shape == (2, 2)
