"""FID and KID (instagan/fid.py): feature networks read from local files the way a user's file is, and distances
computed for real on synthetic images (random-weight networks: the properties hold in any feature space)."""

import re

import pytest
import torch
import torchvision

from instagan.fid import KID_SUBSET_SIZE, build_feature_net, features, fid_kid, fid_kid_features
from instagan.synthetic import make_batch

FID_SELF_TOL = 1e-3  # float64 features; FID of identical sets comes out ~1e-5 (eigvals of a rank-deficient product)


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("fid") / "resnet18.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def net(resnet_file):
    return build_feature_net("resnet18", resnet_file, size=32)


@pytest.fixture(scope="module")
def images():
    return make_batch("a", 24, 32)["img"]  # 24 synthetic 32 x 32 images in [-1, 1]


def test_a_saved_network_loads_with_its_weights_and_gives_features_before_the_head(resnet_file, net, images):
    ref = torchvision.models.resnet18(weights=None)
    ref.load_state_dict(torch.load(resnet_file, weights_only=True))
    ref.fc = torch.nn.Identity()
    x = images[:4]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = ref.eval()(((x + 1) / 2 - mean) / std)  # 32 px in, 32 px read: no resize
        got = net(x)
    assert net.num_features == 512 and got.shape == (4, 512)
    assert torch.allclose(got, expected, atol=1e-5)
    # A classifier file as jobs/train_classifier.py writes it ({"state_dict", "meta"}, a 2-class head) fits too:
    # the head is dropped, so the same backbone gives the same features.
    two = torchvision.models.resnet18(weights=None, num_classes=2)
    two.load_state_dict(ref.state_dict(), strict=False)
    wrapped = resnet_file.parent / "clf.pt"
    torch.save({"state_dict": two.state_dict(), "meta": {"arch": "resnet18", "size": 32}}, wrapped)
    # and so does a file without BatchNorm's num_batches_tracked, as torchvision's ImageNet files are
    old = resnet_file.parent / "old.pt"
    torch.save({k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}, old)
    with torch.no_grad():
        for path in (wrapped, old):
            assert torch.allclose(build_feature_net("resnet18", path, size=32)(x), expected, atol=1e-5), path


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(net, images):
    g = torch.Generator().manual_seed(0)
    f0 = features(images, net)
    r0 = fid_kid_features(f0, f0)
    noisy = {s: fid_kid_features(features((images + s * torch.randn(images.shape, generator=g)).clamp(-1, 1), net),
                                 f0) for s in (0.1, 0.5)}
    assert abs(r0["fid"]) < FID_SELF_TOL
    assert FID_SELF_TOL * 100 < noisy[0.1]["fid"] < noisy[0.5]["fid"]
    # KID of identical sets, each subset the whole set (m = 24 < KID_SUBSET_SIZE): the unbiased MMD^2 estimate is
    # (2 / m) (mean off-diagonal k - mean diagonal k) with k = (f f^T / d + 1)^3, slightly negative, and small next
    # to what noise adds.
    m, d = f0.shape
    k = (f0 @ f0.T / d + 1) ** 3
    assert r0["kid_subset_size"] == m and r0["kid_std"] == pytest.approx(0.0, abs=1e-9)
    expected = 2 / m * (k[~torch.eye(m, dtype=torch.bool)].mean() - k.diag().mean())
    assert r0["kid_mean"] == pytest.approx(float(expected), rel=1e-6)
    assert r0["kid_mean"] < noisy[0.1]["kid_mean"] < noisy[0.5]["kid_mean"]
    assert abs(r0["kid_mean"]) < 0.05 * noisy[0.5]["kid_mean"]


def test_batching_and_batch_lists_do_not_change_the_numbers(net, images):
    other = make_batch("b", 10, 32)["img"]
    whole = fid_kid_features(features(other, net), features(images, net))
    assert fid_kid(other, images, net, batch_size=3) == pytest.approx(whole, rel=1e-6, abs=1e-9)
    assert fid_kid([other[:4], other[4:]], [images[:20], images[20:]], net, batch_size=7) == pytest.approx(
        whole, rel=1e-6, abs=1e-9)
    assert whole["kid_subset_size"] == 10 and whole["fid"] > FID_SELF_TOL * 100


def test_kid_subset_size_adapts_to_the_sets():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(70, 8, generator=g), torch.randn(60, 8, generator=g) + 0.5
    r = fid_kid_features(a, b)
    assert r["kid_subset_size"] == KID_SUBSET_SIZE and r["kid_std"] > 0  # subsets of 50 out of 60 differ
    assert fid_kid_features(a, b) == r  # the subsets are drawn with a fixed seed
    assert fid_kid_features(a[:3], b)["kid_subset_size"] == 3
    with pytest.raises(ValueError, match="at least 2"):
        fid_kid_features(a[:1], b)


def test_a_file_of_another_architecture_is_an_error_naming_the_file(resnet_file, tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(resnet_file)) + ".*mobilenet_v3_small.*missing"):
        build_feature_net("mobilenet_v3_small", resnet_file)
    with pytest.raises(ValueError, match=re.escape(str(resnet_file)) + ".*inception-fid"):
        build_feature_net("inception-fid", resnet_file)
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    with pytest.raises(ValueError, match=re.escape(str(text))):
        build_feature_net("resnet18", text)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_feature_net("resnet18", tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="unknown feature network"):
        build_feature_net("no_such_net", resnet_file)


def test_the_standard_fid_inception_loads_from_a_local_file(tmp_path, monkeypatch):
    """A file with the key layout of pt_inception-2015-12-05-6726825d.pth (torchvision's Inception3 with 1008
    classes, no aux head; random weights here) builds torch-fidelity's FID network without any download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # where a download would land
    torch.manual_seed(0)
    state = torchvision.models.inception_v3(weights=None, num_classes=1008, aux_logits=False,
                                            init_weights=False).state_dict()
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    net = build_feature_net("inception-fid", path)
    assert torch.equal(net.net.Mixed_7c.branch_pool.conv.weight, state["Mixed_7c.branch_pool.conv.weight"])
    f = features(make_batch("a", 2, 32)["img"], net)  # resized to 299 px inside
    assert f.shape == (2, 2048) and f.isfinite().all()
    # the same file as torchvision's inception_v3 (head dropped): 2048 features too
    assert features(make_batch("a", 2, 32)["img"], build_feature_net("inception_v3", path, size=75)).shape == (2, 2048)
    assert not (tmp_path / "hub").exists()
